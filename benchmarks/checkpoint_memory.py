#!/usr/bin/env python
"""Peak host memory (VmHWM) of converting a release checkpoint and of loading an m3jax directory.

    python benchmarks/checkpoint_memory.py convert SRC DST   # convert_release(SRC, DST, overwrite=True)
    python benchmarks/checkpoint_memory.py load DIR [DTYPE]  # load_params(DIR), then Encoder(...) on the result
    python benchmarks/checkpoint_memory.py baseline          # imports only: the fixed cost of any process

Each step runs in a fresh child process and reports that process's own peak RSS (VmHWM), next to the weights'
size. The long-document encode against FlagEmbedding is benchmarks/side_by_side.py --workload long.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHILD = """
import json, sys, time
import jax, numpy as np, orbax.checkpoint, flax.nnx
import m3jax.checkpoint as ck
from m3jax.bench import peak_rss_gb
what, args = sys.argv[1], sys.argv[2:]
t = time.perf_counter()
if what == "convert":
    ck.convert_release(args[0], args[1], overwrite=True)
elif what == "load":
    from m3jax.engine import Encoder
    dtype = args[1] if len(args) > 1 else "float32"
    cfg, params, tok = ck.load_params(args[0], dtype=dtype)
    read_gb = peak_rss_gb()
    enc = Encoder(cfg, params, tok, dtype=dtype)
    print("RESULT-READ", json.dumps({"read_peak_rss_gb": round(read_gb, 3)}))
print("RESULT", json.dumps({"step": what, "seconds": round(time.perf_counter() - t, 1),
                            "peak_rss_gb": round(peak_rss_gb(), 3)}))
"""


def run_child(*argv: str) -> dict:
    r = subprocess.run([sys.executable, "-c", CHILD, *argv], capture_output=True, text=True, cwd=ROOT)
    if r.returncode:
        raise SystemExit(r.stderr[-3000:])
    out = {}
    for line in r.stdout.splitlines():
        if line.startswith("RESULT"):
            out.update(json.loads(line.split(" ", 1)[1]))
    return out


def weights_gb(path: Path) -> float:
    return sum(f.stat().st_size for f in path.iterdir() if f.suffix in (".safetensors", ".bin", ".pt")) / 2**30


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("step", choices=["convert", "load", "baseline"])
    p.add_argument("paths", nargs="*")
    args = p.parse_args()
    t = time.perf_counter()
    res = run_child(args.step, *args.paths)
    if args.step == "convert":
        res["weights_gb"] = round(weights_gb(Path(args.paths[0])), 3)
        res["ratio"] = round(res["peak_rss_gb"] / res["weights_gb"], 2)
    res["wall_s"] = round(time.perf_counter() - t, 1)
    print(json.dumps(res))


if __name__ == "__main__":
    main()
