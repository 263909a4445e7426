"""Compile budget of a TPU corpus job: how many executables `m3jax embed` compiles for a realistic length mix, how
long they take (real TPU compiles, deviceless, through libtpu), against the job's own time estimated from its FLOPs.

    python benchmarks/tpu_compile_budget.py --target v5e:2x2 --passages 10000000

The mix is synthetic (no corpus can be downloaded here), stated in --mix: "passages" are MS MARCO-like (XLM-R tokens
log-normal, median 90, clipped to 8-512); "web" adds 20% documents (median 1,500 tokens, up to 8,192). A sample of
--sample texts is planned exactly as the job plans it (shards of --shard-size rows, windows of --window texts and
--window-tokens tokens, the Encoder's planner per window) under each setting; the distinct shapes it meets are what
the whole job meets (they saturate long before 10M texts), its batches scale with the corpus. Compile seconds are
measured for one shape per length bucket met and counted once per shape. Job seconds = padded matmul FLOPs
(m3jax.bench.forward_flops) / (--mfu x --peak-flops x chips of the host): each host of a pod runs the same job on
its share, so the ratio is that of one host.
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
    """(length, rows) of every batch, windows cut as m3jax.embed's planner cuts them."""
    out = []
    for s in range(0, len(lengths), shard_size):
        shard = lengths[s:s + shard_size]
        for w in range(0, len(shard), window):
            chunk = shard[w:w + window]
            for a, b in split_by_tokens(chunk, window_tokens):
                plan = pipeline.plan_batches(chunk[a:b], batch_size=batch_size, max_rows=max_rows,
                                             row_multiple=ndev, buckets=buckets, row_buckets=row_buckets)
                out += [(L, rows) for L, rows, _ in plan]
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--target", default="v5e:2x2")
    p.add_argument("--passages", type=int, default=10_000_000)
    p.add_argument("--mix", default="passages", choices=["passages", "web"])
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--sample", type=int, default=200_000)
    p.add_argument("--batch-size", type=int, default=1024, help="most rows per host batch (fewer where memory binds)")
    p.add_argument("--shard-size", type=int, default=10_000)
    p.add_argument("--window", type=int, default=4096)
    p.add_argument("--window-tokens", type=int, default=1 << 20)
    p.add_argument("--peak-flops", type=float, default=197e12, help="per chip (v5e: 197 TFLOP/s bf16)")
    p.add_argument("--mfu", type=float, default=0.4)
    p.add_argument("--dtype", default="bfloat16")
    args = p.parse_args()

    devices = accelerators.host_devices(accelerators.compile_only_devices(args.target))
    ndev, cfg = len(devices), M3Config.bge_m3()
    lengths = sample_lengths(args.mix, args.sample, args.max_length)
    scale = args.passages / args.sample
    octaves = tuple(b for b in pipeline.TPU_LENGTH_BUCKETS if b < 128 and b & (b - 1) == 0 or b >= 128 and (
        b & (b - 1) == 0 or b % 1024 == 0 or b == 384))  # 16, 32, 64, 128, 256, 384, 512, 1024, 2048, 3072, ...
    settings = {  # (length buckets, the row counts a partial batch rounds up to; () = always the full batch)
        "length buckets, 1.5x row steps": (pipeline.LENGTH_BUCKETS, pipeline.ROW_BUCKETS),
        "TPU buckets, 1.5x row steps": (pipeline.TPU_LENGTH_BUCKETS, pipeline.ROW_BUCKETS),
        "TPU buckets, 2x row steps": (pipeline.TPU_LENGTH_BUCKETS, pipeline.ACCELERATOR_ROW_BUCKETS),
        "TPU buckets, full batches only": (pipeline.TPU_LENGTH_BUCKETS, ()),
        "octave buckets, 2x row steps": (octaves, pipeline.ACCELERATOR_ROW_BUCKETS),
        "octave buckets, full batches only": (octaves, ()),
    }
    # The job's Encoder on one host of the target: rows per batch = min(batch size, what fits a chip's memory).
    enc = Encoder(cfg, None, None, dtype=args.dtype, devices=devices)
    plans = {name: plan_job(lengths, shard_size=args.shard_size, window=args.window,
                            window_tokens=args.window_tokens, batch_size=args.batch_size, ndev=ndev,
                            buckets=b, row_buckets=r, max_rows=lambda L: enc.batch_rows(L, args.batch_size))
             for name, (b, r) in settings.items()}
    # One compile per length met (the rows of a shape barely change its compile time).
    per_length = {}
    for L in sorted({L for plan in plans.values() for L, _ in plan}):
        rows = max(r for plan in plans.values() for LL, r in plan if LL == L)
        t0 = time.perf_counter()
        enc.executable(L, rows)
        per_length[L] = enc.compile_seconds.get((L, rows, pipeline.HEADS), time.perf_counter() - t0)
        print(f"  compile [{rows} x {L}] on {args.target}: {per_length[L]:.1f} s", flush=True)
    real = int(lengths.sum())
    print(f"\n{args.passages:,} {args.mix} (max_length {args.max_length}, mean {lengths.mean():.0f} tokens) on one "
          f"{args.target} host ({ndev} x {devices[0].device_kind}), batch {args.batch_size} rows, "
          f"{args.mfu:.0%} of {args.peak_flops / 1e12:.0f} TFLOP/s per chip")
    print(f"{'setting':<38} {'shapes':>6} {'padding':>8} {'compile s':>9} {'job s':>9} {'compile/job':>11} "
          f"{'sum s':>7}")
    for name, plan in plans.items():
        shapes = set(plan)
        compile_s = sum(per_length[L] for L, _ in shapes)
        job_s = forward_flops(cfg, plan) * scale / (args.mfu * args.peak_flops * ndev)
        padded = sum(L * r for L, r in plan)
        print(f"{name:<38} {len(shapes):>6} {padded / real:>8.2f} {compile_s:>9.0f} {job_s:>9.0f} "
              f"{compile_s / job_s:>11.1%} {compile_s + job_s:>7.0f}")


if __name__ == "__main__":
    main()
