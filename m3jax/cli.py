"""Command line: `m3jax demo | convert | export | bench | embed | eval | train | preflight` (also
`python -m m3jax ...`).

This module only parses arguments; each command calls a plain library function."""

from __future__ import annotations

import argparse
import logging
import sys
import time

DEMO_QUERY = "What is the capital of Germany?"
DEMO_MODES = ("dense", "sparse", "colbert", "hybrid")


def demo(args) -> int:
    """The main job: `m3jax embed` over a 200-text multilingual sample, then queries against its output."""
    import contextlib
    import io
    import shutil
    import tempfile
    from pathlib import Path

    from m3jax.checkpoint import HubUnavailableError
    from m3jax.embed import EmbeddingReader, embed
    from m3jax.embed.sample import sample_corpus, write_sample_corpus
    from m3jax.engine import Encoder

    label = args.model
    try:
        if args.random:
            raise HubUnavailableError("--random given")
        encoder = Encoder.from_pretrained(args.model, dtype=args.dtype)
    except HubUnavailableError as e:
        size = args.random_size
        print(f"{args.model}: not available ({str(e).split('. ')[0]}); running on a randomly initialised "
              f"{size} checkpoint written locally: RANDOM WEIGHTS, meaningless numbers, real pipeline.")
        from m3jax.random_weights import random_m3jax_dir

        path = random_m3jax_dir(size)
        encoder = Encoder.from_pretrained(path, dtype=args.dtype)
        label = f"random {size} ({path})"
    print(f"model: {label}, dtype {args.dtype}")
    texts = {r["id"]: r["text"] for r in sample_corpus()}
    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="m3jax-demo-"))
    try:
        work.mkdir(parents=True, exist_ok=True)
        corpus, out = write_sample_corpus(work / "corpus.jsonl"), work / "embeddings"
        print(f"\n$ m3jax embed {corpus} --id-field id --output {out}")
        log = io.StringIO()
        with contextlib.redirect_stderr(log):  # keep the job's summary line for the transcript, not its progress bar
            embed(corpus, encoder, out, id_field="id", dtype=args.dtype, shard_size=100, quiet=False)
        print(log.getvalue().rstrip().splitlines()[-1])
        reader = EmbeddingReader(out)
        print(f"{reader}: {', '.join(s['file'] for s in reader.manifest['shards'])} and _manifest.json")
        index = reader.to_index()
        query = encoder.encode([args.query], max_length=64)
        print(f"\nquery: {args.query!r}; top {args.top} of {len(reader)} per mode (score, id, text)")
        for mode in DEMO_MODES:
            scores, ids = index.search(query, k=args.top, mode=mode)
            print(f"{mode}:")
            for score, i in zip(scores[0], ids[0], strict=True):
                print(f"  {float(score):8.4f}  {i}  {texts[str(i)]}")
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
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


def bench(args) -> int:
    from m3jax import bench as bench_job

    return bench_job.main(args)


def embed(args) -> int:
    from m3jax.embed import EmbedError, InputError
    from m3jax.embed import embed as embed_corpus

    buckets = [int(x) for x in args.length_buckets.split(",")] if args.length_buckets else None
    try:
        embed_corpus(args.inputs, args.model, args.output, files=True, source_id=args.source_id,
                     outputs=[h.strip() for h in args.outputs.split(",") if h.strip()],
                     max_length=args.max_length, length_buckets=buckets, batch_size=args.batch_size,
                     max_tokens_per_batch=args.max_tokens_per_batch, text_field=args.text_field,
                     id_field=args.id_field, shard_size=args.shard_size, window=args.window,
                     window_tokens=args.window_tokens, dense_dtype=args.dense_dtype,
                     colbert_dtype=args.colbert_dtype, dtype=args.dtype, attn_impl=args.attn_impl,
                     calibration_rows=args.calibration_rows, pool_factor=args.pool_factor,
                     muvera="default" if args.muvera else None,
                     mcls_interval=args.mcls_interval, mesh=args.mesh, coordinator=args.coordinator,
                     num_processes=args.num_processes, process_id=args.process_id, quiet=args.quiet)
    except (EmbedError, InputError, ValueError) as e:
        print(f"m3jax embed: error: {e}", file=sys.stderr)
        return 2
    return 0


def evaluate(args) -> int:
    from m3jax.evaluate import DatasetError, SettingsError, evaluate_beir

    try:
        report = evaluate_beir(args.dataset, args.model, split=args.split, modes=args.modes, weights=args.weights,
                               top_k=args.top_k, rrf_k=args.rrf_k, metrics=args.metrics, output=args.output,
                               batch_size=args.batch_size, query_max_length=args.query_max_length,
                               passage_max_length=args.passage_max_length, dtype=args.dtype,
                               rerank=args.rerank, rerank_depth=args.rerank_depth, rescore=args.rescore,
                               compact={"dense_format": args.dense_format, "colbert_format": args.colbert_format,
                                        "pool_factor": args.pool_factor,
                                        "muvera": "default" if args.muvera else None})
    except (DatasetError, SettingsError) as e:
        print(f"m3jax eval: error: {e}", file=sys.stderr)
        return 2
    print(report.tables())
    print(f"written: {args.output}" if args.output else "(no --output: nothing written)")
    return 0


# `m3jax train`'s flags that set BGE-M3's LossConfig (same names), and each task's instruction flags.
_M3_LOSS_FLAGS = ("temperature", "unified_finetuning", "use_self_distill", "self_distill_start_step", "kd_loss_type",
                  "negatives_cross_device", "sentence_pooling_method", "normalize_embeddings", "fix_encoder",
                  "fix_position_embedding", "use_mrl", "mrl_dims", "colbert_mrl_dims")
_INSTRUCTIONS = {False: ("query_instruction_for_retrieval", "passage_instruction_for_retrieval"),
                 True: ("query_instruction_for_rerank", "passage_instruction_for_rerank")}


def train(args) -> int:
    from m3jax.train import (
        DataConfig,
        DataError,
        LossConfig,
        RerankerDataConfig,
        RerankerTrainConfig,
        TrainConfig,
        TrainError,
        fit,
    )

    def flag(name: str) -> str:
        return "--" + name.replace("_", "-")

    def tuple_if_list(v):
        return tuple(v) if isinstance(v, list) else v

    try:
        foreign = [flag(k) for k in _INSTRUCTIONS[not args.reranker] if getattr(args, k) is not None]
        if args.reranker:
            foreign += [flag(k) for k in _M3_LOSS_FLAGS if tuple_if_list(getattr(args, k)) != getattr(LossConfig(), k)]
        if foreign:
            raise TrainError(f"{', '.join(foreign)} {'is' if len(foreign) == 1 else 'are'} for "
                             f"{'BGE-M3, not a re-ranker' if args.reranker else 're-rankers (with --reranker)'}")
        data = dict(train_group_size=args.train_group_size, query_max_len=args.query_max_len,
                    passage_max_len=args.passage_max_len, knowledge_distillation=args.knowledge_distillation,
                    query_instruction_format=args.query_instruction_format,
                    passage_instruction_format=args.passage_instruction_format, shuffle_ratio=args.shuffle_ratio,
                    **{k: getattr(args, k) for k in _INSTRUCTIONS[args.reranker]})
        run = dict(per_device_batch_size=args.per_device_batch_size,
                   gradient_accumulation_steps=args.gradient_accumulation_steps,
                   num_train_epochs=args.num_train_epochs, max_steps=args.max_steps,
                   learning_rate=args.learning_rate, warmup_ratio=args.warmup_ratio, warmup_steps=args.warmup_steps,
                   weight_decay=args.weight_decay, max_grad_norm=args.max_grad_norm, bf16=args.bf16,
                   remat=args.remat, gradient_cache_chunk=args.gradient_cache_chunk, fsdp=args.fsdp,
                   dropout=not args.no_dropout, seed=args.seed,
                   save_steps=args.save_steps, save_total_limit=args.save_total_limit, quiet=args.quiet)
        if args.reranker:
            cfg = RerankerTrainConfig(data=RerankerDataConfig(**data), **run)
        else:
            cfg = TrainConfig(data=DataConfig(**data), loss=LossConfig(**{k: getattr(args, k) for k in _M3_LOSS_FLAGS}),
                              **run)
        result = fit(args.model, args.data, args.output, cfg, until_step=args.until_step,
                     coordinator=args.coordinator, num_processes=args.num_processes, process_id=args.process_id)
    except (TrainError, DataError, ValueError) as e:
        print(f"m3jax train: error: {e}", file=sys.stderr)
        return 2
    if not args.quiet:
        where = result.final_dir or f"{args.output}/checkpoints (stopped at --until-step)"
        print(f"trained {result.steps} step(s); model: {where}; log: {args.output}/train_log.jsonl")
    return 0


def preflight(args) -> int:
    """Compiles a job for an accelerator target without one; exit 1 naming each shape that fails or does not fit."""
    import os

    os.environ.setdefault("JAX_PLATFORMS", "cpu")  # the host compiles; no local accelerator is looked for
    from m3jax import preflight as pf
    from m3jax.accelerators import TargetError

    def show(c: pf.ShapeCheck) -> None:
        print(f"  {c.name}: {c.compile_s:.1f} s, {c.needed / 2**30:.2f} GiB/device, {'ok' if c.ok else 'PROBLEM'}",
              flush=True)

    embed = args.job == "embed"
    max_length = args.max_length or (8192 if embed else 512)
    batch_size = args.batch_size or (256 if embed else 8)
    try:
        if embed:
            checks = pf.embed_checks(args.target, model=args.model, dtype=args.dtype, max_length=max_length,
                                     batch_size=batch_size, lengths=_ints(args.lengths),
                                     max_tokens_per_batch=args.max_tokens_per_batch,
                                     mcls_interval=args.mcls_interval, mesh=args.mesh, progress=show)
        else:
            from m3jax.train import DataConfig, TrainConfig
            from m3jax.train.preflight import train_checks

            config = TrainConfig(data=DataConfig(train_group_size=args.train_group_size,
                                                 query_max_len=args.query_max_len,
                                                 passage_max_len=max_length),
                                 per_device_batch_size=batch_size, bf16=args.dtype == "bfloat16",
                                 fsdp=args.fsdp, remat=args.remat, gradient_cache_chunk=args.gradient_cache_chunk,
                                 gradient_accumulation_steps=args.gradient_accumulation_steps)
            checks = train_checks(args.target, config, model=args.model, progress=show)
    except (TargetError, ValueError) as e:
        print(f"m3jax preflight: error: {e}", file=sys.stderr)
        return 2
    print(pf.format_checks(checks, args.target))
    for c in checks:
        if not c.ok:
            print(f"m3jax preflight: {c.problem()}", file=sys.stderr)
    return 0 if all(c.ok for c in checks) else 1


def _chunk_rows(args) -> dict:
    """--chunk-rows if given (else the data tools' own default, m3jax.train.datatools.CHUNK_ROWS)."""
    return {} if args.chunk_rows is None else {"chunk_rows": args.chunk_rows}


def mine(args) -> int:
    from m3jax.train.datatools import mine_hard_negatives

    try:
        start, end = (int(x) for x in args.range_for_sampling.split("-"))
        stats = mine_hard_negatives(args.model, args.input_file, args.output_file, candidate_pool=args.candidate_pool,
                                    range_for_sampling=(start, end), negative_number=args.negative_number,
                                    seed=args.seed, batch_size=args.batch_size,
                                    query_max_length=args.query_max_length,
                                    passage_max_length=args.passage_max_length, **_chunk_rows(args))
    except ValueError as e:  # DataError included
        print(f"m3jax mine: error: {e}", file=sys.stderr)
        return 2
    print(f"m3jax mine: {stats['rows']} rows, a pool of {stats['pool']} passages, {stats['filled_at_random']} "
          f"filled up at random; written: {args.output_file}")
    return 0


def score(args) -> int:
    from m3jax.train.datatools import add_teacher_scores

    try:
        weights = tuple(float(x) for x in args.weights.split(","))
        if len(weights) != 3:
            raise ValueError(f"--weights takes dense,sparse,colbert, got {args.weights!r}")
        stats = add_teacher_scores(args.input_file, args.output_file, reranker=args.reranker,
                                   model=None if args.reranker else args.model, weights=weights,
                                   max_length=args.max_length, batch_size=args.batch_size, **_chunk_rows(args))
    except ValueError as e:
        print(f"m3jax score: error: {e}", file=sys.stderr)
        return 2
    print(f"m3jax score: {stats['rows']} rows, {stats['pairs']} pairs scored by the {stats['teacher']}; "
          f"written: {args.output_file}")
    return 0


def _add_mine(sub) -> None:
    m = sub.add_parser("mine", help="hard negatives for fine-tuning data (FlagEmbedding's hn_mine.py) from m3jax's "
                                    "own dense search")
    m.add_argument("input_file", help="JSON lines {query, pos[, neg]} (a file, directory or URL)")
    m.add_argument("output_file", help="the same rows with 'neg' mined (written when complete; a rerun resumes)")
    m.add_argument("--model", default="BAAI/bge-m3", help="hub id, release or m3jax directory")
    m.add_argument("--candidate-pool", default=None, help="JSON lines {text}; default: every pos and neg of the input")
    m.add_argument("--range-for-sampling", default="2-200", help="ranks start-end to draw from (hn_mine's)")
    m.add_argument("--negative-number", type=int, default=15)
    m.add_argument("--seed", type=int, default=0)
    m.add_argument("--batch-size", type=int, default=256)
    m.add_argument("--query-max-length", type=int, default=512)
    m.add_argument("--passage-max-length", type=int, default=512)
    m.add_argument("--chunk-rows", type=int, default=None, help="rows (and pool passages) per resumable chunk "
                                                               "(default 10,000)")
    m.set_defaults(func=mine)


def _add_score(sub) -> None:
    s = sub.add_parser("score", help="teacher scores (pos_scores, neg_scores) for fine-tuning data, from a re-ranker "
                                     "or BGE-M3's hybrid score (FlagEmbedding's add_reranker_score.py)")
    s.add_argument("input_file", help="JSON lines {query, pos, neg}")
    s.add_argument("output_file", help="the same rows with pos_scores and neg_scores (written when complete; a "
                                       "rerun resumes)")
    s.add_argument("--reranker", default=None, help="a cross-encoder's release directory or hub id")
    s.add_argument("--model", default="BAAI/bge-m3", help="without --reranker: BGE-M3's weighted hybrid score")
    s.add_argument("--weights", default="0.4,0.2,0.4", help="dense,sparse,colbert weights of the hybrid score")
    s.add_argument("--max-length", type=int, default=None)
    s.add_argument("--batch-size", type=int, default=None)
    s.add_argument("--chunk-rows", type=int, default=None, help="rows per resumable chunk (default 10,000)")
    s.set_defaults(func=score)


def _ints(text: str | None) -> list[int] | None:
    return None if not text else [int(x) for x in text.split(",")]


def _add_preflight(sub) -> None:
    f = sub.add_parser("preflight", help="compile a job for a TPU topology or H100s without the device: per shape, "
                                         "compile seconds and memory per device against the device's")
    f.add_argument("--target", required=True, help="TPU topology, e.g. v5e:2x2 (one host), v5e:16x16 (a pod), "
                                                   "v5p:2x2x1, v6e:2x2, v5e:1x1 or v2:2x2 (Colab's TPUs); or "
                                                   "h100 / h100:N (N H100s of one host)")
    f.add_argument("--job", required=True, choices=["embed", "train"])
    f.add_argument("--model", default="bge-m3", help="'bge-m3' (default), 'tiny', or a model directory (its "
                                                      "config.json only: no weights are read)")
    f.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"], help="compute dtype")
    f.add_argument("--max-length", type=int, default=None,
                   help="embed: the longest text (default 8192); train: --passage-max-len (default 512)")
    f.add_argument("--batch-size", type=int, default=None,
                   help="embed: most rows per batch (default 256); train: per device batch size (default 8)")
    f.add_argument("--lengths", default=None, help="embed: only these bucket lengths, comma-separated")
    f.add_argument("--max-tokens-per-batch", type=int, default=None,
                   help="embed: a token budget per batch instead of the rows that fit memory")
    f.add_argument("--mcls-interval", type=int, default=None, help="embed: multiple CLS every N tokens")
    f.add_argument("--mesh", default="auto", choices=["auto", "host", "global"],
                   help="embed: as `m3jax embed --mesh`: one host's devices, as each process drives its own "
                        "(host), or one mesh over every device of the topology in lockstep (global); auto (the "
                        "default): global on a multi-host TPU topology")
    f.add_argument("--query-max-len", type=int, default=32, help="train")
    f.add_argument("--train-group-size", type=int, default=8, help="train")
    f.add_argument("--gradient-accumulation-steps", type=int, default=1, help="train")
    f.add_argument("--fsdp", action="store_true", help="train: shard parameters and optimiser state")
    f.add_argument("--remat", action="store_true", help="train: recompute each layer in the backward pass")
    f.add_argument("--gradient-cache-chunk", type=int, default=None, metavar="ROWS",
                   help="train: a gradient cache encoding this many rows at a time")
    f.set_defaults(func=preflight)


def _bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes"):
        return True
    if text.lower() in ("0", "false", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected True or False, got {text!r}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="m3jax", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    for add in (_add_demo, _add_convert, _add_export, _add_bench, _add_eval, _add_embed, _add_train, _add_mine,
                _add_score, _add_preflight):
        add(sub)
    return p


def _add_demo(sub) -> None:
    d = sub.add_parser("demo", help="embed a multilingual sample corpus with `m3jax embed`, then query it (dense, "
                                     "sparse, ColBERT, hybrid)")
    d.add_argument("--model", default="BAAI/bge-m3", help="hub id, release or m3jax directory")
    d.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    d.add_argument("--random", action="store_true", help="skip the model and use random weights")
    d.add_argument("--random-size", default="bge-m3", choices=["bge-m3", "tiny"],
                   help="architecture of the random fallback: the real one, or a tiny one for a quick run")
    d.add_argument("--query", default=DEMO_QUERY)
    d.add_argument("--top", type=int, default=5, help="hits shown per mode")
    d.add_argument("--workdir", default=None, help="keep the corpus and the embeddings here (default: a temporary "
                                                   "directory, removed)")
    d.set_defaults(func=demo)


def _add_convert(sub) -> None:
    c = sub.add_parser("convert", help="release layout (dir or hub id) -> m3jax directory")
    c.add_argument("src")
    c.add_argument("dst")
    c.add_argument("--overwrite", action="store_true")
    c.set_defaults(func=convert)


def _add_export(sub) -> None:
    e = sub.add_parser("export", help="m3jax (or release) directory -> release layout FlagEmbedding loads")
    e.add_argument("src")
    e.add_argument("dst")
    e.add_argument("--format", default="safetensors", choices=["safetensors", "bin"])
    e.add_argument("--overwrite", action="store_true")
    e.set_defaults(func=export)


def _add_bench(sub) -> None:
    from m3jax.attention import ALIASES, IMPLS

    b = sub.add_parser("bench", help="measure tokens/s, FLOP/s vs peak, compile time per bucket, peak memory")
    b.add_argument("--model", default=None,
                   help="m3jax/release directory or hub id (default: a random full-size checkpoint, written once)")
    b.add_argument("--workload", default="passages", choices=["long", "passages", "queries"])
    b.add_argument("--lengths", default=None, help="comma-separated token lengths instead of a named workload")
    b.add_argument("--batch-size", type=int, default=None)
    b.add_argument("--max-tokens", type=int, default=16384, help="token budget per batch")
    b.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    b.add_argument("--attn", default="auto", choices=[*IMPLS, *ALIASES])
    b.add_argument("--repeat", type=int, default=1)
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--peak-flops", type=float, default=None, help="stated peak FLOP/s for the fraction")
    b.add_argument("--cache-dir", default=None, help="persistent compilation cache directory")
    b.add_argument("--json", default=None, help="also write the result to this file")
    b.add_argument("--json-stdout", action="store_true", help="print JSON instead of the table")
    b.set_defaults(func=bench)


def _add_eval(sub) -> None:
    v = sub.add_parser("eval", help="retrieval metrics (nDCG@10, Recall@100, MRR@10) on a BEIR-layout dataset")
    v.add_argument("dataset", help="folder or fsspec URL with corpus.jsonl, queries.jsonl, qrels/<split>.tsv")
    v.add_argument("--model", default="BAAI/bge-m3", help="hub id, release or m3jax directory")
    v.add_argument("--split", default="test")
    v.add_argument("--modes", default="dense,sparse,colbert,hybrid,rrf")
    v.add_argument("--weights", default="1,0.3,1", help="hybrid's dense,sparse,colbert weights")
    v.add_argument("--top-k", type=int, default=100)
    v.add_argument("--rrf-k", type=float, default=60)
    v.add_argument("--rerank", default=None, metavar="PATH",
                   help="a cross-encoder (release directory or hub id of bge-reranker-v2-m3 or its kind): every mode "
                        "is also reported re-ranked, as <mode>+rerank")
    v.add_argument("--rerank-depth", type=int, default=100, help="passages per query the cross-encoder re-scores")
    v.add_argument("--metrics", default="ndcg@10,recall@100,mrr@10", help="ranx metric names")
    v.add_argument("--output", help="JSON report path")
    v.add_argument("--batch-size", type=int)
    v.add_argument("--query-max-length", type=int)
    v.add_argument("--passage-max-length", type=int)
    v.add_argument("--dtype", choices=["float32", "bfloat16"], help="default: bfloat16 on GPU / TPU, else float32")
    v.add_argument("--dense-format", default="float", choices=["float", "int8", "binary"],
                   help="score the corpus' dense vectors as int8 codes (ranges calibrated on the corpus) or binary "
                        "codes, then rescored (see --no-rescore)")
    v.add_argument("--colbert-format", default="float", choices=["float", "int8"])
    v.add_argument("--pool-factor", type=int, default=1, help="ColBERT token pooling of the corpus (Ward)")
    v.add_argument("--muvera", action="store_true",
                   help="MUVERA FDEs of the corpus (fastembed's defaults), for mode muvera")
    v.add_argument("--no-rescore", dest="rescore", action="store_false",
                   help="compact dense: the code scores are the result; muvera: no MaxSim re-ranking")
    v.set_defaults(func=evaluate)


def _add_embed(sub) -> None:
    from m3jax.attention import ALIASES, IMPLS

    m = sub.add_parser("embed", help="embed a corpus (txt / jsonl / parquet, local or fsspec URLs) into sharded "
                                     "Parquet; resumable, multi-host")
    m.add_argument("inputs", nargs="+", help="files, globs or URLs (gs://, s3://, memory://) of .txt (a text per "
                                             "line), .jsonl or .parquet, optionally .gz / .zst compressed")
    m.add_argument("--model", required=True, help="m3jax or release directory, or hub id")
    m.add_argument("--output", required=True, help="output directory (local or URL); rerun to resume")
    m.add_argument("--outputs", default="dense,sparse,colbert", help="comma-separated: dense, sparse, colbert")
    m.add_argument("--max-length", type=int, default=512, help="tokens per text, longer ones are truncated")
    m.add_argument("--batch-size", type=int, default=256, help="most rows of a batch, over this host's devices")
    m.add_argument("--max-tokens-per-batch", type=int, default=None,
                   help="token budget per batch (default: 16384 on CPU; on accelerators the rows that fit memory)")
    m.add_argument("--length-buckets", default=None, help="comma-separated padded lengths (default: the platform's, "
                                                          "m3jax.pipeline.default_length_buckets); the "
                                                          "largest must hold --max-length")
    m.add_argument("--source-id", default=None, help="a name for the input, part of the job's identity: a resume "
                                                      "under another one is refused (every shard also checks its "
                                                      "input rows' sha256)")
    m.add_argument("--text-field", default="text", help="JSONL field / Parquet column of the text")
    m.add_argument("--id-field", default=None, help="JSONL field / Parquet column of the id (default: row position)")
    m.add_argument("--shard-size", type=int, default=10_000, help="input rows per output shard")
    m.add_argument("--window", type=int, default=None,
                   help="texts sorted and batched together (default: 4096 on CPU, a whole shard on accelerators)")
    m.add_argument("--window-tokens", type=int, default=None,
                   help="most tokens in one window, which bounds host memory (default: 1M on CPU, 2M on accelerators)")
    m.add_argument("--dense-dtype", default="float32", choices=["float32", "float16", "int8", "binary"],
                   help="int8: codes of calibrated ranges (see --calibration-rows); binary: sign bits, D / 8 bytes")
    m.add_argument("--colbert-dtype", default="float16", choices=["float32", "float16", "int8"])
    m.add_argument("--calibration-rows", type=int, default=1000,
                   help="int8 outputs: the input's first rows, embedded to calibrate each dimension's range")
    m.add_argument("--pool-factor", type=int, default=1,
                   help="ColBERT token pooling: about tokens / N vectors per passage (Ward clustering; PyLate's "
                        "pool_factor)")
    m.add_argument("--muvera", action="store_true",
                   help="add a `muvera` column: MUVERA FDEs of the ColBERT vectors, fastembed's defaults (k_sim 5, "
                        "dim_proj 16, r_reps 20, seed 42)")
    m.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="compute dtype")
    m.add_argument("--attn-impl", default="auto", choices=[*IMPLS, *ALIASES])
    m.add_argument("--mcls-interval", type=int, default=None, metavar="N",
                   help="multiple CLS for long texts: a <s> every N text tokens (the paper: 256), dense = mean of "
                        "their hidden states; inserted tokens do not count toward --max-length (default: off)")
    m.add_argument("--mesh", default="auto", choices=["auto", "host", "global"],
                   help="multi-host runs: each process on its own devices (host; output identical to one "
                        "process's), or one mesh over all processes' devices run in lockstep (global; needed on v5e "
                        "slices of 32 chips and more); auto (the default): global on a multi-host TPU")
    m.add_argument("--coordinator", default=None, help="HOST:PORT of process 0 (multi-host runs)")
    m.add_argument("--num-processes", type=int, default=None)
    m.add_argument("--process-id", type=int, default=None)
    m.add_argument("--quiet", action="store_true", help="no progress bar and no summary line")
    m.set_defaults(func=embed)


def _add_train(sub) -> None:
    t = sub.add_parser("train", help="fine-tune BGE-M3 (M3 unified fine-tuning, self-distillation) or, with "
                                     "--reranker, a cross-encoder on FlagEmbedding-format JSON lines; resumable, "
                                     "multi-host")
    t.add_argument("data", nargs="+", help="JSON-lines files, directories of them, or fsspec URLs: {query, pos, "
                                           "neg[, pos_scores, neg_scores][, prompt]} per line (a re-ranker's: "
                                           "[, query_prompt, passage_prompt])")
    t.add_argument("--model", required=True, help="m3jax or release directory, or hub id (--reranker: a "
                                                  "release-layout re-ranker)")
    t.add_argument("--reranker", action="store_true",
                   help="fine-tune a cross-encoder re-ranker (bge-reranker-v2-m3's kind) as FlagEmbedding's "
                        "encoder-only re-ranker runner does; final/ is in its release layout")
    t.add_argument("--output", required=True, help="output directory: checkpoints, train_log.jsonl, final/; "
                                                   "rerun to resume")
    # FlagEmbedding's M3 runner's flags (same names with dashes, same defaults); boolean ones take an optional
    # True/False as HfArgumentParser's do: `--unified-finetuning` or `--unified-finetuning True`.
    t.add_argument("--train-group-size", type=int, default=8)
    t.add_argument("--query-max-len", type=int, default=32)
    t.add_argument("--passage-max-len", type=int, default=128)
    t.add_argument("--knowledge-distillation", type=_bool, nargs="?", const=True, default=False, metavar="BOOL")
    t.add_argument("--query-instruction-for-retrieval", default=None)
    t.add_argument("--query-instruction-format", default="{}{}")
    t.add_argument("--passage-instruction-for-retrieval", default=None)
    t.add_argument("--passage-instruction-format", default="{}{}")
    t.add_argument("--query-instruction-for-rerank", default=None, help="--reranker")
    t.add_argument("--passage-instruction-for-rerank", default=None, help="--reranker")
    t.add_argument("--shuffle-ratio", type=float, default=0.0)
    t.add_argument("--learning-rate", type=float, default=5e-5)
    t.add_argument("--warmup-ratio", type=float, default=0.0)
    t.add_argument("--warmup-steps", type=int, default=0)
    t.add_argument("--weight-decay", type=float, default=0.0)
    t.add_argument("--max-grad-norm", type=float, default=1.0)
    t.add_argument("--num-train-epochs", type=float, default=3.0)
    t.add_argument("--max-steps", type=int, default=-1, help="> 0: this many optimiser steps, whatever the epochs")
    t.add_argument("--per-device-batch-size", "--per-device-train-batch-size", type=int, default=8,
                   dest="per_device_batch_size")
    t.add_argument("--gradient-accumulation-steps", type=int, default=1)
    t.add_argument("--temperature", type=float, default=0.02)
    t.add_argument("--unified-finetuning", type=_bool, nargs="?", const=True, default=False, metavar="BOOL")
    t.add_argument("--use-self-distill", type=_bool, nargs="?", const=True, default=False, metavar="BOOL")
    t.add_argument("--self-distill-start-step", type=int, default=-1)
    t.add_argument("--kd-loss-type", default="kl_div", choices=["kl_div", "m3_kd_loss"])
    t.add_argument("--negatives-cross-device", type=_bool, nargs="?", const=True, default=False, metavar="BOOL")
    t.add_argument("--sentence-pooling-method", default="cls", choices=["cls", "mean"])
    t.add_argument("--normalize-embeddings", type=_bool, nargs="?", const=True, default=True, metavar="BOOL")
    t.add_argument("--fix-encoder", type=_bool, nargs="?", const=True, default=False, metavar="BOOL")
    t.add_argument("--fix-position-embedding", type=_bool, nargs="?", const=True, default=False, metavar="BOOL")
    t.add_argument("--use-mrl", type=_bool, nargs="?", const=True, default=False, metavar="BOOL",
                   help="Matryoshka training of the dense vector at --mrl-dims (FlagEmbedding's dense embedders' MRL)")
    t.add_argument("--mrl-dims", type=int, nargs="+", default=(), metavar="D")
    t.add_argument("--colbert-mrl-dims", type=int, nargs="+", default=(), metavar="D",
                   help="with --use-mrl --unified-finetuning: Matryoshka widths of the ColBERT projection")
    t.add_argument("--save-steps", type=int, default=500)
    t.add_argument("--save-total-limit", type=int, default=None)
    t.add_argument("--bf16", action="store_true", help="bfloat16 compute, float32 master weights")
    t.add_argument("--remat", "--gradient-checkpointing", action="store_true", dest="remat",
                   help="recompute each layer in the backward pass (long passages)")
    t.add_argument("--gradient-cache-chunk", type=int, default=None, metavar="ROWS",
                   help="gradient cache: encode this many rows at a time (memory of a chunk, in-batch negatives kept)")
    t.add_argument("--fsdp", action="store_true", help="shard parameters and optimiser state over the devices")
    t.add_argument("--no-dropout", action="store_true", help="train without dropout (deterministic forward)")
    t.add_argument("--seed", type=int, default=42)
    t.add_argument("--until-step", type=int, default=None, help="stop after this step (checkpointed); rerun to "
                                                                "continue")
    t.add_argument("--coordinator", default=None, help="HOST:PORT of process 0 (multi-host runs)")
    t.add_argument("--num-processes", type=int, default=None)
    t.add_argument("--process-id", type=int, default=None)
    t.add_argument("--quiet", action="store_true", help="no progress bar and no summary line")
    t.set_defaults(func=train)


def main(argv: list[str] | None = None) -> int:
    from m3jax.checkpoint import CheckpointError, HubUnavailableError
    from m3jax.config import ConfigError
    from m3jax.weights import ConversionError

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    from m3jax.engine import configure_compilation_cache

    configure_compilation_cache()  # the command's own process: every shape it compiles is kept for the next run
    try:
        return args.func(args)
    except (CheckpointError, ConfigError, ConversionError, HubUnavailableError, FileNotFoundError) as e:
        print(f"m3jax {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
