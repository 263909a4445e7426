"""Notebooks are tested artefacts: executed top to bottom on a tiny random model."""

import os
from pathlib import Path

import nbformat
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[1]


def test_quickstart_notebook_runs(tmp_path, monkeypatch):
    monkeypatch.setenv("M3JAX_NOTEBOOK_SIZE", "tiny")
    monkeypatch.setenv("M3JAX_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    nb = nbformat.read(ROOT / "colab" / "quickstart.ipynb", as_version=4)
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    text = "\n".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert "RANDOM WEIGHTS of the tiny architecture" in text
    for line in ("dense", "lexical", "colbert", "hybrid", "colbert+sparse+dense"):
        assert line in text
    errors = [o for c in nb.cells for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors


def test_evaluate_notebook_runs(tmp_path, monkeypatch):
    import json

    monkeypatch.setenv("M3JAX_NOTEBOOK_SIZE", "tiny")
    monkeypatch.setenv("M3JAX_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    nb = nbformat.read(ROOT / "colab" / "evaluate.ipynb", as_version=4)
    assert "colab.research.google.com/assets/colab-badge.svg" in nb.cells[0].source
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    errors = [o for c in nb.cells for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors
    text = "\n".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert "m3jax is already installed: not installing" in text and "runtime: " in text
    assert "RANDOM WEIGHTS of the tiny architecture" in text
    saved = json.loads((tmp_path / "eval-results.json").read_text())
    assert list(saved["metrics"]) == ["dense", "sparse", "colbert", "hybrid", "rrf"]
    for mode, values in saved["metrics"].items():
        assert f"{mode}  (39 queries, 40 passages, top 100" in text
        assert f"nDCG@10     {values['ndcg@10']:.4f}" in text
    for png in ("metrics.png", "scores.png"):
        assert (tmp_path / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
