"""Command line: `m3jax demo | convert | export | bench | embed` (also `python -m m3jax ...`)."""

from __future__ import annotations

import argparse
import logging
import sys
import time

DEMO_TEXTS = [
    "What is BGE M3?",
    "BGE M3 is an embedding model supporting dense retrieval, lexical matching and multi-vector interaction.",
    "Defination of BM25",
    "BM25 is a bag-of-words retrieval function that ranks a set of documents based on the query terms.",
    "北京是中华人民共和国的首都。",
    "Берлин — столица Германии.",
]


def demo(args) -> int:
    import numpy as np

    from m3jax.api import BGEM3
    from m3jax.checkpoint import HubUnavailableError

    label = args.model
    try:
        if args.random:
            raise HubUnavailableError("--random given")
        model = BGEM3.from_pretrained(args.model, dtype=args.dtype)
    except HubUnavailableError as e:
        size = args.random_size
        print(f"{args.model}: not available ({str(e).split('. ')[0]}); running on a randomly initialised "
              f"{size} checkpoint written locally: RANDOM WEIGHTS, meaningless numbers, real pipeline.")
        from m3jax.testing import random_m3jax_dir

        path = random_m3jax_dir(size)
        model = BGEM3.from_pretrained(path, dtype=args.dtype)
        label = f"random {size} ({path})"
    t0 = time.perf_counter()
    out = model.encode(DEMO_TEXTS, return_dense=True, return_sparse=True, return_colbert_vecs=True)
    elapsed = time.perf_counter() - t0
    np.set_printoptions(precision=4, suppress=True, linewidth=120)
    print(f"model: {label}, dtype {args.dtype}; {len(DEMO_TEXTS)} texts encoded in {elapsed:.2f}s "
          f"(first call includes compilation)")
    for i, t in enumerate(DEMO_TEXTS):
        print(f"  [{i}] {t}")
    print("\ndense similarities (cosine):")
    print(out["dense_vecs"] @ out["dense_vecs"].T)
    print("\ntop lexical tokens per text:")
    for i, lw in enumerate(out["lexical_weights"]):
        tokens = model.convert_id_to_token(dict(lw)) if lw else {}
        top = sorted(tokens.items(), key=lambda kv: -kv[1])[: args.top]
        print(f"  [{i}] " + ", ".join(f"{tok!r}: {float(w):.4f}" for tok, w in top))
    print("\nColBERT late-interaction scores (row = query, column = passage):")
    vecs = out["colbert_vecs"]
    print(np.array([[float(model.colbert_score(q, p)) for p in vecs] for q in vecs]))
    return 0


def convert(args) -> int:
    from m3jax.checkpoint import convert_release

    t0 = time.perf_counter()
    dst = convert_release(args.src, args.dst, overwrite=args.overwrite)
    print(f"converted {args.src} -> {dst} in {time.perf_counter() - t0:.1f}s")
    return 0


def export(args) -> int:
    from m3jax.checkpoint import export_release

    t0 = time.perf_counter()
    dst = export_release(args.src, args.dst, weights_format=args.format, overwrite=args.overwrite)
    print(f"exported {args.src} -> {dst} (release layout, {args.format}) in {time.perf_counter() - t0:.1f}s")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="m3jax", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    d = sub.add_parser("demo", help="embed a multilingual sample; print dense, lexical and ColBERT results")
    d.add_argument("--model", default="BAAI/bge-m3", help="hub id, release or m3jax directory")
    d.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    d.add_argument("--random", action="store_true", help="skip the model and use random weights")
    d.add_argument("--random-size", default="bge-m3", choices=["bge-m3", "tiny"],
                   help="architecture of the random fallback: the real one, or a tiny one for a quick run")
    d.add_argument("--top", type=int, default=5, help="lexical tokens shown per text")
    d.set_defaults(func=demo)

    c = sub.add_parser("convert", help="release layout (dir or hub id) -> m3jax directory")
    c.add_argument("src")
    c.add_argument("dst")
    c.add_argument("--overwrite", action="store_true")
    c.set_defaults(func=convert)

    e = sub.add_parser("export", help="m3jax (or release) directory -> release layout FlagEmbedding loads")
    e.add_argument("src")
    e.add_argument("dst")
    e.add_argument("--format", default="safetensors", choices=["safetensors", "bin"])
    e.add_argument("--overwrite", action="store_true")
    e.set_defaults(func=export)

    try:
        from m3jax import bench
    except ImportError:
        bench = None
    if bench is not None:
        bench.add_parser(sub)
    from m3jax.embed import cli as embed_cli

    embed_cli.add_parser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    from m3jax.checkpoint import CheckpointError, HubUnavailableError
    from m3jax.config import ConfigError
    from m3jax.weights import ConversionError

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (CheckpointError, ConfigError, ConversionError, HubUnavailableError, FileNotFoundError) as e:
        print(f"m3jax {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
