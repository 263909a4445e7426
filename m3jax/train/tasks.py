"""What `fit` trains: BGE-M3 itself, or a cross-encoder re-ranker (bge-reranker-v2-m3 and its kind).

A task says how the model is read, built, batched and written; the loop, the optimiser step, checkpoints, logging and
resumption are the same for both (m3jax.train.loop). The config picks the task: TrainConfig trains BGE-M3,
RerankerTrainConfig a re-ranker.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any


class M3Task:
    """BGE-M3 (BGEM3Model, LossConfig): read from an m3jax or release directory or a hub id, written as an m3jax
    directory. Batches: q_ids, q_mask [B, Lq]; p_ids, p_mask [B·G, Lp]; optional teacher_scores [B, G]."""

    def read(self, model: str | os.PathLike) -> tuple[Any, Any, Path]:
        """(config, float32 nnx.State of host arrays, tokenizer directory)."""
        from flax import nnx

        from m3jax.checkpoint import load_pretrained
        from m3jax.model import model_from_params

        cfg, params, tok_dir = load_pretrained(model)
        _, state = nnx.split(model_from_params(cfg, params, dtype="float32"))
        return cfg, state, tok_dir

    def abstract(self, cfg: Any, dtype: str) -> Any:
        from m3jax.model import abstract_model

        return abstract_model(cfg, dtype=dtype)

    def collate_fn(self, cfg: Any) -> Any:
        from m3jax.train.data import collate

        return collate

    def batch_shapes(self, config: Any, a: int, b: int, lengths: tuple[int, ...]) -> dict[str, tuple[int, ...]]:
        """The int32 batch fields of a step of A micro-batches of B queries at padded lengths (query, passage)."""
        lq, lp = lengths
        g = config.data.train_group_size
        return {"q_ids": (a, b, lq), "q_mask": (a, b, lq), "p_ids": (a, b * g, lp), "p_mask": (a, b * g, lp)}

    def save(self, dst: Path, cfg: Any, params: Any, tok_dir: Path, metadata: dict) -> None:
        from m3jax.checkpoint import save_m3jax

        save_m3jax(dst, cfg, params, tok_dir, overwrite=True, metadata=metadata)


class RerankerTask:
    """A cross-encoder (m3jax.reranker.RerankerModel, RerankerLossConfig): read from a release-layout directory or
    hub id, written in the release layout (m3jax.reranker.export_reranker), which FlagEmbedding's FlagReranker and
    m3jax's load. Batches: ids, mask [B, G, L]; optional teacher_scores [B, G]."""

    def read(self, model: str | os.PathLike) -> tuple[Any, Any, Path]:
        from flax import nnx

        from m3jax import checkpoint
        from m3jax.reranker import read_reranker

        path = checkpoint.resolve(model)
        cfg, module = read_reranker(path, dtype="float32")
        _, state = nnx.split(module)
        return cfg, state, path

    def abstract(self, cfg: Any, dtype: str) -> Any:
        from m3jax.reranker import abstract_reranker

        return abstract_reranker(cfg, dtype=dtype)

    def collate_fn(self, cfg: Any) -> Any:
        from m3jax.train.data import collate_pairs

        return functools.partial(collate_pairs, model_cfg=cfg)

    def batch_shapes(self, config: Any, a: int, b: int, lengths: tuple[int, ...]) -> dict[str, tuple[int, ...]]:
        """The int32 batch fields of a step of A micro-batches of B groups at padded pair length L."""
        (length,) = lengths
        g = config.data.train_group_size
        return {"ids": (a, b, g, length), "mask": (a, b, g, length)}

    def save(self, dst: Path, cfg: Any, params: Any, tok_dir: Path, metadata: dict) -> None:
        from m3jax.reranker import export_reranker

        export_reranker(dst, cfg, params, tok_dir, overwrite=True, metadata=metadata)

