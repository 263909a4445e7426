"""The JAX-native encode pipeline: tokenise, sort by length, batch into a few static shapes, one jitted pass per
bucket for all three heads, sparse aggregation on the device, results back in input order.

Bucket scheme: a text of n tokens is padded to the smallest length in LENGTH_BUCKETS that holds it (16, 20, 24, 28,
32, 40, ... quarter-octave steps to 2,048, then every 256 tokens to 8,192: 53 lengths; on CPU every 128 past 2,048,
77 lengths; on TPU multiples of 128 from 128 on, 48 lengths; see default_length_buckets). A bucket of length L takes
rows = min(batch_size, max(1, max_tokens // L)) texts per batch (on accelerators, by default, the rows that fit
the device's memory: m3jax.engine.Encoder.rows_that_fit); its last, partial batch is padded with empty rows up to
the next of 1, 2, 3, 4, 6, 8, 12, ... (1.5x steps; on accelerators powers of two), and its spare rows carry the
next, shorter texts rather than empty padding. So a length bucket compiles at most ~2 log2(rows) shapes (log2(rows)
on accelerators), whatever the input.
"""

from __future__ import annotations

import bisect
import dataclasses
import functools
import logging
from collections.abc import Callable, Iterable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from m3jax import compact

logger = logging.getLogger("m3jax")

# Quarter-octave steps up to 2,048 (at most 25% padding, 11% on average), then every 256 tokens up to 8,192 so a
# long document pays at most 12% (and its attention at most 26%) for its padding.
LENGTH_BUCKETS = tuple(sorted({2**k * m // 4 for k in range(4, 11) for m in (4, 5, 6, 7)}
                             | set(range(2048, 8193, 256))))
# On CPU a bucket compiles in about a second and a long document's forward takes a minute or more, so past 2,048
# tokens every 128 (at most 6% padding, 13% of attention): 7,943 tokens pad to 8,064, not 8,192. On accelerators,
# where compiling costs more than the padding, the coarser LENGTH_BUCKETS stay.
CPU_LENGTH_BUCKETS = tuple(sorted(set(LENGTH_BUCKETS) | set(range(2048, 8193, 128))))
# On TPU every length from 128 on is a multiple of 128, what the splash kernel takes (shorter ones run XLA's
# attention), so no bucket falls back to a slower attention; 48 lengths.
TPU_LENGTH_BUCKETS = tuple(sorted({b for b in LENGTH_BUCKETS if b < 128}
                                          | {-(-b // 128) * 128 for b in LENGTH_BUCKETS if b >= 128}))
DEFAULT_MAX_TOKENS = 16384
HEADS = ("dense", "sparse", "colbert")
ROW_BUCKETS = tuple(sorted({2**i for i in range(12)} | {3 * 2**i for i in range(11)}))
# Accelerators: a partial batch rounds up to a power of two, half the shapes of ROW_BUCKETS' 1.5x steps; an
# accelerator compile takes seconds to tens of seconds, the padded rows a fraction of a millisecond each.
ACCELERATOR_ROW_BUCKETS = tuple(2**i for i in range(16))


def default_length_buckets(platform: str) -> tuple[int, ...]:
    """The padded lengths an Encoder on `platform` ("cpu", "gpu", "tpu") uses when given none."""
    return {"cpu": CPU_LENGTH_BUCKETS, "tpu": TPU_LENGTH_BUCKETS}.get(platform, LENGTH_BUCKETS)


def default_row_buckets(platform: str) -> tuple[int, ...]:
    """The row counts a partial batch of an Encoder on `platform` rounds up to."""
    return ROW_BUCKETS if platform == "cpu" else ACCELERATOR_ROW_BUCKETS


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
    mcls_interval: int | None = None  # the rows hold insert_cls layouts of this interval (MCLS); None: plain


def row_bucket(k: int, rows: int, row_buckets: Sequence[int] = ROW_BUCKETS) -> int:
    """Smallest allowed row count >= k: 1, 2, 3, 4, 6, 8, 12, 16, ... (ROW_BUCKETS: 1.5x steps), capped at the full
    batch."""
    for b in row_buckets:
        if b >= k:
            return min(b, rows)
    return rows


def plan_batches(lengths: np.ndarray, *, batch_size: int, max_tokens: int | None = None, row_multiple: int = 1,
                 buckets: Sequence[int] = LENGTH_BUCKETS, max_rows: Callable[[int], int] | None = None,
                 row_buckets: Sequence[int] = ROW_BUCKETS) -> list[tuple]:
    """Groups texts (by token count) into (bucket length, rows, indices) batches, longest first.

    Texts are taken longest first. A batch has the bucket length L of its longest text and rows =
    min(batch_size, max_rows(L)) texts (max_rows(L) = max_tokens // L when max_rows is None); when fewer texts of
    that bucket remain, rows round up to the next ROW_BUCKETS size and the spare rows take the next (shorter) texts
    rather than empty padding.
    row_multiple: rows of every batch are a multiple of it (the number of devices a batch is split over).
    max_rows: the most rows a batch of padded length L may have (e.g. what fits the device's memory).
    row_buckets: the row counts a partial batch rounds up to.
    """
    if max_rows is None:
        if max_tokens is None:
            raise ValueError("plan_batches needs max_tokens or max_rows")
        max_rows = lambda L: max_tokens // L  # noqa: E731
    order = np.argsort(-lengths, kind="stable")
    padded_len = np.array([length_bucket(int(n), buckets) for n in lengths[order]], dtype=np.int64)
    plan, i, n = [], 0, len(order)
    while i < n:
        L = int(padded_len[i])
        full = _round_up(max(1, min(batch_size, max_rows(L))), row_multiple)
        same = int(np.searchsorted(-padded_len[i:], -L, side="right"))  # texts left in this bucket
        rows = full if same >= full else _round_up(row_bucket(same, full, row_buckets), row_multiple)
        idx = order[i:i + rows]
        plan.append((L, rows, idx))
        i += len(idx)
    return plan


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def make_batch(ids: Sequence[np.ndarray], indices: np.ndarray, L: int, rows: int, pad_id: int,
               bos_id: int, eos_id: int, mcls_interval: int | None = None) -> Batch:
    input_ids = np.full((rows, L), pad_id, dtype=np.int32)
    input_ids[:, 0], input_ids[:, 1] = bos_id, eos_id  # filler rows: a valid empty text, so no row is all-masked
    mask = np.zeros((rows, L), dtype=np.int32)
    for r, i in enumerate(indices):
        n = len(ids[i])
        input_ids[r, :n], input_ids[r, n:] = ids[i], pad_id
        mask[r, :n] = 1
    mask[len(indices):, :2] = 1
    return Batch(indices, input_ids, mask, mcls_interval)


def pad_batch(batch: Batch, rows: int, L: int, pad_id: int, bos_id: int, eos_id: int) -> Batch:
    """The batch grown to [rows, L]: its rows padded with pad id (mask 0), filler rows added (make_batch's)."""
    r, n = batch.input_ids.shape
    if (r, n) == (rows, L):
        return batch
    if r > rows or n > L:
        raise ValueError(f"cannot pad a [{r} x {n}] batch to [{rows} x {L}]")
    filler = make_batch([], np.zeros(0, np.int64), L, rows, pad_id, bos_id, eos_id, batch.mcls_interval)
    filler.input_ids[:r, :n], filler.attention_mask[:r, :n] = batch.input_ids, batch.attention_mask
    filler.input_ids[:r, n:], filler.attention_mask[:r, n:] = pad_id, 0
    return Batch(batch.indices, filler.input_ids, filler.attention_mask, batch.mcls_interval)


# ---------------------------------------------------------------------------------------------------- MCLS
# Multiple CLS (BGE-M3 paper, appendix B.2): for long texts, a `<s>` every `interval` text tokens; the dense vector
# is the mean of the last hidden states at all of them. The layout is a function of the text's length alone, so
# the host inserts the ids (insert_cls) and the device step rebuilds the positions from the attention mask
# (mcls_positions): nothing but the interval travels with a batch.
def mcls_length(n: int, interval: int) -> int:
    """Length of an n-token text (`<s>` and `</s>` counted) after insert_cls."""
    return n + max(0, -(-(n - 2) // interval) - 1)


def insert_cls(ids: np.ndarray, interval: int, cls_id: int) -> np.ndarray:
    """`<s> t1 ... tn </s>` -> `<s> t1 ... tI <s> tI+1 ... t2I <s> ... tn </s>` (I = interval): a `<s>` before
    every block of I text tokens after the first, so the k-th `<s>` sits at position k * (I + 1). A text of at most
    I tokens between `<s>` and `</s>` is returned unchanged."""
    extra = mcls_length(len(ids), interval) - len(ids)
    return np.insert(ids, 1 + interval * np.arange(1, extra + 1), cls_id).astype(ids.dtype) if extra else ids


def mcls_positions(attention_mask: jax.Array, interval: int) -> tuple[jax.Array, jax.Array]:
    """(cls [B, T] bool, inserted [B, T] bool) of right-padded insert_cls rows: the CLS positions are 0 and every
    multiple of interval + 1 before the row's final `</s>`; inserted = cls without position 0."""
    pos = jnp.arange(attention_mask.shape[1])[None, :]
    n = attention_mask.astype(jnp.int32).sum(1, keepdims=True)
    inserted = (pos > 0) & (pos % (interval + 1) == 0) & (pos < n - 1)
    return inserted | (pos == 0), inserted


def drop_positions(x: jax.Array, drop: jax.Array) -> jax.Array:
    """x [B, S, C] with the rows' `drop` [B, S] positions removed, the rest shifted left in order, zero filled."""
    order = jnp.argsort(drop.astype(jnp.int32), axis=1, stable=True)  # kept first, each part in position order
    kept = jnp.take_along_axis(x, order[..., None], axis=1)
    left = x.shape[1] - drop.sum(1, keepdims=True)
    return jnp.where((jnp.arange(x.shape[1])[None, :] < left)[..., None], kept, 0.0)


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


class EncodeOutputs(NamedTuple):
    """One batch's requested heads (None for the others), as encode_step returns them.

    dense [B, D]; sparse_ids / sparse_weights [B, T] (see aggregate_sparse); colbert [B, T-1, C], padding zeroed.
    """

    dense: jax.Array | None = None
    sparse_ids: jax.Array | None = None
    sparse_weights: jax.Array | None = None
    colbert: jax.Array | None = None
    muvera: jax.Array | None = None  # [B, F] (an out_formats option, not a head)


class RaggedOutputs(NamedTuple):
    """One batch's outputs on the host at each row's own size (see unpad): dense [B, D]; the sparse entries and the
    ColBERT vectors of all rows concatenated, row r's at [offsets[r], offsets[r + 1]). None for heads not computed.
    """

    dense: np.ndarray | None = None
    sparse_offsets: np.ndarray | None = None  # [B + 1] int64
    sparse_ids: np.ndarray | None = None  # [sum] int32
    sparse_weights: np.ndarray | None = None  # [sum] float32
    colbert_offsets: np.ndarray | None = None  # [B + 1] int64
    colbert: np.ndarray | None = None  # [sum, C]
    muvera: np.ndarray | None = None  # [B, F]

    def sparse_row(self, r: int) -> tuple[np.ndarray, np.ndarray]:
        """Row r's (token ids, weights)."""
        a, b = self.sparse_offsets[r], self.sparse_offsets[r + 1]
        return self.sparse_ids[a:b], self.sparse_weights[a:b]

    def colbert_row(self, r: int) -> np.ndarray:
        """Row r's ColBERT vectors [lengths[r] - 1, C]."""
        return self.colbert[self.colbert_offsets[r]:self.colbert_offsets[r + 1]]


def unpad(out: EncodeOutputs, lengths: np.ndarray) -> RaggedOutputs:
    """A batch's EncodeOutputs (on the host, trimmed to its real rows) without padding: each row's sparse entries
    (ids >= 0) and its lengths[r] - 1 ColBERT vectors. lengths: the rows' token counts, `<s>` and `</s>` included.
    The one conversion of outputs to rows: EncodeResult, `m3jax embed`'s shards and the Beam handler's rows."""
    def offsets(counts):
        return np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)

    res = {"dense": out.dense, "muvera": out.muvera}
    if out.sparse_ids is not None:
        keep = out.sparse_ids >= 0
        res.update(sparse_offsets=offsets(keep.sum(1)), sparse_ids=out.sparse_ids[keep].astype(np.int32),
                   sparse_weights=out.sparse_weights[keep].astype(np.float32))
    if out.colbert is not None:
        n = np.asarray(lengths, np.int64) - 1
        if len(n) != out.colbert.shape[0]:
            raise ValueError(f"unpad: {len(n)} lengths for a batch of {out.colbert.shape[0]} rows")
        keep = np.arange(out.colbert.shape[1])[None, :] < n[:, None]
        res.update(colbert_offsets=offsets(n), colbert=out.colbert[keep])
    return RaggedOutputs(**res)


@functools.partial(jax.jit, static_argnames=("graphdef", "heads", "attn_impl", "pooling", "normalize",
                                             "truncate_dim", "special_ids", "mcls_interval", "projections",
                                             "out_formats"))
def encode_step(graphdef: nnx.GraphDef, state: nnx.State, input_ids: jax.Array, attention_mask: jax.Array, *,
                heads: tuple[str, ...], attn_impl: str = "auto", pooling: str = "cls", normalize: bool = True,
                truncate_dim: int | None = None, special_ids: tuple[int, ...] = (0, 1, 2, 3),
                mcls_interval: int | None = None, projections: str = "xla",
                out_formats: tuple[tuple[str, Any], ...] = ()) -> EncodeOutputs:
    """One padded batch through the model; returns only the requested heads (XLA prunes the rest).
    projections: see BGEM3Model. out_formats: ((output, format), ...) (see m3jax.compact.formats): "dense" and
    "colbert" cast or quantized on the device (a float16 ColBERT output is half the bytes to copy to the host, binary
    dense a 32nd), float32 otherwise; ("muvera", MuveraConfig) adds the MUVERA FDE of each row's ColBERT vectors.

    mcls_interval: the rows are insert_cls layouts of this interval. Dense is then the mean of the hidden states at
    every CLS position; sparse drops the inserted `<s>` as every special id; ColBERT drops the inserted positions,
    so a row keeps one vector per token of its text ([B, T-1, C], the removed ones moved out as zero padding).
    """
    cls = inserted = None
    if mcls_interval is not None:
        cls, inserted = mcls_positions(attention_mask, mcls_interval)
    out = nnx.merge(graphdef, state)(input_ids, attention_mask, attn_impl=attn_impl, pooling=pooling,
                                     normalize=normalize, truncate_dim=truncate_dim, cls_mask=cls,
                                     projections=projections)
    fmt = dict(out_formats)
    ids = weights = colbert = muvera = None
    if "sparse" in heads:
        ids, weights = aggregate_sparse(input_ids, out.sparse, attention_mask, special_ids)
    if "colbert" in heads or "muvera" in fmt:
        vecs = out.colbert if inserted is None else drop_positions(out.colbert, inserted[:, 1:])
        if "muvera" in fmt:
            n = attention_mask[:, 1:].astype(jnp.int32).sum(1) - (0 if inserted is None else inserted.sum(1))
            muvera = compact.fde(vecs.astype(jnp.float32), jnp.arange(vecs.shape[1])[None, :] < n[:, None],
                                 fmt["muvera"])
        if "colbert" in heads:
            colbert = compact.formats.apply(vecs, fmt.get("colbert", "float32"))
    dense = compact.formats.apply(out.dense, fmt.get("dense", "float32")) if "dense" in heads else None
    return EncodeOutputs(dense=dense, sparse_ids=ids, sparse_weights=weights, colbert=colbert, muvera=muvera)


@dataclasses.dataclass
class EncodeResult:
    """Outputs in input order, each row kept at its own size, plus converters for vector stores.

    lengths: [N] token counts including `<s>` and `</s>`; truncated: [N] bool, cut at max_length.
    dense: [N, D] float32 or None.
    sparse: per row (ids int32 unique in order of first occurrence, weights float32), or None.
    colbert_vecs: per row a [lengths[i] - 1, C] float32 array, or None.
    Nothing is padded beyond the row's own size, so one long text among many short ones costs only its own
    vectors. The padded views (sparse_ids / sparse_weights [N, K], colbert [N, T, C] + colbert_mask [N, T], what
    CorpusIndex and the scoring functions take) are built on first use.
    """

    lengths: np.ndarray
    truncated: np.ndarray
    dense: np.ndarray | None = None
    sparse: list[tuple[np.ndarray, np.ndarray]] | None = None
    colbert_vecs: list[np.ndarray] | None = None
    colbert_dim: int = 0
    vocab_size: int = 0  # the model's; what sparse_csr's columns default to
    _padded: dict = dataclasses.field(default_factory=dict, repr=False)

    def __len__(self) -> int:
        return len(self.lengths)

    # ---------------------------------------------------------------------------------------- padded views
    @property
    def sparse_ids(self) -> np.ndarray | None:
        """[N, K] int32, -1 padded (K = the most distinct ids in one row); None if sparse was not computed."""
        return None if self.sparse is None else self._sparse_padded()[0]

    @property
    def sparse_weights(self) -> np.ndarray | None:
        """[N, K] float32, 0 padded."""
        return None if self.sparse is None else self._sparse_padded()[1]

    @property
    def colbert(self) -> np.ndarray | None:
        """[N, T, C] float32, zero padded to the longest row (T = max(lengths) - 1); None if not computed."""
        return None if self.colbert_vecs is None else self._colbert_padded()[0]

    @property
    def colbert_mask(self) -> np.ndarray | None:
        """[N, T] bool, True = a real token vector."""
        return None if self.colbert_vecs is None else self._colbert_padded()[1]

    def _sparse_padded(self):
        if "sparse" not in self._padded:
            rows = self._need("sparse")
            k = max((len(i) for i, _ in rows), default=0)
            ids, w = np.full((len(rows), k), -1, np.int32), np.zeros((len(rows), k), np.float32)
            for r, (i, v) in enumerate(rows):
                ids[r, :len(i)], w[r, :len(i)] = i, v
            self._padded["sparse"] = (ids, w)
        return self._padded["sparse"]

    def _colbert_padded(self):
        if "colbert" not in self._padded:
            vecs = self._need("colbert_vecs")
            t = int(self.lengths.max(initial=2)) - 1
            out = np.zeros((len(vecs), t, self.colbert_dim), np.float32)
            for r, v in enumerate(vecs):
                out[r, :len(v)] = v
            self._padded["colbert"] = (out, np.arange(t)[None, :] < (self.lengths[:, None] - 1))
        return self._padded["colbert"]

    # ----------------------------------------------------------------------------------------- converters
    def dense_as(self, dtype: str = "float32") -> np.ndarray:
        """Dense vectors as float32 or float16."""
        if dtype not in ("float32", "float16"):
            raise ValueError(f"dense dtype must be 'float32' or 'float16', got {dtype!r}")
        return self._need("dense").astype(dtype)

    def sparse_rows(self) -> list[tuple[np.ndarray, np.ndarray]]:
        """Per row (indices int32, values float32): what Qdrant, Vespa and Milvus sparse vectors take."""
        return [(i.copy(), w.copy()) for i, w in self._need("sparse")]

    def sparse_csr(self, vocab_size: int | None = None):
        """scipy.sparse.csr_matrix [N, vocab_size] of lexical weights (indices sorted per row)."""
        import scipy.sparse

        rows = self._need("sparse")
        indptr = np.concatenate([[0], np.cumsum([len(i) for i, _ in rows])]).astype(np.int64)
        ids = np.concatenate([i for i, _ in rows]) if rows else np.zeros(0, np.int32)
        w = np.concatenate([v for _, v in rows]) if rows else np.zeros(0, np.float32)
        vocab_size = vocab_size or self.vocab_size
        if not vocab_size:
            raise ValueError("sparse_csr needs vocab_size (the model's config.vocab_size)")
        m = scipy.sparse.csr_matrix((w, ids, indptr), shape=(len(rows), vocab_size))
        m.sort_indices()
        return m

    def colbert_flat(self) -> tuple[np.ndarray, np.ndarray]:
        """(vectors [sum of n_i, C], offsets [N + 1]): row i's vectors are vectors[offsets[i]:offsets[i+1]]."""
        vecs = self._need("colbert_vecs")
        offsets = np.concatenate([[0], np.cumsum([len(v) for v in vecs])]).astype(np.int64)
        flat = np.concatenate(vecs) if vecs else np.zeros((0, self.colbert_dim), np.float32)
        return flat, offsets

    def lexical_dicts(self) -> list[dict]:
        """FlagEmbedding's lexical_weights: defaultdict(int) per text, str(token id) -> np.float32."""
        from collections import defaultdict

        return [defaultdict(int, zip(i.astype(str).tolist(), w, strict=True)) for i, w in self._need("sparse")]

    def colbert_list(self) -> list[np.ndarray]:
        """FlagEmbedding's colbert_vecs: one [n_tokens - 1, C] array per text."""
        return list(self._need("colbert_vecs"))

    def _need(self, name):
        v = getattr(self, name)
        if v is None:
            head = {"sparse": "sparse", "colbert_vecs": "colbert_vecs"}.get(name, name)
            raise ValueError(f"{name} was not computed; encode with return_{head}=True")
        return v


def collect(results: Iterable[tuple[Batch, EncodeOutputs]], n: int, lengths: np.ndarray, truncated: np.ndarray,
            heads: tuple[str, ...], dims: dict[str, int], vocab_size: int,
            progress: Any | None = None) -> EncodeResult:
    """Scatters per-batch outputs (already trimmed to each batch's real rows, on the host) into an EncodeResult.

    dims: {"dense": D, "colbert": C}, so that empty inputs still get arrays of the right shape.
    """
    res = EncodeResult(lengths=lengths, truncated=truncated, colbert_dim=dims["colbert"], vocab_size=vocab_size)
    if "dense" in heads:
        res.dense = np.zeros((n, dims["dense"]), np.float32)
    sparse: list = [None] * n if "sparse" in heads else None
    colbert: list = [None] * n if "colbert" in heads else None
    for b, out in results:
        rows = unpad(out, lengths[b.indices])
        if "dense" in heads:
            res.dense[b.indices] = rows.dense
        for r, i in enumerate(b.indices):
            if sparse is not None:
                sparse[i] = rows.sparse_row(r)
            if colbert is not None:
                colbert[i] = rows.colbert_row(r)
        if progress is not None:
            progress.update(len(b.indices))
    res.sparse, res.colbert_vecs = sparse, colbert
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
