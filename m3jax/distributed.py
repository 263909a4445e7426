"""Multi-host runs (`m3jax embed`, `fit`): `jax.distributed` from flags or the environment, and barriers, on JAX's
public API.

On a Cloud TPU VM with no coordinator given, jax.distributed.initialize() is called with no arguments: JAX reads
the pod slice (workers, this worker's index, the coordinator) from the TPU metadata, so every worker of a slice can
run the very same command (a single-host TPU VM is then one process of one).
"""

from __future__ import annotations

import importlib.util
import logging
import os
from pathlib import Path

logger = logging.getLogger("m3jax")

ENV = {"coordinator": "M3JAX_COORDINATOR", "num_processes": "M3JAX_NUM_PROCESSES", "process_id": "M3JAX_PROCESS_ID"}


def initialize(coordinator: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> tuple[int, int]:
    """Starts jax.distributed when a coordinator (flag or $M3JAX_COORDINATOR) is given, or on a Cloud TPU VM from its
    metadata; returns (process id, count).

    Otherwise a single process, unless jax.distributed was already initialised by the caller."""
    import jax

    coordinator = coordinator or os.environ.get(ENV["coordinator"])
    if num_processes is None and os.environ.get(ENV["num_processes"]):
        num_processes = int(os.environ[ENV["num_processes"]])
    if process_id is None and os.environ.get(ENV["process_id"]):
        process_id = int(os.environ[ENV["process_id"]])
    if coordinator and not jax.distributed.is_initialized():
        if num_processes is None or process_id is None:
            raise ValueError("a multi-host run needs --coordinator, --num-processes and --process-id together "
                             f"(got coordinator={coordinator!r}, num_processes={num_processes}, "
                             f"process_id={process_id})")
        if not 0 <= process_id < num_processes:
            raise ValueError(f"--process-id must be in 0 ... {num_processes - 1}, got {process_id}")
        jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                                   process_id=process_id)
    elif not coordinator and (num_processes or 1) > 1:
        raise ValueError(f"--num-processes {num_processes} needs --coordinator HOST:PORT")
    elif not coordinator and not jax.distributed.is_initialized() and _on_cloud_tpu_vm():
        try:
            jax.distributed.initialize()
        except RuntimeError as e:
            if "before any JAX" not in str(e):
                raise ValueError(f"Cloud TPU VM: jax.distributed.initialize() could not read the pod slice from the "
                                 f"TPU metadata ({type(e).__name__}: {e}); pass --coordinator HOST:PORT "
                                 "--num-processes P --process-id p instead") from e
            # Too late to join a pod slice: JAX already runs on this host's chips alone.
            logger.warning("Cloud TPU VM, but JAX computed before m3jax could call jax.distributed.initialize(): "
                           "running as a single process; on a pod slice call it first")
    return jax.process_index(), jax.process_count()


GOOGLE_PCI_VENDOR = "0x1ae0"  # the PCI vendor id of TPU chips


def _on_cloud_tpu_vm() -> bool:
    """Whether this host has TPU chips (Google PCI devices) and libtpu: a Cloud TPU VM, whose pod slice
    jax.distributed.initialize() reads from the TPU metadata."""
    if importlib.util.find_spec("libtpu") is None:
        return False
    for vendor in Path("/sys/bus/pci/devices").glob("*/vendor"):
        try:
            if vendor.read_text().strip() == GOOGLE_PCI_VENDOR:
                return True
        except OSError:
            continue
    return False


def barrier(name: str) -> None:
    """Waits until every process reached the barrier `name` (no-op for one process)."""
    import jax

    if jax.process_count() == 1:
        return
    from jax.experimental import multihost_utils

    multihost_utils.sync_global_devices(f"m3jax-{name}")
