"""m3jax.native: the fused C attention kernel, built on first use, as an XLA FFI custom call (attention "native")."""

import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from m3jax import native
from m3jax.attention import attention
from tests.test_attention import assert_as_close_to_float64_as_xla, inputs, truth

# Skipped only where the kernel cannot be built by design (no compiler, turned off, not a CPU backend); with a
# compiler present a build or load failure fails the tests (test_kernel_builds) rather than skipping them.
pytestmark = pytest.mark.skipif(os.environ.get(native.DISABLE_ENV) == "0" or jax.default_backend() != "cpu"
                                or native.compiler() is None,
                                reason="the native kernel is a CPU path that needs a C compiler (M3JAX_NATIVE=0 "
                                       "turns it off)")


def _run(code: str, **env) -> str:
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "JAX_PLATFORMS": "cpu", **env})
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def test_kernel_builds():
    assert native.available(), native.unavailable_reason()
    assert native.library_path(native.compiler()).is_file()


# Shapes chosen to cross every edge of the kernel's tiling: head widths not a multiple of its 16-wide panels (8, 24),
# query counts not a multiple of its 6-row micro-kernel or 96-row blocks, key counts past one 512-key tile and not a
# multiple of 16, rows of padding only (length 0), and a batch of several rows of different lengths.
CASES = [(1, 7, 2, 8, [7]), (3, 37, 4, 8, [37, 5, 0]), (2, 200, 2, 64, [200, 150]), (1, 1100, 3, 24, [1090]),
         (2, 700, 4, 32, [700, 300])]


@pytest.mark.parametrize("scale", [1.0, 4.0, 6.0])
@pytest.mark.parametrize("b,t,n,h,lengths", CASES)
def test_matches_float64_as_closely_as_xla(b, t, n, h, lengths, scale):
    """The kernel takes exp of the raw scores where a query block's Cauchy-Schwarz bound allows it (scale 1: the
    bound is at most 20 in every case, against EXP_SAFE_LOG = 80) and the online max-shifted softmax where it does
    not (scale 6: at least 125 everywhere); scale 4 mixes both within a call in the smaller cases. Each is held to
    the XLA path's closeness to float64; rows of padding only stay finite."""
    q, k, v, mask = inputs(len(lengths), t, n, h, lengths, scale=scale)
    out = jax.jit(lambda *a: attention(*a, impl="native"))(q, k, v, mask)
    assert out.shape == q.shape and out.dtype == jnp.float32
    assert bool(jnp.isfinite(out).all())
    assert_as_close_to_float64_as_xla(out, attention(q, k, v, mask, impl="xla"), truth(q, k, v, mask), mask)


def test_a_late_key_far_above_the_first_tiles_maxima():
    """Each row's shift is fixed at its maximum over the first 512 keys; a later key scoring ~150 above it (past
    what exp may take unshifted) sends its tile back through the general pass, which raises the shift and rescales
    what was summed. The output is then ~ that key's value, as in float64."""
    q, k, v, mask = inputs(1, 1100, 2, 16, [1100], scale=0.3)
    u = jnp.ones(16) / 4.0  # a unit vector
    q = u + q / 6  # every query ~u: scores ~0.1 with the random keys
    k = k.at[0, 900].set(600.0 * u)  # ... and 150 +- 10 with key 900 (the 1/sqrt(16) scale included)
    out = attention(q, k, v, mask, impl="native")
    assert_as_close_to_float64_as_xla(out, attention(q, k, v, mask, impl="xla"), truth(q, k, v, mask), mask)
    np.testing.assert_allclose(np.asarray(out[0, :, 0]), np.broadcast_to(np.asarray(v[0, 900, 0]), (1100, 16)),
                               atol=1e-4)


def test_masked_keys_inside_the_sequence():
    """A mask with holes (not only right padding): the masked keys get no weight, wherever they are."""
    q, k, v, _ = inputs(2, 600, 2, 16, [600, 600])
    rng = np.random.default_rng(3)
    mask = jnp.asarray(rng.random((2, 600)) < 0.7)
    out = attention(q, k, v, mask, impl="native")
    exact = truth(q, k, v, mask)
    rows = jnp.ones((2, 600), bool)
    assert_as_close_to_float64_as_xla(out, attention(q, k, v, mask, impl="xla"), exact, rows)
    # a value change at a masked key changes nothing
    v2 = v.at[:, :, :, :].add(jnp.where(mask, 0.0, 100.0)[:, :, None, None])
    np.testing.assert_array_equal(np.asarray(attention(q, k, v2, mask, impl="native")), np.asarray(out))


def test_gradient_is_the_heads_paths():
    """The kernel has no backward of its own; attention "native" differentiates through "heads"."""
    q, k, v, mask = inputs(2, 130, 2, 16, [130, 40])

    def loss(impl):
        return lambda q, k, v: jnp.sum(jnp.sin(attention(q, k, v, mask, impl=impl)))

    got = jax.grad(loss("native"), argnums=(0, 1, 2))(q, k, v)
    want = jax.grad(loss("heads"), argnums=(0, 1, 2))(q, k, v)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-4, atol=1e-5)


def test_bad_inputs_are_named():
    q, k, v, mask = inputs(1, 8, 2, 8, [8])
    with pytest.raises(ValueError, match='"native" takes float32, got bfloat16'):
        attention(q.astype(jnp.bfloat16), k.astype(jnp.bfloat16), v.astype(jnp.bfloat16), mask, impl="native")
    with pytest.raises(ValueError, match=r"share one shape \[B, T, N, H\], got \(1, 8, 2, 8\), \(1, 4, 2, 8\)"):
        native.flash_attention(q, k[:, :4], v, mask)
    with pytest.raises(ValueError, match=r"mask \(1, 4\) does not match q's \[B, T\] \(1, 8\)"):
        native.flash_attention(q, k, v, mask[:, :4])


def test_build_is_cached_per_cpu_and_source(tmp_path, monkeypatch):
    """The library lands under $M3JAX_HOME/kernels, keyed by source, compiler, flags and CPU; a broken compiler
    is reported with its message, and nothing half-written is left behind."""
    monkeypatch.setenv("M3JAX_HOME", str(tmp_path))
    cc = native.compiler()
    path = native.library_path(cc)
    assert path.parent == tmp_path / "kernels"
    native.build(cc, path)
    assert path.is_file() and native._load(path).m3jax_flash_scratch_floats(64) > 0
    bad = tmp_path / "bad-cc"
    bad.write_text("#!/bin/sh\necho 'no such flag' >&2\nexit 3\n")
    bad.chmod(0o755)
    with pytest.raises(RuntimeError, match="failed \\(exit 3\\): no such flag"):
        native.build(str(bad), native.library_path(str(bad)))
    assert sorted(p.name for p in (tmp_path / "kernels").iterdir()) == [path.name]


def test_encoder_uses_the_kernel_in_float32_on_one_cpu(release_dirs):
    from m3jax.engine import Encoder

    enc = Encoder.from_pretrained(release_dirs["tiny"], length_buckets=(64, 8192))
    assert enc.native_attention and native.TARGET in enc.executable(64, 2).as_text()
    bf16 = Encoder.from_pretrained(release_dirs["tiny"], dtype="bfloat16", length_buckets=(64, 8192))
    assert not bf16.native_attention and native.TARGET not in bf16.executable(64, 2).as_text()
    chosen = Encoder.from_pretrained(release_dirs["tiny"], attn_impl="heads", length_buckets=(64, 8192))
    assert native.TARGET not in chosen.executable(64, 2).as_text()  # the user's choice stands


def test_unavailable_falls_back_to_xla(release_dirs, tmp_path):
    """Turned off (M3JAX_NATIVE=0) or without a working compiler, the Encoder compiles XLA's attention and says why
    in its log."""
    code = f"""
        import logging, sys
        logging.basicConfig(level=logging.INFO, stream=sys.stdout)
        from m3jax import native
        from m3jax.engine import Encoder
        enc = Encoder.from_pretrained({str(release_dirs["tiny"])!r}, length_buckets=(64, 8192))
        assert not enc.native_attention and native.TARGET not in enc.executable(64, 2).as_text()
        print("REASON", native.unavailable_reason())
    """
    off = _run(code, M3JAX_NATIVE="0")
    assert "REASON M3JAX_NATIVE=0" in off and "CPU attention stays with XLA's ops" in off
    broken = _run(code, CC=str(tmp_path / "missing-cc"), M3JAX_HOME=str(tmp_path / "home"))
    assert "cannot build or load the attention kernel" in broken and "missing-cc" in broken
