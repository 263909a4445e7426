"""The embedding job: stream a corpus through the encoder into sharded Parquet, resumable and multi-host.

Shard k holds input rows [k * shard_size, (k + 1) * shard_size), in input order. A background thread reads,
tokenises and plans windows ahead while the main thread keeps the device busy (one continuous stream of batches
across windows and shards) and writes each window's rows, back in input order, into the shard's temporary file;
the file is renamed when the shard is complete. A rerun with the same arguments skips the finished shards (their
rows are only read, to check their sha256 against the shard's), removes temporary leftovers and writes the rest
exactly as an uninterrupted run would.

Multi-host (m3jax.distributed): process p of P owns the shards k with k % P == p; every process reads (but only
counts) the rows of the others' shards, so the split needs no communication, and checks its own finished ones. Each
writes its own shards; process 0 writes _job.json before the first barrier and the manifest after the last.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import logging
import os
import posixpath
import queue
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from m3jax import distributed, pipeline
from m3jax._io import settings_diff
from m3jax.compact import MuveraConfig, formats, int8_ranges
from m3jax.embed import writer
from m3jax.embed.planner import ShardEnd, Window, plan_windows
from m3jax.embed.sink import ShardSink, WindowOutputs
from m3jax.embed.sources import InputError, Rows, resolve_inputs

logger = logging.getLogger("m3jax")

# Texts and tokens planned together (sorted and batched as one window), by platform: see default_windows.
CPU_WINDOW = (4096, 1 << 20)
ACCELERATOR_WINDOW_TOKENS = 1 << 21

EMPTY_TEXTS = "kept: an empty line or text is embedded as an empty text (<s></s>) and counted in empty_texts"


class EmbedError(ValueError):
    """A job that cannot run as asked: output directory, settings mismatch, inconsistent resume."""


@dataclasses.dataclass(frozen=True)
class Settings:
    """Everything that decides the output bytes; a resume must match it exactly."""

    outputs: tuple[str, ...] = pipeline.HEADS
    max_length: int = 512
    batch_size: int = 256
    max_tokens_per_batch: int | None = None  # None: the Encoder's default (see m3jax.engine.Encoder)
    length_buckets: tuple[int, ...] | None = None
    shard_size: int = 10_000
    window: int = 4096
    window_tokens: int = 1 << 20
    dense_dtype: str = "float32"
    colbert_dtype: str = "float16"
    text_field: str = "text"
    id_field: str | None = None
    dtype: str = "float32"
    attn_impl: str = "auto"
    mcls_interval: int | None = None
    mesh: str = "host"  # "global": the processes drive one mesh in lockstep (see embed's `mesh`)
    pool_factor: int = 1
    muvera: MuveraConfig | None = None
    calibration_rows: int = 1000  # int8 outputs: the first rows, embedded to calibrate the ranges
    int8_ranges_sha256: str | None = None  # int8 outputs with ranges given instead of calibrated

    def int8_heads(self) -> tuple[str, ...]:
        """The outputs stored as int8 codes, which need calibration ranges."""
        return tuple(h for h in ("dense", "colbert") if h in self.outputs and getattr(self, f"{h}_dtype") == "int8")

    def out_formats(self, ranges: dict | None = None) -> tuple[tuple[str, Any], ...]:
        """The formats the compiled step gives its outputs (Encoder.run's out_formats); ranges: the int8 outputs'
        calibration ranges. Pooled ColBERT vectors leave the device as float32, to be pooled, then stored."""
        colbert = "float32" if self.pool_factor > 1 else self.colbert_format(ranges)
        out = (("dense", self._format("dense", self.dense_dtype, ranges)), ("colbert", colbert))
        return out + ((("muvera", self.muvera),) if self.muvera is not None else ())

    def colbert_format(self, ranges: dict | None = None) -> Any:
        return self._format("colbert", self.colbert_dtype, ranges)

    @staticmethod
    def _format(head: str, dtype: str, ranges: dict | None) -> Any:
        if dtype != "int8":
            return dtype
        if not ranges or head not in ranges:
            raise EmbedError(f"{head} as int8 needs calibration ranges (embed() calibrates them, or takes "
                             "int8_ranges)")
        return formats.Int8(ranges[head])

    def check(self, max_length_limit: int | None) -> None:
        if not self.outputs or set(self.outputs) - set(pipeline.HEADS):
            raise ValueError(f"outputs must be a non-empty subset of {pipeline.HEADS}, got {self.outputs!r}")
        for name in ("batch_size", "max_tokens_per_batch", "shard_size", "window", "window_tokens"):
            v = getattr(self, name)
            if v is None and name == "max_tokens_per_batch":
                continue
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if isinstance(self.max_length, bool) or not isinstance(self.max_length, int) or not (
                1 <= self.max_length <= (max_length_limit or self.max_length)):
            raise ValueError(f"max_length must be in 1 ... {max_length_limit}, got {self.max_length}")
        for name, allowed in (("dense_dtype", formats.DENSE_PRECISIONS), ("colbert_dtype", formats.COLBERT_PRECISIONS)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        for name in ("pool_factor", "calibration_rows"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if self.pool_factor > 1 and "colbert" not in self.outputs:
            raise ValueError("pool_factor pools the ColBERT vectors: add 'colbert' to outputs")
        if self.muvera is not None and not isinstance(self.muvera, MuveraConfig):
            raise TypeError(f"muvera must be a m3jax.compact.MuveraConfig or None, got {self.muvera!r}")
        m = self.mcls_interval
        if m is not None and (isinstance(m, bool) or not isinstance(m, int) or m < 1):
            raise ValueError(f"mcls_interval must be a positive int or None, got {m!r}")
        if self.mesh not in ("host", "global"):
            raise ValueError(f"mesh must be 'host' or 'global', got {self.mesh!r}")


def embed(source: str | os.PathLike | Sequence[str] | Iterable, model: Any, output: str | os.PathLike, *,
          files: bool | None = None, source_id: str | None = None, outputs: Sequence[str] = pipeline.HEADS,
          max_length: int = 512, batch_size: int = 256,
          shard_size: int = 10_000, window: int | None = None, window_tokens: int | None = None,
          dense_dtype: str = "float32",
          colbert_dtype: str = "float16", text_field: str = "text", id_field: str | None = None,
          dtype: str = "float32", attn_impl: str = "auto", max_tokens_per_batch: int | None = None,
          length_buckets: Sequence[int] | None = None, mcls_interval: int | None = None, pool_factor: int = 1,
          muvera: MuveraConfig | str | None = None, calibration_rows: int = 1000,
          int8_ranges: Mapping[str, Any] | None = None, devices: Any = None,
          mesh: str = "auto", coordinator: str | None = None,
          num_processes: int | None = None, process_id: int | None = None, quiet: bool = False,
          callback: Callable[[dict], None] | None = None) -> dict:
    """Embeds a corpus into `output` (a local path or fsspec URL) and returns the manifest.

    Args:
      source: a path, URL or glob (`.txt`, `.jsonl`, `.parquet`, optionally compressed) or a list of them; or any
        other iterable of (id, text) pairs or of strings (an id None, or a plain string, gets its input position).
      files: whether `source` names files. None: by type (a str or os.PathLike, or a list of os.PathLike, names
        files; any other iterable holds texts), except that a list of strings that all name existing files, globs or
        URLs is refused as ambiguous; True: a path, URL or glob, or a list of them; False: texts.
      source_id: a name for the input, part of the job's identity (a resume under another source_id is refused).
        Whatever it is, every shard records the sha256 of its input rows (ids and texts), and a resume re-reads the
        rows of its finished shards and refuses to go on if any changed, naming the shard: two corpora never mix.
      model: a model path (m3jax or release directory, hub id), loaded with dtype, attn_impl, length_buckets and
        max_tokens_per_batch and kept for the next call in this process; or an Encoder built with those same
        values (they are recorded in the job settings as passed here).
      outputs: any of "dense", "sparse", "colbert".
      shard_size: input rows per shard file. window / window_tokens: the rows sorted and batched together (memory
        is bounded by a window's outputs: window_tokens x ColBERT dim); None: default_windows for the platform.
      dense_dtype / colbert_dtype: "float32" or "float16" in the files (sparse weights are always float32); or the
        compact outputs of m3jax.compact, computed in the compiled step: "int8" (dense or ColBERT; codes of
        calibration ranges, see below) or "binary" (dense; sentence-transformers' packed sign bits, D / 8 bytes).
      calibration_rows / int8_ranges: int8 outputs quantize each dimension's range [min, max] into 256 bins. The
        ranges come from int8_ranges ({"dense": [2, D], "colbert": [2, C]}, e.g. an earlier output's
        EmbeddingReader.int8_ranges, so two corpora share them) or are calibrated on the input's first
        calibration_rows rows (embedded once more for it; a resume reuses the recorded ranges). The manifest's
        "compact" records them: queries must be quantized with the same ranges.
      pool_factor: ColBERT token pooling (m3jax.compact.pool_tokens, PyLate's pool_factor): each passage's vectors
        Ward-clustered into about tokens / pool_factor mean vectors, on the host, before their dtype is applied.
      muvera: a m3jax.compact.MuveraConfig, or "default" (fastembed's defaults at the model's ColBERT width): adds a
        `muvera` column, the MUVERA fixed-dimensional encoding of each passage's (unpooled) ColBERT vectors,
        computed in the compiled step (fastembed's process_document).
      mcls_interval: multiple CLS, a `<s>` every that many text tokens, dense = mean of their hidden states (see
        m3jax.BGEM3.encode for what it does to max_length, sparse and ColBERT); the `tokens` column still counts
        each text's own tokens. None: plain BGE-M3.
      coordinator, num_processes, process_id: multi-host run over jax.distributed (see m3jax.distributed).
      mesh: how the processes of a multi-host run use their devices. "host": each drives its own devices on its own
        shards, independently (the output is bit-identical to one process's); "global": one mesh over every
        process's devices, one executable per step run in lockstep (see m3jax.engine.Encoder), each process still
        feeding and writing its own shards. Large v5e slices (32 chips and more) can only run this way: libtpu
        refuses an executable on one host's chips there. Its output equals one process's to float rounding (a
        step's shape depends on what the other processes bring). "auto" (the default): "global" on a multi-host
        TPU, else "host". With `model` an Encoder, its devices decide.
      callback: called in the main thread after each window is written, with {"shard", "rows", "shard_done"}.
    """
    t_start = time.perf_counter()
    pid, nproc = distributed.initialize(coordinator, num_processes, process_id)
    from m3jax.engine import Encoder

    mesh = _mesh(mesh, model, devices, nproc)
    if window is None or window_tokens is None:
        from m3jax.engine import resolve_devices

        platform = model.platform if isinstance(model, Encoder) else resolve_devices(
            "global" if mesh == "global" else devices)[0].platform
        default = default_windows(platform, shard_size)
        window, window_tokens = window or default[0], window_tokens or default[1]
    settings = Settings(outputs=tuple(h for h in pipeline.HEADS if h in outputs), max_length=max_length,
                        batch_size=batch_size, max_tokens_per_batch=max_tokens_per_batch,
                        length_buckets=tuple(int(b) for b in length_buckets) if length_buckets else None,
                        shard_size=shard_size, window=window, window_tokens=window_tokens, dense_dtype=dense_dtype,
                        colbert_dtype=colbert_dtype, text_field=text_field, id_field=id_field, dtype=dtype,
                        attn_impl=attn_impl, mcls_interval=mcls_interval, mesh=mesh, pool_factor=pool_factor,
                        muvera=None if muvera == "default" else muvera, calibration_rows=calibration_rows,
                        int8_ranges_sha256=_ranges_sha256(int8_ranges))
    if set(outputs) - set(pipeline.HEADS):
        raise ValueError(f"outputs must be a non-empty subset of {pipeline.HEADS}, got {tuple(outputs)!r}")
    settings.check(None)
    paths = _files(source, files)
    inputs = resolve_inputs(paths) if paths is not None else None

    import fsspec

    fs, root = fsspec.core.url_to_fs(str(output))
    if fs.exists(root) and not fs.isdir(root):
        raise EmbedError(f"output {output}: is a file; give a directory (new or from an earlier run)")

    encoder = model if isinstance(model, Encoder) else _encoder(model, settings,
                                                                "global" if mesh == "global" else devices)
    cfg = encoder.config
    if muvera == "default":
        settings = dataclasses.replace(settings, muvera=MuveraConfig(dim=cfg.colbert_dim))
    settings.check(cfg.max_length)  # now that the model's limit is known
    encoder.check_mcls(settings.max_length, settings.mcls_interval)
    dims = {"dense": cfg.hidden_size, "colbert": cfg.colbert_dim}
    if settings.muvera is not None and settings.muvera.dim != cfg.colbert_dim:
        raise ValueError(f"muvera: MuveraConfig.dim is {settings.muvera.dim}, the model's ColBERT vectors have "
                         f"{cfg.colbert_dim}")
    job = _job_spec(settings, encoder, inputs, source_id)

    lock = writer.OutputLock(fs, root)
    if pid == 0:
        fresh = _check_output(fs, root, job, output)
        fs.makedirs(root, exist_ok=True)
        try:
            lock.acquire(output)
        except writer.LockedError as e:
            raise EmbedError(str(e)) from None
    try:
        if settings.int8_heads():  # every process: given, recorded, or calibrated alike (deterministic)
            job["int8_ranges"] = _ranges(settings, int8_ranges, fs, root, job, inputs, source, encoder, dims, mesh)
        if pid == 0 and fresh:
            writer.write_json(fs, posixpath.join(root, writer.JOB_FILE), job)
        return _run_job(_Job(fs, root, output, job, settings, encoder, inputs, source, dims, pid, nproc), quiet,
                        callback, t_start)
    finally:
        lock.release()


def _job_spec(settings: Settings, encoder, inputs: list | None, source_id: str | None) -> dict:
    """_job.json: what decides the output (format, model, settings, input), and its key, a hash of the rest."""
    recorded = dataclasses.asdict(settings)
    if not settings.int8_heads() or settings.int8_ranges_sha256 is not None:
        del recorded["calibration_rows"]
    for name, default in (("mcls_interval", None), ("mesh", "host"), ("pool_factor", 1), ("muvera", None),
                          ("int8_ranges_sha256", None)):
        if recorded[name] == default:  # plain runs keep the job key they had before these existed
            del recorded[name]
    job = {"format": writer.FORMAT, "version": writer.VERSION,
           "model": {"fingerprint": encoder.fingerprint(), "config": encoder.config.to_hf_config()},
           "settings": recorded,
           "input": {"files": [{"path": f["path"], "size": f["size"]} for f in inputs]} if inputs is not None
           else {"iterable": True}}
    if source_id is not None:
        job["input"]["source_id"] = str(source_id)
    job = json.loads(json.dumps(job))  # tuples as lists, as they read back
    job["key"] = hashlib.sha256(json.dumps(job, sort_keys=True).encode()).hexdigest()[:16]
    return job


def _ranges_sha256(given: Mapping[str, Any] | None) -> str | None:
    if given is None:
        return None
    h = hashlib.sha256()
    for head in sorted(given):
        h.update(head.encode() + formats.Int8(given[head]).ranges.tobytes())
    return h.hexdigest()[:16]


def _ranges(settings: Settings, given: Mapping[str, Any] | None, fs, root: str, job: dict, inputs, source, encoder,
            dims: dict, mesh: str) -> dict[str, list]:
    """The int8 outputs' calibration ranges, as lists for _job.json: given, recorded by an earlier run of this job,
    or calibrated on the input's first calibration_rows rows."""
    heads = settings.int8_heads()
    if given is not None:
        missing = [h for h in heads if h not in given]
        if missing:
            raise EmbedError(f"int8_ranges: no ranges for {missing[0]!r}, which is stored as int8")
        out = {}
        for h in heads:
            r = formats.Int8(given[h]).ranges
            if r.shape[1] != dims[h]:
                raise EmbedError(f"int8_ranges[{h!r}]: expected shape (2, {dims[h]}) (the model's {h} width), got "
                                 f"{r.shape}")
            out[h] = r.tolist()
        return out
    path = posixpath.join(root, writer.JOB_FILE)
    old = writer.read_json(fs, path) if fs.exists(path) else None
    if old is not None and old.get("key") == job["key"] and set(heads) <= set(old.get("int8_ranges", {})):
        return {h: old["int8_ranges"][h] for h in heads}
    if mesh == "global":
        raise EmbedError("int8 outputs on a global mesh need int8_ranges given (calibration runs on one process)")
    if inputs is not None:
        rows = Rows(inputs, text_field=settings.text_field, id_field=settings.id_field)
    elif isinstance(source, Sequence):
        rows = Rows(iterable=source)
    else:
        raise EmbedError(f"int8 outputs calibrate on the first rows of the input, which a one-pass "
                         f"{type(source).__name__} cannot give twice: pass a list or files, or int8_ranges")
    try:
        texts = [t for _, t in rows.take(settings.calibration_rows)]
    finally:
        rows.close()
    if not texts:
        raise EmbedError("int8 outputs calibrate on the input's first rows, and the input has none")
    res = encoder.encode(texts, batch_size=settings.batch_size, max_length=settings.max_length, heads=heads,
                         mcls_interval=settings.mcls_interval)
    calibration = {"dense": lambda: res.dense, "colbert": lambda: res.colbert_flat()[0]}
    return {h: np.asarray(int8_ranges(calibration[h]())).tolist() for h in heads}


@dataclasses.dataclass(frozen=True)
class _Job:
    """A job once set up: where it writes, what it reads, with which encoder, as which process."""

    fs: Any
    root: str
    output: Any  # as the user gave it, for messages
    spec: dict  # _job.json's content, its key included
    settings: Settings
    encoder: Any
    inputs: list | None  # resolve_inputs' files, or None for an iterable
    source: Any
    dims: dict
    pid: int
    nproc: int

    @property
    def key(self) -> str:
        return self.spec["key"]

    @property
    def ranges(self) -> dict | None:
        return self.spec.get("int8_ranges")

    def schema(self):
        s = self.settings
        return writer.schema(s.outputs, self.dims, s.dense_dtype, s.colbert_dtype,
                             s.muvera.out_dim if s.muvera is not None else None)


def _run_job(job: _Job, quiet: bool, callback, t_start: float) -> dict:
    """embed() once the job is known and its output directory held: the resume scan, the loop, the manifest."""
    done = _resume_scan(job)
    s, encoder = job.settings, job.encoder
    stats, waited = _Stats(), encoder.compile_wait_s
    progress = None if quiet else _progress()

    def on_shard(info: dict) -> None:
        if callback is not None:
            callback({"shard": info["shard"], "rows": info["rows"], "shard_done": True})

    def on_window(w: Window, rows: int) -> None:
        stats.window(w)
        if progress is not None:
            progress.update(w.n)
            progress.set_postfix_str(f"{stats.tokens / max(1e-9, time.perf_counter() - stats.t0):,.0f} tok/s",
                                     refresh=False)
        if callback is not None:
            callback({"shard": w.shard, "rows": rows, "shard_done": False})

    sink = ShardSink(job.fs, job.root, job.schema(), job.key, on_shard)
    out_formats = s.out_formats(job.ranges)
    feed = _Feed(_Prefetch(lambda: _produce(job.inputs, job.source, s, encoder, done, job.pid, job.nproc,
                                            out_formats)))
    try:
        end = _write_all(encoder, feed, sink, s, stats, on_window, out_formats, s.colbert_format(job.ranges))
    except BaseException:
        feed.prefetch.stop()
        sink.abort()
        raise
    finally:
        if progress is not None:
            progress.close()

    distributed.barrier("shards")
    manifest = None
    if job.pid == 0:
        manifest = _write_manifest(job, end.rows)
    distributed.barrier("manifest")
    if manifest is None:
        manifest = writer.read_json(job.fs, posixpath.join(job.root, writer.MANIFEST))
    wall, waited = time.perf_counter() - t_start, encoder.compile_wait_s - waited
    if not quiet:
        pad = stats.padded / stats.tokens - 1 if stats.tokens else 0.0
        skipped = f"; {len(done)} finished shard(s) skipped" if done else ""
        proc = f" (process {job.pid} of {job.nproc})" if job.nproc > 1 else ""
        print(f"m3jax embed{proc}: {stats.texts:,} texts, {stats.tokens:,} tokens, padding overhead {pad:.1%}, "
              f"{len(stats.shapes)} compiled shapes ({waited:.1f}s waiting for compiles), {wall:.1f}s wall, "
              f"{stats.tokens / max(wall, 1e-9):,.0f} tokens/s{skipped}", file=sys.stderr)
    manifest = dict(manifest)
    manifest["run"] = {"texts": stats.texts, "tokens": stats.tokens, "padded_tokens": stats.padded,
                       "shapes": sorted(stats.shapes), "wall_s": wall, "skipped_shards": sorted(done),
                       "compile_wait_s": waited}
    return manifest


def _resume_scan(job: _Job) -> dict[int, dict]:
    """The finished shards of an earlier run of this job ({k: their info}); removes this process's leftover
    temporary files. Every process checks the output directory once process 0 has set it up."""
    distributed.barrier("job")
    if job.pid != 0:
        _check_output(job.fs, job.root, job.spec, job.output)
    finals, tmps = writer.list_shards(job.fs, job.root)
    done = {}
    for k, path in sorted(finals.items()):
        info = writer.shard_info(job.fs, path)
        if info is None or info.get("key") != job.key or info.get("shard") != k:
            raise EmbedError(f"{path}: not a finished shard of this job (unreadable, or written with other "
                             f"settings); remove it or use a new output directory")
        done[k] = info
    for k, path in tmps.items():  # leftovers of a killed run; each process cleans its own
        if k % job.nproc == job.pid:
            job.fs.rm(path)
    return done


class _Feed:
    """The batches of the windows the reader sends, in order. What it sent (windows and shard ends) waits in
    `pending` until written; its end marker, and an error it raised, are kept for after the batches (the rows read
    before a bad one are written first)."""

    def __init__(self, prefetch: _Prefetch):
        self.prefetch = prefetch
        self.pending: collections.deque = collections.deque()
        self.end: _End | None = None
        self.error: Exception | None = None

    def __iter__(self):
        try:
            for item in self.prefetch:
                self.pending.append(item)
                if isinstance(item, Window):
                    yield from item.batches
                elif isinstance(item, _End):
                    self.end = item
        except Exception as e:  # noqa: BLE001 - raised by _write_all once the rows before it are written
            self.error = e


def _write_all(encoder, feed: _Feed, sink: ShardSink, settings: Settings, stats: _Stats,
               on_window: Callable[[Window, int], None], out_formats: tuple, colbert_format: Any) -> _End:
    """The loop: every batch through the encoder, each window written once all its batches are back, each shard
    committed at its end; returns the end marker (raises the reader's error after the shards before it)."""

    def commit_ended() -> None:
        while feed.pending and not isinstance(feed.pending[0], Window):
            item = feed.pending.popleft()
            if isinstance(item, ShardEnd):
                sink.commit(item)

    acc: WindowOutputs | None = None
    for batch, out in encoder.run(feed, heads=settings.outputs, out_formats=out_formats):
        commit_ended()
        w = feed.pending[0]
        if acc is None or acc.window is not w:
            acc = WindowOutputs(w, settings, colbert_format)
        acc.add(batch, out)
        stats.batch(batch)
        if acc.complete:
            feed.pending.popleft()
            on_window(w, sink.write(w, acc))
            acc = None
    commit_ended()
    if feed.error is not None:  # shards completed before the bad row are committed; the current one is dropped
        raise feed.error
    if feed.end is None or feed.pending:
        raise RuntimeError("the input stream ended without its end marker")  # a bug, never user input
    return feed.end


# ------------------------------------------------------------------------------------------------------ pieces
def default_windows(platform: str, shard_size: int) -> tuple[int, int]:
    """(window, window_tokens) on `platform`. CPU: 4,096 texts / 1M tokens. Accelerators: a whole shard / 2M tokens
    (ColBERT outputs of up to 4 GiB held on the host): a bigger window leaves fewer partial batches, so fewer shapes
    to compile, which take seconds each there (benchmarks/tpu_compile_budget.py), and pads less."""
    return CPU_WINDOW if platform == "cpu" else (shard_size, ACCELERATOR_WINDOW_TOKENS)


def _files(source, files: bool | None) -> list[str] | None:
    """The paths `source` names, or None when it holds texts (see embed's `files`)."""
    single = isinstance(source, (str, os.PathLike))
    listed = isinstance(source, (list, tuple)) and bool(source) and all(isinstance(s, (str, os.PathLike))
                                                                        for s in source)
    if files is False:
        if single:
            raise EmbedError(f"files=False takes an iterable of texts or (id, text) pairs, got one "
                             f"{type(source).__name__} ({os.fspath(source)!r:.60}); pass [text] for one text")
        return None
    if single:
        return [os.fspath(source)]
    if listed and (files or all(isinstance(s, os.PathLike) for s in source)):
        return [os.fspath(s) for s in source]
    if files:
        raise EmbedError(f"files=True takes a path, URL or glob or a list of them, got {type(source).__name__}")
    if listed and all(_names_input(os.fspath(s)) for s in source):
        raise EmbedError(f"source: a list of {len(source)} strings that all name files, globs or URLs (the first: "
                         f"{os.fspath(source[0])!r:.60}); pass files=True to read them, or files=False to embed the "
                         "strings themselves")
    return None


def _mesh(mesh: str, model, devices, nproc: int) -> str:
    """embed's `mesh` resolved to "host" or "global"."""
    import jax

    from m3jax.engine import Encoder

    if mesh not in ("auto", "host", "global"):
        raise ValueError(f"mesh must be 'auto', 'host' or 'global', got {mesh!r}")
    if isinstance(model, Encoder):
        found = "global" if model.processes > 1 else "host"
        if mesh not in ("auto", found):
            raise EmbedError(f"mesh={mesh!r}, but the Encoder given spans {model.processes} process(es): {found}")
        return found
    if mesh == "global" and devices is not None:
        raise EmbedError("mesh='global' uses every process's devices; leave devices unset")
    if mesh == "auto":
        return "global" if nproc > 1 and devices is None and jax.devices()[0].platform == "tpu" else "host"
    return mesh


def _names_input(s: str) -> bool:
    import glob

    return "://" in s or glob.has_magic(s) or os.path.isfile(s)


def _hash_rows(h, rows) -> None:
    """Adds (id, text) rows to a sha256: the identity of a shard's input."""
    for rid, text in rows:
        h.update(json.dumps([rid, text], ensure_ascii=False).encode())  # sources refuse unpaired surrogates
        h.update(b"\n")


def _read_done_shard(rows: Rows, n: int, chunk: int) -> tuple[int, str]:
    """Reads (not embeds) the next n rows, a finished shard's: (how many there were, their sha256)."""
    h, got = hashlib.sha256(), 0
    while got < n:
        part = rows.take(min(chunk, n - got))
        _hash_rows(h, part)
        got += len(part)
        if not part:
            break
    return got, h.hexdigest()


_LAST_ENCODER: dict = {}  # the last model loaded, so repeated calls in one process reuse it and its executables


def _encoder(model, settings: Settings, devices):
    from m3jax.engine import Encoder

    key = (os.fspath(model), settings.dtype, None if devices is None else tuple(devices), settings.attn_impl,
           settings.length_buckets, settings.max_tokens_per_batch)
    if key not in _LAST_ENCODER:
        _LAST_ENCODER.clear()
        _LAST_ENCODER[key] = Encoder.from_pretrained(
            model, dtype=settings.dtype, devices=devices, attn_impl=settings.attn_impl,
            length_buckets=settings.length_buckets, max_tokens_per_batch=settings.max_tokens_per_batch)
    return _LAST_ENCODER[key]


def _check_output(fs, root: str, job: dict, output) -> bool:
    """An existing output directory must hold this very job, or no finished shard; True: (re)write _job.json."""
    old = writer.read_json(fs, posixpath.join(root, writer.JOB_FILE)) if fs.exists(root) else None
    if old is not None and old.get("key") == job["key"]:
        return False
    finals, _ = writer.list_shards(fs, root)
    if not finals and not fs.exists(posixpath.join(root, writer.MANIFEST)):
        return True  # nothing of an earlier job to keep apart from this one
    if old is None:
        raise EmbedError(f"output {output}: holds shards but no {writer.JOB_FILE}; not resumable, use a new "
                         "directory")
    raise EmbedError(f"output {output} was written by a different job; use a new --output directory or delete it. "
                     f"Differences: {settings_diff(old, job, str(output), ignore=('key', 'int8_ranges'))}")


@dataclasses.dataclass
class _End:
    rows: int  # total input rows


def _produce(inputs, source, settings: Settings, encoder, done: dict, pid: int, nproc: int, out_formats: tuple):
    """Windows and shard ends of this process's shards, in order, then _End (runs in the prefetch thread)."""
    rows = Rows(inputs, text_field=settings.text_field, id_field=settings.id_field) if inputs is not None else \
        Rows(iterable=source)
    S, k = settings.shard_size, 0
    try:
        while True:
            start = rows.position
            if k % nproc != pid or k in done:
                # A finished shard's rows are checked by the process that owns it; the others only count them.
                mine = k in done and k % nproc == pid
                n, digest = _read_done_shard(rows, S, settings.window) if mine else (rows.skip(S), None)
                if k in done and (n != done[k]["rows"] or start != done[k]["first_row"]):
                    raise EmbedError(f"shard {k} was written from input rows {done[k]['first_row']} ... "
                                     f"{done[k]['first_row'] + done[k]['rows'] - 1}, but the input now has rows "
                                     f"{start} ... {start + n - 1} there: the input changed since")
                if mine and done[k].get("input_sha256", digest) != digest:
                    raise EmbedError(f"shard {k}: input rows {start} ... {start + n - 1} are not the ones it was "
                                     "written from (their sha256 differs): the input changed since; resuming would "
                                     "mix two corpora. Restore the input, or use a new output directory")
                if n < S:
                    break
                k += 1
                continue
            taken, h = 0, hashlib.sha256()
            while taken < S:
                want = min(settings.window, S - taken)
                chunk = rows.take(want)
                _hash_rows(h, chunk)
                if chunk:
                    windows = plan_windows(encoder, k, start + taken, chunk, max_length=settings.max_length,
                                           batch_size=settings.batch_size, window_tokens=settings.window_tokens,
                                           mcls_interval=settings.mcls_interval)
                    # New shapes compile in the background while the devices run the batches before them.
                    shapes = {(b.input_ids.shape[1], b.input_ids.shape[0] * encoder.processes): None
                              for w in windows for b in w.batches}
                    encoder.prepare(shapes, settings.outputs, settings.mcls_interval, out_formats)
                    yield from windows
                taken += len(chunk)
                if len(chunk) < want:
                    break
            if taken:
                yield ShardEnd(k, start, taken, h.hexdigest())
            if taken < S:
                break
            k += 1
        yield _End(rows.position)
    finally:
        rows.close()


class _Prefetch:
    """Runs a generator in a background thread, a few items ahead; exceptions re-raise in the consumer."""

    def __init__(self, make, depth: int = 4):
        self._q: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(make,), daemon=True, name="m3jax-embed-reader")
        self._thread.start()

    def _run(self, make) -> None:
        try:
            for item in make():
                if not self._put(("item", item)):
                    return
        except BaseException as e:  # noqa: BLE001 - handed to the consumer
            self._put(("error", e))
            return
        self._put(("done", None))

    def _put(self, x) -> bool:
        while not self._stop.is_set():
            try:
                self._q.put(x, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def __iter__(self):
        while True:
            kind, x = self._q.get()
            if kind == "error":
                raise x
            if kind == "done":
                return
            yield x

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)


class _Stats:
    def __init__(self):
        self.t0 = time.perf_counter()
        self.texts = self.tokens = self.padded = 0
        self.shapes: set = set()

    def batch(self, b) -> None:
        rows, L = b.input_ids.shape
        self.padded += rows * L
        self.shapes.add((int(L), int(rows)))

    def window(self, w: Window) -> None:
        self.texts += w.n
        self.tokens += int(w.lengths.sum())


def _progress():
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm(desc="m3jax embed", unit=" texts", unit_scale=True, file=sys.stderr)


def _write_manifest(j: _Job, total_rows: int) -> dict:
    """Checks that shards 0 ... K-1 are all there and finished, then writes _manifest.json (process 0)."""
    fs, root, job, settings, dims, encoder, nproc = j.fs, j.root, j.spec, j.settings, j.dims, j.encoder, j.nproc
    n_shards = -(-total_rows // settings.shard_size)
    finals, _ = writer.list_shards(fs, root)
    shards = []
    for k in range(n_shards):
        info = writer.shard_info(fs, finals[k]) if k in finals else None
        if info is None or info.get("key") != job["key"]:
            raise EmbedError(f"shard {k} of {n_shards} is missing or unfinished in {root}; rerun the job to "
                             f"complete it")
        shards.append({x: info[x] for x in ("file", "shard", "first_row", "rows", "tokens", "empty_texts",
                                            "truncated")})
    extra = sorted(set(finals) - set(range(n_shards)))
    if extra:
        raise EmbedError(f"{root}: shard files past the end of the input ({[writer.shard_name(k) for k in extra]})")
    # Repeated ids are kept (row i is input row i) and counted: the rows that repeat an earlier row's id.
    duplicates, dup_id, dup_rows = writer.duplicate_ids(fs, [finals[k] for k in range(n_shards)])
    if duplicates:
        at = ", ".join(map(str, dup_rows[:10])) + (f", ... ({len(dup_rows)} rows)" if len(dup_rows) > 10 else "")
        logger.warning("%s: %d row(s) repeat the id of an earlier row (kept, counted in the manifest's duplicate_ids); "
                       "the first repeated id is %r, at rows %s", root, duplicates, dup_id, at)
    manifest = {**job, "model": {**job["model"], "dtype": settings.dtype},
                "schema": {f.name: str(f.type) for f in j.schema()},
                "dims": {h: dims[h] for h in settings.outputs if h in dims},
                "compact": _compact(settings, j.ranges),
                "vocab_size": encoder.config.vocab_size,
                "empty_texts_policy": EMPTY_TEXTS,
                "rows": total_rows, "tokens": sum(s["tokens"] for s in shards),
                "empty_texts": sum(s["empty_texts"] for s in shards),
                "truncated": sum(s["truncated"] for s in shards),
                "duplicate_ids": duplicates,
                "shards": shards,
                "runtime": {"processes": nproc, "local_devices": len(getattr(encoder, "local_devices", []) or []),
                            "platform": encoder.platform}}
    writer.write_json(fs, posixpath.join(root, writer.MANIFEST), manifest)
    return manifest


def _compact(s: Settings, ranges: dict | None) -> dict:
    """The manifest's record of the compact outputs: what a reader needs to score them."""
    out = {"dense": s.dense_dtype, "colbert": s.colbert_dtype, "pool_factor": s.pool_factor,
           "muvera": dataclasses.asdict(s.muvera) if s.muvera is not None else None}
    if ranges:
        out["int8_ranges"] = ranges
    return out


__all__ = ["EMPTY_TEXTS", "EmbedError", "InputError", "Settings", "embed"]
