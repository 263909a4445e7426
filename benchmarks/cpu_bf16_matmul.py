#!/usr/bin/env python
"""Does any XLA CPU path reach the CPU's bfloat16 matrix units (AMX) for m3jax's matmuls?

    python benchmarks/cpu_bf16_matmul.py            # every configuration, alternated, median of --repeats

Times the feed-forward matmul of one BGE-M3 layer ([rows, 1024] x [1024, 4096], as the encoder runs it) in float32
and bfloat16 under XLA's default CPU path and each oneDNN / XNNPACK / YNNPACK option jaxlib exposes, each
configuration in its own process (XLA_FLAGS must be set before jax starts), against torch's bfloat16 matmul, which
uses oneDNN's AMX kernels where the CPU has them. XLA's products take float32 output (preferred_element_type, as
m3jax's CPU projections do), except the row "output in input dtype" (a plain `x @ w`). Prints GFLOP/s; an XLA bf16
figure far below torch's means the option does not reach AMX for this op.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

CONFIGS = {
    "xla default": "",
    "oneDNN thunks": "--xla_cpu_use_onednn=true",
    "oneDNN custom call": "--xla_cpu_experimental_onednn_custom_call=true",
    "oneDNN dot fusion": "--xla_cpu_use_onednn=true --xla_cpu_experimental_onednn_fusion_type=dot",
    "XNNPACK off": "--xla_cpu_use_xnnpack=false",
    "XNN dot fusion": "--xla_cpu_experimental_xnn_fusion_type=dot",
    "YNN dot fusion": "--xla_cpu_experimental_ynn_fusion_type=dot",
}


def time_fn(fn, seconds: float) -> float:
    fn()
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        fn()
        n += 1
    return (time.perf_counter() - t0) / n


def child(engine: str, dtype: str, rows: int, seconds: float) -> dict:
    flops = 2 * rows * 1024 * 4096
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((rows, 1024), np.float32), rng.standard_normal((1024, 4096), np.float32) / 32
    if engine == "torch":
        import torch

        dt = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
        ta, tb = torch.from_numpy(a).to(dt), torch.from_numpy(b).to(dt)
        sec = time_fn(lambda: ta @ tb, seconds)
    else:
        import jax
        import jax.numpy as jnp

        ja, jb = jnp.asarray(a, dtype), jnp.asarray(b, dtype)
        out = jnp.float32 if engine == "jax" else None  # "jax-narrow": the product in the inputs' dtype
        f = jax.jit(lambda x, y: jnp.dot(x, y, preferred_element_type=out))
        sec = time_fn(lambda: f(ja, jb).block_until_ready(), seconds)
    return {"gflops": flops / sec / 1e9}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=2048)
    p.add_argument("--seconds", type=float, default=2.0)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--configs", default=",".join(CONFIGS), help="comma-separated names from CONFIGS")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        engine, dtype = args.child.split(":")
        print("RESULT " + json.dumps(child(engine, dtype, args.rows, args.seconds)))
        return
    runs = [("torch", "torch", ""), ("xla, output in input dtype", "jax-narrow", "")]
    runs += [(name, "jax", CONFIGS[name]) for name in args.configs.split(",")]
    results: dict = {}
    for _ in range(args.repeats):
        for name, engine, flags in runs:  # alternated, so drifting load hits every configuration alike
            for dtype in ("float32", "bfloat16"):
                env = dict(os.environ, XLA_FLAGS=flags, JAX_PLATFORMS="cpu")
                r = subprocess.run([sys.executable, __file__, "--child", f"{engine}:{dtype}", "--rows",
                                    str(args.rows), "--seconds", str(args.seconds)],
                                   env=env, capture_output=True, text=True)
                line = [x for x in r.stdout.splitlines() if x.startswith("RESULT ")]
                value = json.loads(line[-1][7:])["gflops"] if line else float("nan")
                if not line:
                    print(f"{name} {dtype} failed: {r.stderr.strip().splitlines()[-1:]}", file=sys.stderr)
                results.setdefault((name, dtype), []).append(value)
    print(f"[{args.rows}, 1024] x [1024, 4096] matmul, GFLOP/s, median (min-max) of {args.repeats}")
    print(f"  {'configuration':<28}{'float32':>18}{'bfloat16':>18}")
    for name, _, _ in runs:
        cells = []
        for dtype in ("float32", "bfloat16"):
            v = results[name, dtype]
            cells.append(f"{np.median(v):.0f} ({min(v):.0f}-{max(v):.0f})")
        print(f"  {name:<28}{cells[0]:>18}{cells[1]:>18}")


if __name__ == "__main__":
    main()
