"""BEIR-layout datasets: corpus.jsonl, queries.jsonl and qrels/<split>.tsv, from a local folder or an fsspec URL.

    corpus.jsonl       one JSON object a line: {"_id": str, "title": str (optional), "text": str}
    queries.jsonl      one JSON object a line: {"_id": str, "text": str}
    qrels/<split>.tsv  a header line `query-id<TAB>corpus-id<TAB>score`, then one judgement a line (score: int)

Files are read line by line (nothing is read whole). What BEIR's GenericDataLoader tolerates silently is an error
here, naming the file and line: malformed JSON, a missing or non-string field, a duplicate id, a qrels row with the
wrong number of fields, a non-integer score, a duplicate (query, passage) pair, or a query or passage id that the
queries / corpus do not hold. As in BEIR, only the queries that have qrels rows in the split are evaluated (all of
them, including those whose judgements are all 0).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import Any

from m3jax._io import parse_json_object


class DatasetError(ValueError):
    """A BEIR-layout file that cannot be read as one; the message names the file and line."""


@dataclasses.dataclass
class BeirDataset:
    """One split of a BEIR-layout dataset, in file order.

    corpus_ids, corpus_texts: [N] passage ids and the text that is embedded (title and text joined, see
      passage_text). queries are only those with qrels in the split: query_ids, query_texts [Q].
    qrels: {query id: {passage id: score}} as in the file (scores <= 0 are judged non-relevant).
    """

    path: str
    split: str
    corpus_ids: list[str]
    corpus_texts: list[str]
    query_ids: list[str]
    query_texts: list[str]
    qrels: dict[str, dict[str, int]]
    num_queries_in_file: int = 0

    def stats(self) -> dict[str, Any]:
        """Counts for reports: passages, queries evaluated, judgements, relevant judgements per query."""
        judged = sum(len(d) for d in self.qrels.values())
        relevant = sum(s > 0 for d in self.qrels.values() for s in d.values())
        return {"path": self.path, "split": self.split, "passages": len(self.corpus_ids),
                "queries": len(self.query_ids), "queries_in_file": self.num_queries_in_file, "judgements": judged,
                "relevant_judgements": relevant,
                "relevant_per_query": round(relevant / len(self.query_ids), 4) if self.query_ids else 0.0}


def passage_text(title: str | None, text: str) -> str:
    """The embedded text of a passage: f"{title} {text}".strip(), or text alone when the row has no title.

    This is what FlagEmbedding's evaluation (FlagEmbedding.abc.evaluation.searcher) and BEIR's dense retrieval
    models (title + " " + text, stripped) embed.
    """
    return text if title is None else f"{title} {text}".strip()


def _open_lines(fs, path: str, label: str) -> Iterator[tuple[int, str]]:
    """(1-based line number, line without its newline) of a UTF-8 text file, streamed."""
    if not fs.isfile(path):
        raise FileNotFoundError(f"{label}: no such file")
    with fs.open(path, "rt", encoding="utf-8", newline="") as f:
        for n, line in enumerate(f, 1):
            yield n, line.rstrip("\r\n")


def _id(row: dict, label: str, n: int) -> str:
    v = row.get("_id")
    if isinstance(v, bool) or not isinstance(v, str | int):
        raise DatasetError(f"{label} line {n}: '_id' must be a string, got {v!r}")
    if v == "":
        raise DatasetError(f"{label} line {n}: empty '_id'")
    return str(v)


def _read_jsonl(fs, path: str, label: str, fields: tuple[str, ...]) -> Iterator[tuple[int, str, dict]]:
    """(line number, id, row) per non-blank line; the fields must be strings (title may also be missing / null)."""
    for n, line in _open_lines(fs, path, label):
        if not line.strip():
            continue
        row = parse_json_object(line, f"{label} line {n}", DatasetError)
        rid = _id(row, label, n)
        for field in fields:
            v = row.get(field)
            if field == "title" and v is None:
                continue
            if not isinstance(v, str):
                what = "missing" if field not in row else f"must be a string, got {type(v).__name__}"
                raise DatasetError(f"{label} line {n} (_id {rid!r}): '{field}' {what}")
        yield n, rid, row


def _check_new(seen: dict[str, int], rid: str, label: str, n: int) -> None:
    if rid in seen:
        raise DatasetError(f"{label} line {n}: duplicate _id {rid!r} (first on line {seen[rid]})")
    seen[rid] = n


def load_beir(path: str, split: str = "test", *, storage_options: dict | None = None) -> BeirDataset:
    """Reads one split of a BEIR-layout dataset from a folder or fsspec URL (e.g. `memory://beir/scifact`,
    `s3://bucket/scifact`, `zip://scifact::https://host/scifact.zip`). Raises DatasetError naming file and line."""
    import fsspec

    fs, root = fsspec.core.url_to_fs(str(path), **(storage_options or {}))
    root = root.rstrip("/")
    label = str(path).rstrip("/")
    if not fs.isdir(root):
        raise FileNotFoundError(f"{label}: no such dataset folder")

    corpus_ids, corpus_texts, seen = [], [], {}
    for n, rid, row in _read_jsonl(fs, f"{root}/corpus.jsonl", f"{label}/corpus.jsonl", ("title", "text")):
        _check_new(seen, rid, f"{label}/corpus.jsonl", n)
        corpus_ids.append(rid)
        corpus_texts.append(passage_text(row.get("title"), row["text"]))
    if not corpus_ids:
        raise DatasetError(f"{label}/corpus.jsonl: no passages")
    corpus = set(corpus_ids)
    del seen

    queries: dict[str, str] = {}
    qlines: dict[str, int] = {}
    for n, rid, row in _read_jsonl(fs, f"{root}/queries.jsonl", f"{label}/queries.jsonl", ("text",)):
        _check_new(qlines, rid, f"{label}/queries.jsonl", n)
        queries[rid] = row["text"]

    qlabel = f"{label}/qrels/{split}.tsv"
    if not fs.isfile(f"{root}/qrels/{split}.tsv"):
        found = sorted(p.rsplit("/", 1)[-1][:-4] for p in fs.ls(f"{root}/qrels", detail=False)
                       if p.endswith(".tsv")) if fs.isdir(f"{root}/qrels") else []
        raise FileNotFoundError(f"{qlabel}: no such file (splits found: {', '.join(found) or 'none'})")
    qrels: dict[str, dict[str, int]] = {}
    pair_line: dict[tuple[str, str], int] = {}
    for n, line in _open_lines(fs, f"{root}/qrels/{split}.tsv", qlabel):
        fields = line.split("\t")
        if n == 1:
            if [f.strip() for f in fields] != ["query-id", "corpus-id", "score"]:
                raise DatasetError(f"{qlabel} line 1: expected the header 'query-id<TAB>corpus-id<TAB>score', got "
                                   f"{line[:80]!r}")
            continue
        if not line.strip():
            continue
        if len(fields) != 3:
            raise DatasetError(f"{qlabel} line {n}: expected 3 tab-separated fields, got {len(fields)}: {line[:80]!r}")
        qid, did, score = (f.strip() for f in fields)
        try:
            score = int(score)
        except ValueError:
            raise DatasetError(f"{qlabel} line {n}: score must be an integer, got {score!r}") from None
        if qid not in queries:
            raise DatasetError(f"{qlabel} line {n}: query-id {qid!r} is not in queries.jsonl")
        if did not in corpus:
            raise DatasetError(f"{qlabel} line {n}: corpus-id {did!r} is not in corpus.jsonl")
        if (qid, did) in pair_line:
            raise DatasetError(f"{qlabel} line {n}: duplicate judgement of ({qid!r}, {did!r}) (first on line "
                               f"{pair_line[qid, did]})")
        pair_line[qid, did] = n
        qrels.setdefault(qid, {})[did] = score
    if not qrels:
        raise DatasetError(f"{qlabel}: no judgements")
    query_ids = [q for q in queries if q in qrels]  # queries.jsonl order
    return BeirDataset(path=label, split=split, corpus_ids=corpus_ids, corpus_texts=corpus_texts,
                       query_ids=query_ids, query_texts=[queries[q] for q in query_ids], qrels=qrels,
                       num_queries_in_file=len(queries))


__all__ = ["BeirDataset", "DatasetError", "load_beir", "passage_text"]
