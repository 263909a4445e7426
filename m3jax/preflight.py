"""`m3jax preflight`: compile a job's executables for an accelerator target without the accelerator, and check
that each fits a device's memory. Only shapes are needed, never weights.

    checks = embed_checks("v5e:16x16", max_length=8192)        # the Encoder's buckets, as `m3jax embed` plans them
    print(format_checks(checks)); assert all(c.ok for c in checks)

The training side is m3jax.train.preflight (the same ShapeCheck rows).
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from m3jax import accelerators, pipeline


@dataclasses.dataclass(frozen=True)
class ShapeCheck:
    """One compiled shape: what it is, how long it took, what it needs of each device."""

    name: str  # e.g. "embed [4 x 512]"
    length: int  # padded tokens per row (train: the passage length)
    rows_per_device: int
    compile_s: float
    memory: accelerators.MemoryUse | None  # None when it did not compile
    device_memory: int  # bytes of one device
    error: str = ""  # the compiler's message when it did not compile
    in_flight: bool = False  # the job holds the previous call's outputs while this one runs (MemoryUse.in_flight)

    @property
    def needed(self) -> int:
        """Bytes per device while running (with in_flight, the previous call's outputs still held)."""
        if self.memory is None:
            return 0
        return self.memory.in_flight if self.in_flight else self.memory.total

    @property
    def ok(self) -> bool:
        return self.memory is not None and self.needed <= self.device_memory

    def problem(self) -> str:
        if self.memory is None:
            return f"{self.name}: did not compile: {self.error}"
        return (f"{self.name}: needs {self.needed / 2**30:.2f} GiB per device, more than its "
                f"{self.device_memory / 2**30:.2f}")


def timed_check(name: str, length: int, rows_per_device: int, device: Any, compile_fn: Callable[[], Any],
                in_flight: bool = False) -> ShapeCheck:
    """Runs compile_fn (returns a Compiled) and records its time and memory; a compile error becomes the row's
    error. in_flight: a job that keeps one batch in flight (see ShapeCheck.needed)."""
    memory = accelerators.chip_memory(device)
    t0 = time.perf_counter()
    try:
        use = accelerators.MemoryUse.of(compile_fn())
    except Exception as e:  # noqa: BLE001 - any compiler failure is the finding, reported with its shape
        return ShapeCheck(name, length, rows_per_device, time.perf_counter() - t0, None, memory,
                          f"{type(e).__name__}: {str(e).splitlines()[0][:300]}", in_flight)
    return ShapeCheck(name, length, rows_per_device, time.perf_counter() - t0, use, memory, in_flight=in_flight)


def load_config(model: str | os.PathLike):
    """The architecture of `model`: "bge-m3" (the release's), "tiny", or a release-layout or m3jax directory
    (its config.json; no weights are read)."""
    import json
    from pathlib import Path

    from m3jax.checkpoint import MARKER
    from m3jax.config import M3Config

    if str(model) == "bge-m3":
        return M3Config.bge_m3()
    if str(model) == "tiny":
        return M3Config.tiny()
    path = Path(model)
    if not (path / "config.json").is_file():
        raise ValueError(f"{model}: expected 'bge-m3', 'tiny' or a model directory with a config.json")
    colbert = json.loads((path / MARKER).read_text()).get("colbert_dim") if (path / MARKER).is_file() else None
    return M3Config.from_json_file(path / "config.json", colbert_dim=colbert)


def embed_checks(target: str, *, model: str | os.PathLike = "bge-m3", dtype: str = "bfloat16",
                 max_length: int = 8192, batch_size: int = 256, lengths: Sequence[int] | None = None,
                 max_tokens_per_batch: int | None = None, outputs: Sequence[str] = pipeline.HEADS,
                 mcls_interval: int | None = None, mesh: str = "auto",
                 progress: Callable[[ShapeCheck], None] | None = None) -> list[ShapeCheck]:
    """Compiles what `m3jax embed` compiles on `target`: one Encoder (the same planner, sharding and kernels), for
    each length bucket up to max_length's (or `lengths`), at the full batch the planner gives that bucket:
    min(batch_size, the rows that fit memory) unless max_tokens_per_batch is given. Each bucket's largest batch is
    its most demanding shape; its partial batches have fewer rows.

    mesh: as `m3jax embed --mesh`. "host": one host's devices, as each process drives its own; "global": one mesh
    over every device of the topology, each host's batch its block of a step's rows (the lockstep of
    m3jax.engine.Encoder); "auto" (the default): "global" on a multi-host TPU topology, else "host"."""
    from m3jax.engine import Encoder

    if mesh not in ("auto", "host", "global"):
        raise ValueError(f"mesh must be 'auto', 'host' or 'global', got {mesh!r}")
    devices = accelerators.compile_only_devices(target)
    if mesh == "auto":
        multi_host = len({d.process_index for d in devices}) > 1
        mesh = "global" if multi_host and devices[0].platform == "tpu" else "host"
    if mesh == "host":
        devices = accelerators.host_devices(devices)
    enc = Encoder(load_config(model), None, None, dtype=dtype, devices=devices,
                  max_tokens_per_batch=max_tokens_per_batch)
    enc.check_mcls(max_length, mcls_interval)
    top = pipeline.length_bucket(pipeline.mcls_length(max_length, mcls_interval) if mcls_interval else max_length,
                                 enc.length_buckets)
    todo = sorted(set(lengths)) if lengths else [b for b in enc.length_buckets if b <= top]
    ndev, hosts, checks = len(enc.local_devices), enc.processes, []
    for length in todo:
        if length not in enc.length_buckets:
            raise ValueError(f"length {length} is not one of the Encoder's buckets {enc.length_buckets}")
        try:  # the planner's full batch for this bucket (one host's rows)
            rows = enc.plan(np.full(-(-batch_size // ndev) * ndev, length), batch_size=batch_size)[0][1]
        except Exception as e:  # noqa: BLE001 - sizing compiles too; its failure is this bucket's finding
            checks.append(ShapeCheck(f"embed [? x {length}]", length, 0, 0.0, None,
                                     accelerators.chip_memory(devices[0]), f"{type(e).__name__}: {e}"))
            continue
        name = (f"embed [{rows} x {length}]" + (f" x {hosts} hosts" if hosts > 1 else "")
                + (f" mcls {mcls_interval}" if mcls_interval else ""))
        heads = tuple(h for h in pipeline.HEADS if h in outputs)
        check = timed_check(name, length, rows // ndev, devices[0],
                            lambda a=(length, rows * hosts, heads, mcls_interval): enc.executable(*a),
                            in_flight=True)
        key = (length, rows * hosts, heads) + ((mcls_interval,) if mcls_interval else ())
        check = dataclasses.replace(check, compile_s=enc.compile_seconds.get(key, check.compile_s))  # sizing's
        checks.append(check)
        if progress is not None:
            progress(check)
    return checks


def format_checks(checks: Sequence[ShapeCheck], target: str = "") -> str:
    """A table: one row per shape, per-device memory against the device's."""
    head = f"{'shape':<34} {'length':>6} {'rows/dev':>8} {'compile s':>9} {'GiB/dev':>8} {'of GiB':>7}  result"
    lines = [f"target {target}" if target else "", head]
    for c in checks:
        result = "ok" if c.ok else ("COMPILE FAILED" if c.memory is None else "DOES NOT FIT")
        lines.append(f"{c.name:<34} {c.length:>6} {c.rows_per_device:>8} {c.compile_s:>9.1f} "
                     f"{c.needed / 2**30:>8.2f} {c.device_memory / 2**30:>7.2f}  {result}")
    total = sum(c.compile_s for c in checks)
    lines.append(f"{len(checks)} shape(s), {total:.0f} s compiling; "
                 f"{sum(not c.ok for c in checks)} problem(s)")
    return "\n".join(line for line in lines if line)
