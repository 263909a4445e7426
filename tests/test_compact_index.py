"""CorpusIndex over compact corpora (m3jax.compact): int8 / binary dense searched on the codes as
sentence-transformers does, then rescored with the float query; int8 ColBERT; MUVERA candidates re-ranked by exact
MaxSim; pooled ColBERT; save / load. Every score is checked against a float64 numpy computation of its definition."""

import numpy as np
import pytest

from m3jax.compact import MuveraConfig, compact_corpus, fde, int8_ranges, quantize, stored_bytes
from m3jax.index import CorpusIndex

N, D, C, T, Q = 96, 48, 16, 12, 7


@pytest.fixture(scope="module")
def corpus():
    rng = np.random.default_rng(0)
    dense = rng.normal(size=(N, D)).astype(np.float32)
    dense /= np.linalg.norm(dense, axis=1, keepdims=True)
    colbert = rng.normal(size=(N, T, C)).astype(np.float32)
    colbert /= np.linalg.norm(colbert, axis=2, keepdims=True)
    lengths = rng.integers(2, T + 1, N)
    mask = np.arange(T)[None] < lengths[:, None]
    colbert[~mask] = 0
    # queries: noisy copies of passages 0..Q-1, so that every ranking has a clear best
    qd = dense[:Q] + 0.3 * rng.normal(size=(Q, D)).astype(np.float32)
    qc = colbert[:Q, :6] + 0.3 * rng.normal(size=(Q, 6, C)).astype(np.float32)
    qm = mask[:Q, :6].copy()
    qm[:, 0] = True
    qc[~qm] = 0
    return dense, colbert, mask, {"dense": qd, "colbert": qc, "colbert_mask": qm}


def _maxsim64(q, qm, p, pm):
    s = np.einsum("ic,jc->ij", q[qm].astype(np.float64), p[pm].astype(np.float64))
    return s.max(1).sum() / qm.sum()


def _dequantized64(codes, ranges):
    ranges = np.asarray(ranges, np.float64)
    step = (ranges[1] - ranges[0]) / 255
    return ranges[0] + step * (codes.astype(np.float64) + 128)


def test_int8_dense_rescored_scores_are_float_query_times_dequantized(corpus):
    dense, _, _, q = corpus
    kw = compact_corpus(dense, dense_format="int8")
    idx = CorpusIndex(**kw)
    k = 5
    scores, ids = idx.search(q, k)
    deq = _dequantized64(kw["dense"], kw["int8_ranges"]["dense"])
    rescored = q["dense"].astype(np.float64) @ deq.T
    codes_q = np.asarray(quantize(q["dense"], "int8", kw["int8_ranges"]["dense"])).astype(np.int64)
    first = codes_q @ kw["dense"].astype(np.int64).T  # sentence-transformers' int8 search: codes x codes
    for i in range(Q):
        cand = np.lexsort((np.arange(N), -first[i]))[:k * 4]
        want = cand[np.lexsort((cand, -rescored[i, cand]))][:k]
        np.testing.assert_array_equal(ids[i], want)
        np.testing.assert_allclose(scores[i], rescored[i, want], rtol=1e-5, atol=1e-5)
    # without rescoring the code scores are the result, exactly (integers)
    s0, i0 = idx.search(q, k, rescore=False)
    for i in range(Q):
        want = np.lexsort((np.arange(N), -first[i]))[:k]
        np.testing.assert_array_equal(i0[i], want)
        np.testing.assert_array_equal(s0[i], first[i, want].astype(np.float32))
    exact = q["dense"] @ dense.T
    hits = [len(set(ids[i]) & set(np.argsort(-exact[i])[:k])) for i in range(Q)]
    assert sum(hits) >= 0.8 * Q * k, hits  # int8 keeps the ranking of well-separated neighbours


def test_binary_dense_hamming_then_rescore(corpus):
    dense, _, _, q = corpus
    kw = compact_corpus(dense, dense_format="binary")
    assert kw["dense"].shape == (N, D // 8) and kw["dense"].dtype == np.int8
    idx = CorpusIndex(**kw)
    bits_d = dense > 0
    bits_q = q["dense"] > 0
    hamming_sim = (bits_q[:, None, :] == bits_d[None]).sum(-1)
    s0, i0 = idx.search(q, 6, rescore=False)
    for i in range(Q):
        want = np.lexsort((np.arange(N), -hamming_sim[i]))[:6]
        np.testing.assert_array_equal(i0[i], want)
        np.testing.assert_array_equal(s0[i], hamming_sim[i, want])
    s1, i1 = idx.search(q, 6)
    rescored = q["dense"].astype(np.float64) @ bits_d.T.astype(np.float64)  # float query . {0, 1} bits
    for i in range(Q):
        cand = np.lexsort((np.arange(N), -hamming_sim[i]))[:24]
        want = cand[np.lexsort((cand, -rescored[i, cand]))][:6]
        np.testing.assert_array_equal(i1[i], want)
        np.testing.assert_allclose(s1[i], rescored[i, want], rtol=1e-5, atol=1e-5)
        assert i in cand  # each query's source passage survives the Hamming stage


def test_int8_colbert_scores_dequantized_maxsim(corpus):
    _, colbert, mask, q = corpus
    kw = compact_corpus(colbert=colbert, colbert_mask=mask, colbert_format="int8")
    np.testing.assert_allclose(kw["int8_ranges"]["colbert"], np.asarray(int8_ranges(colbert[mask])))
    idx = CorpusIndex(**kw)
    scores, ids = idx.search(q, 4, "colbert")
    deq = _dequantized64(kw["colbert"], kw["int8_ranges"]["colbert"])
    for i in range(Q):
        ref = np.array([_maxsim64(q["colbert"][i], q["colbert_mask"][i], deq[j], mask[j]) for j in range(N)])
        want = np.lexsort((np.arange(N), -ref))[:4]
        np.testing.assert_array_equal(ids[i], want)
        np.testing.assert_allclose(scores[i], ref[want], rtol=1e-5, atol=1e-5)


def test_muvera_candidates_reranked_by_exact_maxsim(corpus):
    _, colbert, mask, q = corpus
    cfg = MuveraConfig(dim=C, k_sim=3, dim_proj=8, r_reps=6)
    kw = compact_corpus(colbert=colbert, colbert_mask=mask, muvera=cfg)
    np.testing.assert_array_equal(kw["muvera"], np.asarray(fde(colbert, mask, cfg)))
    idx = CorpusIndex(**kw)
    doc_fde = kw["muvera"].astype(np.float64)
    q_fde = np.asarray(fde(q["colbert"], q["colbert_mask"], cfg, query=True)).astype(np.float64)
    first = q_fde @ doc_fde.T
    s0, i0 = idx.search(q, 5, "muvera", rescore=False)
    s1, i1 = idx.search(q, 5, "muvera", candidates=20)
    for i in range(Q):
        order = np.lexsort((np.arange(N), -first[i]))
        np.testing.assert_array_equal(i0[i], order[:5])
        np.testing.assert_allclose(s0[i], first[i, order[:5]], rtol=1e-4, atol=1e-4)
        cand = order[:20]
        exact = np.array([_maxsim64(q["colbert"][i], q["colbert_mask"][i], colbert[j], mask[j]) for j in cand])
        want = cand[np.lexsort((cand, -exact))][:5]
        np.testing.assert_array_equal(i1[i], want)
        np.testing.assert_allclose(s1[i], np.sort(exact)[::-1][:5], rtol=1e-5, atol=1e-5)
    # all passages as candidates: the exhaustive ColBERT search
    s2, i2 = idx.search(q, 5, "muvera", candidates=N)
    s3, i3 = idx.search(q, 5, "colbert")
    np.testing.assert_array_equal(i2, i3)
    np.testing.assert_allclose(s2, s3, rtol=1e-6)
    fde_only = CorpusIndex(muvera=kw["muvera"], muvera_config=cfg)
    np.testing.assert_array_equal(fde_only.search(q, 5, "muvera")[1], i0)


def test_pooled_colbert_and_sizes(corpus):
    dense, colbert, mask, q = corpus
    plain = compact_corpus(dense, colbert, mask)
    small = compact_corpus(dense, colbert, mask, dense_format="binary", colbert_format="int8", pool_factor=2)
    assert small["colbert_mask"].sum(1).tolist() == [max(n // 2, 1) for n in mask.sum(1)]
    a, b = stored_bytes(plain), stored_bytes(small)
    assert a["dense"] == 4 * D and b["dense"] == D // 8
    assert b["colbert"] == pytest.approx(sum(max(n // 2, 1) for n in mask.sum(1)) * C / N)
    assert a["colbert"] == pytest.approx(mask.sum() * C * 2 / N)
    scores, ids = CorpusIndex(**small).search(q, 3, "colbert")
    assert ids.shape == (Q, 3) and np.isfinite(scores).all()


def test_save_load_keeps_formats(corpus, tmp_path):
    dense, colbert, mask, q = corpus
    kw = compact_corpus(dense, colbert, mask, dense_format="int8", colbert_format="int8",
                        muvera=MuveraConfig(dim=C, k_sim=2, dim_proj=4, r_reps=3))
    idx = CorpusIndex(**kw, doc_ids=[f"d{i}" for i in range(N)])
    idx.save(tmp_path / "ix")
    back = CorpusIndex.load(tmp_path / "ix")
    for mode in ("dense", "colbert", "muvera", "hybrid"):
        a, b = (x.search(q, 4, mode, weights=(1.0, 0.0, 1.0)) for x in (idx, back))
        np.testing.assert_array_equal(a[1], b[1])
        np.testing.assert_array_equal(a[0], b[0])
    assert (back.dense_format, back.colbert_format, back.muvera_config) == ("int8", "int8", idx.muvera_config)


def test_bad_compact_arguments_are_named(corpus):
    dense, colbert, mask, q = corpus
    kw = compact_corpus(dense, dense_format="int8")
    with pytest.raises(ValueError, match=r"dense_format='int8' needs int8_ranges\['dense'\]"):
        CorpusIndex(dense=kw["dense"], dense_format="int8")
    with pytest.raises(TypeError, match="dense: expected int8 codes"):
        CorpusIndex(dense=dense, dense_format="int8", int8_ranges=kw["int8_ranges"])
    with pytest.raises(ValueError, match="dense_format must be one of"):
        CorpusIndex(dense=dense, dense_format="int4")
    with pytest.raises(ValueError, match="muvera .* and muvera_config"):
        CorpusIndex(dense=dense, muvera=np.zeros((N, 8), np.float32))
    with pytest.raises(ValueError, match="mode 'muvera' needs an index built with muvera"):
        CorpusIndex(dense=dense).search(q, 3, "muvera")
    with pytest.raises(ValueError, match="cannot hold dense_dim=64"):
        CorpusIndex(dense=np.zeros((N, 4), np.int8), dense_format="binary", dense_dim=64)
