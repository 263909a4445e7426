"""File-system helpers shared by checkpoints, indexes and jobs: atomic directories, the cache root, hub ids."""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from collections.abc import Iterator
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
