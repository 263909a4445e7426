"""Conversion both ways, the command-line tools, and bad checkpoints."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from m3jax.checkpoint import (
    CheckpointError,
    HubUnavailableError,
    convert_release,
    export_release,
    load_params,
    resolve,
)
from m3jax.config import ConfigError
from m3jax.weights import ConversionError
from tests.helpers import SENTENCES, long_text
from tests.parity import check_parity, flag_outputs, flag_outputs_float64, m3jax_outputs

ROOT = Path(__file__).resolve().parents[1]


def run_tool(script, *args):
    return subprocess.run([sys.executable, str(ROOT / "convert" / script), *map(str, args)], capture_output=True,
                          text=True, cwd=ROOT, timeout=300)


@pytest.mark.parametrize("name,fmt", [("tiny", "bin"), ("tiny_bin", "safetensors"),
                                      ("tiny_narrow_colbert", "safetensors")])
def test_round_trip_through_flagembedding(release_dirs, flag_model_factory, tmp_path, name, fmt):
    src = release_dirs[name]
    m3 = tmp_path / "m3"
    r = run_tool("release_to_m3jax.py", src, m3)
    assert r.returncode == 0, r.stderr
    assert (m3 / "m3jax.json").is_file() and (m3 / "params").is_dir() and (m3 / "tokenizer.json").is_file()
    exported = tmp_path / "exported"
    r = run_tool("m3jax_to_release.py", m3, exported, "--format", fmt)
    assert r.returncode == 0, r.stderr
    weights = "model.safetensors" if fmt == "safetensors" else "pytorch_model.bin"
    assert {weights, "colbert_linear.pt", "sparse_linear.pt", "config.json", "tokenizer.json"} <= {
        p.name for p in exported.iterdir()}
    heads = torch.load(exported / "colbert_linear.pt", weights_only=True)
    assert heads["weight"].dtype == torch.float16  # as the release stores them

    texts = SENTENCES + [long_text(600, seed=9)]
    cfg, _, _ = load_params(m3)
    fe = flag_model_factory(src, colbert_dim=cfg.colbert_dim)
    batch, ref = flag_outputs(fe, texts)
    _, again = flag_outputs(flag_model_factory(exported, colbert_dim=cfg.colbert_dim), texts)
    for k in ref:  # the exported weights are the original weights, bit for bit
        np.testing.assert_array_equal(again[k], ref[k], err_msg=k)
    _, ours = m3jax_outputs(m3, batch)
    check_parity(ours, ref, flag_outputs_float64(fe, batch), batch["attention_mask"].numpy())


def test_library_conversion_matches_direct_release_load(release_dirs, tmp_path):
    src = release_dirs["tiny_prefixed"]
    dst = convert_release(src, tmp_path / "m3")
    cfg_a, params_a, _ = load_params(src)
    cfg_b, params_b, _ = load_params(dst)
    assert cfg_a == cfg_b
    flat_a = dict(_leaves(params_a))
    flat_b = dict(_leaves(params_b))
    assert flat_a.keys() == flat_b.keys()
    for k in flat_a:
        np.testing.assert_array_equal(np.asarray(flat_a[k]), np.asarray(flat_b[k]), err_msg=k)


def test_m3jax_dir_restores_straight_into_bfloat16(release_dirs, tmp_path):
    import jax.numpy as jnp

    dst = convert_release(release_dirs["tiny"], tmp_path / "m3")
    _, f32, _ = load_params(dst)
    _, bf16, _ = load_params(dst, dtype="bfloat16")
    for k, v in _leaves(bf16):
        want = jnp.float32 if "LayerNorm" in k else jnp.bfloat16
        assert v.dtype == want, k
        np.testing.assert_array_equal(np.asarray(v), np.asarray(dict(_leaves(f32))[k]).astype(want), err_msg=k)


def _leaves(tree, prefix=""):
    for k, v in tree.items():
        if isinstance(v, dict):
            yield from _leaves(v, f"{prefix}{k}/")
        else:
            yield f"{prefix}{k}", v


# ------------------------------------------------------------------------------------------------- bad input
@pytest.fixture
def broken(release_dirs, tmp_path):
    """A fresh copy of a tiny release directory to damage."""
    dst = tmp_path / "broken"
    shutil.copytree(release_dirs["tiny"], dst)
    return dst


def assert_nothing_written(dst: Path):
    assert not dst.exists()
    assert not [p for p in dst.parent.iterdir() if p.name.startswith(f".{dst.name}.partial")]


def test_truncated_safetensors(broken, tmp_path):
    f = broken / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    dst = tmp_path / "out"
    with pytest.raises(CheckpointError, match=r"model\.safetensors: cannot read"):
        convert_release(broken, dst)
    assert_nothing_written(dst)


def test_corrupted_bin(release_dirs, tmp_path):
    src = tmp_path / "bin"
    shutil.copytree(release_dirs["tiny_bin"], src)
    data = bytearray((src / "pytorch_model.bin").read_bytes())
    data[len(data) // 3: len(data) // 3 + 4096] = os.urandom(4096)
    (src / "pytorch_model.bin").write_bytes(bytes(data[: len(data) - 100]))
    with pytest.raises(CheckpointError, match=r"pytorch_model\.bin: cannot read PyTorch file"):
        load_params(src)


def test_missing_head_file(broken, tmp_path):
    (broken / "sparse_linear.pt").unlink()
    dst = tmp_path / "out"
    with pytest.raises(CheckpointError, match=r"sparse_linear\.pt"):
        convert_release(broken, dst)
    assert_nothing_written(dst)


def test_every_tensor_problem_reported_at_once(broken, tmp_path):
    sd = load_file(broken / "model.safetensors")
    sd["encoder.layer.0.attention.self.query.weight"] = torch.zeros(31, 32)  # wrong shape
    del sd["encoder.layer.1.output.dense.bias"]  # missing
    sd["encoder.layer.0.intermediate.dense.bias"][3] = float("nan")  # non-finite
    sd["encoder.layer.9.output.dense.bias"] = torch.zeros(32)  # unexpected (a third layer)
    save_file(sd, broken / "model.safetensors")
    dst = tmp_path / "out"
    with pytest.raises(ConversionError) as err:
        convert_release(broken, dst)
    msg = str(err.value)
    assert "4 problem(s)" in msg
    assert "'encoder.layer.0.attention.self.query.weight' has shape (31, 32), expected (32, 32)" in msg
    assert "missing tensor 'encoder.layer.1.output.dense.bias'" in msg
    assert "'encoder.layer.0.intermediate.dense.bias' has 1 non-finite value(s)" in msg
    assert "unexpected tensor 'encoder.layer.9.output.dense.bias'" in msg
    assert str(broken / "model.safetensors") in msg
    assert_nothing_written(dst)


def test_head_shape_mismatch_names_file(broken):
    torch.save({"weight": torch.zeros(1, 16).half(), "bias": torch.zeros(1).half()}, broken / "sparse_linear.pt")
    with pytest.raises(ConversionError, match=r"sparse_linear\.pt: tensor 'sparse_linear\.weight' has shape "
                                              r"\(1, 16\), expected \(1, 32\)"):
        load_params(broken)


@pytest.mark.parametrize("key,value,match", [
    ("position_embedding_type", "relative_key", "position_embedding_type='relative_key'"),
    ("hidden_act", "gelu_new", "hidden_act='gelu_new'"),
    ("model_type", "bert", "model_type 'bert' is not supported"),
    ("num_attention_heads", 5, "not divisible"),
])
def test_unsupported_config(broken, key, value, match):
    cfg = json.loads((broken / "config.json").read_text())
    cfg[key] = value
    (broken / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match=match) as err:
        load_params(broken)
    assert "config.json" in str(err.value)


def test_existing_destination_is_not_replaced_without_overwrite(release_dirs, tmp_path):
    dst = tmp_path / "m3"
    dst.mkdir()
    (dst / "keep.txt").write_text("mine")
    with pytest.raises(CheckpointError, match="already exists"):
        convert_release(release_dirs["tiny"], dst)
    assert (dst / "keep.txt").read_text() == "mine"
    convert_release(release_dirs["tiny"], dst, overwrite=True)
    assert not (dst / "keep.txt").exists() and (dst / "m3jax.json").is_file()


def test_failed_export_leaves_nothing(release_dirs, tmp_path, monkeypatch):
    import m3jax.checkpoint as ck

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(ck, "_copy_tokenizer", boom)
    dst = tmp_path / "exp"
    with pytest.raises(OSError, match="disk full"):
        export_release(release_dirs["tiny"], dst)
    assert_nothing_written(dst)


def test_cli_reports_errors_on_stderr(broken, tmp_path):
    (broken / "colbert_linear.pt").unlink()
    r = run_tool("release_to_m3jax.py", broken, tmp_path / "out")
    assert r.returncode == 2
    assert "colbert_linear.pt" in r.stderr and r.stdout == ""
    assert not (tmp_path / "out").exists()


def test_hub_id_offline_fails_with_one_clear_message(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(HubUnavailableError) as err:
        resolve("BAAI/bge-m3")
    msg = str(err.value)
    assert "'BAAI/bge-m3'" in msg and "Offline?" in msg and "release_to_m3jax.py" in msg
    with pytest.raises(CheckpointError, match="no such directory"):
        resolve(str(tmp_path / "not-there"))
