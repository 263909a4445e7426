"""`m3jax bench`: throughput, achieved FLOP/s against a stated peak, compile time per bucket, peak memory.

Workloads are texts of chosen token lengths built from a multilingual word list, so every engine in a side-by-side
run (benchmarks/side_by_side.py) sees the same strings.
"""

from __future__ import annotations

import json
import random
import resource
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

_WORDS = (
    "the retrieval model embeds passages queries documents in many languages dense sparse lexical vectors "
    "北京 上海 首都 中华人民共和国 文化 中心 Берлин столица город Германии 東京 日本 都市 世界 القاهرة عاصمة مصر "
    "la tour Eiffel est une de fer Paris der schnelle braune Fuchs springt über den faulen Hund सूर्य पृथ्वी "
    "서울 대한민국 수도 Παρθενώνας ναός Ακρόπολη Αθήνας 1984 2024 3.14 BM25 ColBERT XLM-RoBERTa"
).split()

# Stated peaks for the fraction-of-peak figure (dense matmul, per device; --peak-flops gives the real one): for CPUs,
# whose peak varies by model and core count, a nominal figure; the H200's dense bf16 figure; a TPU v5p chip's bf16.
PEAK_FLOPS = {"cpu": 250e9, "gpu": 790e12, "tpu": 459e12}

WORKLOADS = {
    # 32 passages of 64-512 tokens, as the FlagEmbedding reference measurement.
    "passages": dict(n=32, lo=64, hi=512, batch_size=16),
    # Two long documents, batch 1: the reference measured 7,943 and 4,181 tokens.
    "long": dict(lengths=[7943, 4181], batch_size=1),
    "queries": dict(n=256, lo=8, hi=48, batch_size=256),
}


def make_texts(lengths: list[int], tokenizer, seed: int = 0) -> list[str]:
    """Texts whose token counts (with `<s>` and `</s>`) are each within a few tokens of the targets."""
    rng = random.Random(seed)
    texts = []
    for target in lengths:
        words = [rng.choice(_WORDS) for _ in range(max(4, int(target * 0.9)))]
        lo, hi = 1, len(words)
        while True:  # grow until long enough, then binary-search the word count
            ids, _ = tokenizer.encode([" ".join(words)], 10**6)
            if len(ids[0]) >= target:
                break
            words += [rng.choice(_WORDS) for _ in range(len(words) // 2 + 1)]
            hi = len(words)
        while lo < hi:
            mid = (lo + hi) // 2
            ids, _ = tokenizer.encode([" ".join(words[:mid])], 10**6)
            lo, hi = (mid + 1, hi) if len(ids[0]) < target else (lo, mid)
        texts.append(" ".join(words[:lo]))
    return texts


def workload_lengths(name: str, seed: int = 0) -> tuple[list[int], int]:
    w = WORKLOADS[name]
    if "lengths" in w:
        return list(w["lengths"]), w["batch_size"]
    rng = np.random.default_rng(seed)
    return rng.integers(w["lo"], w["hi"] + 1, size=w["n"]).tolist(), w["batch_size"]


def forward_flops(cfg, padded_lengths_rows: list[tuple[int, int]]) -> float:
    """Matmul FLOPs of the encoder and heads for batches of (length L, rows)."""
    d, f, c = cfg.hidden_size, cfg.intermediate_size, cfg.colbert_dim
    total = 0.0
    for L, rows in padded_lengths_rows:
        per_token = cfg.num_layers * (2 * (4 * d * d + 2 * d * f) + 4 * L * d) + 2 * d * (c + 1)
        total += rows * L * per_token
    return total


def peak_rss_gb() -> float:
    """This process's peak RSS in GB: VmHWM where /proc exists (ru_maxrss would include the parent's peak when
    started by fork + exec), else ru_maxrss."""
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB


def alternated(calls: dict[str, Callable[[], object]], repeats: int) -> dict[str, list[float]]:
    """Seconds of each call per round, after one warm-up call each; every round runs every call in turn, so a shared
    machine's drift falls on all of them alike."""
    for f in calls.values():
        f()
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(repeats):
        for name, f in calls.items():
            t0 = time.perf_counter()
            f()
            times[name].append(time.perf_counter() - t0)
    return times


def print_alternated(title: str, times: dict[str, list[float]], flops: float, ref: str = "torch") -> None:
    """Median (min-max) seconds per call, GFLOP/s, and `ref`'s median over each (above 1: faster than ref)."""
    print(f"\n{title}: median (min-max) of {len(next(iter(times.values())))} alternated runs")
    base = float(np.median(times[ref]))
    for name, ts in times.items():
        m = float(np.median(ts))
        # Three significant digits: a call of a tiny test workload can take well under a millisecond.
        print(f"  {name:<10} {m:8.3g}s ({min(ts):.3g}-{max(ts):.3g})  {flops / m / 1e9:6.1f} GFLOP/s  "
              f"{ref}/this {base / m:.2f}")


def run(args) -> dict:
    import jax

    from m3jax import pipeline
    from m3jax.api import BGEM3

    t0 = time.perf_counter()
    model = BGEM3.from_pretrained(args.model or _default_model(), dtype=args.dtype, attn_impl=args.attn,
                                  max_tokens_per_batch=args.max_tokens,
                                  compilation_cache=args.cache_dir or True)
    load_s = time.perf_counter() - t0
    if args.lengths:
        lengths, batch_size = [int(x) for x in args.lengths.split(",")], args.batch_size or 16
    else:
        lengths, batch_size = workload_lengths(args.workload, args.seed)
    batch_size = args.batch_size or batch_size
    texts = make_texts(lengths, model.tokenizer, args.seed)
    max_length = model.config.max_length
    batches, real, _ = model.batches(texts, batch_size=batch_size, max_length=max_length)
    plan = [(b.input_ids.shape[1], b.input_ids.shape[0]) for b in batches]
    shapes = sorted(set(plan), reverse=True)

    heads = pipeline.HEADS
    for L, rows in shapes:  # compile (or fetch from the persistent cache) each bucket, timed alone
        model.executable(L, rows, heads)
    compile_s = {f"{L}x{rows}": round(model.compile_seconds[(L, rows, heads)], 2) for L, rows in shapes}
    times = []
    for _ in range(args.repeat):
        t = time.perf_counter()
        model.encode_padded(texts, batch_size=batch_size, max_length=max_length, heads=heads, show_progress=False)
        times.append(time.perf_counter() - t)
    best = min(times)
    flops = forward_flops(model.config, plan)
    backend = jax.default_backend()
    peak = args.peak_flops or PEAK_FLOPS.get(backend, 0)
    result = {
        "engine": "m3jax", "backend": backend, "devices": len(model.devices), "dtype": args.dtype,
        "attn": args.attn, "texts": len(texts), "real_tokens": int(real.sum()),
        "padded_tokens": int(sum(L * rows for L, rows in plan)), "batch_size": batch_size,
        "seconds": round(best, 3), "tokens_per_s": round(real.sum() / best, 1),
        "achieved_tflops": round(flops / best / 1e12, 4), "peak_tflops": peak / 1e12,
        "fraction_of_peak": round(flops / best / peak, 4) if peak else None,
        "compile_s": compile_s, "load_s": round(load_s, 1), "peak_rss_gb": round(peak_rss_gb(), 2),
    }
    if backend != "cpu":
        stats = model.devices[0].memory_stats() or {}
        result["device_peak_gb"] = round(stats.get("peak_bytes_in_use", 0) / 2**30, 2)
    return result


def _default_model() -> Path:
    from m3jax.random_weights import random_m3jax_dir

    return random_m3jax_dir("bge-m3")


def main(args) -> int:
    """`m3jax bench` (the CLI parses the arguments)."""
    result = run(args)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    print(json.dumps(result) if args.json_stdout else _table(result))
    return 0


def _table(r: dict) -> str:
    lines = [f"m3jax bench: {r['texts']} texts, {r['real_tokens']} tokens ({r['padded_tokens']} padded), "
             f"{r['backend']} x{r['devices']}, {r['dtype']}, attention {r['attn']}",
             f"  end to end     {r['seconds']:.2f} s   {r['tokens_per_s']:.1f} tokens/s",
             f"  achieved       {r['achieved_tflops'] * 1e3:.1f} GFLOP/s"
             + (f" = {100 * r['fraction_of_peak']:.1f}% of the stated {r['peak_tflops'] * 1e3:.0f} GFLOP/s peak"
                if r["fraction_of_peak"] else ""),
             "  compile (s)    " + ", ".join(f"{k}: {v}" for k, v in r["compile_s"].items()),
             f"  load {r['load_s']} s, peak RSS {r['peak_rss_gb']} GB"
             + (f", device peak {r['device_peak_gb']} GB" if "device_peak_gb" in r else "")]
    return "\n".join(lines)
