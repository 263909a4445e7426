"""One attention dispatcher for every backend.

All implementations take q, k, v of shape [B, T, N, H] and a key padding mask [B, T] (True = real token) and
return [B, T, N, H] in v's dtype. Softmax always runs in float32. Rows of padded queries are computed but
meaningless; callers never read them.

- "xla":     plain einsum + softmax; materialises [B, N, T, T] float32 scores.
- "chunked": blocked attention with an online softmax (query blocks x key blocks), so at most
             [B, N, 256, 512] scores live at once; what an 8,192-token document needs on backends without a
             fused kernel.
- "tiled":   the CPU default: one head (or a few) per step of a lax.map, its whole [T, T] softmax (beyond 1,024
             tokens, 512-row query blocks against all keys) computed while it sits in cache, normalised after
             the value product, so the scores stay in cache (benchmarks/attention_cpu.py times it).
- "cudnn":   jax.nn.dot_product_attention with sequence lengths (fused flash attention on NVIDIA GPUs, bf16/fp16).
- "splash":  Pallas splash attention for TPU (runs in interpret mode elsewhere, for testing); lengths that are a
             multiple of 128, in blocks of the largest of 512, 256, 128 that divides the length.

The platform is that of the devices the code is compiled for: the context mesh's (`jax.set_mesh`, which the
Encoder, `fit` and `m3jax preflight` set), else JAX's default backend. The kernels ("splash", "cudnn")
are custom calls XLA cannot partition; under a context mesh they run per shard of the batch (`jax.shard_map` over
the mesh's axes that are not already manual), so a data-parallel batch stays split at any scale.
"""

from __future__ import annotations

import functools
import math
from typing import Literal

import jax
import jax.numpy as jnp

Impl = Literal["auto", "xla", "chunked", "tiled", "cudnn", "splash"]
IMPLS = ("auto", "xla", "chunked", "tiled", "cudnn", "splash")
# Earlier names, still accepted: "heads" was "tiled" (a word the output heads already use).
ALIASES = {"heads": "tiled"}

# Above this length the blocked path replaces the XLA one off CPU: it never holds N*T*T*4 bytes of scores (4 GiB per
# layer at T=8,192, N=16).
CHUNK_THRESHOLD = 512
BLOCK_Q, BLOCK_K = 256, 512  # "chunked"'s query and key blocks
# "tiled": scores of one step at most TILE_SCORES elements ([G, T, T], G heads, 4 MiB of float32);
# beyond that length, query blocks of TILE_ROWS rows against every key.
TILE_SCORES, TILE_ROWS = 4 * 512 * 512, 512


SPLASH_BLOCKS = (512, 256, 128)  # splash's block sizes, largest first: the first that divides the length is used
# TPU generations whose Mosaic compiler rejects splash's bf16 matmuls (E2001, "Unsupported matmul RHS type").
NO_SPLASH = ("TPU v2", "TPU v3")


def platform_in_use() -> str:
    """The platform being compiled for: the context mesh's devices (jax.set_mesh), else JAX's default backend."""
    mesh = jax.sharding.get_abstract_mesh()
    if not mesh.empty and mesh.abstract_device is not None:
        return mesh.abstract_device.platform
    return jax.default_backend()


def device_kind_in_use() -> str | None:
    """The context mesh's device kind ("TPU v5 lite", ...), else the default backend's first device's."""
    mesh = jax.sharding.get_abstract_mesh()
    if not mesh.empty and mesh.abstract_device is not None:
        return mesh.abstract_device.device_kind
    return jax.devices()[0].device_kind


def choose_impl(seq_len: int, dtype: jnp.dtype, backend: str | None = None, device_kind: str | None = None) -> str:
    """Picks an implementation from platform and device kind (default: those in use, see platform_in_use), length
    and dtype."""
    backend = backend or platform_in_use()
    if backend in ("gpu", "cuda", "rocm") and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16):
        return "cudnn"
    if backend == "tpu" and seq_len % SPLASH_BLOCKS[-1] == 0 and (device_kind or device_kind_in_use()) not in NO_SPLASH:
        return "splash"
    if backend == "cpu":
        return "tiled"
    return "chunked" if seq_len > CHUNK_THRESHOLD else "xla"


def attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, *, impl: str = "auto",
              dropout_rate: float = 0.0, dropout_rng: jax.Array | None = None) -> jax.Array:
    """Bidirectional attention with a key padding mask.

    Args:
      q, k, v: [B, T, N, H].
      mask: [B, T] bool, True for real tokens; padding is on the right (XLM-R's default).
      impl: one of IMPLS (or ALIASES); "auto" chooses by backend, length and dtype.
      dropout_rate, dropout_rng: dropout on the attention probabilities (training); with a key and a positive
        rate, the XLA path (or the blocked one, for long inputs) is used whatever impl says, since the fused
        kernels and "tiled" take no dropout.
    Returns:
      [B, T, N, H] in v.dtype.
    """
    impl = ALIASES.get(impl, impl)
    if impl not in IMPLS:
        raise ValueError(f"unknown attention impl {impl!r}; expected one of {IMPLS}")
    drop = (dropout_rate, dropout_rng) if dropout_rng is not None and dropout_rate > 0 else None
    if drop is not None and impl in ("auto", "tiled", "cudnn", "splash"):
        impl = "chunked" if q.shape[1] > CHUNK_THRESHOLD else "xla"
    elif impl == "auto":
        impl = choose_impl(q.shape[1], q.dtype)
        if impl == "splash" and _manual_axes():
            # Inside shard_map (the training step's per-device loss) splash's Pallas call does not type-check
            # against the mapped axes: the blocked XLA path there.
            impl = "chunked" if q.shape[1] > CHUNK_THRESHOLD else "xla"
    if impl == "tiled":
        return _tiled(q, k, v, mask)
    if impl == "xla":
        return _xla(q, k, v, mask, drop)
    if impl == "chunked":
        return _chunked(q, k, v, mask, drop=drop)
    if impl == "cudnn":
        return _per_shard(_cudnn, q, k, v, mask)
    if q.shape[1] % SPLASH_BLOCKS[-1]:
        raise ValueError(f'attention impl "splash" takes lengths that are a multiple of {SPLASH_BLOCKS[-1]}, got '
                         f"{q.shape[1]} (q shape {q.shape})")
    return _per_shard(_splash, q, k, v, mask)


def _manual_axes() -> tuple:
    """The context mesh's axes that are manual here (inside shard_map over them), else ()."""
    mesh = jax.sharding.get_abstract_mesh()
    return () if mesh.empty else tuple(mesh.manual_axes)


def _varying_like(x: jax.Array, ref: jax.Array) -> jax.Array:
    """x (built from constants) marked as varying over the manual axes ref varies over, so that a scan carry started
    from it has the type of the body's outputs inside shard_map."""
    mat = getattr(jax.typeof(ref), "manual_axis_type", None)
    axes = tuple(sorted(getattr(mat, "varying", ()) or ()))
    return jax.lax.pcast(x, axes, to="varying") if axes else x


def _per_shard(kernel, q, k, v, mask):
    """kernel(q, k, v, mask) on each device's rows: under a context mesh, shard_map over its non-manual axes of
    size > 1 with the batch split over them (a custom call is otherwise gathered whole onto every device)."""
    mesh = jax.sharding.get_abstract_mesh()
    axes = () if mesh.empty else tuple(a for a in mesh.axis_names
                                       if a not in mesh.manual_axes and mesh.shape[a] > 1)
    if not axes:
        return kernel(q, k, v, mask)
    shards = math.prod(mesh.shape[a] for a in axes)
    if q.shape[0] % shards:
        raise ValueError(f"attention: batch of {q.shape[0]} rows (q shape {q.shape}) does not split over the "
                         f"{shards} devices of mesh axes {axes}")
    rows = jax.sharding.PartitionSpec(axes)
    return jax.shard_map(kernel, mesh=mesh, in_specs=(rows,) * 4, out_specs=rows, axis_names=set(axes),
                         check_vma=False)(q, k, v, mask)


def dropout(x: jax.Array, rate: float, rng: jax.Array | None) -> jax.Array:
    """Inverted dropout; the identity without a key (inference) or at rate 0. The model's dropout too."""
    if rng is None or rate == 0.0:
        return x
    keep = jax.random.bernoulli(rng, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), 0.0).astype(x.dtype)


def _dropout(x: jax.Array, drop: tuple[float, jax.Array] | None) -> jax.Array:
    """dropout with attention()'s (rate, key) pair, None for none."""
    return x if drop is None else dropout(x, *drop)


def _xla(q, k, v, mask, drop=None):
    scale = 1.0 / math.sqrt(q.shape[-1])
    scores = jnp.einsum("btnh,bsnh->bnts", q, k, preferred_element_type=jnp.float32) * scale
    # Additive finfo.min, as transformers' eager XLM-R: a row with no real key stays finite.
    scores = scores + jnp.where(mask, 0.0, jnp.finfo(jnp.float32).min)[:, None, None, :]
    probs = _dropout(jax.nn.softmax(scores, axis=-1), drop).astype(v.dtype)
    return jnp.einsum("bnts,bsnh->btnh", probs, v, preferred_element_type=jnp.float32).astype(v.dtype)


def _chunked(q, k, v, mask, block_q: int = BLOCK_Q, block_k: int = BLOCK_K, drop=None):
    """Blocked attention with an online softmax (flash attention's recurrence, in plain XLA): query blocks in
    lax.map, key blocks in lax.scan, so at most [B, N, block_q, block_k] scores exist at once. (It takes exp, not
    exp2 with log2(e) folded into the scale: XLA's exp2 is off by ~10 ulp against exp's 1.)"""
    b, t, n, h = q.shape
    if t <= block_q:
        return _xla(q, k, v, mask, drop)
    pq, pk = -t % block_q, -t % block_k
    nq, nk = (t + pq) // block_q, (t + pk) // block_k
    scale = 1.0 / math.sqrt(h)
    # A finite floor, not -inf: a block of padding keys must not turn the running max into NaN.
    bias = jnp.pad(jnp.where(mask, 0.0, -1e30), ((0, 0), (0, pk)), constant_values=-1e30).astype(jnp.float32)

    def blocks(x, pad, size, count):  # [B, T, N, H] -> [count, B, N, size, H]
        x = jnp.pad(x.transpose(0, 2, 1, 3), ((0, 0), (0, 0), (0, pad), (0, 0)))
        return x.reshape(b, n, count, size, h).transpose(2, 0, 1, 3, 4)

    kb, vb = blocks(k, pk, block_k, nk), blocks(v, pk, block_k, nk)
    bb = bias.reshape(b, nk, block_k).transpose(1, 0, 2)  # [nk, B, block_k]

    def one_query_block(qb_i):  # [B, N, block_q, H], block index
        qb, qi = qb_i

        def step(carry, kvb):
            m, l, acc = carry
            kk, vv, bias_k, ki = kvb
            s = jnp.einsum("bnqh,bnkh->bnqk", qb, kk, preferred_element_type=jnp.float32) + bias_k[:, None, None]
            m_new = jnp.maximum(m, s.max(-1))
            p = jnp.exp(s - m_new[..., None])
            corr = jnp.exp(m - m_new)
            # Dropout scales what reaches the values, not the normaliser: dropout(softmax(s)) @ v, as eager.
            pd = p if drop is None else _dropout(p, (drop[0], jax.random.fold_in(jax.random.fold_in(drop[1], qi),
                                                                                   ki)))
            acc = acc * corr[..., None] + jnp.einsum("bnqk,bnkh->bnqh", pd.astype(vv.dtype), vv,
                                                     preferred_element_type=jnp.float32)
            return (m_new, l * corr + p.sum(-1), acc), None

        init = tuple(_varying_like(x, qb) for x in (jnp.full((b, n, block_q), -1e30, jnp.float32),
                                                    jnp.zeros((b, n, block_q), jnp.float32),
                                                    jnp.zeros((b, n, block_q, h), jnp.float32)))
        (_, l, acc), _ = jax.lax.scan(step, init, (kb, vb, bb, jnp.arange(nk)))
        return acc / l[..., None]

    qs = blocks(q * jnp.asarray(scale, q.dtype), pq, block_q, nq)
    out = jax.lax.map(one_query_block, (qs, jnp.arange(nq)))  # [nq, B, N, block_q, H]
    return out.transpose(1, 0, 3, 2, 4).reshape(b, t + pq, n, h)[:, :t].astype(v.dtype)


def _tiled(q, k, v, mask, max_scores: int = TILE_SCORES, rows: int = TILE_ROWS):
    """Attention a head at a time (flattened B*N heads, G per lax.map step) so each step's scores stay in cache
    and each matmul is one plain [T, H] x [H, T] product; for long inputs (T * T > max_scores) each head runs
    query blocks of about `rows` rows against all its keys. The softmax is normalised after the value product
    (one division per output element instead of per score), exactly the same maths.

    Where a step's scores are bounded well inside float32's exp range (see _exp_is_safe), exp is taken of the
    scores as they are, without subtracting each row's max: the same maths with one rounding fewer, and one
    pass less over the scores. Other steps
    (large logits, or a row of padding only) take the max-shifted softmax."""
    b, t, n, h = q.shape
    scale = jnp.asarray(1.0 / math.sqrt(h), q.dtype)
    flat = lambda x: x.transpose(0, 2, 1, 3).reshape(b * n, t, x.shape[-1])  # noqa: E731  [B*N, T, H]
    qs, ks, vs = flat(q * scale), flat(k), flat(v)
    # A finite floor, not -inf: a row of padding (a filler row of the batch) averages, it does not turn NaN.
    bias = jnp.broadcast_to(jnp.where(mask, 0.0, -1e30).astype(jnp.float32)[:, None], (b, n, t)).reshape(b * n, t)
    safe = _exp_is_safe(qs, ks, vs, bias)  # [B*N]

    def softmax_v(qq, kk, vv, bb, shift):  # [..., Q, H], [..., T, H], [..., T, H], [..., T] -> [..., Q, H] float32
        s = jnp.einsum("...qh,...kh->...qk", qq, kk, preferred_element_type=jnp.float32) + bb[..., None, :]
        p = jnp.exp(s - s.max(-1, keepdims=True) if shift else s)
        o = jnp.einsum("...qk,...kh->...qh", p.astype(vv.dtype), vv, preferred_element_type=jnp.float32)
        return o / p.sum(-1)[..., None]

    def either(ok, run):  # run(shift) -> output: the unshifted exp where this step's scores allow it (ok)
        return jax.lax.cond(ok, lambda: run(False), lambda: run(True))

    if t * t <= max_scores:
        g = math.gcd(b * n, max(1, max_scores // (t * t)))  # heads per step, a divisor of B*N
        group = lambda x: x.reshape(b * n // g, g, *x.shape[1:])  # noqa: E731
        out = jax.lax.map(lambda a: either(a[4].all(), lambda shift: softmax_v(*a[:4], shift)),
                          (group(qs), group(ks), group(vs), group(bias), group(safe)))
    else:
        nq = -(-t // rows)
        size = -(-t // nq)
        size += -size % 8
        qb = jnp.pad(qs, ((0, 0), (0, nq * size - t), (0, 0))).reshape(b * n, nq, size, h)
        out = jax.lax.map(lambda a: either(a[4], lambda shift: jax.lax.map(
            lambda qq: softmax_v(qq, *a[1:4], shift), a[0])), (qb, ks, vs, bias, safe))
    return out.reshape(b, n, -1, h)[:, :, :t].transpose(0, 2, 1, 3).astype(v.dtype)


# exp(s) without a shift is safe while every score s satisfies |s| <= bound and T * e^bound * max|v| stays far
# below float32's largest value (3.4e38 = e^88.7); then no exp, row sum or value product overflows, and no row's
# exp underflows (e^-bound is a normal float32). EXP_SAFE_LOG leaves e^8 of room under e^88.7.
EXP_SAFE_LOG = 80.0


def _exp_is_safe(qs, ks, vs, bias) -> jax.Array:
    """[B*N] bool: whether a head's scores (scaled q against its real keys) are bounded by Cauchy-Schwarz,
    max_t |q_t| * max_s |k_s|, tightly enough for an unshifted exp (EXP_SAFE_LOG), and the head has a real key."""
    f32 = lambda x: x.astype(jnp.float32)  # noqa: E731
    real = bias == 0  # [B*N, T]
    qn = jnp.sqrt(jnp.square(f32(qs)).sum(-1).max(-1))
    kn = jnp.sqrt(jnp.where(real, jnp.square(f32(ks)).sum(-1), 0.0).max(-1))
    vmax = jnp.where(real[..., None], jnp.abs(f32(vs)), 0.0).max((-2, -1))
    log_room = qn * kn + math.log(qs.shape[1]) + jnp.log1p(vmax)
    return real.any(-1) & (log_room <= EXP_SAFE_LOG)


def _cudnn(q, k, v, mask):
    lengths = mask.sum(-1).astype(jnp.int32)
    return jax.nn.dot_product_attention(
        q, k, v, query_seq_lengths=lengths, key_value_seq_lengths=lengths, implementation="cudnn"
    )


def splash_block(seq_len: int) -> int:
    """Splash's block size for a length: the largest of SPLASH_BLOCKS dividing it."""
    for block in SPLASH_BLOCKS:
        if seq_len % block == 0:
            return block
    raise ValueError(f"splash attention needs a length divisible by {SPLASH_BLOCKS[-1]}, got {seq_len}")


@functools.cache
def _splash_kernel(seq_len: int, num_heads: int, interpret: bool):
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

    full = sm.FullMask((seq_len, seq_len))
    multi = sm.MultiHeadMask([full] * num_heads)
    block = splash_block(seq_len)
    sizes = sk.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block,
                          block_q_dkv=block, block_kv_dkv=block, block_kv_dkv_compute=block)
    return sk.make_splash_mha(multi, head_shards=1, q_seq_shards=1, block_sizes=sizes, interpret=interpret)


def _splash(q, k, v, mask):
    b, t, n, h = q.shape
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk

    kernel = _splash_kernel(t, n, platform_in_use() != "tpu")
    scale = 1.0 / math.sqrt(h)
    # Padding enters through segment ids: real tokens are segment 0, padding segment 1, so a real query never
    # attends to padding (padded queries attend only to padding, and are never read).
    seg = jnp.where(mask, 0, 1).astype(jnp.int32)

    def one(qb, kb, vb, sb):  # [N, T, H] each
        return kernel(qb * jnp.asarray(scale, qb.dtype), kb, vb, segment_ids=sk.SegmentIds(q=sb, kv=sb))

    out = jax.vmap(one)(q.swapaxes(1, 2), k.swapaxes(1, 2), v.swapaxes(1, 2), seg)
    return out.swapaxes(1, 2).astype(v.dtype)
