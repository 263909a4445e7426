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
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np

from m3jax import distributed, pipeline
from m3jax._io import settings_diff
from m3jax.embed import writer
from m3jax.embed.planner import ShardEnd, Window, plan_windows
from m3jax.embed.sources import InputError, Rows, resolve_inputs

logger = logging.getLogger("m3jax")

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

    def out_dtypes(self) -> tuple[tuple[str, str], ...]:
        """The outputs' file dtypes, which the compiled step casts to on the device (Encoder.run's out_dtypes)."""
        return (("dense", self.dense_dtype), ("colbert", self.colbert_dtype))

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
        for name in ("dense_dtype", "colbert_dtype"):
            if getattr(self, name) not in ("float32", "float16"):
                raise ValueError(f"{name} must be 'float32' or 'float16', got {getattr(self, name)!r}")
        m = self.mcls_interval
        if m is not None and (isinstance(m, bool) or not isinstance(m, int) or m < 1):
            raise ValueError(f"mcls_interval must be a positive int or None, got {m!r}")


def embed(source: str | os.PathLike | Sequence[str] | Iterable, model: Any, output: str | os.PathLike, *,
          files: bool | None = None, source_id: str | None = None, outputs: Sequence[str] = pipeline.HEADS,
          max_length: int = 512, batch_size: int = 256,
          shard_size: int = 10_000, window: int = 4096, window_tokens: int = 1 << 20, dense_dtype: str = "float32",
          colbert_dtype: str = "float16", text_field: str = "text", id_field: str | None = None,
          dtype: str = "float32", attn_impl: str = "auto", max_tokens_per_batch: int | None = None,
          length_buckets: Sequence[int] | None = None, mcls_interval: int | None = None, devices: Any = None,
          coordinator: str | None = None,
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
        is bounded by a window's outputs: window_tokens x ColBERT dim).
      dense_dtype / colbert_dtype: "float32" or "float16" in the files (sparse weights are always float32).
      mcls_interval: multiple CLS, a `<s>` every that many text tokens, dense = mean of their hidden states (see
        m3jax.BGEM3.encode for what it does to max_length, sparse and ColBERT); the `tokens` column still counts
        each text's own tokens. None: plain BGE-M3.
      coordinator, num_processes, process_id: multi-host run over jax.distributed (see m3jax.distributed).
      callback: called in the main thread after each window is written, with {"shard", "rows", "shard_done"}.
    """
    t_start = time.perf_counter()
    pid, nproc = distributed.initialize(coordinator, num_processes, process_id)
    settings = Settings(outputs=tuple(h for h in pipeline.HEADS if h in outputs), max_length=max_length,
                        batch_size=batch_size, max_tokens_per_batch=max_tokens_per_batch,
                        length_buckets=tuple(int(b) for b in length_buckets) if length_buckets else None,
                        shard_size=shard_size, window=window, window_tokens=window_tokens, dense_dtype=dense_dtype,
                        colbert_dtype=colbert_dtype, text_field=text_field, id_field=id_field, dtype=dtype,
                        attn_impl=attn_impl, mcls_interval=mcls_interval)
    if set(outputs) - set(pipeline.HEADS):
        raise ValueError(f"outputs must be a non-empty subset of {pipeline.HEADS}, got {tuple(outputs)!r}")
    settings.check(None)
    paths = _files(source, files)
    inputs = resolve_inputs(paths) if paths is not None else None

    import fsspec

    fs, root = fsspec.core.url_to_fs(str(output))
    if fs.exists(root) and not fs.isdir(root):
        raise EmbedError(f"output {output}: is a file; give a directory (new or from an earlier run)")

    from m3jax.engine import Encoder

    encoder = model if isinstance(model, Encoder) else _encoder(model, settings, devices)
    cfg = encoder.config
    settings.check(cfg.max_length)  # now that the model's limit is known
    encoder.check_mcls(settings.max_length, settings.mcls_interval)
    dims = {"dense": cfg.hidden_size, "colbert": cfg.colbert_dim}
    recorded = dataclasses.asdict(settings)
    if recorded["mcls_interval"] is None:  # plain runs keep the job key they had before MCLS existed
        del recorded["mcls_interval"]
    job = {"format": writer.FORMAT, "version": writer.VERSION,
           "model": {"fingerprint": encoder.fingerprint(), "config": cfg.to_hf_config()},
           "settings": recorded,
           "input": {"files": [{"path": f["path"], "size": f["size"]} for f in inputs]} if inputs is not None
           else {"iterable": True}}
    if source_id is not None:
        job["input"]["source_id"] = str(source_id)
    job = json.loads(json.dumps(job))  # tuples as lists, as they read back
    key = hashlib.sha256(json.dumps(job, sort_keys=True).encode()).hexdigest()[:16]
    job["key"] = key

    lock = writer.OutputLock(fs, root)
    if pid == 0:
        fresh = _check_output(fs, root, job, output)
        fs.makedirs(root, exist_ok=True)
        try:
            lock.acquire(output)
        except writer.LockedError as e:
            raise EmbedError(str(e)) from None
        if fresh:
            writer.write_json(fs, posixpath.join(root, writer.JOB_FILE), job)
    try:
        return _run_job(fs, root, output, job, key, settings, encoder, inputs, source, dims, pid, nproc, quiet,
                        callback, t_start)
    finally:
        lock.release()


def _run_job(fs, root, output, job, key, settings, encoder, inputs, source, dims, pid, nproc, quiet, callback,
             t_start):
    """embed() once the job is known and its output directory held: resume scan, the loop, the manifest."""
    distributed.barrier("job")
    if pid != 0:
        _check_output(fs, root, job, output)

    finals, tmps = writer.list_shards(fs, root)
    done = {}
    for k, path in sorted(finals.items()):
        info = writer.shard_info(fs, path)
        if info is None or info.get("key") != key or info.get("shard") != k:
            raise EmbedError(f"{path}: not a finished shard of this job (unreadable, or written with other "
                             f"settings); remove it or use a new output directory")
        done[k] = info
    for k, path in tmps.items():  # leftovers of a killed run; each process cleans its own
        if k % nproc == pid:
            fs.rm(path)
    schema = writer.schema(settings.outputs, dims, settings.dense_dtype, settings.colbert_dtype)

    stats = _Stats()
    progress = None if quiet else _progress()
    prefetch = _Prefetch(lambda: _produce(inputs, source, settings, encoder, done, pid, nproc))
    pending: collections.deque = collections.deque()
    open_writer: writer.ShardWriter | None = None
    state: dict = {}

    def batches():
        try:
            for item in prefetch:
                pending.append(item)
                if isinstance(item, Window):
                    yield from item.batches
                elif isinstance(item, _End):
                    state["end"] = item
        except Exception as e:  # noqa: BLE001 - raised once the rows read before it are written
            state["error"] = e

    def flush_ended() -> None:
        nonlocal open_writer
        while pending and not isinstance(pending[0], Window):
            item = pending.popleft()
            if isinstance(item, ShardEnd):
                info = open_writer.commit(input_sha256=item.input_sha256)
                open_writer = None
                stats.shards_written += 1
                if callback is not None:
                    callback({"shard": item.shard, "rows": info["rows"], "shard_done": True})

    acc: _WindowOutputs | None = None
    try:
        for batch, out in encoder.run(batches(), heads=settings.outputs, out_dtypes=settings.out_dtypes()):
            flush_ended()
            w = pending[0]
            if acc is None or acc.window is not w:
                acc = _WindowOutputs(w, settings)
            acc.add(batch, out)
            stats.batch(batch)
            if not acc.complete:
                continue
            pending.popleft()
            if open_writer is None:
                open_writer = writer.ShardWriter(fs, root, w.shard, schema,
                                                 {"key": key, "shard": w.shard, "first_row": w.start})
            open_writer.write(acc.columns(), tokens=int(w.lengths.sum()), empty=w.empty,
                              truncated=int(w.truncated.sum()))
            stats.window(w)
            if progress is not None:
                progress.update(w.n)
                progress.set_postfix_str(f"{stats.tokens / max(1e-9, time.perf_counter() - stats.t0):,.0f} tok/s",
                                         refresh=False)
            if callback is not None:
                callback({"shard": w.shard, "rows": open_writer.rows, "shard_done": False})
            acc = None
        flush_ended()
        if "error" in state:  # shards completed before the bad row are committed; the current one is dropped
            raise state["error"]
        end = state.get("end")
        if end is None or pending:
            raise RuntimeError("the input stream ended without its end marker")  # a bug, never user input
    except BaseException:
        prefetch.stop()
        if open_writer is not None:
            open_writer.abort()
        raise
    finally:
        if progress is not None:
            progress.close()

    distributed.barrier("shards")
    manifest = None
    if pid == 0:
        manifest = _write_manifest(fs, root, job, end.rows, settings, dims, encoder, nproc)
    distributed.barrier("manifest")
    if manifest is None:
        manifest = writer.read_json(fs, posixpath.join(root, writer.MANIFEST))
    wall = time.perf_counter() - t_start
    if not quiet:
        pad = stats.padded / stats.tokens - 1 if stats.tokens else 0.0
        skipped = f"; {len(done)} finished shard(s) skipped" if done else ""
        proc = f" (process {pid} of {nproc})" if nproc > 1 else ""
        print(f"m3jax embed{proc}: {stats.texts:,} texts, {stats.tokens:,} tokens, padding overhead {pad:.1%}, "
              f"{len(stats.shapes)} compiled shapes, {wall:.1f}s wall, "
              f"{stats.tokens / max(wall, 1e-9):,.0f} tokens/s{skipped}", file=sys.stderr)
    manifest = dict(manifest)
    manifest["run"] = {"texts": stats.texts, "tokens": stats.tokens, "padded_tokens": stats.padded,
                       "shapes": sorted(stats.shapes), "wall_s": wall, "skipped_shards": sorted(done)}
    return manifest


# ------------------------------------------------------------------------------------------------------ pieces
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
                     f"Differences: {settings_diff(old, job, str(output), ignore=('key',))}")


@dataclasses.dataclass
class _End:
    rows: int  # total input rows


def _produce(inputs, source, settings: Settings, encoder, done: dict, pid: int, nproc: int):
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
                    yield from plan_windows(encoder, k, start + taken, chunk, max_length=settings.max_length,
                                            batch_size=settings.batch_size, window_tokens=settings.window_tokens,
                                            mcls_interval=settings.mcls_interval)
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


class _WindowOutputs:
    """A window's outputs gathered batch by batch (ragged ones flat, already in the file dtypes), then put back in
    input order as Arrow columns."""

    def __init__(self, w: Window, settings: Settings):
        self.window, self.settings = w, settings
        self.got = 0
        self.idx: list[np.ndarray] = []
        self.dense: list[np.ndarray] = []
        self.sparse: list[tuple] = []
        self.colbert: list[tuple] = []

    @property
    def complete(self) -> bool:
        return self.got == len(self.window.batches)

    def add(self, batch, out) -> None:
        """out: the engine's EncodeOutputs for batch, trimmed to its real rows (None for heads not computed)."""
        self.got += 1
        idx = np.asarray(batch.indices)
        self.idx.append(idx)
        rows = pipeline.unpad(out, self.window.lengths[idx])
        if rows.dense is not None:
            self.dense.append(rows.dense.astype(self.settings.dense_dtype, copy=False))
        if rows.sparse_ids is not None:
            self.sparse.append((np.diff(rows.sparse_offsets), rows.sparse_ids, rows.sparse_weights))
        if rows.colbert is not None:
            vecs = rows.colbert.astype(self.settings.colbert_dtype, copy=False)  # cast on the device already
            self.colbert.append((np.diff(rows.colbert_offsets), vecs))

    def columns(self) -> dict:
        import pyarrow as pa

        w = self.window
        perm = np.argsort(np.concatenate(self.idx), kind="stable")  # batch-order position of input row i
        cols = {"id": pa.array(w.ids, pa.string()), "tokens": pa.array(w.lengths.astype(np.int32)),
                "truncated": pa.array(w.truncated.astype(bool))}
        if self.dense:
            d = np.concatenate(self.dense)[perm]
            cols["dense"] = pa.FixedSizeListArray.from_arrays(pa.array(d.reshape(-1)), d.shape[1])
        if self.sparse:
            counts = np.concatenate([c for c, _, _ in self.sparse])
            ids, off = _ragged_take(np.concatenate([i for _, i, _ in self.sparse]), counts, perm)
            wts, _ = _ragged_take(np.concatenate([x for _, _, x in self.sparse]), counts, perm)
            cols["sparse_ids"], cols["sparse_weights"] = writer.ragged(ids, off), writer.ragged(wts, off)
        if self.colbert:
            counts = np.concatenate([c for c, _ in self.colbert])
            vecs, off = _ragged_take(np.concatenate([v for _, v in self.colbert]), counts, perm)
            cols["colbert"] = writer.ragged(vecs, off, inner=vecs.shape[1])
        return cols


def _ragged_take(values: np.ndarray, counts: np.ndarray, perm: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows perm of a ragged array (row i = values[starts[i]:starts[i] + counts[i]]): (values, offsets [n + 1])."""
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
    c = counts[perm].astype(np.int64)
    offsets = np.concatenate([[0], np.cumsum(c)]).astype(np.int64)
    src = np.repeat(starts[perm] - offsets[:-1], c) + np.arange(offsets[-1])
    return values[src], offsets


class _Stats:
    def __init__(self):
        self.t0 = time.perf_counter()
        self.texts = self.tokens = self.padded = self.shards_written = 0
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


def _write_manifest(fs, root: str, job: dict, total_rows: int, settings: Settings, dims: dict, encoder,
                    nproc: int) -> dict:
    """Checks that shards 0 ... K-1 are all there and finished, then writes _manifest.json (process 0)."""
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
                "schema": {f.name: str(f.type) for f in writer.schema(settings.outputs, dims, settings.dense_dtype,
                                                                       settings.colbert_dtype)},
                "dims": {h: dims[h] for h in settings.outputs if h in dims},
                "vocab_size": encoder.config.vocab_size,
                "empty_texts_policy": EMPTY_TEXTS,
                "rows": total_rows, "tokens": sum(s["tokens"] for s in shards),
                "empty_texts": sum(s["empty_texts"] for s in shards),
                "truncated": sum(s["truncated"] for s in shards),
                "duplicate_ids": duplicates,
                "shards": shards,
                "runtime": {"processes": nproc, "local_devices": len(getattr(encoder, "devices", []) or []),
                            "platform": encoder.platform}}
    writer.write_json(fs, posixpath.join(root, writer.MANIFEST), manifest)
    return manifest


__all__ = ["EMPTY_TEXTS", "EmbedError", "InputError", "Settings", "embed"]
