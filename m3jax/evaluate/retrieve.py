"""Embedding a BeirDataset with BGEM3 and ranking its corpus per retrieval mode with CorpusIndex.

A run is {query id: {passage id: score}}, each inner dict in rank order (best first): the layout ranx, pytrec_eval
and BEIR use. Modes:
  dense, sparse, colbert, hybrid  CorpusIndex.search in that mode (hybrid: the first `candidates` by dense, or by
                                  dense + w1 * sparse, reranked by w0 * dense + w1 * sparse + w2 * colbert).
  rrf                             reciprocal rank fusion of the dense, sparse and colbert runs (reciprocal_rank_fusion).
  muvera                          the top `candidates` by MUVERA FDE, re-ranked by exact MaxSim (an index with FDEs).
With a compact index (build_index's `compact`), dense, colbert and hybrid score the compact vectors as CorpusIndex
does (int8 / binary code search, then rescoring with the float query).
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import numpy as np

from m3jax.api import apply_instruction
from m3jax.evaluate.data import BeirDataset

MODES = ("dense", "sparse", "colbert", "hybrid", "rrf", "muvera")
DEFAULT_MODES = MODES[:5]  # muvera needs a corpus with FDEs (a compact setting)
RRF_OF = ("dense", "sparse", "colbert")
DEFAULT_WEIGHTS = (1.0, 0.3, 1.0)
Run = dict[str, dict[str, float]]


def check_modes(modes: str | Sequence[str]) -> tuple[str, ...]:
    """Modes from a list or a comma-separated string, validated, duplicates dropped, order kept."""
    items = [m.strip() for m in modes.split(",")] if isinstance(modes, str) else list(modes)
    if not items or any(not m for m in items):
        raise ValueError(f"modes: expected a non-empty list of {', '.join(MODES)}, got {modes!r}")
    bad = [m for m in items if m not in MODES]
    if bad:
        raise ValueError(f"unknown mode {bad[0]!r}; expected some of {', '.join(MODES)}")
    return tuple(dict.fromkeys(items))


def heads_for(modes: Sequence[str], weights: Sequence[float], first_stage: str = "dense") -> tuple[str, ...]:
    """The encoder heads the modes need (hybrid skips a zero-weighted one; its first stage always needs dense)."""
    need = set()
    for mode in modes:
        if mode in ("dense", "sparse", "colbert"):
            need.add(mode)
        elif mode == "muvera":
            need.add("colbert")
        elif mode == "rrf":
            need.update(RRF_OF)
        else:
            need.add("dense")
            need.update(h for h, w in zip(RRF_OF, weights, strict=True) if w != 0)
            if first_stage == "dense+sparse":
                need.add("sparse")
    return tuple(h for h in RRF_OF if h in need)


def encode_corpus(model, ds: BeirDataset, *, heads: Sequence[str], batch_size: int | None = None,
                  max_length: int | None = None, show_progress: bool | None = None):
    """EncodeResult [N, ...] of the passages with encode_corpus' settings (passage instruction, passage_max_length;
    None takes the model's)."""
    texts = apply_instruction(ds.corpus_texts, model.passage_instruction_for_retrieval,
                              model.passage_instruction_format)
    return model.encode_padded(texts, batch_size=batch_size, heads=heads, show_progress=show_progress,
                               max_length=model.passage_max_length if max_length is None else max_length)


def encode_queries(model, ds: BeirDataset, *, heads: Sequence[str], batch_size: int | None = None,
                   max_length: int | None = None, show_progress: bool | None = None):
    """EncodeResult [Q, ...] of the queries with encode_queries' settings (query instruction, query_max_length;
    None takes the model's)."""
    texts = apply_instruction(ds.query_texts, model.query_instruction_for_retrieval, model.query_instruction_format)
    return model.encode_padded(texts, batch_size=batch_size, heads=heads, show_progress=show_progress,
                               max_length=model.query_max_length if max_length is None else max_length)


def encode_dataset(model, ds: BeirDataset, *, heads: Sequence[str], batch_size: int | None = None,
                   query_max_length: int | None = None, passage_max_length: int | None = None,
                   show_progress: bool | None = None):
    """(queries, corpus) EncodeResults of a BeirDataset, [Q, ...] and [N, ...] in its order."""
    corpus = encode_corpus(model, ds, heads=heads, batch_size=batch_size, max_length=passage_max_length,
                           show_progress=show_progress)
    queries = encode_queries(model, ds, heads=heads, batch_size=batch_size, max_length=query_max_length,
                             show_progress=show_progress)
    return queries, corpus


def build_index(corpus, corpus_ids: Sequence[str], *, dtype=None, compact: dict | None = None):
    """A CorpusIndex over whichever representations the EncodeResult holds, returning passage ids. compact: the
    keyword arguments of m3jax.compact.compact_corpus (dense_format, colbert_format, pool_factor, muvera) to store
    dense and ColBERT compact."""
    from m3jax.compact import compact_corpus
    from m3jax.index import CorpusIndex

    vectors = {"dense": corpus.dense, "colbert": corpus.colbert, "colbert_mask": corpus.colbert_mask}
    if compact:
        vectors = compact_corpus(**vectors, **compact)
    return CorpusIndex(**vectors, sparse_ids=corpus.sparse_ids, sparse_weights=corpus.sparse_weights,
                       doc_ids=np.asarray(corpus_ids), dtype=dtype)


def retrieve(index, queries, query_ids: Sequence[str], *, modes: Sequence[str] = DEFAULT_MODES, top_k: int = 100,
             weights: Sequence[float] = DEFAULT_WEIGHTS, rrf_k: float = 60, candidates: int = 100,
             first_stage: str = "dense", ignore_identical_ids: bool = True, batch_size: int = 16,
             timings: dict | None = None, rescore: bool = True) -> dict[str, Run]:
    """Top-k runs {mode: run} of the encoded queries against a CorpusIndex built with doc_ids.

    top_k is capped at the corpus size. ignore_identical_ids drops a passage whose id is the query's own id from
    that query's results (BEIR's EvaluateRetrieval default, for datasets such as Quora and ArguAna whose queries
    are also passages); the search then asks for one more result so that top_k remain. Ranking and ties are
    CorpusIndex's (score descending, then corpus order). timings, if given, receives seconds per mode.
    """
    modes = check_modes(modes)
    nq = len(query_ids)
    if len(queries) != nq:
        raise ValueError(f"queries: {len(queries)} encoded rows for {nq} query ids")
    if index.doc_ids is None:
        raise ValueError("retrieve needs a CorpusIndex built with doc_ids (see build_index)")
    top_k = min(top_k, index.num_docs)
    corpus_ids = set(index.doc_ids.tolist())
    extra = int(ignore_identical_ids and any(q in corpus_ids for q in query_ids))
    search_k = min(top_k + extra, index.num_docs)
    searched = [m for m in RRF_OF if m in modes or "rrf" in modes] + [m for m in ("hybrid", "muvera") if m in modes]
    runs: dict[str, Run] = {}
    for mode in searched:
        t0 = time.perf_counter()
        scores, ids = index.search(queries, search_k, mode, candidates=candidates, first_stage=first_stage,
                                   weights=tuple(weights), batch_size=batch_size, rescore=rescore)
        run = {}
        for qid, row_ids, row_scores in zip(query_ids, ids.tolist(), scores.tolist(), strict=True):
            ranked = [(d, s) for d, s in zip(row_ids, row_scores, strict=True)
                      if not (ignore_identical_ids and d == qid)]
            run[qid] = dict(ranked[:top_k])
        runs[mode] = run
        if timings is not None:
            timings[f"search_{mode}_s"] = round(time.perf_counter() - t0, 3)
    if "rrf" in modes:
        runs["rrf"] = reciprocal_rank_fusion([runs[m] for m in RRF_OF], k=rrf_k, depth=top_k)
    return {m: runs[m] for m in modes}


def reciprocal_rank_fusion(runs: Sequence[Run], *, k: float = 60, depth: int | None = None) -> Run:
    """Reciprocal rank fusion (Cormack et al. 2009): score(d) = sum over runs of 1 / (k + rank of d), ranks from 1,
    a run that does not list d adding nothing. Each run's order is its dict order. Ties go to the passage reached
    first walking the runs rank by rank (rank 1 of every run in the given order, then rank 2, ...). Queries are the
    first run's; depth (default: the longest list) caps each fused list.
    """
    if not runs:
        raise ValueError("reciprocal_rank_fusion: no runs")
    if not k >= 0:
        raise ValueError(f"reciprocal_rank_fusion: k must be >= 0, got {k!r}")
    for i, run in enumerate(runs[1:], 1):
        if run.keys() != runs[0].keys():
            missing = next(iter(runs[0].keys() ^ run.keys()))
            raise ValueError(f"reciprocal_rank_fusion: run {i} and run 0 differ in their queries (e.g. {missing!r})")
    fused: Run = {}
    for qid in runs[0]:
        lists = [list(run[qid]) for run in runs]
        score: dict[str, float] = {}
        for rank in range(max(map(len, lists), default=0)):
            for ranked in lists:
                if rank < len(ranked):
                    score[ranked[rank]] = score.get(ranked[rank], 0.0) + 1.0 / (k + rank + 1)
        order = sorted(score, key=lambda d: -score[d])  # stable: ties keep first-reached order
        fused[qid] = {d: score[d] for d in order[:depth or len(order)]}
    return fused


__all__ = ["DEFAULT_MODES", "DEFAULT_WEIGHTS", "MODES", "Run", "build_index", "check_modes", "encode_corpus",
           "encode_dataset", "encode_queries", "heads_for", "reciprocal_rank_fusion", "retrieve"]
