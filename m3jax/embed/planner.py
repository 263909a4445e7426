"""Windowed bucketing: a shard's rows are cut into windows of consecutive rows (at most `window` texts and
`window_tokens` tokens), and each window is sorted and batched on its own by the engine's planner (length buckets,
token budget, spare rows carrying shorter texts). Padding stays near a global sort's while memory stays bounded by
the window, and the windows depend only on the input and the settings, so a rerun plans exactly the same batches.
"""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass
class Window:
    """Consecutive rows [start, start + n) of shard `shard`, tokenised and planned."""

    shard: int
    start: int  # input position of the first row
    ids: list[str]  # [n] row ids
    lengths: np.ndarray  # [n] int64 token counts (the texts' own: without MCLS's inserted <s>)
    truncated: np.ndarray  # [n] bool
    empty: int  # rows whose text is ""
    batches: list  # m3jax.pipeline.Batch, indices into this window

    @property
    def n(self) -> int:
        return len(self.ids)


@dataclasses.dataclass(frozen=True)
class ShardEnd:
    """All windows of shard `shard` (rows [start, start + rows)) have been sent."""

    shard: int
    start: int
    rows: int
    input_sha256: str = ""  # of the shard's input rows (ids and texts): a resume checks them against it


def split_by_tokens(lengths: np.ndarray, window_tokens: int) -> list[tuple[int, int]]:
    """Consecutive [a, b) ranges, each of at most window_tokens tokens (a longer text goes alone)."""
    out, a, total = [], 0, 0
    for i, n in enumerate(lengths.tolist()):
        if i > a and total + n > window_tokens:
            out.append((a, i))
            a, total = i, 0
        total += n
    if a < len(lengths):
        out.append((a, len(lengths)))
    return out


def plan_windows(encoder, shard: int, start: int, rows: list, *, max_length: int, batch_size: int,
                 window_tokens: int, mcls_interval: int | None = None) -> list[Window]:
    """Tokenises up to `window` rows and cuts them into token-bounded windows with their batches (of
    insert_cls layouts with mcls_interval: planned on their lengths, inserted tokens included)."""
    token_ids, truncated = encoder.tokenizer.encode([t for _, t in rows], max_length)
    lengths = np.array([len(x) for x in token_ids], dtype=np.int64)
    token_ids = encoder.insert_cls(token_ids, mcls_interval)
    padded = np.array([len(x) for x in token_ids], dtype=np.int64)
    out = []
    for a, b in split_by_tokens(padded, window_tokens):
        plan = encoder.plan(padded[a:b], batch_size=batch_size)
        ids = [str(start + a + i) if rid is None else rid for i, (rid, _) in enumerate(rows[a:b])]
        out.append(Window(shard=shard, start=start + a, ids=ids, lengths=lengths[a:b], truncated=truncated[a:b],
                          empty=sum(1 for _, t in rows[a:b] if not t),
                          batches=encoder.make_batches(token_ids[a:b], plan, mcls_interval)))
    return out


def padding_ratio(lengths: np.ndarray, *, window: int, batch_size: int, max_tokens: int,
                  buckets=None) -> float:
    """Padded / real tokens when texts of these lengths are planned in windows of `window` texts (no model)."""
    from m3jax import pipeline

    buckets = buckets or pipeline.LENGTH_BUCKETS
    padded = sum(L * rows for s in range(0, len(lengths), window)
                 for L, rows, _ in pipeline.plan_batches(np.asarray(lengths[s:s + window]), batch_size=batch_size,
                                                         max_tokens=max_tokens, buckets=buckets))
    return padded / max(1, int(np.sum(lengths)))
