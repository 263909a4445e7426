"""m3jax: BGE-M3 (dense, lexical and multi-vector retrieval) in pure JAX / Flax NNX."""

from m3jax.checkpoint import (
    CheckpointError,
    HubUnavailableError,
    convert_release,
    export_release,
    load_params,
)
from m3jax.config import ConfigError, M3Config
from m3jax.model import BGEM3Model, forward, init_model, model_from_params
from m3jax.weights import ConversionError

__all__ = [
    "BGEM3Model",
    "CheckpointError",
    "ConfigError",
    "ConversionError",
    "HubUnavailableError",
    "M3Config",
    "convert_release",
    "export_release",
    "forward",
    "init_model",
    "load_params",
    "model_from_params",
]
