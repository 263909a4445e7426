"""Fused attention for CPU inference: a C kernel (m3jax/csrc/flash_attention.c) compiled on first use with the
machine's C compiler, cached under $M3JAX_HOME/kernels, and called from XLA as an FFI custom call.

Flash attention's recurrence with every tile of scores kept in the core's L2 (in registers where each row's shift is
fixed) through exp, sum and both products; one worker thread per core, each on its own (row, head, query block).
Every XLA-level arrangement puts each block of scores through memory two or three times; that traffic is what it
saves. On a 2-core AMD Zen 3 (`python benchmarks/attention_cpu.py --repeats 5`, medians of alternated runs), against
XLA's "heads" and PyTorch's fused SDPA: 1 x 8,064 tokens 2.68 s vs 3.40 and 2.76 (mild logits) and 2.66 s vs 5.04
and 3.00 (sharp ones); 16 x 512 tokens 0.18 s vs 0.39 and 0.22.

Compiled with `-O3 -march=native` for the machine it runs on (the cache key includes the CPU's model and feature
flags, so a shared $M3JAX_HOME never hands one machine another's build). Where no C compiler is found (`$CC`, `cc`,
`gcc`, `clang`), the build fails, or M3JAX_NATIVE=0, `available()` is False, `unavailable_reason()` says why, and
m3jax.Encoder keeps XLA's attention. float32 only; the custom call has no gradient of its own (m3jax.attention gives
it XLA's).
"""

from __future__ import annotations

import ctypes as C
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp

from m3jax import _ffi
from m3jax._io import cache_root

logger = logging.getLogger("m3jax")

TARGET = "m3jax_flash_attention"
DISABLE_ENV = "M3JAX_NATIVE"  # "0": never build or use the kernel
SOURCE = Path(__file__).with_name("csrc") / "flash_attention.c"
# -ffp-contract=fast: a * b + c as one fused multiply-add (ISO C modes otherwise keep them apart: twice the
# instructions, 1.35x the kernel's time on an AMD Zen 3, one rounding more).
FLAGS = ("-O3", "-march=native", "-ffp-contract=fast", "-std=c11", "-shared", "-fPIC", "-pthread")
ALIGN = 16  # floats of slack for the kernel to align each workspace (flash_attention.c's ALIGN)
_state: dict = {}  # "lib": the loaded library, "handler": the live ctypes callback


def compiler() -> str | None:
    """The C compiler to build with: $CC, else the first of cc, gcc, clang on PATH."""
    if os.environ.get("CC"):
        return os.environ["CC"]
    return next((p for p in map(shutil.which, ("cc", "gcc", "clang")) if p), None)


def _cpu_fingerprint() -> str:
    """What -march=native depends on: the architecture, and on Linux the CPU's model name and feature flags."""
    parts = [platform.system(), platform.machine(), platform.processor()]
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key = line.split(":", 1)[0].strip()
            if key in ("model name", "flags", "Features", "CPU part", "CPU implementer"):
                parts.append(line)
                if key in ("flags", "Features"):
                    break
    except OSError:
        pass
    return "\n".join(parts)


def library_path(cc: str) -> Path:
    """Where the build for this source, compiler, flags and CPU is cached."""
    key = hashlib.sha256("\0".join([SOURCE.read_text(), cc, *FLAGS, _cpu_fingerprint()]).encode()).hexdigest()[:16]
    suffix = {"darwin": ".dylib", "win32": ".dll"}.get(sys.platform, ".so")
    return cache_root() / "kernels" / f"flash_attention-{key}{suffix}"


def build(cc: str, dst: Path) -> None:
    """Compiles SOURCE into dst (written under a temporary name, then renamed: a concurrent build or reader never
    sees half a library). Raises RuntimeError with the compiler's message on failure."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dst.parent, prefix=dst.stem + ".", suffix=".tmp")
    os.close(fd)
    try:
        r = subprocess.run([cc, *FLAGS, "-o", tmp, str(SOURCE), "-lm"], capture_output=True, text=True)
        if r.returncode:
            raise RuntimeError(f"{cc} {' '.join(FLAGS)} {SOURCE.name} failed (exit {r.returncode}): "
                               f"{(r.stderr or r.stdout).strip()[-2000:]}")
        os.replace(tmp, dst)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _load(path: Path) -> C.CDLL:
    lib = C.CDLL(str(path))
    lib.m3jax_flash_attention.restype = None
    lib.m3jax_flash_attention.argtypes = [C.c_void_p] * 8 + [C.c_int64] * 4 + [C.c_int]
    lib.m3jax_flash_scratch_floats.restype = C.c_int64
    lib.m3jax_flash_scratch_floats.argtypes = [C.c_int64]
    lib.m3jax_flash_packed_floats.restype = C.c_int64
    lib.m3jax_flash_packed_floats.argtypes = [C.c_int64] * 4
    return lib


def _kernel_call(lib: C.CDLL):
    def run(args, results):
        # Shapes and dtypes were checked when the call was traced (flash_attention).
        (q, k, v, bias), (out, packed, scratch, meta) = args, results
        b, t, n, h = q.shape
        threads = (scratch.dims[0] - ALIGN) // lib.m3jax_flash_scratch_floats(h)
        lib.m3jax_flash_attention(q.data, k.data, v.data, bias.data, out.data, packed.data, scratch.data, meta.data,
                                  b, t, n, h, threads)

    return run


def available() -> bool:
    """Whether the kernel is built, loaded and registered with XLA (doing so on the first call)."""
    return _once.available()


def unavailable_reason() -> str | None:
    return _once.reason()


def _setup() -> tuple[bool, str | None]:
    if os.environ.get(DISABLE_ENV, "1") == "0":
        return False, f"{DISABLE_ENV}=0"
    cc = compiler()
    if cc is None:
        return False, "no C compiler found ($CC, cc, gcc or clang) to build m3jax's attention kernel"
    path = library_path(cc)
    try:
        if not path.is_file():
            logger.info("building m3jax's CPU attention kernel with %s into %s", cc, path)
            build(cc, path)
        lib = _load(path)
        _state["handler"] = _ffi.register(TARGET, _kernel_call(lib))  # kept alive: XLA holds a bare pointer
    except (OSError, AttributeError, RuntimeError) as e:
        return False, f"cannot build or load the attention kernel: {e}"
    _state["lib"] = lib
    return True, None


_once = _ffi.Once(_setup, "CPU attention stays with XLA's ops")


def workers() -> int:
    """Threads the kernel runs on: the cores this process may use."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def flash_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
    """Softmax attention of q over k and v, the keys masked by `mask` (CPU only; no gradient: see
    m3jax.attention's "native").

    Args:
      q, k, v: [B, T, N, H] float32.
      mask: [B, T] bool, True for real keys.
    Returns:
      [B, T, N, H] float32; rows of padding are computed (and meaningless) as in m3jax.attention.
    """
    if not q.shape == k.shape == v.shape or q.ndim != 4:
        raise ValueError(f"flash_attention: q, k, v must share one shape [B, T, N, H], got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    if any(x.dtype != jnp.float32 for x in (q, k, v)):
        raise ValueError(f"flash_attention takes float32, got q {q.dtype}, k {k.dtype}, v {v.dtype}")
    if mask.shape != q.shape[:2]:
        raise ValueError(f"flash_attention: mask {tuple(mask.shape)} does not match q's [B, T] {q.shape[:2]}")
    if not available():
        raise RuntimeError(f"m3jax's CPU attention kernel is unavailable: {unavailable_reason()}")
    lib = _state["lib"]
    b, t, n, h = q.shape
    bias = jnp.where(mask, 0.0, -1e30).astype(jnp.float32)
    shapes = (jax.ShapeDtypeStruct(q.shape, jnp.float32),
              jax.ShapeDtypeStruct((lib.m3jax_flash_packed_floats(b, t, n, h) + ALIGN,), jnp.float32),
              jax.ShapeDtypeStruct((workers() * lib.m3jax_flash_scratch_floats(h) + ALIGN,), jnp.float32),
              jax.ShapeDtypeStruct((2 * b,), jnp.int32))
    return jax.ffi.ffi_call(TARGET, shapes)(q, k, v, bias)[0]
