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
