"""Compact outputs through `m3jax embed`: int8 / binary dense and int8 ColBERT quantized in the compiled step, ColBERT
token pooling on the host, MUVERA FDEs in the step; the manifest records every setting and the calibration ranges;
the reader and its CorpusIndex read them back. References: the float outputs of encode_padded (the same model and
buckets), quantized, pooled and encoded by m3jax.compact, whose functions tests/test_compact*.py pin to
sentence-transformers, PyLate and fastembed. Tiny model, the shapes of tests/test_embed.py."""

import json
from pathlib import Path

import numpy as np
import pytest

from m3jax.api import BGEM3
from m3jax.compact import MuveraConfig, fde, int8_ranges, pool_tokens, quantize
from m3jax.embed import EmbeddingReader, EmbedError, embed
from tests.helpers import SENTENCES, mixed

TEXTS = SENTENCES + mixed(20, seed=5, max_words=30)
BUCKETS = (32, 64, 8192)
SET = dict(max_length=64, batch_size=4, length_buckets=BUCKETS, quiet=True, files=False)
MUVERA = MuveraConfig(dim=32, k_sim=3, dim_proj=8, r_reps=2)


@pytest.fixture(scope="module")
def model_dir():
    from m3jax.testing import random_m3jax_dir

    return random_m3jax_dir("tiny")


@pytest.fixture(scope="module")
def ref(model_dir):
    m = BGEM3(model_dir, use_fp16=False, length_buckets=BUCKETS, batch_size=4, show_progress=False)
    return m.encode_padded(TEXTS, max_length=64)


def assert_int8_codes(codes, x, ranges):
    """codes == sentence-transformers' int8 of x, computed in float64; a value within 1e-3 of a bin edge (where
    float32 rounding of x decides) may land in the next bin."""
    lo, hi = np.asarray(ranges, np.float64)
    step = np.where(hi == lo, 1.0, (hi - lo) / 255)
    t = (np.asarray(x, np.float64) - lo) / step
    want = np.clip(np.floor(t), 0, 255) - 128
    edge = np.abs(t - np.round(t)) < 1e-3
    assert np.abs(codes - want).max() <= 1
    np.testing.assert_array_equal(codes[~edge], want[~edge])


def test_int8_pooled_muvera_job(model_dir, ref, tmp_path):
    out = tmp_path / "o"
    man = embed(TEXTS, model_dir, out, dense_dtype="int8", colbert_dtype="int8", pool_factor=2, muvera=MUVERA,
                calibration_rows=20, **SET)
    c = man["compact"]
    assert (c["dense"], c["colbert"], c["pool_factor"], c["muvera"]) == ("int8", "int8", 2, MUVERA.__dict__)
    assert man["settings"]["calibration_rows"] == 20 and man["dims"] == {"dense": 32, "colbert": 32}
    # ranges calibrated on the first 20 rows: dense vectors and every ColBERT vector of them
    np.testing.assert_allclose(c["int8_ranges"]["dense"], np.asarray(int8_ranges(ref.dense[:20])), atol=1e-6)
    np.testing.assert_allclose(c["int8_ranges"]["colbert"],
                               np.asarray(int8_ranges(ref.colbert[:20][ref.colbert_mask[:20]])), atol=1e-6)
    r = EmbeddingReader(out)
    ranges = r.int8_ranges
    dense = r.dense()
    assert dense.dtype == np.int8 and dense.shape == (len(TEXTS), 32)
    assert_int8_codes(dense, ref.dense, ranges["dense"])
    vecs, offsets = r.colbert()
    assert vecs.dtype == np.int8
    for i in range(len(TEXTS)):
        pooled = pool_tokens(ref.colbert[i][ref.colbert_mask[i]], 2)
        got = vecs[offsets[i]:offsets[i + 1]]
        assert len(got) == len(pooled), i
        np.testing.assert_array_equal(got, np.asarray(quantize(pooled, "int8", ranges["colbert"])))
    want = np.asarray(fde(ref.colbert, ref.colbert_mask, MUVERA))
    np.testing.assert_allclose(r.muvera(), want, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="dense is stored as int8 codes; read them as int8"):
        r.dense("float32")
    idx = r.to_index()
    assert (idx.dense_format, idx.colbert_format, idx.muvera_config) == ("int8", "int8", MUVERA)
    _, ids = idx.search({"colbert": ref.colbert[:4], "colbert_mask": ref.colbert_mask[:4]}, 3, "muvera")
    assert ids.shape == (4, 3)
    # the ranges are part of the job: a rerun resumes with the recorded ones, without calibrating again
    job = json.loads((Path(out) / "_job.json").read_text())
    assert job["int8_ranges"] == c["int8_ranges"]
    again = embed(TEXTS, model_dir, out, dense_dtype="int8", colbert_dtype="int8", pool_factor=2, muvera=MUVERA,
                  calibration_rows=20, **SET)
    assert again["run"]["skipped_shards"] == [0] and again["compact"] == c


def test_binary_dense_and_given_ranges(model_dir, ref, tmp_path):
    man = embed(TEXTS, model_dir, tmp_path / "b", dense_dtype="binary", outputs=("dense",), **SET)
    assert man["schema"]["dense"] == "fixed_size_list<item: int8>[4]"
    codes = EmbeddingReader(tmp_path / "b").dense()
    bits = np.unpackbits((codes.astype(np.int16) + 128).astype(np.uint8), axis=1)
    sure = np.abs(ref.dense) > 1e-6  # the sign of a value at float32 rounding of 0 is not defined
    np.testing.assert_array_equal(bits[sure], (ref.dense > 0)[sure])
    given = {"dense": np.stack([ref.dense.min(0) - 0.1, ref.dense.max(0) + 0.1])}
    man = embed(iter(TEXTS), model_dir, tmp_path / "g", dense_dtype="int8", outputs=("dense",), int8_ranges=given,
                **SET)
    np.testing.assert_array_equal(np.asarray(man["compact"]["int8_ranges"]["dense"], np.float32), given["dense"])
    assert "calibration_rows" not in man["settings"] and man["settings"]["int8_ranges_sha256"]
    assert_int8_codes(EmbeddingReader(tmp_path / "g").dense(), ref.dense, given["dense"])


def test_compact_settings_errors(model_dir, tmp_path):
    with pytest.raises(EmbedError, match="a one-pass generator cannot give twice: pass a list or files"):
        embed((t for t in TEXTS), model_dir, tmp_path / "x", dense_dtype="int8", outputs=("dense",), **SET)
    with pytest.raises(EmbedError, match=r"int8_ranges\['dense'\]: expected shape \(2, 32\)"):
        embed(TEXTS, model_dir, tmp_path / "y", dense_dtype="int8", outputs=("dense",),
              int8_ranges={"dense": np.zeros((2, 8))}, **SET)
    with pytest.raises(ValueError, match="dense_dtype must be one of"):
        embed(TEXTS, model_dir, tmp_path / "z", dense_dtype="int4", **SET)
    with pytest.raises(ValueError, match="colbert_dtype must be one of"):
        embed(TEXTS, model_dir, tmp_path / "z", colbert_dtype="binary", **SET)
    with pytest.raises(ValueError, match="pool_factor pools the ColBERT vectors"):
        embed(TEXTS, model_dir, tmp_path / "z", outputs=("dense",), pool_factor=2, **SET)
    with pytest.raises(ValueError, match="MuveraConfig.dim is 16, the model's ColBERT vectors have 32"):
        embed(TEXTS, model_dir, tmp_path / "z", muvera=MuveraConfig(dim=16), **SET)


def test_cli_flags(model_dir, tmp_path):
    from m3jax.cli import main

    src = tmp_path / "c.txt"
    src.write_text("".join(t + "\n" for t in TEXTS[:9]), encoding="utf-8")
    args = ["embed", str(src), "--model", str(model_dir), "--output", str(tmp_path / "o"), "--max-length", "64",
            "--batch-size", "4", "--length-buckets", "32,64,8192", "--outputs", "dense,colbert", "--quiet",
            "--dense-dtype", "binary", "--colbert-dtype", "int8", "--calibration-rows", "5", "--pool-factor", "3",
            "--muvera"]
    assert main(args) == 0
    r = EmbeddingReader(tmp_path / "o")
    assert (r.compact["dense"], r.compact["colbert"], r.compact["pool_factor"]) == ("binary", "int8", 3)
    assert r.muvera_config == MuveraConfig(dim=32)  # fastembed's defaults at the model's width
    assert r.muvera().shape == (9, 20 * 32 * 16) and r.dense().shape == (9, 4)
    assert r.manifest["settings"]["calibration_rows"] == 5 and set(r.int8_ranges) == {"colbert"}
