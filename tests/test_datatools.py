"""`m3jax mine` and `m3jax score`: FlagEmbedding's hn_mine.py and add_reranker_score.py over m3jax's encoder, index
and re-ranker, in its JSON-lines format."""

import json

import numpy as np
import pytest

from tests.helpers import mixed


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from m3jax.config import M3Config
    from m3jax.testing import write_random_release, write_random_reranker

    d = tmp_path_factory.mktemp("datatools")
    texts = mixed(46, seed=17, max_words=12)
    queries, pool = texts[:6], texts[6:]
    rows = [{"query": q, "pos": [pool[i]], "prompt": "p"} for i, q in enumerate(queries)]
    (d / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (d / "pool.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in pool + pool[:3]))  # repeats
    return {"dir": d, "rows": rows, "pool": pool,
            "model": write_random_release(d / "m3", M3Config.tiny(), seed=2),
            "reranker": write_random_reranker(d / "rr", M3Config.tiny(), seed=4)}


def read(path):
    return [json.loads(x) for x in open(path)]


def test_mine_draws_from_the_ranks_it_is_given(setup):
    from m3jax.api import BGEM3
    from m3jax.train.datatools import mine_hard_negatives

    d, pool = setup["dir"], setup["pool"]
    model = BGEM3(setup["model"], show_progress=False)
    kw = dict(candidate_pool=str(d / "pool.jsonl"), range_for_sampling=(2, 20), negative_number=5, seed=1,
              query_max_length=64, passage_max_length=64)
    stats = mine_hard_negatives(model, str(d / "train.jsonl"), d / "mined.jsonl", **kw)
    assert stats == {"rows": 6, "pool": 40, "filled_at_random": 0}  # the pool deduplicated
    out = read(d / "mined.jsonl")
    # The ranks, from the model's own vectors and a numpy dot product.
    p = model.encode(pool, max_length=64)["dense_vecs"]
    q = model.encode_queries([r["query"] for r in setup["rows"]], max_length=64)["dense_vecs"]
    ranks = np.argsort(-(q @ p.T), axis=1, kind="stable")
    for row, mined, r in zip(setup["rows"], out, ranks, strict=True):
        assert mined["query"] == row["query"] and mined["pos"] == row["pos"] and mined["prompt"] == "p"
        allowed = {pool[j] for j in r[2:20]} - set(row["pos"]) - {row["query"]}
        assert len(mined["neg"]) == 5 and len(set(mined["neg"])) == 5 and set(mined["neg"]) <= allowed
    mine_hard_negatives(model, str(d / "train.jsonl"), d / "again.jsonl", **kw)
    assert read(d / "again.jsonl") == out  # seeded
    few = mine_hard_negatives(model, str(d / "train.jsonl"), d / "few.jsonl", **{**kw, "range_for_sampling": (2, 4)})
    assert few["filled_at_random"] == 6  # 2 ranks for 5 negatives: the rest drawn from the pool, never a positive
    for row, mined in zip(setup["rows"], read(d / "few.jsonl"), strict=True):
        assert len(mined["neg"]) == 5 and not set(mined["neg"]) & set(row["pos"])


def test_score_adds_teacher_scores(setup):
    from m3jax import FlagReranker
    from m3jax.api import BGEM3
    from m3jax.train.datatools import add_teacher_scores

    d = setup["dir"]
    rows = [{**r, "neg": setup["pool"][10:13]} for r in setup["rows"]]
    (d / "with_neg.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    pairs = [[r["query"], t] for r in rows for t in r["pos"] + r["neg"]]
    reranker = FlagReranker(setup["reranker"])
    add_teacher_scores(str(d / "with_neg.jsonl"), d / "rr.jsonl", reranker=reranker)
    want = np.asarray(reranker.compute_score(pairs)).reshape(6, 4)
    got = read(d / "rr.jsonl")
    np.testing.assert_allclose([r["pos_scores"] + r["neg_scores"] for r in got], want, rtol=0, atol=1e-6)
    assert [len(r["neg_scores"]) for r in got] == [3] * 6
    model = BGEM3(setup["model"], show_progress=False)
    add_teacher_scores(str(d / "with_neg.jsonl"), d / "m3.jsonl", model=model, weights=(1.0, 0.3, 1.0),
                       max_length=64)
    want = np.asarray(model.compute_score(pairs, weights_for_different_modes=[1.0, 0.3, 1.0],
                                          max_passage_length=64)["colbert+sparse+dense"])
    np.testing.assert_allclose([r["pos_scores"] + r["neg_scores"] for r in read(d / "m3.jsonl")],
                               want.reshape(6, 4), rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="exactly one of"):
        add_teacher_scores(str(d / "with_neg.jsonl"), d / "x.jsonl")


def test_commands_and_bad_input(setup, capsys):
    from m3jax.cli import main

    d = setup["dir"]
    assert main(["mine", str(d / "train.jsonl"), str(d / "cli.jsonl"), "--model", str(setup["model"]),
                 "--range-for-sampling", "2-10", "--negative-number", "3", "--query-max-length", "64",
                 "--passage-max-length", "64"]) == 0
    assert [len(r["neg"]) for r in read(d / "cli.jsonl")] == [3] * 6
    assert main(["score", str(d / "cli.jsonl"), str(d / "cli_scored.jsonl"), "--reranker",
                 str(setup["reranker"])]) == 0
    assert all(len(r["neg_scores"]) == 3 for r in read(d / "cli_scored.jsonl"))
    (d / "bad.jsonl").write_text(json.dumps({"query": "q", "pos": ["a"]}) + "\n" + json.dumps({"query": 3}) + "\n")
    assert main(["mine", str(d / "bad.jsonl"), str(d / "bad_out.jsonl"), "--model", str(setup["model"])]) == 2
    err = capsys.readouterr().err
    assert "bad.jsonl:2" in err and "'query' must be a string" in err and not (d / "bad_out.jsonl").exists()
    assert main(["mine", str(d / "train.jsonl"), str(d / "x.jsonl"), "--model", str(setup["model"]),
                 "--range-for-sampling", "9-3"]) == 2
