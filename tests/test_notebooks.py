"""Notebooks are tested artefacts: executed top to bottom on a tiny random model; they install m3jax only from
the project's source URL."""

import os
import re
import tomllib
from pathlib import Path

import nbformat
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[1]


def execute(name: str, tmp_path: Path, monkeypatch, timeout: int = 600) -> tuple:
    """Runs colab/<name>.ipynb top to bottom in tmp_path on the tiny random model, offline; asserts that no cell
    raised. Returns (the executed notebook, every code cell's text output joined)."""
    monkeypatch.setenv("M3JAX_NOTEBOOK_SIZE", "tiny")
    monkeypatch.setenv("M3JAX_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    nb = nbformat.read(ROOT / "colab" / f"{name}.ipynb", as_version=4)
    NotebookClient(nb, timeout=timeout, kernel_name="python3",
                   resources={"metadata": {"path": str(tmp_path)}}).execute()
    errors = [o for c in nb.cells for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors
    return nb, "\n".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))


def test_quickstart_notebook_runs(tmp_path, monkeypatch):
    nb, text = execute("quickstart", tmp_path, monkeypatch)
    assert "RANDOM WEIGHTS of the tiny architecture" in text
    for line in ("dense", "lexical", "colbert", "hybrid", "colbert+sparse+dense"):
        assert line in text


def test_evaluate_notebook_runs(tmp_path, monkeypatch):
    import json

    nb, text = execute("evaluate", tmp_path, monkeypatch)
    assert "colab.research.google.com/assets/colab-badge.svg" in nb.cells[0].source
    assert "m3jax is already installed: not installing" in text and "runtime: " in text
    assert "RANDOM WEIGHTS of the tiny architecture" in text
    saved = json.loads((tmp_path / "eval-results.json").read_text())
    assert list(saved["metrics"]) == ["dense", "sparse", "colbert", "hybrid", "rrf"]
    for mode, values in saved["metrics"].items():
        assert f"{mode}  (39 queries, 40 passages, top 100" in text
        assert f"nDCG@10     {values['ndcg@10']:.4f}" in text
    for png in ("metrics.png", "scores.png"):
        assert (tmp_path / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_embed_notebook_runs(tmp_path, monkeypatch):
    import json

    import numpy as np

    from m3jax.embed import EmbeddingReader

    nb, text = execute("embed", tmp_path, monkeypatch)
    assert "colab.research.google.com/assets/colab-badge.svg" in nb.cells[0].source
    assert "m3jax is already installed: not installing" in text and "runtime: " in text
    assert "RANDOM WEIGHTS of the tiny architecture" in text
    # The job's output, read back here: one row per corpus line, in input order, under the corpus ids.
    corpus = [json.loads(line) for p in sorted((tmp_path / "corpus").glob("*.jsonl"))
              for line in p.read_text(encoding="utf-8").splitlines()]
    r = EmbeddingReader(tmp_path / "embeddings")
    ids = [c["id"] for c in corpus]
    assert len(corpus) == len(r) == 21 and r.ids().tolist() == ids
    assert f"21 rows, {r.manifest['tokens']} tokens, 1 truncated, 3 shards" in text
    assert "rerun: shards [0, 1, 2] were already complete and skipped" in text
    dense = r.dense()
    np.testing.assert_array_equal(np.load(tmp_path / "dense.npy"), dense)
    assert f"sparse:  CSR (21, 250002) float32, {r.sparse_csr().nnz} nonzeros" in text
    # Every mode returned k corpus ids per query; the dense scores are the stored vectors' dot products with the
    # same model's query vectors, recomputed here.
    saved = json.loads((tmp_path / "search-results.json").read_text())
    assert list(saved["results"]) == ["dense", "sparse", "colbert", "hybrid"]
    for res in saved["results"].values():
        assert len(res["ids"]) == len(saved["queries"]) == 4
        assert all(len(row) == 3 and set(row) <= set(ids) for row in res["ids"])
    from m3jax import Encoder
    from m3jax.random_weights import random_m3jax_dir

    q = Encoder.from_pretrained(random_m3jax_dir("tiny")).encode(saved["queries"], max_length=64, heads=("dense",))
    scores = q.dense @ dense.T
    got = saved["results"]["dense"]
    pos = np.array([[ids.index(i) for i in row] for row in got["ids"]])
    np.testing.assert_allclose(got["scores"], np.take_along_axis(scores, pos, 1), atol=1e-5)
    np.testing.assert_allclose(got["scores"], -np.sort(-scores, axis=1)[:, :3], atol=1e-5)
    # MCLS: the interval is recorded; only the long document's vector changes.
    mcls = EmbeddingReader(tmp_path / "embeddings-mcls")
    assert mcls.manifest["settings"]["mcls_interval"] == 256
    long = r.lengths() > 258
    assert long.sum() == 1 and "20 passages of at most 256 text tokens" in text
    assert np.abs(mcls.dense()[long] - dense[long]).max() > 1e-3
    assert np.abs(mcls.dense()[~long] - dense[~long]).max() <= 1e-6


def test_finetune_notebook_runs(tmp_path, monkeypatch):
    """The fine-tuning notebook on a tiny random model: trains, logs, gains recall@1, exports for FlagEmbedding."""
    import json
    import re

    from FlagEmbedding import BGEM3FlagModel

    nb, text = execute("finetune", tmp_path, monkeypatch, timeout=900)
    assert "colab.research.google.com/assets/colab-badge.svg" in nb.cells[0].source
    assert "m3jax is already installed: not installing" in text and "RANDOM WEIGHTS of the tiny architecture" in text
    log = [json.loads(line) for line in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(1, 121)) and "120 steps; final model:" in text
    assert (tmp_path / "train-loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = re.findall(r"^  (dense|sparse|colbert) +([0-9.]+) -> ([0-9.]+)$", text, flags=re.M)
    gains = {mode: float(after) - float(before) for mode, before, after in rows}
    assert sorted(gains) == ["colbert", "dense", "sparse"], text[-2000:]
    assert gains["sparse"] > 0.2 and gains["colbert"] > 0.2, gains  # the learning test's margins, loosely
    fe = BGEM3FlagModel(str(tmp_path / "bge-m3-tuned"), use_fp16=False, devices="cpu")
    assert fe.encode(["a query"], return_dense=True)["dense_vecs"].shape == (1, fe.model.model.config.hidden_size)


def test_rerank_distill_notebook_runs(tmp_path, monkeypatch):
    """The retrieval loop on tiny random models: embed a pool, mine negatives, score them with the re-ranker,
    fine-tune with distillation, evaluate each mode with and without re-ranking, plot the stages."""
    import json

    nb, text = execute("rerank_distill", tmp_path, monkeypatch, timeout=900)
    assert "colab.research.google.com/assets/colab-badge.svg" in nb.cells[0].source
    assert "m3jax is already installed: not installing" in text and "RANDOM WEIGHTS of the tiny architecture" in text
    read = lambda name: [json.loads(x) for x in (tmp_path / name).read_text().splitlines()]  # noqa: E731
    pool = {json.loads(x)["text"] for x in (tmp_path / "pool.jsonl").read_text().splitlines()}
    mined, scored = read("mined.jsonl"), read("scored.jsonl")
    assert len(mined) == len(scored) == 160 and "embedded " in text
    assert all(len(r["neg"]) == 7 and set(r["neg"]) <= pool and not set(r["neg"]) & set(r["pos"]) for r in mined)
    assert all(len(r["pos_scores"]) == 1 and len(r["neg_scores"]) == 7 for r in scored)
    assert "40 steps; final model:" in text
    for name in ("eval-before.json", "eval-after.json"):
        saved = json.loads((tmp_path / name).read_text())
        assert list(saved["metrics"]) == ["dense", "hybrid", "dense+rerank", "hybrid+rerank"]
        assert saved["settings"]["rerank_depth"] == 20
    assert (tmp_path / "stages.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def source_url() -> str:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["urls"]["Source"]


def install_cell(name: str) -> str:
    nb = nbformat.read(ROOT / "colab" / f"{name}.ipynb", as_version=4)
    return next(c.source for c in nb.cells if c.cell_type == "code")


NOTEBOOKS = sorted(p.stem for p in (ROOT / "colab").glob("*.ipynb"))


def test_notebooks_install_from_the_project_source_only():
    """Every notebook's first code cell installs from pyproject.toml's [project.urls] Source, never by a bare
    package name (someone else could register it on PyPI), and so do the README's install lines."""
    url = source_url()
    assert url.startswith("https://") and len(NOTEBOOKS) == 5
    for name in NOTEBOOKS:
        cell = install_cell(name)
        assert re.findall(r'^M3JAX_SOURCE = "(.*)"$', cell, re.M) == [url], name
        assert re.search(r'f"m3jax\[[a-z,]+\] @ git\+\{M3JAX_SOURCE\}"', cell), name
    readme = (ROOT / "README.md").read_text()
    for line in re.findall(r"pip install[^\n]*m3jax\[[^\n]*", readme):
        assert "-e " in line or f"git+{url}" in line, line
    # Every mention of the repository (install lines, Open-in-Colab links) names the same one.
    owner = url.removeprefix("https://github.com/").removesuffix("/m3jax")
    for path in [ROOT / "README.md", *(ROOT / "docs").glob("*.md"), *(ROOT / "colab").glob("*.ipynb")]:
        for found in re.findall(r"github(?:\.com)?/([^/\s\"')]+)/m3jax\b", path.read_text()):
            assert found == owner, f"{path.relative_to(ROOT)} names github.com/{found}/m3jax, not {url}"


def test_install_cell_with_the_placeholder_stops_with_one_line(monkeypatch, capsys):
    """Where m3jax is not installed (a fresh Colab runtime) and M3JAX_SOURCE is still the placeholder, the cell
    stops with a one-line instruction instead of a pip error; it installs nothing."""
    import importlib.util
    import subprocess

    import pytest

    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: pytest.fail(f"pip ran: {a}"))
    for name in NOTEBOOKS:
        cell = install_cell(name).split("\nimport jax")[0]  # the install part
        with pytest.raises(SystemExit) as e:
            exec(compile(cell, name, "exec"), {"__name__": "__main__"})
        assert "M3JAX_SOURCE" in str(e.value) and "\n" not in str(e.value), name
