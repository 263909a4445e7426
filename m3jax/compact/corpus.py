"""A float corpus (an EncodeResult's padded arrays) made compact in one call: the arguments of a CorpusIndex.

`m3jax eval` and benchmarks/compact_fidelity.py use it to score the same embeddings under every setting; a corpus
embedded by `m3jax embed` with compact outputs reads back already compact (EmbeddingReader.to_index).
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

from m3jax.compact import formats
from m3jax.compact.muvera import MuveraConfig, fde
from m3jax.compact.pooling import pool_tokens
from m3jax.compact.quantize import int8_ranges

DENSE_FORMATS = ("float", "int8", "binary")
COLBERT_FORMATS = ("float", "int8")


def compact_corpus(dense: Any = None, colbert: Any = None, colbert_mask: Any = None, *, dense_format: str = "float",
                   colbert_format: str = "float", pool_factor: int = 1, muvera: MuveraConfig | None = None,
                   calibration: dict[str, Any] | None = None) -> dict[str, Any]:
    """CorpusIndex keyword arguments for dense [N, D] and colbert [N, T, C] with colbert_mask [N, T] (either may be
    None) stored as asked: dense "float", "int8" or "binary"; ColBERT pooled by pool_factor, then "float" or "int8";
    muvera: FDEs of the unpooled ColBERT vectors added. int8 ranges come from calibration ({"dense": [M, D],
    "colbert": [M, C]} vectors), by default from the corpus itself (sentence-transformers' default)."""
    if dense_format not in DENSE_FORMATS:
        raise ValueError(f"dense_format must be one of {DENSE_FORMATS}, got {dense_format!r}")
    if colbert_format not in COLBERT_FORMATS:
        raise ValueError(f"colbert_format must be one of {COLBERT_FORMATS}, got {colbert_format!r}")
    out: dict[str, Any] = {"dense_format": dense_format, "colbert_format": colbert_format}
    ranges: dict[str, np.ndarray] = {}
    cpu = jax.devices("cpu")[0]
    with jax.default_device(cpu):
        if dense is not None:
            dense = np.asarray(dense, np.float32)
            out["dense_dim"] = dense.shape[1]
            fmt: Any = "float32" if dense_format == "float" else dense_format
            if dense_format == "int8":
                ranges["dense"] = _ranges(calibration, "dense", dense)
                fmt = formats.Int8(ranges["dense"])
            out["dense"] = np.asarray(formats.apply(dense, fmt))
        if colbert is not None:
            colbert, colbert_mask = np.asarray(colbert, np.float32), np.asarray(colbert_mask, bool)
            if muvera is not None:
                out["muvera"], out["muvera_config"] = np.asarray(fde(colbert, colbert_mask, muvera)), muvera
            if pool_factor > 1:
                colbert, colbert_mask = _pooled(colbert, colbert_mask, pool_factor)
            if colbert_format == "int8":
                ranges["colbert"] = _ranges(calibration, "colbert", colbert[colbert_mask])
                colbert = np.asarray(formats.apply(colbert, formats.Int8(ranges["colbert"])))
            out["colbert"], out["colbert_mask"] = colbert, colbert_mask
    if ranges:
        out["int8_ranges"] = ranges
    return out


def stored_bytes(index_kwargs: dict[str, Any]) -> dict[str, float]:
    """Bytes per passage of each stored representation of compact_corpus' output: dense, colbert (the real vectors,
    not the padding; float vectors counted at float16, as `m3jax embed` stores ColBERT by default) and muvera
    (float32)."""
    out = {}
    if "dense" in index_kwargs:
        d = index_kwargs["dense"]
        out["dense"] = float(d.shape[1] * (4 if index_kwargs["dense_format"] == "float" else 1))
    if "colbert" in index_kwargs:
        per_vector = index_kwargs["colbert"].shape[2] * (2 if index_kwargs["colbert_format"] == "float" else 1)
        out["colbert"] = float(index_kwargs["colbert_mask"].sum(1).mean() * per_vector)
    if "muvera" in index_kwargs:
        out["muvera"] = float(index_kwargs["muvera"].shape[1] * 4)
    return out


def _ranges(calibration: dict | None, head: str, corpus: np.ndarray) -> np.ndarray:
    source = corpus if calibration is None or head not in calibration else np.asarray(calibration[head], np.float32)
    return np.asarray(int8_ranges(source))


def _pooled(colbert: np.ndarray, mask: np.ndarray, pool_factor: int) -> tuple[np.ndarray, np.ndarray]:
    rows = [pool_tokens(colbert[i][mask[i]], pool_factor) for i in range(len(colbert))]
    t = max(1, max((len(r) for r in rows), default=1))
    out = np.zeros((len(rows), t, colbert.shape[2]), np.float32)
    new_mask = np.zeros((len(rows), t), bool)
    for i, r in enumerate(rows):
        out[i, :len(r)], new_mask[i, :len(r)] = r, True
    return out, new_mask


__all__ = ["COLBERT_FORMATS", "DENSE_FORMATS", "compact_corpus", "stored_bytes"]
