"""The data tools FlagEmbedding's fine-tuning depends on, over m3jax's own encoder, index and re-ranker, in its
JSON-lines format ({query, pos, neg[, pos_scores, neg_scores][, prompt]} per line):

- mine_hard_negatives (`m3jax mine`): scripts/hn_mine.py. Every query's dense top passages among a candidate pool
  (its file, or every pos and neg of the input), ranks [start, end) of them, minus its positives and its own text,
  `negative_number` of them drawn at random (fewer found: random pool passages that are not positives fill up).
- add_teacher_scores (`m3jax score`): scripts/add_reranker_score.py. pos_scores and neg_scores from a cross-encoder
  (m3jax.FlagReranker), or from BGE-M3's own weighted dense + sparse + ColBERT score (BGEM3.compute_score).

Both read every line first and write their output under a temporary name, renamed when complete: a failed run leaves
no output that looks finished, and a rerun starts over (they are one pass of encoding, not a long job).
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from m3jax._io import parse_json_object
from m3jax.train.data import DataError, check_texts, list_files, read_lines


def read_rows(sources: str | Sequence[str]) -> list[dict]:
    """The input's rows, their texts checked as the training data's are ('neg' may be absent); a bad row is an error
    naming file and line."""
    rows = []
    for source, line, raw in read_lines(list_files(sources)):
        where = f"{source}:{line}"
        row = parse_json_object(raw, where, DataError)
        check_texts(row, where, neg_required=False)
        rows.append(row)
    return rows


def write_rows(rows: list[dict], output: str | os.PathLike) -> Path:
    """JSON lines written under a temporary name and renamed: the output is complete or absent."""
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(f".{output.name}.{os.getpid()}.partial")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        os.replace(tmp, output)
    finally:
        tmp.unlink(missing_ok=True)
    return output


def _model(model: Any, **kwargs) -> Any:
    from m3jax.api import BGEM3

    return model if isinstance(model, BGEM3) else BGEM3(model, show_progress=False, **kwargs)


def mine_hard_negatives(model: Any, input_file: str | Sequence[str], output_file: str | os.PathLike, *,
                        candidate_pool: str | None = None, range_for_sampling: tuple[int, int] = (2, 200),
                        negative_number: int = 15, seed: int = 0, batch_size: int = 256,
                        query_max_length: int = 512, passage_max_length: int = 512) -> dict:
    """hn_mine.py over m3jax (see the module docstring); model: a BGEM3 or what it loads. Returns counts: rows,
    pool size, rows whose negatives were filled up at random."""
    from m3jax.index import CorpusIndex

    start, end = (int(x) for x in range_for_sampling)
    if not 0 <= start < end:
        raise ValueError(f"range_for_sampling must be start-end with 0 <= start < end, got {start}-{end}")
    if negative_number < 1:
        raise ValueError(f"negative_number must be >= 1, got {negative_number}")
    rows = read_rows(input_file)
    if candidate_pool is not None:
        pool = [parse_json_object(raw, f"{src}:{i}", DataError).get("text")
                for src, i, raw in read_lines(list_files(candidate_pool))]
        if not all(isinstance(t, str) for t in pool):
            raise DataError(f"{candidate_pool}: every line needs a string 'text'")
    else:
        pool = [t for r in rows for t in [*r["pos"], *r.get("neg", [])]]
    corpus = list(dict.fromkeys(pool))  # deduplicated, in first-seen order (hn_mine's set(), made deterministic)
    m = _model(model, batch_size=batch_size)
    p = m.encode(corpus, max_length=passage_max_length)["dense_vecs"]
    q = m.encode_queries([r["query"] for r in rows], max_length=query_max_length)["dense_vecs"]
    top = min(end, len(corpus))
    _, ranked = CorpusIndex(dense=p).search({"dense": q}, top)
    rng, filled = random.Random(seed), 0
    out = []
    for row, ids in zip(rows, ranked.tolist(), strict=True):
        pos = set(row["pos"])
        found = [corpus[i] for i in ids[start:end] if corpus[i] not in pos and corpus[i] != row["query"]]
        neg = rng.sample(found, negative_number) if len(found) > negative_number else found
        if len(neg) < negative_number:  # hn_mine: random pool passages, positives left out
            filled += 1
            extra = rng.sample(corpus, min(len(corpus), negative_number - len(neg) + len(row["pos"])))
            neg += [t for t in extra if t not in pos][:negative_number - len(neg)]
        out.append({**row, "neg": neg})
    write_rows(out, output_file)
    return {"rows": len(out), "pool": len(corpus), "filled_at_random": filled}


def add_teacher_scores(input_file: str | Sequence[str], output_file: str | os.PathLike, *,
                       reranker: Any = None, model: Any = None,
                       weights: tuple[float, float, float] = (0.4, 0.2, 0.4), max_length: int | None = None,
                       batch_size: int | None = None) -> dict:
    """pos_scores / neg_scores for every row, from `reranker` (an m3jax.FlagReranker, anything with its
    compute_score, or its path) or else from `model` (a BGEM3 or its path): its compute_score's
    "colbert+sparse+dense" with `weights` (dense, sparse, ColBERT), FlagEmbedding's M3 hybrid score."""
    if (reranker is None) == (model is None):
        raise ValueError("add_teacher_scores needs exactly one of reranker= or model=")
    rows = read_rows(input_file)
    pairs = [[r["query"], t] for r in rows for t in [*r["pos"], *r.get("neg", [])]]
    if reranker is not None:
        if isinstance(reranker, str | os.PathLike):
            from m3jax.reranker import FlagReranker

            reranker = FlagReranker(reranker)
        kw = {k: v for k, v in (("max_length", max_length), ("batch_size", batch_size)) if v is not None}
        scores = list(reranker.compute_score(pairs, **kw)) if pairs else []
    else:
        m = _model(model)
        kw = {k: v for k, v in (("max_passage_length", max_length), ("batch_size", batch_size)) if v is not None}
        scores = list(m.compute_score(pairs, weights_for_different_modes=list(weights), **kw)
                      ["colbert+sparse+dense"]) if pairs else []
    out, i = [], 0
    for r in rows:
        n_pos, n_neg = len(r["pos"]), len(r.get("neg", []))
        out.append({**r, "pos_scores": [float(x) for x in scores[i:i + n_pos]],
                    "neg_scores": [float(x) for x in scores[i + n_pos:i + n_pos + n_neg]]})
        i += n_pos + n_neg
    write_rows(out, output_file)
    return {"rows": len(out), "pairs": len(pairs),
            "teacher": "reranker" if reranker is not None else f"m3 {list(weights)}"}


__all__ = ["add_teacher_scores", "mine_hard_negatives", "read_rows", "write_rows"]
