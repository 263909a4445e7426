"""m3jax.index.CorpusIndex: exact top-k against brute force, ties, several devices, save / load, bad input."""

import os
import subprocess
import sys
import types
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from m3jax.index import CorpusIndex
from tests.helpers import CASES, SMALL_VOCAB, make_dense, random_data, run_cases, tie_data

ROOT = Path(__file__).resolve().parents[1]
MODES = ("dense", "sparse", "colbert")


# ------------------------------------------------------------------------------------------------ reference
def brute_force(scores, k):
    """Top-k of a [Q, P] matrix by (score desc, index asc)."""
    scores = np.asarray(scores)
    order = np.lexsort((np.broadcast_to(np.arange(scores.shape[1]), scores.shape), -scores), axis=1)[:, :k]
    return np.take_along_axis(scores, order, 1), order


def all_pairs(corpus, queries, mode, zero_floor=False):
    """[Q, P] scores in plain numpy float64, sharing no code with m3jax.scoring."""
    if mode == "dense":
        return queries["dense"].astype(np.float64) @ corpus["dense"].astype(np.float64).T
    if mode == "sparse":
        def vocab_vectors(ids, weights):
            out = np.zeros((len(ids), SMALL_VOCAB))
            for r, (i, w) in enumerate(zip(ids, weights, strict=True)):
                out[r, i[i >= 0]] = w[i >= 0]
            return out

        return (vocab_vectors(queries["sparse_ids"], queries["sparse_weights"])
                @ vocab_vectors(corpus["sparse_ids"], corpus["sparse_weights"]).T)
    q, p = queries["colbert"].astype(np.float64), corpus["colbert"].astype(np.float64)
    tok = np.einsum("aic,bjc->aibj", q, p)
    tok = np.where(corpus["colbert_mask"][None, None], tok, -np.inf).max(-1)  # [Q, Tq, P]
    if zero_floor:
        tok = np.maximum(tok, 0.0)
    qm = queries["colbert_mask"][..., None]
    return np.where(qm, tok, 0.0).sum(1) / np.maximum(qm.sum(1), 1)


def reference(corpus, queries, mode, k, candidates=100, first_stage="dense", weights=(1.0, 0.3, 1.0),
              zero_floor=False):
    if mode != "hybrid":
        return brute_force(all_pairs(corpus, queries, mode, zero_floor), k)
    d, s, c = (all_pairs(corpus, queries, m, zero_floor) for m in MODES)
    first = d if first_stage == "dense" else weights[0] * d + weights[1] * s
    _, cand = brute_force(first, candidates)
    total = np.take_along_axis(weights[0] * d + weights[1] * s + weights[2] * c, cand, 1)
    order = np.lexsort((cand, -total), axis=1)[:, :k]  # candidates come in score order: rank by (score, index)
    return np.take_along_axis(total, order, 1), np.take_along_axis(cand, order, 1)


@pytest.fixture(scope="module")
def one_device():
    return run_cases(devices=jax.local_devices()[:1])


# ------------------------------------------------------------------------------------------------ tests
@pytest.mark.parametrize("data_name", ["random", "ties"])
@pytest.mark.parametrize("name,kw", CASES, ids=[c[0] for c in CASES])
def test_search_matches_brute_force(one_device, data_name, name, kw):
    corpus, queries = random_data() if data_name == "random" else tie_data()
    k = kw["k"] or corpus["dense"].shape[0]
    want_scores, want_ids = reference(corpus, queries, **dict(kw, k=k))
    got_scores, got_ids = one_device[f"{data_name}/{name}/scores"], one_device[f"{data_name}/{name}/ids"]
    assert got_scores.dtype == np.float32 and got_scores.shape == (len(queries["dense"]), k)
    np.testing.assert_array_equal(got_ids, want_ids)
    np.testing.assert_allclose(got_scores, want_scores, rtol=0, atol=1e-6)


def test_ties_go_to_the_lower_corpus_index(one_device):
    ids = one_device["ties/dense/ids"]
    np.testing.assert_array_equal(ids[0], [1, 5, 9, 13, 17])  # group 1 scores 0.5, lowest positions first
    np.testing.assert_array_equal(ids[1], [0, 1, 2, 3, 4])  # everything ties
    np.testing.assert_array_equal(one_device["ties/all/ids"][1], np.arange(40))
    # Hybrid, query 1: dense ties everywhere; sparse lifts group 0 among the 12 dense candidates (docs 0-11).
    np.testing.assert_array_equal(one_device["ties/hybrid/ids"][1], [0, 4, 8, 1])


def test_several_devices_match_one_device(one_device, tmp_path):
    """4 and 8 forced host devices (a subprocess: the flag must be set before jax starts) against 1 device."""
    out = tmp_path / "multi.npz"
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    code = f"from tests.helpers import multi_device_cases; multi_device_cases({str(out)!r})"
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with np.load(out) as multi:
        for ndev in (4, 8):
            for key, want in one_device.items():
                got = multi[f"{ndev}/{key}"]
                if key.endswith("/ids"):
                    np.testing.assert_array_equal(got, want, err_msg=f"{ndev} devices, {key}")
                else:
                    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6, err_msg=f"{ndev} devices, {key}")


def test_doc_ids_and_save_load_round_trip(tmp_path):
    corpus, queries = random_data()
    names = np.array([f"doc-{i:03d}" for i in range(61)])
    index = CorpusIndex(**corpus, doc_ids=names, dtype="bfloat16", chunk_size=16)
    scores, ids = index.search(queries, 3, mode="hybrid")
    assert ids.dtype.kind == "U" and ids[0, 0].startswith("doc-")
    path = index.save(tmp_path / "idx")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["idx"]  # no temporary left behind
    loaded = CorpusIndex.load(path)
    assert loaded.corpus["colbert"].dtype == jnp.bfloat16 and loaded.num_docs == 61
    for name in corpus:
        np.testing.assert_array_equal(np.asarray(loaded.corpus[name])[:61].astype(np.float32),
                                      np.asarray(index.corpus[name])[:61].astype(np.float32))
    scores2, ids2 = loaded.search(queries, 3, mode="hybrid")
    np.testing.assert_array_equal(ids2, ids)
    np.testing.assert_array_equal(scores2, scores)
    with pytest.raises(ValueError, match="already exists"):
        index.save(path)
    sparse_only = CorpusIndex(sparse_ids=corpus["sparse_ids"], sparse_weights=corpus["sparse_weights"])
    sparse_only.save(path, overwrite=True)
    assert CorpusIndex.load(path).groups == ("sparse",)


def test_failed_save_leaves_nothing(tmp_path, monkeypatch):
    index = CorpusIndex(dense=make_dense(np.random.default_rng(0), 5))

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(np, "savez", boom)
    with pytest.raises(OSError, match="disk full"):
        index.save(tmp_path / "idx")
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(FileNotFoundError, match="not a CorpusIndex directory"):
        CorpusIndex.load(tmp_path / "idx")


def test_bad_input_errors():
    corpus, queries = random_data()
    index = CorpusIndex(dense=corpus["dense"], sparse_ids=corpus["sparse_ids"],
                        sparse_weights=corpus["sparse_weights"])
    with pytest.raises(ValueError, match=r"k=62 is larger than the corpus \(61 passages\)"):
        index.search(queries, 62)
    for k in (0, -3, 2.0):
        with pytest.raises(ValueError, match=r"k must be a positive int"):
            index.search(queries, k)
    with pytest.raises(ValueError, match=r"unknown mode 'bm25'"):
        index.search(queries, 3, mode="bm25")
    with pytest.raises(ValueError, match=r"mode 'colbert' needs the colbert representation.*holds: dense, sparse"):
        index.search(queries, 3, mode="colbert")
    with pytest.raises(ValueError, match=r"mode 'hybrid' needs the colbert representation"):
        index.search(queries, 3, mode="hybrid")
    scores, _ = index.search(queries, 3, mode="hybrid", weights=(1.0, 0.3, 0.0))  # no colbert weight: fine
    assert scores.shape == (7, 3)
    with pytest.raises(ValueError, match=r"queries: this search needs sparse_ids and sparse_weights; 'sparse_ids'"):
        index.search({"dense": queries["dense"]}, 3, mode="sparse")
    with pytest.raises(ValueError, match=r"dense dim D mismatch: the index has 16, queries\['dense'\] has 8"):
        index.search({"dense": queries["dense"][:, :8]}, 3)
    with pytest.raises(TypeError, match=r"queries\['dense'\]: expected vectors of dtype .* got float64"):
        index.search({"dense": queries["dense"].astype(np.float64)}, 3)
    with pytest.raises(TypeError, match=r"queries\['sparse_ids'\]: expected token ids .* got float32"):
        index.search(dict(queries, sparse_ids=queries["sparse_ids"].astype(np.float32)), 3, mode="sparse")
    with pytest.raises(ValueError, match=r"query count Q mismatch"):
        index.search(dict(queries, sparse_weights=queries["sparse_weights"][:2]), 3, mode="hybrid",
                     first_stage="dense+sparse", weights=(1.0, 0.3, 0.0))
    ns = types.SimpleNamespace(dense=queries["dense"])  # attribute access works as well as a dict
    assert index.search(ns, 2)[1].shape == (7, 2)
    assert index.search({"dense": queries["dense"][:0]}, 2)[1].shape == (0, 2)

    with pytest.raises(ValueError, match=r"CorpusIndex: empty corpus \(0 passages\)"):
        CorpusIndex(dense=corpus["dense"][:0])
    with pytest.raises(ValueError, match=r"give at least one representation"):
        CorpusIndex()
    with pytest.raises(ValueError, match=r"'sparse_ids' given without 'sparse_weights'"):
        CorpusIndex(sparse_ids=corpus["sparse_ids"])
    with pytest.raises(ValueError, match=r"passage count N mismatch: dense has 61, colbert has 60"):
        CorpusIndex(dense=corpus["dense"], colbert=corpus["colbert"][:60], colbert_mask=corpus["colbert_mask"][:60])
    with pytest.raises(TypeError, match=r"dense: expected vectors of dtype float32 or bfloat16, got int64"):
        CorpusIndex(dense=np.ones((3, 4), np.int64))
    with pytest.raises(TypeError, match=r"colbert_mask: expected a mask of dtype bool, got int32"):
        CorpusIndex(colbert=corpus["colbert"], colbert_mask=corpus["colbert_mask"].astype(np.int32))
    with pytest.raises(ValueError, match=r"doc_ids: expected shape \(61,\)"):
        CorpusIndex(dense=corpus["dense"], doc_ids=np.arange(60))
    bad = corpus["sparse_ids"].copy()
    bad[2, 0] = 70
    with pytest.raises(ValueError, match=r"sparse_ids: ids must lie in \[-1, 60\) \(-1 = padding\), got 70 in row 2"):
        CorpusIndex(sparse_ids=bad, sparse_weights=corpus["sparse_weights"], vocab_size=SMALL_VOCAB)
