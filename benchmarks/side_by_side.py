#!/usr/bin/env python
"""m3jax vs FlagEmbedding vs ONNX Runtime, in one run, on the same texts and the same random full-size checkpoint.

    python benchmarks/side_by_side.py                       # passages (32 x 64-512 tokens) and long (7,943 + 4,181)
    python benchmarks/side_by_side.py --workload passages --engines m3jax,flag,ort,m3jax-bf16

Each engine runs in its own process, one at a time, so peak RSS is its own; engines are alternated and the whole
round repeated (--repeats, default 3), and every figure is reported as the median with its spread (min-max): a
single run varies by +-30% on a shared 2-core machine. All compute all three outputs (dense, lexical weights,
ColBERT vectors) in float32 unless named -bf16 (m3jax in bfloat16, as use_fp16 selects on a CPU with bfloat16
instructions; its ratio to FlagEmbedding is reported only on such a CPU). Figures:
  end to end   what a user sees for encode() in a fresh process: tokenise, batch, forward, build outputs
               (m3jax: first call includes compiling or loading from the persistent cache; FlagEmbedding: includes
               its batch-size probe, a repeated forward of the longest batch);
  steady       a second encode() of the same texts in the same process;
  forward      model forward passes only, on the batches the engine forms (FlagEmbedding: its own length-sorted
               batches, without the probe), with the same clock around the same loop for every engine.
ONNX Runtime is skipped for the long workload by default: the reference measured a 23.7 GB peak there (unfused
[16, L, L] float32 attention), more than a 24 GB machine can spare.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from m3jax.bench import peak_rss_gb  # VmHWM: each engine process's own peak, not its parent's

ROOT = Path(__file__).resolve().parents[1]

BATCH = {"passages": 16, "long": 1}


# ------------------------------------------------------------------------------------------------ preparation
CONVERT = ("import sys; from m3jax.checkpoint import convert_release; from m3jax.bench import peak_rss_gb; "
           "convert_release(sys.argv[1], sys.argv[2], overwrite=True); print(peak_rss_gb())")


def prepare(workdir: Path, workloads: list[str], need_onnx: bool) -> dict:
    from m3jax.config import M3Config
    from m3jax.testing import write_random_release

    info = {}
    release, m3 = workdir / "release", workdir / "m3jax"
    if not (release / "sparse_linear.pt").is_file():
        t = time.perf_counter()
        write_random_release(release, M3Config.bge_m3(), seed=0)
        print(f"wrote random full-size release checkpoint in {time.perf_counter() - t:.0f}s", flush=True)
    if not (m3 / "m3jax.json").is_file():
        t = time.perf_counter()
        r = subprocess.run([sys.executable, "-c", CONVERT, str(release), str(m3)], capture_output=True, text=True)
        if r.returncode:
            raise SystemExit(r.stderr)
        info["convert_s"] = round(time.perf_counter() - t, 1)
        info["convert_peak_rss_gb"] = round(float(r.stdout.split()[-1]), 2)  # the child's own VmHWM
        print(f"converted to m3jax in {info['convert_s']}s, peak RSS {info['convert_peak_rss_gb']} GB", flush=True)
    if need_onnx and not (workdir / "onnx" / "model.onnx").is_file():
        t = time.perf_counter()
        export_onnx(release, workdir / "onnx")
        print(f"exported ONNX in {time.perf_counter() - t:.0f}s", flush=True)
    from m3jax.bench import make_texts, workload_lengths
    from m3jax.tokenizer import Tokenizer

    tok = Tokenizer(release)
    for w in workloads:
        f = workdir / f"texts-{w}.json"
        if not f.is_file():
            lengths, _ = workload_lengths(w)
            f.write_text(json.dumps(make_texts(lengths, tok), ensure_ascii=False))
    return info


def export_onnx(release: Path, dst: Path) -> None:
    """The whole BGE-M3 forward (encoder + three heads, normalised and masked as FlagEmbedding) as one graph."""
    import torch
    from FlagEmbedding import BGEM3FlagModel

    fe = BGEM3FlagModel(str(release), use_fp16=False, devices="cpu")
    inner = fe.model

    class Full(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.enc, self.colbert, self.sparse = inner.model, inner.colbert_linear, inner.sparse_linear

        def forward(self, input_ids, attention_mask):
            h = self.enc(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
            dense = torch.nn.functional.normalize(h[:, 0], dim=-1)
            sparse = torch.relu(self.sparse(h)).squeeze(-1)
            colbert = self.colbert(h[:, 1:]) * attention_mask[:, 1:, None].float()
            return dense, sparse, torch.nn.functional.normalize(colbert, dim=-1)

    dst.mkdir(parents=True, exist_ok=True)
    ids = torch.tensor([[0, 100, 200, 2]])
    with torch.no_grad():
        torch.onnx.export(Full().eval(), (ids, torch.ones_like(ids)), str(dst / "model.onnx"), dynamo=False,
                          input_names=["input_ids", "attention_mask"], output_names=["dense", "sparse", "colbert"],
                          dynamic_axes={"input_ids": {0: "b", 1: "t"}, "attention_mask": {0: "b", 1: "t"}},
                          opset_version=17)


# ---------------------------------------------------------------------------------------------------- engines
def padded_batches(tokenizer, texts, batch_size):
    """FlagEmbedding's batching: sort by length (descending), chunks of batch_size, pad to the longest."""
    enc = tokenizer(texts, truncation=True, max_length=8192)
    order = np.argsort([-len(x) for x in enc["input_ids"]], kind="stable")
    for s in range(0, len(texts), batch_size):
        idx = order[s:s + batch_size]
        yield tokenizer.pad({"input_ids": [enc["input_ids"][i] for i in idx]}, return_tensors="np")


def engine_m3jax(workdir, texts, batch_size, steady=True, dtype="float32", cold=False):
    """cold: start from an empty persistent compilation cache (what a first-time user sees)."""
    import shutil

    from m3jax.api import BGEM3

    cache = workdir / f"jax_cache-{dtype}"
    if cold:
        shutil.rmtree(cache, ignore_errors=True)
    t = time.perf_counter()
    m = BGEM3.from_pretrained(workdir / "m3jax", dtype=dtype, batch_size=batch_size, compilation_cache=str(cache))
    load = time.perf_counter() - t
    kw = dict(max_length=8192, heads=("dense", "sparse", "colbert"), show_progress=False)
    t = time.perf_counter()
    res = m.encode_padded(texts, **kw)
    _ = res.lexical_dicts(), res.colbert_list()
    first = time.perf_counter() - t
    steady_s = None
    if steady:
        t = time.perf_counter()
        res = m.encode_padded(texts, **kw)
        _ = res.lexical_dicts(), res.colbert_list()
        steady_s = time.perf_counter() - t
    # Forward only: the compiled executables on ready batches.
    import jax

    batches, _, _ = m.batches(texts, batch_size=batch_size, max_length=8192)
    t = time.perf_counter()
    for b in batches:
        jax.block_until_ready(m.executable(b.input_ids.shape[1], b.input_ids.shape[0])(m.state, b.input_ids,
                                                                                       b.attention_mask))
    forward = time.perf_counter() - t
    np.savez(workdir / f"out-m3jax-{dtype}.npz", dense=res.dense, sparse_ids=res.sparse_ids,
             sparse_weights=res.sparse_weights, colbert=res.colbert, colbert_mask=res.colbert_mask)
    compile_s = {f"{L}x{r}": round(s, 2) for (L, r, _), s in m.compile_seconds.items()}
    return dict(load_s=load, first_s=first, steady_s=steady_s, forward_s=forward, compile_s=compile_s,
                padded_tokens=int(sum(b.input_ids.size for b in batches)))


def engine_flag(workdir, texts, batch_size, steady=True):
    import torch
    from FlagEmbedding import BGEM3FlagModel

    t = time.perf_counter()
    fe = BGEM3FlagModel(str(workdir / "release"), use_fp16=False, devices="cpu")
    load = time.perf_counter() - t
    kw = dict(batch_size=batch_size, max_length=8192, return_dense=True, return_sparse=True,
              return_colbert_vecs=True)
    t = time.perf_counter()
    out = fe.encode(texts, **kw)
    first = time.perf_counter() - t
    steady_s = None
    if steady:
        t = time.perf_counter()
        fe.encode(texts, **kw)
        steady_s = time.perf_counter() - t
    t = time.perf_counter()
    padded = 0
    with torch.no_grad():
        for b in padded_batches(fe.tokenizer, texts, batch_size):
            inputs = {k: torch.from_numpy(v) for k, v in b.items()}
            padded += inputs["input_ids"].numel()
            fe.model(inputs, return_dense=True, return_sparse=True, return_colbert_vecs=True)
    forward = time.perf_counter() - t
    np.save(workdir / "out-flag-dense.npy", out["dense_vecs"])
    return dict(load_s=load, first_s=first, steady_s=steady_s, forward_s=forward, padded_tokens=padded,
                threads=torch.get_num_threads())


def engine_ort(workdir, texts, batch_size, steady=True):
    import onnxruntime as ort
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(workdir / "release")
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = os.cpu_count()
    t = time.perf_counter()
    sess = ort.InferenceSession(str(workdir / "onnx" / "model.onnx"), opts, providers=["CPUExecutionProvider"])
    load = time.perf_counter() - t

    def encode():
        fwd, padded, dense = 0.0, 0, []
        for b in padded_batches(tok, texts, batch_size):
            feeds = {k: b[k].astype(np.int64) for k in ("input_ids", "attention_mask")}
            padded += b["input_ids"].size
            t0 = time.perf_counter()
            d, s, c = sess.run(None, feeds)
            fwd += time.perf_counter() - t0
            n = b["attention_mask"].sum(1)
            for i in range(len(d)):  # the same per-text outputs FlagEmbedding builds
                ids = b["input_ids"][i, : n[i]]
                keep = (~np.isin(ids, [0, 1, 2, 3])) & (s[i, : n[i]] > 0)
                dict(zip(ids[keep].astype(str).tolist(), s[i, : n[i]][keep], strict=True))
                c[i, : n[i] - 1].copy()
            dense.append(d)
        return fwd, padded

    t = time.perf_counter()
    forward, padded = encode()
    first = time.perf_counter() - t
    steady_s = None
    if steady:
        t = time.perf_counter()
        encode()
        steady_s = time.perf_counter() - t
    return dict(load_s=load, first_s=first, steady_s=steady_s, forward_s=forward, padded_tokens=padded)


ENGINES = {"m3jax": functools.partial(engine_m3jax, cold=True), "m3jax-warm": engine_m3jax,
           "m3jax-bf16": functools.partial(engine_m3jax, dtype="bfloat16", cold=True),
           "flag": engine_flag, "ort": engine_ort}


def run_engine(args) -> None:
    workdir = Path(args.workdir)
    texts = json.loads((workdir / f"texts-{args.workload}.json").read_text())
    from m3jax.tokenizer import Tokenizer

    tokens = int(sum(len(x) for x in Tokenizer(workdir / "release").encode(texts, 8192)[0]))
    res = ENGINES[args.run_engine](workdir, texts, BATCH[args.workload], steady=args.workload == "passages")
    res.update(engine=args.run_engine, workload=args.workload, texts=len(texts), tokens=tokens,
               peak_rss_gb=round(peak_rss_gb(), 2))
    print("RESULT " + json.dumps(res))


# --------------------------------------------------------------------------------------------------- report
def bf16_accuracy(workdir: Path) -> dict:
    a, b = np.load(workdir / "out-m3jax-float32.npz"), np.load(workdir / "out-m3jax-bfloat16.npz")
    cos = (a["dense"] * b["dense"]).sum(-1)
    va = _sparse_dense(a)
    vb = _sparse_dense(b)
    return {"dense_cos_min": float(cos.min()), "dense_max_abs": float(np.abs(a["dense"] - b["dense"]).max()),
            "sparse_max_abs": float(np.abs(va - vb).max()),
            "colbert_max_abs": float(np.abs(a["colbert"] - b["colbert"]).max()),
            "colbert_cos_min": float(((a["colbert"] * b["colbert"]).sum(-1))[a["colbert_mask"]].min())}


def _sparse_dense(d) -> np.ndarray:
    out = np.zeros((len(d["sparse_ids"]), 250002), np.float32)
    for i, (ids, w) in enumerate(zip(d["sparse_ids"], d["sparse_weights"], strict=True)):
        out[i, ids[ids >= 0]] = w[ids >= 0]
    return out


def _stats(values: list[float]) -> tuple[float, float, float]:
    return float(np.median(values)), float(min(values)), float(max(values))


def report(results: list[dict]) -> str:
    """Per workload and engine: median tokens/s (min-max over the repeats) and ratios of medians."""
    lines = []
    for w in dict.fromkeys(r["workload"] for r in results):
        runs: dict[str, list[dict]] = {}
        for r in results:
            if r["workload"] == w:
                runs.setdefault(r["engine"], []).append(r)
        any_r = next(iter(runs.values()))[0]
        lines.append(f"\n{w}: {any_r['texts']} texts, {any_r['tokens']} tokens, batch {BATCH[w]}, all three outputs; "
                     "tokens/s as median (min-max) over the runs")
        lines.append(f"  {'engine':<11}{'runs':>5}{'end-to-end':>24}{'steady':>24}{'forward':>24}{'peak RSS':>10}")
        med = {}
        for name, rs in runs.items():
            cells = []
            for k in ("first_s", "steady_s", "forward_s"):
                vals = [r["tokens"] / r[k] for r in rs if r.get(k)]
                if vals:
                    m, lo, hi = _stats(vals)
                    med[name, k] = m
                    cells.append(f"{m:.1f} ({lo:.1f}-{hi:.1f})")
                else:
                    cells.append("-")
            rss = _stats([r["peak_rss_gb"] for r in rs])[0]
            med[name, "rss"] = rss
            lines.append(f"  {name:<11}{len(rs):>5}" + "".join(f"{c:>24}" for c in cells) + f"{rss:>9.2f}G")
        from m3jax.engine import cpu_has_bf16

        if "m3jax-bf16" in runs and not cpu_has_bf16():
            lines.append("  m3jax-bf16 / flag: not reported, this CPU has no bfloat16 instructions (AVX512-BF16, AMX, "
                         "ARM BF16), so bfloat16 is not what m3jax computes in here")
        for ours in ("m3jax", "m3jax-warm", "m3jax-bf16"):
            if ours == "m3jax-bf16" and not cpu_has_bf16():
                continue
            for base in ("flag", "ort"):
                if ours in runs and base in runs:
                    ratios = [f"{k.removesuffix('_s')} {med[ours, k] / med[base, k]:.2f}x"
                              for k in ("first_s", "steady_s", "forward_s") if (ours, k) in med and (base, k) in med]
                    lines.append(f"  {ours} / {base} (ratio of median tokens/s): " + ", ".join(ratios)
                                 + f"; peak RSS {med[ours, 'rss'] / med[base, 'rss']:.2f}x")
        for name in ("m3jax", "m3jax-warm"):
            if name in runs:
                lines.append(f"  {name} compile per bucket (s), last run: {runs[name][-1]['compile_s']}")
        if ("m3jax-bf16", "forward_s") in med and ("m3jax", "forward_s") in med:
            speed = med["m3jax-bf16", "forward_s"] / med["m3jax", "forward_s"]
            lines.append(f"  bf16 / f32 m3jax forward: {speed:.2f}x")
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workload", default="all", choices=["all", "passages", "long"])
    p.add_argument("--engines", default="m3jax,m3jax-warm,flag,ort,m3jax-bf16",
                   help="m3jax-warm: a second m3jax process, served by the persistent compilation cache")
    p.add_argument("--workdir", default=str(Path(os.environ.get("M3JAX_HOME", Path.home() / ".cache" / "m3jax"))
                                            / "side_by_side"))
    p.add_argument("--ort-long", action="store_true", help="also run ONNX Runtime on the long documents")
    p.add_argument("--repeats", type=int, default=3, help="rounds; each round runs every engine once, in turn")
    p.add_argument("--run-engine", default=None, help=argparse.SUPPRESS)
    p.add_argument("--json", default=None, help="write all results here")
    args = p.parse_args()
    if args.run_engine:
        return run_engine(args)
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    workloads = ["passages", "long"] if args.workload == "all" else [args.workload]
    engines = args.engines.split(",")
    info = prepare(workdir, workloads, "ort" in engines)
    results = []
    if "ort" in engines and "long" in workloads and not args.ort_long:
        print("skipping ort on long: the reference measured a 23.7 GB peak (pass --ort-long to try)")
    for w in workloads:
        for rnd, e in ((rnd, e) for rnd in range(args.repeats) for e in engines):
            if e == "ort" and w == "long" and not args.ort_long:
                continue
            print(f"round {rnd + 1}/{args.repeats}: running {e} on {w} ...", flush=True)
            r = subprocess.run([sys.executable, __file__, "--run-engine", e, "--workload", w, "--workdir",
                                str(workdir)], capture_output=True, text=True)
            line = [x for x in r.stdout.splitlines() if x.startswith("RESULT ")]
            if r.returncode or not line:
                print(f"  {e} failed:\n{r.stderr[-3000:]}", flush=True)
                continue
            results.append(dict(json.loads(line[-1][7:]), round=rnd))
            print(f"  {json.dumps(results[-1])}", flush=True)
        if "m3jax-bf16" in engines and "m3jax" in engines:
            acc = bf16_accuracy(workdir)
            print(f"  bf16 vs f32 accuracy ({w}): {acc}", flush=True)
            info[f"bf16_accuracy_{w}"] = acc
    print(report(results))
    if info:
        print(f"\npreparation: {info}")
    if args.json:
        Path(args.json).write_text(json.dumps({"results": results, "info": info}, indent=2))


if __name__ == "__main__":
    main()
