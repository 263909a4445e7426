"""Memory of fit()'s optimiser step with and without the gradient cache (--gradient-cache-chunk), at 8,192-token
passages.

    python benchmarks/gradient_cache_memory.py tpu --target v5e:2x2 --batch-size 4
        BGE-M3 itself, compiled for a TPU topology without one (what `m3jax preflight --job train` compiles): XLA's
        memory analysis per chip, bfloat16, FSDP, remat; plain and with the cache.
    python benchmarks/gradient_cache_memory.py cpu --batch-size 1
        real steps on this host's CPU, each in its own process, on a narrower model (BGE-M3's vocabulary and heads,
        --layers x --hidden; the full model's step at 8,192 tokens takes too long on a small host): XLA's memory
        analysis of the compiled step and the process's peak RSS, plain and with the cache (a step whose analysis
        exceeds the host's memory is compiled, not run).

Prints one JSON line per variant, then a Markdown table for benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def train_config(args, cache):
    from m3jax.train import DataConfig, LossConfig, TrainConfig

    return TrainConfig(data=DataConfig(train_group_size=args.group_size, query_max_len=64,
                                       passage_max_len=args.length),
                       loss=LossConfig(unified_finetuning=True, use_self_distill=True, self_distill_start_step=0),
                       per_device_batch_size=args.batch_size, bf16=args.bf16, remat=True, fsdp=args.fsdp,
                       dropout=False, gradient_cache_chunk=cache, length_buckets=())


def tpu(args) -> list[dict]:
    from m3jax.train.preflight import train_checks

    rows = []
    for cache in (None, args.chunk):
        check = train_checks(args.target, train_config(args, cache), model="bge-m3")[0]
        # A step over the chip's memory fails to compile; XLA's message gives its temporaries alone.
        over = re.search(r"HLO temporaries \(([\d.]+)G\)", check.error)
        rows.append({"where": f"TPU {args.target} (compile only)", "model": "bge-m3", "cache": cache,
                     "rows_per_device": args.batch_size * args.group_size, "length": args.length,
                     "xla_bytes": check.needed if check.memory else None,
                     "temporaries_at_least_bytes": int(float(over.group(1)) * 2**30) if over else None,
                     "device_bytes": check.device_memory, "fits": check.ok,
                     "compile_s": round(check.compile_s, 1), "error": check.error})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def cpu_variant(args, cache) -> dict:
    """One step in this process (run by cpu() in a subprocess per variant)."""
    import resource

    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from m3jax.config import M3Config
    from m3jax.model import init_model
    from m3jax.train.loop import plan_step
    from m3jax.train.sharding import make_mesh
    from m3jax.train.step import accumulate_step

    cfg = M3Config.tiny(hidden_size=args.hidden, num_layers=args.layers, num_heads=args.hidden // 64,
                        intermediate_size=4 * args.hidden, colbert_dim=args.hidden)
    config = train_config(args, cache)
    mesh = make_mesh(jax.devices()[:1])
    plan = plan_step(cfg, config, mesh, 10)
    state, opt_state = plan.place(jax.tree_util.tree_map(np.asarray, nnx.split(init_model(cfg, seed=0))[1]))
    rng = np.random.default_rng(0)
    b, g, L = args.batch_size, args.group_size, args.length
    batches = {"q_ids": rng.integers(5, 1000, (1, b, 64)), "q_mask": np.ones((1, b, 64)),
               "p_ids": rng.integers(5, 1000, (1, b * g, L)), "p_mask": np.ones((1, b * g, L))}
    batches = {k: jnp.asarray(v, jnp.int32) for k, v in batches.items()}
    key = jnp.asarray(jax.random.key_data(jax.random.PRNGKey(0)))
    with jax.set_mesh(mesh):
        compiled = accumulate_step.lower(plan.graphdef, state, opt_state, batches, jnp.int32(0), key,
                                         **plan.static).compile()
    ma = compiled.memory_analysis()
    xla = int(ma.temp_size_in_bytes + ma.argument_size_in_bytes + ma.output_size_in_bytes - ma.alias_size_in_bytes)
    host = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    row = {"where": "CPU (run)", "model": f"{args.layers}x{args.hidden}, BGE-M3 vocabulary", "cache": cache,
           "rows_per_device": args.batch_size * args.group_size, "length": args.length, "xla_bytes": xla,
           "xla_temp_bytes": int(ma.temp_size_in_bytes), "device_bytes": host, "fits": xla < host}
    if not row["fits"]:  # not run: it would swap or be killed
        return row
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    t0 = time.perf_counter()
    state, opt_state, m = compiled(state, opt_state, batches, jnp.int32(0), key)
    loss = float(jax.block_until_ready(m["loss"]))
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {**row, "peak_rss_bytes": int(peak), "peak_rss_before_step_bytes": int(before),
            "step_s": round(seconds, 1), "loss": loss}


def cpu(args) -> list[dict]:
    rows = []
    for cache in (None, args.chunk):
        cmd = [sys.executable, __file__, "cpu-variant", *sys.argv[2:], "--variant-cache", str(cache or 0)]
        env = {**os.environ, "JAX_PLATFORMS": "cpu",
               "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
        r = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if r.returncode:
            rows.append({"where": "CPU (run)", "cache": cache, "error": r.stderr.strip().splitlines()[-1][:300]})
        else:
            rows.append(json.loads(r.stdout.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]), flush=True)
    return rows


def table(rows: list[dict]) -> str:
    gib = lambda x: f"{x / 2**30:.2f}" if isinstance(x, int) else "-"  # noqa: E731
    out = ["| where | model | rows x tokens per device | gradient cache | XLA memory (GiB/device) | peak RSS (GiB) | "
           "fits |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        fits = ("yes" if r.get("fits") else f"no ({gib(r.get('device_bytes'))} GiB)") if "fits" in r else "-"
        need = gib(r.get("xla_bytes"))
        if r.get("temporaries_at_least_bytes"):
            need = f"> {gib(r['temporaries_at_least_bytes'])} (temporaries alone)"
        out.append(f"| {r['where']} | {r.get('model', '-')} | {r.get('rows_per_device')} x {r.get('length')} | "
                   f"{'chunk ' + str(r['cache']) if r['cache'] else 'off'} | {need} | "
                   f"{gib(r.get('peak_rss_bytes'))} | {fits} |")
    return "\n".join(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("where", choices=["tpu", "cpu", "cpu-variant"])
    p.add_argument("--target", default="v5e:2x2")
    p.add_argument("--batch-size", type=int, default=4, help="queries per device")
    p.add_argument("--group-size", type=int, default=8)
    p.add_argument("--length", type=int, default=8192)
    p.add_argument("--chunk", type=int, default=1, help="the cache's rows per encoder call")
    p.add_argument("--layers", type=int, default=4, help="cpu: the narrower model's layers")
    p.add_argument("--hidden", type=int, default=256, help="cpu: the narrower model's width")
    p.add_argument("--no-fsdp", dest="fsdp", action="store_false")
    p.add_argument("--float32", dest="bf16", action="store_false")
    p.add_argument("--variant-cache", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.where == "cpu-variant":
        print(json.dumps(cpu_variant(args, args.variant_cache or None)))
        return
    rows = tpu(args) if args.where == "tpu" else cpu(args)
    print(table(rows))


if __name__ == "__main__":
    main()
