"""MCLS (multiple CLS, BGE-M3 paper appendix B.2) against the same construction done independently in torch:
transformers' XLMRobertaModel and FlagEmbedding's heads on a random tiny release checkpoint, float32 and float64;
the layout at and around interval boundaries; the `m3jax embed` option and its resume check."""

import copy

import numpy as np
import pytest
import torch

from m3jax import pipeline
from m3jax.api import BGEM3
from m3jax.embed import EmbeddingReader, EmbedError, embed
from tests.helpers import SENTENCES, long_text
from tests.parity import ABS_TOL, check_against_float64

I = 256  # the paper's interval
DOC = long_text(1500, seed=5)  # well over 1,000 tokens: max_length cuts it where a case needs


@pytest.fixture(scope="module")
def tiny(release_dirs):
    return release_dirs["tiny"]


@pytest.fixture(scope="module")
def ours(tiny):
    return BGEM3(tiny, use_fp16=False, show_progress=False)


@pytest.fixture(scope="module")
def flag(tiny, flag_model_factory):
    return flag_model_factory(tiny)


@pytest.fixture(scope="module")
def flag64(flag):
    return copy.deepcopy(flag.model).double().eval()


# ------------------------------------------------------------------------------------------ the torch reference
def torch_mcls(fe, model, text: str, max_length: int, interval: int) -> dict:
    """MCLS built from scratch: HF tokenizer with FlagEmbedding's truncation, a `<s>` inserted before every block
    of `interval` text tokens after the first, XLMRobertaModel, dense = normalised mean of the hidden states at the
    `<s>` positions; sparse (max per id, specials dropped) and ColBERT over the text's own tokens only."""
    tok = fe.tokenizer
    ids = tok(text, truncation=True, max_length=max_length)["input_ids"]
    body, seq, cls = ids[1:-1], [ids[0]], [0]
    for k in range(0, len(body), interval):
        if k:
            cls.append(len(seq))
            seq.append(tok.cls_token_id)
        seq.extend(body[k:k + interval])
    seq.append(ids[-1])
    with torch.no_grad():
        h = model.model(input_ids=torch.tensor([seq]), attention_mask=torch.ones(1, len(seq), dtype=torch.long)
                        ).last_hidden_state[0]
        dense = torch.nn.functional.normalize(h[cls].mean(0), dim=-1)
        weights = torch.relu(model.sparse_linear(h)).squeeze(-1)
        own = [p for p in range(1, len(seq)) if p not in cls]
        colbert = torch.nn.functional.normalize(model.colbert_linear(h[own]), dim=-1)
    special = {tok.cls_token_id, tok.eos_token_id, tok.pad_token_id, tok.unk_token_id}
    sparse: dict[int, float] = {}
    for t, w in zip(seq, weights.tolist(), strict=True):
        if t not in special and w > 0:
            sparse[t] = max(sparse.get(t, 0.0), w)
    return {"n": len(ids), "cls": len(cls), "dense": dense.numpy(), "sparse": sparse, "colbert": colbert.numpy()}


def sparse_vector(d: dict, ids) -> np.ndarray:
    return np.array([d.get(i, 0.0) for i in ids], np.float64)


def check(ours: dict, ref32: dict, ref64: dict) -> dict:
    """parity.check_parity's bounds on one text: max abs diff to torch float32 <= ABS_TOL, and m3jax's error
    against float64 about torch float32's own (parity.check_against_float64)."""
    report = {}
    ids = sorted(set(ours["sparse"]) | set(ref32["sparse"]) | set(ref64["sparse"]))
    for key in ("dense", "sparse", "colbert"):
        get = (lambda r: sparse_vector(r["sparse"], ids)) if key == "sparse" else (lambda r, k=key: r[k])
        o, t32, t64 = (np.asarray(get(r), np.float64) for r in (ours, ref32, ref64))
        assert o.shape == t32.shape, (key, o.shape, t32.shape)
        diff = float(np.abs(o - t32).max(initial=0))
        assert diff <= ABS_TOL, f"{key}: max abs diff to torch float32 {diff:.3g} > {ABS_TOL}"
        report[key] = {"m3jax_vs_torch32": diff, **check_against_float64(key, o, t32, t64)}
    return report


def as_dicts(res: pipeline.EncodeResult) -> list[dict]:
    return [{"dense": res.dense[i], "sparse": dict(zip(res.sparse[i][0].tolist(), res.sparse[i][1].tolist(),
                                                         strict=True)),
             "colbert": res.colbert_vecs[i]} for i in range(len(res))]


# ----------------------------------------------------------------------------------------------------- parity
# (max_length, texts, CLS count of the first text, what the case is about): DOC has max_length - 2 text tokens.
CASES = [
    (512, SENTENCES[3:9], 1, "shorter than the interval: no <s> inserted"),
    (I + 2, [DOC], 1, "exactly one interval of text: no <s> inserted"),
    (I + 3, [DOC], 2, "one token past the interval: one <s> before a one-token block"),
    (3 * I + 2, [DOC], 3, "exactly three intervals: two inserted"),
    (3 * I + 3, [DOC], 4, "one past three intervals: three inserted"),
    (1000, [DOC, SENTENCES[2], long_text(300, seed=6)], 4, "3.9 intervals, batched with shorter texts"),
]


@pytest.mark.parametrize("max_length,texts,first_cls,case", CASES, ids=[c[3] for c in CASES])
def test_matches_torch_construction(ours, flag, flag64, max_length, texts, first_cls, case, record_property):
    res = ours.encode_padded(texts, max_length=max_length, mcls_interval=I)
    plain = ours.encode_padded(texts, max_length=max_length)
    np.testing.assert_array_equal(res.lengths, plain.lengths)  # the text's own tokens, inserted ones not counted
    np.testing.assert_array_equal(res.truncated, plain.truncated)
    reports = []
    for i, (text, o) in enumerate(zip(texts, as_dicts(res), strict=True)):
        r32 = torch_mcls(flag, flag.model, text, max_length, I)
        r64 = torch_mcls(flag, flag64, text, max_length, I)
        assert r32["n"] == res.lengths[i]
        assert o["colbert"].shape == (res.lengths[i] - 1, ours.config.colbert_dim)  # one vector per own token
        assert r32["cls"] == 1 + pipeline.mcls_length(r32["n"], I) - r32["n"]
        reports.append({"tokens": r32["n"], "cls": r32["cls"], **check(o, r32, r64)})
        if r32["cls"] == 1:  # MCLS is plain CLS, to the bit
            np.testing.assert_array_equal(res.dense[i], plain.dense[i])
            np.testing.assert_array_equal(res.colbert_vecs[i], plain.colbert_vecs[i])
            np.testing.assert_array_equal(res.sparse[i][0], plain.sparse[i][0])
            np.testing.assert_array_equal(res.sparse[i][1], plain.sparse[i][1])
        else:  # several CLS states averaged: a different vector than position 0's
            assert np.abs(res.dense[i] - plain.dense[i]).max() > 1e-3
    assert reports[0]["cls"] == first_cls
    record_property("mcls_parity", reports)
    print(f"\n{case}: {reports}")


def test_small_interval_in_one_padded_batch(ours, flag, flag64):
    """Interval 16: rows with 1 to 32 CLS, padded together in one batch (the device rebuilds each row's CLS
    positions from its length)."""
    texts = [SENTENCES[0], SENTENCES[2], long_text(60, seed=1), long_text(150, seed=2), DOC]
    res = ours.encode_padded(texts, max_length=512, mcls_interval=16, batch_size=8)
    counts = []
    for text, o in zip(texts, as_dicts(res), strict=True):
        r32 = torch_mcls(flag, flag.model, text, 512, 16)
        check(o, r32, torch_mcls(flag, flag64, text, 512, 16))
        counts.append(r32["cls"])
    assert counts[0] == 1 and counts[-1] == 32 and len(set(counts)) == len(counts), counts


def test_layout_host_and_device_agree():
    """insert_cls (host) and mcls_positions (device) describe one layout, at every length around the boundaries."""
    for interval in (1, 2, 5, 16):
        rows = [np.array([0, *range(10, 10 + k), 2], np.int32) for k in range(0, 4 * interval + 3)]
        laid = [pipeline.insert_cls(r, interval, 0) for r in rows]
        L = max(len(x) for x in laid)
        ids = np.full((len(laid), L), 1, np.int32)
        mask = np.zeros((len(laid), L), np.int32)
        for j, x in enumerate(laid):
            ids[j, :len(x)], mask[j, :len(x)] = x, 1
            assert len(x) == pipeline.mcls_length(len(rows[j]), interval)
            np.testing.assert_array_equal(x[x != 0], rows[j][1:])  # text tokens and </s> kept, in order
        cls, inserted = (np.asarray(a) for a in pipeline.mcls_positions(mask, interval))
        np.testing.assert_array_equal(cls, (ids == 0) & (mask == 1))
        np.testing.assert_array_equal(inserted, cls & (np.arange(L) > 0))


def test_limits_and_bad_options(ours):
    enc = ours.engine
    enc.check_mcls(8161, 256)  # 8,161 tokens + 31 inserted = 8,192: the longest that fits
    with pytest.raises(ValueError, match=r"max_length=8162 with mcls_interval=256: .* 8193 .* use max_length <= 8161"):
        enc.check_mcls(8162, 256)
    with pytest.raises(ValueError, match=r"max_length=8192 with mcls_interval=256: .*8223.* <= 8161"):
        ours.encode(["x"], max_length=8192, mcls_interval=256)
    with pytest.raises(ValueError, match=r"ids\[1\]: 8190 tokens, 8221 with MCLS's inserted <s>, more than the 8192"):
        enc.insert_cls([np.zeros(5, np.int32), np.zeros(8190, np.int32)], 256)
    for bad in (0, -3, True, 2.5, "256"):
        with pytest.raises(ValueError, match=r"mcls_interval must be a positive int"):
            ours.encode_padded(["x"], mcls_interval=bad)
    mean = BGEM3(ours.model_name_or_path, pooling_method="mean", use_fp16=False)
    with pytest.raises(ValueError, match=r"needs pooling 'cls'.*'mean'"):
        mean.encode(["x"], mcls_interval=256)
    out = ours.encode_queries(SENTENCES[:2], mcls_interval=I, return_sparse=True)  # the keyword on every encode
    np.testing.assert_array_equal(out["dense_vecs"], ours.encode_queries(SENTENCES[:2])["dense_vecs"])


# ------------------------------------------------------------------------------------------------- m3jax embed
BUCKETS = (32, 64, 96, 8192)
SET = dict(max_length=80, batch_size=4, length_buckets=BUCKETS, colbert_dtype="float32", quiet=True)
EMBED_TEXTS = SENTENCES[:6] + [long_text(40, seed=7), long_text(200, seed=8)]


def test_embed_option_and_resume(tmp_path):
    from m3jax.cli import main
    from m3jax.testing import random_m3jax_dir

    model_dir = random_m3jax_dir("tiny")
    src = tmp_path / "c.txt"
    src.write_text("".join(t + "\n" for t in EMBED_TEXTS), encoding="utf-8")
    m = embed(str(src), model_dir, tmp_path / "mcls", mcls_interval=16, shard_size=5, window=5, **SET)
    assert m["settings"]["mcls_interval"] == 16
    embed(str(src), model_dir, tmp_path / "plain", shard_size=5, window=5, **SET)
    r, p = EmbeddingReader(tmp_path / "mcls"), EmbeddingReader(tmp_path / "plain")
    assert "mcls_interval" not in p.manifest["settings"]  # plain jobs keep the key they had before MCLS
    ref = BGEM3(model_dir, use_fp16=False, length_buckets=BUCKETS, batch_size=4, show_progress=False).encode_padded(
        EMBED_TEXTS, max_length=80, mcls_interval=16)
    lengths = r.lengths()
    np.testing.assert_array_equal(lengths, ref.lengths)
    np.testing.assert_array_equal(lengths, p.lengths())  # the texts' own token counts
    assert r.manifest["tokens"] == p.manifest["tokens"] == int(ref.lengths.sum())
    long = lengths - 2 > 16
    assert long.sum() >= 3 and (~long).sum() >= 3
    dense, plain = r.dense(), p.dense()
    np.testing.assert_allclose(dense, ref.dense, atol=1e-6)  # other batch compositions than encode_padded's
    np.testing.assert_array_equal(dense[~long], plain[~long])
    assert (np.abs(dense[long] - plain[long]).max(1) > 1e-3).all()
    flat, offsets = r.colbert()
    np.testing.assert_array_equal(np.diff(offsets), lengths - 1)  # one vector per own token, as plain
    np.testing.assert_array_equal(offsets, p.colbert()[1])
    np.testing.assert_allclose(flat, np.concatenate(ref.colbert_vecs), atol=1e-6)
    ids, _ = r.sparse_padded()
    assert not np.isin(ids, (0, 1, 2, 3)).any()  # the inserted <s> never reach the lexical weights

    with pytest.raises(EmbedError, match=r"settings\.mcls_interval: 16 \(in .*\) != 32 \(now\)"):
        embed(str(src), model_dir, tmp_path / "mcls", mcls_interval=32, shard_size=5, window=5, **SET)
    with pytest.raises(EmbedError, match=r"settings\.mcls_interval: 16 \(in .*\) != None \(now\)"):
        embed(str(src), model_dir, tmp_path / "mcls", shard_size=5, window=5, **SET)
    with pytest.raises(EmbedError, match=r"settings\.mcls_interval: None \(in .*\) != 16 \(now\)"):
        embed(str(src), model_dir, tmp_path / "plain", mcls_interval=16, shard_size=5, window=5, **SET)
    with pytest.raises(ValueError, match=r"mcls_interval must be a positive int"):
        embed(str(src), model_dir, tmp_path / "bad", mcls_interval=0, **SET)
    # The same job resumed from the command line: every shard is already there, nothing is rewritten.
    before = {f.name: f.read_bytes() for f in (tmp_path / "mcls").glob("shard-*")}
    assert main(["embed", str(src), "--model", str(model_dir), "--output", str(tmp_path / "mcls"),
                 "--mcls-interval", "16", "--shard-size", "5", "--window", "5", "--max-length", "80",
                 "--batch-size", "4", "--length-buckets", ",".join(map(str, BUCKETS)), "--colbert-dtype", "float32",
                 "--quiet"]) == 0
    assert {f.name: f.read_bytes() for f in (tmp_path / "mcls").glob("shard-*")} == before
    assert EmbeddingReader(tmp_path / "mcls").manifest["settings"]["mcls_interval"] == 16
