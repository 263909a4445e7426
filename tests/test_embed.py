"""m3jax embed: streamed inputs to sharded Parquet, equal to encode_padded; resume after SIGKILL; bad inputs;
bounded memory; the reader and CorpusIndex round trip. Tiny model, a few compiled shapes shared by every test."""

import gzip
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa  # the embed extra is part of the test extra: missing it must fail, not skip
import pyarrow.parquet as pq
import pytest

from m3jax import pipeline
from m3jax.api import BGEM3
from m3jax.embed import EmbeddingReader, EmbedError, InputError, embed
from m3jax.embed.planner import padding_ratio
from tests.helpers import SENTENCES, mixed

ROOT = Path(__file__).resolve().parents[1]
TEXTS = SENTENCES + mixed(25, seed=3, max_words=40) + [""]
# Few shapes: buckets 32 / 64 (8192 is the required catch-all), at most 4 rows.
BUCKETS = (32, 64, 8192)
SET = dict(max_length=64, batch_size=4, length_buckets=BUCKETS, colbert_dtype="float32", quiet=True)


@pytest.fixture(scope="module")
def model_dir():
    from m3jax.testing import random_m3jax_dir

    return random_m3jax_dir("tiny")


@pytest.fixture(scope="module")
def ref(model_dir):
    m = BGEM3(model_dir, use_fp16=False, length_buckets=BUCKETS, batch_size=4, show_progress=False)
    return m.encode_padded(TEXTS, max_length=64)


def write_txt(path, texts):
    Path(path).write_text("".join(t + "\n" for t in texts), encoding="utf-8")
    return str(path)


def assert_matches(r: EmbeddingReader, ref, rows=None, colbert_dtype="float32"):
    """Reader output == encode_padded's, bit for bit (colbert after the cast to the stored dtype)."""
    rows = np.arange(len(ref)) if rows is None else rows
    np.testing.assert_array_equal(r.lengths(), ref.lengths[rows])
    np.testing.assert_array_equal(r.truncated(), ref.truncated[rows])
    np.testing.assert_array_equal(r.dense(), ref.dense[rows])
    ids, w = r.sparse_padded()
    k = ids.shape[1]
    assert (ref.sparse_ids[rows, k:] == -1).all()
    np.testing.assert_array_equal(ids, ref.sparse_ids[rows, :k])
    np.testing.assert_array_equal(w, ref.sparse_weights[rows, :k])
    flat, offsets = r.colbert()
    want = [ref.colbert[i, :ref.lengths[i] - 1] for i in rows]
    np.testing.assert_array_equal(np.diff(offsets), [len(v) for v in want])
    np.testing.assert_array_equal(flat, np.concatenate(want).astype(colbert_dtype))


# ------------------------------------------------------------------------------------------- equal to encode
def test_one_window_equals_encode_bit_for_bit(tmp_path, model_dir, ref):
    """One shard, one window: the very batches encode_padded runs, so every float32 output is bit-identical."""
    src = write_txt(tmp_path / "c.txt", TEXTS)
    m = embed(src, model_dir, tmp_path / "out", shard_size=1000, window=1000, **SET)
    r = EmbeddingReader(tmp_path / "out")
    assert len(r) == len(TEXTS) and r.ids().tolist() == [str(i) for i in range(len(TEXTS))]
    assert_matches(r, ref)
    # The empty last line is kept as an empty text (<s></s>), counted and documented in the manifest.
    assert m["empty_texts"] == 1 and "empty" in m["empty_texts_policy"] and r.lengths()[-1] == 2
    assert m["model"]["fingerprint"] and m["settings"]["max_length"] == 64 and m["rows"] == len(TEXTS)
    assert m["shards"] == [{"file": "shard-00000.parquet", "shard": 0, "first_row": 0, "rows": len(TEXTS),
                            "tokens": int(ref.lengths.sum()), "empty_texts": 1,
                            "truncated": int(ref.truncated.sum())}]
    assert ref.truncated.sum() > 0  # some texts run past max_length=64: the flag is exercised
    # No m3jax needed to read it: pandas, DuckDB and datasets read the shards as they are.
    import duckdb
    import pandas as pd

    df = pd.read_parquet(tmp_path / "out")
    np.testing.assert_array_equal(np.stack(df["dense"].to_numpy()), ref.dense)
    con = duckdb.connect()
    n, tok = con.execute(f"select count(*), sum(tokens) from '{tmp_path}/out/*.parquet'").fetchone()
    assert (n, tok) == (len(TEXTS), int(ref.lengths.sum()))
    first = con.execute(f"select dense from '{tmp_path}/out/*.parquet' where id = '0'").fetchone()[0]
    np.testing.assert_array_equal(np.array(first, np.float32), ref.dense[0])
    import datasets

    ds = datasets.load_dataset("parquet", data_files=str(tmp_path / "out" / "*.parquet"), split="train",
                               cache_dir=str(tmp_path / "hf"))
    assert ds.num_rows == len(TEXTS) and ds[3]["sparse_ids"] == ref.sparse_rows()[3][0].tolist()


def test_shards_and_windows_keep_input_order(tmp_path, model_dir, ref):
    """Shards of 7 rows, windows of 3: other batch compositions, same rows in input order. Each text's vectors
    match encode_padded's to float32 rounding (a text's batch shape can differ, and XLA's CPU matmul may then
    sum in another order); sparse ids exactly."""
    src = write_txt(tmp_path / "c.txt", TEXTS)
    m = embed(src, model_dir, tmp_path / "out", shard_size=7, window=3, **{**SET, "colbert_dtype": "float16"})
    n = len(TEXTS)
    assert [s["rows"] for s in m["shards"]] == [7] * (n // 7) + ([n % 7] if n % 7 else [])
    assert [s["first_row"] for s in m["shards"]] == list(range(0, n, 7))
    r = EmbeddingReader(tmp_path / "out")
    assert r.ids().tolist() == [str(i) for i in range(n)]
    np.testing.assert_allclose(r.dense(), ref.dense, atol=1e-6, rtol=0)
    ids, w = r.sparse_padded()
    np.testing.assert_array_equal(ids, ref.sparse_ids[:, :ids.shape[1]])
    np.testing.assert_allclose(w, ref.sparse_weights[:, :ids.shape[1]], atol=1e-6, rtol=0)
    flat, offsets = r.colbert()
    assert flat.dtype == np.float16  # the default ColBERT storage
    want = np.concatenate([ref.colbert[i, :ref.lengths[i] - 1] for i in range(n)])
    np.testing.assert_allclose(flat.astype(np.float32), want, atol=2e-3, rtol=0)


def test_windowed_padding_on_the_mixed_workload():
    """1,000 texts of 5 to 8,192 tokens: windows of 256 texts pad within 0.1% of a global sort (count_shapes)."""
    rng = np.random.default_rng(0)
    lengths = rng.integers(5, 8193, size=1000)
    glob = pipeline.count_shapes(lengths, batch_size=256)["padding_ratio"]
    ratios = {w: padding_ratio(lengths, window=w, batch_size=256, max_tokens=pipeline.DEFAULT_MAX_TOKENS)
              for w in (64, 256, 1000)}
    print(f"\npadding ratio, global sort {glob:.4f}; windows: " + ", ".join(f"{w}: {r:.4f}" for w, r in
                                                                          ratios.items()))
    assert ratios[1000] == pytest.approx(glob, abs=1e-12)  # one window is the global sort
    assert ratios[256] < glob + 1e-3 and ratios[64] < glob + 1e-3


# ---------------------------------------------------------------------------------------------- input formats
def test_formats_fsspec_and_globs(tmp_path, model_dir, ref):
    """jsonl (+ gzip), parquet (several row groups) with id columns, a glob over several files, memory:// in and
    out, and a Python iterable: the same texts give the same arrays and the given ids."""
    import fsspec

    n = len(TEXTS)
    ids = [f"doc-{i}" for i in range(n)]
    half = n // 2
    (tmp_path / "in").mkdir()
    with open(tmp_path / "in" / "a.jsonl", "w") as f:
        for i in range(half):
            f.write(json.dumps({"body": TEXTS[i], "key": ids[i], "extra": 1}, ensure_ascii=False) + "\n")
    with gzip.open(tmp_path / "in" / "b.jsonl.gz", "wt", encoding="utf-8") as f:
        for i in range(half, n):
            f.write(json.dumps({"body": TEXTS[i], "key": ids[i]}) + "\n")
    kw = dict(shard_size=8, window=5, **SET)
    base = embed(str(tmp_path / "in" / "*.jsonl*"), model_dir, tmp_path / "o_jsonl", text_field="body",
                 id_field="key", **kw)
    r = EmbeddingReader(tmp_path / "o_jsonl")
    assert r.ids().tolist() == ids and base["rows"] == n
    dense = r.dense()
    np.testing.assert_allclose(dense, ref.dense, atol=1e-6, rtol=0)

    table = pa.table({"key": list(range(100, 100 + n)), "body": TEXTS})
    with fsspec.open("memory://in/c.parquet", "wb") as f:
        pq.write_table(table, f, row_group_size=4)
    embed("memory://in/c.parquet", model_dir, "memory://out/p", text_field="body", id_field="key", **kw)
    rp = EmbeddingReader("memory://out/p")
    assert rp.ids().tolist() == [str(i) for i in range(100, 100 + n)]  # integer ids are stored as strings
    np.testing.assert_array_equal(rp.dense(), dense)  # same windows and shards: the same bits
    fs = fsspec.filesystem("memory")
    assert sorted(p.rsplit("/", 1)[1] for p in fs.ls("/out/p", detail=False))[-1] == "shard-00004.parquet"

    embed(iter([(ids[i] if i % 2 else None, t) for i, t in enumerate(TEXTS)]), model_dir, tmp_path / "o_it", **kw)
    ri = EmbeddingReader(tmp_path / "o_it")
    assert ri.ids().tolist() == [ids[i] if i % 2 else str(i) for i in range(n)]  # None: the input position
    np.testing.assert_array_equal(ri.dense(), dense)
    ri_sparse = ri.sparse_csr()
    assert (ri_sparse != r.sparse_csr()).nnz == 0


# ---------------------------------------------------------------------------------------- reader and index
def test_reader_round_trip_into_corpus_index(tmp_path, model_dir, ref):
    src = write_txt(tmp_path / "c.txt", TEXTS)
    embed(src, model_dir, tmp_path / "out", shard_size=1000, window=1000, **SET)
    r = EmbeddingReader(tmp_path / "out")
    mm = r.dense(mmap=tmp_path / "dense.npy")
    assert isinstance(mm, np.memmap) and mm.shape == ref.dense.shape
    np.testing.assert_array_equal(np.load(tmp_path / "dense.npy", mmap_mode="r"), ref.dense)
    assert (r.sparse_csr() != ref.sparse_csr()).nnz == 0
    flat, offsets = ref.colbert_flat()
    got = r.colbert()
    np.testing.assert_array_equal(got[0], flat)
    np.testing.assert_array_equal(got[1], offsets)
    assert sum(t.num_rows for t in r.iter_shards()) == len(TEXTS)

    from m3jax.index import CorpusIndex

    ours = r.to_index()
    theirs = CorpusIndex(ref.dense, ref.sparse_ids, ref.sparse_weights, ref.colbert, ref.colbert_mask,
                         doc_ids=np.array([str(i) for i in range(len(TEXTS))]))
    assert set(ours.corpus) == set(theirs.corpus)
    for name in ours.corpus:  # the very arrays encode_padded gives, padded and sharded alike
        np.testing.assert_array_equal(np.asarray(ours.corpus[name]), np.asarray(theirs.corpus[name]), err_msg=name)
    np.testing.assert_array_equal(ours.doc_ids, theirs.doc_ids)
    queries = {"dense": ref.dense[:5], "sparse_ids": ref.sparse_ids[:5], "sparse_weights": ref.sparse_weights[:5],
               "colbert": ref.colbert[:5], "colbert_mask": ref.colbert_mask[:5]}
    scores, ids = ours.search(queries, k=3, mode="hybrid")
    assert ids[:, 0].tolist() == ["0", "1", "2", "3", "4"]  # each text finds itself first, by its row id
    with pytest.raises(ValueError, match="no colbert output"):
        embed(src, model_dir, tmp_path / "dense_only", outputs=["dense"], shard_size=1000, window=1000, **SET)
        EmbeddingReader(tmp_path / "dense_only").colbert()


# -------------------------------------------------------------------------------------------- kill, resume
KILL_SCRIPT = """
import sys, time
from m3jax.embed import embed
def slow(ev):
    if not ev["shard_done"]:
        time.sleep(0.4)   # leave the parent time to see a shard half written
embed(sys.argv[1], sys.argv[2], sys.argv[3], shard_size=8, window=4, callback=slow, **{SET})
"""


def test_sigkill_mid_run_then_resume_equals_uninterrupted(tmp_path, model_dir):
    texts = mixed(40, seed=21, max_words=40)
    src = write_txt(tmp_path / "c.txt", texts)
    out = tmp_path / "killed"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, "-c", KILL_SCRIPT.replace("{SET}", repr(SET)), src, str(model_dir),
                             str(out)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 240
    try:
        while time.time() < deadline:
            names = {p.name for p in out.glob("*")} if out.exists() else set()
            if {"shard-00000.parquet", "shard-00001.parquet", "_tmp.shard-00002.parquet"} <= names:
                break
            assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
            time.sleep(0.05)
        else:
            pytest.fail("the job never got to its third shard")
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    names = sorted(p.name for p in out.glob("*"))
    assert "_manifest.json" not in names and "_tmp.shard-00002.parquet" in names  # killed mid-shard
    assert "shard-00004.parquet" not in names

    m = embed(src, model_dir, out, shard_size=8, window=4, **SET)  # resume
    assert m["run"]["skipped_shards"][:2] == [0, 1] and m["rows"] == 40
    assert not list(out.glob("_tmp.*"))
    embed(src, model_dir, tmp_path / "straight", shard_size=8, window=4, **SET)
    for k in range(5):
        name = f"shard-{k:05d}.parquet"
        a, b = pq.read_table(out / name), pq.read_table(tmp_path / "straight" / name)
        assert a.equals(b), name
        assert (out / name).read_bytes() == (tmp_path / "straight" / name).read_bytes(), name


KILL_LOOP_SCRIPT = """
import json, sys, time
from m3jax.embed import embed
from m3jax.engine import Encoder, configure_compilation_cache
configure_compilation_cache(sys.argv[3])  # shared by every run: only the first one compiles
import pandas, pyarrow.parquet  # imported on the first window's write otherwise
enc = Encoder.from_pretrained(sys.argv[2], length_buckets={BUCKETS})
enc.fingerprint()
print("ready", flush=True)
out = sys.stdin.readline().strip()  # the parent's go, naming the output: a kill delay counts from here
t0 = time.perf_counter()
def slow(ev):
    print(json.dumps({**ev, "t": time.perf_counter() - t0}), flush=True)
    if not ev["shard_done"]:
        time.sleep(0.1)
embed(sys.argv[1], enc, out, shard_size=4, window=2, callback=slow, **{SET})
print(json.dumps({"end": time.perf_counter() - t0}), flush=True)
"""


def test_sigkill_twenty_times_resumes_byte_identical(tmp_path, model_dir):
    """20 SIGKILLs at random points of runs into one output directory, each run resuming the last, then a run to
    completion: every shard equals an uninterrupted run's byte for byte, and so does the manifest.

    Each run is a process that imports JAX and loads the model, then waits for a go. It is killed at a random point
    (a seeded RNG) of [go, its first window written + 3 shards' time]: a fraction u ~ U(0, 1) of that span, whose
    start (lock takeover, resume scan, removal of the last run's leftovers, loading the executable from the shared
    compilation cache) is taken as long as the last run's until this run's first window shows when it really ended.
    So a killed run gets about half a shard further on average, and the kills land all along the job, whatever the
    machine's speed: in a run's start, mid-shard, between shards. (Delays spread over a whole run would finish the
    job within a few kills, and every later kill would land after completion.) Processes are started two ahead, so
    that their imports overlap the run being killed; only the first run compiles (the texts are short: every batch
    has the one shape [2, 32])."""
    t_test = time.perf_counter()
    n_shards, shard_size = 16, 4
    texts = mixed(n_shards * shard_size, seed=22, max_words=6)
    src = write_txt(tmp_path / "c.txt", texts)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    script = KILL_LOOP_SCRIPT.replace("{SET}", repr(SET)).replace("{BUCKETS}", repr(BUCKETS))
    procs: list[subprocess.Popen] = []
    queued: list[subprocess.Popen] = []

    def stderr(p):
        return (tmp_path / f"stderr{procs.index(p)}.txt").read_text()[-3000:]

    def go(out):
        """The next process, once ready, started on `out`; keeps two more starting behind it (of the 22 runs)."""
        while len(queued) < 3 and len(procs) < 22:
            with open(tmp_path / f"stderr{len(procs)}.txt", "w") as log:
                procs.append(subprocess.Popen([sys.executable, "-c", script, src, str(model_dir),
                                               str(tmp_path / "jax_cache")], env=env, stdin=subprocess.PIPE,
                                              stdout=subprocess.PIPE, stderr=log, text=True))
            queued.append(procs[-1])
        p = queued.pop(0)
        assert p.stdout.readline() == "ready\n", stderr(p)
        p.stdin.write(f"{out}\n")
        p.stdin.flush()
        return p, time.perf_counter()

    def complete(out):
        """An uninterrupted run: the times (from the go) its windows were written."""
        p, _ = go(out)
        lines = p.stdout.read().splitlines()
        assert p.wait() == 0, stderr(p)
        return [e["t"] for e in map(json.loads, lines) if "shard" in e and not e["shard_done"]]

    def state(out):
        """(finished shards, a _tmp. shard present, manifest present)"""
        names = {p.name for p in out.iterdir()} if out.exists() else set()
        return (sum(f"shard-{k:05d}.parquet" in names for k in range(n_shards)),
                any(n.startswith("_tmp.shard-") for n in names), "_manifest.json" in names)

    try:
        windows = complete(tmp_path / "straight")  # compiles, into the shared cache
        startup = windows[0]  # go -> first window written; the killed runs (warm cache) correct it as they go
        per_shard = float(np.median(np.diff(windows[1::2])))  # 2 windows a shard
        rng = np.random.default_rng(28)
        out = tmp_path / "killed"
        kills = []  # [seconds after the go, finished shards, a _tmp. shard, manifest, windows written, done before]
        for _ in range(20):
            done_before = state(out)[2]
            at = rng.uniform() * (startup + 3 * per_shard)
            p, t0 = go(out)
            first = ""
            if at > startup:  # past the start: counted from this run's first window (or its end, if none)
                first = p.stdout.readline()
                at += (time.perf_counter() - t0 if '"shard"' in first else startup) - startup
            time.sleep(max(0.0, t0 + at - time.perf_counter()))
            exited = p.poll() is not None
            p.send_signal(signal.SIGKILL)
            p.wait(30)
            assert p.returncode == (0 if exited else -signal.SIGKILL), stderr(p)
            lines = ([first] if first else []) + p.stdout.read().splitlines()
            seen = [e["t"] for e in map(json.loads, lines) if "shard" in e and not e["shard_done"]]
            kills.append([round(time.perf_counter() - t0, 2), *state(out), len(seen), done_before or exited])
            if seen:
                startup = seen[0]
        final_before = state(out)
        final_windows = complete(out)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
            p.stdin.close()
            p.stdout.close()
    wall = time.perf_counter() - t_test
    finished = [k[1] for k in kills]
    mid_shard = sum(k[2] and k[4] > 0 for k in kills)  # a _tmp. shard of the run's own
    in_start, leftover = sum(k[4] == 0 for k in kills), sum(k[2] and k[4] == 0 for k in kills)
    after = sum(k[5] for k in kills)
    print(f"\n20 kills, {wall:.1f}s in all ({per_shard:.2f}s a shard, a run's start {startup:.2f}s at the last "
          f"look): finished shards at each kill {finished}; {mid_shard} kills mid-shard (a _tmp. shard there), "
          f"{in_start} in a run's start (no window written yet; {leftover} of them before the last run's _tmp. shard "
          f"was removed), {after} after the job was complete; "
          f"the final run started with {final_before[0]} of {n_shards} shards and wrote {len(final_windows)} windows; "
          f"killed after {[k[0] for k in kills]} s")
    for k in kills:  # a manifest only once every shard is finished
        assert not k[3] or k[1] == n_shards, kills
    assert len(set(finished)) >= 4, kills  # the kills landed all along the job ...
    assert mid_shard >= 3 and in_start >= 3, kills  # ... several mid-shard, several in a run's start ...
    assert after <= 5, kills  # ... few after the job was complete

    names = sorted(p.name for p in out.iterdir())
    assert names == ["_job.json", "_manifest.json"] + [f"shard-{k:05d}.parquet" for k in range(n_shards)], names
    straight = tmp_path / "straight"
    for k in range(n_shards):
        name = f"shard-{k:05d}.parquet"
        assert (out / name).read_bytes() == (straight / name).read_bytes(), name
    m, ref_m = (json.loads((d / "_manifest.json").read_text()) for d in (out, straight))
    assert m == ref_m and m["rows"] == len(texts) and m["duplicate_ids"] == 0
    assert [s["first_row"] for s in m["shards"]] == list(range(0, len(texts), shard_size))


def test_resume_redoes_only_missing_shards(tmp_path, model_dir):
    """Parquet (row groups of 3 across shards of 8) and JSONL: delete finished shards, rerun; only those are redone
    (the others' rows are re-read only to check their sha256), and the files come back byte for byte."""
    n = len(TEXTS)
    pq.write_table(pa.table({"text": TEXTS}), tmp_path / "c.parquet", row_group_size=3)
    (tmp_path / "c.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    for src in ("c.parquet", "c.jsonl"):
        out = tmp_path / f"out_{src}"
        embed(str(tmp_path / src), model_dir, out, shard_size=8, window=4, **SET)
        files = {p.name: p.read_bytes() for p in out.glob("shard-*")}
        assert len(files) == -(-n // 8)
        for k in (1, 3):
            (out / f"shard-{k:05d}.parquet").unlink()
        (out / "_manifest.json").unlink()
        m = embed(str(tmp_path / src), model_dir, out, shard_size=8, window=4, **SET)
        assert m["run"]["skipped_shards"] == [k for k in range(len(files)) if k not in (1, 3)]
        assert m["run"]["texts"] == 16
        assert {p.name: p.read_bytes() for p in out.glob("shard-*")} == files


def test_empty_input(tmp_path, model_dir):
    m = embed(write_txt(tmp_path / "empty.txt", []), model_dir, tmp_path / "out", **SET)
    assert m["rows"] == 0 and m["shards"] == []
    r = EmbeddingReader(tmp_path / "out")
    assert len(r) == 0 and r.dense().shape == (0, r.dims["dense"]) and r.sparse_csr().shape[0] == 0


def test_rerun_with_other_settings_or_model_stops(tmp_path, model_dir):
    from m3jax.checkpoint import load_params, save_m3jax

    src = write_txt(tmp_path / "c.txt", TEXTS[:6])
    out = tmp_path / "out"
    embed(src, model_dir, out, shard_size=4, window=4, **SET)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(EmbedError, match=r"different job.*settings\.max_length: 64 .* != 32"):
        embed(src, model_dir, out, shard_size=4, window=4, **{**SET, "max_length": 32})
    cfg, params, tok = load_params(model_dir)
    params["sparse_linear"]["bias"] = params["sparse_linear"]["bias"] + 1e-3  # one weight differs
    other = save_m3jax(tmp_path / "other", cfg, params, tok)
    with pytest.raises(EmbedError, match=r"model\.fingerprint"):
        embed(src, other, out, shard_size=4, window=4, **SET)
    write_txt(tmp_path / "c.txt", TEXTS[:7])  # the input changed
    with pytest.raises(EmbedError, match=r"input\.files\[0\]\.size: \d+ .* != \d+"):
        embed(src, model_dir, out, shard_size=4, window=4, **SET)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # nothing touched


def test_resume_refuses_an_edited_input_naming_the_shard(tmp_path, model_dir):
    """Each shard records the sha256 of its input rows; a resume re-reads its finished shards' rows. One text changed
    (the file keeps its size, so its job key is the same) or an iterable of other texts is refused, naming the shard,
    before anything is written; the unchanged input resumes. Another source_id is another job."""
    texts = [f"text number {i:02d}" for i in range(12)]
    src = write_txt(tmp_path / "c.txt", texts)
    out = tmp_path / "out"
    embed(src, model_dir, out, shard_size=4, window=4, **SET)
    (out / "shard-00002.parquet").unlink()
    (out / "_manifest.json").unlink()
    before = sorted(p.name for p in out.iterdir())
    write_txt(tmp_path / "c.txt", texts[:5] + ["text number XX"] + texts[6:])  # same size, row 5 differs
    with pytest.raises(EmbedError, match=r"shard 1: input rows 4 \.\.\. 7 are not the ones it was written from"):
        embed(src, model_dir, out, shard_size=4, window=4, **SET)
    assert sorted(p.name for p in out.iterdir()) == before  # nothing written, no lock left
    write_txt(tmp_path / "c.txt", texts)
    m = embed(src, model_dir, out, shard_size=4, window=4, **SET)
    assert m["run"]["skipped_shards"] == [0, 1] and m["rows"] == 12

    it = tmp_path / "it"
    embed(iter(texts), model_dir, it, shard_size=4, window=4, **SET)
    (it / "shard-00001.parquet").unlink()
    with pytest.raises(EmbedError, match=r"shard 0: input rows 0 \.\.\. 3 are not the ones"):
        embed(iter(["another corpus"] + texts[1:]), model_dir, it, shard_size=4, window=4, **SET)
    with pytest.raises(EmbedError, match=r"input\.source_id"):
        embed(iter(texts), model_dir, it, source_id="corpus-v2", shard_size=4, window=4, **SET)
    assert embed(iter(texts), model_dir, it, shard_size=4, window=4, **SET)["run"]["skipped_shards"] == [0, 2]


def test_texts_are_texts_and_paths_are_paths(tmp_path, model_dir):
    """A list of strings is texts; one that names only existing files is refused as ambiguous unless `files` says
    which; a str or os.PathLike is a path."""
    a, b = write_txt(tmp_path / "a.txt", ["alpha", "beta"]), write_txt(tmp_path / "b.txt", ["gamma"])
    assert embed(["alpha", "beta", "gamma"], model_dir, tmp_path / "o1", **SET)["rows"] == 3
    with pytest.raises(EmbedError, match=r"a list of 2 strings that all name files.*files=True.*files=False"):
        embed([str(a), str(b)], model_dir, tmp_path / "o2", **SET)
    assert embed([str(a), str(b)], model_dir, tmp_path / "o3", files=True, **SET)["rows"] == 3
    assert embed([str(a), str(b)], model_dir, tmp_path / "o4", files=False, **SET)["rows"] == 2
    assert embed([Path(a), Path(b)], model_dir, tmp_path / "o5", **SET)["rows"] == 3
    with pytest.raises(EmbedError, match="files=False takes an iterable of texts"):
        embed(str(a), model_dir, tmp_path / "o6", files=False, **SET)
    with pytest.raises(EmbedError, match="files=True takes a path"):
        embed(iter(["x"]), model_dir, tmp_path / "o7", files=True, **SET)


def test_a_second_run_into_the_same_output_is_refused(tmp_path, model_dir):
    """_lock marks a directory a run is writing: another live holder (here: another host) is refused with its name;
    a holder of this host that is gone (a killed run) is taken over; the lock is removed when the run ends."""
    import socket

    src = write_txt(tmp_path / "c.txt", ["one", "two", "three"])
    out = tmp_path / "out"
    out.mkdir()
    (out / "_lock").write_text(json.dumps({"host": "other-host", "pid": 1, "run": "x", "since": "then"}))
    with pytest.raises(EmbedError, match=r"another run is writing it \(host other-host pid 1 since then.*delete"):
        embed(src, model_dir, out, **SET)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (out / "_lock").write_text(json.dumps({"host": socket.gethostname(), "pid": int(dead.stdout), "run": "y",
                                           "since": "then"}))
    assert embed(src, model_dir, out, **SET)["rows"] == 3
    assert not (out / "_lock").exists()


def test_an_unreadable_lock_is_refused_naming_it(tmp_path, model_dir):
    """A run killed between creating _lock and writing its holder into it leaves it empty: a later run stops with
    the lock's path and what to do (it cannot tell that holder from one still starting), not a JSON error."""
    src = write_txt(tmp_path / "c.txt", ["one", "two"])
    out = tmp_path / "out"
    out.mkdir()
    (out / "_lock").write_text("")
    with pytest.raises(EmbedError, match=r"another run is writing it \(an unreadable lock: .*_lock\).*delete"):
        embed(src, model_dir, out, **SET)
    (out / "_lock").unlink()
    assert embed(src, model_dir, out, **SET)["rows"] == 2


def test_odd_inputs_embed_or_fail_naming_the_row(tmp_path, model_dir):
    """Inputs that are legal but odd embed and are counted; broken ones fail naming the file and line or the item,
    with nothing written as finished: NUL bytes and whitespace-only lines are texts; a 1,000,000-character text is
    truncated and counted; a truncated gzip, a non-string text and an unpaired surrogate (possible only in a Python
    iterable) are errors."""
    import gzip

    def run(name, src, **k):
        return embed(src, model_dir, tmp_path / name, shard_size=4, **SET, **k)

    assert run("nul", write_txt(tmp_path / "nul.txt", ["a\x00b", "plain"]))["rows"] == 2
    m = run("ws", write_txt(tmp_path / "ws.txt", ["   ", "\t", "", "x"]))
    assert m["rows"] == 4 and m["shards"][0]["empty_texts"] == 1
    m = run("big", write_txt(tmp_path / "big.txt", ["word " * 200_000]))
    assert m["rows"] == 1 and m["shards"][0]["truncated"] == 1
    data = gzip.compress(b"".join(json.dumps({"text": f"t{i}"}).encode() + b"\n" for i in range(50)))
    (tmp_path / "cut.jsonl.gz").write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match=r"cut\.jsonl\.gz: read error after line \d+ \(Compressed file ended") as gz:
        run("gz", str(tmp_path / "cut.jsonl.gz"))
    (tmp_path / "t.jsonl").write_text(json.dumps({"text": ["a"]}) + "\n")
    with pytest.raises(InputError, match=r"t\.jsonl, line 1: field 'text' is list"):
        run("list", str(tmp_path / "t.jsonl"))
    with pytest.raises(InputError, match=r"input item 1: text is not valid Unicode \(unpaired surrogate"):
        run("surrogate", iter(["fine", "bad \ud800 text"]))
    # No manifest and no shard being written: only the shards wholly before the bad row stay, finished (a rerun
    # after the input is fixed resumes from them).
    for name in ("gz", "list", "surrogate"):
        assert not (tmp_path / name / "_manifest.json").exists() and not list((tmp_path / name).glob("_tmp*"))
    err_line = int(re.search(r"after line (\d+)", str(gz.value)).group(1))
    assert sorted(p.name for p in (tmp_path / "gz").glob("shard-*")) == [f"shard-{k:05d}.parquet"
                                                                          for k in range(err_line // 4)]


def _fault_in_write(mp, shard):
    """The disk fills while the shard's rows are written."""
    import errno

    from m3jax.embed import writer

    real = writer.ShardWriter.write

    def disk_full(self, *a, **k):
        if self.k == shard:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, *a, **k)

    mp.setattr(writer.ShardWriter, "write", disk_full)
    return OSError, "No space left on device"


def _fault_in_file(mp, shard):
    """The disk fills under pyarrow: every write to the shard's file after its first bytes fails, so the footer cannot
    be written either when the shard is dropped."""
    import errno

    from fsspec.implementations.local import LocalFileOpener

    real = LocalFileOpener.write

    def disk_full(self, data):
        if self.path.endswith(f"/_tmp.shard-{shard:05d}.parquet") and self.tell() >= 4:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, data)

    mp.setattr(LocalFileOpener, "write", disk_full)
    return OSError, "No space left on device"


def _fault_at_open(mp, shard):
    """The shard's temporary file cannot be created (tests run as root, where chmod denies nothing: injected)."""
    import errno

    from fsspec.implementations.local import LocalFileSystem

    real = LocalFileSystem._open

    def denied(self, path, mode="rb", *a, **k):
        if "w" in mode and path.endswith(f"/_tmp.shard-{shard:05d}.parquet"):
            raise PermissionError(errno.EACCES, "Permission denied", path)
        return real(self, path, mode, *a, **k)

    mp.setattr(LocalFileSystem, "_open", denied)
    return PermissionError, "Permission denied"


def _fault_at_commit(mp, shard):
    """The shard is complete but its rename to the final name is denied."""
    import errno

    from fsspec.implementations.local import LocalFileSystem

    real = LocalFileSystem.mv

    def denied(self, path1, path2, *a, **k):
        if str(path2).endswith(f"/shard-{shard:05d}.parquet"):
            raise PermissionError(errno.EACCES, "Permission denied", str(path2))
        return real(self, path1, path2, *a, **k)

    mp.setattr(LocalFileSystem, "mv", denied)
    return PermissionError, "Permission denied"


@pytest.mark.parametrize("fault", [_fault_in_write, _fault_in_file, _fault_at_open, _fault_at_commit],
                         ids=["ENOSPC-in-write", "ENOSPC-in-file", "EACCES-at-open", "EACCES-at-commit"])
def test_a_disk_fault_mid_shard_keeps_the_finished_shards_and_resumes(tmp_path, model_dir, monkeypatch, fault):
    """A fault while shard 2 is written (the disk fills, before a window's rows reach pyarrow or under it; its
    temporary file cannot be created; its rename to the final name is denied): the job fails with that very OSError
    (not a second one from dropping the shard), shards 0 and 1 stay finished, nothing half-written or claiming
    completeness is left (no _tmp file, no manifest, no lock), and once the fault is gone the rerun writes the rest:
    the output equals an uninterrupted run's, byte for byte."""
    src = write_txt(tmp_path / "c.txt", TEXTS)
    embed(src, model_dir, tmp_path / "ref", shard_size=8, window=4, **SET)
    out = tmp_path / "out"
    with monkeypatch.context() as mp:
        error, message = fault(mp, 2)
        with pytest.raises(error, match=message) as e:
            embed(src, model_dir, out, shard_size=8, window=4, **SET)
    assert e.value.__context__ is None, repr(e.value.__context__)  # raised while handling nothing else
    assert sorted(p.name for p in out.iterdir()) == ["_job.json", "shard-00000.parquet", "shard-00001.parquet"]
    m = embed(src, model_dir, out, shard_size=8, window=4, **SET)
    assert m["run"]["skipped_shards"] == [0, 1]
    assert {p.name: p.read_bytes() for p in out.glob("shard-*")} == {
        p.name: p.read_bytes() for p in (tmp_path / "ref").glob("shard-*")}


def test_outputs_are_cast_on_the_device(model_dir):
    """The job's float16 outputs are cast inside the compiled step, so the host receives half the bytes per token
    for them, and the values are the host-side cast of the float32 ones, bit for bit."""
    from m3jax.engine import Encoder

    enc = Encoder.from_pretrained(model_dir, length_buckets=BUCKETS)
    ids, _, _ = enc.tokenize(TEXTS[:9], 64)
    batches = list(enc.batches(ids, batch_size=4))
    wide = list(enc.run(batches))
    narrow = list(enc.run(batches, out_formats=(("dense", "float16"), ("colbert", "float16"))))
    tokens = sum(b.input_ids.size for b in batches)
    per_token = {name: sum(o.dense.nbytes + o.colbert.nbytes for _, o in runs) / tokens
                 for name, runs in (("float32", wide), ("float16", narrow))}
    assert per_token["float16"] == per_token["float32"] / 2, per_token
    for (_, a), (_, b) in zip(wide, narrow, strict=True):
        assert b.dense.dtype == b.colbert.dtype == np.float16 and b.sparse_weights.dtype == np.float32
        np.testing.assert_array_equal(b.colbert, a.colbert.astype(np.float16))
        np.testing.assert_array_equal(b.dense, a.dense.astype(np.float16))
        np.testing.assert_array_equal(b.sparse_ids, a.sparse_ids)


def test_fingerprint_is_computed_once_per_state(model_dir):
    import jax

    from m3jax.engine import Encoder

    enc = Encoder.from_pretrained(model_dir)
    first = enc.fingerprint()
    assert enc.fingerprint() is first  # cached: the same string object, not a recomputation
    enc.state = jax.tree_util.tree_map(lambda x: x + 1e-3 if x.ndim == 1 and x.shape[0] == 1 else x, enc.state)
    assert enc.fingerprint() != first  # a new state (the sparse head's bias moved) is hashed anew


# ----------------------------------------------------------------------------------------------- bad input
def test_bad_inputs_name_file_and_row(tmp_path, model_dir):
    kw = dict(shard_size=4, window=4, **SET)
    with pytest.raises(InputError, match="missing.txt: no such file"):
        embed(str(tmp_path / "missing.txt"), model_dir, tmp_path / "o1", **kw)
    with pytest.raises(InputError, match=r"nomatch\*\.jsonl: the pattern matches no file"):
        embed(str(tmp_path / "nomatch*.jsonl"), model_dir, tmp_path / "o1", **kw)
    (tmp_path / "x.csv").write_text("a\n")
    with pytest.raises(InputError, match="x.csv: unknown input format"):
        embed(str(tmp_path / "x.csv"), model_dir, tmp_path / "o1", **kw)
    (tmp_path / "bad.txt").write_bytes(b"ok\n\xff\xfe broken\n")
    with pytest.raises(InputError, match=r"bad.txt, line 2: not UTF-8"):
        embed(str(tmp_path / "bad.txt"), model_dir, tmp_path / "o2", **kw)

    # A bad row in the third shard: shards 0 and 1 are complete and kept, shard 2 leaves nothing behind.
    rows = [{"text": t} for t in TEXTS[:10]] + [{"txt": "wrong key"}]
    p = tmp_path / "c.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(InputError, match=r"c.jsonl, line 11: no field 'text'"):
        embed(str(p), model_dir, tmp_path / "o3", **kw)
    assert sorted(x.name for x in (tmp_path / "o3").iterdir()) == ["_job.json", "shard-00000.parquet",
                                                                   "shard-00001.parquet"]
    for bad, msg in (({"text": 5}, r"line 2: field 'text' is int"), ({"text": None}, r"line 2: field 'text' is "
                                                                                      r"NoneType"),
                     ([1, 2], r"line 2: a JSON list, expected an object")):
        p.write_text(json.dumps({"text": "a"}) + "\n" + json.dumps(bad) + "\n")
        with pytest.raises(InputError, match=msg):
            embed(str(p), model_dir, tmp_path / "o4", **kw)
    p.write_text(json.dumps({"text": "a"}) + "\n\n")
    with pytest.raises(InputError, match=r"c.jsonl, line 2: an empty line"):
        embed(str(p), model_dir, tmp_path / "o4", **kw)
    p.write_text(json.dumps({"text": "a", "id": 1.5}) + "\n")
    with pytest.raises(InputError, match=r"line 1: id is float"):
        embed(str(p), model_dir, tmp_path / "o4", id_field="id", **kw)

    pq.write_table(pa.table({"text": ["a", None]}), tmp_path / "n.parquet")
    with pytest.raises(InputError, match=r"n.parquet, row 1: column 'text' is null"):
        embed(str(tmp_path / "n.parquet"), model_dir, tmp_path / "o5", **kw)
    pq.write_table(pa.table({"text": [1, 2]}), tmp_path / "i.parquet")
    with pytest.raises(InputError, match=r"i.parquet: column 'text' is int64, expected strings"):
        embed(str(tmp_path / "i.parquet"), model_dir, tmp_path / "o5", **kw)
    with pytest.raises(InputError, match=r"i.parquet: no column 'body'"):
        embed(str(tmp_path / "i.parquet"), model_dir, tmp_path / "o5", text_field="body", **kw)
    (tmp_path / "junk.parquet").write_bytes(b"not parquet")
    with pytest.raises(InputError, match=r"junk.parquet: cannot read as Parquet"):
        embed(str(tmp_path / "junk.parquet"), model_dir, tmp_path / "o5", **kw)
    with pytest.raises(InputError, match=r"input item 1: text is int"):
        embed([("a", "x"), ("b", 3)], model_dir, tmp_path / "o6", **kw)
    for o in ("o5", "o6"):
        assert not [x for x in (tmp_path / o).iterdir() if x.name != "_job.json"]

    (tmp_path / "file_out").write_text("x")
    with pytest.raises(EmbedError, match="file_out: is a file"):
        embed(write_txt(tmp_path / "ok.txt", ["a"]), model_dir, tmp_path / "file_out", **kw)


def test_repeated_ids_are_kept_and_counted(tmp_path, model_dir, caplog):
    """Output rows are positional (row i is input row i), so a repeated id is kept; the manifest counts the rows whose
    id came earlier (duplicate_ids: x three times and y twice make 3, across shards) and a warning names the count,
    the first repeated id and its rows. A resume counts them over every shard again; unique ids count 0."""
    import logging

    ids = ["a", "x", "b", "x", "c", "y", "d", "x", "y", "e"]
    p = tmp_path / "c.jsonl"
    p.write_text("".join(json.dumps({"id": i, "text": f"text number {n}"}) + "\n" for n, i in enumerate(ids)))
    kw = dict(id_field="id", shard_size=4, window=4, **SET)
    with caplog.at_level(logging.WARNING, logger="m3jax"):
        m = embed(str(p), model_dir, tmp_path / "dup", **kw)
    assert m["duplicate_ids"] == 3 and m["rows"] == 10
    r = EmbeddingReader(tmp_path / "dup")
    assert r.ids().tolist() == ids and r.manifest["duplicate_ids"] == 3  # every row kept, in input order
    warned = [x.getMessage() for x in caplog.records if "repeat the id" in x.getMessage()]
    assert len(warned) == 1 and "3 row(s)" in warned[0] and "'x', at rows 1, 3, 7" in warned[0], warned
    (tmp_path / "dup" / "shard-00001.parquet").unlink()
    (tmp_path / "dup" / "_manifest.json").unlink()
    assert embed(str(p), model_dir, tmp_path / "dup", **kw)["duplicate_ids"] == 3

    caplog.clear()
    p.write_text("".join(json.dumps({"id": f"doc-{n}", "text": f"text number {n}"}) + "\n" for n in range(10)))
    with caplog.at_level(logging.WARNING, logger="m3jax"):
        assert embed(str(p), model_dir, tmp_path / "unique", **kw)["duplicate_ids"] == 0
        assert embed(write_txt(tmp_path / "c.txt", ["a", "a", "a"]), model_dir, tmp_path / "txt",
                     **SET)["duplicate_ids"] == 0  # a .txt row's id is its position: repeated texts are no repeats
    assert not [x for x in caplog.records if "repeat the id" in x.getMessage()]


# ------------------------------------------------------------------------------------------------------ CLI
def test_cli(tmp_path, model_dir, capsys):
    from m3jax.cli import main

    src = write_txt(tmp_path / "c.txt", TEXTS[:9])
    args = ["embed", src, "--model", str(model_dir), "--max-length", "64", "--batch-size", "4", "--shard-size", "4",
            "--outputs", "dense,sparse", "--dense-dtype", "float16", "--length-buckets", "32,64,8192"]
    assert main(args + ["--output", str(tmp_path / "out")]) == 0
    err = capsys.readouterr().err
    assert "m3jax embed: 9 texts" in err and "padding overhead" in err and "tokens/s" in err
    r = EmbeddingReader(tmp_path / "out")
    assert r.outputs == ("dense", "sparse") and r.dense().dtype == np.float16 and len(r) == 9
    assert main(args + ["--output", str(tmp_path / "q"), "--quiet"]) == 0
    assert capsys.readouterr().err == ""
    assert main(args + ["--output", str(tmp_path / "q"), "--quiet", "--max-length", "32"]) == 2
    assert "different job" in capsys.readouterr().err
    assert main(["embed", str(tmp_path / "nope.txt"), "--model", str(model_dir), "--output", str(tmp_path / "z")]) == 2
    assert "nope.txt: no such file" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------- bounded memory
RSS_SCRIPT = """
import json, resource, sys
from m3jax.embed import embed
m = embed(sys.argv[1], sys.argv[2], sys.argv[3], max_length=64, batch_size=16, shard_size=1024, window=128,
          length_buckets=(64, 8192), colbert_dtype="float32", quiet=True)
# VmHWM, not ru_maxrss: a child's ru_maxrss starts from its parent's (pytest's) peak across fork + exec.
hwm = int([l for l in open("/proc/self/status") if l.startswith("VmHWM:")][0].split()[1])
print(json.dumps({"rows": m["rows"], "peak_kb": hwm}))
"""


def test_host_memory_does_not_grow_with_the_corpus(tmp_path, model_dir):
    """N and 10 N texts (windows of 128, every batch the same [16, 64] shape, so both runs compile alike): the peak
    RSS differs by < 10%, while the 10 N run's ColBERT output alone is > 10% of that peak (a tiny model with a wide,
    256-dim ColBERT head), so a job that held its outputs would fail."""
    from m3jax.checkpoint import save_m3jax
    from m3jax.config import M3Config
    from m3jax.model import init_model

    cfg = M3Config.tiny(colbert_dim=256)
    from flax import nnx

    wide = save_m3jax(tmp_path / "wide", cfg, nnx.to_pure_dict(nnx.state(init_model(cfg, seed=0), nnx.Param)),
                      model_dir)
    n = 384
    texts = mixed(10 * n, seed=4, max_words=100)  # most run past 64 tokens: 63 ColBERT vectors each
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    peaks = {}
    for size in (n, 10 * n):
        src = write_txt(tmp_path / f"c{size}.txt", texts[:size])
        env["M3JAX_HOME"] = str(tmp_path / f"home{size}")  # an empty compilation cache each: both compile alike
        r = subprocess.run([sys.executable, "-c", RSS_SCRIPT, src, str(wide), str(tmp_path / f"o{size}")],
                           capture_output=True, text=True, env=env, timeout=600)
        assert r.returncode == 0, r.stderr[-3000:]
        res = json.loads(r.stdout.splitlines()[-1])
        assert res["rows"] == size
        peaks[size] = res["peak_kb"] * 1024
    reader = EmbeddingReader(tmp_path / f"o{10 * n}")
    colbert_bytes = int(reader.lengths().astype(np.int64).sum() - len(reader)) * reader.dims["colbert"] * 4
    print(f"\npeak RSS: {n} texts {peaks[n] / 2**20:.0f} MiB, {10 * n} texts {peaks[10 * n] / 2**20:.0f} MiB; "
          f"ColBERT output of the larger run {colbert_bytes / 2**20:.0f} MiB")
    assert colbert_bytes > 0.1 * peaks[n]
    assert abs(peaks[10 * n] - peaks[n]) < 0.1 * peaks[n]


def test_windows_default_by_platform(tmp_path, model_dir):
    """A window is 4,096 texts / 1M tokens on CPU and a whole shard / 2M tokens on accelerators (fewer partial
    batches, so fewer shapes to compile there); the defaults are recorded as values, so a CPU job keeps its key."""
    from m3jax.embed.job import default_windows

    assert default_windows("cpu", 10_000) == (4096, 1 << 20)
    assert default_windows("tpu", 10_000) == default_windows("gpu", 10_000) == (10_000, 1 << 21)
    src = write_txt(tmp_path / "c.txt", TEXTS[:6])
    m = embed(src, model_dir, tmp_path / "out", **SET)
    assert (m["settings"]["window"], m["settings"]["window_tokens"]) == (4096, 1 << 20)
    again = embed(src, model_dir, tmp_path / "out", window=4096, window_tokens=1 << 20, **SET)
    assert again["key"] == m["key"] and again["run"]["skipped_shards"] == [0]


def test_fuzzed_inputs_embed_or_fail_naming_file_and_line(tmp_path, model_dir):
    """Seeded fuzzing of a JSONL corpus and of a Parquet file: random bytes flipped, NUL and invalid UTF-8 inserted,
    lines cut or truncated, values retyped. Every run either embeds every line, with a manifest, or raises an
    InputError naming the file and the line (row), and leaves only whole shards and no manifest."""
    rng = np.random.default_rng(28)
    good = [json.dumps({"id": f"d{i}", "text": t}).encode() for i, t in enumerate(TEXTS[:12])]
    kw = dict(id_field="id", shard_size=4, window=4, **SET)
    outcomes = {"embedded": 0, "refused": 0}

    def check(src: Path, out: Path, lines: int | None) -> None:
        try:
            m = embed(str(src), model_dir, out, **kw)
        except InputError as e:
            print(f"  {src.name}: {str(e)[:150]}")
            assert src.name in str(e) and re.search(r"(line|row) \d+|truncated|cannot read", str(e)), str(e)
            names = sorted(p.name for p in out.iterdir()) if out.exists() else []
            assert "_manifest.json" not in names and not [n for n in names if n.startswith("_tmp")], names
            for n in names:
                if n.startswith("shard-"):
                    assert pq.read_metadata(out / n).num_rows == 4  # only whole shards
            outcomes["refused"] += 1
            return
        assert lines is None or m["rows"] == lines
        assert (out / "_manifest.json").exists() and len(EmbeddingReader(out)) == m["rows"]
        outcomes["embedded"] += 1

    for case in range(24):
        lines = list(good)
        kind = case % 6
        i = int(rng.integers(len(lines)))
        if kind == 0:  # a random byte flipped
            b = bytearray(lines[i])
            b[int(rng.integers(len(b)))] = int(rng.integers(256))
            lines[i] = bytes(b)
        elif kind == 1:  # NUL bytes inside the JSON text (escaped, legal) or raw (illegal in JSON)
            lines[i] = lines[i].replace(b'"text": "', b'"text": "\\u0000' if rng.random() < 0.5 else b'"text": "\x00')
        elif kind == 2:  # invalid UTF-8
            lines[i] = lines[i][:12] + b"\xc3\x28\xff" + lines[i][12:]
        elif kind == 3:  # a line cut short
            lines[i] = lines[i][:int(rng.integers(1, len(lines[i])))]
        elif kind == 4:  # a value retyped
            value = [None, 7, 1.5, ["a"], {"x": 1}, True][int(rng.integers(6))]
            lines[i] = json.dumps({"id": f"d{i}", "text": value} if rng.random() < 0.5 else
                                  {"id": value, "text": "t"}).encode()
        else:  # the file truncated mid-line (or at a line end)
            data = b"\n".join(lines) + b"\n"
            lines = data[:int(rng.integers(len(data) // 2, len(data)))].split(b"\n")
            lines = [x for x in lines if x] if rng.random() < 0.5 else lines[:-1] + ([lines[-1]] if lines[-1] else [])
        src = tmp_path / f"f{case}.jsonl"
        src.write_bytes(b"\n".join(lines) + b"\n")
        check(src, tmp_path / f"o{case}", None)
    # Parquet: a file cut short anywhere cannot be read and is refused naming it.
    pq.write_table(pa.table({"id": [f"d{i}" for i in range(12)], "text": TEXTS[:12]}), tmp_path / "ok.parquet")
    whole = (tmp_path / "ok.parquet").read_bytes()
    for case, cut in enumerate(sorted(rng.integers(1, len(whole), size=4))):
        (tmp_path / f"t{case}.parquet").write_bytes(whole[:cut])
        check(tmp_path / f"t{case}.parquet", tmp_path / f"p{case}", None)
    check(tmp_path / "ok.parquet", tmp_path / "pok", 12)
    print(f"\nfuzzed inputs: {outcomes}")
    assert outcomes["refused"] >= 12 and outcomes["embedded"] >= 2  # both paths taken
