"""Streaming corpus readers: `.txt` (a text per line), `.jsonl` and `.parquet`, local or any fsspec URL, several
files or globs, or a Python iterable; `.gz` / `.bz2` / `.zst` compression is inferred from the name.

Rows are read in input order, file after file. `take(n)` parses and checks n rows; `skip(n)` only counts them (a
line is not decoded, a Parquet row group the footer accounts for is not read), so a resumed or multi-host job passes
over shards it does not own cheaply. Every error names the file and the row (1-based line for text formats).
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

FORMATS = ("txt", "jsonl", "parquet")
_GLOB = set("*?[")


class InputError(ValueError):
    """An input that cannot be read as a corpus; the message names the file (or item) and the row."""


Row = tuple[str | None, str]  # (id or None for "use the input position", text)


def file_format(path: str) -> str:
    name = path.lower()
    for comp in (".gz", ".bz2", ".zst", ".xz"):
        name = name.removesuffix(comp)
    for fmt, suffixes in (("txt", (".txt",)), ("jsonl", (".jsonl", ".ndjson")), ("parquet", (".parquet",))):
        if name.endswith(suffixes):
            return fmt
    raise InputError(f"{path}: unknown input format; expected a name ending in .txt, .jsonl or .parquet")


def resolve_inputs(inputs: Sequence[str]) -> list[dict]:
    """Expands globs (sorted, so the row order is deterministic) and checks every file exists.

    Returns [{"path": URL, "size": bytes, "format": ...}] in input order; size goes into the job's settings so a
    resume over changed input stops instead of mixing two corpora."""
    import fsspec

    if isinstance(inputs, str):
        inputs = [inputs]
    out = []
    for spec in inputs:
        spec = str(spec)
        fs, path = fsspec.core.url_to_fs(spec)
        if _GLOB & set(path):
            paths = sorted(fs.glob(path))
            if not paths:
                raise InputError(f"{spec}: the pattern matches no file")
        else:
            paths = [path]
        for p in paths:
            url = fs.unstrip_protocol(p) if "://" in spec else p
            try:
                info = fs.info(p)
            except FileNotFoundError:
                raise InputError(f"{spec}: no such file") from None
            except OSError as e:
                raise InputError(f"{url}: cannot read ({e})") from None
            if info.get("type") == "directory":
                raise InputError(f"{url}: is a directory; give its files or a glob such as {url.rstrip('/')}/*.jsonl")
            out.append({"path": url, "size": int(info.get("size") or 0), "format": file_format(url)})
    return out


class Rows:
    """Rows of several files (or one iterable) in order. take/skip stop short only at the end of the input."""

    def __init__(self, files: Sequence[dict] | None = None, *, iterable: Iterable | None = None,
                 text_field: str = "text", id_field: str | None = None):
        self._cursors: Iterator = iter([_IterableCursor(iterable)] if iterable is not None else
                                       (_open(f, text_field, id_field) for f in files))
        self._cur = None
        self.position = 0  # rows taken or skipped so far

    def _next_cursor(self) -> bool:
        if self._cur is not None:
            self._cur.close()
        self._cur = next(self._cursors, None)
        return self._cur is not None

    def take(self, n: int) -> list[Row]:
        out: list[Row] = []
        while len(out) < n and (self._cur is not None or self._next_cursor()):
            got = self._cur.take(n - len(out))
            out += got
            if len(out) < n:
                self._next_cursor()
        self.position += len(out)
        return out

    def skip(self, n: int) -> int:
        done = 0
        while done < n and (self._cur is not None or self._next_cursor()):
            done += self._cur.skip(n - done)
            if done < n:
                self._next_cursor()
        self.position += done
        return done

    def close(self) -> None:
        if self._cur is not None:
            self._cur.close()
            self._cur = None


def _open(f: dict, text_field: str, id_field: str | None):
    fmt = f["format"]
    if fmt == "parquet":
        return _ParquetCursor(f["path"], text_field, id_field)
    return _LineCursor(f["path"], fmt, text_field, id_field)


def _check_unicode(s: str, where: str, what: str) -> str:
    """s, if it can be written as UTF-8 (Python strings from an iterable may hold unpaired surrogates; files are
    decoded strictly and Parquet strings are UTF-8 by construction)."""
    try:
        s.encode("utf-8")
    except UnicodeEncodeError as e:
        raise InputError(f"{where}: {what} is not valid Unicode (unpaired surrogate {s[e.start]!r} at character "
                         f"{e.start})") from None
    return s


def _check_id(value: Any, where: str) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    raise InputError(f"{where}: id is {type(value).__name__} ({value!r:.40}), expected a string or an integer")


class _LineCursor:
    """.txt: each line is a text (the line break removed; an empty line is an empty text). .jsonl: each line a JSON
    object holding text_field (a string) and, if given, id_field (a string or an integer)."""

    def __init__(self, path: str, fmt: str, text_field: str, id_field: str | None):
        import fsspec

        self.path, self.fmt, self.text_field, self.id_field = path, fmt, text_field, id_field
        try:
            self._file = fsspec.open(path, "rb", compression="infer").open()
        except (OSError, ValueError) as e:
            raise InputError(f"{path}: cannot open ({e})") from None
        self.line = 0

    def _lines(self, n: int) -> list[bytes]:
        out = []
        try:
            for _ in range(n):
                line = self._file.readline()
                if not line:
                    break
                out.append(line)
        except (OSError, EOFError, ValueError) as e:
            raise InputError(f"{self.path}: read error after line {self.line + len(out)} ({e})") from None
        return out

    def skip(self, n: int) -> int:
        got = len(self._lines(n))
        self.line += got
        return got

    def take(self, n: int) -> list[Row]:
        out = []
        for raw in self._lines(n):
            self.line += 1
            where = f"{self.path}, line {self.line}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise InputError(f"{where}: not UTF-8 ({e.reason} at byte {e.start})") from None
            line = line.removesuffix("\n").removesuffix("\r")
            if self.fmt == "txt":
                out.append((None, line))
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                what = "an empty line" if not line.strip() else f"invalid JSON ({e.msg}, column {e.colno})"
                raise InputError(f"{where}: {what}; expected one JSON object per line") from None
            if not isinstance(obj, dict):
                raise InputError(f"{where}: a JSON {type(obj).__name__}, expected an object")
            out.append(_fields(obj, self.text_field, self.id_field, where, "field"))
        return out

    def close(self) -> None:
        self._file.close()


def _fields(obj, text_field: str, id_field: str | None, where: str, kind: str) -> Row:
    if text_field not in obj:
        raise InputError(f"{where}: no {kind} {text_field!r} (has {sorted(obj)[:10]}); set the text {kind} with "
                         f"--text-field")
    text = obj[text_field]
    if not isinstance(text, str):
        raise InputError(f"{where}: {kind} {text_field!r} is {type(text).__name__} ({text!r:.40}), expected a string")
    if id_field is None:
        return None, text
    if id_field not in obj:
        raise InputError(f"{where}: no {kind} {id_field!r} (the id {kind})")
    return _check_id(obj[id_field], where), text


class _ParquetCursor:
    """A Parquet file's text column (and id column): columns are checked against the schema on open, row groups
    the footer counts are skipped without reading them."""

    def __init__(self, path: str, text_field: str, id_field: str | None):
        import fsspec
        import pyarrow as pa
        import pyarrow.parquet as pq

        self.path = path
        try:
            self._file = fsspec.open(path, "rb").open()
            self._pf = pq.ParquetFile(self._file)
        except (OSError, ValueError, pa.ArrowException) as e:
            raise InputError(f"{path}: cannot read as Parquet ({e})") from None
        schema = self._pf.schema_arrow
        self.columns = [text_field] + ([id_field] if id_field else [])
        for col, what in zip(self.columns, ("text", "id"), strict=False):
            if col not in schema.names:
                raise InputError(f"{path}: no column {col!r} (the {what} column; has {schema.names[:10]}); "
                                 f"set it with --{what}-field")
        t = schema.field(text_field).type
        if not (pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t)):
            raise InputError(f"{path}: column {text_field!r} is {t}, expected strings")
        self._group = 0  # next row group to read
        self._rows: list = []  # the current row group's rows not yet consumed
        self._row = 0  # rows consumed from the file (0-based index of the next row)

    def _load(self) -> bool:
        if self._group >= self._pf.num_row_groups:
            return False
        table = self._pf.read_row_group(self._group, columns=self.columns)
        self._group += 1
        cols = [table.column(c).to_pylist() for c in self.columns]
        self._rows = list(zip(*cols, strict=True)) if cols[0] else []
        self._rows.reverse()  # pop() from the end is O(1)
        return True

    def skip(self, n: int) -> int:
        done = 0
        while done < n:
            if self._rows:
                k = min(n - done, len(self._rows))
                del self._rows[len(self._rows) - k:]
                done += k
                continue
            if self._group < self._pf.num_row_groups and \
                    self._pf.metadata.row_group(self._group).num_rows <= n - done:
                done += self._pf.metadata.row_group(self._group).num_rows
                self._group += 1
                continue
            if not self._load():
                break
        self._row += done
        return done

    def take(self, n: int) -> list[Row]:
        out = []
        while len(out) < n and (self._rows or self._load()):
            while len(out) < n and self._rows:
                vals = self._rows.pop()
                where = f"{self.path}, row {self._row}"
                self._row += 1
                text = vals[0]
                if not isinstance(text, str):
                    raise InputError(f"{where}: column {self.columns[0]!r} is null, expected a string")
                if len(vals) == 1:
                    out.append((None, text))
                elif vals[1] is None:
                    raise InputError(f"{where}: id column {self.columns[1]!r} is null")
                else:
                    out.append((_check_id(vals[1], where), text))
        return out

    def close(self) -> None:
        self._file.close()


class _IterableCursor:
    """A Python iterable of (id, text) pairs (id None: the input position) or of plain strings."""

    def __init__(self, items: Iterable):
        if isinstance(items, (str, bytes, io.IOBase)):
            raise InputError(f"expected an iterable of (id, text) pairs or of strings, got {type(items).__name__}")
        self._it = iter(items)
        self._i = 0

    def skip(self, n: int) -> int:
        done = 0
        for _ in range(n):
            if next(self._it, _END) is _END:
                break
            done += 1
        self._i += done
        return done

    def take(self, n: int) -> list[Row]:
        out = []
        for _ in range(n):
            item = next(self._it, _END)
            if item is _END:
                break
            where = f"input item {self._i}"
            self._i += 1
            if isinstance(item, str):
                out.append((None, _check_unicode(item, where, "text")))
                continue
            if not (isinstance(item, (tuple, list)) and len(item) == 2):
                raise InputError(f"{where}: {type(item).__name__} ({item!r:.40}), expected an (id, text) pair or a "
                                 f"string")
            id_, text = item
            if not isinstance(text, str):
                raise InputError(f"{where}: text is {type(text).__name__} ({text!r:.40}), expected a string")
            rid = None if id_ is None else _check_unicode(_check_id(id_, where), where, "id")
            out.append((rid, _check_unicode(text, where, "text")))
        return out

    def close(self) -> None:
        pass


_END = object()
