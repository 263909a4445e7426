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
                 "--passage-max-length", "64", "--chunk-rows", "4"]) == 0
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


class Killed(RuntimeError):
    pass


class Flaky:
    """Wraps a scorer or model method: the call numbered `fail_at` raises (a run killed mid-way); counts calls."""

    def __init__(self, fn, fail_at=None):
        self.fn, self.fail_at, self.calls = fn, fail_at, 0

    def __call__(self, *a, **kw):
        self.calls += 1
        if self.calls == self.fail_at:
            raise Killed(f"call {self.calls}")
        return self.fn(*a, **kw)


def test_score_resumes_a_killed_run_and_refuses_other_settings(setup):
    """Chunks of 2 rows (3 chunks): a run killed in its second chunk leaves chunk 0 done and no output; the rerun
    scores only chunks 1 and 2 and writes what an uninterrupted run writes; a rerun with other settings over the
    killed run's chunks is refused, naming the setting."""
    from m3jax import FlagReranker
    from m3jax.train.datatools import JobError, add_teacher_scores

    d = setup["dir"]
    rows = [{**r, "neg": setup["pool"][10 + i:12 + i]} for i, r in enumerate(setup["rows"])]
    (d / "resume_in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    reranker = FlagReranker(setup["reranker"])
    add_teacher_scores(str(d / "resume_in.jsonl"), d / "straight.jsonl", reranker=reranker, chunk_rows=2)
    out, parts = d / "resumed.jsonl", d / ".resumed.jsonl.parts"
    real = reranker.compute_score
    reranker.compute_score = Flaky(real, fail_at=2)
    with pytest.raises(Killed):
        add_teacher_scores(str(d / "resume_in.jsonl"), out, reranker=reranker, chunk_rows=2)
    assert not out.exists() and sorted(p.name for p in parts.glob("part-*.jsonl")) == ["part-00000.jsonl"]
    with pytest.raises(JobError, match=r"chunk_rows: 2 .* != 3 \(now\)"):
        add_teacher_scores(str(d / "resume_in.jsonl"), out, reranker=reranker, chunk_rows=3)
    reranker.compute_score = Flaky(real)
    stats = add_teacher_scores(str(d / "resume_in.jsonl"), out, reranker=reranker, chunk_rows=2)
    assert reranker.compute_score.calls == 2 and stats == {"rows": 6, "pairs": 18, "teacher": "reranker"}
    assert read(out) == read(d / "straight.jsonl") and not parts.exists()


def test_mine_resumes_without_embedding_the_pool_again(setup):
    """mine killed while searching its second chunk of queries: the rerun embeds no pool passage again (their
    vectors were kept), searches only the chunks not done, and writes what an uninterrupted run writes."""
    from m3jax.api import BGEM3
    from m3jax.train.datatools import mine_hard_negatives

    d = setup["dir"]
    kw = dict(candidate_pool=str(d / "pool.jsonl"), range_for_sampling=(2, 20), negative_number=4, seed=3,
              query_max_length=64, passage_max_length=64, chunk_rows=4)
    model = BGEM3(setup["model"], show_progress=False)
    straight = mine_hard_negatives(model, str(d / "train.jsonl"), d / "m_straight.jsonl", **kw)
    encode, encode_queries = model.encode, model.encode_queries
    model.encode_queries = Flaky(encode_queries, fail_at=2)
    with pytest.raises(Killed):
        mine_hard_negatives(model, str(d / "train.jsonl"), d / "m_resumed.jsonl", **kw)
    parts = d / ".m_resumed.jsonl.parts"
    assert sorted(p.name for p in parts.iterdir()) == [  # 40 pool passages in chunks of 4; 6 rows: chunks 0, 1
        "part-00000.counts.json", "part-00000.jsonl", *[f"pool-{k:05d}.npy" for k in range(0, 40, 4)],
        "settings.json"]
    model.encode, model.encode_queries = Flaky(encode), Flaky(encode_queries)
    assert mine_hard_negatives(model, str(d / "train.jsonl"), d / "m_resumed.jsonl", **kw) == straight
    assert model.encode.calls == 0 and model.encode_queries.calls == 1
    assert read(d / "m_resumed.jsonl") == read(d / "m_straight.jsonl") and not parts.exists()
