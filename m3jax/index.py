"""CorpusIndex: a BGE-M3 corpus held on the local device(s) for exact top-k retrieval.

The corpus arrays (the encode pipeline's padded dense / sparse_ids + sparse_weights / colbert + colbert_mask, any
subset) are padded along the passage axis with masked-out rows to a multiple of (device count x chunk) and sharded
over a 1-D mesh named "docs" (NamedSharding(mesh, P("docs"))). A search runs under shard_map: each device walks its
shard in fixed-size chunks, keeping a running top-k; the per-device results are all-gathered and merged.

Ranking is by (score descending, corpus index ascending), explicitly: within a chunk lax.top_k (documented to put
the lower index first among equal values) and every merge of partial results (chunks, devices, hybrid rerank) is a
lax.sort on the composite key (-score, index). NaN scores rank as -inf. Padding rows score -inf and sit after every
real row, so with k <= num_docs they can never be returned.

Modes: "dense", "sparse" (lexical), "colbert" (MaxSim, exhaustive) and "hybrid", the paper's pipeline: the top
`candidates` by dense (first_stage="dense") or by w0 * dense + w1 * sparse (first_stage="dense+sparse"), reranked by
w0 * dense + w1 * sparse + w2 * colbert (default weights 1, 0.3, 1; a zero weight drops that representation).

Compact corpora (m3jax.compact; queries stay float, the index quantizes them): dense as int8 codes (calibration
ranges) or binary codes, searched on the codes as sentence-transformers does (int8 dot products of the query
quantized with the same ranges; Hamming similarity), then, with rescore, the top k * rescore_multiplier re-scored
by the float query against the dequantized (int8) or unpacked {0, 1} (binary) passages; ColBERT as int8 codes,
scored dequantized; "muvera": the top `candidates` by MUVERA FDE dot product (the index encodes the query's ColBERT
vectors, fastembed's process_query), re-ranked by exact MaxSim when the index holds ColBERT vectors and rescore.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from m3jax import compact, scoring
from m3jax._io import atomic_dir
from m3jax.compact import MuveraConfig, formats
from m3jax.compact.corpus import COLBERT_FORMATS, DENSE_FORMATS
from m3jax.scoring import VOCAB_SIZE

MODES = ("dense", "sparse", "colbert", "hybrid", "muvera")
FIRST_STAGES = ("dense", "dense+sparse")
FIELDS = ("dense", "sparse_ids", "sparse_weights", "colbert", "colbert_mask", "muvera")
GROUPS = {"dense": ("dense",), "sparse": ("sparse_ids", "sparse_weights"), "colbert": ("colbert", "colbert_mask"),
          "muvera": ("muvera",)}
DIMS = {"dense": "[N, D]", "sparse_ids": "[N, K]", "sparse_weights": "[N, K]", "colbert": "[N, T, C]",
        "colbert_mask": "[N, T]", "muvera": "[N, F]"}
RESCORE_MULTIPLIER = 4  # sentence-transformers' semantic_search_faiss / _usearch default
CHUNK_SIZE = 512
FORMAT = "m3jax.CorpusIndex"
FORMAT_VERSION = 1
_NO_INDEX = np.iinfo(np.int32).max


class _Plan(NamedTuple):
    """Everything static about one search; the jit cache key together with the mesh."""
    mode: str
    k: int
    candidates: int
    first_stage: str
    weights: tuple[float, float, float]
    zero_floor: bool
    chunk: int
    vocab_size: int
    dense_format: str = "float"
    colbert_format: str = "float"
    dense_dim: int = 0  # binary: the real bit count


def _check_field(field: str, x: Any, dims: str, vocab_size: int, label: str | None = None, codes: bool = False
                 ) -> None:
    """Rank and dtype of one of FIELDS; label names it in errors (default: the field). codes: int8 codes."""
    label = label or field
    if codes:
        scoring.check_codes(label, x, dims)
    elif field == "sparse_ids":
        scoring.check_ids(label, x, dims, vocab_size)
    elif field == "sparse_weights":
        scoring.check_weights(label, x, dims)
    elif field == "colbert_mask":
        scoring.check_mask(label, x, dims)
    else:
        scoring.check_vectors(label, x, dims)


def _groups_given(arrays: Mapping[str, Any], who: str) -> tuple[str, ...]:
    given = []
    for group, names in GROUPS.items():
        present = [n for n in names if arrays.get(n) is not None]
        if present and len(present) != len(names):
            missing = sorted(set(names) - set(present))
            raise ValueError(f"{who}: {present[0]!r} given without {missing[0]!r}; the {group} representation "
                             f"needs {' and '.join(names)}")
        if present:
            given.append(group)
    return tuple(given)


def _pad_rows(x: np.ndarray, rows: int) -> np.ndarray:
    if rows == x.shape[0]:
        return x
    fill = -1 if np.issubdtype(x.dtype, np.integer) else 0
    return np.pad(x, [(0, rows - x.shape[0])] + [(0, 0)] * (x.ndim - 1), constant_values=fill)


class CorpusIndex:
    """A corpus on device for top-k search. Build it from the padded arrays; any subset of the representations.

    Args:
      dense: [N, D] float32 / bfloat16.
      sparse_ids, sparse_weights: [N, K] int32 (-1 = padding) and float32.
      colbert, colbert_mask: [N, T, C] float32 / bfloat16 and [N, T] bool.
      doc_ids: optional [N] ints or strings returned by search instead of corpus positions.
      texts: optional [N] passage texts, for re-ranking a search with a cross-encoder (search's `rerank`).
      devices: devices to shard over; default jax.local_devices().
      chunk_size: passages scored per step per device (bounds the memory of a search).
      vocab_size: the id range of sparse_ids.
      dtype: storage dtype for dense and colbert ("float32" or "bfloat16"); default: as given. Scores accumulate in
        float32 either way.
      muvera: [N, F] MUVERA FDEs of the passages (m3jax.compact.fde), with muvera_config, for mode "muvera".
      dense_format: "float"; "int8": dense holds int8 codes of int8_ranges["dense"]; "binary": dense holds binary
        codes [N, ceil(dense_dim / 8)] (m3jax.compact.quantize).
      colbert_format: "float"; "int8": colbert holds int8 codes of int8_ranges["colbert"].
      dense_dim: binary only, the vectors' real size (default 8 x the code bytes).
    """

    def __init__(self, dense: Any = None, sparse_ids: Any = None, sparse_weights: Any = None, colbert: Any = None,
                 colbert_mask: Any = None, *, muvera: Any = None, doc_ids: Sequence | np.ndarray | None = None,
                 devices: Sequence[jax.Device] | None = None, chunk_size: int = CHUNK_SIZE,
                 vocab_size: int = VOCAB_SIZE, dtype: Any = None, texts: Sequence[str] | None = None,
                 dense_format: str = "float", colbert_format: str = "float", dense_dim: int | None = None,
                 int8_ranges: Mapping[str, Any] | None = None, muvera_config: MuveraConfig | None = None):
        given = {"dense": dense, "sparse_ids": sparse_ids, "sparse_weights": sparse_weights, "colbert": colbert,
                 "colbert_mask": colbert_mask, "muvera": muvera}
        self.groups = _groups_given(given, "CorpusIndex")
        if not self.groups:
            raise ValueError("CorpusIndex: give at least one representation (dense, sparse_ids + sparse_weights, "
                             "colbert + colbert_mask, muvera)")
        self._set_formats(dense_format, colbert_format, dense_dim, int8_ranges, muvera_config, given)
        arrays = {name: x for name, x in given.items() if x is not None}
        for name, x in arrays.items():
            _check_field(name, x, DIMS[name], vocab_size, codes=name in self._coded())
        arrays = {name: np.asarray(x) for name, x in arrays.items()}
        first = next(iter(arrays))
        self.num_docs = arrays[first].shape[0]
        for name, x in arrays.items():
            scoring.check_dim("passage count N", first, self.num_docs, name, x.shape[0])
        if self.num_docs == 0:
            raise ValueError("CorpusIndex: empty corpus (0 passages); an index needs at least one")
        if "sparse_ids" in arrays and arrays["sparse_ids"].shape != arrays["sparse_weights"].shape:
            raise ValueError(f"sparse_ids and sparse_weights must have one shape [N, K], got "
                             f"{arrays['sparse_ids'].shape} and {arrays['sparse_weights'].shape}")
        if "colbert" in arrays and arrays["colbert_mask"].shape != arrays["colbert"].shape[:2]:
            raise ValueError(f"colbert_mask: expected shape {arrays['colbert'].shape[:2]} (colbert's [N, T]), got "
                             f"{arrays['colbert_mask'].shape}")
        if dtype is not None:
            dt = jnp.dtype(dtype)
            if dt not in scoring.VECTOR_DTYPES:
                raise TypeError(f"CorpusIndex: dtype must be float32 or bfloat16, got {dtype!r}")
            arrays = {n: x.astype(dt) if n in ("dense", "colbert") and n not in self._coded() else x
                      for n, x in arrays.items()}
        if "sparse_ids" in arrays:
            arrays["sparse_ids"] = arrays["sparse_ids"].astype(np.int32)

        self.doc_ids = None
        if doc_ids is not None:
            ids = np.asarray(doc_ids)
            if ids.ndim != 1 or ids.shape[0] != self.num_docs:
                raise ValueError(f"doc_ids: expected shape ({self.num_docs},) (one per passage), got {ids.shape}")
            if ids.dtype.kind not in "iuU":
                raise TypeError(f"doc_ids: expected ints or strings, got dtype {ids.dtype}")
            self.doc_ids = ids
        self.texts = None
        if texts is not None:
            self.texts = list(texts)
            if len(self.texts) != self.num_docs:
                raise ValueError(f"texts: expected {self.num_docs} (one per passage), got {len(self.texts)}")
            bad = next((i for i, t in enumerate(self.texts) if not isinstance(t, str)), None)
            if bad is not None:
                raise TypeError(f"texts[{bad}]: expected a string, got {type(self.texts[bad]).__name__}")

        self.devices = tuple(devices) if devices is not None else tuple(jax.local_devices())
        if not self.devices:
            raise ValueError("CorpusIndex: devices is empty")
        self.vocab_size = int(vocab_size)
        self.chunk_size = scoring.check_positive("chunk_size", chunk_size)
        ndev = len(self.devices)
        # One chunk shape per index; a small corpus gets a small chunk instead of mostly padding.
        self.chunk = min(self.chunk_size, -(-self.num_docs // ndev))
        rows = -(-self.num_docs // (ndev * self.chunk)) * self.chunk  # per device
        self.mesh = Mesh(np.array(self.devices), ("docs",))
        sharding = NamedSharding(self.mesh, P("docs"))
        arrays["valid"] = np.ones(self.num_docs, bool)
        self.corpus = {name: jax.device_put(_pad_rows(x, ndev * rows), sharding) for name, x in arrays.items()}

    def _set_formats(self, dense_format: str, colbert_format: str, dense_dim: int | None, int8_ranges, muvera_config,
                     given: dict) -> None:
        if dense_format not in DENSE_FORMATS:
            raise ValueError(f"CorpusIndex: dense_format must be one of {DENSE_FORMATS}, got {dense_format!r}")
        if colbert_format not in COLBERT_FORMATS:
            raise ValueError(f"CorpusIndex: colbert_format must be one of {COLBERT_FORMATS}, got {colbert_format!r}")
        self.dense_format, self.colbert_format = dense_format, colbert_format
        self.int8_ranges: dict[str, np.ndarray] = {}
        for head, fmt in (("dense", dense_format), ("colbert", colbert_format)):
            if fmt == "int8":
                if int8_ranges is None or head not in int8_ranges:
                    raise ValueError(f"CorpusIndex: {head}_format='int8' needs int8_ranges[{head!r}] (the [2, dim] "
                                     "calibration ranges the codes were made with)")
                self.int8_ranges[head] = formats.Int8(int8_ranges[head]).ranges
        self.dense_dim = None
        if given.get("dense") is not None:
            width = given["dense"].shape[-1]
            self.dense_dim = int(dense_dim or 8 * width) if dense_format == "binary" else int(width)
            if -(-self.dense_dim // 8) != width and dense_format == "binary":
                raise ValueError(f"CorpusIndex: binary dense codes of {width} bytes cannot hold dense_dim="
                                 f"{self.dense_dim} bits")
            if dense_format == "int8":
                scoring.check_dim("dense dim D", "int8_ranges['dense']", self.int8_ranges["dense"].shape[1], "dense",
                                  width)
        if colbert_format == "int8" and given.get("colbert") is not None:
            scoring.check_dim("ColBERT dim C", "int8_ranges['colbert']", self.int8_ranges["colbert"].shape[1],
                              "colbert", given["colbert"].shape[-1])
        if (given.get("muvera") is None) != (muvera_config is None):
            raise ValueError("CorpusIndex: muvera (the FDEs) and muvera_config (their MuveraConfig) go together")
        if muvera_config is not None:
            scoring.check_dim("MUVERA FDE size F", "muvera_config.out_dim", muvera_config.out_dim, "muvera",
                              given["muvera"].shape[-1])
        self.muvera_config = muvera_config

    def _coded(self) -> tuple[str, ...]:
        """The fields that hold int8 codes."""
        return tuple(h for h, f in (("dense", self.dense_format), ("colbert", self.colbert_format)) if f != "float")

    # -------------------------------------------------------------------------------------------- properties
    @property
    def dims(self) -> dict[str, int]:
        """Trailing sizes a query must match: D (dense) and C (colbert)."""
        out = {}
        if "dense" in self.corpus:
            out["dense"] = self.dense_dim
        if "colbert" in self.corpus:
            out["colbert"] = self.corpus["colbert"].shape[2]
        return out

    def __repr__(self) -> str:
        shapes = ", ".join(f"{n}={tuple(a.shape[1:])}:{a.dtype}" for n, a in self.corpus.items() if n != "valid")
        return f"CorpusIndex(num_docs={self.num_docs}, {shapes}, devices={len(self.devices)})"

    # -------------------------------------------------------------------------------------------- search
    def search(self, queries: Mapping[str, Any] | Any, k: int, mode: str = "dense", *, candidates: int = 100,
               first_stage: str = "dense", weights: Sequence[float] = (1.0, 0.3, 1.0), zero_floor: bool = False,
               batch_size: int = 16, rerank: Any = None, rerank_depth: int = 100,
               query_texts: Sequence[str] | None = None, rescore: bool = True,
               rescore_multiplier: int = RESCORE_MULTIPLIER) -> tuple[np.ndarray, np.ndarray]:
        """Top-k passages for each query.

        Args:
          queries: a dict (or an object with these attributes) of the query arrays the mode needs: dense [Q, D];
            sparse_ids, sparse_weights [Q, Kq]; colbert [Q, Tq, C], colbert_mask [Q, Tq].
          k: results per query, 1 <= k <= num_docs.
          mode: "dense", "sparse", "colbert", "hybrid" or "muvera" (an index with FDEs; queries give their ColBERT
            vectors, which the index encodes).
          candidates: hybrid and muvera; first-stage candidates per query (raised to k, capped at num_docs).
          first_stage: hybrid only; "dense" or "dense+sparse" (w0 * dense + w1 * sparse).
          weights: (dense, sparse, colbert) weights of the hybrid rerank; not normalised.
          zero_floor: ColBERT per-token max floored at 0 (FlagEmbedding compute_score) instead of the plain max.
          batch_size: queries per device step (padded; one compiled shape).
          rerank: a cross-encoder (m3jax.FlagReranker, or anything with FlagEmbedding's
            `compute_score(pairs) -> list of floats`): the mode's top rerank_depth passages (at least k) are scored
            with it against query_texts and the index's texts, and the top k of those scores returned.
          query_texts: [Q] the queries' texts, with rerank.
          rescore: int8 or binary dense: re-score the top k * rescore_multiplier by the code search with the float
            query (else the code scores are the result); muvera: re-rank the FDE candidates by exact MaxSim (when
            the index holds ColBERT vectors).
        Returns:
          (scores [Q, k] float32, ids [Q, k]): doc_ids if the index has them, else int32 corpus positions; ranked by
          score descending, ties by lower corpus position (with rerank: its scores, ties by first-stage rank).
        """
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; expected one of {MODES}")
        if isinstance(k, bool) or not isinstance(k, int | np.integer) or k <= 0:
            raise ValueError(f"k must be a positive int, got {k!r}")
        if k > self.num_docs:
            raise ValueError(f"k={k} is larger than the corpus ({self.num_docs} passages)")
        if first_stage not in FIRST_STAGES:
            raise ValueError(f"unknown first_stage {first_stage!r}; expected one of {FIRST_STAGES}")
        w = scoring.check_mode_weights(weights)
        batch = scoring.check_positive("batch_size", batch_size)
        cand = scoring.check_positive("candidates", candidates)
        multiplier = scoring.check_positive("rescore_multiplier", rescore_multiplier)
        if mode == "muvera" and "muvera" not in self.groups:
            raise ValueError("mode 'muvera' needs an index built with muvera FDEs (and muvera_config)")
        if rerank is not None:
            k_final, k = int(k), min(max(scoring.check_positive("rerank_depth", rerank_depth), int(k)),
                                     self.num_docs)
        # Two-stage searches of compact corpora run as a hybrid plan: first stage, then exact re-scoring.
        if mode == "dense" and self.dense_format != "float" and rescore:
            mode, first_stage, w, cand = "hybrid", "dense", (1.0, 0.0, 0.0), int(k) * multiplier
        elif mode == "muvera" and rescore and "colbert" in self.groups:
            mode, first_stage, w = "hybrid", "muvera", (0.0, 0.0, 1.0)
        hybrid = mode == "hybrid"  # options a mode ignores are normalised away: one compiled search per real plan
        needed = self._needed(mode, first_stage, w)
        q = self._queries(queries, needed)
        nq = q["n"]
        del q["n"]
        if rerank is not None:
            self._check_rerank(rerank, query_texts, nq)
        plan = _Plan(mode=mode, k=int(k), candidates=min(max(cand, int(k)), self.num_docs) if hybrid else 0,
                     first_stage=first_stage if hybrid else "", weights=w if hybrid else (1.0, 1.0, 1.0),
                     zero_floor=bool(zero_floor) and "colbert" in needed, chunk=self.chunk,
                     vocab_size=self.vocab_size, dense_format=self.dense_format, colbert_format=self.colbert_format,
                     dense_dim=self.dense_dim or 0)
        consts = {f"{h}_ranges": jnp.asarray(r) for h, r in self.int8_ranges.items() if h in needed}
        if nq == 0:
            k = k_final if rerank is not None else k
            empty_ids = np.zeros((0, k), self.doc_ids.dtype if self.doc_ids is not None else np.int32)
            return np.zeros((0, k), np.float32), empty_ids
        corpus = {name: self.corpus[name] for name in (*(n for g in needed for n in GROUPS[g]), "valid")}
        batch = min(batch, nq)
        scores, idx = [], []
        for start in range(0, nq, batch):
            block = {name: _pad_rows(x[start:start + batch], batch) for name, x in q.items()}
            s, i = _search_block(corpus, block, consts, mesh=self.mesh, plan=plan)
            n = min(batch, nq - start)
            scores.append(np.asarray(s)[:n])
            idx.append(np.asarray(i)[:n])
        scores, idx = np.concatenate(scores), np.concatenate(idx)
        if idx.min() < 0 or idx.max() >= self.num_docs:  # padding rows rank last; reaching one is a bug
            raise RuntimeError(f"search returned a padding row (index {int(idx.max())} >= {self.num_docs})")
        if rerank is not None:
            scores, idx = self._reranked(rerank, query_texts, idx, k_final)
        return scores, (self.doc_ids[idx] if self.doc_ids is not None else idx)

    def _check_rerank(self, rerank: Any, query_texts: Sequence[str] | None, nq: int) -> None:
        if not callable(getattr(rerank, "compute_score", None)):
            raise TypeError(f"rerank: expected a re-ranker with compute_score(pairs) (m3jax.FlagReranker), got "
                            f"{type(rerank).__name__}")
        if self.texts is None:
            raise ValueError("rerank needs the passages' texts: build the index with texts=[...] (one per passage)")
        if query_texts is None or len(query_texts) != nq:
            raise ValueError(f"rerank needs query_texts, one per query ({nq}), got "
                             f"{'none' if query_texts is None else len(query_texts)}")

    def _reranked(self, rerank: Any, query_texts: Sequence[str], idx: np.ndarray, k: int
                  ) -> tuple[np.ndarray, np.ndarray]:
        """The first stage's candidates idx [Q, depth] re-scored by the cross-encoder; its top k per query."""
        from m3jax.reranker import rerank_candidates

        ranked = rerank_candidates(rerank, query_texts, [[self.texts[j] for j in row] for row in idx], k)
        return (np.stack([s for _, s in ranked]).astype(np.float32),
                np.stack([row[order] for row, (order, _) in zip(idx, ranked, strict=True)]))

    def _needed(self, mode: str, first_stage: str, w: tuple[float, float, float]) -> tuple[str, ...]:
        if mode == "hybrid":
            needed = set(_FIRST_GROUPS[first_stage])
            needed |= {g for g, wi in zip(("dense", "sparse", "colbert"), w, strict=True) if wi != 0}
        else:
            needed = {mode}
        missing = [g for g in GROUPS if g in needed and g not in self.groups]
        if missing:
            raise ValueError(f"mode {mode!r} needs the {missing[0]} representation, which this index does not hold "
                             f"(it holds: {', '.join(self.groups)})")
        return tuple(g for g in GROUPS if g in needed)

    def _queries(self, queries: Any, needed: tuple[str, ...]) -> dict[str, Any]:
        def get(name):
            return queries.get(name) if isinstance(queries, Mapping) else getattr(queries, name, None)

        out, first = {}, None
        for group in needed:
            for name in GROUPS["colbert" if group == "muvera" else group]:  # the index encodes the FDEs
                x = get(name)
                if x is None:
                    raise ValueError(f"queries: this search needs {' and '.join(GROUPS[group])}; {name!r} is missing")
                label = f"queries[{name!r}]"
                _check_field(name, x, DIMS[name].replace("N", "Q"), self.vocab_size, label)
                x = np.asarray(x)
                if first is None:
                    first = (label, x.shape[0])
                scoring.check_dim("query count Q", first[0], first[1], label, x.shape[0])
                out[name] = x
        if "dense" in out:
            scoring.check_dim("dense dim D", "the index", self.dims["dense"], "queries['dense']", out["dense"].shape[1])
        if "colbert" in out:
            dim = self.dims["colbert"] if "colbert" in needed else self.muvera_config.dim
            scoring.check_dim("ColBERT dim C", "the index", dim, "queries['colbert']", out["colbert"].shape[2])
            if out["colbert_mask"].shape != out["colbert"].shape[:2]:
                raise ValueError(f"queries['colbert_mask']: expected shape {out['colbert'].shape[:2]}, got "
                                 f"{out['colbert_mask'].shape}")
        if "sparse_ids" in out:
            if out["sparse_ids"].shape != out["sparse_weights"].shape:
                raise ValueError(f"queries['sparse_ids'] and queries['sparse_weights'] must have one shape, got "
                                 f"{out['sparse_ids'].shape} and {out['sparse_weights'].shape}")
            out["sparse_ids"] = out["sparse_ids"].astype(np.int32)
        if "muvera" in needed:
            with jax.default_device(jax.devices("cpu")[0]):
                out["muvera"] = np.asarray(compact.fde(jnp.asarray(out["colbert"], jnp.float32), out["colbert_mask"],
                                                       self.muvera_config, query=True))
            if "colbert" not in needed:
                del out["colbert"], out["colbert_mask"]
        if "dense" in out and self.dense_format != "float":
            fmt = formats.Int8(self.int8_ranges["dense"]) if self.dense_format == "int8" else "binary"
            out["dense_codes"] = formats.apply_on_host(out["dense"], fmt)
        out["n"] = first[1]
        return out

    # -------------------------------------------------------------------------------------------- save / load
    def save(self, path: str | os.PathLike, *, overwrite: bool = False) -> Path:
        """Writes `path/` (arrays.npz + meta.json) through a temporary sibling directory renamed at the end."""
        arrays, dtypes = {}, {}
        for name, x in self.corpus.items():
            if name == "valid":
                continue
            host = np.asarray(x)[: self.num_docs]
            dtypes[name] = str(host.dtype)
            arrays[name] = host.view(np.uint16) if host.dtype == jnp.bfloat16 else host
        if self.doc_ids is not None:
            arrays["doc_ids"] = self.doc_ids
        arrays.update({f"{h}_ranges": r for h, r in self.int8_ranges.items()})
        meta = {"format": FORMAT, "version": FORMAT_VERSION, "num_docs": self.num_docs, "dtypes": dtypes,
                "chunk_size": self.chunk_size, "vocab_size": self.vocab_size, "has_doc_ids": self.doc_ids is not None,
                "dense_format": self.dense_format, "colbert_format": self.colbert_format, "dense_dim": self.dense_dim,
                "muvera_config": dataclasses.asdict(self.muvera_config) if self.muvera_config else None}
        with atomic_dir(path, overwrite) as tmp:
            for fname, write in (("arrays.npz", lambda f: np.savez(f, **arrays)),
                                 ("meta.json", lambda f: f.write(json.dumps(meta, indent=1).encode()))):
                with open(tmp / fname, "wb") as f:
                    write(f)
                    f.flush()
                    os.fsync(f.fileno())
        return Path(path)

    @classmethod
    def load(cls, path: str | os.PathLike, *, devices: Sequence[jax.Device] | None = None,
             chunk_size: int | None = None) -> CorpusIndex:
        """Reads a directory written by save(); devices / chunk_size override the saved layout."""
        path = Path(path)
        try:
            meta = json.loads((path / "meta.json").read_text())
        except FileNotFoundError:
            raise FileNotFoundError(f"{path}: not a CorpusIndex directory (no meta.json)") from None
        if meta.get("format") != FORMAT or meta.get("version") != FORMAT_VERSION:
            raise ValueError(f"{path}: meta.json is not {FORMAT} version {FORMAT_VERSION} "
                             f"(format={meta.get('format')!r}, version={meta.get('version')!r})")
        with np.load(path / "arrays.npz", allow_pickle=False) as npz:
            arrays = {name: npz[name] for name in npz.files}
        for name, dt in meta["dtypes"].items():
            if name not in arrays:
                raise ValueError(f"{path}: arrays.npz lacks {name!r}")
            if dt == "bfloat16":
                arrays[name] = arrays[name].view(jnp.bfloat16)
        doc_ids = arrays.pop("doc_ids", None)
        muvera = meta.get("muvera_config")
        return cls(**{name: arrays.get(name) for name in FIELDS}, doc_ids=doc_ids, devices=devices,
                   chunk_size=chunk_size or meta["chunk_size"], vocab_size=meta["vocab_size"],
                   dense_format=meta.get("dense_format", "float"), colbert_format=meta.get("colbert_format", "float"),
                   dense_dim=meta.get("dense_dim"), muvera_config=MuveraConfig(**muvera) if muvera else None,
                   int8_ranges={h: arrays[f"{h}_ranges"] for h in ("dense", "colbert") if f"{h}_ranges" in arrays})


# ------------------------------------------------------------------------------------------------ device code
def _canonical(s: jax.Array) -> jax.Array:
    """NaN -> -inf and -0.0 -> 0.0, so equal-looking scores compare equal and tie-break by index."""
    return jnp.where(jnp.isnan(s), -jnp.inf, jnp.where(s == 0, 0.0, s))


def _top_k_by_key(scores: jax.Array, idx: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    """[B, M] scores and corpus indices -> the first k by (score desc, index asc): [B, k], [B, k]."""
    neg, idx = jax.lax.sort((-scores, idx), dimension=-1, num_keys=2)
    return -neg[:, :k], idx[:, :k]


def _stream_top_k(score_fn, corpus: dict, b: int, k: int, chunk: int, offset: jax.Array):
    """Running top-k over this device's rows in chunks: ([B, k] scores, [B, k] corpus positions).

    score_fn(chunk_corpus) -> [B, chunk] scores of the B queries against one chunk of rows.
    """
    rows = corpus["valid"].shape[0]
    steps = rows // chunk
    xs = {name: a.reshape(steps, chunk, *a.shape[1:]) for name, a in corpus.items()}
    kk = min(k, chunk)

    def step(carry, inp):
        i, xc = inp
        s = jnp.where(xc["valid"][None], _canonical(score_fn(xc)), -jnp.inf)
        v, j = jax.lax.top_k(s, kk)  # lax.top_k puts the lower index first among equal values
        j = j.astype(jnp.int32) + offset + i * chunk
        best = _top_k_by_key(jnp.concatenate([carry[0], v], 1), jnp.concatenate([carry[1], j], 1), k)
        return best, None

    init = (jnp.full((b, k), -jnp.inf, jnp.float32), jnp.full((b, k), _NO_INDEX, jnp.int32))
    best, _ = jax.lax.scan(step, init, (jnp.arange(steps, dtype=jnp.int32), xs))
    return best


def _merge_devices(vals: jax.Array, idx: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    vals = jax.lax.all_gather(vals, "docs", axis=1, tiled=True)  # [B, devices * k]
    idx = jax.lax.all_gather(idx, "docs", axis=1, tiled=True)
    return _top_k_by_key(vals, idx, k)


_FIRST_GROUPS = {"dense": ("dense",), "dense+sparse": ("dense", "sparse"), "muvera": ("muvera",)}


def _dense_codes_block(plan: _Plan, q: dict, codes: jax.Array) -> jax.Array:
    """First-stage scores [B, P] of a compact dense chunk: int8 dot products of the codes, or equal bits."""
    if plan.dense_format == "binary":
        return compact.hamming_scores(q["dense_codes"], codes, plan.dense_dim)
    return jnp.einsum("qd,pd->qp", q["dense_codes"], codes, preferred_element_type=jnp.int32).astype(jnp.float32)


def _as_float(plan: _Plan, name: str, x: jax.Array, consts: dict) -> jax.Array:
    """Stored dense / ColBERT vectors as float32 for exact scoring: int8 dequantized, binary unpacked to {0, 1}."""
    fmt = plan.dense_format if name == "dense" else plan.colbert_format
    if fmt == "int8":
        return compact.dequantize_int8(x, consts[f"{name}_ranges"])
    if fmt == "binary":
        return compact.unpack_bits(x, plan.dense_dim)
    return x


def _scorer(plan: _Plan, q: dict, groups: tuple[str, ...], consts: dict):
    """score_fn for _stream_top_k: the weighted sum of the given groups' all-pairs scores."""
    w = dict(zip(("dense", "sparse", "colbert"), plan.weights, strict=True)) if len(groups) > 1 else {groups[0]: 1.0}
    if "sparse" in groups:
        table, qm = scoring.lexical_table(q["sparse_ids"], q["sparse_weights"], plan.vocab_size)

    def score(c):
        total = 0.0
        if "dense" in groups and plan.dense_format == "float":
            total = total + w["dense"] * scoring.dense_block(q["dense"], c["dense"])
        elif "dense" in groups:
            total = total + w["dense"] * _dense_codes_block(plan, q, c["dense"])
        if "muvera" in groups:
            total = total + scoring.dense_block(q["muvera"], c["muvera"])
        if "sparse" in groups:
            total = total + w["sparse"] * scoring.lexical_block(table, qm, c["sparse_ids"], c["sparse_weights"],
                                                                plan.vocab_size)
        if "colbert" in groups:
            sub = functools.partial(scoring.maxsim, q["colbert"], q["colbert_mask"], zero_floor=plan.zero_floor)
            total = total + w["colbert"] * scoring.map_chunks(
                lambda p, m: sub(_as_float(plan, "colbert", p, consts), m), (c["colbert"], c["colbert_mask"]),
                scoring.COLBERT_CHUNK)
        return total

    return score


def _rerank(plan: _Plan, q: dict, corpus: dict, local: jax.Array, consts: dict) -> jax.Array:
    """Hybrid scores of candidates [B, M] (this device's positions; others score 0, to be psum'd)."""
    rows = corpus["valid"].shape[0]
    own = (local >= 0) & (local < rows)
    li = jnp.clip(local, 0, rows - 1)
    w_dense, w_sparse, w_colbert = plan.weights
    total = jnp.zeros(local.shape, jnp.float32)
    if w_dense:
        d = jnp.einsum("bd,bmd->bm", q["dense"], _as_float(plan, "dense", corpus["dense"][li], consts),
                       precision=jax.lax.Precision.HIGHEST, preferred_element_type=jnp.float32)
        total = total + w_dense * d
    if w_sparse:
        s = scoring.lexical_pairs(q["sparse_ids"][:, None], q["sparse_weights"][:, None], corpus["sparse_ids"][li],
                                  corpus["sparse_weights"][li], plan.vocab_size)
        total = total + w_sparse * s
    if w_colbert:
        def one(args):
            qc, qmask, lj = args
            return scoring.maxsim(qc[None], qmask[None], _as_float(plan, "colbert", corpus["colbert"][lj], consts),
                                  corpus["colbert_mask"][lj], plan.zero_floor)[0]

        total = total + w_colbert * jax.lax.map(one, (q["colbert"], q["colbert_mask"], li))
    return jnp.where(own, total, 0.0)


@functools.partial(jax.jit, static_argnames=("mesh", "plan"))
def _search_block(corpus: dict, queries: dict, consts: dict, mesh: Mesh, plan: _Plan
                  ) -> tuple[jax.Array, jax.Array]:
    """One padded query block against the sharded corpus: (scores [B, k] float32, corpus positions [B, k] int32).
    consts: the int8 calibration ranges ("dense_ranges", "colbert_ranges") of coded fields, replicated."""

    def local(c, q, consts):
        offset = jax.lax.axis_index("docs").astype(jnp.int32) * c["valid"].shape[0]
        b = next(iter(q.values())).shape[0]
        if plan.mode != "hybrid":
            vals, idx = _stream_top_k(_scorer(plan, q, (plan.mode,), consts), c, b, plan.k, plan.chunk, offset)
            return _merge_devices(vals, idx, plan.k)
        first = _FIRST_GROUPS[plan.first_stage]
        vals, idx = _stream_top_k(_scorer(plan, q, first, consts), c, b, plan.candidates, plan.chunk, offset)
        _, idx = _merge_devices(vals, idx, plan.candidates)
        scores = jax.lax.psum(_rerank(plan, q, c, idx - offset, consts), "docs")
        return _top_k_by_key(_canonical(scores), idx, plan.k)

    return jax.shard_map(local, mesh=mesh, in_specs=(P("docs"), P(), P()), out_specs=(P(), P()),
                         check_vma=False)(corpus, queries, consts)


__all__ = ["CorpusIndex", "MODES"]
