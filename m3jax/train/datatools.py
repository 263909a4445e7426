"""The data tools FlagEmbedding's fine-tuning depends on, over m3jax's own encoder, index and re-ranker, in its
JSON-lines format ({query, pos, neg[, pos_scores, neg_scores][, prompt]} per line):

- mine_hard_negatives (`m3jax mine`): scripts/hn_mine.py. Every query's dense top passages among a candidate pool
  (its file, or every pos and neg of the input), ranks [start, end) of them, minus its positives and its own text,
  `negative_number` of them drawn at random (fewer found: random pool passages that are not positives fill up).
- add_teacher_scores (`m3jax score`): scripts/add_reranker_score.py. pos_scores and neg_scores from a cross-encoder
  (m3jax.FlagReranker), or from BGE-M3's own weighted dense + sparse + ColBERT score (BGEM3.compute_score).

Both stream and resume like `m3jax embed`: the input is checked once (a bad row is an error naming its file and line,
before any work), then read again and processed chunk_rows rows at a time; each finished chunk is written to a work
directory beside the output (`.<name>.parts/`: settings.json, part-NNNNN.jsonl and its counts), under a temporary
name and renamed. A rerun with the same settings skips the finished chunks; one with other settings (or a changed
input) is refused, naming the difference. When every chunk is done they are joined into the output, under a temporary
name and renamed, and the work directory is removed: a failed or killed run leaves no output that looks finished, and
a rerun after a finished run starts over. `m3jax mine` keeps the candidate pool's vectors there too (pool-NNNNN.npy),
so a rerun does not embed them again; the pool's vectors are held in memory for the search, as hn_mine holds its
faiss index.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from m3jax._io import parse_json_object, settings_diff
from m3jax.train.data import DataError, check_texts, list_files, read_lines

CHUNK_ROWS = 10_000
SETTINGS_VERSION = 1


class JobError(ValueError):
    """A data-tool run that cannot resume: its work directory holds another run's chunks."""


def _row(source: str, line: int, raw: str) -> dict:
    where = f"{source}:{line}"
    row = parse_json_object(raw, where, DataError)
    check_texts(row, where, neg_required=False)
    return row


def check_rows(files: Sequence[str]) -> int:
    """Checks every row of files, their texts as the training data's are ('neg' may be absent), without keeping them
    (a bad row is an error naming file and line); returns their number."""
    n = 0
    for x in read_lines(files):
        _row(*x)
        n += 1
    return n


def chunks(files: Sequence[str], size: int) -> Iterator[tuple[int, list[dict]]]:
    """(chunk index, its rows) for files' rows, size rows a chunk, streamed."""
    batch, k = [], 0
    for x in read_lines(files):
        batch.append(_row(*x))
        if len(batch) == size:
            yield k, batch
            batch, k = [], k + 1
    if batch:
        yield k, batch


def write_rows(rows: list[dict], output: str | os.PathLike) -> Path:
    """JSON lines written under a temporary name and renamed: the output is complete or absent."""
    return _write_atomic(Path(output), lambda f: f.writelines(json.dumps(r, ensure_ascii=False) + "\n"
                                                                for r in rows))


def _write_atomic(output: Path, fill: Callable[[Any], None], mode: str = "w") -> Path:
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(f".{output.name}.{os.getpid()}.partial")
    try:
        with open(tmp, mode, **({"encoding": "utf-8"} if "b" not in mode else {})) as f:
            fill(f)
        os.replace(tmp, output)
    finally:
        tmp.unlink(missing_ok=True)
    return output


def _identity(x: Any) -> str | None:
    """A model or re-ranker as recorded in a run's settings: its path or name, or its type."""
    if x is None or isinstance(x, str | os.PathLike):
        return None if x is None else str(x)
    return str(getattr(x, "model_name_or_path", type(x).__name__))


class Parts:
    """A resumable data-tool run's work directory (see the module docstring): which chunks are done, their rows and
    counts, and the join into the output."""

    def __init__(self, output: str | os.PathLike, settings: dict):
        self.output = Path(output)
        self.dir = self.output.with_name(f".{self.output.name}.parts")
        path = self.dir / "settings.json"
        settings = json.loads(json.dumps({"version": SETTINGS_VERSION, **settings}))
        if path.is_file():
            old = json.loads(path.read_text())
            if old != settings:
                raise JobError(f"{self.dir} holds a run with other settings; rerun with those, or delete it to "
                               f"start over. Differences: {settings_diff(old, settings, str(path))}")
        else:
            self.dir.mkdir(parents=True, exist_ok=True)
            _write_atomic(path, lambda f: f.write(json.dumps(settings, indent=2) + "\n"))

    def _part(self, k: int) -> Path:
        return self.dir / f"part-{k:05d}.jsonl"

    def done(self, k: int) -> bool:
        return self._part(k).is_file()

    def write(self, k: int, rows: list[dict], counts: dict) -> None:
        """Chunk k's rows and counts; the counts first, so that a chunk whose rows exist has them."""
        _write_atomic(self._part(k).with_suffix(".counts.json"), lambda f: f.write(json.dumps(counts)))
        write_rows(rows, self._part(k))

    def array(self, name: str, make: Callable[[], np.ndarray]) -> np.ndarray:
        """name.npy from the work directory, made (and kept) if it is not there yet."""
        path = self.dir / f"{name}.npy"
        if not path.is_file():
            arr = make()
            _write_atomic(path, lambda f: np.save(f, arr), "wb")
        return np.load(path)

    def finish(self, n: int) -> dict:
        """Joins chunks 0 .. n-1 into the output and removes the work directory; returns their summed counts."""
        missing = [k for k in range(n) if not self.done(k)]
        if missing:
            raise JobError(f"{self.dir}: chunks {missing[:5]} are not done")
        totals: dict = {}
        for k in range(n):
            for key, v in json.loads(self._part(k).with_suffix(".counts.json").read_text()).items():
                totals[key] = totals.get(key, 0) + v

        def join(f):
            for k in range(n):
                with open(self._part(k), encoding="utf-8") as part:
                    shutil.copyfileobj(part, f)

        _write_atomic(self.output, join)
        shutil.rmtree(self.dir)
        return totals


def _inputs(sources: str | Sequence[str]) -> tuple[list[str], list]:
    """The input files and, for the settings, each one's path and size (a changed input is not resumed)."""
    import fsspec

    files = list_files(sources)
    return files, [[f, fs.size(path)] for f in files for fs, path in [fsspec.core.url_to_fs(f)]]


def _model(model: Any, **kwargs) -> Any:
    from m3jax.api import BGEM3

    return model if isinstance(model, BGEM3) else BGEM3(model, show_progress=False, **kwargs)


def mine_hard_negatives(model: Any, input_file: str | Sequence[str], output_file: str | os.PathLike, *,
                        candidate_pool: str | None = None, range_for_sampling: tuple[int, int] = (2, 200),
                        negative_number: int = 15, seed: int = 0, batch_size: int = 256,
                        query_max_length: int = 512, passage_max_length: int = 512,
                        chunk_rows: int = CHUNK_ROWS) -> dict:
    """hn_mine.py over m3jax (see the module docstring); model: a BGEM3 or what it loads. Row i draws its negatives
    from random.Random(f"{seed}:{i}"), so a resumed run equals an uninterrupted one. Returns counts: rows, pool
    size, rows whose negatives were filled up at random."""
    from m3jax.index import CorpusIndex

    start, end = (int(x) for x in range_for_sampling)
    if not 0 <= start < end:
        raise ValueError(f"range_for_sampling must be start-end with 0 <= start < end, got {start}-{end}")
    if negative_number < 1 or chunk_rows < 1:
        raise ValueError(f"negative_number and chunk_rows must be >= 1, got {negative_number}, {chunk_rows}")
    files, inputs = _inputs(input_file)
    pool_files, pool_inputs = _inputs(candidate_pool) if candidate_pool is not None else ([], None)
    n_rows = check_rows(files)
    if pool_files:
        pool = []
        for src, i, raw in read_lines(pool_files):
            text = parse_json_object(raw, f"{src}:{i}", DataError).get("text")
            if not isinstance(text, str):
                raise DataError(f"{src}:{i}: a candidate pool line needs a string 'text', got {text!r:.40}")
            pool.append(text)
    else:
        pool = [t for _, rows in chunks(files, chunk_rows) for r in rows for t in [*r["pos"], *r.get("neg", [])]]
    corpus = list(dict.fromkeys(pool))  # deduplicated, in first-seen order (hn_mine's set(), made deterministic)
    del pool
    if not corpus:
        raise DataError(f"{candidate_pool or input_file}: no passages to mine from")
    parts = Parts(output_file, {"tool": "mine", "inputs": inputs, "candidate_pool": pool_inputs,
                                "model": _identity(model), "range_for_sampling": [start, end],
                                "negative_number": negative_number, "seed": seed,
                                "query_max_length": query_max_length, "passage_max_length": passage_max_length,
                                "chunk_rows": chunk_rows})
    m = None

    def encoder():
        nonlocal m
        m = m or _model(model, batch_size=batch_size)
        return m

    vecs = [parts.array(f"pool-{k:05d}", lambda k=k: encoder().encode(
        corpus[k:k + chunk_rows], max_length=passage_max_length)["dense_vecs"].astype(np.float32))
        for k in range(0, len(corpus), chunk_rows)]
    index = CorpusIndex(dense=np.concatenate(vecs))
    del vecs
    top = min(end, len(corpus))
    for k, rows in chunks(files, chunk_rows):
        if parts.done(k):
            continue
        q = encoder().encode_queries([r["query"] for r in rows], max_length=query_max_length)["dense_vecs"]
        _, ranked = index.search({"dense": q}, top)
        out, filled = [], 0
        for i, (row, ids) in enumerate(zip(rows, ranked.tolist(), strict=True)):
            neg, fill = _draw_negatives(row, [corpus[j] for j in ids[start:end]], corpus, negative_number,
                                        random.Random(f"{seed}:{k * chunk_rows + i}"))
            out.append({**row, "neg": neg})
            filled += fill
        parts.write(k, out, {"rows": len(out), "filled_at_random": filled})
    counts = parts.finish(-(-n_rows // chunk_rows))
    return {"rows": counts.get("rows", 0), "pool": len(corpus), "filled_at_random": counts.get("filled_at_random", 0)}


def _draw_negatives(row: dict, ranked: list[str], corpus: list[str], n: int, rng: random.Random
                    ) -> tuple[list[str], bool]:
    """hn_mine's draw for one row: n of its ranked passages that are neither a positive nor its query; too few:
    random pool passages (positives left out) fill up. Returns (negatives, whether it filled up)."""
    pos = set(row["pos"])
    found = [t for t in ranked if t not in pos and t != row["query"]]
    neg = rng.sample(found, n) if len(found) > n else found
    if len(neg) >= n:
        return neg, False
    extra = rng.sample(corpus, min(len(corpus), n - len(neg) + len(row["pos"])))
    return neg + [t for t in extra if t not in pos][:n - len(neg)], True


def add_teacher_scores(input_file: str | Sequence[str], output_file: str | os.PathLike, *,
                       reranker: Any = None, model: Any = None,
                       weights: tuple[float, float, float] = (0.4, 0.2, 0.4), max_length: int | None = None,
                       batch_size: int | None = None, chunk_rows: int = CHUNK_ROWS) -> dict:
    """pos_scores / neg_scores for every row, from `reranker` (an m3jax.FlagReranker, anything with its
    compute_score, or its path) or else from `model` (a BGEM3 or its path): its compute_score's
    "colbert+sparse+dense" with `weights` (dense, sparse, ColBERT), FlagEmbedding's M3 hybrid score. Streamed and
    resumable (see the module docstring)."""
    if (reranker is None) == (model is None):
        raise ValueError("add_teacher_scores needs exactly one of reranker= or model=")
    if chunk_rows < 1:
        raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")
    files, inputs = _inputs(input_file)
    n_rows = check_rows(files)
    parts = Parts(output_file, {"tool": "score", "inputs": inputs, "reranker": _identity(reranker),
                                "model": _identity(model), "weights": list(weights), "max_length": max_length,
                                "chunk_rows": chunk_rows})
    scorer = None

    def score(pairs: list[list[str]]) -> list[float]:
        nonlocal scorer
        if not pairs:
            return []
        if reranker is not None:
            if scorer is None:
                from m3jax.reranker import FlagReranker

                scorer = FlagReranker(reranker) if isinstance(reranker, str | os.PathLike) else reranker
            kw = {k: v for k, v in (("max_length", max_length), ("batch_size", batch_size)) if v is not None}
            return list(scorer.compute_score(pairs, **kw))
        scorer = scorer or _model(model)
        kw = {k: v for k, v in (("max_passage_length", max_length), ("batch_size", batch_size)) if v is not None}
        return list(scorer.compute_score(pairs, weights_for_different_modes=list(weights), **kw)
                    ["colbert+sparse+dense"])

    for k, rows in chunks(files, chunk_rows):
        if parts.done(k):
            continue
        pairs = [[r["query"], t] for r in rows for t in [*r["pos"], *r.get("neg", [])]]
        scores = score(pairs)
        out, i = [], 0
        for r in rows:
            n_pos, n_neg = len(r["pos"]), len(r.get("neg", []))
            out.append({**r, "pos_scores": [float(x) for x in scores[i:i + n_pos]],
                        "neg_scores": [float(x) for x in scores[i + n_pos:i + n_pos + n_neg]]})
            i += n_pos + n_neg
        parts.write(k, out, {"rows": len(out), "pairs": len(pairs)})
    counts = parts.finish(-(-n_rows // chunk_rows))
    return {"rows": counts.get("rows", 0), "pairs": counts.get("pairs", 0),
            "teacher": "reranker" if reranker is not None else f"m3 {list(weights)}"}


__all__ = ["JobError", "Parts", "add_teacher_scores", "check_rows", "chunks", "mine_hard_negatives", "write_rows"]
