#!/usr/bin/env python
"""`m3jax embed` vs `encode()` vs FlagEmbedding's `encode`, on the same texts and the same random checkpoint (CPU).

    python benchmarks/bench_embed.py                  # small model (4 layers, 128 wide), 1,000 texts, 3 repeats,
                                                      # then peak RSS of `m3jax embed` at 10k and 100k texts
    python benchmarks/bench_embed.py --quick          # tiny model, a few texts: the CI check that it still runs
    python benchmarks/bench_embed.py --release DIR --texts 64 --engines embed,forward --parts speed
                                                      # a given release-layout checkpoint (e.g. full size)

All engines compute all three outputs in float32, with batch_size 256 and max_length 512, in one process: each is
warmed up once (m3jax compiles its shapes), then the engines run in turn, `--repeat` rounds, and the median and
spread (min ... max) of each are reported. Engines:
  embed    m3jax.embed.embed(corpus.txt, encoder, fresh output dir): read, tokenise, plan windows, forward,
           write Parquet (ColBERT float32, like the others);
  encode   BGEM3.encode (FlagEmbedding's API and output structures);
  flag     FlagEmbedding BGEM3FlagModel.encode (PyTorch, fp32);
  forward  Encoder.run over the batches `embed` plans, planned beforehand: the bare compiled forward (outputs
           fetched to the host). embed / forward - 1 is the streaming pipeline's overhead.
Peak RSS: `m3jax embed` on a tiny model over a .txt of N texts, a fresh process per N (VmHWM).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from m3jax.bench import alternated

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SETTINGS = dict(max_length=512, batch_size=256)
ENGINES = ("embed", "encode", "flag", "forward")
RSS_SCRIPT = """
import io, json, re, sys
from contextlib import redirect_stderr
from m3jax.embed import embed
log = io.StringIO()
with redirect_stderr(log):  # the summary line (compiled shapes), not the progress bar
    m = embed(sys.argv[1], sys.argv[2], sys.argv[3])
hwm = [l for l in open("/proc/self/status") if l.startswith("VmHWM:")][0].split()[1]
shapes = int(re.search(r"(\\d+) compiled shapes", log.getvalue()).group(1))
print(json.dumps({"rows": m["rows"], "tokens": m["tokens"], "peak_mib": int(hwm) / 1024, "shapes": shapes}))
"""


def texts_for(n: int, seed: int, max_words: int) -> list[str]:
    from tests.helpers import mixed

    return mixed(n, seed=seed, max_words=max_words)


def write_models(workdir: Path, quick: bool) -> Path:
    from m3jax.config import M3Config
    from m3jax.testing import write_random_release

    cfg = M3Config.tiny() if quick else M3Config.tiny(hidden_size=128, num_layers=4, num_heads=4,
                                                     intermediate_size=512, colbert_dim=128)
    return write_random_release(workdir / "release", cfg, seed=0)


def speed(workdir: Path, release: Path, texts: list[str], repeat: int, only: list[str] | None = None) -> dict:
    import torch
    from FlagEmbedding import BGEM3FlagModel

    from m3jax.api import BGEM3
    from m3jax.embed import EmbeddingReader, embed
    from m3jax.embed.planner import plan_windows

    m3 = BGEM3(release, dtype="float32", batch_size=SETTINGS["batch_size"], show_progress=False,
               compilation_cache=False)
    enc = m3.engine  # one Encoder (and one set of compiled shapes) under all three m3jax engines
    fe = BGEM3FlagModel(str(release), use_fp16=False, devices="cpu")
    heads = dict(return_dense=True, return_sparse=True, return_colbert_vecs=True)
    out_dir, src = workdir / "embed-out", workdir / "corpus.txt"
    src.write_text("".join(t + "\n" for t in texts), encoding="utf-8")

    def run_embed():
        shutil.rmtree(out_dir, ignore_errors=True)
        embed(src, enc, out_dir, quiet=True, colbert_dtype="float32", **SETTINGS)

    # The very batches `embed` runs: its windows (default 4,096 texts) planned over the same token ids.
    rows = [(None, t) for t in texts]
    batches = [b for s in range(0, len(rows), 4096)
               for w in plan_windows(enc, 0, s, rows[s:s + 4096], max_length=SETTINGS["max_length"],
                                     batch_size=SETTINGS["batch_size"], window_tokens=1 << 20) for b in w.batches]

    def run_forward():
        for _ in enc.run(batches):
            pass

    engines = {
        "embed": run_embed,
        "encode": lambda: m3.encode(texts, **SETTINGS, **heads),
        "flag": lambda: fe.encode(texts, **SETTINGS, **heads),
        "forward": run_forward,
    }
    assert set(engines) == set(ENGINES)
    times = alternated({k: f for k, f in engines.items() if not only or k in only}, repeat)
    # The outputs agree (random weights: the check is that all engines computed the same thing).
    if not out_dir.exists():
        run_embed()
    dense_embed = EmbeddingReader(out_dir).dense()
    dense_flag = np.asarray(fe.encode(texts, **SETTINGS, return_dense=True)["dense_vecs"], np.float32)
    dense_encode = m3.encode(texts, **SETTINGS)["dense_vecs"]
    tokens = int(sum(b.attention_mask.sum() for b in batches))  # filler rows hold 2 tokens each; negligible
    summary = {k: {"median_s": statistics.median(v), "min_s": min(v), "max_s": max(v), "runs_s": v,
                   "tokens_per_s": tokens / statistics.median(v)} for k, v in times.items()}
    return {"texts": len(texts), "tokens": tokens, "torch_threads": torch.get_num_threads(), "engines": summary,
            "embed_overhead_vs_forward": summary["embed"]["median_s"] / summary["forward"]["median_s"] - 1
            if {"embed", "forward"} <= set(summary) else None,
            "max_abs_dense_diff": {"embed_vs_flag": float(np.abs(dense_embed - dense_flag).max()),
                                   "encode_vs_flag": float(np.abs(dense_encode - dense_flag).max())}}


def peak_rss(workdir: Path, sizes: list[int]) -> list[dict]:
    from m3jax.random_weights import random_m3jax_dir

    tiny = random_m3jax_dir("tiny")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    out = []
    for n in sizes:
        src = workdir / f"corpus-{n}.txt"
        src.write_text("".join(t + "\n" for t in texts_for(n, seed=7, max_words=60)), encoding="utf-8")
        t = time.perf_counter()
        r = subprocess.run([sys.executable, "-c", RSS_SCRIPT, str(src), str(tiny), str(workdir / f"rss-out-{n}")],
                           capture_output=True, text=True, env=env)
        if r.returncode:
            raise SystemExit(r.stderr[-3000:])
        res = json.loads(r.stdout.splitlines()[-1])
        assert res["rows"] == n, res
        out.append({"texts": n, **res, "wall_s": time.perf_counter() - t})
        shutil.rmtree(workdir / f"rss-out-{n}")
    return out


def report(res: dict) -> str:
    s, lines = res["speed"], []
    if s:
        lines += speed_lines(s, res["model"])
    for r in res["rss"]:
        lines.append(f"m3jax embed peak RSS, {r['texts']:,} texts ({r['tokens']:,} tokens, tiny model): "
                     f"{r['peak_mib']:,.0f} MiB, {r['shapes']} compiled shapes ({r['wall_s']:.0f}s)")
    return "\n".join(lines)


def speed_lines(s: dict, model: str) -> list[str]:
    lines = [f"{s['texts']:,} texts, {s['tokens']:,} tokens, {model}; torch threads {s['torch_threads']}",
             f"{'engine':<8} {'median s':>9} {'min ... max s':>16} {'tokens/s':>10}"]
    for k, v in s["engines"].items():
        lines.append(f"{k:<8} {v['median_s']:>9.3f} {v['min_s']:>7.3f} ... {v['max_s']:<6.3f} "
                     f"{v['tokens_per_s']:>10,.0f}")
    if s["embed_overhead_vs_forward"] is not None:
        lines.append(f"m3jax embed overhead over the bare compiled forward: {s['embed_overhead_vs_forward']:+.1%}")
    lines.append(f"max |dense difference| vs FlagEmbedding: embed {s['max_abs_dense_diff']['embed_vs_flag']:.1e}, "
                 f"encode {s['max_abs_dense_diff']['encode_vs_flag']:.1e}")
    return lines


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny model, 48 texts, RSS at 200 and 400 texts")
    p.add_argument("--texts", type=int, default=None, help="texts timed (default 1,000; --quick 48)")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--rss-sizes", default=None, help="comma-separated corpus sizes (default 10000,100000)")
    p.add_argument("--parts", default="speed,rss", help="what to measure: speed, rss or both")
    p.add_argument("--workdir", default=None, help="scratch directory (default: a temporary one)")
    p.add_argument("--release", default=None,
                   help="time this release-layout checkpoint instead of the random small one (e.g. a full-size "
                        "random release written by m3jax.testing.write_random_release(DIR, M3Config()))")
    p.add_argument("--engines", default=None, help="comma-separated subset of embed,encode,flag,forward")
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args(argv)
    only = args.engines.split(",") if args.engines else None
    if set(only or ()) - set(ENGINES):
        p.error(f"--engines: unknown {sorted(set(only) - set(ENGINES))}; choose from {', '.join(ENGINES)}")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    n = args.texts or (48 if args.quick else 1000)
    sizes = [int(x) for x in (args.rss_sizes or ("200,400" if args.quick else "10000,100000")).split(",")]
    with tempfile.TemporaryDirectory(prefix="bench-embed-", dir=args.workdir) as tmp:
        workdir = Path(tmp)
        parts = set(args.parts.split(","))
        model = (f"release {args.release}" if args.release else "random tiny (2 layers, 32 wide)" if args.quick
                 else "random small (4 layers, 128 wide, real XLM-R vocabulary)")
        res = {"model": model,
               "speed": speed(workdir, Path(args.release) if args.release else write_models(workdir, args.quick),
                              texts_for(n, seed=1, max_words=120), args.repeat,
                              only) if "speed" in parts else None,
               "rss": peak_rss(workdir, sizes) if "rss" in parts else []}
    print(report(res))
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
