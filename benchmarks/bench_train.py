#!/usr/bin/env python
"""One M3 fine-tuning step, m3jax vs FlagEmbedding, on the same batches of the same random checkpoint.

    python benchmarks/bench_train.py                        # full size, fp32, CPU; 3 alternated rounds
    python benchmarks/bench_train.py --size tiny --steps 1 --repeats 1 --workdir /tmp/bt   # a quick check

Both sides take the step the M3 recipe takes (unified fine-tuning, self-distillation on, temperature 0.02): forward of
queries and passages, the loss (dense, sparse, ColBERT, ensemble, distillation), backward, gradient clipping to 1.0 and
AdamW (weight decay 0.01, not on biases and LayerNorm). FlagEmbedding: `EncoderOnlyEmbedderM3Model` around its
runner's model, torch.optim.AdamW; m3jax: the step fit() runs (`m3jax.train.loop.plan_step(...).step`: the jitted
accumulate_step, one micro-batch a step, donated buffers). Dropout is off on both sides so they do the same
arithmetic. Batches come from m3jax.train.TrainData over a JSON-lines file built from the built-in multilingual
sample (a passage is consecutive sample texts joined until it holds --passage-len words, so passages fill their
length as in real fine-tuning data; a query is the first words of its passage, negatives are other passages), padded
to one shape (the longest length bucket drawn), and both engines get the identical token arrays.

Denormals: XLA's CPU code flushes float32 denormals to zero; PyTorch's does not by default, and on a random
checkpoint (loss ~100 at temperature 0.02, softmax probabilities deep in the denormal range) some of its steps then
take ~10x longer (full size, this benchmark's batches: 378 and 330 s against 38 s). The benchmark therefore calls
torch.set_flush_denormal(True) so both engines do the same arithmetic at full speed; --torch-denormals keeps
PyTorch's default.

Each engine runs in its own process (peak RSS is its own, by VmHWM); engines are alternated and the round repeated
(--repeats); the first step of each process is reported apart (m3jax compiles there); the rest are timed one by one.
Figures: median step time and tokens/s (real query + passage tokens per step) with min-max over all timed steps of
all rounds, and the ratio of medians.
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
FLAGS = dict(unified_finetuning=True, use_self_distill=True, self_distill_start_step=0, temperature=0.02)
LEARNING_RATE, WEIGHT_DECAY, MAX_GRAD_NORM = 1e-5, 0.01, 1.0


def prepare(workdir: Path, size: str, passage_words: int) -> Path:
    """A random release-layout checkpoint and the training file; returns the checkpoint directory."""
    from m3jax.config import M3Config
    from m3jax.embed.sample import sample_corpus
    from m3jax.testing import write_random_release

    release = workdir / f"release-{size}"
    if not (release / "sparse_linear.pt").is_file():
        t = time.perf_counter()
        write_random_release(release, M3Config.bge_m3() if size == "full" else M3Config.tiny(), seed=0)
        print(f"wrote a random {size} release checkpoint in {time.perf_counter() - t:.0f}s", flush=True)
    texts = [r["text"] for r in sample_corpus()]
    passages = []
    for i in range(len(texts)):
        words: list[str] = []
        j = i
        while len(words) < passage_words:
            words += texts[j % len(texts)].split()
            j += 1
        passages.append(" ".join(words[:passage_words]))
    rng = random.Random(0)
    rows = []
    for i, text in enumerate(passages):
        negs = rng.sample([t for j, t in enumerate(passages) if j != i], 15)
        rows.append({"query": " ".join(text.split()[:8]), "pos": [text], "neg": negs})
    (workdir / "train.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return release


def batches(workdir: Path, release: Path, args) -> list[dict]:
    from m3jax.tokenizer import Tokenizer
    from m3jax.train.data import DataConfig, TrainData

    cfg = DataConfig(train_group_size=args.group_size, query_max_len=args.query_len,
                     passage_max_len=args.passage_len)
    data = TrainData(str(workdir / "train.jsonl"), Tokenizer(release), cfg, batch_size=args.batch_size, seed=0)
    out = []
    for b in data.epoch(0):
        out.append(b)
        if len(out) == args.steps + 1:
            break
    else:
        raise SystemExit(f"the training file holds fewer than {args.steps + 1} batches of {args.batch_size}")
    # One shape for every step (the longest bucket drawn), so that no timed m3jax step compiles.
    lq, lp = max(b["q_ids"].shape[1] for b in out), max(b["p_ids"].shape[1] for b in out)
    pad = lambda x, n, v: np.pad(x, ((0, 0), (0, n - x.shape[1])), constant_values=v)  # noqa: E731
    return [{"q_ids": pad(b["q_ids"], lq, data.pad_id), "q_mask": pad(b["q_mask"], lq, 0),
             "p_ids": pad(b["p_ids"], lp, data.pad_id), "p_mask": pad(b["p_mask"], lp, 0)} for b in out]


def engine_m3jax(release: Path, steps: list[dict], flush_denormal: bool = True) -> list[float]:
    del flush_denormal  # XLA's CPU code always flushes
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from m3jax.checkpoint import load_params
    from m3jax.model import model_from_params
    from m3jax.train import LossConfig, TrainConfig
    from m3jax.train.loop import plan_step
    from m3jax.train.sharding import make_mesh

    cfg, params, _ = load_params(release)
    _, state = nnx.split(model_from_params(cfg, params))
    del params
    config = TrainConfig(loss=LossConfig(**FLAGS), learning_rate=LEARNING_RATE, weight_decay=WEIGHT_DECAY,
                         max_grad_norm=MAX_GRAD_NORM, dropout=False)
    plan = plan_step(cfg, config, make_mesh(jax.devices()[:1]), len(steps))
    state, opt_state = plan.place(state)
    rng = jax.random.key_data(jax.random.PRNGKey(0))
    times = []
    for i, b in enumerate(steps):
        t = time.perf_counter()
        batches = {k: jnp.asarray(v)[None] for k, v in b.items()}  # one micro-batch per step: [1, rows, length]
        state, opt_state, m = plan.step(state, opt_state, batches, jnp.int32(i), rng)
        jax.block_until_ready((state, m))
        times.append(time.perf_counter() - t)
        print(f"m3jax step {i}: loss {float(m['loss']):.4f}, {times[-1]:.2f}s", file=sys.stderr, flush=True)
    return times


def engine_flag(release: Path, steps: list[dict], flush_denormal: bool = True) -> list[float]:
    import torch
    from FlagEmbedding.finetune.embedder.encoder_only.m3.modeling import EncoderOnlyEmbedderM3Model
    from FlagEmbedding.finetune.embedder.encoder_only.m3.runner import EncoderOnlyEmbedderM3Runner
    from transformers import AutoTokenizer

    if flush_denormal and not torch.set_flush_denormal(True):
        print("this CPU cannot flush denormals in PyTorch; running with its default", file=sys.stderr)
    base = EncoderOnlyEmbedderM3Runner.get_model(str(release))
    for module in base["model"].modules():  # dropout off, as on the m3jax side
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        if hasattr(module, "dropout_prob"):
            module.dropout_prob = 0.0
    model = EncoderOnlyEmbedderM3Model(base, tokenizer=AutoTokenizer.from_pretrained(str(release)), **FLAGS)
    model = model.float().train()
    named = list(model.named_parameters())
    decay = [p for n, p in named if not (n.endswith("bias") or "LayerNorm" in n)]
    no_decay = [p for n, p in named if n.endswith("bias") or "LayerNorm" in n]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": WEIGHT_DECAY}, {"params": no_decay,
                                                                               "weight_decay": 0.0}],
                            lr=LEARNING_RATE)
    times = []
    for i, b in enumerate(steps):
        q = {"input_ids": torch.from_numpy(b["q_ids"]).long(), "attention_mask": torch.from_numpy(b["q_mask"]).long()}
        p = {"input_ids": torch.from_numpy(b["p_ids"]).long(), "attention_mask": torch.from_numpy(b["p_mask"]).long()}
        t = time.perf_counter()
        model.step = i
        loss = model(queries=q, passages=p).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_GRAD_NORM)
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t)
        print(f"flag step {i}: loss {float(loss):.4f}, {times[-1]:.2f}s", file=sys.stderr, flush=True)
    return times


ENGINES = {"m3jax": engine_m3jax, "flag": engine_flag}


def run_engine(args) -> None:
    from m3jax.bench import peak_rss_gb

    workdir = Path(args.workdir)
    release = workdir / f"release-{args.size}"
    steps = batches(workdir, release, args)
    times = ENGINES[args.run_engine](release, steps, flush_denormal=not args.torch_denormals)
    tokens = [int(b["q_mask"].sum() + b["p_mask"].sum()) for b in steps]
    padded = [int(b["q_mask"].size + b["p_mask"].size) for b in steps]
    print("RESULT " + json.dumps({"engine": args.run_engine, "first_s": times[0], "step_s": times[1:],
                                  "tokens": tokens[1:], "padded_tokens": padded[1:],
                                  "peak_rss_gb": round(peak_rss_gb(), 2)}))


def report(results: list[dict], args) -> str:
    lines = [f"M3 fine-tuning step, {args.size} size, fp32, CPU: {args.batch_size} queries x {args.group_size} "
             f"passages, query/passage max {args.query_len}/{args.passage_len} tokens; median (min-max) over "
             f"{args.steps} timed steps x {args.repeats} rounds; PyTorch denormals "
             f"{'not flushed (its default)' if args.torch_denormals else 'flushed, as XLA does'}"]
    med = {}
    for name in dict.fromkeys(r["engine"] for r in results):
        rs = [r for r in results if r["engine"] == name]
        secs = [s for r in rs for s in r["step_s"]]
        tps = [t / s for r in rs for s, t in zip(r["step_s"], r["tokens"], strict=True)]
        first = [r["first_s"] for r in rs]
        rss = float(np.median([r["peak_rss_gb"] for r in rs]))
        med[name] = (float(np.median(secs)), float(np.median(tps)), rss)
        lines.append(f"  {name:<6} step {np.median(secs):7.2f}s ({min(secs):.2f}-{max(secs):.2f}), "
                     f"{np.median(tps):8.1f} tokens/s ({min(tps):.1f}-{max(tps):.1f}), first step "
                     f"{np.median(first):.1f}s, peak RSS {rss:.2f} GB")
    if "m3jax" in med and "flag" in med:
        (sm, tm, rm), (sf, tf, rf) = med["m3jax"], med["flag"]
        lines.append(f"  m3jax / FlagEmbedding: tokens/s {tm / tf:.2f}x (step time {sm / sf:.2f}x), "
                     f"peak RSS {rm / rf:.2f}x")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", default="/tmp/m3jax-bench-train")
    ap.add_argument("--size", choices=("full", "tiny"), default="full")
    ap.add_argument("--engines", default="m3jax,flag")
    ap.add_argument("--batch-size", type=int, default=2, help="queries per step")
    ap.add_argument("--group-size", type=int, default=4, help="passages per query (train_group_size)")
    ap.add_argument("--query-len", type=int, default=32)
    ap.add_argument("--passage-len", type=int, default=256)
    ap.add_argument("--steps", type=int, default=2, help="timed steps per process, after the first")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--torch-denormals", action="store_true",
                    help="keep PyTorch's default (denormals not flushed; much slower steps on random weights)")
    ap.add_argument("--json", help="also write the raw results here")
    ap.add_argument("--run-engine", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.run_engine:
        return run_engine(args)
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    prepare(workdir, args.size, args.passage_len)
    engines = args.engines.split(",")
    unknown = sorted(set(engines) - set(ENGINES))
    if unknown:
        raise SystemExit(f"unknown engine(s) {unknown}; expected some of {sorted(ENGINES)}")
    results = []
    for r in range(args.repeats):
        for name in engines if r % 2 == 0 else engines[::-1]:
            cmd = [sys.executable, __file__, "--run-engine", name] + [
                a for k, v in vars(args).items() if k not in ("run_engine", "json", "engines") and v is not None
                and not isinstance(v, bool) for a in (f"--{k.replace('_', '-')}", str(v))] + (
                ["--torch-denormals"] if args.torch_denormals else [])
            proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
            if proc.returncode:
                raise SystemExit(f"{name} (round {r + 1}) failed:\n{proc.stderr[-3000:]}")
            res = json.loads(next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))[7:])
            results.append(res)
            print(f"round {r + 1} {name}: steps {[round(s, 2) for s in res['step_s']]}s, "
                  f"peak RSS {res['peak_rss_gb']} GB", flush=True)
    text = report(results, args)
    print(text)
    if args.json:
        Path(args.json).write_text(json.dumps({"results": results, "report": text}, indent=1))


if __name__ == "__main__":
    main()
