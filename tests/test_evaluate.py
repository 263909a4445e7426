"""m3jax.evaluate: BEIR loading, runs per mode against plain-numpy references from the same embeddings, metrics
against a second library (ir-measures, which runs pytrec_eval / trec_eval), the CLI end to end."""

import dataclasses
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import fsspec
import ir_measures
import numpy as np
import pytest

from m3jax.api import BGEM3
from m3jax.config import M3Config
from m3jax.evaluate import (
    DatasetError,
    build_index,
    compute_metrics,
    encode_dataset,
    evaluate_beir,
    load_beir,
    reciprocal_rank_fusion,
    retrieve,
    synthetic_beir,
    write_synthetic_beir,
)
from m3jax.testing import write_random_release

ROOT = Path(__file__).resolve().parents[1]
MODES = ("dense", "sparse", "colbert", "hybrid", "rrf")
TOL = 1e-5


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    return write_synthetic_beir(str(tmp_path_factory.mktemp("beir") / "synth"))


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    # A release-layout random model: its dense vectors spread (cosines ~0.8 to 1), so rankings are well posed.
    return write_random_release(tmp_path_factory.mktemp("release") / "tiny", M3Config.tiny(), seed=1)


@pytest.fixture(scope="module")
def model(release):
    return BGEM3(release, dtype="float32", batch_size=16, show_progress=False)


@pytest.fixture(scope="module")
def encoded(synth, model):
    ds = load_beir(synth)
    queries, corpus = encode_dataset(model, ds, heads=("dense", "sparse", "colbert"))
    return ds, queries, corpus, build_index(corpus, ds.corpus_ids)


# ------------------------------------------------------------------------------------------------ loader
def test_loader_reads_the_layout(synth):
    corpus, queries, qrels = synthetic_beir()
    ds = load_beir(synth)
    assert ds.corpus_ids == [r["_id"] for r in corpus]
    assert ds.corpus_texts == [f"{r['title']} {r['text']}" for r in corpus]  # BEIR / FlagEmbedding's join
    test_queries = dict.fromkeys(q for q, _, _ in qrels["test"])
    assert ds.query_ids == [r["_id"] for r in queries if r["_id"] in test_queries]  # only the split's, file order
    assert ds.query_texts == [r["text"] for r in queries if r["_id"] in test_queries]
    assert sum(map(len, ds.qrels.values())) == len(qrels["test"])
    assert all(ds.qrels[q][d] == s for q, d, s in qrels["test"])
    st = ds.stats()
    assert (st["passages"], st["queries"], st["queries_in_file"], st["judgements"]) == \
        (len(corpus), len(test_queries), len(queries), len(qrels["test"]))
    dev = load_beir(synth, "dev")
    assert dev.query_ids == [q for q, _, _ in qrels["dev"]] and dev.split == "dev"


def test_loader_reads_fsspec_urls_and_untitled_passages(synth):
    url = "memory://m3jax-test/synth"
    write_synthetic_beir(url)
    local, mem = load_beir(synth), load_beir(url)
    assert (mem.corpus_ids, mem.corpus_texts, mem.query_ids, mem.query_texts, mem.qrels) == \
        (local.corpus_ids, local.corpus_texts, local.query_ids, local.query_texts, local.qrels)
    with zipfile.ZipFile(Path(synth).parent / "synth.zip", "w") as z:  # a BEIR download, read in place
        for f in sorted(Path(synth).rglob("*")):
            z.write(f, f.relative_to(Path(synth).parent).as_posix())
    zipped = load_beir(f"zip://synth::{Path(synth).parent / 'synth.zip'}")
    assert (zipped.corpus_texts, zipped.query_ids, zipped.qrels) == (local.corpus_texts, local.query_ids, local.qrels)
    fs = fsspec.filesystem("memory")
    fs.pipe_file("/m3jax-test/untitled/corpus.jsonl",
                 b'{"_id": "a", "text": " no title "}\n\n{"_id": 7, "title": null, "text": "x"}\n'
                 b'{"_id": "b", "title": "", "text": " y "}\n')
    fs.pipe_file("/m3jax-test/untitled/queries.jsonl", b'{"_id": "q", "text": "x"}\n')
    fs.pipe_file("/m3jax-test/untitled/qrels/test.tsv", b"query-id\tcorpus-id\tscore\nq\t7\t1\n")
    ds = load_beir("memory://m3jax-test/untitled")
    assert ds.corpus_ids == ["a", "7", "b"] and ds.corpus_texts == [" no title ", "x", "y"]


BAD = {
    "corpus.jsonl": [
        ('{"_id": "d0", "text": "a"}\n{"_id": "d1", "text": "b"\n', "corpus.jsonl line 2: not valid JSON"),
        ('{"_id": "d0", "text": "a"}\n["d1"]\n', "corpus.jsonl line 2: expected a JSON object, got list"),
        ('{"_id": "d0", "title": "t"}\n', "corpus.jsonl line 1 (_id 'd0'): 'text' missing"),
        ('{"_id": "d0", "text": 3}\n', "corpus.jsonl line 1 (_id 'd0'): 'text' must be a string, got int"),
        ('{"_id": "d0", "title": 1, "text": "a"}\n', "'title' must be a string, got int"),
        ('{"text": "a"}\n', "corpus.jsonl line 1: '_id' must be a string, got None"),
        ('{"_id": "d0", "text": "a"}\n\n{"_id": "d0", "text": "b"}\n', "line 3: duplicate _id 'd0' (first on line 1)"),
        ("\n", "corpus.jsonl: no passages"),
    ],
    "queries.jsonl": [
        ('{"_id": "q0"}\n', "queries.jsonl line 1 (_id 'q0'): 'text' missing"),
        ('{"_id": "q0", "text": "a"}\n{"_id": "q0", "text": "a"}\n', "queries.jsonl line 2: duplicate _id 'q0'"),
    ],
    "qrels/test.tsv": [
        ("q0\td0\t1\n", "test.tsv line 1: expected the header"),
        ("query-id\tcorpus-id\tscore\nq0\td0\n", "test.tsv line 2: expected 3 tab-separated fields, got 2"),
        ("query-id\tcorpus-id\tscore\nq0\td0\thigh\n", "test.tsv line 2: score must be an integer, got 'high'"),
        ("query-id\tcorpus-id\tscore\nq0\td0\t1\nqx\td0\t1\n", "test.tsv line 3: query-id 'qx' is not in queries"),
        ("query-id\tcorpus-id\tscore\nq0\tdx\t1\n", "test.tsv line 2: corpus-id 'dx' is not in corpus.jsonl"),
        ("query-id\tcorpus-id\tscore\nq0\td0\t1\nq0\td0\t2\n", "line 3: duplicate judgement of ('q0', 'd0')"),
        ("query-id\tcorpus-id\tscore\n", "test.tsv: no judgements"),
    ],
}


@pytest.mark.parametrize("name,content,message", [(n, c, m) for n, cases in BAD.items() for c, m in cases])
def test_loader_names_file_and_line_of_bad_rows(tmp_path, name, content, message):
    good = {"corpus.jsonl": '{"_id": "d0", "text": "a"}\n', "queries.jsonl": '{"_id": "q0", "text": "a"}\n',
            "qrels/test.tsv": "query-id\tcorpus-id\tscore\nq0\td0\t1\n"}
    (tmp_path / "qrels").mkdir()
    for f, text in {**good, name: content}.items():
        (tmp_path / f).write_text(text, encoding="utf-8")
    with pytest.raises(DatasetError) as e:
        load_beir(str(tmp_path))
    assert message in str(e.value) and str(tmp_path) in str(e.value)


def test_loader_missing_files(tmp_path, synth):
    with pytest.raises(FileNotFoundError, match="no such dataset folder"):
        load_beir(str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match=r"qrels/train.tsv: no such file \(splits found: dev, test\)"):
        load_beir(synth, "train")
    (tmp_path / "corpus.jsonl").write_text('{"_id": "d0", "text": "a"}\n')
    with pytest.raises(FileNotFoundError, match="queries.jsonl: no such file"):
        load_beir(str(tmp_path))


# ------------------------------------------------------------------------------------------------ runs
def _reference_scores(queries, corpus):
    """{mode: [Q, N] float64} from the EncodeResults in plain numpy (ColBERT: mean over query tokens of the
    best passage token, no zero floor, as CorpusIndex's default)."""
    dense = queries.dense.astype(np.float64) @ corpus.dense.astype(np.float64).T
    qrows, prows = queries.sparse_rows(), corpus.sparse_rows()
    sparse = np.zeros(dense.shape)
    for i, (qi, qw) in enumerate(qrows):
        qd = dict(zip(qi.tolist(), qw.astype(np.float64).tolist(), strict=True))
        for j, (pi, pw) in enumerate(prows):
            sparse[i, j] = sum(qd.get(t, 0.0) * w for t, w in zip(pi.tolist(), pw.astype(np.float64).tolist(),
                                                                   strict=True))
    colbert = np.zeros(dense.shape)
    for i in range(len(queries)):
        qv = queries.colbert[i][queries.colbert_mask[i]].astype(np.float64)
        for j in range(len(corpus)):
            pv = corpus.colbert[j][corpus.colbert_mask[j]].astype(np.float64)
            colbert[i, j] = (qv @ pv.T).max(1).mean()
    return {"dense": dense, "sparse": sparse, "colbert": colbert}


def _ranked(scores: np.ndarray, k: int) -> list[int]:
    """Positions of the k best by (score desc, position asc); -inf rows are never returned."""
    order = np.lexsort((np.arange(len(scores)), -scores))
    return [int(j) for j in order if np.isfinite(scores[j])][:k]


def _assert_same_ranking(got: dict, ref: np.ndarray, pos: dict, k: int, label: str):
    """got {passage id: score} in rank order is the top k of ref [N] (-inf = excluded), up to float32 noise:
    its scores are ref's, they never rise, nothing left out beats the last, exact ties go by corpus order."""
    idx = [pos[d] for d in got]
    assert len(idx) == min(k, int(np.isfinite(ref).sum())), label
    s = np.array(list(got.values()))
    np.testing.assert_allclose(s, ref[idx], rtol=TOL, atol=TOL, err_msg=label)
    assert np.all(np.diff(ref[idx]) <= TOL), label
    rest = np.delete(ref, idx)
    assert rest.max(initial=-np.inf) <= ref[idx[-1]] + TOL, label
    tied = np.flatnonzero(np.diff(s) == 0)
    assert all(idx[t] < idx[t + 1] for t in tied), label


@pytest.mark.parametrize("top_k,candidates,ignore", [(10, 100, True), (5, 8, True), (40, 40, False)])
def test_runs_equal_numpy_reference(encoded, top_k, candidates, ignore):
    ds, queries, corpus, index = encoded
    weights = (1.0, 0.3, 1.0) if candidates != 8 else (0.5, 2.0, 0.0)
    runs = retrieve(index, queries, ds.query_ids, modes=MODES, top_k=top_k, weights=weights,
                    candidates=candidates, ignore_identical_ids=ignore, rrf_k=60)
    assert list(runs) == list(MODES)
    ref = _reference_scores(queries, corpus)
    pos = {d: j for j, d in enumerate(ds.corpus_ids)}
    for i, qid in enumerate(ds.query_ids):
        excluded = np.array([ignore and d == qid for d in ds.corpus_ids])
        row = {m: np.where(excluded, -np.inf, ref[m][i]) for m in ref}
        for m in ("dense", "sparse", "colbert"):
            _assert_same_ranking(runs[m][qid], row[m], pos, top_k, f"{m} {qid}")
        # CorpusIndex's first stage: the top max(candidates, k searched) by dense, the query's own id included
        cand = _ranked(ref["dense"][i], min(max(candidates, top_k + ignore), len(pos)))
        hyb = np.full(len(pos), -np.inf)
        hyb[cand] = sum(w * ref[m][i][cand] for w, m in zip(weights, ("dense", "sparse", "colbert"), strict=True))
        _assert_same_ranking(runs["hybrid"][qid], np.where(excluded, -np.inf, hyb), pos, top_k, f"hybrid {qid}")
        rrf = np.zeros(len(pos))  # fusion of the three runs just checked (near-ties may order them either way)
        for m in ("dense", "sparse", "colbert"):
            rrf[[pos[d] for d in runs[m][qid]]] += 1.0 / (60 + np.arange(1, len(runs[m][qid]) + 1))
        got = runs["rrf"][qid]
        assert len(got) == top_k
        np.testing.assert_allclose(list(got.values()), rrf[[pos[d] for d in got]], rtol=1e-12)
        assert np.all(np.diff(list(got.values())) <= 0)
        assert min(got.values()) >= np.delete(rrf, [pos[d] for d in got]).max(initial=0) - 1e-12
        if ignore:
            assert all(qid not in run[qid] for run in runs.values())


def test_identical_ids_are_dropped_only_when_asked(encoded):
    ds, queries, _, index = encoded
    assert "d1" in ds.query_ids and "d1" in ds.corpus_ids  # the synthetic set's Quora-like query
    kept = retrieve(index, queries, ds.query_ids, modes=("dense",), top_k=3, ignore_identical_ids=False)
    first, score = next(iter(kept["dense"]["d1"].items()))
    assert first == "d1" and score == pytest.approx(1.0, abs=1e-5)  # its own text: cosine 1
    dropped = retrieve(index, queries, ds.query_ids, modes=("dense",), top_k=3)
    assert "d1" not in dropped["dense"]["d1"] and len(dropped["dense"]["d1"]) == 3
    assert list(dropped["dense"]["d1"])[:2] == list(kept["dense"]["d1"])[1:]


# ------------------------------------------------------------------------------------------------ metrics
IRM = {"ndcg@10": ir_measures.nDCG @ 10, "recall@100": ir_measures.R @ 100, "mrr@10": ir_measures.RR @ 10,
       "ndcg@3": ir_measures.nDCG @ 3, "recall@2": ir_measures.R @ 2, "recall@20": ir_measures.R @ 20}


def _second_library(qrels, run, metrics):
    """(mean, per query) by ir-measures (pytrec_eval), over every query of qrels, as compute_metrics."""
    measures = [IRM[m] for m in metrics]
    per_query = {m: dict.fromkeys(qrels, 0.0) for m in metrics}
    for r in ir_measures.iter_calc(measures, qrels, run):
        per_query[next(m for m in metrics if IRM[m] == r.measure)][r.query_id] = r.value
    return {m: float(np.mean(list(v.values()))) for m, v in per_query.items()}, per_query


def test_metrics_match_a_second_library_on_a_fixed_run():
    # Graded and zero judgements, a query with no relevant passage retrieved, relevant passages past rank 10, a
    # query with only 0 judgements, one the run lacks; scores without ties (libraries order ties differently).
    qrels = {"a": {"d1": 2, "d2": 1, "d9": 0}, "b": {"d3": 1, "d20": 1}, "c": {"d4": 1}, "d": {"d5": 0},
             "e": {"d1": 1}, "f": {"d6": 3, "d7": 1}}
    heads = {"a": ["d9", "d2", "d8", "d1"], "b": ["d0", "d11", "d20"] + [f"d1{j}" for j in range(2, 10)] + ["d3"],
             "c": [], "d": ["d5"], "f": ["d6", "d8", "d7"]}
    docs = [f"d{j}" for j in range(30)]
    run = {}
    for q, top in heads.items():  # the given head, then the other passages; strictly decreasing scores
        order = top + [d for d in docs if d not in top and not (q == "c" and d == "d4")]
        run[q] = dict(zip(order, np.linspace(1, 0.01, len(order)).tolist(), strict=True))
    metrics = ("ndcg@10", "recall@100", "mrr@10", "ndcg@3", "recall@2")
    mean, per_query = compute_metrics(qrels, run, metrics)
    ref_mean, ref_per_query = _second_library(qrels, run, metrics)
    for m in metrics:
        assert mean[m] == pytest.approx(ref_mean[m], abs=1e-9), m
        for q in qrels:
            assert per_query[m][q] == pytest.approx(ref_per_query[m][q], abs=1e-9), (m, q)
    assert per_query["recall@100"]["e"] == 0 and per_query["ndcg@10"]["d"] == 0
    assert len({round(v, 6) for v in per_query["ndcg@10"].values()}) >= 3  # not a constant


def test_oracle_run_scores_one(encoded):
    ds = encoded[0]
    oracle = {q: dict(zip(sorted(rel, key=lambda d: -rel[d]), np.linspace(1, 0.5, len(rel)).tolist(), strict=True))
              for q, rel in ds.qrels.items()}
    mean, _ = compute_metrics(ds.qrels, oracle)
    assert mean == {"ndcg@10": 1.0, "recall@100": 1.0, "mrr@10": 1.0}
    worst = {q: {d: 1.0 / (j + 1) for j, d in enumerate(d for d in ds.corpus_ids if d not in rel)}
             for q, rel in ds.qrels.items()}
    assert compute_metrics(ds.qrels, worst)[0] == {"ndcg@10": 0.0, "recall@100": 0.0, "mrr@10": 0.0}


def test_rrf_matches_ranx_fusion():
    import ranx

    rng = np.random.default_rng(1)
    docs = [f"d{j}" for j in range(25)]
    runs = [{q: dict(zip(rng.permutation(docs)[:12].tolist(), np.linspace(1, 0.1, 12).tolist(), strict=True))
             for q in ("a", "b")} for _ in range(3)]
    ours = reciprocal_rank_fusion(runs, k=60)
    theirs = ranx.fusion.rrf([ranx.Run(r) for r in runs], k=60).to_dict()
    for q in ours:
        assert ours[q].keys() == theirs[q].keys()
        for d, s in ours[q].items():
            assert s == pytest.approx(theirs[q][d], rel=1e-12)
        assert np.all(np.diff(list(ours[q].values())) <= 0)
    assert reciprocal_rank_fusion(runs, k=60, depth=4)["a"] == dict(list(ours["a"].items())[:4])
    with pytest.raises(ValueError, match="differ in their queries"):
        reciprocal_rank_fusion([runs[0], {"a": runs[1]["a"]}])


# ------------------------------------------------------------------------------------------------ end to end
def test_evaluate_beir_end_to_end(encoded, model, synth, tmp_path):
    ds, queries, _, index = encoded
    out = tmp_path / "sub" / "results.json"
    metrics = ("ndcg@10", "recall@20", "mrr@10")
    report = evaluate_beir(synth, model, output=out, top_k=20, metrics=metrics, query_max_length=64,
                           passage_max_length=64)
    runs = retrieve(index, queries, ds.query_ids, top_k=20)  # the same embeddings: texts fit in 64 tokens
    assert report.settings["truncated_passages"] == report.settings["truncated_queries"] == 0
    assert report.runs == runs
    ranx_means = {m: compute_metrics(ds.qrels, run, metrics)[0] for m, run in runs.items()}
    assert report.metrics == ranx_means
    for mode in ("dense", "colbert", "hybrid"):  # no tied scores, so pytrec_eval sees the same order
        assert all(len(set(r.values())) == len(r) for r in runs[mode].values())
        ref, _ = _second_library(ds.qrels, runs[mode], metrics)
        assert report.metrics[mode] == pytest.approx(ref, abs=1e-9)
    saved = json.loads(out.read_text())
    assert saved["metrics"] == report.metrics and saved["dataset"]["passages"] == 40
    st = saved["settings"]
    assert (st["weights"], st["top_k"], st["rrf_k"], st["query_max_length"], st["passage_max_length"]) == \
        ([1.0, 0.3, 1.0], 20, 60, 64, 64)
    assert st["model"] == str(model.model_name_or_path) and st["metric_library"] == "ranx"
    assert not list(out.parent.glob(".*tmp*"))
    text = report.tables()
    for mode in MODES:
        assert f"{mode}  (39 queries, 40 passages, top 20" in text
    assert text.count("nDCG@10") == text.count("Recall@20") == text.count("MRR@10") == 5


def test_evaluate_beir_takes_a_precomputed_corpus(encoded, model):
    ds, queries, corpus, index = encoded
    report = evaluate_beir(ds, model, modes="colbert,rrf", corpus_embeddings=corpus, top_k=40)
    assert report.runs == retrieve(index, queries, ds.query_ids, modes=("colbert", "rrf"), top_k=40)
    assert report.settings["corpus_embeddings"] == "given" and "encode_corpus_s" not in report.timings
    dense_only = dataclasses.replace(corpus, sparse=None, colbert_vecs=None, _padded={})
    with pytest.raises(ValueError, match=r"need the sparse representation \(sparse_ids is None\)"):
        evaluate_beir(ds, object(), modes="dense,sparse", corpus_embeddings=dense_only)
    with pytest.raises(ValueError, match="3 rows for the 40 passages"):
        evaluate_beir(ds, object(), modes="dense", corpus_embeddings=corpus_rows(corpus, 3))


def corpus_rows(enc, n):
    rows = ("lengths", "truncated", "dense", "sparse", "colbert_vecs")
    return dataclasses.replace(enc, _padded={}, **{f: getattr(enc, f)[:n] for f in rows
                                                   if getattr(enc, f) is not None})


def test_evaluate_beir_rejects_bad_settings_before_loading(synth):
    never = object()  # not a model: the checks must fail first
    for kw, msg in [({"modes": "dense,bm25"}, "unknown mode 'bm25'"), ({"weights": "1,0.3"}, "weights"),
                    ({"weights": (0, 0, 0)}, "not all 0"), ({"metrics": "ndcg@ten"}, "unknown metric"),
                    ({"top_k": 0}, "top_k"), ({"first_stage": "sparse"}, "first_stage"),
                    ({"top_k": 10}, "recall@100 looks deeper than top_k=10")]:
        with pytest.raises(ValueError, match=msg):
            evaluate_beir(synth, never, **kw)


def test_cli_end_to_end(synth, tmp_path, release):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    out = tmp_path / "cli.json"
    cmd = [sys.executable, "-m", "m3jax", "eval", synth, "--model", str(release),
           "--modes", "dense,sparse,rrf", "--weights", "1,0.3,1", "--top-k", "40", "--output", str(out),
           "--metrics", "ndcg@10,recall@100,mrr@10,map@40", "--batch-size", "16", "--query-max-length", "64",
           "--passage-max-length", "64", "--dtype", "float32"]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert r.returncode == 0, r.stderr
    saved = json.loads(out.read_text())
    assert list(saved["metrics"]) == ["dense", "sparse", "rrf"] and saved["settings"]["batch_size"] == 16
    assert all(list(v) == ["ndcg@10", "recall@100", "mrr@10", "map@40"] for v in saved["metrics"].values())
    for mode, values in saved["metrics"].items():
        assert f"{mode}  (39 queries" in r.stdout
        assert f"nDCG@10     {values['ndcg@10']:.4f}" in r.stdout
    assert str(out) in r.stdout

    bad = tmp_path / "bad"
    write_synthetic_beir(str(bad))
    with open(bad / "qrels" / "test.tsv", "a") as f:
        f.write("q0\tmissing\t1\n")
    r = subprocess.run([*cmd[:4], str(bad), *cmd[5:]], capture_output=True, text=True, env=env, cwd=ROOT,
                       timeout=600)
    line = len((bad / "qrels" / "test.tsv").read_text().splitlines())
    assert r.returncode == 2 and f"test.tsv line {line}: corpus-id 'missing' is not in corpus.jsonl" in r.stderr


def test_evaluate_beir_on_a_compact_corpus(encoded, model):
    """int8 dense and ColBERT, MUVERA: the runs of the compact index (tests/test_compact_index.py checks its scores
    against their definitions); with every passage a candidate, rescoring ranks the whole corpus, so dense equals
    the float query against the dequantized passages and MUVERA + MaxSim equals the exhaustive ColBERT run."""
    from m3jax.compact import MuveraConfig, dequantize_int8

    ds, queries, corpus, _ = encoded
    cfg = MuveraConfig(dim=corpus.colbert.shape[-1], k_sim=3, dim_proj=8, r_reps=4)
    compact = {"dense_format": "int8", "colbert_format": "int8", "muvera": cfg}
    report = evaluate_beir(ds, model, modes="dense,colbert,muvera", corpus_embeddings=corpus, top_k=10,
                           candidates=40, compact=compact, metrics="ndcg@10")
    index = build_index(corpus, ds.corpus_ids, compact=compact)
    assert report.runs == retrieve(index, queries, ds.query_ids, modes=("dense", "colbert", "muvera"), top_k=10,
                                   candidates=40)
    assert report.settings["compact"] == {"dense_format": "int8", "colbert_format": "int8",
                                          "muvera": dataclasses.asdict(cfg)}
    deq = np.asarray(dequantize_int8(index.corpus["dense"][:40], index.int8_ranges["dense"]), np.float64)
    ref = queries.dense.astype(np.float64) @ deq.T  # 10 x 4 candidates = the whole corpus: rescoring ranks all
    pos = {d: i for i, d in enumerate(ds.corpus_ids)}
    for i, qid in enumerate(ds.query_ids):
        row = np.where([d == qid for d in ds.corpus_ids], -np.inf, ref[i])
        _assert_same_ranking(report.runs["dense"][qid], row, pos, 10, f"int8 dense {qid}")
    for qid in ds.query_ids:
        assert list(report.runs["muvera"][qid]) == list(report.runs["colbert"][qid])
    with pytest.raises(ValueError, match="mode 'muvera' needs compact"):
        evaluate_beir(ds, model, modes="muvera", corpus_embeddings=corpus)
