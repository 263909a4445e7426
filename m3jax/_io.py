"""I/O helpers shared by checkpoints, indexes and jobs: atomic directories, the cache root, hub ids, JSON-lines
rows, and the differences between a job's recorded settings and a rerun's."""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Collection, Iterator
from contextlib import contextmanager
from pathlib import Path

_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


class DestinationExistsError(ValueError):
    """An output directory that already exists, without overwrite."""


def is_hub_id(name: str) -> bool:
    """True for strings of the form `org/name` (whether or not such a repository exists)."""
    return bool(_HUB_ID.match(str(name)))


def cache_root() -> Path:
    """$M3JAX_HOME, default ~/.cache/m3jax: converted hub models, random checkpoints, the compilation cache."""
    return Path(os.environ.get("M3JAX_HOME", Path.home() / ".cache" / "m3jax"))


@contextmanager
def atomic_dir(dst: str | os.PathLike, overwrite: bool, error: type[Exception] = DestinationExistsError
               ) -> Iterator[Path]:
    """Yields a temporary sibling of dst; renames it to dst only if the block finishes, so a reader never sees a
    half-written directory. error: the exception raised when dst exists and overwrite is False."""
    dst = Path(dst).absolute()
    if dst.exists() and not overwrite:
        raise error(f"{dst}: already exists (pass overwrite=True / --overwrite to replace it)")
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.partial-", dir=dst.parent))
    try:
        yield tmp
        if dst.exists():
            old = dst.with_name(f".{dst.name}.old-{os.getpid()}")
            os.rename(dst, old)
            os.rename(tmp, dst)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def parse_json_object(line: str, where: str, error: type[Exception] = ValueError) -> dict:
    """One JSON-lines row as a dict. error, its message starting with `where` (the file and line): the line is not
    valid JSON, or holds something other than an object."""
    try:
        row = json.loads(line)
    except json.JSONDecodeError as e:
        raise error(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(row, dict):
        raise error(f"{where}: expected a JSON object, got {type(row).__name__}")
    return row


def settings_diff(old: object, new: object, where: str, *, ignore: Collection[str] = (), limit: int = 8) -> str:
    """Where a rerun's settings differ from those recorded in `where`, for an error message:
    "path: old (in where) != new (now)" per differing value, the path naming its keys and list indices
    (`settings.max_length`, `data[2]`); at most `limit` of them. ignore: top-level keys left out.

    Dicts are compared key by key and lists of equal length item by item; values are shown as JSON, cut to 80
    characters."""
    if not isinstance(old, dict):
        return f"no settings recorded in {where}"
    found = [(k, a, b) for k, a, b in _differences(old, new) if k.split(".")[0].split("[")[0] not in ignore]
    out = [f"{k}: {a!r} (in {where}) != {b!r} (now)" for k, a, b in found[:limit]]
    if len(found) > limit:
        out.append(f"and {len(found) - limit} more")
    return "; ".join(out) or "identical"


def _differences(a: object, b: object, prefix: str = "") -> Iterator[tuple[str, object, object]]:
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            yield from _differences(a.get(k), b.get(k), f"{prefix}.{k}" if prefix else k)
    elif isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            yield from _differences(x, y, f"{prefix}[{i}]")
    elif a != b:
        yield prefix, _short(a), _short(b)


def _short(v: object) -> object:
    s = json.dumps(v)
    return v if len(s) <= 80 else s[:77] + "..."
