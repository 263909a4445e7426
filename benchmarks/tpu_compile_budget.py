"""Compile budget of a TPU corpus job: how many executables `m3jax embed` compiles for a realistic length mix, how
long they take (real TPU compiles, deviceless, through libtpu), against the job's own time estimated from its FLOPs.

    python benchmarks/tpu_compile_budget.py --target v5e:2x2 --passages 10000000

The mix is synthetic (no corpus can be downloaded here), stated in --mix: "passages" are MS MARCO-like (XLM-R tokens
log-normal, median 90, clipped to 8-512); "web" adds 20% documents (median 1,500 tokens, up to 8,192). A sample of
--sample texts is planned exactly as the job plans it (shards of --shard-size rows, windows of --window texts and
--window-tokens tokens, the Encoder's planner per window) under each setting; the distinct shapes it meets are what
the whole job meets (they saturate long before 10M texts), its batches scale with the corpus. "shard windows" is
`m3jax embed`'s default on accelerators (m3jax.embed.job.default_windows): a whole shard sorted as one window.
Compile seconds are measured for one shape per length bucket met and counted once per shape. Job seconds = padded
matmul FLOPs (m3jax.bench.forward_flops) / (--mfu x --peak-flops x chips of the host): each host of a pod runs the
same job on its share, so the ratio is that of one host.

"Waits" is what compiling adds to the job when, as `m3jax embed` does (Encoder.prepare), each window's new shapes
compile in --threads background threads as soon as the reader has planned it (it runs --ahead windows ahead of the
devices): a timeline of the batches in job order, each starting when the devices are free and its executable is
ready. --threads 1 is the compile time itself, less what overlaps the devices' work.
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import numpy as np  # noqa: E402

from m3jax import (
    accelerators,  # noqa: E402
    pipeline,  # noqa: E402
)
from m3jax.bench import forward_flops  # noqa: E402
from m3jax.config import M3Config  # noqa: E402
from m3jax.embed.job import default_windows  # noqa: E402
from m3jax.embed.planner import split_by_tokens  # noqa: E402
from m3jax.engine import Encoder  # noqa: E402


def sample_lengths(mix: str, n: int, max_length: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    short = np.exp(rng.normal(np.log(90), 0.6, n))
    if mix == "web":
        docs = np.exp(rng.normal(np.log(1500), 1.0, n))
        short = np.where(rng.random(n) < 0.2, docs, short)
    return np.clip(short, 8, max_length).astype(np.int64)


def plan_job(lengths, *, shard_size, window, window_tokens, batch_size, ndev, buckets, row_buckets, max_rows):
    """[(length, rows) of every batch] per window, windows cut as m3jax.embed's planner cuts them."""
    out = []
    for s in range(0, len(lengths), shard_size):
        shard = lengths[s:s + shard_size]
        for w in range(0, len(shard), window):
            chunk = shard[w:w + window]
            for a, b in split_by_tokens(chunk, window_tokens):
                plan = pipeline.plan_batches(chunk[a:b], batch_size=batch_size, max_rows=max_rows,
                                             row_multiple=ndev, buckets=buckets, row_buckets=row_buckets)
                out.append([(L, rows) for L, rows, _ in plan])
    return out


def flat(windows):
    return [shape for w in windows for shape in w]


def compile_waits(windows, compile_s, batch_s, *, threads: int, ahead: int) -> float:
    """Seconds the devices wait for executables when window w's new shapes are queued for `threads` compile threads
    as the devices start window w - ahead (the first `ahead` at once), each batch running when the devices are free
    and its executable ready."""
    ready, workers, device, busy, started = {}, [0.0] * threads, 0.0, 0.0, []
    for w, batches in enumerate(windows):
        started.append(device)
        queued = started[w - ahead] if w >= ahead else 0.0
        for shape in batches:
            if shape not in ready:
                i = min(range(threads), key=workers.__getitem__)
                workers[i] = ready[shape] = max(workers[i], queued) + compile_s(shape)
        for shape in batches:
            device = max(device, ready[shape]) + batch_s(shape)
            busy += batch_s(shape)
    return device - busy


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--target", default="v5e:2x2")
    p.add_argument("--passages", type=int, default=10_000_000)
    p.add_argument("--mix", default="passages", choices=["passages", "web"])
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--sample", type=int, default=200_000)
    p.add_argument("--batch-size", type=int, default=1024, help="most rows per host batch (fewer where memory binds)")
    p.add_argument("--shard-size", type=int, default=10_000)
    p.add_argument("--window", type=int, default=4096, help="the window of the settings that do not say")
    p.add_argument("--window-tokens", type=int, default=1 << 20)
    p.add_argument("--peak-flops", type=float, default=197e12, help="per chip (v5e: 197 TFLOP/s bf16)")
    p.add_argument("--mfu", type=float, default=0.4)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--threads", default="1,2,4,8", help="background compile threads to simulate, comma-separated")
    p.add_argument("--ahead", type=int, default=4, help="windows the reader plans ahead of the devices")
    args = p.parse_args()
    threads = [int(t) for t in args.threads.split(",")]

    devices = accelerators.host_devices(accelerators.compile_only_devices(args.target))
    ndev, cfg = len(devices), M3Config.bge_m3()
    lengths = sample_lengths(args.mix, args.sample, args.max_length)
    scale = args.passages / args.sample
    octaves = tuple(b for b in pipeline.TPU_LENGTH_BUCKETS if b < 128 and b & (b - 1) == 0 or b >= 128 and (
        b & (b - 1) == 0 or b % 1024 == 0 or b == 384))  # 16, 32, 64, 128, 256, 384, 512, 1024, 2048, 3072, ...
    cpu_window, shard_window = (args.window, args.window_tokens), default_windows("tpu", args.shard_size)
    settings = {  # (length buckets, the row counts a partial batch rounds up to (() = always the full batch), window)
        "length buckets, 1.5x row steps": (pipeline.LENGTH_BUCKETS, pipeline.ROW_BUCKETS, cpu_window),
        "TPU buckets, 1.5x row steps": (pipeline.TPU_LENGTH_BUCKETS, pipeline.ROW_BUCKETS, cpu_window),
        "TPU buckets, 2x row steps": (pipeline.TPU_LENGTH_BUCKETS, pipeline.ACCELERATOR_ROW_BUCKETS, cpu_window),
        "TPU buckets, full batches only": (pipeline.TPU_LENGTH_BUCKETS, (), cpu_window),
        "octave buckets, 2x row steps": (octaves, pipeline.ACCELERATOR_ROW_BUCKETS, cpu_window),
        "octave buckets, full batches only": (octaves, (), cpu_window),
        "TPU buckets, 2x row steps, shard windows": (pipeline.TPU_LENGTH_BUCKETS, pipeline.ACCELERATOR_ROW_BUCKETS,
                                                     shard_window),
        "TPU buckets, full batches, shard windows": (pipeline.TPU_LENGTH_BUCKETS, (), shard_window),
    }
    # The job's Encoder on one host of the target: rows per batch = min(batch size, what fits a chip's memory).
    enc = Encoder(cfg, None, None, dtype=args.dtype, devices=devices)
    plans = {name: plan_job(lengths, shard_size=args.shard_size, window=w, window_tokens=wt,
                            batch_size=args.batch_size, ndev=ndev, buckets=b, row_buckets=r,
                            max_rows=lambda L: enc.batch_rows(L, args.batch_size))
             for name, (b, r, (w, wt)) in settings.items()}
    # One compile per length met (the rows of a shape barely change its compile time).
    per_length = {}
    for L in sorted({L for plan in plans.values() for L, _ in flat(plan)}):
        rows = max(r for plan in plans.values() for LL, r in flat(plan) if LL == L)
        t0 = time.perf_counter()
        enc.executable(L, rows)
        per_length[L] = enc.compile_seconds.get((L, rows, pipeline.HEADS), time.perf_counter() - t0)
        print(f"  compile [{rows} x {L}] on {args.target}: {per_length[L]:.1f} s", flush=True)
    real = int(lengths.sum())
    print(f"\n{args.passages:,} {args.mix} (max_length {args.max_length}, mean {lengths.mean():.0f} tokens) on one "
          f"{args.target} host ({ndev} x {devices[0].device_kind}), batch {args.batch_size} rows, "
          f"{args.mfu:.0%} of {args.peak_flops / 1e12:.0f} TFLOP/s per chip")
    waits_head = " ".join(f"{f'waits/job {t}t':>14}" for t in threads)
    print(f"{'setting':<38} {'shapes':>6} {'padding':>8} {'compile s':>9} {'job s':>9} {'compile/job':>11} "
          f"{'sum s':>7} {waits_head}")
    batch_s = lambda shape: forward_flops(cfg, [shape]) / (args.mfu * args.peak_flops * ndev)  # noqa: E731
    for name, windows in plans.items():
        plan = flat(windows)
        shapes = set(plan)
        compile_s = sum(per_length[L] for L, _ in shapes)
        job_s = forward_flops(cfg, plan) * scale / (args.mfu * args.peak_flops * ndev)
        padded = sum(L * r for L, r in plan)
        waits = [compile_waits(windows, lambda shape: per_length[shape[0]], batch_s, threads=t, ahead=args.ahead)
                 for t in threads]
        print(f"{name:<38} {len(shapes):>6} {padded / real:>8.2f} {compile_s:>9.0f} {job_s:>9.0f} "
              f"{compile_s / job_s:>11.1%} {compile_s + job_s:>7.0f} "
              + " ".join(f"{w:>6.0f} s {w / job_s:>5.1%}" for w in waits))


if __name__ == "__main__":
    main()
