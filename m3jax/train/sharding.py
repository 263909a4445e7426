"""The training mesh: one axis, "data", over every device of every process.

Data parallelism: each batch's rows are split over the axis; parameters and optimiser state are replicated.
FSDP (fsdp=True): each parameter and its optimiser state is additionally split along its largest dimension that the
axis size divides (leaves with no such dimension, e.g. biases of odd width, stay replicated). The step casts the
parameters to the compute dtype and gathers them whole for the forward (ZeRO-3 at rest: master weights, gradients
and Adam moments live sharded; the gathered compute copy is bfloat16 with bf16=True), and the gradients come back
reduce-scattered to the same layout.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from m3jax.train.loss import DATA_AXIS


def make_mesh(devices: Any = None) -> Mesh:
    """A 1-D mesh named "data" over `devices` (default: jax.devices(), i.e. every process's devices)."""
    devices = jax.devices() if devices is None else list(devices)
    return Mesh(np.array(devices), (DATA_AXIS,))


def fsdp_spec(shape: tuple[int, ...], world: int) -> P:
    """PartitionSpec splitting the largest dimension divisible by world (the first such among equals); P() if
    none is (or world is 1)."""
    if world > 1:
        dims = sorted((d for d in range(len(shape)) if shape[d] % world == 0 and shape[d] >= world),
                      key=lambda d: (-shape[d], d))
        if dims:
            spec = [None] * len(shape)
            spec[dims[0]] = DATA_AXIS
            return P(*spec)
    return P()


def tree_shardings(tree: Any, mesh: Mesh, fsdp: bool) -> Any:
    """NamedSharding per leaf of tree (arrays or ShapeDtypeStructs): replicated, or fsdp_spec."""
    world = mesh.shape[DATA_AXIS]
    return jax.tree_util.tree_map(
        lambda x: NamedSharding(mesh, fsdp_spec(tuple(x.shape), world) if fsdp else P()), tree)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Stacked micro-batches [A, R, ...]: rows split over the data axis."""
    return NamedSharding(mesh, P(None, DATA_AXIS))
