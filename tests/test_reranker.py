"""m3jax.FlagReranker against FlagEmbedding's FlagReranker, both on one random checkpoint in bge-reranker-v2-m3's
release layout (every parameter drawn): scores, query and pair truncation, instructions, input forms, normalize."""

import numpy as np
import pytest

from tests.helpers import SENTENCES, long_text, mixed

TOL = 1e-5


@pytest.fixture(scope="module")
def reranker_dir(tmp_path_factory):
    from m3jax.config import M3Config
    from m3jax.testing import write_random_reranker

    return write_random_reranker(tmp_path_factory.mktemp("reranker"), M3Config.tiny(), seed=3)


@pytest.fixture(scope="module")
def pairs():
    queries = SENTENCES[:4] + [long_text(120, seed=5), ""]
    passages = mixed(6, seed=7, max_words=30) + [long_text(400, seed=6)]
    return [[q, p] for q in queries for p in passages[:3]] + [[queries[4], passages[-1]], [queries[0], ""]]


def flag(path, **kw):
    from FlagEmbedding import FlagReranker

    return FlagReranker(str(path), use_fp16=False, devices="cpu", **kw)


@pytest.mark.parametrize("kw", [{}, {"max_length": 64}, {"max_length": 64, "query_max_length": 16},
                                {"max_length": 32, "query_max_length": 30}, {"normalize": True}],
                         ids=["defaults", "max_length 64", "query 16", "query leaves no room", "normalize"])
def test_scores_match_flagembedding(reranker_dir, pairs, kw):
    """Long queries are cut at query_max_length (3/4 of max_length by default), long pairs from the passage's end; a
    query that leaves the passage no room leaves the pair uncut, as transformers does (it logs an error)."""
    from m3jax import FlagReranker

    ours = FlagReranker(reranker_dir, batch_size=8, **kw).compute_score(pairs)
    ref = flag(reranker_dir, batch_size=8, **kw).compute_score(pairs)
    assert isinstance(ours, list) and all(isinstance(x, float) for x in ours) and len(ours) == len(pairs)
    np.testing.assert_allclose(ours, ref, rtol=0, atol=TOL)
    assert np.std(ours) > 1e-3  # the scores differ between pairs: the comparison tests something


def test_call_options_instructions_and_one_pair(reranker_dir, pairs):
    from m3jax import FlagReranker

    kw = dict(query_instruction_for_rerank="Query: ", passage_instruction_for_rerank="Doc: ",
              passage_instruction_format="{}\\n{}")
    ours, ref = FlagReranker(reranker_dir, **kw), flag(reranker_dir, **kw)
    call = dict(max_length=48, query_max_length=12, normalize=True, batch_size=3)
    np.testing.assert_allclose(ours.compute_score(pairs, **call), ref.compute_score(pairs, **call), atol=TOL)
    one = ours.compute_score(pairs[0])  # one pair: a list of one score, as FlagEmbedding 1.4 returns
    assert isinstance(one, list) and len(one) == 1
    np.testing.assert_allclose(one, ref.compute_score(pairs[0]), atol=TOL)
    with pytest.raises(TypeError, match="pair 1: expected"):
        ours.compute_score([["a", "b"], ["only one"]])


def test_search_reranks_the_first_stage(reranker_dir):
    """CorpusIndex.search(rerank=...): the first stage's top rerank_depth, re-scored by the cross-encoder, top k.
    With the depth at the whole corpus it is the cross-encoder's own ranking of every passage."""
    from m3jax import CorpusIndex, FlagReranker

    rng = np.random.default_rng(0)
    texts = mixed(24, seed=11, max_words=20)
    queries = SENTENCES[:3]
    index = CorpusIndex(dense=rng.normal(size=(24, 8)).astype(np.float32), doc_ids=[f"p{i}" for i in range(24)],
                        texts=texts)
    q = {"dense": rng.normal(size=(3, 8)).astype(np.float32)}
    reranker = FlagReranker(reranker_dir)
    every = np.asarray(reranker.compute_score([[query, t] for query in queries for t in texts])).reshape(3, 24)
    _, first = index.search(q, 6)
    s, ids = index.search(q, 3, rerank=reranker, rerank_depth=6, query_texts=queries)
    for i in range(3):
        pos = [int(x[1:]) for x in first[i]]
        order = np.argsort(-every[i, pos], kind="stable")[:3]
        assert ids[i].tolist() == [first[i][j] for j in order]
        np.testing.assert_allclose(s[i], every[i, pos][order], rtol=0, atol=1e-5)
    _, ids_all = index.search(q, 5, rerank=reranker, rerank_depth=24, query_texts=queries)
    for i in range(3):
        assert ids_all[i].tolist() == [f"p{j}" for j in np.argsort(-every[i], kind="stable")[:5]]
    with pytest.raises(ValueError, match="query_texts, one per query"):
        index.search(q, 3, rerank=reranker, query_texts=queries[:2])
    with pytest.raises(ValueError, match="texts="):
        CorpusIndex(dense=np.ones((2, 8), np.float32)).search(q, 1, rerank=reranker, query_texts=queries)
    with pytest.raises(TypeError, match="compute_score"):
        index.search(q, 3, rerank=object(), query_texts=queries)


def test_eval_reports_each_mode_with_and_without_reranking(reranker_dir, tmp_path):
    """evaluate_beir(rerank=...) / `m3jax eval --rerank`: every mode also as "<mode>+rerank", its top rerank_depth
    passages in the re-ranker's order (checked against the re-ranker's own scores), the rest of top_k after them."""
    from m3jax.cli import main
    from m3jax.config import M3Config
    from m3jax.evaluate import evaluate_beir
    from m3jax.evaluate.synthetic import write_synthetic_beir
    from m3jax.reranker import FlagReranker
    from m3jax.testing import write_random_release

    synth = write_synthetic_beir(str(tmp_path / "synth"), passages=20)
    model = write_random_release(tmp_path / "m3", M3Config.tiny(), seed=1)
    reranker = FlagReranker(reranker_dir)
    report = evaluate_beir(synth, str(model), modes="dense,rrf", top_k=20, rerank=reranker, rerank_depth=5,
                           metrics="ndcg@10,recall@20", query_max_length=64, passage_max_length=64)
    assert list(report.metrics) == ["dense", "rrf", "dense+rerank", "rrf+rerank"]
    assert report.settings["rerank_depth"] == 5
    from m3jax.evaluate import load_beir

    ds = load_beir(synth, "test")
    texts = dict(zip(ds.corpus_ids, ds.corpus_texts, strict=True))
    qtext = dict(zip(ds.query_ids, ds.query_texts, strict=True))
    heads = [(mode, q, list(first)) for mode in ("dense", "rrf") for q, first in report.runs[mode].items()]
    s = np.asarray(reranker.compute_score([[qtext[q], texts[d]] for _, q, first in heads for d in first[:5]]))
    for n, (mode, q, first) in enumerate(heads):  # one call for every pair: one set of compiled shapes
        again = list(report.runs[f"{mode}+rerank"][q])
        assert again[:5] == [first[i] for i in np.argsort(-s[5 * n:5 * n + 5], kind="stable")]
        assert again[5:] == first[5:]
    out = tmp_path / "report.json"
    assert main(["eval", synth, "--model", str(model), "--modes", "dense", "--top-k", "20", "--metrics",
                 "ndcg@10", "--rerank", str(reranker_dir), "--rerank-depth", "5", "--output", str(out)]) == 0
    assert set(__import__("json").loads(out.read_text())["metrics"]) == {"dense", "dense+rerank"}


@pytest.mark.parametrize("teacher", [False, True], ids=["plain", "distilled"])
def test_training_loss_and_gradients_match_flagembedding(reranker_dir, teacher):
    """m3jax.train.loss.reranker_loss on RerankerModel's logits == FlagEmbedding's CrossEncoderModel training loss
    (listwise cross-entropy, positive first, plus the distillation term with teacher scores), and so are the
    gradients of every parameter, dropout off on both sides (the same padded batch of pairs)."""
    import jax
    import torch
    from FlagEmbedding.finetune.reranker.encoder_only.base.modeling import CrossEncoderModel
    from flax import nnx
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from m3jax import pipeline
    from m3jax.reranker import pair_ids, read_reranker
    from m3jax.tokenizer import Tokenizer
    from m3jax.train.loss import reranker_loss

    groups, g = 2, 3
    texts = mixed(groups * g + groups, seed=13, max_words=25)
    queries, passages = texts[:groups], texts[groups:]
    cfg, model = read_reranker(reranker_dir)
    tok = Tokenizer(reranker_dir)
    qs = tok.encode_plain([queries[i // g] for i in range(groups * g)], 48)
    ids = pair_ids(qs, tok.encode_plain(passages, 64), 64, cfg)
    L = max(len(x) for x in ids)
    b = pipeline.make_batch(ids, np.arange(len(ids)), L, len(ids), cfg.pad_token_id, cfg.bos_token_id,
                            cfg.eos_token_id)
    scores = np.random.default_rng(1).normal(size=groups * g).astype(np.float32) if teacher else None

    graphdef, state = nnx.split(model)

    def loss_fn(state):
        logits = nnx.merge(graphdef, state)(b.input_ids, b.attention_mask)
        return reranker_loss(logits, g, None if scores is None else jax.numpy.asarray(scores))

    ours, grads = jax.value_and_grad(loss_fn)(state)
    hf = AutoModelForSequenceClassification.from_pretrained(reranker_dir, hidden_dropout_prob=0.0,
                                                            attention_probs_dropout_prob=0.0)
    ref = CrossEncoderModel(hf, tokenizer=AutoTokenizer.from_pretrained(reranker_dir), train_batch_size=groups)
    ref.train()
    out = ref({"input_ids": torch.tensor(b.input_ids, dtype=torch.long),
               "attention_mask": torch.tensor(b.attention_mask, dtype=torch.long)},
              teacher_scores=None if scores is None else scores.tolist())
    out.loss.backward()
    np.testing.assert_allclose(float(ours), float(out.loss.detach()), rtol=0, atol=1e-5)
    flat = nnx.to_pure_dict(grads)
    pairs = [(flat["dense"]["kernel"], hf.classifier.dense.weight.grad.T),
             (flat["out_proj"]["bias"], hf.classifier.out_proj.bias.grad),
             (flat["embeddings"]["LayerNorm"]["scale"], hf.roberta.embeddings.LayerNorm.weight.grad),
             (flat["encoder"]["layer"]["attention"]["self"]["query"]["kernel"][1],
              hf.roberta.encoder.layer[1].attention.self.query.weight.grad.T),
             (flat["embeddings"]["word_embeddings"]["embedding"], hf.roberta.embeddings.word_embeddings.weight.grad)]
    for got, want in pairs:
        want = want.numpy()
        assert np.abs(want).max() > 0
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-6 * max(1.0, np.abs(want).max()))
