"""The model's large CPU projections through OpenBLAS's sgemm, as an XLA FFI custom call.

On a 2-core AMD Zen 3, OpenBLAS (the build NumPy and SciPy ship, from the `scipy-openblas32` wheel) reaches
155-185 GFLOP/s on the [T, 1,024] x [1,024, 4,096]-class products of a layer where XLA's YNNPACK dots reach 130-150
(bias add included, inside jit): 7-15% of a whole forward at 1,024-8,192 tokens. Attention's per-head products stay
XLA's (or m3jax.native's fused kernel).

The handler (m3jax._ffi) is a ctypes function that reads XLA's FFI call frame and calls `cblas_sgemm` on the
buffers in place: no copy, no Python per element, the GIL held only while the frame is read. OpenBLAS's idle
threads spin for about 0.1 s after every call (2^28 cycles), taking a core from XLA's next op; m3jax therefore
loads its own instance of the library with OPENBLAS_THREAD_TIMEOUT=4 (they sleep at once), and does not use an
instance something else loaded first. Inference only: the custom call has no gradient.
"""

from __future__ import annotations

import ctypes as C
import importlib.util
import math
import os
import sys
from pathlib import Path

import jax
import jax.numpy as jnp

from m3jax import _ffi

TARGET = "m3jax_sgemm"
DISABLE_ENV = "M3JAX_CPU_BLAS"  # "0": never use it
_ROW_MAJOR, _NO_TRANS = 101, 111
_state: dict = {}  # "handler": the live ctypes callback


def _library_dir() -> Path | None:
    """scipy-openblas32's library folder, found without importing the package (importing it loads the library)."""
    spec = importlib.util.find_spec("scipy_openblas32")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations))) / "lib"


def _library_path(lib: Path) -> Path | None:
    """The shared library in `lib`: .so on Linux, .dylib on macOS, .dll on Windows."""
    found = [p for pattern in ("*.so*", "*.dylib", "*.dll") for p in sorted(lib.glob("libscipy_openblas" + pattern))]
    return found[0] if found else None


def _already_loaded(path: Path) -> bool:
    if "scipy_openblas32" in sys.modules:
        return True
    try:
        return str(path.resolve()) in Path("/proc/self/maps").read_text()
    except OSError:
        return False


def _load_sgemm(path: Path):
    """Loads the library with its idle threads set to sleep at once (the variable is read when it loads)."""
    previous = os.environ.get("OPENBLAS_THREAD_TIMEOUT")
    os.environ["OPENBLAS_THREAD_TIMEOUT"] = previous or "4"
    try:
        lib = C.CDLL(str(path))
    finally:
        if previous is None:
            del os.environ["OPENBLAS_THREAD_TIMEOUT"]
    sgemm = lib.scipy_cblas_sgemm
    sgemm.restype = None
    sgemm.argtypes = [C.c_int, C.c_int, C.c_int, C.c_int, C.c_int, C.c_int, C.c_float, C.c_void_p, C.c_int,
                      C.c_void_p, C.c_int, C.c_float, C.c_void_p, C.c_int]
    return sgemm


def _sgemm_call(sgemm):
    def run(args, results):
        # Shapes and dtypes were checked when the call was traced (matmul): x [M, K], w [K, N] -> out [M, N].
        (x, w), (out,) = args, results
        m, k, n = x.dims[0], x.dims[1], w.dims[1]
        sgemm(_ROW_MAJOR, _NO_TRANS, _NO_TRANS, m, n, k, 1.0, x.data, k, w.data, n, 0.0, out.data, n)

    return run


def available() -> bool:
    """Whether the OpenBLAS custom call is ready on CPU (loading and registering it on the first call)."""
    return _once.available()


def unavailable_reason() -> str | None:
    return _once.reason()


def _setup() -> tuple[bool, str | None]:
    if os.environ.get(DISABLE_ENV, "1") == "0":
        return False, f"{DISABLE_ENV}=0"
    lib = _library_dir()
    if lib is None:
        return False, "scipy-openblas32 is not installed"
    path = _library_path(lib)
    if path is None:
        return False, f"no libscipy_openblas shared library in {lib}"
    if _already_loaded(path):
        return False, (f"{path.name} was loaded before m3jax could set its thread timeout (its idle threads would "
                       "spin against XLA's)")
    try:
        _state["handler"] = _ffi.register(TARGET, _sgemm_call(_load_sgemm(path)))  # kept alive: XLA holds a pointer
    except (OSError, AttributeError) as e:
        return False, f"cannot load {path}: {e}"
    return True, None


_once = _ffi.Once(_setup, "CPU projections stay with XLA's dots")


def matmul(x: jax.Array, w: jax.Array) -> jax.Array:
    """x [..., K] @ w [K, N] -> [..., N], float32, through OpenBLAS (call available() first; CPU only)."""
    if x.dtype != jnp.float32 or w.dtype != jnp.float32:
        raise ValueError(f"blas.matmul takes float32 operands, got x {x.dtype} and w {w.dtype}")
    if w.ndim != 2 or x.shape[-1] != w.shape[0]:
        raise ValueError(f"blas.matmul: x {tuple(x.shape)} and w {tuple(w.shape)} do not contract (x [..., K], "
                         "w [K, N])")
    lead, (k, n) = x.shape[:-1], w.shape
    rows = math.prod(lead)
    out = jax.ffi.ffi_call(TARGET, jax.ShapeDtypeStruct((rows, n), jnp.float32))(x.reshape(rows, k), w)
    return out.reshape(*lead, n)
