"""The JAX-native encode pipeline: tokenise, sort by length, batch into a few static shapes, one jitted pass per
bucket for all three heads, sparse aggregation on the device, results back in input order.

Bucket scheme: a text of n tokens is padded to the smallest length in LENGTH_BUCKETS that holds it (16, 20, 24, 28,
32, 40, ... quarter-octave steps to 2,048, then every 256 tokens to 8,192: 53 lengths). A bucket of length L takes
rows = min(batch_size, max(1, max_tokens // L)) texts per batch; its last, partial batch is padded with empty rows
up to the next of 1, 2, 3, 4, 6, 8, 12, ... (1.5x steps), and its spare rows carry the next, shorter texts rather
than empty padding. So a length bucket compiles at most ~2 log2(rows) shapes, whatever the input.
"""

from __future__ import annotations

import bisect
import dataclasses
import functools
import logging
from collections.abc import Callable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

logger = logging.getLogger("m3jax")

# Quarter-octave steps up to 2,048 (at most 25% padding, 11% on average), then every 256 tokens up to 8,192 so a
# long document pays at most 12% (and its attention at most 26%) for its padding.
LENGTH_BUCKETS = tuple(sorted({2**k * m // 4 for k in range(4, 11) for m in (4, 5, 6, 7)}
                             | set(range(2048, 8193, 256))))
DEFAULT_MAX_TOKENS = 16384
HEADS = ("dense", "sparse", "colbert")
ROW_BUCKETS = tuple(sorted({2**i for i in range(12)} | {3 * 2**i for i in range(11)}))


def length_bucket(n: int, buckets: Sequence[int] = LENGTH_BUCKETS) -> int:
    """Smallest bucket length >= n."""
    i = bisect.bisect_left(buckets, n)
    if i == len(buckets):
        raise ValueError(f"{n} tokens exceed the longest bucket ({buckets[-1]})")
    return buckets[i]


@dataclasses.dataclass(frozen=True)
class Batch:
    indices: np.ndarray  # [b] positions in the input list (b <= rows)
    input_ids: np.ndarray  # [rows, L] int32, right-padded with pad id; empty rows are all padding but <s></s>
    attention_mask: np.ndarray  # [rows, L] int32


def row_bucket(k: int, rows: int) -> int:
    """Smallest allowed row count >= k: 1, 2, 3, 4, 6, 8, 12, 16, ... (1.5x steps), capped at the full batch."""
    for b in ROW_BUCKETS:
        if b >= k:
            return min(b, rows)
    return rows


def plan_batches(lengths: np.ndarray, *, batch_size: int, max_tokens: int, row_multiple: int = 1,
                 buckets: Sequence[int] = LENGTH_BUCKETS) -> list[tuple]:
    """Groups texts (by token count) into (bucket length, rows, indices) batches, longest first.

    Texts are taken longest first. A batch has the bucket length L of its longest text and rows =
    min(batch_size, max_tokens // L) texts; when fewer texts of that bucket remain, rows round up to the next
    ROW_BUCKETS size and the spare rows take the next (shorter) texts rather than empty padding.
    row_multiple: rows of every batch are a multiple of it (the number of devices a batch is split over).
    """
    order = np.argsort(-lengths, kind="stable")
    padded_len = np.array([length_bucket(int(n), buckets) for n in lengths[order]], dtype=np.int64)
    plan, i, n = [], 0, len(order)
    while i < n:
        L = int(padded_len[i])
        full = _round_up(max(1, min(batch_size, max_tokens // L)), row_multiple)
        same = int(np.searchsorted(-padded_len[i:], -L, side="right"))  # texts left in this bucket
        rows = full if same >= full else _round_up(row_bucket(same, full), row_multiple)
        idx = order[i:i + rows]
        plan.append((L, rows, idx))
        i += len(idx)
    return plan


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def make_batch(ids: Sequence[np.ndarray], indices: np.ndarray, L: int, rows: int, pad_id: int,
               bos_id: int, eos_id: int) -> Batch:
    input_ids = np.full((rows, L), pad_id, dtype=np.int32)
    input_ids[:, 0], input_ids[:, 1] = bos_id, eos_id  # filler rows: a valid empty text, so no row is all-masked
    mask = np.zeros((rows, L), dtype=np.int32)
    for r, i in enumerate(indices):
        n = len(ids[i])
        input_ids[r, :n], input_ids[r, n:] = ids[i], pad_id
        mask[r, :n] = 1
    mask[len(indices):, :2] = 1
    return Batch(indices, input_ids, mask)


def aggregate_sparse(input_ids: jax.Array, weights: jax.Array, attention_mask: jax.Array,
                     special_ids: tuple[int, ...]) -> tuple[jax.Array, jax.Array]:
    """Per row: max weight per distinct token id, special ids and non-positive weights dropped.

    Args:
      input_ids, weights, attention_mask: [B, T].
    Returns:
      ids [B, T] int32 and weights [B, T] float32, valid entries first in order of first occurrence (the order
      FlagEmbedding's dicts are built in), then -1 / 0 padding.
    """
    B, T = input_ids.shape
    big = jnp.iinfo(jnp.int32).max
    valid = attention_mask.astype(bool) & (weights > 0)
    for s in special_ids:
        valid &= input_ids != s
    pos = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    key = jnp.where(valid, input_ids, big).astype(jnp.int32)

    def one(key, pos, w):
        key, pos, w = jax.lax.sort((key, pos, w), num_keys=2)  # by id, then position
        start = jnp.concatenate([jnp.ones((1,), bool), key[1:] != key[:-1]])
        seg = jnp.cumsum(start) - 1
        seg_max = jax.ops.segment_max(w, seg, num_segments=T)
        keep = start & (key != big)
        rank = jnp.where(keep, pos, big)  # first occurrence of each id; dropped entries sort last
        _, ids, out_w = jax.lax.sort((rank, jnp.where(keep, key, -1), jnp.where(keep, seg_max[seg], 0.0)),
                                     num_keys=1)
        return ids, out_w

    return jax.vmap(one)(key, pos, weights.astype(jnp.float32))


@functools.partial(jax.jit, static_argnames=("graphdef", "heads", "attn_impl", "pooling", "normalize",
                                             "truncate_dim", "special_ids"))
def encode_step(graphdef: nnx.GraphDef, state: nnx.State, input_ids: jax.Array, attention_mask: jax.Array, *,
                heads: tuple[str, ...], attn_impl: str = "auto", pooling: str = "cls", normalize: bool = True,
                truncate_dim: int | None = None, special_ids: tuple[int, ...] = (0, 1, 2, 3)) -> dict:
    """One padded batch through the model; returns only the requested heads (XLA prunes the rest).

    Returns: dense [B, D]; sparse_ids / sparse_weights [B, T] (see aggregate_sparse); colbert [B, T-1, C].
    """
    out = nnx.merge(graphdef, state)(input_ids, attention_mask, attn_impl=attn_impl, pooling=pooling,
                                     normalize=normalize, truncate_dim=truncate_dim)
    res = {}
    if "dense" in heads:
        res["dense"] = out["dense"]
    if "sparse" in heads:
        res["sparse_ids"], res["sparse_weights"] = aggregate_sparse(input_ids, out["sparse"], attention_mask,
                                                                    special_ids)
    if "colbert" in heads:
        res["colbert"] = out["colbert"]
    return res


@dataclasses.dataclass
class EncodeResult:
    """Padded outputs in input order, plus converters for vector stores.

    dense: [N, D] float32 or None.
    sparse_ids: [N, K] int32, -1 padded, unique per row in order of first occurrence; sparse_weights: [N, K].
    colbert: [N, T, C] float32, zero padded; colbert_mask: [N, T] bool (True = a real token vector).
    lengths: [N] token counts including `<s>` and `</s>`; truncated: [N] bool, cut at max_length.
    """

    lengths: np.ndarray
    truncated: np.ndarray
    dense: np.ndarray | None = None
    sparse_ids: np.ndarray | None = None
    sparse_weights: np.ndarray | None = None
    colbert: np.ndarray | None = None
    colbert_mask: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.lengths)

    def dense_as(self, dtype: str = "float32") -> np.ndarray:
        """Dense vectors as float32 or float16."""
        if dtype not in ("float32", "float16"):
            raise ValueError(f"dense dtype must be 'float32' or 'float16', got {dtype!r}")
        return self._need("dense").astype(dtype)

    def sparse_rows(self) -> list[tuple[np.ndarray, np.ndarray]]:
        """Per row (indices int32, values float32): what Qdrant, Vespa and Milvus sparse vectors take."""
        ids, w = self._need("sparse_ids"), self.sparse_weights
        counts = (ids >= 0).sum(1)
        return [(ids[i, :c].copy(), w[i, :c].copy()) for i, c in enumerate(counts)]

    def sparse_csr(self, vocab_size: int = 250002):
        """scipy.sparse.csr_matrix [N, vocab_size] of lexical weights (indices sorted per row)."""
        import scipy.sparse

        ids, w = self._need("sparse_ids"), self.sparse_weights
        keep = ids >= 0
        indptr = np.concatenate([[0], np.cumsum(keep.sum(1))]).astype(np.int64)
        m = scipy.sparse.csr_matrix((w[keep], ids[keep], indptr), shape=(len(ids), vocab_size))
        m.sort_indices()
        return m

    def colbert_flat(self) -> tuple[np.ndarray, np.ndarray]:
        """(vectors [sum of n_i, C], offsets [N + 1]): row i's vectors are vectors[offsets[i]:offsets[i+1]]."""
        vecs, mask = self._need("colbert"), self.colbert_mask
        offsets = np.concatenate([[0], np.cumsum(mask.sum(1))]).astype(np.int64)
        return vecs[mask], offsets

    def lexical_dicts(self) -> list[dict]:
        """FlagEmbedding's lexical_weights: defaultdict(int) per text, str(token id) -> np.float32."""
        from collections import defaultdict

        ids, w = self._need("sparse_ids"), self.sparse_weights
        counts = (ids >= 0).sum(1)
        keys = ids.astype(str)
        return [defaultdict(int, zip(keys[i, :c].tolist(), w[i, :c], strict=True)) for i, c in enumerate(counts)]

    def colbert_list(self) -> list[np.ndarray]:
        """FlagEmbedding's colbert_vecs: one [n_tokens - 1, C] array per text."""
        vecs, n = self._need("colbert"), self.colbert_mask.sum(1)
        return [vecs[i, :c].copy() for i, c in enumerate(n)]

    def _need(self, name):
        v = getattr(self, name)
        if v is None:
            head = {"sparse_ids": "sparse", "colbert": "colbert_vecs"}.get(name, name)
            raise ValueError(f"{name} was not computed; encode with return_{head}=True")
        return v


def run(batches: list[Batch], step: Callable[[Batch], dict], n: int, lengths: np.ndarray,
        truncated: np.ndarray, heads: tuple[str, ...], dims: dict[str, int],
        progress: Iterator | None = None) -> EncodeResult:
    """Runs step over the batches with one batch in flight ahead (async dispatch), scattering rows back.

    dims: {"dense": D, "colbert": C}, so that empty inputs still get arrays of the right shape.
    """
    res = EncodeResult(lengths=lengths, truncated=truncated)
    if "dense" in heads:
        res.dense = np.zeros((n, dims["dense"]), np.float32)
    pending = None
    sparse_parts = []
    colbert_parts = []
    for batch in [*batches, None]:
        current = (batch, step(batch)) if batch is not None else None  # dispatched, not awaited
        if pending is not None:
            b, out = pending
            out = jax.device_get(out)
            k = len(b.indices)
            if "dense" in heads:
                res.dense[b.indices] = out["dense"][:k]
            if "sparse" in heads:
                sparse_parts.append((b.indices, out["sparse_ids"][:k], out["sparse_weights"][:k]))
            if "colbert" in heads:
                colbert_parts.append((b.indices, out["colbert"][:k]))
            if progress is not None:
                progress.update(k)
        pending = current
    if "sparse" in heads:
        K = max([int((ids >= 0).sum(1).max(initial=0)) for _, ids, _ in sparse_parts], default=0)
        res.sparse_ids = np.full((n, K), -1, np.int32)
        res.sparse_weights = np.zeros((n, K), np.float32)
        for idx, ids, w in sparse_parts:
            k = min(K, ids.shape[1])
            res.sparse_ids[idx, :k] = ids[:, :k]
            res.sparse_weights[idx, :k] = w[:, :k]
    if "colbert" in heads:
        T = int(lengths.max(initial=2)) - 1
        res.colbert = np.zeros((n, T, dims["colbert"]), np.float32)
        for idx, v in colbert_parts:
            t = min(T, v.shape[1])
            res.colbert[idx, :t] = v[:, :t]
        res.colbert_mask = np.arange(T)[None, :] < (lengths[:, None] - 1)
        res.colbert *= res.colbert_mask[..., None]
    return res


def count_shapes(lengths: Sequence[int], *, batch_size: int, max_tokens: int = DEFAULT_MAX_TOKENS,
                 buckets: Sequence[int] = LENGTH_BUCKETS) -> dict:
    """Compiled shapes and padding overhead a workload would need (no model needed)."""
    lengths = np.asarray(lengths)
    plan = plan_batches(lengths, batch_size=batch_size, max_tokens=max_tokens, buckets=buckets)
    shapes = {(L, rows) for L, rows, _ in plan}
    padded = sum(L * rows for L, rows, _ in plan)
    return {"batches": len(plan), "shapes": len(shapes), "padded_tokens": int(padded),
            "real_tokens": int(lengths.sum()), "padding_ratio": padded / max(1, int(lengths.sum())),
            "max_shapes_bound": sum(len({row_bucket(k, full) for k in range(1, full + 1)})
                                    for full in (max(1, min(batch_size, max_tokens // L)) for L in buckets))}
