"""All-pairs lexical and ColBERT scoring with m3jax.scoring against FlagEmbedding (and scipy.sparse for lexical).

    python benchmarks/bench_scoring.py            # 1,000 queries x 100,000 passages lexical; ColBERT see below
    python benchmarks/bench_scoring.py --quick    # small sizes, under a minute on 2 CPU cores

Synthetic vectors with realistic shapes: queries of 10-30 tokens / nonzeros, passages of 50-300 tokens and 20-150
lexical nonzeros, token ids drawn with a Zipf-like (1/rank) frequency over the 250,002-entry vocabulary, weights in
[0, 0.35). ColBERT at dim 1024 over 100,000 passages of ~150 tokens is ~60 GB of float32 (and ~10^15 multiply-adds
for 1,000 queries), beyond a CPU box: the ColBERT part uses --colbert-passages passages at --colbert-dim and says so.

FlagEmbedding's helpers (compute_lexical_matching_score on dicts, colbert_score pair by pair with one torch thread,
and the batched torch compute_colbert_score that compute_score uses) are timed on a sample and extrapolated to the
full pair count; scipy.sparse's CSR product (the usual CPU answer for lexical scores) runs at full size.
Scores on the sample are compared with m3jax's. Peak memory is the process's ru_maxrss.
"""

from __future__ import annotations

import argparse
import os
import resource
import time
import types

import jax
import jax.numpy as jnp
import numpy as np

from m3jax import scoring

V = scoring.VOCAB_SIZE


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def zipf_sparse(rng, n: int, lo: int, hi: int) -> tuple[np.ndarray, np.ndarray]:
    """[n, hi] unique ids per row (1/rank frequencies, specials 0-3 excluded), -1 padded, with weights."""
    lengths = rng.integers(lo, hi + 1, n)
    ids = np.empty((n, hi), np.int32)
    for start in range(0, n, 20000):  # blocks keep the temporary [block, 3 * hi] arrays small
        m = min(20000, n - start)
        cand = (4 + np.exp(rng.random((m, 3 * hi)) * np.log(V - 4))).astype(np.int32).clip(4, V - 1)
        cand.sort(1)
        dup = np.zeros_like(cand, bool)
        dup[:, 1:] = cand[:, 1:] == cand[:, :-1]
        keys = np.where(dup, np.inf, rng.random(cand.shape))  # a random subset of the unique ids
        ids[start:start + m] = np.take_along_axis(cand, np.argsort(keys, 1)[:, :hi], 1)
    valid = np.arange(hi)[None] < lengths[:, None]
    ids = np.where(valid, ids, -1).astype(np.int32)
    weights = np.where(valid, rng.random((n, hi), dtype=np.float32) * 0.35, 0).astype(np.float32)
    return ids, weights


def colbert_vectors(rng, n: int, lo: int, hi: int, dim: int, dtype) -> tuple[np.ndarray, np.ndarray]:
    lengths = rng.integers(lo, hi + 1, n)
    mask = np.arange(hi)[None] < lengths[:, None]
    x = rng.standard_normal((n, hi, dim), dtype=np.float32)
    x /= np.linalg.norm(x, axis=-1, keepdims=True)
    x *= mask[..., None]
    return x.astype(dtype), mask


def timed(fn):
    t = time.perf_counter()
    out = fn()
    jax.block_until_ready(out)
    return out, time.perf_counter() - t


def report(name: str, pairs: int, ours: float, baselines: list[tuple[str, float, bool]], diff: float) -> None:
    print(f"\n== {name}: {pairs:,} pairs")
    print(f"   m3jax                       {ours:9.2f} s   ({pairs / ours / 1e6:8.2f} M pairs/s; includes compile)")
    for label, seconds, extrapolated in baselines:
        how = "extrapolated" if extrapolated else "measured"
        print(f"   {label:<27} {seconds:9.2f} s   ({how}; m3jax is {seconds / ours:7.1f}x faster)")
    print(f"   max |m3jax - reference| on the sample: {diff:.2e}      peak RSS so far: {peak_rss_gb():.2f} GB")


def bench_lexical(args, rng) -> None:
    from FlagEmbedding import BGEM3FlagModel

    q_ids, q_w = zipf_sparse(rng, args.queries, 10, 30)
    p_ids, p_w = zipf_sparse(rng, args.passages, 20, 150)
    print(f"\nlexical: {args.queries:,} queries (10-30 ids) x {args.passages:,} passages (20-150 ids), V={V:,}; "
          f"chunk {args.lexical_chunk}, query block {args.query_block}")
    scores, ours = timed(lambda: scoring.lexical_all_pairs(q_ids, q_w, p_ids, p_w, chunk_size=args.lexical_chunk,
                                                           query_block=args.query_block))
    scores = np.asarray(scores)
    print(f"   {(scores > 0).mean():.1%} of pairs share at least one id")

    def dicts(ids, w):
        return [{str(i): np.float32(x) for i, x in zip(r, rw, strict=True) if i >= 0} for r, rw in zip(ids, w,
                                                                                                       strict=True)]

    sq, sp = args.sample_queries, min(args.sample_passages, args.passages)
    lq, lp = dicts(q_ids[:sq], q_w[:sq]), dicts(p_ids[:sp], p_w[:sp])
    t = time.perf_counter()
    ref = BGEM3FlagModel.compute_lexical_matching_score(None, lq, lp)
    flag = (time.perf_counter() - t) * (args.queries * args.passages) / (sq * sp)
    diff = float(np.abs(scores[:sq, :sp] - ref).max())

    import scipy.sparse as sps

    def csr(ids, w):
        rows = np.broadcast_to(np.arange(ids.shape[0])[:, None], ids.shape)
        keep = ids >= 0
        return sps.csr_matrix((w[keep], (rows[keep], ids[keep])), shape=(ids.shape[0], V))

    t = time.perf_counter()
    sp_scores = (csr(q_ids, q_w) @ csr(p_ids, p_w).T).toarray()
    scipy_s = time.perf_counter() - t
    diff = max(diff, float(np.abs(sp_scores - scores).max()))
    del sp_scores
    report("lexical all-pairs", args.queries * args.passages, ours,
           [("FlagEmbedding dicts", flag, True), ("scipy.sparse CSR matmul", scipy_s, False)], diff)


def bench_colbert(args, rng) -> None:
    import torch
    from FlagEmbedding import BGEM3FlagModel
    from FlagEmbedding.finetune.embedder.encoder_only.m3.modeling import EncoderOnlyEmbedderM3Model

    dtype = jnp.dtype(args.colbert_dtype)
    q, q_mask = colbert_vectors(rng, args.queries, 10, 30, args.colbert_dim, dtype)
    p, p_mask = colbert_vectors(rng, args.colbert_passages, 50, 300, args.colbert_dim, dtype)
    gb_full = 100_000 * 150 * 1024 * 4 / 1e9
    print(f"\nColBERT: {args.queries:,} queries (10-30 tokens) x {args.colbert_passages:,} passages (50-300 tokens, "
          f"padded to 300), dim {args.colbert_dim}, {dtype} storage ({p.nbytes / 1e9:.2f} GB of passage vectors); "
          f"dim 1024 x 100,000 passages would need ~{gb_full:.0f} GB, so this run is smaller. "
          f"chunk {args.colbert_chunk}, query block {args.query_block}")
    scores, ours = timed(lambda: scoring.colbert_all_pairs(q, q_mask, p, p_mask, chunk_size=args.colbert_chunk,
                                                           query_block=args.query_block))
    scores = np.asarray(scores)

    q32, p32 = q.astype(np.float32), p.astype(np.float32)
    sq, sp = min(args.sample_queries, 8), min(args.sample_passages // 10, args.colbert_passages)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny per-pair einsums: one thread is faster and immune to a busy second core
    t = time.perf_counter()
    ref = np.array([[float(BGEM3FlagModel.colbert_score(None, q32[i][q_mask[i]], p32[j][p_mask[j]]))
                     for j in range(sp)] for i in range(sq)])
    pairwise = (time.perf_counter() - t) * (args.queries * args.colbert_passages) / (sq * sp)
    torch.set_num_threads(threads)
    diff = float(np.abs(scores[:sq, :sp] - ref).max())

    # compute_score's batched torch maths (padded batches; floor at 0 from the padding), one query block at a time.
    stub = types.SimpleNamespace(temperature=1.0)
    qb, pb = args.query_block, min(args.colbert_chunk, args.colbert_passages)
    cls_mask = torch.from_numpy(np.concatenate([np.ones((qb, 1), bool), q_mask[:qb]], 1).astype(np.int64))
    t = time.perf_counter()
    with torch.inference_mode():
        batched = EncoderOnlyEmbedderM3Model.compute_colbert_score(stub, torch.from_numpy(q32[:qb]),
                                                                   torch.from_numpy(p32[:pb]), q_mask=cls_mask)
    torch_s = (time.perf_counter() - t) * (args.queries * args.colbert_passages) / (qb * pb)
    floored = np.asarray(scoring.colbert_all_pairs(q[:qb], q_mask[:qb], p[:pb], p_mask[:pb], zero_floor=True))
    diff = max(diff, float(np.abs(floored - batched.numpy()).max()))
    report("ColBERT all-pairs", args.queries * args.colbert_passages, ours,
           [("FlagEmbedding colbert_score", pairwise, True), ("FlagEmbedding batched torch", torch_s, True)], diff)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="small sizes (under a minute)")
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--passages", type=int, default=100_000, help="lexical corpus size")
    ap.add_argument("--colbert-passages", type=int, default=2000)
    ap.add_argument("--colbert-dim", type=int, default=128)
    ap.add_argument("--colbert-dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--lexical-chunk", type=int, default=scoring.LEXICAL_CHUNK)
    ap.add_argument("--colbert-chunk", type=int, default=scoring.COLBERT_CHUNK)
    ap.add_argument("--query-block", type=int, default=16)
    ap.add_argument("--sample-queries", type=int, default=20, help="baseline sample (then extrapolated)")
    ap.add_argument("--sample-passages", type=int, default=2000)
    ap.add_argument("--skip", choices=["lexical", "colbert"], action="append", default=[])
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.quick:
        args.queries, args.passages, args.colbert_passages = 100, 10_000, 300
        args.sample_queries, args.sample_passages = 10, 1000
    print(f"jax {jax.__version__} on {jax.devices()[0].platform} ({os.cpu_count()} CPUs, load average "
          f"{os.getloadavg()[0]:.1f} at start); {'quick' if args.quick else 'full'} run")
    rng = np.random.default_rng(args.seed)
    if "lexical" not in args.skip:
        bench_lexical(args, rng)
    if "colbert" not in args.skip:
        bench_colbert(args, rng)
    print(f"\npeak RSS: {peak_rss_gb():.2f} GB")


if __name__ == "__main__":
    main()
