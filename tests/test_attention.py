"""Every attention implementation against the plain XLA path, on CPU (TPU kernels in interpret mode)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from m3jax.attention import IMPLS, attention, choose_impl


def inputs(b, t, n, h, lengths, seed=0, dtype=jnp.float32, scale=2.0):
    rng = np.random.default_rng(seed)
    q, k, v = (jnp.asarray(rng.standard_normal((b, t, n, h)) * scale, dtype) for _ in range(3))
    mask = jnp.arange(t)[None] < jnp.asarray(lengths)[:, None]
    return q, k, v, mask


def truth(q, k, v, mask):
    """Float64 attention on the host: the yardstick both float32 paths are held to."""
    qn, kn, vn = (np.asarray(x, np.float64) for x in (q, k, v))
    s = np.einsum("btnh,bsnh->bnts", qn, kn) / np.sqrt(q.shape[-1])
    s = np.where(np.asarray(mask)[:, None, None, :], s, -np.inf)
    with np.errstate(invalid="ignore"):  # a row with no real key is NaN here; it is never read
        p = np.exp(s - s.max(-1, keepdims=True))
    return jnp.asarray(np.einsum("bnts,bsnh->btnh", p / p.sum(-1, keepdims=True), vn))


def max_err_on_real_rows(a, b, mask):
    return float(jnp.where(mask[..., None, None], jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32)), 0).max())


def rms_err_on_real_rows(a, b, mask):
    err = jnp.where(mask[..., None, None], a.astype(jnp.float32) - b.astype(jnp.float32), 0)
    return float(jnp.sqrt((err**2).sum() / (mask.sum() * a.shape[2] * a.shape[3])))


def assert_as_close_to_float64_as_xla(out, ref, exact, mask):
    """`out` is as close to the float64 truth as the plain XLA path `ref` is. The root-mean-square error is the
    steady measure (within 1.25x between paths on the CPUs seen: 2-core Intel AVX-512 and AMD Zen 3 AVX2), held to
    1.5x; the largest single error is a max over ~10^5 roundings and swings more with the CPU's kernels (up to 1.6x
    measured), held to 3x. A wrong mask, scale or normalisation is off by 1e-3 or more, far past either bound."""
    assert rms_err_on_real_rows(out, exact, mask) <= max(1.5 * rms_err_on_real_rows(ref, exact, mask), 2e-7)
    assert max_err_on_real_rows(out, exact, mask) <= max(3 * max_err_on_real_rows(ref, exact, mask), 2e-6)


LONG = [(700, [700, 300]), (1024, [1024, 1]), (1300, [1300, 513]), (2049, [2049, 2048])]
SHORT = [(7, [7, 2, 0]), (64, [64, 3]), (512, [512, 100])]  # chunked is the xla path up to 512 tokens


@pytest.mark.parametrize("impl,t,lengths", [("chunked", *c) for c in LONG] + [("tiled", *c) for c in SHORT + LONG])
def test_blocked_paths_match_xla(t, lengths, impl):
    """Every length regime of both blocked paths ("tiled": several heads per step up to 1,024 tokens, query row
    blocks beyond; a row of padding only, as batches of filler rows have, stays finite)."""
    q, k, v, mask = inputs(len(lengths), t, 4, 32, lengths)
    ref = attention(q, k, v, mask, impl="xla")
    out = attention(q, k, v, mask, impl=impl)
    assert out.shape == ref.shape and out.dtype == ref.dtype
    assert bool(jnp.isfinite(out).all())
    exact = truth(q, k, v, mask)
    assert_as_close_to_float64_as_xla(out, ref, exact, mask)  # these logits are sharp: both are ~1e-5 off at most


@pytest.mark.parametrize("t,scale", [(300, 2.0), (300, 4.0), (1300, 2.0), (1300, 4.0)])
def test_tiled_softmax_without_and_with_the_max_shift(t, scale):
    """"tiled" takes exp of the raw scores where a head's Cauchy-Schwarz bound allows it (scale 2 here: logits
    up to ~30), the max-shifted softmax where it does not (scale 4: the bound passes EXP_SAFE_LOG, so unshifted
    scores could overflow exp) and for a head of padding only; both are held to the XLA path's closeness to float64,
    in both length regimes."""
    from m3jax.attention import _exp_is_safe

    q, k, v, mask = inputs(3, t, 4, 32, [t, t // 3, 0], scale=scale)
    flat = lambda x: x.transpose(0, 2, 1, 3).reshape(12, t, 32)  # noqa: E731
    bias = jnp.repeat(jnp.where(mask, 0.0, -1e30), 4, axis=0)
    safe = np.asarray(_exp_is_safe(flat(q / np.sqrt(32)), flat(k), flat(v), bias)).reshape(3, 4)
    assert not safe[2].any()  # no real key: shifted, so the filler row averages instead of dividing 0 by 0
    assert safe[:2].all() if scale == 2.0 else not safe.any()
    out = attention(q, k, v, mask, impl="tiled")
    assert bool(jnp.isfinite(out).all())
    assert_as_close_to_float64_as_xla(out, attention(q, k, v, mask, impl="xla"), truth(q, k, v, mask), mask)


def test_earlier_impl_name_still_works():
    """"heads", the tiled path's earlier name, is the same implementation; an unknown name says what exists."""
    q, k, v, mask = inputs(2, 96, 4, 32, [96, 40])
    np.testing.assert_array_equal(attention(q, k, v, mask, impl="heads"), attention(q, k, v, mask, impl="tiled"))
    with pytest.raises(ValueError, match="unknown attention impl 'native'; expected one of"):
        attention(q, k, v, mask, impl="native")


def test_chunked_never_builds_full_score_matrix():
    """The compiled blocked path holds no [B, N, T, T] buffer (the XLA path does)."""
    t, n = 4096, 4
    q, k, v, mask = inputs(1, t, n, 16, [t])
    full_bytes = n * t * t * 4

    def biggest(impl):
        hlo = jax.jit(lambda *a: attention(*a, impl=impl)).lower(q, k, v, mask).compile()
        return hlo.memory_analysis().temp_size_in_bytes

    assert biggest("xla") >= full_bytes
    assert biggest("chunked") < full_bytes / 8


@pytest.mark.parametrize("t", [256, 384])
def test_splash_interpret_matches_xla(t):
    """256: one block of 256; 384: three blocks of 128 (the largest of 512/256/128 dividing it)."""
    q, k, v, mask = inputs(2, t, 2, 64, [t, 77])
    ref = attention(q, k, v, mask, impl="xla")
    out = attention(q, k, v, mask, impl="splash")  # Pallas TPU kernel, interpret mode off-TPU
    assert_as_close_to_float64_as_xla(out, ref, truth(q, k, v, mask), mask)
    with pytest.raises(ValueError, match="multiple of 128, got 200"):
        attention(*inputs(1, 200, 2, 64, [200]), impl="splash")


def test_bfloat16_inputs_keep_float32_softmax():
    q, k, v, mask = inputs(2, 600, 4, 32, [600, 200], dtype=jnp.bfloat16, scale=1.0)
    ref = attention(q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32), mask, impl="xla")
    errs = {}
    for impl in ("xla", "chunked", "tiled"):
        out = attention(q, k, v, mask, impl=impl)
        assert out.dtype == jnp.bfloat16
        errs[impl] = max_err_on_real_rows(out, ref, mask)
    assert max(errs["chunked"], errs["tiled"]) <= max(2 * errs["xla"], 0.02), errs


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="cuDNN flash attention needs an NVIDIA GPU")
def test_cudnn_matches_xla():
    q, k, v, mask = inputs(2, 512, 4, 64, [512, 100], dtype=jnp.bfloat16)
    ref = attention(q, k, v, mask, impl="xla")
    assert max_err_on_real_rows(attention(q, k, v, mask, impl="cudnn"), ref, mask) < 0.05


def test_dispatch_by_backend_length_and_dtype():
    assert choose_impl(8192, jnp.bfloat16, "gpu") == "cudnn"
    assert choose_impl(8192, jnp.float32, "gpu") == "chunked"
    assert choose_impl(512, jnp.float32, "gpu") == "xla"
    assert choose_impl(1024, jnp.bfloat16, "tpu") == "splash"
    assert choose_impl(100, jnp.float32, "tpu") == "xla"
    assert choose_impl(640, jnp.bfloat16, "tpu") == "splash"
    assert choose_impl(640, jnp.bfloat16, "tpu", "TPU v3") == "chunked"  # Mosaic rejects splash on v2 and v3
    assert choose_impl(512, jnp.float32, "cpu") == "tiled"
    assert choose_impl(8192, jnp.bfloat16, "cpu") == "tiled"
    with pytest.raises(ValueError, match="unknown attention impl 'fast'"):
        attention(*inputs(1, 8, 1, 4, [8]), impl="fast")


def test_cli_offers_every_impl():
    """`m3jax bench --attn` and `m3jax embed --attn-impl` take every impl and the earlier names."""
    from m3jax.attention import ALIASES
    from m3jax.cli import build_parser

    commands = build_parser()._subparsers._group_actions[0].choices
    for command, dest in (("bench", "attn"), ("embed", "attn_impl")):
        flag = next(a for a in commands[command]._actions if a.dest == dest)
        assert tuple(flag.choices) == (*IMPLS, *ALIASES), command
