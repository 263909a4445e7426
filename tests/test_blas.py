"""m3jax.blas: the CPU projections through OpenBLAS's sgemm as an XLA FFI custom call."""

import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from m3jax import blas
from m3jax.checkpoint import load_params
from m3jax.model import forward, model_from_params

pytestmark = pytest.mark.skipif(os.environ.get(blas.DISABLE_ENV) == "0" or jax.default_backend() != "cpu",
                                reason="OpenBLAS projections are a CPU path, turned off by M3JAX_CPU_BLAS=0")


def _run(code: str, **env) -> str:
    """Runs code in a fresh process (m3jax.blas loads its library once per process), OpenBLAS at its defaults."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("OPENBLAS_")}
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=300,
                         env={**base, "JAX_PLATFORMS": "cpu", **env})
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def test_matmul_matches_float64():
    """Leading axes, a contraction that is no multiple of a vector width, inside jit and lax.scan (as the layers
    run): within float32 rounding of the float64 product (K * eps * sum |x||w|)."""
    assert blas.available(), blas.unavailable_reason()
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 37, 45)).astype(np.float32)
    ws = rng.standard_normal((2, 45, 70)).astype(np.float32)

    def body(h, w):
        return h, blas.matmul(h, w)

    _, got = jax.jit(lambda x, ws: jax.lax.scan(body, x, ws))(x, ws)
    for w, g in zip(ws, np.asarray(got), strict=True):
        ref = x.astype(np.float64) @ w.astype(np.float64)
        bound = 45 * np.finfo(np.float32).eps * (np.abs(x).astype(np.float64) @ np.abs(w).astype(np.float64))
        assert g.shape == (3, 37, 70)
        assert np.all(np.abs(g - ref) <= bound)


def test_matmul_rejects_what_it_cannot_run():
    x, w = jnp.ones((4, 8)), jnp.ones((8, 3))
    with pytest.raises(ValueError, match=r"x \(4, 8\) and w \(9, 3\)"):
        blas.matmul(x, jnp.ones((9, 3)))
    with pytest.raises(ValueError, match="float32.*bfloat16"):
        blas.matmul(x, w.astype(jnp.bfloat16))


def test_blas_forward_matches_xla_forward(release_dirs):
    """Every output of the model with its projections through OpenBLAS equals XLA's (both float32, padding and
    several lengths), and the compiled forward calls the custom call."""
    cfg, params, _ = load_params(release_dirs["tiny"])
    graphdef, state = nnx.split(model_from_params(cfg, params))
    rng = np.random.default_rng(1)
    ids = rng.integers(5, cfg.vocab_size, (3, 40)).astype(np.int32)
    mask = (np.arange(40)[None] < np.array([[40], [17], [1]])).astype(np.int32)
    ids[mask == 0] = cfg.pad_token_id
    assert blas.available(), blas.unavailable_reason()
    text = forward.lower(graphdef, state, ids, mask, projections="blas").compile().as_text()
    assert blas.TARGET in text
    ref, got = (forward(graphdef, state, ids, mask, projections=p) for p in ("xla", "blas"))
    for name, a, b in zip(ref._fields, ref, got, strict=True):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-5, err_msg=name)
    with pytest.raises(ValueError, match="projections must be one of"):
        forward(graphdef, state, ids, mask, projections="openblas")


def test_encoder_uses_blas_in_float32_only(release_dirs):
    from m3jax.engine import Encoder

    enc = Encoder.from_pretrained(release_dirs["tiny"], length_buckets=(64, 8192))
    assert enc.cpu_blas and blas.TARGET in enc.executable(64, 2).as_text()
    bf16 = Encoder.from_pretrained(release_dirs["tiny"], dtype="bfloat16", length_buckets=(64, 8192))
    assert not bf16.cpu_blas and blas.TARGET not in bf16.executable(64, 2).as_text()


def test_idle_openblas_threads_do_not_spin():
    """OpenBLAS's idle threads spin about 0.1 s after each call unless told otherwise; m3jax's instance sleeps at
    once. Measured as the process's CPU time while it sleeps after a product (0.11 s per call without the fix)."""
    out = _run("""
        import os, time, jax, jax.numpy as jnp
        from m3jax import blas
        assert blas.available(), blas.unavailable_reason()
        f = jax.jit(blas.matmul)
        x, w = jnp.ones((2048, 1024)), jnp.ones((1024, 1024))
        spent = []
        for _ in range(3):
            f(x, w).block_until_ready()
            c0 = os.times(); time.sleep(0.3); c1 = os.times()
            spent.append(c1.user - c0.user + c1.system - c0.system)
        print(max(spent))
    """)
    assert float(out.split()[-1]) < 0.05


def test_unavailable_falls_back_to_xla(release_dirs):
    """Turned off (M3JAX_CPU_BLAS=0), or with the library already loaded by someone else (its threads would spin),
    the Encoder compiles XLA's projections and says why in its log."""
    code = f"""
        import logging, sys
        {{pre}}
        logging.basicConfig(level=logging.INFO, stream=sys.stdout)
        from m3jax import blas
        from m3jax.engine import Encoder
        enc = Encoder.from_pretrained({str(release_dirs["tiny"])!r}, length_buckets=(64, 8192))
        assert not enc.cpu_blas and blas.TARGET not in enc.executable(64, 2).as_text()
        print("REASON", blas.unavailable_reason())
    """
    off = _run(code.format(pre=""), M3JAX_CPU_BLAS="0")
    assert "REASON M3JAX_CPU_BLAS=0" in off and "CPU projections stay with XLA's dots" in off
    first = _run(code.format(pre="import scipy_openblas32"))
    assert "loaded before m3jax could set its thread timeout" in first


def test_library_lookup_names_what_is_missing(tmp_path, monkeypatch):
    """Each platform's library name is found (.so, .dylib, .dll); a package folder without one is reported as such,
    not as a missing package."""
    for name in ("libscipy_openblas.so", "libscipy_openblas.dylib", "libscipy_openblas.dll"):
        lib = tmp_path / name.rsplit(".", 1)[1]
        lib.mkdir()
        (lib / name).write_bytes(b"")
        (lib / "libother.so").write_bytes(b"")
        assert blas._library_path(lib) == lib / name
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.delenv(blas.DISABLE_ENV, raising=False)
    monkeypatch.setattr(blas, "_library_dir", lambda: empty)
    assert blas._setup() == (False, f"no libscipy_openblas shared library in {empty}")
    monkeypatch.setattr(blas, "_library_dir", lambda: None)
    assert blas._setup() == (False, "scipy-openblas32 is not installed")
