"""Where the corpus job's outputs go. WindowOutputs gathers a window's batches back into input order (the Beam
handler uses it too); ShardSink writes windows into shard files: a shard's windows, in order, into its temporary
file, renamed when the shard ends, dropped if the run fails first. One process, several independent ones, and
several in lockstep (m3jax.engine.Encoder over a global mesh) all write through the same two.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from m3jax import pipeline
from m3jax.compact import formats, pool_tokens
from m3jax.embed import writer
from m3jax.embed.planner import ShardEnd, Window


class WindowOutputs:
    """A window's outputs gathered batch by batch (ragged ones flat, already in the file dtypes), then put back in
    input order: as Arrow columns (a shard's) or as one dict per row (a Beam result's)."""

    def __init__(self, w: Window, settings: Any, colbert_format: Any = None):
        """colbert_format: the stored ColBERT format applied here, after pooling (settings.pool_factor > 1), to the
        float32 vectors the device sent; None: settings.colbert_dtype."""
        self.window, self.settings = w, settings
        self.colbert_format = settings.colbert_dtype if colbert_format is None else colbert_format
        self.got = 0
        self.idx: list[np.ndarray] = []
        self.dense: list[np.ndarray] = []
        self.sparse: list[tuple] = []
        self.colbert: list[tuple] = []
        self.muvera: list[np.ndarray] = []

    @property
    def complete(self) -> bool:
        return self.got == len(self.window.batches)

    def add(self, batch, out) -> None:
        """out: the engine's EncodeOutputs for batch, trimmed to its real rows (None for heads not computed)."""
        self.got += 1
        idx = np.asarray(batch.indices)
        self.idx.append(idx)
        rows = pipeline.unpad(out, self.window.lengths[idx])
        if rows.dense is not None:  # in its stored format on the device already
            self.dense.append(rows.dense.astype(formats.stored_dtype(self.settings.dense_dtype), copy=False))
        if rows.muvera is not None:
            self.muvera.append(rows.muvera.astype(np.float32, copy=False))
        if rows.sparse_ids is not None:
            self.sparse.append((np.diff(rows.sparse_offsets), rows.sparse_ids, rows.sparse_weights))
        if rows.colbert is not None:
            counts, vecs = np.diff(rows.colbert_offsets), rows.colbert
            pool = getattr(self.settings, "pool_factor", 1)
            if pool > 1:
                pooled = [pool_tokens(rows.colbert_row(r), pool) for r in range(len(counts))]
                counts = np.array([len(p) for p in pooled], np.int64)
                vecs = np.concatenate(pooled) if pooled else vecs[:0]
                vecs = formats.apply_on_host(vecs, self.colbert_format)
            self.colbert.append((counts, vecs.astype(formats.stored_dtype(self.settings.colbert_dtype),
                                                     copy=False)))

    def arrays(self) -> dict[str, np.ndarray]:
        """Input order: dense [n, d]; ragged outputs flat with their offsets [n + 1] ("sparse_offsets",
        "colbert_offsets")."""
        perm = np.argsort(np.concatenate(self.idx), kind="stable")  # batch-order position of input row i
        out = {}
        if self.dense:
            out["dense"] = np.concatenate(self.dense)[perm]
        if self.muvera:
            out["muvera"] = np.concatenate(self.muvera)[perm]
        if self.sparse:
            counts = np.concatenate([c for c, _, _ in self.sparse])
            out["sparse_ids"], out["sparse_offsets"] = _ragged_take(
                np.concatenate([i for _, i, _ in self.sparse]), counts, perm)
            out["sparse_weights"], _ = _ragged_take(np.concatenate([x for _, _, x in self.sparse]), counts, perm)
        if self.colbert:
            counts = np.concatenate([c for c, _ in self.colbert])
            out["colbert"], out["colbert_offsets"] = _ragged_take(np.concatenate([v for _, v in self.colbert]),
                                                                  counts, perm)
        return out

    def columns(self) -> dict:
        """The window's rows as a shard's Arrow columns (writer.schema)."""
        import pyarrow as pa

        w, a = self.window, self.arrays()
        cols = {"id": pa.array(w.ids, pa.string()), "tokens": pa.array(w.lengths.astype(np.int32)),
                "truncated": pa.array(w.truncated.astype(bool))}
        if "dense" in a:
            d = a["dense"]
            cols["dense"] = pa.FixedSizeListArray.from_arrays(pa.array(d.reshape(-1)), d.shape[1])
        if "muvera" in a:
            m = a["muvera"]
            cols["muvera"] = pa.FixedSizeListArray.from_arrays(pa.array(m.reshape(-1)), m.shape[1])
        if "sparse_ids" in a:
            cols["sparse_ids"] = writer.ragged(a["sparse_ids"], a["sparse_offsets"])
            cols["sparse_weights"] = writer.ragged(a["sparse_weights"], a["sparse_offsets"])
        if "colbert" in a:
            cols["colbert"] = writer.ragged(a["colbert"], a["colbert_offsets"], inner=a["colbert"].shape[1])
        return cols

    def rows(self) -> list[dict]:
        """The window's rows, one dict each with a shard row's fields (numpy arrays in the file dtypes)."""
        w, a = self.window, self.arrays()
        out = []
        for i in range(w.n):
            row = {"id": w.ids[i], "tokens": int(w.lengths[i]), "truncated": bool(w.truncated[i])}
            if "dense" in a:
                row["dense"] = a["dense"][i]
            if "muvera" in a:
                row["muvera"] = a["muvera"][i]
            if "sparse_ids" in a:
                lo, hi = a["sparse_offsets"][i], a["sparse_offsets"][i + 1]
                row["sparse_ids"], row["sparse_weights"] = a["sparse_ids"][lo:hi], a["sparse_weights"][lo:hi]
            if "colbert" in a:
                row["colbert"] = a["colbert"][a["colbert_offsets"][i]:a["colbert_offsets"][i + 1]]
            out.append(row)
        return out


def _ragged_take(values: np.ndarray, counts: np.ndarray, perm: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows perm of a ragged array (row i = values[starts[i]:starts[i] + counts[i]]): (values, offsets [n + 1])."""
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
    c = counts[perm].astype(np.int64)
    offsets = np.concatenate([[0], np.cumsum(c)]).astype(np.int64)
    src = np.repeat(starts[perm] - offsets[:-1], c) + np.arange(offsets[-1])
    return values[src], offsets


class ShardSink:
    """Shard files of one job in one output directory: write() a shard's windows in order (its temporary file is
    opened at its first), commit() at its ShardEnd (renamed to its final name, with the shard's counts and input
    hash), abort() drops a shard left unfinished. on_shard(info) is called after each commit."""

    def __init__(self, fs, root: str, schema, key: str, on_shard: Callable[[dict], None] | None = None):
        self.fs, self.root, self.schema, self.key, self.on_shard = fs, root, schema, key, on_shard
        self.open: writer.ShardWriter | None = None
        self.committed = 0

    def write(self, w: Window, outputs: WindowOutputs) -> int:
        """Appends window w's rows to its shard; returns the rows the shard holds so far."""
        if self.open is None:
            self.open = writer.ShardWriter(self.fs, self.root, w.shard, self.schema,
                                           {"key": self.key, "shard": w.shard, "first_row": w.start})
        self.open.write(outputs.columns(), tokens=int(w.lengths.sum()), empty=w.empty,
                        truncated=int(w.truncated.sum()))
        return self.open.rows

    def commit(self, end: ShardEnd) -> dict:
        info = self.open.commit(input_sha256=end.input_sha256)
        self.open = None
        self.committed += 1
        if self.on_shard is not None:
            self.on_shard(info)
        return info

    def abort(self) -> None:
        if self.open is not None:
            self.open.abort()
            self.open = None
