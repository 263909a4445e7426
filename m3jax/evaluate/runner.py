"""evaluate_beir: dataset -> embeddings -> CorpusIndex runs per mode -> ranx metrics -> tables and a JSON file."""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from m3jax.evaluate.data import BeirDataset, load_beir
from m3jax.evaluate.metrics import DEFAULT_METRICS, check_metrics, compute_metrics, cutoff, metric_label
from m3jax.evaluate.retrieve import (
    DEFAULT_MODES,
    DEFAULT_WEIGHTS,
    Run,
    build_index,
    check_modes,
    encode_corpus,
    encode_queries,
    heads_for,
    retrieve,
)

FIRST_STAGES = ("dense", "dense+sparse")


class SettingsError(ValueError):
    """An evaluate_beir argument that cannot work (unknown mode or metric, bad weights, top_k below a cut-off)."""


@dataclasses.dataclass
class EvalReport:
    """What evaluate_beir measured.

    metrics: {mode: {metric: mean over queries}}; per_query: {mode: {metric: {query id: value}}};
    runs: {mode: {query id: {passage id: score}}} in rank order; dataset: BeirDataset.stats(); settings: the model,
    lengths, weights, k and library versions; timings: seconds per stage.
    """

    metrics: dict[str, dict[str, float]]
    per_query: dict[str, dict[str, dict[str, float]]]
    runs: dict[str, Run]
    dataset: dict[str, Any]
    settings: dict[str, Any]
    timings: dict[str, float]

    def to_json(self) -> dict[str, Any]:
        """The JSON file's content: metrics per mode, settings, dataset stats and timings (no runs)."""
        return {"metrics": self.metrics, "settings": self.settings, "dataset": self.dataset, "timings": self.timings}

    def save(self, path: str | os.PathLike) -> Path:
        """Writes to_json() to path through a temporary sibling renamed at the end."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        try:
            tmp.write_text(json.dumps(self.to_json(), indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        return path

    def tables(self) -> str:
        """One plain-text table per mode: each metric's mean over the evaluated queries."""
        d, s = self.dataset, self.settings
        out = []
        for mode, values in self.metrics.items():
            extra = f", weights {s['weights']}" if mode == "hybrid" else (f", k={s['rrf_k']}" if mode == "rrf" else "")
            out.append(f"{mode}  ({d['queries']} queries, {d['passages']} passages, top {s['top_k']}{extra})")
            width = max(len(metric_label(m)) for m in values)
            out.append(f"  {'metric':<{width}}  {'value':>6}")
            out.extend(f"  {metric_label(m):<{width}}  {v:>6.4f}" for m, v in values.items())
            out.append("")
        return "\n".join(out)


def _check_weights(weights: Sequence[float] | str) -> tuple[float, float, float]:
    if isinstance(weights, str):
        try:
            weights = [float(w) for w in weights.split(",")]
        except ValueError:
            raise ValueError(f"weights: expected three numbers 'dense,sparse,colbert', got {weights!r}") from None
    w = tuple(float(x) for x in weights)
    if len(w) != 3 or any(not x >= 0 or x == float("inf") for x in w) or not any(w):
        raise ValueError(f"weights: expected three finite numbers >= 0 (dense, sparse, colbert), not all 0; got "
                         f"{weights!r}")
    return w


def _check_int(name: str, v: Any, low: int = 1) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < low:
        raise ValueError(f"{name} must be an int >= {low}, got {v!r}")
    return v


def _check_corpus_embeddings(enc: Any, n: int, heads: Sequence[str]) -> None:
    if len(enc) != n:
        raise SettingsError(f"corpus_embeddings: {len(enc)} rows for the {n} passages of corpus.jsonl")
    for head, field in (("dense", "dense"), ("sparse", "sparse_ids"), ("colbert", "colbert")):
        if head in heads and getattr(enc, field, None) is None:
            raise SettingsError(f"corpus_embeddings: the modes need the {head} representation ({field} is None)")


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("m3jax", "jax", "ranx"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def evaluate_beir(dataset: str | os.PathLike | BeirDataset, model: Any, *, split: str = "test",
                  modes: Sequence[str] | str = DEFAULT_MODES, weights: Sequence[float] | str = DEFAULT_WEIGHTS,
                  top_k: int = 100, metrics: Sequence[str] | str = DEFAULT_METRICS, rrf_k: float = 60,
                  candidates: int = 100, first_stage: str = "dense", ignore_identical_ids: bool = True,
                  batch_size: int | None = None, query_max_length: int | None = None,
                  passage_max_length: int | None = None, dtype: str | None = None, index_dtype: str | None = None,
                  search_batch_size: int = 16, output: str | os.PathLike | None = None,
                  storage_options: dict | None = None, show_progress: bool | None = None,
                  corpus_embeddings: Any = None, rerank: Any = None, rerank_depth: int = 100,
                  compact: dict | None = None, rescore: bool = True) -> EvalReport:
    """Evaluates BGE-M3 retrieval on one split of a BEIR-layout dataset, per mode.

    Args:
      dataset: a folder or fsspec URL (see load_beir), or a loaded BeirDataset.
      model: a BGEM3, or what BGEM3 loads (hub id, release or m3jax directory) with `dtype` (None: bfloat16 on an
        accelerator, float32 on CPU).
      modes: some of dense, sparse, colbert, hybrid, rrf, muvera (list or "dense,sparse"); default all but muvera.
      weights: hybrid's (dense, sparse, colbert) weights, the paper's 1, 0.3, 1 by default.
      top_k: results per query (capped at the corpus size); a metric cut at K needs top_k >= K unless top_k
        covers the corpus.
      metrics: ranx metric names; default nDCG@10, Recall@100, MRR@10.
      rrf_k: the k of reciprocal rank fusion (of the dense, sparse and colbert top-k lists).
      candidates, first_stage: hybrid's first stage (see CorpusIndex.search).
      ignore_identical_ids: drop a passage whose id is the query's id from its results (BEIR's convention).
      batch_size, query_max_length, passage_max_length: encoding settings; None takes the model's.
      index_dtype: CorpusIndex storage dtype for dense and ColBERT vectors (None: float32 as encoded).
      output: where to write the JSON report (atomically), if anywhere.
      corpus_embeddings: the corpus already embedded, an EncodeResult [N, ...] in corpus.jsonl's order holding the
        heads the modes need (e.g. read back from a stored embedding run); then only the queries are encoded.
      rerank: a cross-encoder (m3jax.FlagReranker or anything with its compute_score) or what FlagReranker loads
        (a release directory or hub id): each mode's run is also re-ranked, its top rerank_depth passages re-scored
        against the query, and reported as "<mode>+rerank" beside the mode.
      compact: store the corpus compact before searching it: m3jax.compact.compact_corpus' keyword arguments,
        dense_format ("float", "int8", "binary"), colbert_format ("float", "int8"), pool_factor, muvera (a
        MuveraConfig, or "default": fastembed's defaults at the model's ColBERT width; needed by mode "muvera").
        int8 ranges are calibrated on the corpus. rescore: see CorpusIndex.search.
    """
    try:
        modes = check_modes(modes)
        weights = _check_weights(weights)
        metrics = check_metrics(metrics)
        top_k = _check_int("top_k", top_k)
        candidates = _check_int("candidates", candidates)
        rerank_depth = _check_int("rerank_depth", rerank_depth)
        if first_stage not in FIRST_STAGES:
            raise ValueError(f"first_stage must be one of {FIRST_STAGES}, got {first_stage!r}")
        if isinstance(rrf_k, bool) or not isinstance(rrf_k, int | float) or not 0 <= rrf_k < float("inf"):
            raise ValueError(f"rrf_k must be a number >= 0, got {rrf_k!r}")
    except ValueError as e:
        raise SettingsError(str(e)) from None
    timings: dict[str, float] = {}

    t0 = time.perf_counter()
    ds = dataset if isinstance(dataset, BeirDataset) else load_beir(str(dataset), split,
                                                                    storage_options=storage_options)
    timings["load_s"] = round(time.perf_counter() - t0, 3)
    depth = min(top_k, len(ds.corpus_ids))
    for m in metrics:  # a cut-off metric over a shorter list would be mislabelled
        if cutoff(m) is not None and depth < min(cutoff(m), len(ds.corpus_ids)):
            raise SettingsError(f"metric {m} looks deeper than top_k={top_k}: raise top_k to {cutoff(m)} (or to "
                                f"the corpus size, {len(ds.corpus_ids)})")

    heads = heads_for(modes, weights, first_stage)
    compact = dict(compact or {})
    unknown = set(compact) - {"dense_format", "colbert_format", "pool_factor", "muvera"}
    if unknown:
        raise SettingsError(f"compact: unknown setting {sorted(unknown)[0]!r}; expected dense_format, "
                            "colbert_format, pool_factor, muvera")
    compact = {k: v for k, v in compact.items() if v not in (None, "float", 1)}  # the defaults: float as encoded
    if "muvera" in modes and not compact.get("muvera"):
        raise SettingsError("mode 'muvera' needs compact={'muvera': MuveraConfig(...) or 'default'} (--muvera)")
    if corpus_embeddings is not None:
        _check_corpus_embeddings(corpus_embeddings, len(ds.corpus_ids), heads)

    if isinstance(model, str | os.PathLike):
        from m3jax.api import BGEM3

        t0 = time.perf_counter()
        model = BGEM3(model, dtype=dtype)
        timings["load_model_s"] = round(time.perf_counter() - t0, 3)
    corpus = corpus_embeddings
    if corpus is None:
        t0 = time.perf_counter()
        corpus = encode_corpus(model, ds, heads=heads, batch_size=batch_size, max_length=passage_max_length,
                               show_progress=show_progress)
        timings["encode_corpus_s"] = round(time.perf_counter() - t0, 3)
    t0 = time.perf_counter()
    queries = encode_queries(model, ds, heads=heads, batch_size=batch_size, max_length=query_max_length,
                             show_progress=show_progress)
    timings["encode_queries_s"] = round(time.perf_counter() - t0, 3)
    t0 = time.perf_counter()
    if compact.get("muvera") == "default":
        from m3jax.compact import MuveraConfig

        compact["muvera"] = MuveraConfig(dim=corpus.colbert.shape[-1])
    index = build_index(corpus, ds.corpus_ids, dtype=index_dtype, compact=compact)
    timings["index_s"] = round(time.perf_counter() - t0, 3)
    runs = retrieve(index, queries, ds.query_ids, modes=modes, top_k=top_k, weights=weights, rrf_k=rrf_k,
                    candidates=candidates, first_stage=first_stage, ignore_identical_ids=ignore_identical_ids,
                    batch_size=search_batch_size, timings=timings, rescore=rescore)
    if rerank is not None:
        rerank = _reranker(rerank, dtype, timings)
        for mode in modes:
            t0 = time.perf_counter()
            runs[f"{mode}+rerank"] = rerank_run(rerank, runs[mode], ds, depth=rerank_depth, top_k=top_k)
            timings[f"rerank_{mode}_s"] = round(time.perf_counter() - t0, 3)
    t0 = time.perf_counter()
    means, per_query = {}, {}
    for mode, run in runs.items():
        means[mode], per_query[mode] = compute_metrics(ds.qrels, run, metrics)
    timings["metrics_s"] = round(time.perf_counter() - t0, 3)

    settings = {
        "model": str(model.model_name_or_path), "dtype": str(model.dtype),
        "query_max_length": model.query_max_length if query_max_length is None else query_max_length,
        "passage_max_length": (model.passage_max_length if passage_max_length is None else passage_max_length)
        if corpus_embeddings is None else None,
        "corpus_embeddings": "encoded" if corpus_embeddings is None else "given",
        "batch_size": model.batch_size if batch_size is None else batch_size,
        "query_instruction": model.query_instruction_for_retrieval,
        "passage_instruction": model.passage_instruction_for_retrieval,
        "modes": list(modes), "heads": list(heads), "weights": list(weights), "top_k": top_k, "rrf_k": rrf_k,
        "rrf_of": ["dense", "sparse", "colbert"], "hybrid_candidates": candidates,
        "hybrid_first_stage": first_stage, "ignore_identical_ids": ignore_identical_ids,
        "index_dtype": str(index_dtype) if index_dtype else "float32", "metrics": list(metrics),
        "metric_library": "ranx", "devices": [str(d) for d in index.devices], "versions": _versions(),
        "truncated_passages": int(corpus.truncated.sum()), "truncated_queries": int(queries.truncated.sum()),
        "rerank": None if rerank is None else str(getattr(rerank, "model_name_or_path", type(rerank).__name__)),
        "rerank_depth": rerank_depth if rerank is not None else None,
        "compact": {k: dataclasses.asdict(v) if dataclasses.is_dataclass(v) else v for k, v in compact.items()},
        "rescore": rescore,
    }
    report = EvalReport(metrics=means, per_query=per_query, runs=runs, dataset=ds.stats(), settings=settings,
                        timings=timings)
    if output is not None:
        report.save(output)
    return report


def _reranker(rerank: Any, dtype: str | None, timings: dict) -> Any:
    if not isinstance(rerank, str | os.PathLike):
        if not callable(getattr(rerank, "compute_score", None)):
            raise SettingsError(f"rerank: expected a re-ranker with compute_score(pairs) or its path, got "
                                f"{type(rerank).__name__}")
        return rerank
    from m3jax.reranker import FlagReranker

    t0 = time.perf_counter()
    reranker = FlagReranker(rerank, use_fp16=dtype == "bfloat16")
    timings["load_reranker_s"] = round(time.perf_counter() - t0, 3)
    return reranker


def rerank_run(reranker: Any, run: dict, ds: BeirDataset, *, depth: int, top_k: int) -> dict:
    """A run with each query's top `depth` passages re-scored by the cross-encoder against the query's text and
    ranked by those scores (ties in the run's order), the rest of its top_k after them in the run's order (scored
    below them), so that metrics deeper than the depth stay comparable."""
    from m3jax.reranker import rerank_candidates

    texts = dict(zip(ds.corpus_ids, ds.corpus_texts, strict=True))
    query_text = dict(zip(ds.query_ids, ds.query_texts, strict=True))
    qids = [q for q in ds.query_ids if q in run]
    ranked_lists = [list(run[q])[:top_k] for q in qids]  # a run keeps its ranking order
    heads = [r[:depth] for r in ranked_lists]
    ranked = rerank_candidates(reranker, [query_text[q] for q in qids], [[texts[d] for d in h] for h in heads],
                               depth)
    out = {}
    for q, full, head, (order, scores) in zip(qids, ranked_lists, heads, ranked, strict=True):
        out[q] = {head[i]: float(s) for i, s in zip(order, scores, strict=True)}
        low = float(scores.min()) if len(scores) else 0.0
        out[q].update({d: low - 1.0 - j for j, d in enumerate(full[depth:])})
    return out


__all__ = ["EvalReport", "SettingsError", "evaluate_beir", "rerank_run"]
