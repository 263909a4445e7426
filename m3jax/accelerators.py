"""What m3jax needs to know of an accelerator before it runs there: compile-only devices of a named target (TPU
topologies through libtpu, NVIDIA GPUs through jaxlib's CUDA plugin and a target description; no accelerator
needed), each device's memory, and how much of it a compiled executable takes.

    devices = compile_only_devices("v5e:2x2")                  # 4 TPU v5e chips, one host
    exe = jax.jit(f).lower(...).compile()                        # compiles for them, Mosaic kernels included
    MemoryUse.of(exe).total <= chip_memory(devices[0])        # per device
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

# Memory per device (a TPU chip, or a core on v2/v3, where each core is a device) by jax's device_kind, for devices
# that do not report it themselves (compile-only ones). GiB.
HBM_GIB = {
    "TPU v2": 8,
    "TPU v3": 16,
    "TPU v4": 32,
    "TPU v5 lite": 16,
    "TPU v5": 95,
    "TPU v6 lite": 32,
    "NVIDIA H100 80GB HBM3": 84978434048 / 2**30,  # the card's 85.0e9 bytes, as its target description states
}
# The share of a device's memory batches may not plan on: XLA's runtime reservations, fragmentation, the next
# batch's inputs.
HEADROOM = 0.10
TPU_TARGETS = ("v2", "v3", "v4", "v5e", "v5p", "v6e")
# GPU targets: name -> XLA GpuTargetConfigProto (text) shipped in m3jax/targets.
GPU_TARGETS = {"h100": "h100_sxm.txtpb"}


class TargetError(ValueError):
    """A target that cannot be compiled for here (unknown name, or its compiler is not installed)."""


def compile_only_devices(target: str) -> list:
    """The devices of a named TPU topology, compile only: executables lowered for a mesh of them compile with libtpu
    (`pip install "jax[tpu]"`) on any host. Names are KIND:SHAPE in chips: "v5e:2x2" (one v5e host, 4 chips),
    "v5e:16x16" (a 256-chip pod, 64 hosts), "v5p:2x2x1", "v4:2x2x1"; single chips "v5e:1x1" and "v6e:1x1" (Colab's
    TPU runtimes), "v2:2x2" (Colab's older TPU v2-8: 4 chips of 2 cores, each core a device)."""
    from jax.experimental import topologies

    kind = target.partition(":")[0]
    if kind in GPU_TARGETS:
        return _gpu_devices(target)
    if kind not in TPU_TARGETS or ":" not in target:
        raise TargetError(f"target {target!r}: expected a TPU topology KIND:SHAPE with KIND one of {TPU_TARGETS}, "
                          "e.g. v5e:2x2 (4 chips, one host), v5e:16x16 (256 chips, 64 hosts), v5p:2x2x1, v3:2x2; "
                          f"or a GPU, {' '.join(GPU_TARGETS)}[:N] (N GPUs of one host)")
    try:
        import libtpu  # noqa: F401
    except ImportError:
        raise TargetError(f"target {target!r}: compiling for TPU needs libtpu; pip install \"jax[tpu]=="
                          f"{_jax_version()}\"") from None
    # Compile-only use drives no chip, so several processes may load libtpu at once (its lockfile is for chips).
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    single = all(int(x) == 1 for x in target.partition(":")[2].split("x") if x.isdigit())
    try:
        return list(topologies.get_topology_desc(topology_name=target, platform="tpu",
                                                 **({"chips_per_host_bounds": (1, 1, 1)} if single else {})).devices)
    except Exception as e:  # noqa: BLE001 - libtpu's messages are long; keep its first line and the name
        raise TargetError(f"target {target!r}: {str(e).splitlines()[0]}") from None


def _gpu_devices(target: str) -> list:
    """N compile-only GPUs of one host ("h100", "h100:8"): XLA compiles for the target description in m3jax/targets
    (deviceless: no GPU, no driver). Needs jaxlib's CUDA plugin and cuDNN (the cudnn attention kernel), and JAX's
    own CUDA check skipped: JAX_PLATFORMS without cuda (the CLI sets "cpu") or JAX_SKIP_CUDA_CONSTRAINTS_CHECK=1."""
    from importlib import resources

    from jax.experimental import topologies

    kind, _, count = target.partition(":")
    if count and not (count.isdigit() and int(count) >= 1):
        raise TargetError(f"target {target!r}: expected {kind} or {kind}:N with N GPUs")
    try:
        import jax_plugins.xla_cuda12  # noqa: F401
    except ImportError:
        raise TargetError(f"target {target!r}: compiling for NVIDIA GPUs needs jaxlib's CUDA plugin and cuDNN; pip "
                          f"install jax-cuda12-plugin=={_jax_version()} nvidia-cudnn-cu12") from None
    config = resources.files("m3jax").joinpath("targets", GPU_TARGETS[kind]).read_text()
    try:
        topo = topologies.get_topology_desc(platform="cuda", target_config=config, topology=f"1x1x{count or 1}")
    except Exception as e:  # noqa: BLE001 - the plugin's messages are long; keep the first line and the name
        raise TargetError(f"target {target!r}: {str(e).splitlines()[0]} (with JAX_PLATFORMS unset, set "
                          "JAX_SKIP_CUDA_CONSTRAINTS_CHECK=1 or JAX_PLATFORMS=cpu before importing jax)") from None
    return list(topo.devices)


def host_devices(devices: list) -> list:
    """The devices of the first host (process) among `devices`: what one process of a multi-host job drives."""
    first = min(d.process_index for d in devices)
    return [d for d in devices if d.process_index == first]


def chip_memory(device: Any) -> int:
    """Bytes of memory of one device: what it reports (a real one), else HBM_GIB by its kind."""
    try:
        stats = device.memory_stats() or {}
    except Exception:  # noqa: BLE001 - compile-only and CPU devices have none
        stats = {}
    if stats.get("bytes_limit"):
        return int(stats["bytes_limit"])
    if device.device_kind not in HBM_GIB:
        raise TargetError(f"memory of a {device.device_kind!r} device is unknown; known kinds: {sorted(HBM_GIB)}")
    return int(HBM_GIB[device.device_kind] * 2**30)


@dataclasses.dataclass(frozen=True)
class MemoryUse:
    """Per-device bytes of one compiled executable (`Compiled.memory_analysis()`)."""

    arguments: int
    outputs: int
    temps: int
    code: int
    aliased: int

    @classmethod
    def of(cls, compiled: Any) -> MemoryUse:
        m = compiled.memory_analysis()
        return cls(m.argument_size_in_bytes, m.output_size_in_bytes, m.temp_size_in_bytes,
                   m.generated_code_size_in_bytes, m.alias_size_in_bytes)

    @property
    def total(self) -> int:
        """Bytes live while it runs: arguments, outputs and temporaries (less what outputs alias), code."""
        return self.arguments + self.outputs + self.temps + self.code - self.aliased

    @property
    def in_flight(self) -> int:
        """Bytes while a job runs it back to back: its total plus the previous call's outputs, which the host is
        still fetching (m3jax.engine.Encoder.run keeps one batch in flight)."""
        return self.total + self.outputs


def usable_memory(device: Any, headroom: float = HEADROOM) -> int:
    """chip_memory less the headroom: what batches are planned to fill."""
    return int(chip_memory(device) * (1 - headroom))


def _jax_version() -> str:
    import jax

    return jax.__version__
