"""Code written for FlagEmbedding runs unchanged on m3jax: the surface clients touch (constructor keywords, tokenizer,
model sizes, score types) against FlagEmbedding's own objects; pymilvus-model's BGEM3EmbeddingFunction end to end
into Milvus Lite; Qdrant local mode with dense, sparse and ColBERT multivectors."""

import json
import logging
import pickle

import numpy as np
import pytest

from m3jax import BGEM3FlagModel, BGEM3Model
from tests.helpers import SENTENCES, long_text, mixed

TOL = 1e-5
COLBERT_DIM = 24  # tiny_narrow_colbert: hidden 48, ColBERT 24, so the two sizes cannot be confused
DOCS = SENTENCES[2:] + mixed(4, seed=11, max_words=30)
# Latin-script queries: the random tiny model's sparse head is zero on most other scripts' tokens.
QUERIES = ["What is BGE M3?", "BM25 is a bag-of-words retrieval function", "lexical matching with BGE M3 is retrieval",
           "Der schnelle Fuchs springt über la tour Eiffel"]
TOK_TEXTS = SENTENCES + ["", "   ", "😀", "a" * 300, "It's a test , isn't it ? Yes !", long_text(80, seed=3)]


@pytest.fixture(scope="module")
def narrow(release_dirs):
    return release_dirs["tiny_narrow_colbert"]


@pytest.fixture(scope="module")
def ours(narrow):
    return BGEM3FlagModel(narrow, use_fp16=False, devices="cpu")


@pytest.fixture(scope="module")
def flag(narrow, flag_model_factory):
    return flag_model_factory(narrow, colbert_dim=COLBERT_DIM)


# ------------------------------------------------------------------------------------------ constructor keywords
class TorchLikeDevice:  # what pyterrier_dr passes: torch.device's .type / .index, duck-typed
    def __init__(self, kind, index=None):
        self.type, self.index = kind, index


def test_constructor_keywords_as_flagembedding(narrow, flag, caplog):
    import FlagEmbedding
    import jax
    import torch

    from m3jax.engine import resolve_devices as _resolve_devices
    from m3jax.hf_compat import merge_device_kwargs

    cpus, first = jax.local_devices(backend="cpu"), jax.local_devices(backend="cpu")[:1]
    forms = [(dict(device="cpu"), cpus), (dict(device="cpu:0"), first), (dict(device=torch.device("cpu")), cpus),
             (dict(device=torch.device("cpu", 0)), first), (dict(device=TorchLikeDevice("cpu", 0)), first),
             (dict(device=None), jax.local_devices()), (dict(devices=None), jax.local_devices()),
             (dict(devices=["cpu:0"]), first), (dict(devices=[torch.device("cpu", 0)]), first),
             (dict(devices="cpu", device="cpu:0"), cpus),
             (dict(device=0), jax.local_devices()[:1])]  # an int: FlagEmbedding's cuda:<i>, the default backend's
    for kw, want in forms:
        assert _resolve_devices(merge_device_kwargs(kw.get("devices"), kw.get("device"))) == want, kw
    m = BGEM3FlagModel(model_name_or_path=narrow, use_fp16=False,
                       device=torch.device("cpu", 0))  # the whole constructor, with what pyterrier_dr passes
    assert m.devices == first and m.device == torch.device("cpu", 0)
    with pytest.raises(ValueError, match="'tpu:7'"):
        BGEM3FlagModel(narrow, device="tpu:7")

    # Unknown keywords: FlagEmbedding sets them as attributes and ignores them; m3jax too, with one warning.
    extra = dict(device="cpu", foo=3, convert_to_numpy=True, tokenizer_kwargs={"x": 1})
    ref = FlagEmbedding.BGEM3FlagModel(str(narrow), use_fp16=False, devices="cpu", colbert_dim=COLBERT_DIM, **extra)
    with caplog.at_level(logging.WARNING, logger="m3jax"):
        m = BGEM3FlagModel(str(narrow), use_fp16=False, devices="cpu", encode="x",
                           tokenizer=None, **extra)
    warnings = [r.getMessage() for r in caplog.records if "unused keyword" in r.getMessage()]
    assert len(warnings) == 1 and all(k in warnings[0] for k in ("foo=3", "convert_to_numpy", "tokenizer_kwargs"))
    for k, v in extra.items():
        assert getattr(m, k) == getattr(ref, k) == v
    assert m.kwargs["foo"] == ref.kwargs["foo"] == 3
    # a keyword naming a method is not set; one naming an attribute m3jax sets later is overwritten, as FlagEmbedding
    assert callable(m.encode) and m.tokenizer is not None
    assert "not set, they name methods: encode" in warnings[0]


ENCODE_KWARGS = [dict(convert_to_numpy=True), dict(convert_to_numpy=False), dict(pad_to_multiple_of=8),
                 dict(verbose=False), dict(return_attention_mask=True), dict(padding_side="right"),
                 dict(padding="max_length"), dict(padding=True), dict(truncation=False), dict(return_tensors="np"),
                 dict(add_special_tokens=False), dict(show_progress_bar=False), dict(normalize_embeddings=False),
                 dict(return_attention_mask=False), dict(stride=2), dict(no_such_option=1)]


@pytest.mark.parametrize("method", ["encode", "encode_queries", "encode_corpus"])
def test_encode_keywords_as_flagembedding(ours, flag, method):
    """encode's extra keywords: accepted exactly where FlagEmbedding accepts them with unchanged output."""
    texts = SENTENCES[:5]
    base = getattr(ours, method)(sentences=texts) if method == "encode" else getattr(ours, method)(texts)
    for kw in ENCODE_KWARGS:
        try:
            ref = getattr(flag, method)(texts, return_sparse=True, **kw)
        except Exception:  # noqa: BLE001  FlagEmbedding's tokenizer raises TypeError or KeyError
            with pytest.raises(TypeError, match=f"unexpected keyword argument {next(iter(kw))}"):
                getattr(ours, method)(texts, return_sparse=True, **kw)
            continue
        out = getattr(ours, method)(texts, return_sparse=True, **kw)
        assert np.abs(out["dense_vecs"] - ref["dense_vecs"]).max() <= TOL, kw
        assert np.abs(out["dense_vecs"] - base["dense_vecs"]).max() == 0, kw
        assert [set(d) for d in out["lexical_weights"]] == [set(d) for d in ref["lexical_weights"]], kw
    # padding_side="left" gets through FlagEmbedding but changes its dense output: m3jax refuses it.
    left = getattr(flag, method)(texts, padding_side="left")["dense_vecs"]
    assert np.abs(left - base["dense_vecs"]).max() > 1e-3
    with pytest.raises(TypeError, match="padding_side='right'"):
        getattr(ours, method)(texts, padding_side="left")


# --------------------------------------------------------------------------------------------------- tokenizer
def _plain(x):
    """BatchEncoding / arrays / tensors -> builtins, for exact comparison."""
    if hasattr(x, "keys"):
        return {k: _plain(x[k]) for k in x.keys()}
    if hasattr(x, "numpy"):
        x = x.numpy()
    if isinstance(x, np.ndarray):
        return ("array", str(x.dtype), x.tolist())
    return x


TOKENIZER_CALLS = [
    dict(), dict(add_special_tokens=False), dict(truncation=True, max_length=8), dict(max_length=5),
    dict(add_special_tokens=True, truncation=True, max_length=1), dict(truncation=True), dict(padding=True),
    dict(padding="longest", return_tensors="np"), dict(padding=True, return_tensors="pt"),
    dict(padding="max_length", max_length=12, truncation=True, return_tensors="np"),
    dict(padding=True, pad_to_multiple_of=8), dict(return_token_type_ids=True, return_special_tokens_mask=True),
    dict(return_length=True, return_attention_mask=False), dict(truncation="only_first", max_length=6),
]


def test_tokenizer_save_pretrained(ours, tmp_path):
    from transformers import AutoTokenizer

    written = ours.tokenizer.save_pretrained(tmp_path / "tok")
    assert {p.rsplit("/", 1)[-1] for p in written} >= {"tokenizer.json", "tokenizer_config.json"}
    reloaded = AutoTokenizer.from_pretrained(tmp_path / "tok")
    assert type(reloaded).__name__ == "XLMRobertaTokenizerFast" and len(reloaded) == len(ours.tokenizer)
    assert reloaded(TOK_TEXTS)["input_ids"] == ours.tokenizer(TOK_TEXTS)["input_ids"]
    with pytest.raises(ValueError, match="is a file"):
        ours.tokenizer.save_pretrained(written[0])


def test_tokenizer_as_transformers(ours, flag):
    """Each call clients make on model.tokenizer, against FlagEmbedding's XLMRobertaTokenizerFast on the same files."""
    tok, ref = ours.tokenizer, flag.tokenizer
    assert type(ref).__name__ == "XLMRobertaTokenizerFast"
    assert len(tok) == len(ref) == 250002 and tok.vocab_size == ref.vocab_size
    assert tok.get_vocab() == ref.get_vocab()
    for name in ("model_max_length", "padding_side", "truncation_side", "is_fast", "model_input_names",
                 "special_tokens_map", "all_special_tokens", "all_special_ids"):
        assert getattr(tok, name) == getattr(ref, name), name
    for name in ("bos", "eos", "unk", "sep", "pad", "cls", "mask"):
        assert getattr(tok, f"{name}_token") == getattr(ref, f"{name}_token")
        assert getattr(tok, f"{name}_token_id") == getattr(ref, f"{name}_token_id")
    for kw in TOKENIZER_CALLS:
        for text in (TOK_TEXTS, TOK_TEXTS[2], TOK_TEXTS[-1]):
            if kw.get("return_tensors") and isinstance(text, str):
                continue
            ours_out, ref_out = tok(text, **kw), ref(text, **kw)
            assert _plain(ours_out) == _plain(ref_out), (kw, text[:20])
            assert ours_out.input_ids is ours_out["input_ids"]
    pairs = dict(text=QUERIES, text_pair=QUERIES[::-1], truncation=True, max_length=9, padding=True)
    assert _plain(tok(**pairs)) == _plain(ref(**pairs))
    with pytest.raises(ValueError, match="padding=True"):
        tok(TOK_TEXTS[:3], return_tensors="np")
    with pytest.raises(TypeError):
        tok(TOK_TEXTS[:3], no_such_option=1)
    with pytest.raises(TypeError, match="list of str"):
        tok([1, 2])

    ids = ref(TOK_TEXTS, truncation=True, max_length=40)["input_ids"]
    import torch

    for row in ids:
        for forms in (row, np.asarray(row), torch.tensor(row)):
            for skip in (False, True):
                assert tok.decode(forms, skip_special_tokens=skip) == ref.decode(forms, skip_special_tokens=skip)
            assert tok.decode(forms, clean_up_tokenization_spaces=False) == ref.decode(
                forms, clean_up_tokenization_spaces=False)
        assert tok.convert_ids_to_tokens(row) == ref.convert_ids_to_tokens(row)
        assert tok.convert_ids_to_tokens(row, skip_special_tokens=True) == ref.convert_ids_to_tokens(
            row, skip_special_tokens=True)
        tokens = ref.convert_ids_to_tokens(row)
        assert tok.convert_tokens_to_ids(tokens + ["<no-such-token>"]) == ref.convert_tokens_to_ids(
            tokens + ["<no-such-token>"])
    assert tok.decode(ids[4][1]) == ref.decode(ids[4][1])  # one int
    assert tok.convert_ids_to_tokens(ids[4][1]) == ref.convert_ids_to_tokens(ids[4][1])
    assert tok.batch_decode(ids, skip_special_tokens=True) == ref.batch_decode(ids, skip_special_tokens=True)
    for text in TOK_TEXTS:
        assert tok.tokenize(text) == ref.tokenize(text)
        assert tok.encode(text) == ref.encode(text)
        assert tok.encode(text, add_special_tokens=False) == ref.encode(text, add_special_tokens=False)
        assert tok.encode(text, truncation=True, max_length=7) == ref.encode(text, truncation=True, max_length=7)
    rows = [{"input_ids": r} for r in ids[:5]]
    for kw in (dict(), dict(return_tensors="np"), dict(padding="max_length", max_length=64, return_tensors="np"),
               dict(pad_to_multiple_of=16, return_tensors="np")):
        assert _plain(tok.pad(rows, **kw)) == _plain(ref.pad(rows, **kw)), kw
    # m3jax's internal batched contract is unchanged
    batched, truncated = tok.encode(TOK_TEXTS, 8)
    assert [b.tolist() for b in batched] == ref(TOK_TEXTS, truncation=True, max_length=8)["input_ids"]
    assert truncated.dtype == bool and truncated.any()
    with pytest.raises(TypeError, match="batched form"):
        tok.encode(TOK_TEXTS)


def test_tokenizer_shares_the_engines_instance(ours, flag):
    """model.tokenizer wraps the engine's loaded `tokenizers` instance (one ~290 MB vocabulary, not two). Each
    wrapper sets truncation and padding itself under the shared lock, so calls in any order, from any thread,
    give what each gives alone."""
    tok, eng, ref = ours.tokenizer, ours.engine.tokenizer, flag.tokenizer
    assert tok._tok is eng._tok and tok._lock is eng._lock
    at8 = ref(TOK_TEXTS, truncation=True, max_length=8)["input_ids"]
    at5 = _plain(ref(TOK_TEXTS, truncation=True, max_length=5, padding="max_length"))
    assert [x.tolist() for x in eng.encode(TOK_TEXTS, 8)[0]] == at8
    assert _plain(tok(TOK_TEXTS, truncation=True, max_length=5, padding="max_length")) == at5
    assert [x.tolist() for x in eng.encode(TOK_TEXTS, 8)[0]] == at8  # neither padded nor cut at 5 by the call above
    assert [tok.tokenize(t) for t in TOK_TEXTS] == [ref.tokenize(t) for t in TOK_TEXTS]  # not cut at 8 either
    assert tok(TOK_TEXTS)["input_ids"] == ref(TOK_TEXTS)["input_ids"]

    import threading

    wrong = []

    def loop(call, expected):
        for _ in range(100):
            if call() != expected:
                wrong.append(call.__name__)

    def engine_at8():
        return [x.tolist() for x in eng.encode(TOK_TEXTS, 8)[0]]

    def hf_at5():
        return _plain(tok(TOK_TEXTS, truncation=True, max_length=5, padding="max_length"))

    threads = [threading.Thread(target=loop, args=a) for a in ((engine_at8, at8), (hf_at5, at5))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert wrong == []


def test_convert_id_to_token_and_outputs_as_flagembedding(ours, flag):
    out = ours.encode(DOCS[:4], return_sparse=True)
    ref = flag.encode(DOCS[:4], return_sparse=True)
    assert [set(d) for d in ours.convert_id_to_token(out["lexical_weights"])] == [
        set(d) for d in flag.convert_id_to_token(ref["lexical_weights"])]
    # what PAI-RAG / LazyLLM do: json.dumps(..., default=float)
    mine, theirs = (json.loads(json.dumps(o["lexical_weights"], default=float)) for o in (out, ref))
    assert [set(d) for d in mine] == [set(d) for d in theirs]
    assert max(abs(d[k] - e[k]) for d, e in zip(mine, theirs, strict=True) for k in d) <= TOL
    # what LlamaIndex does with the outputs: pickle the dict, reload, score
    again = pickle.loads(pickle.dumps(out))
    assert np.array_equal(again["dense_vecs"], out["dense_vecs"]) and again["lexical_weights"] == out[
        "lexical_weights"]


# ------------------------------------------------------------------------------------------------ model / scores
def test_model_view_as_flagembedding(ours, flag):
    from flax import nnx

    m, r = ours.model, flag.model
    for name in ("hidden_size", "vocab_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                 "max_position_embeddings", "pad_token_id", "bos_token_id", "eos_token_id", "type_vocab_size",
                 "layer_norm_eps", "model_type", "hidden_act"):
        assert getattr(m.model.config, name) == getattr(r.model.config, name), name
    for head in ("colbert_linear", "sparse_linear"):
        for name in ("in_features", "out_features"):
            assert getattr(getattr(m, head), name) == getattr(getattr(r, head), name), (head, name)
    assert m.model.config.hidden_size == 48 and m.colbert_linear.out_features == COLBERT_DIM
    assert m.eval() is m and m.model.eval() is m.model
    assert m.tokenizer.get_vocab() == r.tokenizer.get_vocab()

    # export scripts: m.model.model(input_ids=, attention_mask=, return_dict=True).last_hidden_state
    import torch

    batch = flag.tokenizer(SENTENCES[:4], padding=True, return_tensors="pt")
    with torch.no_grad():
        want = r.model(**batch, return_dict=True).last_hidden_state.numpy()
    got = m.model(**batch, return_dict=True)
    assert np.abs(np.asarray(got.last_hidden_state) - want).max() <= 1e-4
    assert got[0] is got.last_hidden_state and got["last_hidden_state"] is got.last_hidden_state
    with pytest.raises(TypeError, match="output_attentions"):
        m.model(**batch, output_attentions=True)

    # NNX access stays: the view forwards to the module, which is also nnx_model
    assert isinstance(ours.nnx_model, BGEM3Model) and isinstance(m.nnx, BGEM3Model)
    graphdef, state = nnx.split(ours.nnx_model)
    assert m.embeddings.word_embeddings.embedding.shape == (250002, 48)
    ids, mask = np.asarray(batch["input_ids"], np.int32), np.asarray(batch["attention_mask"], np.int32)
    assert np.abs(np.asarray(m(ids, mask).last_hidden_state) - want).max() <= 1e-4
    assert set(nnx.to_pure_dict(state)) == set(ours.params)


def test_colbert_score_types_as_flagembedding(ours, flag):
    q = ours.encode(QUERIES[0], return_colbert_vecs=True)["colbert_vecs"]
    p = ours.encode(DOCS[0], return_colbert_vecs=True)["colbert_vecs"]
    s, ref = ours.colbert_score(q, p), flag.colbert_score(q, p)
    assert abs(s.item() - ref.item()) <= TOL and abs(float(s) - float(ref)) <= TOL
    assert s.numpy().shape == ref.numpy().shape == () and s.numpy().dtype == ref.numpy().dtype
    assert abs(s.cpu().detach().numpy() - ref.cpu().detach().numpy()) <= TOL
    assert isinstance(s, np.float32) and type(s * 2) is np.float32  # arithmetic gives plain numpy
    assert pickle.loads(pickle.dumps(s)) == s


# --------------------------------------------------------------------------------------------- pymilvus-model
def _brute_routes(q_dense, q_sparse, d_dense, d_sparse):
    """Per query, each route's (doc index, score) list as an ANN route returns it: sparse lists only overlaps."""
    dense = q_dense @ d_dense.T
    sparse = (q_sparse @ d_sparse.T).toarray()
    routes = []
    for i in range(len(q_dense)):
        d = sorted(range(dense.shape[1]), key=lambda j: -dense[i, j])
        s = sorted((j for j in range(sparse.shape[1]) if sparse[i, j] > 0), key=lambda j: -sparse[i, j])
        routes.append(([(j, dense[i, j]) for j in d], [(j, sparse[i, j]) for j in s]))
    return dense, sparse, routes


def _fuse(routes, how, weights=(0.6, 0.4), k=60):
    """Milvus's fusions: RRF Σ 1/(k + rank); weighted with norm_score, Σ w · (0.5 + arctan(score) / π) for IP."""
    out = {}
    for r, hits in enumerate(routes):
        for rank, (j, s) in enumerate(hits):
            add = 1 / (k + rank + 1) if how == "rrf" else weights[r] * (0.5 + np.arctan(s) / np.pi)
            out[j] = out.get(j, 0.0) + add
    return out


def _assert_ranked_as(hits, scores, tol):
    """Milvus hits [(id, score)] hold every expected id with its score, in non-increasing expected order."""
    assert sorted(h["id"] for h in hits) == sorted(scores), ([h["id"] for h in hits], sorted(scores))
    for h in hits:
        assert abs(h["distance"] - scores[h["id"]]) <= tol, (h, scores[h["id"]])
    expected = [scores[h["id"]] for h in hits]
    assert all(a >= b - tol for a, b in zip(expected, expected[1:], strict=False)), expected


def test_pymilvus_model_bge_m3_into_milvus_lite(narrow, ours, tmp_path, monkeypatch):
    import FlagEmbedding
    from pymilvus import AnnSearchRequest, DataType, MilvusClient, RRFRanker, WeightedRanker
    from pymilvus.model.hybrid import BGEM3EmbeddingFunction

    # FlagEmbedding's own result first, then the same user code with m3jax swapped in.
    kw = dict(model_name=str(narrow), device="cpu", use_fp16=False, return_colbert_vecs=True,
              colbert_dim=COLBERT_DIM)
    ref_fn = BGEM3EmbeddingFunction(**kw)
    ref_docs, ref_dim = ref_fn.encode_documents(DOCS), ref_fn.dim
    monkeypatch.setattr(FlagEmbedding, "BGEM3FlagModel", BGEM3FlagModel)
    monkeypatch.setattr("pymilvus.model.utils.prompt_install", _no_install)
    ef = BGEM3EmbeddingFunction(**kw)
    assert isinstance(ef.model, BGEM3FlagModel)
    assert ef.dim == ref_dim == {"dense": 48, "colbert_vecs": COLBERT_DIM, "sparse": 250002}
    docs, queries = ef.encode_documents(DOCS), ef.encode_queries(QUERIES)
    assert np.abs(np.stack(docs["dense"]) - np.stack(ref_docs["dense"])).max() <= TOL
    assert docs["sparse"].shape == ref_docs["sparse"].shape == (len(DOCS), 250002)
    assert np.array_equal(docs["sparse"].indices, ref_docs["sparse"].indices)
    assert np.abs(docs["sparse"].toarray() - ref_docs["sparse"].toarray()).max() <= TOL
    assert all(a.shape == b.shape for a, b in zip(docs["colbert_vecs"], ref_docs["colbert_vecs"], strict=True))

    client = MilvusClient(str(tmp_path / "milvus.db"))
    schema = client.create_schema(auto_id=False)
    schema.add_field("id", DataType.INT64, is_primary=True)
    schema.add_field("text", DataType.VARCHAR, max_length=2048)
    schema.add_field("dense", DataType.FLOAT_VECTOR, dim=ef.dim["dense"])
    schema.add_field("sparse", DataType.SPARSE_FLOAT_VECTOR)
    index = client.prepare_index_params()
    index.add_index("dense", index_type="FLAT", metric_type="IP")
    index.add_index("sparse", index_type="SPARSE_INVERTED_INDEX", metric_type="IP")
    client.create_collection("docs", schema=schema, index_params=index)
    rows = [{"id": i, "text": t, "dense": docs["dense"][i], "sparse": docs["sparse"][[i]]} for i, t in
            enumerate(DOCS)]
    assert client.insert("docs", rows)["insert_count"] == len(DOCS)
    client.load_collection("docs")

    d_dense, q_dense = np.stack(docs["dense"]), np.stack(queries["dense"])
    dense, sparse, routes = _brute_routes(q_dense, queries["sparse"], d_dense, docs["sparse"])
    n = len(DOCS)
    for i in range(len(QUERIES)):
        hits = client.search("docs", data=[queries["dense"][i]], anns_field="dense", limit=n,
                             search_params={"metric_type": "IP"})[0]
        _assert_ranked_as(hits, dict(enumerate(dense[i])), 1e-5)
        hits = client.search("docs", data=[queries["sparse"][[i]]], anns_field="sparse", limit=n,
                             search_params={"metric_type": "IP"})[0]
        _assert_ranked_as(hits, {j: s for j, s in enumerate(sparse[i]) if s > 0}, 1e-5)
        reqs = [AnnSearchRequest([queries["dense"][i]], "dense", {"metric_type": "IP"}, limit=n),
                AnnSearchRequest([queries["sparse"][[i]]], "sparse", {"metric_type": "IP"}, limit=n)]
        for ranker, how in ((WeightedRanker(0.6, 0.4, norm_score=True), "weighted"), (RRFRanker(60), "rrf")):
            hits = client.hybrid_search("docs", reqs, ranker, limit=n, output_fields=["text"])[0]
            _assert_ranked_as(hits, _fuse(routes[i], how), 1e-5)
            assert all(h["entity"]["text"] == DOCS[h["id"]] for h in hits)
    assert (sparse > 0).any(axis=1).all() and (sparse == 0).any()  # every query matches, and the route filters
    client.close()


def _no_install(package, *a, **k):
    raise AssertionError(f"pymilvus-model tried to pip install {package}")


# ------------------------------------------------------------------------------------------------------ Qdrant
def test_qdrant_local_dense_sparse_colbert(ours):
    from qdrant_client import QdrantClient, models

    out = ours.encode(DOCS, return_sparse=True, return_colbert_vecs=True)
    q = ours.encode_queries(QUERIES, return_sparse=True, return_colbert_vecs=True)
    client = QdrantClient(":memory:")
    client.create_collection(
        "docs",
        vectors_config={
            "dense": models.VectorParams(size=ours.config.hidden_size, distance=models.Distance.DOT),
            "colbert": models.VectorParams(size=ours.config.colbert_dim, distance=models.Distance.DOT,
                                           multivector_config=models.MultiVectorConfig(
                                               comparator=models.MultiVectorComparator.MAX_SIM)),
        },
        sparse_vectors_config={"sparse": models.SparseVectorParams()},
    )

    def sparse(d):
        return models.SparseVector(indices=[int(k) for k in d], values=[float(v) for v in d.values()])

    client.upsert("docs", [models.PointStruct(id=i, vector={"dense": out["dense_vecs"][i].tolist(),
                                                            "sparse": sparse(out["lexical_weights"][i]),
                                                            "colbert": out["colbert_vecs"][i].tolist()})
                           for i in range(len(DOCS))])
    n = len(DOCS)
    lexical = ours.compute_lexical_matching_score(q["lexical_weights"], out["lexical_weights"])
    for i in range(len(QUERIES)):
        got = {p.id: p.score for p in client.query_points("docs", query=q["dense_vecs"][i].tolist(), using="dense",
                                                          limit=n).points}
        assert got.keys() == set(range(n))
        assert max(abs(got[j] - float(q["dense_vecs"][i] @ out["dense_vecs"][j])) for j in range(n)) <= 1e-5

        got = {p.id: p.score for p in client.query_points("docs", query=sparse(q["lexical_weights"][i]),
                                                          using="sparse", limit=n).points}
        assert got and got.keys() == {j for j in range(n) if lexical[i, j] > 0}
        assert max(abs(got[j] - lexical[i, j]) for j in got) <= 1e-5

        # Qdrant's MAX_SIM sums the per-query-token maxima; FlagEmbedding's colbert_score averages them.
        got = {p.id: p.score for p in client.query_points("docs", query=q["colbert_vecs"][i].tolist(),
                                                          using="colbert", limit=n).points}
        assert got.keys() == set(range(n))
        nq = len(q["colbert_vecs"][i])
        for j in range(n):
            want = float(ours.colbert_score(q["colbert_vecs"][i], out["colbert_vecs"][j]))
            assert abs(got[j] / nq - want) <= 1e-5, (i, j, got[j] / nq, want)
    client.close()
