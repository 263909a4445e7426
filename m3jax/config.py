"""Model configuration: one frozen dataclass, built from an HF `config.json` or a named size."""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

# HF config keys that describe behaviour m3jax does not implement, with the only value accepted.
_REQUIRED = {
    "position_embedding_type": "absolute",
    "hidden_act": "gelu",
    "is_decoder": False,
    "add_cross_attention": False,
}
_SUPPORTED_MODEL_TYPES = ("xlm-roberta", "roberta")


class ConfigError(ValueError):
    """A config.json that m3jax cannot honour."""


@dataclasses.dataclass(frozen=True)
class M3Config:
    """XLM-RoBERTa encoder plus the BGE-M3 heads.

    Attributes:
      vocab_size: rows of the word embedding (250,002 for BGE-M3).
      hidden_size: model width D.
      num_layers: number of post-LN encoder layers.
      num_heads: attention heads; head_dim = hidden_size // num_heads.
      intermediate_size: feed-forward width F.
      max_position_embeddings: rows of the position table; real tokens start at pad_token_id + 1, so the longest
        input is max_position_embeddings - pad_token_id - 1 tokens (8,192 for BGE-M3).
      type_vocab_size: rows of the token-type table (only row 0 is ever used).
      layer_norm_eps: epsilon of every LayerNorm (1e-5 in BGE-M3; XLMRobertaConfig's class default is 1e-12).
      pad_token_id, bos_token_id, eos_token_id, unk_token_id: special ids of the XLM-R tokenizer.
      colbert_dim: output width of the ColBERT head (hidden_size in the release).
      hidden_dropout_prob, attention_probs_dropout_prob: dropout rates used in training (0.1 in the release);
        inference never applies dropout.
    """

    vocab_size: int = 250002
    hidden_size: int = 1024
    num_layers: int = 24
    num_heads: int = 16
    intermediate_size: int = 4096
    max_position_embeddings: int = 8194
    type_vocab_size: int = 1
    layer_norm_eps: float = 1e-5
    pad_token_id: int = 1
    bos_token_id: int = 0
    eos_token_id: int = 2
    unk_token_id: int = 3
    colbert_dim: int = 1024
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1

    def __post_init__(self):
        if self.hidden_size % self.num_heads:
            raise ConfigError(
                f"hidden_size {self.hidden_size} is not divisible by num_attention_heads {self.num_heads}"
            )
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "intermediate_size", "colbert_dim"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        for name in ("hidden_dropout_prob", "attention_probs_dropout_prob"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        if self.max_length <= 0:
            raise ConfigError(
                f"max_position_embeddings {self.max_position_embeddings} leaves no room for tokens after the "
                f"pad_token_id + 1 = {self.pad_token_id + 1} offset"
            )

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def max_length(self) -> int:
        """Longest input in tokens, `<s>` and `</s>` included."""
        return self.max_position_embeddings - self.pad_token_id - 1

    @property
    def special_ids(self) -> tuple[int, ...]:
        """Ids the lexical head drops, as FlagEmbedding does: cls/bos, eos, pad, unk."""
        return (self.bos_token_id, self.eos_token_id, self.pad_token_id, self.unk_token_id)

    # ----------------------------------------------------------------------------------------------- named sizes
    @classmethod
    def bge_m3(cls) -> M3Config:
        """BAAI/bge-m3: 24 x 1024 x 4096, 16 heads, 8,194 positions."""
        return cls()

    @classmethod
    def tiny(cls, **overrides: Any) -> M3Config:
        """A 2-layer, 32-wide model with the real vocabulary, for tests."""
        kw = dict(hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64, max_position_embeddings=8194,
                  colbert_dim=32)
        kw.update(overrides)
        return cls(**kw)

    # ------------------------------------------------------------------------------------------ HF config.json
    @classmethod
    def from_hf_config(cls, hf: dict[str, Any], colbert_dim: int | None = None) -> M3Config:
        """Builds the config from an HF `config.json` dict; raises ConfigError for what m3jax cannot run.

        colbert_dim: width of the ColBERT head; None or <= 0 means hidden_size, as FlagEmbedding's colbert_dim=-1.
        """
        model_type = hf.get("model_type")
        if model_type not in _SUPPORTED_MODEL_TYPES:
            raise ConfigError(f"model_type {model_type!r} is not supported (expected one of {_SUPPORTED_MODEL_TYPES})")
        problems = [
            f"{key}={hf[key]!r} (only {want!r} is supported)"
            for key, want in _REQUIRED.items()
            if key in hf and hf[key] != want
        ]
        missing = [k for k in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                               "vocab_size", "max_position_embeddings") if k not in hf]
        if missing:
            problems.append(f"missing keys {missing}")
        if problems:
            raise ConfigError("unsupported config: " + "; ".join(problems))
        hidden = int(hf["hidden_size"])
        return cls(
            vocab_size=int(hf["vocab_size"]),
            hidden_size=hidden,
            num_layers=int(hf["num_hidden_layers"]),
            num_heads=int(hf["num_attention_heads"]),
            intermediate_size=int(hf["intermediate_size"]),
            max_position_embeddings=int(hf["max_position_embeddings"]),
            type_vocab_size=int(hf.get("type_vocab_size", 1)),
            # transformers' XLMRobertaConfig default; the release sets 1e-5 explicitly.
            layer_norm_eps=float(hf.get("layer_norm_eps", 1e-12)),
            pad_token_id=int(hf.get("pad_token_id", 1)),
            bos_token_id=int(hf.get("bos_token_id", 0)),
            eos_token_id=int(hf.get("eos_token_id", 2)),
            unk_token_id=int(hf.get("unk_token_id", 3)),
            colbert_dim=hidden if colbert_dim is None or colbert_dim <= 0 else int(colbert_dim),
            hidden_dropout_prob=float(hf.get("hidden_dropout_prob", 0.1)),
            attention_probs_dropout_prob=float(hf.get("attention_probs_dropout_prob", 0.1)),
        )

    @classmethod
    def from_json_file(cls, path: str | os.PathLike, colbert_dim: int | None = None) -> M3Config:
        try:
            with open(path, encoding="utf-8") as f:
                hf = json.load(f)
        except FileNotFoundError:
            raise ConfigError(f"{path}: config.json not found") from None
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: not valid JSON ({e})") from None
        try:
            return cls.from_hf_config(hf, colbert_dim=colbert_dim)
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None

    def to_hf_config(self) -> dict[str, Any]:
        """The release's `config.json` for this size (what FlagEmbedding / transformers load)."""
        return {
            "architectures": ["XLMRobertaModel"],
            "model_type": "xlm-roberta",
            "attention_probs_dropout_prob": self.attention_probs_dropout_prob,
            "bos_token_id": self.bos_token_id,
            "classifier_dropout": None,
            "eos_token_id": self.eos_token_id,
            "hidden_act": "gelu",
            "hidden_dropout_prob": self.hidden_dropout_prob,
            "hidden_size": self.hidden_size,
            "initializer_range": 0.02,
            "intermediate_size": self.intermediate_size,
            "layer_norm_eps": self.layer_norm_eps,
            "max_position_embeddings": self.max_position_embeddings,
            "num_attention_heads": self.num_heads,
            "num_hidden_layers": self.num_layers,
            "output_past": True,
            "pad_token_id": self.pad_token_id,
            "position_embedding_type": "absolute",
            "torch_dtype": "float32",
            "type_vocab_size": self.type_vocab_size,
            "use_cache": True,
            "vocab_size": self.vocab_size,
        }
