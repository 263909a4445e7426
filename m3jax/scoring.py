"""Vectorised BGE-M3 relevance scores: dense, lexical (sparse) and ColBERT MaxSim, paired and all-pairs.

Inputs are the encode pipeline's padded arrays:
- dense [N, D] float32 (or bfloat16), L2-normalised rows;
- sparse_ids [N, K] int32 padded with -1, each row's valid ids unique; sparse_weights [N, K] float32, 0 at padding;
- colbert [N, T, C] float32 (or bfloat16), zero rows at padding; colbert_mask [N, T] bool, True = real vector.

`*_paired` functions score query i against passage i and return [N]; `*_all_pairs` functions score every query
against every passage and return [Q, P], walking the passage (and query) axis in fixed-size chunks inside one
fori_loop (see map_chunks): one compiled body, and working memory bounded by the chunk, not by P. Scores are float32
whatever the storage dtype (bfloat16 storage accumulates in float32).

Parity with FlagEmbedding 1.4.2 (BGEM3FlagModel):
- `lexical_*` equal `compute_lexical_matching_score` (sum over shared ids of w_q * w_p).
- `colbert_*(zero_floor=False)` equal `colbert_score` on unpadded arrays: mean over real query tokens of the max over
  real passage tokens. `zero_floor=True` equals `compute_score`, whose padded zero passage vectors join the max and
  so floor each per-token max at 0 (strictly: for every passage shorter than the longest of its compute_score
  batch; the longest has no padding and no floor). Here padded passage tokens are masked to -inf, never to 0.
- `weighted_sum(..., normalize=True)` equals `compute_score`'s 'sparse+dense' / 'colbert+sparse+dense'; the paper's
  hybrid is the unnormalised 1 * dense + 0.3 * sparse + 1 * colbert.

Every public function checks ranks, dims and dtypes first and names the offending argument; ids outside
[0, vocab_size) count as padding (numpy inputs holding ids below -1 or >= vocab_size are rejected).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from m3jax.config import M3Config

VOCAB_SIZE = M3Config.bge_m3().vocab_size
VECTOR_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16))
ID_DTYPES = (jnp.dtype(jnp.int32), jnp.dtype(jnp.int64))

DENSE_CHUNK = 8192
LEXICAL_CHUNK = 2048
LEXICAL_QUERY_BLOCK = 16  # cost ~ Q*P*(block*Kq) for the matmul + Q/block passes over the ids
COLBERT_CHUNK = 64
COLBERT_QUERY_BLOCK = 16

_HIGHEST = jax.lax.Precision.HIGHEST
_NEG_INF = float("-inf")


# ------------------------------------------------------------------------------------------------ input checks
def _check(name: str, x: Any, dims: str, dtypes: tuple, kind: str) -> None:
    """Rank and dtype of one input; dims is its documented shape, e.g. "[N, D]"."""
    if not hasattr(x, "shape") or not hasattr(x, "dtype"):
        raise TypeError(f"{name}: expected a numpy or jax array of shape {dims}, got {type(x).__name__}")
    ndim = dims.count(",") + 1
    if x.ndim != ndim:
        raise ValueError(f"{name}: expected shape {dims} (rank {ndim}), got {tuple(x.shape)}")
    if jnp.dtype(x.dtype) not in dtypes:
        allowed = " or ".join(str(d) for d in dtypes)
        raise TypeError(f"{name}: expected {kind} of dtype {allowed}, got {x.dtype}")


def check_vectors(name: str, x: Any, dims: str) -> None:
    _check(name, x, dims, VECTOR_DTYPES, "vectors")


def check_codes(name: str, x: Any, dims: str) -> None:
    _check(name, x, dims, (jnp.dtype(jnp.int8),), "int8 codes (m3jax.compact)")


def check_ids(name: str, x: Any, dims: str, vocab_size: int = VOCAB_SIZE) -> None:
    _check(name, x, dims, ID_DTYPES, "token ids")
    if isinstance(x, np.ndarray) and x.size:
        lo, hi = int(x.min()), int(x.max())
        if lo < -1 or hi >= vocab_size:
            bad = lo if lo < -1 else hi
            row = int(np.argwhere(x == bad)[0][0])
            raise ValueError(f"{name}: ids must lie in [-1, {vocab_size}) (-1 = padding), got {bad} in row {row}")


def check_weights(name: str, x: Any, dims: str) -> None:
    _check(name, x, dims, VECTOR_DTYPES, "weights")


def check_mask(name: str, x: Any, dims: str) -> None:
    _check(name, x, dims, (jnp.dtype(jnp.bool_),), "a mask")


def check_dim(what: str, name_a: str, a: int, name_b: str, b: int) -> None:
    if a != b:
        raise ValueError(f"{what} mismatch: {name_a} has {a}, {name_b} has {b}")


def check_positive(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return int(value)


def _check_lexical(q_ids, q_weights, p_ids, p_weights, vocab_size, q_dims, p_dims):
    check_ids("q_ids", q_ids, q_dims, vocab_size)
    check_weights("q_weights", q_weights, q_dims)
    check_ids("p_ids", p_ids, p_dims, vocab_size)
    check_weights("p_weights", p_weights, p_dims)
    if q_ids.shape != q_weights.shape:
        raise ValueError(f"q_ids and q_weights must have one shape {q_dims}, got {q_ids.shape} and {q_weights.shape}")
    if p_ids.shape != p_weights.shape:
        raise ValueError(f"p_ids and p_weights must have one shape {p_dims}, got {p_ids.shape} and {p_weights.shape}")


def _check_colbert(q, q_mask, p, p_mask, q_dims, p_dims):
    check_vectors("q", q, q_dims + ", C]")
    check_mask("q_mask", q_mask, q_dims + "]")
    check_vectors("p", p, p_dims + ", C]")
    check_mask("p_mask", p_mask, p_dims + "]")
    check_dim("ColBERT dim C", "q", q.shape[-1], "p", p.shape[-1])
    if q_mask.shape != q.shape[:2]:
        raise ValueError(f"q_mask: expected shape {tuple(q.shape[:2])} (q's {q_dims}]), got {tuple(q_mask.shape)}")
    if p_mask.shape != p.shape[:2]:
        raise ValueError(f"p_mask: expected shape {tuple(p.shape[:2])} (p's {p_dims}]), got {tuple(p_mask.shape)}")


# ------------------------------------------------------------------------------------------------ building blocks
def map_chunks(fn, arrays: tuple, chunk: int, axis: int = 1) -> jax.Array:
    """Maps fn over the leading axis of `arrays` in chunks and stitches the results along `axis`.

    fn(*chunk_arrays) returns [Q, chunk] (axis=1) or [chunk, P] (axis=0); the result is [Q, n] or [n, P] for n
    leading rows. Every chunk has the same shape (one compiled body) and nothing is padded or copied: the last chunk
    is shifted back to end at row n, rescoring a few rows with identical results.
    """
    n = arrays[0].shape[0]
    chunk = max(1, min(chunk, n))
    sliced = [jax.ShapeDtypeStruct((chunk, *a.shape[1:]), a.dtype) for a in arrays]
    out = jax.eval_shape(fn, *sliced)
    shape = list(out.shape)
    shape[axis] = n

    def body(i, acc):
        start = jnp.minimum(i * chunk, n - chunk)
        xs = [jax.lax.dynamic_slice_in_dim(a, start, chunk) for a in arrays]
        return jax.lax.dynamic_update_slice_in_dim(acc, fn(*xs), start, axis)

    return jax.lax.fori_loop(0, -(-n // chunk), body, jnp.zeros(shape, out.dtype))


def _valid_ids(ids: jax.Array, vocab_size: int) -> jax.Array:
    return (ids >= 0) & (ids < vocab_size)


def dense_block(q: jax.Array, p: jax.Array) -> jax.Array:
    """q [Q, D], p [P, D] -> [Q, P] float32."""
    return jnp.einsum("qd,pd->qp", q, p, precision=_HIGHEST, preferred_element_type=jnp.float32)


def lexical_pairs(q_ids, q_weights, p_ids, p_weights, vocab_size: int = VOCAB_SIZE) -> jax.Array:
    """Equality match of padded ids, pair by pair: [..., Kq] x [..., Kp] -> [...] float32."""
    match = (q_ids[..., :, None] == p_ids[..., None, :]) & _valid_ids(q_ids, vocab_size)[..., :, None]
    prod = q_weights.astype(jnp.float32)[..., :, None] * p_weights.astype(jnp.float32)[..., None, :]
    return jnp.sum(jnp.where(match, prod, 0.0), axis=(-2, -1))


def lexical_table(q_ids: jax.Array, q_weights: jax.Array, vocab_size: int = VOCAB_SIZE):
    """Compacts a block of queries [B, Kq] onto the U = B*Kq columns of its own id union.

    Returns (table [vocab_size + 1] int32: id -> column, U for ids no query holds; qm [B, U + 1] float32: the
    queries' weights by column, column U always 0). The table is a per-block id lookup (1 MB), not a score matrix:
    memory does not grow with the number of queries or passages.
    """
    b, kq = q_ids.shape
    u = b * kq
    safe = jnp.where(_valid_ids(q_ids, vocab_size), q_ids, vocab_size).reshape(-1)
    table = jnp.full((vocab_size + 1,), u, jnp.int32).at[safe].min(jnp.arange(u, dtype=jnp.int32))
    table = table.at[vocab_size].set(u)
    cols = table[safe].reshape(b, kq)
    qm = jnp.zeros((b, u + 1), jnp.float32).at[jnp.arange(b)[:, None], cols].add(q_weights.astype(jnp.float32))
    return table, qm.at[:, u].set(0.0)


def lexical_block(table, qm, p_ids, p_weights, vocab_size: int = VOCAB_SIZE) -> jax.Array:
    """Scores a passage chunk [P, Kp] against a compacted query block (see lexical_table): [B, P] float32.

    Each passage is scattered onto the block's columns ([P, U + 1], ids the block lacks land in column U, which qm
    zeroes), then one matmul scores it against every query of the block.
    """
    n = p_ids.shape[0]
    cols = table[jnp.where(_valid_ids(p_ids, vocab_size), p_ids, vocab_size)]
    pm = jnp.zeros((n, qm.shape[1]), jnp.float32).at[jnp.arange(n)[:, None], cols].add(p_weights.astype(jnp.float32))
    return jnp.einsum("bu,pu->bp", qm, pm, precision=_HIGHEST)


def maxsim(q, q_mask, p, p_mask, zero_floor: bool) -> jax.Array:
    """ColBERT MaxSim of every query against every passage: q [Q, Tq, C], p [P, Tp, C] -> [Q, P] float32."""
    s = jnp.einsum("qic,pjc->qipj", q, p, precision=_HIGHEST, preferred_element_type=jnp.float32)
    best = jnp.max(jnp.where(p_mask[None, None], s, _NEG_INF), axis=-1)  # [Q, Tq, P]
    if zero_floor:
        best = jnp.maximum(best, 0.0)
    total = jnp.sum(jnp.where(q_mask[:, :, None], best, 0.0), axis=1)
    return total / jnp.maximum(q_mask.sum(-1), 1).astype(jnp.float32)[:, None]


def maxsim_pairs(q, q_mask, p, p_mask, zero_floor: bool) -> jax.Array:
    """ColBERT MaxSim pair by pair: q [..., Tq, C], p [..., Tp, C] -> [...] float32."""
    s = jnp.einsum("...ic,...jc->...ij", q, p, precision=_HIGHEST, preferred_element_type=jnp.float32)
    best = jnp.max(jnp.where(p_mask[..., None, :], s, _NEG_INF), axis=-1)  # [..., Tq]
    if zero_floor:
        best = jnp.maximum(best, 0.0)
    total = jnp.sum(jnp.where(q_mask, best, 0.0), axis=-1)
    return total / jnp.maximum(q_mask.sum(-1), 1).astype(jnp.float32)


def colbert_matrix(q, q_mask, p, p_mask, zero_floor: bool, chunk: int, query_block: int) -> jax.Array:
    """maxsim over query blocks x passage chunks, so at most [block, Tq, chunk, Tp] scores live at once."""

    def one_block(qb, qmb):
        return map_chunks(lambda pc, pmc: maxsim(qb, qmb, pc, pmc, zero_floor), (p, p_mask), chunk)

    return map_chunks(one_block, (q, q_mask), query_block, axis=0)


def lexical_matrix(q_ids, q_weights, p_ids, p_weights, chunk: int, query_block: int, vocab_size: int) -> jax.Array:
    def one_block(qi, qw):
        table, qm = lexical_table(qi, qw, vocab_size)
        return map_chunks(lambda pi, pw: lexical_block(table, qm, pi, pw, vocab_size), (p_ids, p_weights), chunk)

    return map_chunks(one_block, (q_ids, q_weights), query_block, axis=0)


# ------------------------------------------------------------------------------------------------ jitted cores
@jax.jit
def _dense_paired(q, p):
    return jnp.einsum("nd,nd->n", q, p, precision=_HIGHEST, preferred_element_type=jnp.float32)


@functools.partial(jax.jit, static_argnames=("chunk",))
def _dense_all_pairs(q, p, chunk):
    return map_chunks(lambda pc: dense_block(q, pc), (p,), chunk)


_lexical_paired = jax.jit(lexical_pairs, static_argnames=("vocab_size",))
_lexical_all_pairs = jax.jit(lexical_matrix, static_argnames=("chunk", "query_block", "vocab_size"))
_colbert_paired = jax.jit(maxsim_pairs, static_argnames=("zero_floor",))
_colbert_all_pairs = jax.jit(colbert_matrix, static_argnames=("zero_floor", "chunk", "query_block"))


def _empty(q_rows: int, p_rows: int) -> jax.Array | None:
    return jnp.zeros((q_rows, p_rows), jnp.float32) if q_rows == 0 or p_rows == 0 else None


# ------------------------------------------------------------------------------------------------ public API
def dense_paired(q: jax.Array, p: jax.Array) -> jax.Array:
    """Dot product of query i with passage i (cosine for normalised rows): q [N, D], p [N, D] -> [N] float32."""
    check_vectors("q", q, "[N, D]")
    check_vectors("p", p, "[N, D]")
    check_dim("dense dim D", "q", q.shape[1], "p", p.shape[1])
    check_dim("pair count N", "q", q.shape[0], "p", p.shape[0])
    return _dense_paired(q, p)


def dense_all_pairs(q: jax.Array, p: jax.Array, *, chunk_size: int = DENSE_CHUNK) -> jax.Array:
    """q [Q, D] x p [P, D] -> [Q, P] float32 dot products, passages in chunks of chunk_size."""
    check_vectors("q", q, "[Q, D]")
    check_vectors("p", p, "[P, D]")
    check_dim("dense dim D", "q", q.shape[1], "p", p.shape[1])
    chunk = check_positive("chunk_size", chunk_size)
    empty = _empty(q.shape[0], p.shape[0])
    return empty if empty is not None else _dense_all_pairs(q, p, chunk)


def lexical_paired(q_ids: jax.Array, q_weights: jax.Array, p_ids: jax.Array, p_weights: jax.Array, *,
                   vocab_size: int = VOCAB_SIZE) -> jax.Array:
    """Lexical matching score of query i with passage i: sum over shared ids of w_q * w_p.

    Args:
      q_ids, q_weights: [N, Kq] int32 (-1 = padding) and float32.
      p_ids, p_weights: [N, Kp].
    Returns:
      [N] float32, from an equality match of the padded ids ([N, Kq, Kp] comparisons).
    """
    _check_lexical(q_ids, q_weights, p_ids, p_weights, vocab_size, "[N, Kq]", "[N, Kp]")
    check_dim("pair count N", "q_ids", q_ids.shape[0], "p_ids", p_ids.shape[0])
    return _lexical_paired(jnp.asarray(q_ids, jnp.int32), q_weights, jnp.asarray(p_ids, jnp.int32), p_weights,
                           vocab_size)


def lexical_all_pairs(q_ids: jax.Array, q_weights: jax.Array, p_ids: jax.Array, p_weights: jax.Array, *,
                      chunk_size: int = LEXICAL_CHUNK, query_block: int = LEXICAL_QUERY_BLOCK,
                      vocab_size: int = VOCAB_SIZE) -> jax.Array:
    """Lexical matching score of every query with every passage.

    Args:
      q_ids, q_weights: [Q, Kq] int32 (-1 = padding) and float32.
      p_ids, p_weights: [P, Kp].
      chunk_size: passages scored per step.
      query_block: queries compacted together onto the union of their ids; each block is one matmul per chunk
        (see lexical_table / lexical_block), so no [*, vocab_size] score matrix is ever built.
    Returns:
      [Q, P] float32.
    """
    _check_lexical(q_ids, q_weights, p_ids, p_weights, vocab_size, "[Q, Kq]", "[P, Kp]")
    chunk = check_positive("chunk_size", chunk_size)
    block = check_positive("query_block", query_block)
    empty = _empty(q_ids.shape[0], p_ids.shape[0])
    if empty is not None:
        return empty
    return _lexical_all_pairs(jnp.asarray(q_ids, jnp.int32), q_weights, jnp.asarray(p_ids, jnp.int32), p_weights,
                              chunk, block, vocab_size)


def colbert_paired(q: jax.Array, q_mask: jax.Array, p: jax.Array, p_mask: jax.Array, *,
                   zero_floor: bool = False) -> jax.Array:
    """ColBERT MaxSim of query i with passage i.

    Args:
      q, q_mask: [N, Tq, C] vectors and [N, Tq] bool (True = real token).
      p, p_mask: [N, Tp, C] and [N, Tp].
      zero_floor: floor each per-token max at 0 (FlagEmbedding compute_score) instead of colbert_score's plain max.
    Returns:
      [N] float32: mean over real query tokens of the max over real passage tokens of q_i . p_j. A query with no
      real token scores 0; a passage with no real token scores -inf (0 with zero_floor).
    """
    _check_colbert(q, q_mask, p, p_mask, "[N, Tq", "[N, Tp")
    check_dim("pair count N", "q", q.shape[0], "p", p.shape[0])
    return _colbert_paired(q, q_mask, p, p_mask, bool(zero_floor))


def colbert_all_pairs(q: jax.Array, q_mask: jax.Array, p: jax.Array, p_mask: jax.Array, *,
                      zero_floor: bool = False, chunk_size: int = COLBERT_CHUNK,
                      query_block: int = COLBERT_QUERY_BLOCK) -> jax.Array:
    """ColBERT MaxSim of every query with every passage (see colbert_paired for the maths).

    Args:
      q, q_mask: [Q, Tq, C], [Q, Tq] bool.
      p, p_mask: [P, Tp, C], [P, Tp] bool.
      chunk_size, query_block: passages and queries per step; at most [query_block, Tq, chunk_size, Tp] float32
        token scores live at once.
    Returns:
      [Q, P] float32.
    """
    _check_colbert(q, q_mask, p, p_mask, "[Q, Tq", "[P, Tp")
    chunk = check_positive("chunk_size", chunk_size)
    block = check_positive("query_block", query_block)
    empty = _empty(q.shape[0], p.shape[0])
    return empty if empty is not None else _colbert_all_pairs(q, q_mask, p, p_mask, bool(zero_floor), chunk, block)


def flag_colbert_scores(q_vecs: Sequence[np.ndarray], p_vecs: Sequence[np.ndarray], batch_size: int
                        ) -> np.ndarray:
    """ColBERT scores of pairs (q_vecs[i], p_vecs[i]) exactly as FlagEmbedding's compute_score gives them.

    compute_score takes the pairs in consecutive batches of batch_size and pads each batch's passages to its
    longest; the padded zero vectors join the max, so for every passage shorter than the longest of its batch each
    query token's max is floored at 0 (zero_floor=True), and the longest passage has no floor. This reproduces that
    batch dependence on unpadded [n_i, C] arrays. Returns [N] float32.
    """
    check_dim("pair count N", "q_vecs", len(q_vecs), "p_vecs", len(p_vecs))
    n = len(q_vecs)
    batch_size = check_positive("batch_size", batch_size)
    out = np.zeros(n, np.float32)
    for start in range(0, n, batch_size):
        qs, ps = q_vecs[start:start + batch_size], p_vecs[start:start + batch_size]
        q, q_mask = _pad_rows(qs)
        p, p_mask = _pad_rows(ps)
        plain = np.asarray(colbert_paired(q, q_mask, p, p_mask))
        floored = np.asarray(colbert_paired(q, q_mask, p, p_mask, zero_floor=True))
        n_p = np.array([len(x) for x in ps])
        out[start:start + len(qs)] = np.where(n_p < n_p.max(), floored, plain)
    return out


def _pad_rows(vecs: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Unpadded [n_i, C] arrays as [B, T, C] + [B, T] mask, T rounded up to a power of two so that the compiled
    shapes stay few (padding is masked, so T does not change a score)."""
    t = max(1, max(len(v) for v in vecs))
    t = 1 << (t - 1).bit_length()
    dim = vecs[0].shape[-1]
    out = np.zeros((len(vecs), t, dim), np.float32)
    mask = np.zeros((len(vecs), t), bool)
    for i, v in enumerate(vecs):
        out[i, :len(v)], mask[i, :len(v)] = v, True
    return out, mask


def check_mode_weights(weights: Sequence[float]) -> tuple[float, float, float]:
    if isinstance(weights, str | bytes) or len(weights) != 3:
        raise ValueError(f"weights must be (dense, sparse, colbert), three numbers; got {weights!r}")
    return tuple(float(w) for w in weights)


def weighted_sum(dense: jax.Array | None, sparse: jax.Array | None, colbert: jax.Array | None,
                 weights: Sequence[float] = (1.0, 0.3, 1.0), normalize: bool = False) -> jax.Array:
    """Hybrid score w0 * dense + w1 * sparse + w2 * colbert over the modes given (None = left out).

    The defaults are the paper's unnormalised 1, 0.3, 1. normalize=True divides by the sum of the weights of the
    modes given, which is FlagEmbedding compute_score's 'sparse+dense' (colbert=None) and 'colbert+sparse+dense'.
    All scores given must share one shape ([N] or [Q, P]); the result is float32 of that shape.
    """
    w = check_mode_weights(weights)
    given = [(name, s, wi) for name, s, wi in zip(("dense", "sparse", "colbert"), (dense, sparse, colbert), w,
                                                  strict=True) if s is not None]
    if not given:
        raise ValueError("weighted_sum: give at least one of dense, sparse, colbert")
    for name, s, _ in given:
        if not hasattr(s, "shape") or not jnp.issubdtype(s.dtype, jnp.floating):
            raise TypeError(f"weighted_sum: {name} must be a float array, got {type(s).__name__}")
        if s.shape != given[0][1].shape:
            raise ValueError(f"weighted_sum: {name} has shape {tuple(s.shape)}, {given[0][0]} has "
                             f"{tuple(given[0][1].shape)}")
    denom = sum(wi for _, _, wi in given)
    if normalize and denom == 0:
        raise ValueError(f"weighted_sum: normalize=True needs weights that do not sum to 0, got {weights!r}")
    return _weighted_sum(tuple(s for _, s, _ in given), tuple(wi for _, _, wi in given),
                         denom if normalize else 1.0)


@functools.partial(jax.jit, static_argnames=("weights", "denom"))
def _weighted_sum(scores, weights, denom):
    total = sum(wi * s.astype(jnp.float32) for s, wi in zip(scores, weights, strict=True))
    return total / denom if denom != 1.0 else total


__all__ = ["VOCAB_SIZE", "colbert_all_pairs", "colbert_paired", "dense_all_pairs", "dense_paired",
           "lexical_all_pairs", "lexical_paired", "weighted_sum"]
