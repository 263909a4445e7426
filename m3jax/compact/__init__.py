"""Compact outputs: smaller vectors for big corpora.

- quantize: int8 (calibrated ranges) and binary codes, sentence-transformers' `quantize_embeddings` encodings.
- muvera: MUVERA fixed-dimensional encodings of ColBERT vectors (one vector per passage), fastembed's algorithm.
- formats: what each output becomes inside the jitted encode step (dtype, int8, binary, MUVERA).
- corpus: a float corpus made compact in one call (the arguments of a CorpusIndex).
- pooling: ColBERT token pooling (PyLate's `pool_factor`), Ward clustering of each passage's vectors.
"""

from m3jax.compact import formats
from m3jax.compact.corpus import compact_corpus, stored_bytes
from m3jax.compact.muvera import MuveraConfig, fde
from m3jax.compact.pooling import pool_tokens
from m3jax.compact.quantize import PRECISIONS, dequantize_int8, hamming_scores, int8_ranges, quantize, unpack_bits

__all__ = ["PRECISIONS", "MuveraConfig", "compact_corpus", "dequantize_int8", "fde", "formats", "hamming_scores",
           "int8_ranges", "pool_tokens", "quantize", "stored_bytes", "unpack_bits"]
