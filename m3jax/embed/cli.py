"""`m3jax embed INPUT... --model M --output DIR`: argument parsing only; the work is m3jax.embed.embed."""

from __future__ import annotations

import sys

from m3jax import encode as pipeline


def add_parser(sub) -> None:
    p = sub.add_parser("embed", help="embed a corpus (txt / jsonl / parquet, local or fsspec URLs) into sharded "
                                     "Parquet; resumable, multi-host")
    p.add_argument("inputs", nargs="+", help="files, globs or URLs (gs://, s3://, memory://) of .txt (a text per "
                                             "line), .jsonl or .parquet, optionally .gz / .zst compressed")
    p.add_argument("--model", required=True, help="m3jax or release directory, or hub id")
    p.add_argument("--output", required=True, help="output directory (local or URL); rerun to resume")
    p.add_argument("--outputs", default="dense,sparse,colbert", help="comma-separated: dense, sparse, colbert")
    p.add_argument("--max-length", type=int, default=512, help="tokens per text, longer ones are truncated")
    p.add_argument("--batch-size", type=int, default=256, help="most rows per device batch")
    p.add_argument("--max-tokens-per-batch", type=int, default=pipeline.DEFAULT_MAX_TOKENS)
    p.add_argument("--length-buckets", default=None, help="comma-separated padded lengths (default: m3jax's 53); the "
                                                          "largest must hold --max-length")
    p.add_argument("--text-field", default="text", help="JSONL field / Parquet column of the text")
    p.add_argument("--id-field", default=None, help="JSONL field / Parquet column of the id (default: row position)")
    p.add_argument("--shard-size", type=int, default=10_000, help="input rows per output shard")
    p.add_argument("--window", type=int, default=4096, help="texts sorted and batched together")
    p.add_argument("--window-tokens", type=int, default=1 << 20, help="most tokens in one window (bounds memory)")
    p.add_argument("--dense-dtype", default="float32", choices=["float32", "float16"])
    p.add_argument("--colbert-dtype", default="float16", choices=["float32", "float16"])
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="compute dtype")
    p.add_argument("--attn-impl", default="auto")
    p.add_argument("--coordinator", default=None, help="HOST:PORT of process 0 (multi-host runs)")
    p.add_argument("--num-processes", type=int, default=None)
    p.add_argument("--process-id", type=int, default=None)
    p.add_argument("--quiet", action="store_true", help="no progress bar and no summary line")
    p.set_defaults(func=run)


def run(args) -> int:
    from m3jax.embed import EmbedError, InputError, embed

    buckets = [int(x) for x in args.length_buckets.split(",")] if args.length_buckets else None
    try:
        embed(args.inputs, args.model, args.output, outputs=[h.strip() for h in args.outputs.split(",") if h.strip()],
              max_length=args.max_length, length_buckets=buckets, batch_size=args.batch_size,
              max_tokens_per_batch=args.max_tokens_per_batch, text_field=args.text_field, id_field=args.id_field,
              shard_size=args.shard_size, window=args.window, window_tokens=args.window_tokens,
              dense_dtype=args.dense_dtype, colbert_dtype=args.colbert_dtype, dtype=args.dtype,
              attn_impl=args.attn_impl, coordinator=args.coordinator, num_processes=args.num_processes,
              process_id=args.process_id, quiet=args.quiet)
    except (EmbedError, InputError, ValueError) as e:
        print(f"m3jax embed: error: {e}", file=sys.stderr)
        return 2
    return 0
