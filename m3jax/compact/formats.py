"""Output formats of the encode step: what each head becomes on the device before it is copied to the host.

A format is one of
- a dtype name, "float32" or "float16": the vectors cast;
- "binary": dense vectors as sentence-transformers' binary codes (int8 [.., ceil(D / 8)]);
- Int8(ranges): vectors as int8 codes of these calibration ranges ([2, D], see quantize.int8_ranges);
- a MuveraConfig, for the "muvera" output: the FDE of the ColBERT vectors (float32).
Every format is hashable (an Int8 hashes its ranges' bytes), so formats are static arguments of the jitted step and
part of its cache key.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from m3jax.compact.quantize import quantize

DENSE_PRECISIONS = ("float32", "float16", "int8", "binary")
COLBERT_PRECISIONS = ("float32", "float16", "int8")


class Int8:
    """int8 codes of calibration ranges [2, D] (min and max per dimension); hashable by value."""

    def __init__(self, ranges: Any):
        self.ranges = np.array(ranges, np.float32)
        if self.ranges.ndim != 2 or self.ranges.shape[0] != 2:
            raise ValueError(f"int8 ranges must have shape (2, D) (min and max per dimension), got "
                             f"{self.ranges.shape}")
        if not np.isfinite(self.ranges).all() or (self.ranges[1] < self.ranges[0]).any():
            raise ValueError("int8 ranges must be finite with min <= max in every dimension")
        self.ranges.setflags(write=False)
        self._key = (self.ranges.shape, self.ranges.tobytes())

    def __hash__(self) -> int:
        return hash(self._key)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Int8) and self._key == other._key

    def __repr__(self) -> str:
        return f"Int8(ranges of dim {self.ranges.shape[1]})"


def apply(x: jax.Array, fmt: Any) -> jax.Array:
    """x [..., D] float vectors in format fmt (a dtype name, "binary" or Int8)."""
    if isinstance(fmt, Int8):
        return quantize(x, "int8", fmt.ranges)
    if fmt == "binary":
        return quantize(x, "binary")
    return x.astype(jnp.dtype(fmt))


def apply_on_host(x: Any, fmt: Any) -> np.ndarray:
    """apply on the host's CPU, for vectors already on the host (pooled ColBERT vectors, queries of an index)."""
    with jax.default_device(jax.devices("cpu")[0]):
        return np.asarray(apply(jnp.asarray(x, jnp.float32), fmt))


def stored_dim(fmt: Any, dim: int) -> int:
    """The trailing size of vectors of size dim in format fmt (binary: ceil(dim / 8) bytes)."""
    return -(-dim // 8) if fmt == "binary" else dim


def stored_dtype(fmt: Any) -> str:
    """The numpy dtype of the stored values."""
    return "int8" if isinstance(fmt, Int8) or fmt in ("int8", "binary") else str(fmt)


__all__ = ["COLBERT_PRECISIONS", "DENSE_PRECISIONS", "Int8", "apply", "apply_on_host", "stored_dim", "stored_dtype"]
