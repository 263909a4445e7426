"""Retrieval evaluation of BGE-M3 on BEIR-layout datasets (`m3jax eval`).

    from m3jax.evaluate import evaluate_beir
    report = evaluate_beir("path/or/fsspec-url/scifact", "BAAI/bge-m3", output="scifact.json")
    print(report.tables())

Needs the `evaluate` extra (ranx, fsspec; matplotlib for the notebook's plots).
"""

from m3jax.evaluate.data import BeirDataset, DatasetError, load_beir, passage_text
from m3jax.evaluate.metrics import DEFAULT_METRICS, check_metrics, compute_metrics, metric_label
from m3jax.evaluate.retrieve import (
    DEFAULT_WEIGHTS,
    MODES,
    build_index,
    encode_corpus,
    encode_dataset,
    encode_queries,
    heads_for,
    reciprocal_rank_fusion,
    retrieve,
)
from m3jax.evaluate.runner import EvalReport, SettingsError, evaluate_beir
from m3jax.evaluate.synthetic import synthetic_beir, write_synthetic_beir

__all__ = [
    "DEFAULT_METRICS",
    "DEFAULT_WEIGHTS",
    "MODES",
    "BeirDataset",
    "DatasetError",
    "EvalReport",
    "build_index",
    "check_metrics",
    "compute_metrics",
    "encode_corpus",
    "encode_dataset",
    "encode_queries",
    "evaluate_beir",
    "heads_for",
    "load_beir",
    "metric_label",
    "passage_text",
    "reciprocal_rank_fusion",
    "retrieve",
    "SettingsError",
    "synthetic_beir",
    "write_synthetic_beir",
]
