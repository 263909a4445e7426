"""m3jax.scoring against FlagEmbedding's own scoring code on synthetic padded vectors (no model needed)."""

import types

import jax.numpy as jnp
import numpy as np
import pytest

from m3jax import scoring
from tests.helpers import (
    SMALL_VOCAB,
    lexical_dicts,
    make_colbert,
    make_dense,
    make_tokens,
    pad_lexical,
)


@pytest.fixture(scope="module")
def flag():
    """The FlagEmbedding classes; their scoring methods do not use self (or only self.temperature)."""
    from FlagEmbedding import BGEM3FlagModel
    from FlagEmbedding.finetune.embedder.encoder_only.m3.modeling import EncoderOnlyEmbedderM3Model as M3

    def sim(q, p):
        return M3._compute_similarity(None, q, p)

    stub = types.SimpleNamespace(temperature=1.0, _compute_similarity=sim, training=False, vocab_size=SMALL_VOCAB,
                                 sparse_linear=lambda h: h,
                                 tokenizer=types.SimpleNamespace(cls_token_id=0, eos_token_id=2, pad_token_id=1,
                                                                 unk_token_id=3))
    return types.SimpleNamespace(model=BGEM3FlagModel, m3=M3, stub=stub)


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    q_tok, p_tok = make_tokens(rng, 9, 2, 12), make_tokens(rng, 37, 5, 40)
    q_ids, q_w = pad_lexical(q_tok)
    p_ids, p_w = pad_lexical(p_tok)
    q_col, q_mask = make_colbert(rng, 9, 1, 7)
    p_col, p_mask = make_colbert(rng, 37, 1, 20)
    # Passage 0's tokens cluster around v and query 0's first token is -v: every dot product there is negative,
    # so compute_score's floor at 0 and colbert_score's plain max differ.
    v = make_dense(rng, 1, 12)[0]
    near = v + 0.2 * make_dense(rng, 20, 12)
    p_col[0] = near / np.linalg.norm(near, axis=-1, keepdims=True) * p_mask[0][:, None]
    q_col[0, 0] = -v
    return types.SimpleNamespace(q_tok=q_tok, p_tok=p_tok, q_ids=q_ids, q_w=q_w, p_ids=p_ids, p_w=p_w,
                                 q_dense=make_dense(rng, 9), p_dense=make_dense(rng, 37),
                                 q_col=q_col, q_mask=q_mask, p_col=p_col, p_mask=p_mask)


def assert_close(a, b, tol=1e-5):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert a.shape == b.shape, (a.shape, b.shape)
    assert np.abs(a - b).max(initial=0.0) <= tol, np.abs(a - b).max()


# ------------------------------------------------------------------------------------------------ parity
def test_lexical_matches_compute_lexical_matching_score(flag, data):
    ref = flag.model.compute_lexical_matching_score(None, lexical_dicts(data.q_ids, data.q_w),
                                                    lexical_dicts(data.p_ids, data.p_w))
    assert ref.shape == (9, 37) and (ref > 0).mean() > 0.2  # the data does share ids
    assert_close(scoring.lexical_all_pairs(data.q_ids, data.q_w, data.p_ids, data.p_w, chunk_size=8,
                                           query_block=4), ref)
    assert_close(scoring.lexical_paired(data.q_ids, data.q_w, data.p_ids[:9], data.p_w[:9]), np.diag(ref[:, :9]))
    single = flag.model.compute_lexical_matching_score(None, *lexical_dicts(data.q_ids[:1], data.q_w[:1]),
                                                       *lexical_dicts(data.p_ids[1:2], data.p_w[1:2]))
    assert_close(scoring.lexical_paired(data.q_ids[:1], data.q_w[:1], data.p_ids[1:2], data.p_w[1:2]), [single])


def test_lexical_matches_compute_score_vocab_vectors(flag, data):
    """compute_score's path: scatter_reduce(amax) into [B, V], special columns zeroed, then q_vocab @ p_vocab.T."""
    import torch

    def vocab(tokens):
        t = max(len(ids) for ids, _ in tokens)
        ids = torch.ones((len(tokens), t), dtype=torch.long)  # <pad>, weight 0 below
        hidden = torch.zeros((len(tokens), t, 1))
        for r, (i, w) in enumerate(tokens):
            ids[r, : len(i)] = torch.from_numpy(i)
            hidden[r, : len(w), 0] = torch.from_numpy(w)
        return flag.m3._sparse_embedding(flag.stub, hidden, ids)

    ref = flag.m3.compute_sparse_score(flag.stub, vocab(data.q_tok), vocab(data.p_tok)).numpy()
    got = scoring.lexical_all_pairs(data.q_ids, data.q_w, data.p_ids, data.p_w, vocab_size=SMALL_VOCAB)
    assert_close(got, ref)


def test_colbert_matches_colbert_score(flag, data):
    """colbert_score() on unpadded arrays: no floor, even where every real dot product is negative."""
    ref = np.array([[float(flag.model.colbert_score(None, data.q_col[i][data.q_mask[i]], data.p_col[j][data.p_mask[j]]))
                     for j in range(37)] for i in range(9)])
    assert ref[0, 0] < scoring.colbert_paired(data.q_col[:1], data.q_mask[:1], data.p_col[:1], data.p_mask[:1],
                                              zero_floor=True)[0] - 1e-3
    assert_close(scoring.colbert_all_pairs(data.q_col, data.q_mask, data.p_col, data.p_mask, chunk_size=8,
                                           query_block=4), ref)
    assert_close(scoring.colbert_paired(data.q_col, data.q_mask, data.p_col[:9], data.p_mask[:9]),
                 np.diag(ref[:, :9]))


def test_compute_score_maths(flag, data):
    """compute_score's batched dense / sparse / colbert (padded passages: floor at 0) and its weighted averages."""
    import torch

    t = torch.from_numpy
    # compute_score pads every passage of the batch to the longest; one extra zero row makes each one padded.
    p_col = np.concatenate([data.p_col, np.zeros_like(data.p_col[:, :1])], 1)
    q_attention = t(np.concatenate([np.ones((9, 1), bool), data.q_mask], 1).astype(np.int64))  # with CLS
    dense = flag.m3.compute_dense_score(flag.stub, t(data.q_dense), t(data.p_dense)).numpy()
    colbert = flag.m3.compute_colbert_score(flag.stub, t(data.q_col), t(p_col), q_mask=q_attention).numpy()
    sparse = flag.model.compute_lexical_matching_score(None, lexical_dicts(data.q_ids, data.q_w),
                                                       lexical_dicts(data.p_ids, data.p_w)).astype(np.float32)

    got_dense = scoring.dense_all_pairs(data.q_dense, data.p_dense, chunk_size=5)
    got_colbert = scoring.colbert_all_pairs(data.q_col, data.q_mask, data.p_col, data.p_mask, zero_floor=True)
    got_sparse = scoring.lexical_all_pairs(data.q_ids, data.q_w, data.p_ids, data.p_w)
    assert_close(got_dense, dense)
    assert_close(got_colbert, colbert)
    assert_close(scoring.dense_paired(data.q_dense, data.p_dense[:9]), np.diag(dense[:, :9]))
    assert_close(scoring.colbert_paired(data.q_col, data.q_mask, data.p_col[:9], data.p_mask[:9], zero_floor=True),
                 np.diag(colbert[:, :9]))

    w = [0.4, 0.2, 0.4]  # compute_score(weights_for_different_modes=w)
    d, s, c = (torch.from_numpy(np.asarray(x, np.float32)) for x in (dense, sparse, colbert))
    ref_sd = ((s * w[1] + d * w[0]) / (w[1] + w[0])).numpy()
    ref_all = ((c * w[2] + s * w[1] + d * w[0]) / sum(w)).numpy()
    assert_close(scoring.weighted_sum(got_dense, got_sparse, None, w, normalize=True), ref_sd)
    assert_close(scoring.weighted_sum(got_dense, got_sparse, got_colbert, w, normalize=True), ref_all)
    # The paper / training ensemble: dense + 0.3 * sparse + colbert, unnormalised.
    assert_close(scoring.weighted_sum(got_dense, got_sparse, got_colbert), dense + 0.3 * sparse + colbert)


# ------------------------------------------------------------------------------------------------ padding and masks
def test_padding_never_changes_a_score(data):
    rng = np.random.default_rng(1)
    base_lex = scoring.lexical_all_pairs(data.q_ids, data.q_w, data.p_ids, data.p_w)
    base_col = scoring.colbert_all_pairs(data.q_col, data.q_mask, data.p_col, data.p_mask)
    base_col0 = scoring.colbert_all_pairs(data.q_col, data.q_mask, data.p_col, data.p_mask, zero_floor=True)

    def widen(x, extra, fill):
        pad = np.full((x.shape[0], extra, *x.shape[2:]), fill, x.dtype)
        return np.concatenate([x, pad], 1)

    # Wider padding, with junk weights under the -1 ids and junk vectors under masked-out tokens.
    q_ids, q_w = widen(data.q_ids, 5, -1), widen(data.q_w, 5, 3.0)
    p_ids, p_w = widen(data.p_ids, 9, -1), widen(data.p_w, 9, 5.0)
    q_col = widen(data.q_col, 4, 0.0) + ~widen(data.q_mask, 4, False)[..., None] * rng.standard_normal((1, 1, 12))
    p_col = widen(data.p_col, 6, 0.0) + ~widen(data.p_mask, 6, False)[..., None] * 9.0
    q_mask, p_mask = widen(data.q_mask, 4, False), widen(data.p_mask, 6, False)
    q_col, p_col = q_col.astype(np.float32), p_col.astype(np.float32)

    assert_close(scoring.lexical_all_pairs(q_ids, q_w, p_ids, p_w), base_lex, 1e-6)
    assert_close(scoring.lexical_paired(q_ids, q_w, p_ids[:9], p_w[:9]), np.diag(base_lex[:, :9]), 1e-6)
    assert_close(scoring.colbert_all_pairs(q_col, q_mask, p_col, p_mask), base_col, 1e-6)
    assert_close(scoring.colbert_all_pairs(q_col, q_mask, p_col, p_mask, zero_floor=True), base_col0, 1e-6)
    assert_close(scoring.colbert_paired(q_col, q_mask, p_col[:9], p_mask[:9]), np.diag(base_col[:, :9]), 1e-6)


@pytest.mark.parametrize("chunk,block", [(1, 1), (7, 3), (64, 64)])
def test_chunking_does_not_change_scores(data, chunk, block):
    assert_close(scoring.dense_all_pairs(data.q_dense, data.p_dense, chunk_size=chunk),
                 data.q_dense @ data.p_dense.T, 1e-6)
    ref = scoring.lexical_all_pairs(data.q_ids, data.q_w, data.p_ids, data.p_w, chunk_size=37, query_block=9)
    assert_close(scoring.lexical_all_pairs(data.q_ids, data.q_w, data.p_ids, data.p_w, chunk_size=chunk,
                                           query_block=block), ref, 1e-6)
    ref = scoring.colbert_all_pairs(data.q_col, data.q_mask, data.p_col, data.p_mask, chunk_size=37, query_block=9)
    assert_close(scoring.colbert_all_pairs(data.q_col, data.q_mask, data.p_col, data.p_mask, chunk_size=chunk,
                                           query_block=block), ref, 1e-6)


def test_empty_passage_and_query(data):
    p_mask = data.p_mask[:2].copy()
    p_mask[0] = False
    plain = scoring.colbert_all_pairs(data.q_col[:2], data.q_mask[:2], data.p_col[:2] * p_mask[..., None], p_mask)
    floored = scoring.colbert_all_pairs(data.q_col[:2], data.q_mask[:2], data.p_col[:2] * p_mask[..., None], p_mask,
                                        zero_floor=True)
    assert np.all(np.asarray(plain)[:, 0] == -np.inf) and np.all(np.asarray(floored)[:, 0] == 0.0)
    q_mask = data.q_mask[:2].copy()
    q_mask[1] = False
    assert np.all(np.asarray(scoring.colbert_all_pairs(data.q_col[:2], q_mask, data.p_col, data.p_mask))[1] == 0.0)
    assert scoring.dense_all_pairs(data.q_dense, data.p_dense[:0]).shape == (9, 0)
    assert scoring.lexical_all_pairs(data.q_ids[:0], data.q_w[:0], data.p_ids, data.p_w).shape == (0, 37)


def test_bfloat16_storage_accumulates_in_float32(data):
    bf = jnp.bfloat16
    got = scoring.colbert_all_pairs(data.q_col.astype(bf), data.q_mask, data.p_col.astype(bf), data.p_mask)
    ref = scoring.colbert_all_pairs(data.q_col, data.q_mask, data.p_col, data.p_mask)
    assert got.dtype == jnp.float32
    assert_close(got, ref, 2e-2)
    got = scoring.dense_all_pairs(data.q_dense.astype(bf), data.p_dense.astype(bf))
    assert got.dtype == jnp.float32
    assert_close(got, data.q_dense @ data.p_dense.T, 2e-2)


# ------------------------------------------------------------------------------------------------ bad input
def test_bad_inputs_name_the_argument(data):
    d = data
    with pytest.raises(ValueError, match=r"dense dim D mismatch: q has 16, p has 8"):
        scoring.dense_all_pairs(d.q_dense, d.p_dense[:, :8])
    with pytest.raises(TypeError, match=r"q: expected vectors of dtype float32 or bfloat16, got float64"):
        scoring.dense_paired(d.q_dense.astype(np.float64), d.p_dense[:9])
    with pytest.raises(TypeError, match=r"p: expected vectors .* got int32"):
        scoring.dense_all_pairs(d.q_dense, d.p_dense.astype(np.int32))
    with pytest.raises(ValueError, match=r"pair count N mismatch: q has 9, p has 37"):
        scoring.dense_paired(d.q_dense, d.p_dense)
    with pytest.raises(ValueError, match=r"q: expected shape \[N, D\] \(rank 2\), got \(16,\)"):
        scoring.dense_paired(d.q_dense[0], d.p_dense[0])
    with pytest.raises(TypeError, match=r"q: expected a numpy or jax array of shape \[Q, D\], got list"):
        scoring.dense_all_pairs(d.q_dense.tolist(), d.p_dense)
    with pytest.raises(TypeError, match=r"p_ids: expected token ids of dtype int32 or int64, got float32"):
        scoring.lexical_all_pairs(d.q_ids, d.q_w, d.p_ids.astype(np.float32), d.p_w)
    with pytest.raises(ValueError, match=r"pair count N mismatch: q_ids has 9, p_ids has 37"):
        scoring.lexical_paired(d.q_ids, d.q_w, d.p_ids, d.p_w)
    with pytest.raises(ValueError, match=r"q_ids and q_weights must have one shape"):
        scoring.lexical_all_pairs(d.q_ids, d.q_w[:, :2], d.p_ids, d.p_w)
    with pytest.raises(ValueError, match=r"p_ids: ids must lie in \[-1, 250002\).* got 250002 in row 3"):
        bad = d.p_ids.copy()
        bad[3, 0] = 250002
        scoring.lexical_all_pairs(d.q_ids, d.q_w, bad, d.p_w)
    with pytest.raises(ValueError, match=r"ColBERT dim C mismatch: q has 12, p has 6"):
        scoring.colbert_all_pairs(d.q_col, d.q_mask, d.p_col[..., :6], d.p_mask)
    with pytest.raises(TypeError, match=r"p_mask: expected a mask of dtype bool, got int64"):
        scoring.colbert_all_pairs(d.q_col, d.q_mask, d.p_col, d.p_mask.astype(np.int64))
    with pytest.raises(ValueError, match=r"q_mask: expected shape \(9, 7\)"):
        scoring.colbert_paired(d.q_col, d.q_mask[:, :3], d.p_col[:9], d.p_mask[:9])
    with pytest.raises(ValueError, match=r"pair count N mismatch: q has 9, p has 37"):
        scoring.colbert_paired(d.q_col, d.q_mask, d.p_col, d.p_mask)
    with pytest.raises(ValueError, match=r"chunk_size must be a positive int, got 0"):
        scoring.dense_all_pairs(d.q_dense, d.p_dense, chunk_size=0)
    with pytest.raises(ValueError, match=r"weighted_sum: sparse has shape \(3,\), dense has \(9,\)"):
        scoring.weighted_sum(jnp.zeros(9), jnp.zeros(3), None)
    with pytest.raises(ValueError, match=r"weights must be \(dense, sparse, colbert\)"):
        scoring.weighted_sum(jnp.zeros(9), None, None, weights=(1.0, 0.3))
