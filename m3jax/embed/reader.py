"""EmbeddingReader: an `m3jax embed` output directory (local or fsspec URL) as arrays.

    r = EmbeddingReader("out/")
    r.dense(mmap="dense.npy")      # [N, D], streamed shard by shard into a memory-mapped .npy
    r.sparse_csr()                 # scipy CSR [N, vocab_size]
    vecs, offsets = r.colbert()    # [M, C] and [N + 1]: row i's vectors are vecs[offsets[i]:offsets[i + 1]]
    index = r.to_index()           # CorpusIndex with the row ids as doc_ids
    for table in r.iter_shards(): ...   # pyarrow Tables, in input order

Compact outputs (`m3jax embed --dense-dtype int8|binary --colbert-dtype int8 --pool-factor --muvera`) read as stored:
int8 or binary codes (`compact` says which, `int8_ranges` gives the calibration ranges), `muvera()` the FDEs; the
index built by to_index scores them as CorpusIndex does (code search, then rescoring; MUVERA, then MaxSim).
"""

from __future__ import annotations

import os
import posixpath
from collections.abc import Iterator, Sequence

import numpy as np

from m3jax.embed import writer


class EmbeddingReader:
    def __init__(self, path: str | os.PathLike):
        import fsspec

        self.path = str(path)
        self.fs, self.root = fsspec.core.url_to_fs(self.path)
        manifest = writer.read_json(self.fs, posixpath.join(self.root, writer.MANIFEST))
        if manifest is None:
            raise FileNotFoundError(f"{self.path}: no {writer.MANIFEST}; not an m3jax embed output, or its job has "
                                    "not finished (rerun it to complete)")
        if manifest.get("format") != writer.FORMAT or manifest.get("version") != writer.VERSION:
            raise ValueError(f"{self.path}: format {manifest.get('format')!r} version {manifest.get('version')!r}, "
                             f"expected {writer.FORMAT!r} version {writer.VERSION}")
        self.manifest = manifest
        self.outputs = tuple(manifest["settings"]["outputs"])
        self.dims = dict(manifest["dims"])
        self.vocab_size = int(manifest["vocab_size"])
        settings = manifest["settings"]
        self.compact = manifest.get("compact") or {"dense": settings["dense_dtype"],
                                                    "colbert": settings["colbert_dtype"], "pool_factor": 1,
                                                    "muvera": None}

    @property
    def int8_ranges(self) -> dict[str, np.ndarray]:
        """{"dense" / "colbert": [2, dim] float32} the calibration ranges of the int8 outputs (queries are quantized
        with these; embed(int8_ranges=...) gives them to another corpus)."""
        return {h: np.asarray(r, np.float32) for h, r in self.compact.get("int8_ranges", {}).items()}

    @property
    def muvera_config(self):
        """The MuveraConfig of the muvera column, or None."""
        from m3jax.compact import MuveraConfig

        cfg = self.compact.get("muvera")
        return MuveraConfig(**cfg) if cfg else None

    def __len__(self) -> int:
        return int(self.manifest["rows"])

    def __repr__(self) -> str:
        return (f"EmbeddingReader({self.path!r}, rows={len(self)}, shards={len(self.manifest['shards'])}, "
                f"outputs={self.outputs})")

    # -------------------------------------------------------------------------------------------- streaming
    def iter_shards(self, columns: Sequence[str] | None = None) -> Iterator:
        """One pyarrow Table per shard, in input order; each checked against the manifest's row count."""
        import pyarrow.parquet as pq

        for s in self.manifest["shards"]:
            path = posixpath.join(self.root, s["file"])
            with self.fs.open(path, "rb") as f:
                table = pq.read_table(f, columns=list(columns) if columns else None)
            if table.num_rows != s["rows"]:
                raise ValueError(f"{path}: {table.num_rows} rows, the manifest says {s['rows']}")
            yield table

    def iter_dense(self, dtype: str | None = None) -> Iterator[np.ndarray]:
        """[n_k, D] per shard (binary: [n_k, ceil(D / 8)] codes)."""
        self._need("dense")
        dt = self._dtype("dense", dtype)
        for t in self.iter_shards(["dense"]):
            yield _fixed(t.column("dense"), self._width("dense")).astype(dt, copy=False)

    # ---------------------------------------------------------------------------------------------- arrays
    def ids(self) -> np.ndarray:
        """[N] str."""
        return np.array([x for t in self.iter_shards(["id"]) for x in t.column("id").to_pylist()], dtype=str)

    def lengths(self) -> np.ndarray:
        """[N] int32 token counts (with `<s>` and `</s>`)."""
        return self._scalar("tokens", np.int32)

    def truncated(self) -> np.ndarray:
        """[N] bool."""
        return self._scalar("truncated", bool)

    def dense(self, dtype: str | None = None, *, mmap: str | os.PathLike | None = None) -> np.ndarray:
        """[N, D] (the stored dtype unless dtype is given; int8 and binary codes as stored, int8 [N, D] and
        [N, ceil(D / 8)]). mmap: a local .npy path, filled shard by shard and returned memory-mapped, so the host
        never holds more than one shard."""
        self._need("dense")
        dt = self._dtype("dense", dtype)
        shape = (len(self), self._width("dense"))
        out = np.lib.format.open_memmap(os.fspath(mmap), mode="w+", dtype=dt, shape=shape) if mmap else \
            np.empty(shape, dt)
        i = 0
        for d in self.iter_dense():
            out[i:i + len(d)] = d
            i += len(d)
        if mmap:
            out.flush()
        return out

    def sparse_csr(self, vocab_size: int | None = None):
        """scipy.sparse.csr_matrix [N, vocab_size] float32 of lexical weights (indices sorted per row)."""
        import pyarrow.compute as pc
        import scipy.sparse

        self._need("sparse")
        ids, wts, counts = [], [], []
        for t in self.iter_shards(["sparse_ids", "sparse_weights"]):
            col = t.column("sparse_ids").combine_chunks()
            counts.append(pc.list_value_length(col).to_numpy(zero_copy_only=False))
            ids.append(pc.list_flatten(col).to_numpy(zero_copy_only=False))
            wts.append(pc.list_flatten(t.column("sparse_weights").combine_chunks()).to_numpy(zero_copy_only=False))
        counts = np.concatenate(counts) if counts else np.zeros(0, np.int64)
        indptr = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        m = scipy.sparse.csr_matrix((_cat(wts, np.float32), _cat(ids, np.int32), indptr),
                                    shape=(len(self), vocab_size or self.vocab_size))
        m.sort_indices()
        return m

    def sparse_padded(self) -> tuple[np.ndarray, np.ndarray]:
        """(ids [N, K] int32 -1 padded, weights [N, K] float32), entries in stored order (first occurrence)."""
        import pyarrow.compute as pc

        self._need("sparse")
        flat_i, flat_w, counts = [], [], []
        for t in self.iter_shards(["sparse_ids", "sparse_weights"]):
            col = t.column("sparse_ids").combine_chunks()
            counts.append(pc.list_value_length(col).to_numpy(zero_copy_only=False))
            flat_i.append(pc.list_flatten(col).to_numpy(zero_copy_only=False))
            flat_w.append(pc.list_flatten(t.column("sparse_weights").combine_chunks()).to_numpy(zero_copy_only=False))
        counts = np.concatenate(counts).astype(np.int64) if counts else np.zeros(0, np.int64)
        return _pad(_cat(flat_i, np.int32), counts, -1), _pad(_cat(flat_w, np.float32), counts, 0)

    def colbert(self, dtype: str | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(vectors [M, C], offsets [N + 1] int64): row i's vectors are vectors[offsets[i]:offsets[i + 1]]."""
        import pyarrow.compute as pc

        self._need("colbert")
        C = self.dims["colbert"]
        vecs, counts = [], []
        for t in self.iter_shards(["colbert"]):
            col = t.column("colbert").combine_chunks()
            counts.append(pc.list_value_length(col).to_numpy(zero_copy_only=False))
            vecs.append(_fixed(pc.list_flatten(col), C))
        dt = self._dtype("colbert", dtype)
        counts = np.concatenate(counts).astype(np.int64) if counts else np.zeros(0, np.int64)
        flat = np.concatenate(vecs).astype(dt, copy=False) if vecs else np.zeros((0, C), dt)
        return flat, np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)

    def colbert_padded(self, dtype: str | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(colbert [N, T, C] zero padded, mask [N, T] bool), as EncodeResult holds them (float32 unless stored as
        int8 codes, or dtype is given)."""
        if dtype is None and self.compact["colbert"] != "int8":
            dtype = "float32"
        flat, offsets = self.colbert(dtype)
        counts = np.diff(offsets)
        T = int(counts.max(initial=1))
        out = np.zeros((len(counts), T, flat.shape[1]), flat.dtype)
        mask = np.arange(T)[None, :] < counts[:, None]
        out[mask] = flat
        return out, mask

    def to_index(self, outputs: Sequence[str] | None = None, **kwargs):
        """A CorpusIndex over the stored representations (or `outputs` of them), doc_ids = the row ids.
        kwargs go to CorpusIndex (devices, chunk_size, dtype)."""
        from m3jax.index import CorpusIndex

        outputs = tuple(outputs or self.outputs + (("muvera",) if self.muvera_config else ()))
        for h in outputs:
            self._need(h)
        arrays, c = {}, self.compact
        if "dense" in outputs:
            arrays["dense"] = self.dense(None if c["dense"] in ("int8", "binary") else "float32")
            kwargs.update(dense_format="float" if c["dense"].startswith("float") else c["dense"],
                          dense_dim=self.dims["dense"])
        if "sparse" in outputs:
            arrays["sparse_ids"], arrays["sparse_weights"] = self.sparse_padded()
        if "colbert" in outputs:
            arrays["colbert"], arrays["colbert_mask"] = self.colbert_padded()
            kwargs["colbert_format"] = "int8" if c["colbert"] == "int8" else "float"
        if "muvera" in outputs:
            arrays["muvera"], kwargs["muvera_config"] = self.muvera(), self.muvera_config
        kwargs.setdefault("vocab_size", self.vocab_size)
        return CorpusIndex(**arrays, doc_ids=self.ids(), int8_ranges=self.int8_ranges or None, **kwargs)

    def muvera(self) -> np.ndarray:
        """[N, F] float32 MUVERA FDEs (an output embedded with muvera=MuveraConfig(...))."""
        self._need("muvera")
        parts = [_fixed(t.column("muvera"), self.muvera_config.out_dim) for t in self.iter_shards(["muvera"])]
        return _cat(parts, np.float32).reshape(-1, self.muvera_config.out_dim)

    # ------------------------------------------------------------------------------------------------ helpers
    def _scalar(self, name: str, dtype) -> np.ndarray:
        parts = [t.column(name).to_numpy() for t in self.iter_shards([name])]
        return np.concatenate(parts).astype(dtype) if parts else np.zeros(0, dtype)

    def _width(self, head: str) -> int:
        from m3jax.compact import formats

        return formats.stored_dim(self.compact[head], self.dims[head])

    def _dtype(self, head: str, dtype: str | None) -> np.dtype:
        """The dtype to read a head as: as stored unless given; codes cannot be read as floats."""
        stored = self.compact[head]
        if stored in ("int8", "binary"):
            if dtype is not None and np.dtype(dtype) != np.int8:
                hint = ("m3jax.compact.dequantize_int8(codes, reader.int8_ranges[...])" if stored == "int8" else
                        "m3jax.compact.unpack_bits(codes, dim)")
                raise ValueError(f"{self.path}: {head} is stored as {stored} codes; read them as int8 (dtype=None) "
                                 f"and decode with {hint}")
            return np.dtype(np.int8)
        return np.dtype(dtype or stored)

    def _need(self, head: str) -> None:
        if head == "muvera":
            if self.muvera_config is None:
                raise ValueError(f"{self.path}: has no muvera output; embed with muvera=MuveraConfig(...) "
                                 "(--muvera)")
            return
        if head not in self.outputs:
            raise ValueError(f"{self.path}: has no {head} output (it holds {', '.join(self.outputs)}); rerun with "
                             f"--outputs including {head}")


def _fixed(col, dim: int) -> np.ndarray:
    """A fixed_size_list<float>[dim] column (chunked or not) as [n, dim]."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks()
    return pc.list_flatten(col).to_numpy(zero_copy_only=False).reshape(-1, dim)


def _cat(parts: list, dtype) -> np.ndarray:
    return np.concatenate(parts).astype(dtype, copy=False) if parts else np.zeros(0, dtype)


def _pad(flat: np.ndarray, counts: np.ndarray, fill) -> np.ndarray:
    K = int(counts.max(initial=0))
    out = np.full((len(counts), K), fill, flat.dtype)
    out[np.arange(K)[None, :] < counts[:, None]] = flat
    return out
