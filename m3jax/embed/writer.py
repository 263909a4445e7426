"""Output layout: `shard-00000.parquet`, ... (one row per text, in input order), `_job.json` (the settings a resume
must match) and, once every shard is written, `_manifest.json`. Names starting with `_` (the job files, shards
being written) are skipped by Parquet dataset readers, so `pandas.read_parquet(DIR)` reads just the shards.

Columns (any reader of Parquet takes them: pyarrow, pandas, datasets, DuckDB):
  id string; tokens int32 (with `<s>` and `</s>`); truncated bool;
  dense fixed_size_list<float32 | float16>[D]; sparse_ids list<int32> and sparse_weights list<float32> (unique token
  ids in order of first occurrence); colbert list<fixed_size_list<float16 | float32>[C]> (tokens - 1 vectors).
  Compact outputs (the manifest's "compact" records them): dense int8 [D] (calibrated ranges) or binary, int8
  [ceil(D / 8)]; colbert int8 [C] vectors, fewer of them with token pooling; muvera fixed_size_list<float32>[F].
A shard is written under a temporary name (`_tmp.shard-00000.parquet`) and renamed when complete; its footer
carries the job's settings hash, its index, first input row, counts and the sha256 of its input rows, so a resume
can tell a finished shard from a foreign or stale file, and an unchanged input from an edited one. `_lock` marks a
directory a run is writing.
"""

from __future__ import annotations

import json
import os
import posixpath
import re
import socket
import time
import uuid
from typing import Any

import numpy as np

FORMAT = "m3jax.embed"
VERSION = 1
JOB_FILE = "_job.json"
MANIFEST = "_manifest.json"
LOCK_FILE = "_lock"
META_KEY = b"m3jax.embed"
_SHARD = re.compile(r"^shard-(\d{5,})\.parquet$")
_TMP = re.compile(r"^_tmp\.shard-(\d{5,})\.parquet$")


def shard_name(k: int) -> str:
    return f"shard-{k:05d}.parquet"


def schema(outputs: tuple[str, ...], dims: dict[str, int], dense_dtype: str, colbert_dtype: str,
           muvera_dim: int | None = None):
    """The shards' schema. dims: the model's dense and ColBERT widths; dense_dtype / colbert_dtype: float32,
    float16, int8 or (dense) binary, stored as int8 [ceil(D / 8)]; muvera_dim: a float32 `muvera` column."""
    import pyarrow as pa

    from m3jax.compact import formats

    def vector(fmt: str, dim: int):
        return pa.list_(pa.from_numpy_dtype(np.dtype(formats.stored_dtype(fmt))), formats.stored_dim(fmt, dim))

    fields = [pa.field("id", pa.string(), nullable=False), pa.field("tokens", pa.int32(), nullable=False),
              pa.field("truncated", pa.bool_(), nullable=False)]
    if "dense" in outputs:
        fields.append(pa.field("dense", vector(dense_dtype, dims["dense"])))
    if "sparse" in outputs:
        fields += [pa.field("sparse_ids", pa.list_(pa.int32())), pa.field("sparse_weights", pa.list_(pa.float32()))]
    if "colbert" in outputs:
        fields.append(pa.field("colbert", pa.list_(vector(colbert_dtype, dims["colbert"]))))
    if muvera_dim is not None:
        fields.append(pa.field("muvera", pa.list_(pa.float32(), muvera_dim)))
    return pa.schema(fields)


def ragged(values: np.ndarray, offsets: np.ndarray, inner: int | None = None):
    """list array of rows values[offsets[i]:offsets[i+1]]; inner: values are [M, inner] fixed-size vectors."""
    import pyarrow as pa

    child = pa.array(values.reshape(-1))
    if inner is not None:
        child = pa.FixedSizeListArray.from_arrays(child, inner)
    return pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), child)


class ShardWriter:
    """Writes one shard to `_tmp.<name>` row group by row group; commit() renames it, abort() removes it."""

    def __init__(self, fs, root: str, k: int, schema, meta: dict):
        import pyarrow.parquet as pq

        self.fs, self.k, self.meta = fs, k, dict(meta)
        self.final = posixpath.join(root, shard_name(k))
        self.tmp = posixpath.join(root, "_tmp." + shard_name(k))
        self.schema = schema
        self._file = fs.open(self.tmp, "wb")
        # snappy: cheap next to the device; embeddings barely compress anyway.
        self._w = pq.ParquetWriter(self._file, schema, compression="snappy", use_dictionary=False,
                                   write_statistics=["id", "tokens", "truncated"])
        self.rows = self.tokens = self.empty = self.truncated = 0

    def write(self, columns: dict[str, Any], *, tokens: int, empty: int, truncated: int) -> None:
        import pyarrow as pa

        table = pa.Table.from_arrays([columns[f.name] for f in self.schema], schema=self.schema)
        self._w.write_table(table, row_group_size=1024)
        self.rows += table.num_rows
        self.tokens, self.empty, self.truncated = self.tokens + tokens, self.empty + empty, self.truncated + truncated

    def commit(self, **extra) -> dict:
        info = {**self.meta, **extra, "file": shard_name(self.k), "rows": self.rows, "tokens": self.tokens,
                "empty_texts": self.empty, "truncated": self.truncated}
        self._w.add_key_value_metadata({META_KEY: json.dumps(info).encode()})
        self._w.close()
        self._file.close()
        self.fs.mv(self.tmp, self.final)
        return info

    def abort(self) -> None:
        try:
            self._w.close()
            self._file.close()
        finally:
            if self.fs.exists(self.tmp):
                self.fs.rm(self.tmp)


class LockedError(RuntimeError):
    """Another run holds the output directory's lock."""


class OutputLock:
    """`_lock` in an output directory while a job writes it (process 0 of a run holds it for all its processes), so
    that a second run into the same directory is refused instead of racing the first. A lock whose holder was on this
    host and is gone (killed) is taken over. Local directories are locked atomically (O_EXCL); on object stores the
    lock is written, then read back to check that this run holds it (a best effort: they have no atomic create)."""

    def __init__(self, fs, root: str):
        self.fs, self.path = fs, posixpath.join(root, LOCK_FILE)
        self.owner = {"host": socket.gethostname(), "pid": os.getpid(), "run": uuid.uuid4().hex,
                      "since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        self.held = False

    def acquire(self, output) -> None:
        for _ in range(2):  # a second try after taking over a dead holder's lock
            if self._create():
                self.held = True
                return
            try:
                other = read_json(self.fs, self.path)
            except ValueError:  # empty or cut short: a run killed between creating the lock and writing it
                other = None
            if other is None or not self._dead(other):
                who = "an unreadable lock" if other is None else (
                    f"host {other.get('host')} pid {other.get('pid')} since {other.get('since')}")
                raise LockedError(f"output {output}: another run is writing it ({who}: {self.path}); wait for it, "
                                   f"or if it is no longer running, delete {self.path}")
            self.fs.rm(self.path)
        raise LockedError(f"output {output}: could not take {self.path}")

    def release(self) -> None:
        if self.held and self.fs.exists(self.path):
            self.fs.rm(self.path)
        self.held = False

    def _create(self) -> bool:
        data = json.dumps(self.owner).encode()
        if "file" in _protocols(self.fs):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                return False
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            return True
        if self.fs.exists(self.path):
            return False
        with self.fs.open(self.path, "wb") as f:
            f.write(data)
        return read_json(self.fs, self.path) == self.owner

    def _dead(self, other: dict) -> bool:
        """Whether the holder was a process of this host that no longer exists (or this very process)."""
        if other.get("host") != self.owner["host"] or not isinstance(other.get("pid"), int):
            return False
        if other["pid"] == os.getpid():
            return True
        try:
            os.kill(other["pid"], 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
        return False


def _protocols(fs) -> tuple[str, ...]:
    p = fs.protocol
    return (p,) if isinstance(p, str) else tuple(p)


def shard_info(fs, path: str) -> dict | None:
    """The footer record of a finished shard, or None if the file is not one (unreadable or foreign)."""
    import pyarrow.parquet as pq

    try:
        with fs.open(path, "rb") as f:
            meta = pq.read_metadata(f).metadata or {}
        info = json.loads(meta[META_KEY])
    except Exception:  # noqa: BLE001 - anything unreadable is simply not a finished shard
        return None
    return info


def duplicate_ids(fs, paths: list[str]) -> tuple[int, str | None, list[int]]:
    """Ids that repeat across the shards at `paths`, taken in order (their rows are the global rows 0, 1, ...): (how
    many rows have the id of an earlier row, the id of the first such row, every global row where that id is). Reads
    only the id column; pyarrow counts them (10M ids in 1,000 shards: a few seconds on one CPU core, read included).
    """
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    chunks = []
    for p in paths:
        with fs.open(p, "rb") as f:
            chunks += pq.read_table(f, columns=["id"]).column("id").chunks
    ids = pa.chunked_array(chunks, pa.string())
    counts = pc.value_counts(ids)  # struct<values, counts>, one entry per distinct id
    repeats = len(ids) - len(counts)
    if not repeats:
        return 0, None, []
    repeated = counts.field("values").filter(pc.greater(counts.field("counts"), 1))
    rows = np.flatnonzero(pc.is_in(ids, value_set=repeated).to_numpy(zero_copy_only=False))  # rows of those ids
    codes = pc.index_in(ids.take(rows), value_set=repeated).to_numpy()
    _, first = np.unique(codes, return_index=True)  # each repeated id's first row, among `rows`
    j = int(np.argmax(first[codes] != np.arange(len(codes))))  # the first row whose id came earlier
    return repeats, repeated[int(codes[j])].as_py(), rows[codes == codes[j]].tolist()


def list_shards(fs, root: str) -> tuple[dict[int, str], dict[int, str]]:
    """({shard index: path} of final files, {shard index: path} of leftover temporary files)."""
    final, tmp = {}, {}
    if not fs.exists(root):
        return final, tmp
    for p in fs.ls(root, detail=False):
        name = posixpath.basename(p.rstrip("/"))
        if m := _SHARD.match(name):
            final[int(m.group(1))] = p
        elif m := _TMP.match(name):
            tmp[int(m.group(1))] = p
    return final, tmp


def write_json(fs, path: str, obj: dict) -> None:
    """JSON written to a temporary name, then renamed: a reader never sees half a file."""
    tmp = posixpath.join(posixpath.dirname(path), "_tmp." + posixpath.basename(path))
    with fs.open(tmp, "w") as f:
        f.write(json.dumps(obj, indent=1) + "\n")
    fs.mv(tmp, path)


def read_json(fs, path: str) -> dict | None:
    if not fs.exists(path):
        return None
    with fs.open(path, "r") as f:
        return json.load(f)
