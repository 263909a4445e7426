"""A small synthetic BEIR-layout dataset in six scripts, for tests, the notebook and trying `m3jax eval` offline.

Passage i (id d{i}) is a title and a text made of pseudo-words of one script (Latin, Cyrillic, Greek, Arabic, Han,
Hangul, by i mod 6): three words only it holds, common words of its script, and one distinctive word of passage i-6
(the same script). Query q{i} is passage i's three distinctive words: qrels judge d{i} 2 and d{i+6} 1 (it holds one
of them); every fifth query also has a 0 judgement. Two queries share their id with a passage and repeat its
title and text (as in Quora), judged relevant to another passage: the case BEIR's ignore_identical_ids exists for. A few
queries are in qrels/dev.tsv only.
"""

from __future__ import annotations

import json
import random

from m3jax.pseudowords import SCRIPTS, PseudoWords


def synthetic_beir(passages: int = 40, seed: int = 0) -> tuple[list[dict], list[dict], dict[str, list[tuple]]]:
    """(corpus rows, query rows, {split: [(query id, passage id, score)]}) of the synthetic set."""
    if passages < 12:
        raise ValueError(f"passages must be >= 12 (two per script), got {passages}")
    rng = random.Random(seed)
    fresh = PseudoWords(rng)
    common = {s: [fresh(s) for _ in range(8)] for s in SCRIPTS}
    own = [[fresh(SCRIPTS[i % 6]) for _ in range(3)] for i in range(passages)]
    corpus = []
    for i in range(passages):
        s = SCRIPTS[i % 6]
        words = own[i] + rng.sample(common[s], 6) + ([own[i - 6][0]] if i >= 6 else [])
        rng.shuffle(words)
        corpus.append({"_id": f"d{i}", "title": " ".join(rng.sample(common[s], 2)), "text": " ".join(words)})
    queries = [{"_id": f"q{i}", "text": " ".join(rng.sample(own[i], 3))} for i in range(passages)]
    test = []
    for i in range(passages - 3):
        test.append((f"q{i}", f"d{i}", 2))
        if i + 6 < passages:
            test.append((f"q{i}", f"d{i + 6}", 1))
        if i % 5 == 0:
            test.append((f"q{i}", f"d{(i + 1) % passages}", 0))
    for i in (1, 2):  # queries whose id is a passage's and whose text repeats it
        queries.append({"_id": f"d{i}", "text": f"{corpus[i]['title']} {corpus[i]['text']}"})
        test.append((f"d{i}", f"d{i + 6}", 1))
    dev = [(f"q{i}", f"d{i}", 1) for i in range(passages - 3, passages)]
    return corpus, queries, {"test": test, "dev": dev}


def write_synthetic_beir(path: str, passages: int = 40, seed: int = 0, *, storage_options: dict | None = None) -> str:
    """Writes the synthetic set in BEIR layout under path (a folder or fsspec URL); returns path."""
    import fsspec

    fs, root = fsspec.core.url_to_fs(str(path), **(storage_options or {}))
    root = root.rstrip("/")
    corpus, queries, qrels = synthetic_beir(passages, seed)
    fs.makedirs(f"{root}/qrels", exist_ok=True)
    for name, rows in (("corpus.jsonl", corpus), ("queries.jsonl", queries)):
        fs.pipe_file(f"{root}/{name}", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode())
    for split, rows in qrels.items():
        text = "query-id\tcorpus-id\tscore\n" + "".join(f"{q}\t{d}\t{s}\n" for q, d, s in rows)
        fs.pipe_file(f"{root}/qrels/{split}.tsv", text.encode())
    return str(path)


__all__ = ["synthetic_beir", "write_synthetic_beir"]
