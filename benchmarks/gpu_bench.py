#!/usr/bin/env python
"""GPU benchmark, prepared for one NVIDIA H200 run (the encoding part finishes within 8 minutes there; the train
steps, added later, have not run on a GPU yet: `--train-only` runs them alone):

    bash benchmarks/gpu.sh            # on the GPU machine; writes gpu_bench.json to $OUT (or the current folder)
    python benchmarks/gpu_bench.py --check-on-cpu   # the same code path on a tiny model, on CPU (tested in CI)

Measures m3jax in bfloat16 at 512 and at 8,192 tokens per text (tokens/s and the fraction of the ~790 TFLOP/s
bf16 peak measured on this workplace's H200s), and FlagEmbedding's BGEM3FlagModel in fp16 on the same GPU and the
same texts, all three outputs. Checkpoint: random full-size weights in the release layout, written on the spot.
Then fine-tuning: fit's step function (m3jax.train.step.accumulate_step) in bfloat16 over float32 master weights,
with per-layer rematerialisation and dropout, unified fine-tuning with self-distillation, on 512-token passages
(16 queries x 4 passages) and on 8,192-token passages (2 x 2): step time, tokens/s, model FLOP/s (3x the forward;
remat's recomputation not counted) and peak device memory.
If FlagEmbedding cannot be imported (the GPU image ships transformers 5, which FlagEmbedding 1.4.2 does not
support), it times the same torch computation FlagEmbedding runs (XLMRobertaModel + both heads, fp16) and says so.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PEAK = 790e12


def m3jax_run(path, texts, batch_size, dtype, repeat):
    import jax

    from m3jax.api import BGEM3
    from m3jax.bench import forward_flops

    model = BGEM3.from_pretrained(path, dtype=dtype, batch_size=batch_size, compilation_cache=False)
    max_length = model.config.max_length
    batches, lengths, _ = model.batches(texts, batch_size=batch_size, max_length=max_length)
    for b in batches:  # compile every shape first
        model.executable(b.input_ids.shape[1], b.input_ids.shape[0])
    model.encode_padded(texts, batch_size=batch_size, max_length=max_length, show_progress=False)  # warm-up
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        res = model.encode_padded(texts, batch_size=batch_size, max_length=max_length, show_progress=False)
        times.append(time.perf_counter() - t)
    best = min(times)
    flops = forward_flops(model.config, [(b.input_ids.shape[1], b.input_ids.shape[0]) for b in batches])
    out = {"tokens_per_s": round(float(lengths.sum()) / best, 1), "seconds": round(best, 4),
           "achieved_tflops": round(flops / best / 1e12, 2), "fraction_of_peak": round(flops / best / PEAK, 4),
           "compile_s": {f"{L}x{r}": round(s, 2) for (L, r, _), s in model.compile_seconds.items()},
           "backend": jax.default_backend(), "attn": [model.attn_impl]}
    if jax.default_backend() == "gpu":
        stats = model.devices[0].memory_stats() or {}
        out["device_peak_gb"] = round(stats.get("peak_bytes_in_use", 0) / 2**30, 2)
    return out, res.dense


def flag_run(path, texts, batch_size, device, half, repeat):
    import torch

    try:
        from FlagEmbedding import BGEM3FlagModel

        fe = BGEM3FlagModel(str(path), use_fp16=half, devices=device)
        label = "FlagEmbedding BGEM3FlagModel"

        def encode():
            return fe.encode(texts, batch_size=batch_size, max_length=8192, return_dense=True, return_sparse=True,
                             return_colbert_vecs=True)["dense_vecs"]
    except Exception as e:  # noqa: BLE001 - report and time the same computation directly
        label = f"torch equivalent of FlagEmbedding ({type(e).__name__}: {str(e)[:120]})"
        encode = _torch_equivalent(path, texts, batch_size, device, half)
    encode()  # warm-up (and FlagEmbedding's own batch-size probe)
    times = []
    for _ in range(repeat):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t = time.perf_counter()
        dense = encode()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return {"engine": label, "seconds": round(min(times), 4)}, np.asarray(dense, np.float32)


def _torch_equivalent(path, texts, batch_size, device, half):
    import torch
    from transformers import AutoTokenizer, XLMRobertaModel

    dtype = torch.float16 if half else torch.float32
    tok = AutoTokenizer.from_pretrained(path)
    enc = XLMRobertaModel.from_pretrained(path, torch_dtype=dtype).to(device).eval()
    heads = {n: torch.load(Path(path) / f"{n}.pt", weights_only=True) for n in ("colbert_linear", "sparse_linear")}
    colbert = torch.nn.Linear(*heads["colbert_linear"]["weight"].shape[::-1]).to(device, dtype)
    sparse = torch.nn.Linear(*heads["sparse_linear"]["weight"].shape[::-1]).to(device, dtype)
    colbert.load_state_dict(heads["colbert_linear"])
    sparse.load_state_dict(heads["sparse_linear"])
    order = np.argsort([-len(t) for t in texts], kind="stable")

    @torch.no_grad()
    def encode():
        dense = [None] * len(texts)
        for s in range(0, len(texts), batch_size):
            idx = order[s:s + batch_size]
            b = tok([texts[i] for i in idx], padding=True, truncation=True, max_length=8192, return_tensors="pt")
            b = b.to(device)
            h = enc(**b).last_hidden_state
            d = torch.nn.functional.normalize(h[:, 0], dim=-1)
            torch.relu(sparse(h)).squeeze(-1).cpu()
            torch.nn.functional.normalize(colbert(h[:, 1:]) * b["attention_mask"][:, 1:, None], dim=-1).cpu()
            for j, i in enumerate(idx):
                dense[i] = d[j].float().cpu().numpy()
        return np.stack(dense)

    return encode


def train_run(cfg, query_len, passage_len, queries, group, repeat, on_cpu):
    """One compiled train step (bf16 compute, fp32 masters, remat, dropout, AdamW): the best of `repeat` steps."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from m3jax.bench import forward_flops
    from m3jax.model import abstract_model, init_model
    from m3jax.train.loss import LossConfig
    from m3jax.train.step import OptimConfig, accumulate_step, make_optimizer

    flags = LossConfig(unified_finetuning=True, use_self_distill=True, self_distill_start_step=0)
    skeleton = abstract_model(cfg, dtype="bfloat16")
    skeleton.encoder.remat = True
    graphdef = nnx.split(skeleton)[0]
    state = nnx.split(init_model(cfg, seed=0))[1]  # float32 master weights
    tx = make_optimizer(state, flags, OptimConfig(num_training_steps=100, learning_rate=1e-5, warmup_ratio=0.1))
    opt_state = tx.init(state)
    rng = np.random.default_rng(0)
    n = queries * group
    batch = {"q_ids": rng.integers(5, 200_000, (1, queries, query_len)).astype(np.int32),
             "q_mask": np.ones((1, queries, query_len), np.int32),
             "p_ids": rng.integers(5, 200_000, (1, n, passage_len)).astype(np.int32),
             "p_mask": np.ones((1, n, passage_len), np.int32)}
    batch = {k: jnp.asarray(np.minimum(v, cfg.vocab_size - 1) if k.endswith("ids") else v) for k, v in batch.items()}
    key = jax.random.PRNGKey(0)
    step = functools.partial(accumulate_step, graphdef, flags=flags, tx=tx, compute_dtype="bfloat16")
    t = time.perf_counter()
    compiled = jax.jit(step, donate_argnums=(0, 1)).lower(state, opt_state, batch, jnp.int32(0), key).compile()
    compile_s = time.perf_counter() - t
    times, losses = [], []
    for i in range(repeat + 1):  # the first step warms up
        t = time.perf_counter()
        state, opt_state, m = compiled(state, opt_state, batch, jnp.int32(i), key)
        losses.append(float(m["loss"]))  # waits for the step
        times.append(time.perf_counter() - t)
    best = min(times[1:])
    tokens = queries * query_len + n * passage_len
    flops = 3 * forward_flops(cfg, [(query_len, queries), (passage_len, n)])
    out = {"query_len": query_len, "passage_len": passage_len, "queries": queries, "group": group,
           "tokens": tokens, "step_s": round(best, 4), "tokens_per_s": round(tokens / best, 1),
           "model_tflops": round(flops / best / 1e12, 2), "fraction_of_peak": round(flops / best / PEAK, 4),
           "compile_s": round(compile_s, 1), "losses": [round(x, 4) for x in losses],
           "temp_gb": round(compiled.memory_analysis().temp_size_in_bytes / 2**30, 3)}
    if not on_cpu:
        stats = jax.devices()[0].memory_stats() or {}
        out["device_peak_gb"] = round(stats.get("peak_bytes_in_use", 0) / 2**30, 2)
    assert all(np.isfinite(losses)), f"non-finite training loss {losses}"
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--check-on-cpu", action="store_true", help="tiny model, short texts, CPU: checks the code path")
    p.add_argument("--out", default=os.environ.get("OUT", "."))
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--train-only", action="store_true", help="only the train-step benchmark")
    args = p.parse_args()

    from m3jax.bench import make_texts
    from m3jax.config import M3Config
    from m3jax.testing import write_random_release
    from m3jax.tokenizer import Tokenizer

    cpu = args.check_on_cpu
    cfg = M3Config.tiny() if cpu else M3Config.bge_m3()
    workdir = Path(tempfile.mkdtemp(prefix="m3jax-gpu-bench-"))
    t = time.perf_counter()
    release = write_random_release(workdir / "release", cfg, seed=0)
    print(f"random {'tiny' if cpu else 'full-size'} checkpoint written in {time.perf_counter() - t:.0f}s", flush=True)
    tok = Tokenizer(release)
    # (text length, number of texts, batch size): 512 x 256 and 8,192 x 16, 131,072 tokens each.
    workloads = [(64, 8, 8), (512, 4, 4)] if cpu else [(512, 256, 64), (8192, 16, 4)]
    results = {"device": "cpu (check)" if cpu else "gpu", "peak_tflops": PEAK / 1e12, "workloads": [], "train": []}
    for length, n, bs in [] if args.train_only else workloads:
        texts = make_texts([length] * n, tok, seed=length)
        tokens = sum(len(x) for x in tok.encode(texts, 8192)[0])
        ours, dense = m3jax_run(release, texts, bs, "float32" if cpu else "bfloat16", args.repeat)
        theirs, dense_ref = flag_run(release, texts, bs, "cpu" if cpu else "cuda:0", not cpu, args.repeat)
        theirs["tokens_per_s"] = round(tokens / theirs["seconds"], 1)
        cos = float((dense * dense_ref).sum(-1).min())
        row = {"length": length, "texts": n, "tokens": tokens, "m3jax": ours, "flag": theirs,
               "m3jax_over_flag": round(theirs["seconds"] / ours["seconds"], 2), "min_dense_cosine": cos}
        results["workloads"].append(row)
        print(json.dumps(row), flush=True)
        assert cos > (0.999 if cpu else 0.99), f"m3jax and FlagEmbedding disagree: min dense cosine {cos}"
    # (query length, passage length, queries, group size): 512- and 8,192-token passages, 32,768 passage tokens each.
    # The CPU check compiles one of them (the step's code is the same; each compile takes ~25 s of CI's time).
    train_loads = [(16, 64, 2, 2)] if cpu else [(64, 512, 16, 4), (512, 8192, 2, 2)]
    for q_len, p_len, queries, group in train_loads:
        row = train_run(cfg, q_len, p_len, queries, group, args.repeat, cpu)
        results["train"].append(row)
        print(json.dumps({"train": row}), flush=True)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "gpu_bench.json").write_text(json.dumps(results, indent=2))
    for r in results["workloads"]:
        print(f"{r['length']:>5} tokens x {r['texts']}: m3jax {r['m3jax']['tokens_per_s']:.0f} tok/s "
              f"({100 * r['m3jax']['fraction_of_peak']:.1f}% of {PEAK / 1e12:.0f} TFLOP/s), "
              f"flag {r['flag']['tokens_per_s']:.0f} tok/s, ratio {r['m3jax_over_flag']}x, "
              f"dense cosine >= {r['min_dense_cosine']:.4f}")
    for r in results["train"]:
        print(f"train step, {r['passage_len']:>5}-token passages ({r['queries']} x {r['group']}), bf16 + remat: "
              f"{r['step_s']:.3f} s, {r['tokens_per_s']:.0f} tok/s, {r['model_tflops']} TFLOP/s "
              f"({100 * r['fraction_of_peak']:.1f}% of peak), peak {r.get('device_peak_gb', '-')} GB")


if __name__ == "__main__":
    main()
