"""Retrieval metrics by ranx (https://github.com/AmenRa/ranx): names as ranx spells them ("ndcg@10",
"recall@100", "mrr@10", ...), relevance >= 1 counts as relevant, nDCG with linear gain (rel / log2(rank + 1)) as
trec_eval / pytrec_eval, which BEIR and FlagEmbedding use. Passages with equal scores are ordered by ranx, not by
the run's dict order."""

from __future__ import annotations

import re
import warnings
from collections.abc import Mapping, Sequence

DEFAULT_METRICS = ("ndcg@10", "recall@100", "mrr@10")
_RANX = ("hits", "hit_rate", "precision", "recall", "f1", "r-precision", "mrr", "map", "dcg", "dcg_burges", "ndcg",
         "ndcg_burges", "bpref")
_LABELS = {"ndcg": "nDCG", "recall": "Recall", "mrr": "MRR", "map": "MAP", "precision": "P", "hit_rate": "HitRate"}
_METRIC = re.compile(r"^([a-z_-]+)(?:@([1-9][0-9]*))?$")


def check_metrics(metrics: str | Sequence[str]) -> tuple[str, ...]:
    """Metric names from a list or comma-separated string, lower-cased and checked against what ranx computes."""
    items = [m.strip().lower() for m in metrics.split(",")] if isinstance(metrics, str) else \
        [str(m).strip().lower() for m in metrics]
    if not items:
        raise ValueError("metrics: none given")
    for m in items:
        match = _METRIC.match(m)
        if match is None or match[1] not in _RANX:
            raise ValueError(f"unknown metric {m!r}; expected NAME or NAME@K with NAME one of {', '.join(_RANX)}")
    return tuple(dict.fromkeys(items))


def cutoff(metric: str) -> int | None:
    """K of NAME@K, None for a metric over the whole list."""
    k = _METRIC.match(metric)[2]
    return int(k) if k else None


def metric_label(metric: str) -> str:
    """Display name: ndcg@10 -> nDCG@10."""
    name, _, k = metric.partition("@")
    return _LABELS.get(name, name) + (f"@{k}" if k else "")


def compute_metrics(qrels: Mapping[str, Mapping[str, int]], run: Mapping[str, Mapping[str, float]],
                    metrics: Sequence[str] = DEFAULT_METRICS) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
    """(mean over the qrels' queries {metric: value}, per query {metric: {query id: value}}) by ranx.evaluate.

    Every query of qrels is evaluated; one missing from the run scores 0. Run queries without qrels are an error
    (they would be dropped silently).
    """
    import ranx

    metrics = check_metrics(metrics)
    extra = [q for q in run if q not in qrels]
    if extra:
        raise ValueError(f"run has {len(extra)} query id(s) without qrels (first: {extra[0]!r})")
    if not qrels:
        raise ValueError("qrels: no queries")
    qrels_ = ranx.Qrels({q: dict(d) for q, d in qrels.items()})
    run_ = ranx.Run({q: dict(run.get(q, {})) for q in qrels})
    with warnings.catch_warnings():
        # ranx's numba kernels warn about an unsigned-to-signed cast of a counter; harmless, and noisy.
        warnings.filterwarnings("ignore", message="unsafe cast")
        mean = ranx.evaluate(qrels_, run_, list(metrics), make_comparable=True)
    mean = {metrics[0]: mean} if not isinstance(mean, dict) else mean
    per_query = {m: {q: float(v) for q, v in run_.scores[m].items()} for m in metrics}
    return {m: float(mean[m]) for m in metrics}, per_query


__all__ = ["DEFAULT_METRICS", "check_metrics", "compute_metrics", "cutoff", "metric_label"]
