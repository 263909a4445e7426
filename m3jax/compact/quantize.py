"""Smaller vectors: scalar (int8) and binary quantization, in JAX, so that they can run inside a jitted step.

The encodings are sentence-transformers' `quantize_embeddings`, value for value:
- int8: each dimension's calibration range [min, max] cut into 255 steps, floor((x - min) / step) clipped to
  [0, 255], minus 128 (uint8: without the shift). The ranges are computed once from calibration vectors
  (`int8_ranges`) and stored beside the codes: the same ranges must quantize the queries.
- binary: one bit per dimension, x > 0, packed eight to a byte, most significant bit first (numpy.packbits), minus
  128 as int8 (ubinary: the bytes as uint8).
Scores: `int8_scores` dequantizes to the bins' lower edges and takes dot products; `hamming_scores` counts equal
bits (higher is closer). A float query against binary documents (the rescoring step of binary search) is
`unpack_bits` then a dot product.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

PRECISIONS = ("float32", "int8", "uint8", "binary", "ubinary")
_BIT_WEIGHTS = np.array([128, 64, 32, 16, 8, 4, 2, 1], np.int32)


def int8_ranges(calibration: jax.Array | np.ndarray) -> jax.Array:
    """[2, D] float32: each dimension's min and max over calibration vectors [N, D]."""
    x = jnp.asarray(calibration, jnp.float32)
    return jnp.stack([x.min(0), x.max(0)])


def quantize(x: jax.Array, precision: str, ranges: jax.Array | None = None) -> jax.Array:
    """x [..., D] float -> codes: int8 / uint8 [..., D] (with ranges [2, D], from int8_ranges), binary int8 /
    ubinary uint8 [..., ceil(D / 8)], or float32 as it is."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    x = jnp.asarray(x, jnp.float32)
    if precision == "float32":
        return x
    if precision in ("int8", "uint8"):
        if ranges is None:
            raise ValueError(f"{precision} needs ranges (int8_ranges of calibration vectors)")
        ranges = jnp.asarray(ranges, jnp.float32)
        if ranges.shape != (2, x.shape[-1]):
            raise ValueError(f"ranges must have shape (2, {x.shape[-1]}), got {ranges.shape}")
        steps = (ranges[1] - ranges[0]) / 255
        steps = jnp.where(steps == 0, 1, steps)
        q = jnp.clip(jnp.floor((x - ranges[0]) / steps), 0, 255)
        return q.astype(jnp.uint8) if precision == "uint8" else (q - 128).astype(jnp.int8)
    d = x.shape[-1]
    bits = jnp.pad((x > 0).astype(jnp.int32), [(0, 0)] * (x.ndim - 1) + [(0, -d % 8)])
    packed = (bits.reshape(*bits.shape[:-1], -1, 8) * _BIT_WEIGHTS).sum(-1)
    return packed.astype(jnp.uint8) if precision == "ubinary" else (packed - 128).astype(jnp.int8)


def dequantize_int8(codes: jax.Array, ranges: jax.Array) -> jax.Array:
    """int8 codes -> float32 vectors at their bins' lower edges (min + step · (code + 128))."""
    ranges = jnp.asarray(ranges, jnp.float32)
    steps = (ranges[1] - ranges[0]) / 255
    steps = jnp.where(steps == 0, 1, steps)
    return ranges[0] + steps * (codes.astype(jnp.float32) + 128)


def unpack_bits(codes: jax.Array, dim: int) -> jax.Array:
    """binary (int8) or ubinary (uint8) codes [..., ceil(dim / 8)] -> {0, 1} float32 [..., dim]."""
    b = codes.astype(jnp.int32) + (128 if codes.dtype == jnp.int8 else 0)
    bits = (b[..., None] // _BIT_WEIGHTS) % 2
    return bits.reshape(*codes.shape[:-1], -1)[..., :dim].astype(jnp.float32)


def hamming_scores(q: jax.Array, d: jax.Array, dim: int) -> jax.Array:
    """[Q, N] equal bits between binary codes q [Q, B] and d [N, B] (dim real bits): higher is closer."""
    qb, db = unpack_bits(q, dim), unpack_bits(d, dim)
    return qb @ db.T + (1 - qb) @ (1 - db).T


__all__ = ["PRECISIONS", "dequantize_int8", "hamming_scores", "int8_ranges", "quantize", "unpack_bits"]
