"""The main job (`m3jax demo`: `m3jax embed` over the sample corpus, then queries) offline, end to end, in a fresh
process; its printed hits checked against BGEM3's own scores for the same texts."""

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
HIT = re.compile(r"^\s+(-?\d+\.\d{4})  (\S+)  (.*)$")


def hits(lines: list[str]) -> dict[str, list[tuple[float, str, str]]]:
    out, mode = {}, None
    for line in lines:
        if line.rstrip(":") in ("dense", "sparse", "colbert", "hybrid"):
            mode = line.rstrip(":")
            out[mode] = []
        elif mode and (m := HIT.match(line)):
            out[mode].append((float(m.group(1)), m.group(2), m.group(3)))
    return out


def test_demo_offline_embeds_the_sample_and_queries_it(tmp_path):
    from m3jax.api import BGEM3
    from m3jax.embed.sample import sample_corpus

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hf"),
           "M3JAX_HOME": str(tmp_path / "home")}
    cmd = [sys.executable, "-m", "m3jax", "demo", "--random-size", "tiny", "--top", "3"]
    r = subprocess.run([*cmd, "--workdir", str(tmp_path / "w")], capture_output=True, text=True, env=env, cwd=ROOT,
                       timeout=600)
    assert r.returncode == 0, r.stderr
    first, *rest = r.stdout.splitlines()
    assert first.startswith("BAAI/bge-m3: not available") and "RANDOM WEIGHTS" in first
    assert any(line.startswith("m3jax embed: 200 texts, ") and "tokens/s" in line for line in rest), r.stdout
    assert (tmp_path / "w" / "embeddings" / "_manifest.json").is_file()
    model_dir = tmp_path / "home" / "random-tiny"
    assert (model_dir / "m3jax.json").is_file()

    # Every printed score is what BGEM3 computes for that query and text (ColBERT vectors are stored as float16).
    corpus = {x["id"]: x["text"] for x in sample_corpus()}
    ids = list(corpus)
    m = BGEM3(model_dir, use_fp16=False, show_progress=False)
    kw = dict(return_dense=True, return_sparse=True, return_colbert_vecs=True)
    q = m.encode(["What is the capital of Germany?"], max_length=64, **kw)
    p = m.encode([corpus[i] for i in ids], **kw)
    score = {"dense": p["dense_vecs"] @ q["dense_vecs"][0],
             "sparse": np.array([m.compute_lexical_matching_score(q["lexical_weights"][0], lw)
                                 for lw in p["lexical_weights"]]),
             "colbert": np.array([m.colbert_score(q["colbert_vecs"][0], v) for v in p["colbert_vecs"]])}
    score["hybrid"] = score["dense"] + 0.3 * score["sparse"] + score["colbert"]
    got = hits(rest)
    assert set(got) == {"dense", "sparse", "colbert", "hybrid"}
    for mode, rows in got.items():
        assert len(rows) == 3 and all(corpus[i] == text for _, i, text in rows), mode
        printed = np.array([s for s, _, _ in rows])
        want = np.array([score[mode][ids.index(i)] for _, i, _ in rows])
        np.testing.assert_allclose(printed, want, atol=2e-3, err_msg=mode)
        if mode != "hybrid":  # hybrid reranks the dense top-100 only
            np.testing.assert_allclose(printed, np.sort(score[mode])[::-1][:3], atol=2e-3, err_msg=mode)

    # Second run reuses the random checkpoint written by the first: same weights, same hits.
    r2 = subprocess.run([*cmd, "--random"], capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert r2.returncode == 0, r2.stderr
    assert hits(r2.stdout.splitlines()) == got
