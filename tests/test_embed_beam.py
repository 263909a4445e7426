"""The Apache Beam RunInference handler gives `m3jax embed`'s rows: bit-identical for the same batch, and within
float32 rounding through a DirectRunner pipeline that batches differently (Create -> RunInference ->
WriteToParquet with the job's schema)."""

import glob

import numpy as np
import pytest

beam = pytest.importorskip("apache_beam", reason="apache-beam is not installed (pip install -e '.[beam]'; it is "
                                                  "part of the test extra)")

import pyarrow.parquet as pq  # noqa: E402

from m3jax.embed import EmbeddingReader, embed  # noqa: E402
from m3jax.embed.beam import M3EmbedHandler, to_parquet_row  # noqa: E402
from tests.helpers import SENTENCES, mixed  # noqa: E402

TEXTS = SENTENCES + mixed(25, seed=3, max_words=40) + [""]
IDS = [f"doc-{i}" for i in range(len(TEXTS))]
BUCKETS = (32, 64, 8192)
SET = dict(max_length=64, batch_size=4, length_buckets=BUCKETS, colbert_dtype="float16")
FIELDS = ("tokens", "truncated", "dense", "sparse_ids", "sparse_weights", "colbert")


@pytest.fixture(scope="module")
def model_dir():
    from m3jax.testing import random_m3jax_dir

    return random_m3jax_dir("tiny")


@pytest.fixture(scope="module")
def job_rows(model_dir, tmp_path_factory):
    """`m3jax embed` over the texts in one window: {id: Parquet row as numpy}."""
    out = tmp_path_factory.mktemp("job") / "out"
    embed(list(zip(IDS, TEXTS, strict=True)), model_dir, out, shard_size=1000, window=1000, quiet=True, **SET)
    (table,) = EmbeddingReader(out).iter_shards()
    return table.schema, rows_of(table)


def rows_of(table) -> dict:
    out = {}
    for r in table.to_pylist():
        out[r["id"]] = {"tokens": r["tokens"], "truncated": r["truncated"], "dense": np.array(r["dense"]),
                        "sparse_ids": np.array(r["sparse_ids"], np.int32),
                        "sparse_weights": np.array(r["sparse_weights"], np.float32),
                        "colbert": np.array(r["colbert"], np.float16).reshape(-1, 32)}
    return out


def test_run_inference_on_one_window_is_bit_identical_to_embed(model_dir, job_rows):
    handler = M3EmbedHandler(model_dir, **SET)
    model = handler.load_model()
    pairs = list(zip(IDS, TEXTS, strict=True))
    results = list(handler.run_inference(pairs, model))
    _, want = job_rows
    assert [r.example for r in results] == pairs
    for r in results:
        got = r.inference
        assert got["id"] == r.example[0] and set(got) == {"id", *FIELDS}
        assert got["dense"].dtype == np.float32 and got["colbert"].dtype == np.float16
        for f in FIELDS:
            np.testing.assert_array_equal(got[f], want[got["id"]][f], err_msg=f"{got['id']} {f}")
    with pytest.raises(TypeError, match="element 1 of the batch: expected an \\(id, text: str\\) pair"):
        handler.run_inference([("a", "x"), "no id"], model)


def test_direct_runner_pipeline_equals_embed(model_dir, job_rows, tmp_path):
    """Batches of at most 8 (the job planned all texts together), so padded shapes differ: float32 outputs agree to
    1e-5, float16 ColBERT to one float16 step, sparse ids exactly except where a weight is within 1e-5 of 0."""
    from apache_beam.ml.inference.base import RunInference

    handler = M3EmbedHandler(model_dir, max_batch_size=8, **SET)
    schema, want = job_rows
    with beam.Pipeline(runner="DirectRunner") as p:
        _ = (p | beam.Create(list(zip(IDS, TEXTS, strict=True))) | RunInference(handler)
             | beam.Map(to_parquet_row)
             | beam.io.WriteToParquet(str(tmp_path / "part"), handler.parquet_schema(32, 32), num_shards=1))
    (path,) = glob.glob(str(tmp_path / "part*"))
    table = pq.read_table(path)
    assert table.schema.remove_metadata() == schema.remove_metadata()  # the job's Parquet schema exactly
    got = rows_of(table)
    assert sorted(got) == sorted(want)
    print(f"\nDirectRunner vs m3jax embed: max |dense diff| "
          f"{max(float(np.abs(g['dense'] - want[k]['dense']).max()) for k, g in got.items()):.2e}")
    for k, g in got.items():
        w = want[k]
        assert (g["tokens"], g["truncated"]) == (w["tokens"], w["truncated"]), k
        np.testing.assert_allclose(g["dense"], w["dense"], atol=1e-5, rtol=0, err_msg=k)
        np.testing.assert_allclose(g["colbert"].astype(np.float32), w["colbert"].astype(np.float32),
                                   atol=2**-10, rtol=2**-10, err_msg=k)
        gs, ws = (dict(zip(x["sparse_ids"].tolist(), x["sparse_weights"], strict=True)) for x in (g, w))
        assert all(min(gs.get(i, 0), ws.get(i, 0)) == 0 and max(gs.get(i, 0), ws.get(i, 0)) < 1e-5
                   for i in set(gs) ^ set(ws)), k
        np.testing.assert_allclose([gs[i] for i in set(gs) & set(ws)], [ws[i] for i in set(gs) & set(ws)],
                                   atol=1e-5, rtol=0, err_msg=k)


def test_int8_outputs_are_refused_with_the_reason():
    with pytest.raises(ValueError, match="dense as int8 needs calibration ranges, which a Beam pipeline has no pass"):
        M3EmbedHandler("unused", dense_dtype="int8")
    assert M3EmbedHandler("unused", dense_dtype="binary").settings.dense_dtype == "binary"
