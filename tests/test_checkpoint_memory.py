"""Checkpoint memory and format: conversion holds one tensor at a time, loading maps the parameters instead of
copying them, directories of the previous format (orbax) still load, and params.safetensors is plain safetensors.

Peak RSS is VmHWM of fresh child processes (a child's ru_maxrss would start from pytest's peak). The model is a
"medium" one whose 250,002 x 256 word-embedding table (256 MB) is 95% of its weights (bge-m3's 1 GB table is
45%), big against each process's fixed baseline: a copy of it, or the table held twice, shows in the peak.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from m3jax import checkpoint
from m3jax.config import M3Config
from m3jax.weights import flatten, param_shapes

ROOT = Path(__file__).resolve().parents[1]
MEDIUM = M3Config.tiny(hidden_size=256, num_heads=4, intermediate_size=512, colbert_dim=256)
MB = 2**20

CHILD = """
import json, sys
import flax.nnx, jax, numpy as np, torch
import m3jax.checkpoint as ck
from m3jax.engine import Encoder
jax.devices()
what, args = sys.argv[1], sys.argv[2:]
hwm = lambda: int([l for l in open("/proc/self/status") if l.startswith("VmHWM:")][0].split()[1]) * 1024
out = {}
if what == "convert":
    ck.convert_release(args[0], args[1])
elif what == "encode":
    enc = Encoder.from_pretrained(args[0])
    out["load"] = hwm()
    res = enc.encode(["BGE M3 embeds text in many languages.", "北京是中华人民共和国的首都。", "Берлин — столица."],
                     max_length=64)
    out["dense_finite"] = bool(np.isfinite(res.dense).all())
out["peak"] = hwm()
print(json.dumps(out))
"""


def child(*args) -> dict:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    r = subprocess.run([sys.executable, "-c", CHILD, *map(str, args)], capture_output=True, text=True, env=env,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.splitlines()[-1])


@pytest.fixture(scope="module")
def medium(tmp_path_factory):
    from m3jax.testing import write_random_release

    root = tmp_path_factory.mktemp("medium")
    return write_random_release(root / "release", MEDIUM, seed=11), root / "m3"


def test_conversion_holds_one_tensor_at_a_time(medium):
    release, m3 = medium
    weights = (release / "model.safetensors").stat().st_size
    table = 4 * MEDIUM.vocab_size * MEDIUM.hidden_size
    base = child("baseline")["peak"]  # the same imports, nothing converted
    peak = child("convert", release, m3)["peak"]
    bound = base + 1.5 * weights
    print(f"\nconversion peak RSS {peak / MB:.0f} MiB: baseline {base / MB:.0f} MiB + {(peak - base) / MB:.0f} MiB "
          f"for {weights / MB:.0f} MiB of weights (word embeddings {table / MB:.0f} MiB); bound {bound / MB:.0f} MiB")
    assert table > 0.9 * weights  # the table is most of the weights: holding it twice would show
    assert peak <= bound
    # Parity: what the m3jax directory holds is the release's tensors, bit for bit.
    _, ref = checkpoint.read_release(release)
    _, got = checkpoint.read_m3jax(m3)
    ref, got = flatten(ref), flatten(got)
    assert ref.keys() == got.keys()
    for k in ref:
        np.testing.assert_array_equal(np.asarray(got[k]), ref[k], err_msg=k)


def test_loading_leaves_the_word_embeddings_on_disk(medium):
    """Load and encode: the medium model's table (256 MB) costs only the pages of the rows used, so its peak stays
    within the tiny model's plus the medium model's other weights and half its table. A loader that holds
    the table once (let alone a staging copy besides) is past that bound."""
    release, m3 = medium
    if not checkpoint.is_m3jax_dir(m3):
        checkpoint.convert_release(release, m3)
    tiny = checkpoint.convert_release(write_tiny(m3.parent), m3.parent / "tiny-m3")
    weights = (m3 / "params" / checkpoint.PARAMS_FILE).stat().st_size
    table = 4 * MEDIUM.vocab_size * MEDIUM.hidden_size
    base, res = child("encode", tiny), child("encode", m3)
    assert base["dense_finite"] and res["dense_finite"]
    bound = base["peak"] + (weights - table) + 0.5 * table
    print(f"\nload + encode peak RSS: tiny model {base['peak'] / MB:.0f} MiB, medium {res['peak'] / MB:.0f} MiB "
          f"(after load {res['load'] / MB:.0f} MiB) for {weights / MB:.0f} MiB of weights; bound {bound / MB:.0f} MiB")
    assert res["peak"] <= bound


def write_tiny(root: Path) -> Path:
    from m3jax.testing import write_random_release

    return write_random_release(root / "tiny-release", M3Config.tiny(), seed=12)


def write_version_1(dst: Path, cfg: M3Config, params: dict, tokenizer_dir: Path) -> None:
    """An m3jax directory as format version 1 wrote it: params/ an orbax checkpoint of the float32 tree."""
    import orbax.checkpoint as ocp

    dst.mkdir()
    ckptr = ocp.Checkpointer(ocp.StandardCheckpointHandler())
    ckptr.save((dst / "params").absolute(), args=ocp.args.StandardSave(
        jax.tree_util.tree_map(lambda x: np.asarray(x, np.float32), params)))
    ckptr.close()
    (dst / "config.json").write_text(json.dumps(cfg.to_hf_config(), indent=2))
    checkpoint._copy_tokenizer(tokenizer_dir, dst)
    (dst / checkpoint.MARKER).write_text(json.dumps({"format": "m3jax", "version": 1, "colbert_dim": cfg.colbert_dim}))


def test_version_1_directories_still_load(release_dirs, tmp_path):
    from m3jax.engine import Encoder

    src = release_dirs["tiny_narrow_colbert"]
    cfg, ref = checkpoint.read_release(src)
    write_version_1(tmp_path / "v1", cfg, ref, src)
    v2 = checkpoint.convert_release(src, tmp_path / "v2")
    assert json.loads((v2 / checkpoint.MARKER).read_text())["version"] == checkpoint.FORMAT_VERSION == 2
    for d in (tmp_path / "v1", v2):
        got_cfg, got = checkpoint.read_m3jax(d)
        assert got_cfg == cfg
        for k, v in flatten(ref).items():
            np.testing.assert_array_equal(np.asarray(flatten(got)[k]), v, err_msg=f"{d.name}: {k}")
    texts = ["BGE M3 is an embedding model.", "北京是中华人民共和国的首都。"]
    a = Encoder.from_pretrained(tmp_path / "v1").encode(texts, max_length=32)
    b = Encoder.from_pretrained(v2).encode(texts, max_length=32)
    np.testing.assert_array_equal(a.dense, b.dense)
    np.testing.assert_array_equal(a.colbert, b.colbert)


def test_params_file_is_safetensors_mapped_without_copy(release_dirs, tmp_path):
    from safetensors.numpy import load_file

    src = release_dirs["tiny"]
    m3 = checkpoint.convert_release(src, tmp_path / "m3")
    path = m3 / "params" / checkpoint.PARAMS_FILE
    cfg, params = checkpoint.read_m3jax(m3)
    flat = flatten(params)
    plain = load_file(str(path))  # safetensors' own reader
    assert plain.keys() == flat.keys() == param_shapes(cfg).keys()
    for k, v in plain.items():
        np.testing.assert_array_equal(np.asarray(flat[k]), v, err_msg=k)
    # Restored narrower: each matmul parameter cast from the stored float32, LayerNorm kept float32.
    _, narrow = checkpoint.read_m3jax(m3, dtype="bfloat16")
    for k, v in flatten(narrow).items():
        want = plain[k] if "LayerNorm" in k else plain[k].astype(jax.numpy.bfloat16)
        assert v.dtype == want.dtype, k
        np.testing.assert_array_equal(np.asarray(v), want, err_msg=k)
    # Every tensor whose size is a multiple of 64 bytes starts aligned, and its loaded array is the mapped file
    # itself: its address lies in a mapping of params.safetensors (/proc/self/maps), not in a copy.
    aligned = [k for k, v in plain.items() if v.nbytes % checkpoint.ALIGN == 0]
    assert len(aligned) >= len(plain) - 1  # only sparse_linear/bias (4 bytes) is not
    if not Path("/proc/self/maps").exists():
        pytest.skip("no /proc/self/maps on this OS: cannot see where the loaded arrays live")
    ranges = [tuple(int(x, 16) for x in line.split()[0].split("-")) for line in open("/proc/self/maps")
              if line.rstrip().endswith(str(path.resolve()))]
    assert ranges, "params.safetensors is not mapped"
    copied = [k for k in aligned if not any(lo <= flat[k].unsafe_buffer_pointer() < hi for lo, hi in ranges)]
    assert not copied, f"copied instead of mapped: {copied}"


def test_bad_params_file_names_the_problem(release_dirs, tmp_path):
    src = release_dirs["tiny"]
    m3 = checkpoint.convert_release(src, tmp_path / "m3")
    path = m3 / "params" / checkpoint.PARAMS_FILE
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(checkpoint.CheckpointError, match="truncated"):
        checkpoint.read_m3jax(m3)
    # A params file for another config: every mismatching parameter is named.
    other = checkpoint.convert_release(release_dirs["tiny_narrow_colbert"], tmp_path / "other")
    path.write_bytes((other / "params" / checkpoint.PARAMS_FILE).read_bytes())
    with pytest.raises(checkpoint.CheckpointError, match=r"encoder/layer/attention/self/query/kernel.*is F32 \(3, 48"):
        checkpoint.read_m3jax(m3)


def test_save_rejects_a_tree_that_does_not_match(release_dirs, tmp_path):
    cfg, params = checkpoint.read_release(release_dirs["tiny"])
    del params["sparse_linear"]["bias"]
    params["colbert_linear"]["kernel"] = np.zeros((3, 3), np.float32)
    params["extra"] = np.zeros(2, np.float32)
    with pytest.raises(checkpoint.CheckpointError) as e:
        checkpoint.save_m3jax(tmp_path / "m3", cfg, params, release_dirs["tiny"])
    msg = str(e.value)
    assert "missing parameter 'sparse_linear/bias'" in msg and "unexpected parameter 'extra'" in msg
    assert "'colbert_linear/kernel' has shape (3, 3), expected (32, 32)" in msg
    assert not (tmp_path / "m3").exists() and not list(tmp_path.iterdir())


def test_failed_conversion_leaves_nothing(release_dirs, tmp_path):
    """Conversion streams into a temporary directory: a bad tensor found after others were written leaves neither
    the destination nor the temporary directory behind, and every problem is reported."""
    import shutil

    from safetensors.numpy import load_file, save_file

    from m3jax.weights import ConversionError

    bad = tmp_path / "bad"
    shutil.copytree(release_dirs["tiny"], bad)
    sd = load_file(str(bad / "model.safetensors"))
    sd["encoder.layer.1.output.dense.weight"][0, 0] = np.nan  # late in the file: earlier tensors are written
    del sd["encoder.layer.0.intermediate.dense.bias"]
    save_file(sd, str(bad / "model.safetensors"))
    out = tmp_path / "out"
    with pytest.raises(ConversionError) as e:
        checkpoint.convert_release(bad, out)
    assert len(e.value.problems) == 2 and "non-finite" in str(e.value) and "intermediate.dense.bias" in str(e.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad"]
