"""m3jax: BGE-M3 (dense, lexical and multi-vector retrieval) in pure JAX / Flax NNX.

    from m3jax import BGEM3FlagModel          # FlagEmbedding's API, JAX underneath
    model = BGEM3FlagModel("BAAI/bge-m3")     # hub id, release directory or m3jax directory
    out = model.encode(texts, return_sparse=True, return_colbert_vecs=True)
"""

import sys

from m3jax import pipeline, scoring
from m3jax.api import BGEM3, BGEM3FlagModel
from m3jax.checkpoint import (
    CheckpointError,
    HubUnavailableError,
    convert_release,
    export_release,
    load_params,
    save_m3jax,
)
from m3jax.config import ConfigError, M3Config
from m3jax.engine import Encoder, configure_compilation_cache
from m3jax.index import CorpusIndex
from m3jax.model import BGEM3Model, ModelOutputs, forward, init_model, model_from_params
from m3jax.pipeline import EncodeResult
from m3jax.reranker import FlagReranker
from m3jax.weights import ConversionError

# The encode pipeline's module was m3jax.encode before it was named for what its callers call it; the old name is
# the same module.
encode = sys.modules["m3jax.encode"] = pipeline

__all__ = [
    "BGEM3",
    "BGEM3FlagModel",
    "BGEM3Model",
    "CheckpointError",
    "ConfigError",
    "ConversionError",
    "CorpusIndex",
    "EncodeResult",
    "Encoder",
    "FlagReranker",
    "HubUnavailableError",
    "M3Config",
    "ModelOutputs",
    "configure_compilation_cache",
    "convert_release",
    "export_release",
    "forward",
    "init_model",
    "load_params",
    "model_from_params",
    "pipeline",
    "save_m3jax",
    "scoring",
]
