#!/usr/bin/env python
"""CPU attention alone: m3jax's XLA paths ("tiled", the CPU default, and "chunked") against PyTorch's fused SDPA, in
one process on the same q, k, v (16 heads of 64, as BGE-M3), alternated and repeated.

    python benchmarks/attention_cpu.py                             # 1 x 8,064 and 16 x 512 tokens, logit scales 1, 3
    python benchmarks/attention_cpu.py --workloads 1x4096 --scales 1 --repeats 5

q, k, v are standard normal times --scales: at 1 every head's Cauchy-Schwarz bound lets "tiled" take exp without
the max shift; at 3 (logits of standard deviation 9, up to ~50) it may not, and takes its shifted softmax.
Figures: median seconds (min-max over --repeats) and GFLOP/s (4·B·T²·N·H).
"""

from __future__ import annotations

import argparse

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workloads", default="1x8064,16x512", help="comma-separated ROWSxLENGTH")
    ap.add_argument("--scales", default="1,3", help="comma-separated scales of q, k, v")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    import jax
    import jax.numpy as jnp
    import torch

    from m3jax.attention import attention
    from m3jax.bench import alternated, print_alternated

    impls = ["tiled", "chunked"]
    print(f"jax {jax.__version__}, torch {torch.__version__} ({torch.get_num_threads()} threads)")
    n, h = 16, 64
    for w in args.workloads.split(","):
        b, t = map(int, w.split("x"))
        for scale in map(float, args.scales.split(",")):
            rng = np.random.default_rng(0)
            q, k, v = (rng.standard_normal((b, t, n, h), dtype=np.float32) * scale for _ in range(3))
            mask = np.ones((b, t), bool)
            mask[1:, t // 2:] = False  # rows after the first half padded, as a length-sorted batch has
            args_j = tuple(map(jnp.asarray, (q, k, v, mask)))
            calls = {}
            for impl in impls:
                f = jax.jit(lambda *a, impl=impl: attention(*a, impl=impl))
                calls[impl] = lambda f=f, a=args_j: f(*a).block_until_ready()
            tq, tk, tv = (torch.from_numpy(x).transpose(1, 2) for x in (q, k, v))
            tmask = torch.from_numpy(mask)[:, None, None, :]

            def sdpa(tq=tq, tk=tk, tv=tv, tmask=tmask):
                with torch.inference_mode():
                    torch.nn.functional.scaled_dot_product_attention(tq, tk, tv, attn_mask=tmask)

            calls["torch"] = sdpa
            print_alternated(f"{b} x {t} tokens, scale {scale:g}", alternated(calls, args.repeats),
                             4 * b * t * t * n * h)

if __name__ == "__main__":
    main()
