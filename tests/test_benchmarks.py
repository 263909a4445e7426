"""The benchmark entry points run (on a tiny model here): `m3jax bench`, the prepared GPU script's CPU check and
benchmarks/bench_embed.py's quick mode."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(args, tmp_path):
    env = {**os.environ, "M3JAX_HOME": str(tmp_path / "home"), "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)


def test_bench_cli_reports_throughput_flops_compile_and_memory(release_dirs, tmp_path):
    r = run(["-m", "m3jax", "bench", "--model", str(release_dirs["tiny"]), "--lengths", "30,70,70,200",
             "--batch-size", "2", "--json-stdout", "--cache-dir", str(tmp_path / "jc")], tmp_path)
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert res["texts"] == 4 and abs(res["real_tokens"] - 370) <= 8  # make_texts hits lengths within a few tokens
    assert res["tokens_per_s"] > 0 and 0 < res["fraction_of_peak"] < 1
    assert res["padded_tokens"] >= res["real_tokens"]
    assert set(res["compile_s"]) and all(v >= 0 for v in res["compile_s"].values())
    assert res["peak_rss_gb"] > 0
    assert any((tmp_path / "jc").iterdir())  # the persistent compilation cache was written


def test_gpu_script_checks_out_on_cpu(tmp_path):
    r = run(["benchmarks/gpu_bench.py", "--check-on-cpu", "--repeat", "1", "--out", str(tmp_path)], tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads((tmp_path / "gpu_bench.json").read_text())
    assert [w["length"] for w in res["workloads"]] == [64, 512]
    for w in res["workloads"]:
        assert w["min_dense_cosine"] > 0.999  # m3jax and FlagEmbedding agree on the same texts
        assert w["m3jax"]["tokens_per_s"] > 0 and w["flag"]["tokens_per_s"] > 0
        assert w["flag"]["engine"] == "FlagEmbedding BGEM3FlagModel"
    # fit's step in bf16 with remat, on the CPU check's one load (two on the GPU: 512- and 8,192-token passages).
    assert [(t["passage_len"], t["queries"] * t["group"]) for t in res["train"]] == [(64, 4)]
    for t in res["train"]:
        assert t["tokens_per_s"] > 0 and t["temp_gb"] > 0 and len(t["losses"]) == 2


def test_bf16_matmul_probe_runs(tmp_path):
    r = run(["benchmarks/cpu_bf16_matmul.py", "--rows", "64", "--seconds", "0.05", "--repeats", "1",
             "--configs", "xla default,oneDNN thunks"], tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = {line.split("  ")[1].strip(): line for line in r.stdout.splitlines()[2:]}
    assert set(rows) == {"torch", "xla, output in input dtype", "xla default", "oneDNN thunks"}
    assert "nan" not in r.stdout  # every configuration ran and was timed


def test_embed_benchmark_runs_in_its_quick_mode(tmp_path):
    """benchmarks/bench_embed.py on a tiny model: every engine timed, the outputs agree with FlagEmbedding's."""
    r = run(["benchmarks/bench_embed.py", "--quick", "--texts", "24", "--repeat", "1", "--rss-sizes", "100", "--json",
             str(tmp_path / "b.json")], tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads((tmp_path / "b.json").read_text())
    s = res["speed"]
    assert set(s["engines"]) == {"embed", "encode", "flag", "forward"}
    assert all(len(e["runs_s"]) == 1 and e["tokens_per_s"] > 0 for e in s["engines"].values())
    assert s["max_abs_dense_diff"]["embed_vs_flag"] < 1e-5 and s["max_abs_dense_diff"]["encode_vs_flag"] < 1e-5
    assert [x["texts"] for x in res["rss"]] == [100] and res["rss"][0]["peak_mib"] > 0 and res["rss"][0]["shapes"] > 0
    assert "overhead over the bare compiled forward" in r.stdout


def test_train_benchmark_runs_both_engines_on_the_same_batches(tmp_path):
    """benchmarks/bench_train.py's quick mode: m3jax's train step and FlagEmbedding's, one round, tiny model."""
    out = tmp_path / "train.json"
    r = run(["benchmarks/bench_train.py", "--size", "tiny", "--steps", "1", "--repeats", "1", "--batch-size", "2",
             "--group-size", "2", "--query-len", "16", "--passage-len", "32", "--workdir", str(tmp_path / "w"),
             "--json", str(out)], tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(out.read_text())
    assert [x["engine"] for x in res["results"]] == ["m3jax", "flag"]
    for x in res["results"]:
        assert len(x["step_s"]) == 1 and x["step_s"][0] > 0 and x["peak_rss_gb"] > 0
        assert 0 < x["tokens"][0] <= x["padded_tokens"][0] <= 2 * 16 + 4 * 32
    m3, flag = res["results"]
    assert (m3["tokens"], m3["padded_tokens"]) == (flag["tokens"], flag["padded_tokens"])  # the same batches
    assert "m3jax / FlagEmbedding: tokens/s" in res["report"]


def test_forward_vs_torch_runs_every_variant(tmp_path):
    opts = '{"m3jax": null, "default": {}, "ynn": {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_DOT"}}'
    r = run(["benchmarks/forward_vs_torch.py", "--layers", "1", "--workloads", "check", "--repeats", "1",
             "--options", opts], tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = [line.split() for line in r.stdout.splitlines() if line.startswith("  ")]
    assert [x[0] for x in rows] == ["m3jax", "default", "ynn", "torch"]
    assert all(float(x[1].rstrip("s")) > 0 for x in rows)


def test_attention_benchmark_times_every_path(tmp_path):
    r = run(["benchmarks/attention_cpu.py", "--workloads", "2x40", "--scales", "1,3", "--repeats", "1"], tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = [line.split() for line in r.stdout.splitlines() if line.startswith("  ")]
    assert [x[0] for x in rows] == ["tiled", "chunked", "torch"] * 2
    assert all(float(x[1].rstrip("s")) > 0 for x in rows)


def test_compile_budget_timeline():
    """tpu_compile_budget.compile_waits: a window's new shapes queue for the compile threads when the devices start
    the window `ahead` before it; a batch runs once the devices are free and its executable is ready."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("tpu_compile_budget", ROOT / "benchmarks" / "tpu_compile_budget.py")
    budget = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(budget)
    windows = [[(1, 1), (2, 1)], [(1, 1)], [(3, 1)]]
    waits = [budget.compile_waits(windows, lambda s: 10.0, lambda s: 1.0, threads=t, ahead=1) for t in (1, 2)]
    # 1 thread: shapes ready at 10, 20 and (queued at 21, when window 1 starts) 31; the devices end at 32.
    # 2 threads: ready at 10, 10 and 22 (queued at 12); the devices end at 23. Busy 4 s either way.
    assert waits == [28.0, 19.0]
    assert budget.compile_waits(windows, lambda s: 0.0, lambda s: 1.0, threads=1, ahead=1) == 0.0


def test_gradient_cache_memory_benchmark_runs_on_cpu(tmp_path):
    """benchmarks/gradient_cache_memory.py's CPU mode at toy sizes: both variants run in their own process; the
    cache's compiled step needs less memory than the plain one even here."""
    r = run(["benchmarks/gradient_cache_memory.py", "cpu", "--length", "256", "--layers", "1", "--hidden", "64",
             "--batch-size", "2", "--group-size", "4", "--float32"], tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    plain, cached = (json.loads(line) for line in r.stdout.splitlines() if line.startswith("{"))
    assert plain["cache"] is None and cached["cache"] == 1
    for row in (plain, cached):
        assert row["fits"] and row["peak_rss_bytes"] > 0 and row["step_s"] > 0 and row["loss"] > 0
    assert abs(plain["loss"] - cached["loss"]) <= 1e-5 * plain["loss"]
    assert cached["xla_temp_bytes"] < plain["xla_temp_bytes"]
    assert "| CPU (run) |" in r.stdout


def test_compact_fidelity_benchmark_runs(tmp_path):
    """benchmarks/compact_fidelity.py's quick mode (a 32-wide random model, 100 queries): every setting of the table,
    exact search scoring 1.0 against itself, and sizes that shrink as the setting says."""
    r = run(["benchmarks/compact_fidelity.py", "--quick", "--out", str(tmp_path / "cf")], tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads((tmp_path / "cf" / "results.json").read_text())
    rows = {row["setting"]: row for row in res["rows"]}
    assert len(rows) == 14 and res["queries"] == 100
    assert rows["dense float32 (exact)"]["recall@10"] == 1.0 and rows["ColBERT float16"]["recall@10"] > 0.95
    size = {k: v["bytes_per_passage"] for k, v in rows.items()}
    assert size["dense float32 (exact)"] == 4 * size["dense int8"] == 32 * size["dense binary"] == 4 * 32
    assert abs(size["ColBERT float16"] - 2 * size["ColBERT int8"]) <= 1  # rounded to whole bytes
    assert size["ColBERT float16"] > size["ColBERT pool 2"] > size["ColBERT pool 3"] > size["ColBERT pool 4"]
    assert size["MUVERA FDE only"] == 20 * 32 * 16 * 4
    assert all(0 <= v["recall@10"] <= 1 and 0 <= v["found@10"] <= 1 for v in rows.values())
