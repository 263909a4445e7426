"""`m3jax preflight --job train`: fit()'s optimiser step compiled for an accelerator target from shapes only
(m3jax.train.loop.lower_step: the same graph, optimiser, mesh and shardings as fit), with its memory per device."""

from __future__ import annotations

import os
from collections.abc import Callable

from m3jax import accelerators
from m3jax.preflight import ShapeCheck, load_config, timed_check
from m3jax.train.loop import TrainConfig, lower_step


def train_checks(target: str, config: TrainConfig, *, model: str | os.PathLike = "bge-m3",
                 progress: Callable[[ShapeCheck], None] | None = None) -> list[ShapeCheck]:
    """Compiles fit()'s step on every device of `target` (one data-parallel mesh over all hosts, as fit) at the
    longest padded lengths, query_max_len x passage_max_len: the step's most demanding shape."""
    import jax
    import numpy as np

    from m3jax.train.data import bucket_lengths
    from m3jax.train.loss import DATA_AXIS

    devices = accelerators.compile_only_devices(target)
    mesh = jax.sharding.Mesh(np.array(devices), (DATA_AXIS,))
    cfg = load_config(model)
    buckets = config.length_buckets if config.length_buckets is not None else None
    kw = {} if buckets is None else {"buckets": tuple(buckets)}
    lq = bucket_lengths(config.data.query_max_len, **kw)[-1]
    lp = bucket_lengths(config.data.passage_max_len, **kw)[-1]
    flags = "".join(f" {f}" for f, on in (("bf16", config.bf16), ("fsdp", config.fsdp), ("remat", config.remat),
                                          (f"cache/{config.gradient_cache_chunk}", config.gradient_cache_chunk))
                    if on)
    name = f"train [{config.per_device_batch_size}x{config.data.train_group_size} x {lq}/{lp}]{flags}"
    check = timed_check(name, lp, config.per_device_batch_size * config.data.train_group_size, devices[0],
                        lambda: lower_step(cfg, config, mesh, lq, lp).compile())
    if progress is not None:
        progress(check)
    return [check]
