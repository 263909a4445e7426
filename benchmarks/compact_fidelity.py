"""Fidelity against size of m3jax.compact's outputs: recall@10 of the exact top 10, and bytes per passage.

With no real BGE-M3 weights here, each setting is measured against exact search on the same model's float
vectors: recall@10 = |top 10 under the setting ∩ exact top 10| / 10, averaged over the queries, exact meaning
float32 dense dot products for the dense settings and float32 ColBERT MaxSim for the ColBERT ones. Two models:
- random: a release-layout checkpoint of random weights, 2 layers x 256 wide (ColBERT 256), whose vectors spread;
- fine-tuned: `m3jax train` run on the synthetic multilingual retrieval task (m3jax.train.synthetic, as in
  tests/test_train_learns.py) from the tiny random model (32 wide): the model that has learned something.
Corpus: the task's passages (training and held-out, de-duplicated); queries: its held-out queries and training
queries. A second column, found@10, is retrieval quality rather than fidelity: the share of the held-out queries
whose own passage (the task's answer) is in the top 10. Bytes per passage count what `m3jax embed` stores: float
dense at float32, float ColBERT at float16 (its default), int8 / binary codes at 1 byte / 1 bit per dimension,
MUVERA FDEs at float32; ColBERT bytes are the mean number of (pooled) vectors per passage times the bytes per
vector.

    python benchmarks/compact_fidelity.py [--quick] [--out DIR]

--quick: the random model only, 32 wide, fewer queries (the test's toy run).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
K = 10
MUVERA_CANDIDATES = 100


def settings(colbert_dim: int):
    """(name, representation, compact_corpus kwargs, search kwargs): each setting of the table."""
    from m3jax.compact import MuveraConfig

    muvera = MuveraConfig(dim=colbert_dim, dim_proj=min(16, colbert_dim))
    return [
        ("dense float32 (exact)", "dense", {}, {}),
        ("dense int8", "dense", {"dense_format": "int8"}, {"rescore": False}),
        ("dense int8 + rescore", "dense", {"dense_format": "int8"}, {}),
        ("dense binary", "dense", {"dense_format": "binary"}, {"rescore": False}),
        ("dense binary + rescore", "dense", {"dense_format": "binary"}, {}),
        ("ColBERT float16", "colbert", {"float16": True}, {}),
        ("ColBERT int8", "colbert", {"colbert_format": "int8"}, {}),
        ("ColBERT pool 2", "colbert", {"pool_factor": 2, "float16": True}, {}),
        ("ColBERT pool 3", "colbert", {"pool_factor": 3, "float16": True}, {}),
        ("ColBERT pool 4", "colbert", {"pool_factor": 4, "float16": True}, {}),
        ("ColBERT int8 + pool 2", "colbert", {"colbert_format": "int8", "pool_factor": 2}, {}),
        ("MUVERA FDE only", "muvera", {"muvera": muvera, "fde_only": True}, {"rescore": False}),
        (f"MUVERA top {MUVERA_CANDIDATES} + MaxSim (float16)", "muvera", {"muvera": muvera, "float16": True},
         {"candidates": MUVERA_CANDIDATES}),
        (f"MUVERA top {MUVERA_CANDIDATES} + MaxSim (int8, pool 2)", "muvera",
         {"muvera": muvera, "colbert_format": "int8", "pool_factor": 2}, {"candidates": MUVERA_CANDIDATES}),
    ]


def measure(P, Q, label: str, held_out: int) -> list[dict]:
    """The table rows of one model: P, Q its passages' and queries' EncodeResults; query i < held_out's answer is
    passage i."""
    from m3jax.compact import compact_corpus, stored_bytes
    from m3jax.index import CorpusIndex

    exact = {"dense": CorpusIndex(dense=P.dense).search({"dense": Q.dense}, K)[1],
             "colbert": CorpusIndex(colbert=P.colbert, colbert_mask=P.colbert_mask).search(
                 {"colbert": Q.colbert, "colbert_mask": Q.colbert_mask}, K, "colbert")[1]}
    queries = {"dense": Q.dense, "colbert": Q.colbert, "colbert_mask": Q.colbert_mask}
    rows = []
    for name, rep, kw, search in settings(P.colbert.shape[-1]):
        kw = dict(kw)
        float16, fde_only = kw.pop("float16", False), kw.pop("fde_only", False)
        if rep == "dense":
            index_kw = compact_corpus(P.dense, **kw)
        else:
            colbert = P.colbert.astype(np.float16).astype(np.float32) if float16 else P.colbert
            index_kw = compact_corpus(colbert=colbert, colbert_mask=P.colbert_mask, **kw)
        size = stored_bytes(index_kw)
        if fde_only:
            index_kw = {k: index_kw[k] for k in ("muvera", "muvera_config")}
            size = {"muvera": size["muvera"]}
        _, got = CorpusIndex(**index_kw).search(queries, K, rep, **search)
        truth = exact["dense" if rep == "dense" else "colbert"]
        recall = np.mean([len(set(g) & set(t)) / K for g, t in zip(got.tolist(), truth.tolist(), strict=True)])
        found = np.mean([i in got[i] for i in range(held_out)])
        rows.append({"model": label, "setting": name, "recall@10": round(float(recall), 3),
                     "found@10": round(float(found), 3),
                     "bytes_per_passage": round(sum(size.values())), "parts": {k: round(v) for k, v in size.items()}})
        print(f"{label:>10}  {name:<42} recall@10 {recall:.3f}  found@10 {found:.3f}  "
              f"{sum(size.values()):>9,.0f} B/passage", flush=True)
    return rows


HELD_OUT = 60


def task_texts(quick: bool) -> tuple[list[dict], list[str], list[str]]:
    """(training rows, passages, queries): held-out passage / query i first, in order."""
    from m3jax.train.synthetic import retrieval_task

    rows, held_passages, held_queries = retrieval_task(seed=0, held_out=HELD_OUT)
    passages = list(dict.fromkeys(held_passages + [p for r in rows for p in r["pos"]]))
    assert passages[:HELD_OUT] == held_passages  # held-out passages are no training passages
    queries = held_queries + [r["query"] for r in rows[:(40 if quick else 240)]]
    return rows, passages, queries


def encode(model_dir, passages, queries):
    from m3jax.api import BGEM3

    m = BGEM3(str(model_dir), use_fp16=False, show_progress=False)
    return m.encode_padded(passages, max_length=40), m.encode_padded(queries, max_length=24)


def fine_tune(rows: list[dict], work: Path) -> Path:
    """`m3jax train` on the synthetic task, tests/test_train_learns.py's settings; returns the final model."""
    from m3jax.random_weights import random_m3jax_dir

    data = work / "train.jsonl"
    data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    cmd = [sys.executable, "-m", "m3jax", "train", str(data), "--model", str(random_m3jax_dir("tiny")),
           "--output", str(work / "run"), "--train-group-size", "4", "--query-max-len", "24",
           "--passage-max-len", "40", "--unified-finetuning", "--per-device-batch-size", "8", "--max-steps", "120",
           "--learning-rate", "5e-3", "--warmup-ratio", "0.1", "--weight-decay", "0.01", "--no-dropout",
           "--save-steps", "1000"]
    subprocess.run(cmd, check=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                   stderr=subprocess.DEVNULL)  # its progress bar; a failure still raises
    return work / "run" / "final"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=None, help="folder for results.json (default: a temporary one)")
    args = ap.parse_args(argv)
    from m3jax.config import M3Config
    from m3jax.testing import write_random_release

    t0 = time.time()
    out = Path(args.out or tempfile.mkdtemp(prefix="compact_fidelity_"))
    out.mkdir(parents=True, exist_ok=True)
    rows, passages, queries = task_texts(args.quick)
    print(f"{len(passages)} passages, {len(queries)} queries", flush=True)
    width = dict(hidden_size=32, intermediate_size=64, colbert_dim=32) if args.quick else \
        dict(hidden_size=256, intermediate_size=512, colbert_dim=256)
    release = write_random_release(out / "random", M3Config.tiny(**width), seed=1)
    results = measure(*encode(release, passages, queries), "random", HELD_OUT)
    if not args.quick:
        results += measure(*encode(fine_tune(rows, out), passages, queries), "fine-tuned", HELD_OUT)
    (out / "results.json").write_text(json.dumps({"passages": len(passages), "queries": len(queries), "k": K,
                                                  "rows": results, "wall_s": round(time.time() - t0, 1)}, indent=1))
    print(f"written: {out / 'results.json'} ({time.time() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
