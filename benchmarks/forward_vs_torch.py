#!/usr/bin/env python
"""The bare encoder forward, m3jax (compiled, under XLA compiler options) vs PyTorch's XLMRobertaModel (SDPA), in one
process on the same random full-width weights and the same token ids, alternated and repeated.

    python benchmarks/forward_vs_torch.py                          # 2 layers: passages 16 x 512, long 1 x 8,192
    python benchmarks/forward_vs_torch.py --layers 24 --repeats 5
    python benchmarks/forward_vs_torch.py --workloads 8x1024,4x2048 --options \
        '{"m3jax": null, "xla": {}, "eigen": {"xla_cpu_experimental_ynn_fusion_type": ""}}'
    python benchmarks/forward_vs_torch.py --dtype bfloat16         # m3jax in bfloat16, torch in float32

A variant's options null are m3jax's own choice, as Encoder makes it (m3jax.engine.compile_plan: Eigen's dots and the
feed-forward in column blocks up to CPU_EIGEN_MAX_LENGTH tokens on CPU, XLA's defaults beyond); a dict, those XLA
options, with the feed-forward in column blocks where they select Eigen's dots, as in Encoder.

Layers scan in m3jax and loop in torch, so per-layer cost is what is compared; a few layers give the ratio of the
full model in a fraction of the time. Both return the last hidden state (no heads). Figures: median seconds per
forward (min-max over --repeats), achieved GFLOP/s (2·tokens·12·D² per layer for the projections and the MLP plus
4·B·T²·D for attention), and torch's median over each m3jax variant's (above 1: m3jax is faster).
"""

from __future__ import annotations

import argparse
import dataclasses
import json

import numpy as np

WORKLOADS = {"passages": (16, 512), "long": (1, 8192), "check": (2, 64)}  # check: the CI smoke run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--workloads", default="passages,long",
                    help=f"comma-separated names ({', '.join(WORKLOADS)}) or shapes ROWSxLENGTH, e.g. 8x1024")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--options", default='{"m3jax": null}',
                    help="JSON {name: XLA compiler options, null for m3jax's default}; every variant is timed")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                    help="m3jax's compute dtype (torch runs float32, as FlagEmbedding on CPU)")
    args = ap.parse_args()

    import jax
    import torch
    from flax import nnx
    from transformers import XLMRobertaConfig, XLMRobertaModel

    from m3jax.bench import alternated, print_alternated
    from m3jax.config import M3Config
    from m3jax.engine import compile_plan
    from m3jax.model import init_model

    cfg = dataclasses.replace(M3Config.bge_m3(), num_layers=args.layers)
    graphdef, state = nnx.split(init_model(cfg, dtype=args.dtype, seed=0))
    tcfg = XLMRobertaConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, num_hidden_layers=args.layers,
                            num_attention_heads=cfg.num_heads, intermediate_size=cfg.intermediate_size,
                            max_position_embeddings=cfg.max_position_embeddings, attn_implementation="sdpa")
    tm = XLMRobertaModel(tcfg, add_pooling_layer=False).eval()  # its own random weights: same shapes, same work
    variants = json.loads(args.options)
    print(f"{args.layers} layers of BGE-M3 (hidden {cfg.hidden_size}), m3jax {args.dtype}, torch float32, "
          f"jax {jax.__version__} ({jax.default_backend()}), "
          f"torch {torch.__version__} ({torch.get_num_threads()} threads)")
    for w in args.workloads.split(","):
        b, t = WORKLOADS[w] if w in WORKLOADS else map(int, w.split("x"))
        ids = np.random.default_rng(0).integers(5, 1000, (b, t)).astype(np.int32)
        ids[:, 0] = 0
        mask = np.ones((b, t), np.int32)
        runs = {}
        platform = jax.default_backend()
        for name, opts in variants.items():
            opts, proj = compile_plan(platform, t, opts, args.dtype)
            fwd = jax.jit(lambda s, i, m, p=proj: nnx.merge(graphdef, s)(i, m, projections=p).last_hidden_state)
            runs[name] = fwd.lower(state, ids, mask).compile(compiler_options=opts or None)
        tids, tmask = torch.from_numpy(ids.astype(np.int64)), torch.from_numpy(mask)

        def torch_forward(tids=tids, tmask=tmask):
            with torch.inference_mode():
                tm(input_ids=tids, attention_mask=tmask)

        calls = {name: (lambda c=c, i=ids, m=mask: c(state, i, m).block_until_ready()) for name, c in runs.items()}
        calls["torch"] = torch_forward
        flops = args.layers * (2 * b * t * 12 * cfg.hidden_size ** 2 + 4 * b * t * t * cfg.hidden_size)
        print_alternated(f"{w}: {b} x {t} tokens", alternated(calls, args.repeats), flops)

if __name__ == "__main__":
    main()
