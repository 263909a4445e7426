"""Checkpoint I/O: release-layout directories (BAAI/bge-m3), m3jax directories (safetensors), and the hub.

A release directory holds `config.json`, `model.safetensors` or `pytorch_model.bin` (optionally sharded with an
`.index.json`), `colbert_linear.pt`, `sparse_linear.pt` (float16 in the release) and tokenizer files.
An m3jax directory holds `m3jax.json` (marker and metadata), `config.json`, `params/params.safetensors` (the
float32 parameter tree, one tensor per m3jax path, layers stacked) and the same tokenizer files. Both kinds load
everywhere m3jax takes a model path. Directories of format version 1 (params/ an orbax checkpoint) still load.

Memory: conversion reads, checks and writes one tensor at a time (peak: the largest tensor, the 1 GB word-embedding
table, above the libraries). Loading memory-maps params.safetensors and hands the mapped pages to XLA without a copy
(every tensor starts 64-byte aligned), so only the pages a forward touches become resident: for the word embeddings,
the rows of the tokens seen.

torch and safetensors (the `convert` extra) are imported only where release files are read or written.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from m3jax._io import atomic_dir, cache_root, is_hub_id
from m3jax.config import ConfigError, M3Config
from m3jax.weights import (
    ConversionError,
    converted_tensors,
    flatten,
    param_shapes,
    params_to_torch,
    torch_to_params,
    unflatten,
)

MARKER = "m3jax.json"
FORMAT_VERSION = 2  # 1: params/ is an orbax checkpoint; 2: params/params.safetensors
PARAMS_FILE = "params.safetensors"
ALIGN = 64  # XLA's CPU client aliases host arrays aligned to 64 bytes instead of copying them
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "sentencepiece.bpe.model")
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
HEAD_FILES = ("colbert_linear.pt", "sparse_linear.pt")
HUB_PATTERNS = ["config.json", "model.safetensors", "model.safetensors.index.json", "model-*.safetensors",
                *HEAD_FILES, *TOKENIZER_FILES]

logger = logging.getLogger("m3jax")


class CheckpointError(ValueError):
    """A model directory that cannot be read or written."""


class HubUnavailableError(OSError):
    """A hub id that could not be fetched (offline, unknown repo, or huggingface_hub missing)."""


def is_m3jax_dir(path: str | os.PathLike) -> bool:
    return (Path(path) / MARKER).is_file()


# ------------------------------------------------------------------------------------------------ hub ids
def resolve(name_or_path: str | os.PathLike, *, cache_dir: str | None = None, revision: str | None = None) -> Path:
    """A local directory as is; an `org/name` hub id downloaded through huggingface_hub (release files only)."""
    path = Path(name_or_path).expanduser()
    if path.exists():
        if not path.is_dir():
            raise CheckpointError(f"{path}: is a file; expected a model directory")
        return path
    name = str(name_or_path)
    if not is_hub_id(name):
        raise CheckpointError(f"{name}: no such directory (and not a hub id of the form 'org/name')")
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise HubUnavailableError(
            f"{name!r} is a hub id, but huggingface_hub is not installed: pip install 'm3jax[convert]', "
            "or pass a local directory") from None
    try:
        return Path(snapshot_download(name, allow_patterns=HUB_PATTERNS, cache_dir=cache_dir, revision=revision))
    except Exception as e:  # noqa: BLE001 - any hub failure gets the same advice
        raise HubUnavailableError(
            f"could not fetch {name!r} from the Hugging Face hub ({type(e).__name__}: {str(e).splitlines()[0]}). "
            f"Offline? Download it where the hub is reachable (huggingface-cli download {name} --local-dir DIR), "
            f"copy DIR here and pass it, or convert it once with: python convert/release_to_m3jax.py DIR OUT"
        ) from None


# ----------------------------------------------------------------------------------------- release layout
def _torch():
    try:
        import torch
    except ImportError:
        raise CheckpointError("reading or writing PyTorch files needs torch: pip install torch "
                              "'m3jax[convert]'") from None
    return torch


class _LazyTensors(Mapping):
    """{key: torch tensor or numpy array} seen as float numpy arrays, converted one at a time."""

    def __init__(self, tensors: Mapping[str, Any]):
        self._t = tensors

    def __getitem__(self, key):
        v = self._t[key]
        if hasattr(v, "detach"):  # torch tensor
            v = v.detach()
            if v.dtype.is_floating_point and v.dtype.itemsize < 4:
                v = v.float()  # bf16 has no numpy dtype; fp16 upcasts exactly
            return v.numpy()
        return np.asarray(v)

    def __iter__(self) -> Iterator[str]:
        return iter(self._t)

    def __len__(self) -> int:
        return len(self._t)


_ST_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
              "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool"}


class _SafetensorsFile(Mapping):
    """{key: numpy array} of a .safetensors file, each tensor read with a plain read when asked for, or with
    mmap=True a read-only view of a memory map of the file. bfloat16 tensors come back as float32 (a copy).

    Conversion reads (a tensor read once and dropped leaves nothing resident; mapped pages, once touched, count
    toward the process's resident memory for as long as the map lives). Loading maps (the map *is* the parameters).
    """

    def __init__(self, path: Path, *, mmap: bool = False):
        self._path = path
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            n = int.from_bytes(head, "little") if len(head) == 8 else -1
            if not 2 <= n <= size - 8:
                raise CheckpointError(f"{path}: cannot read safetensors file (header length {n}, file size {size})")
            try:
                header = json.loads(f.read(n))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise CheckpointError(f"{path}: cannot read safetensors file (bad header: {e})") from None
        header.pop("__metadata__", None)
        self._start = 8 + n
        self._meta = header
        for key, m in header.items():
            begin, end = m.get("data_offsets", (0, -1))
            if m.get("dtype") not in _ST_DTYPES or self._start + end > size or end < begin:
                raise CheckpointError(f"{path}: cannot read safetensors file: tensor {key!r} has entry {m}, but the "
                                      f"file has {size} bytes (truncated?) or the dtype is unknown")
        self._map = np.memmap(path, dtype=np.uint8, mode="r") if mmap else None

    def entry(self, key: str) -> dict:
        """The header entry of one tensor: dtype (safetensors' name), shape, data_offsets."""
        return self._meta[key]

    def __getitem__(self, key):
        m = self._meta[key]
        begin, end = m["data_offsets"]
        name = _ST_DTYPES[m["dtype"]]
        dtype = np.dtype(jnp.bfloat16) if name == "bfloat16" else np.dtype(name)
        count = (end - begin) // dtype.itemsize
        if self._map is not None:
            arr = self._map[self._start + begin:self._start + begin + count * dtype.itemsize].view(dtype)
        else:
            arr = np.fromfile(self._path, dtype=dtype, count=count, offset=self._start + begin)
        if count != int(np.prod(m["shape"], dtype=np.int64)):
            raise CheckpointError(f"{self._path}: tensor {key!r}: {end - begin} bytes for shape {m['shape']}")
        arr = arr.reshape(m["shape"])
        return arr.astype(np.float32) if name == "bfloat16" else arr

    def __iter__(self) -> Iterator[str]:
        return iter(self._meta)

    def __len__(self) -> int:
        return len(self._meta)


def _read_safetensors(path: Path) -> Mapping[str, Any]:
    try:
        return _SafetensorsFile(path)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read safetensors file ({type(e).__name__}: {e})") from None


def _read_torch(path: Path) -> Mapping[str, Any]:
    torch = _torch()
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # noqa: BLE001 - truncated zips, pickles, wrong formats all end here
        raise CheckpointError(f"{path}: cannot read PyTorch file ({type(e).__name__}: {e})") from None
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path}: expected a state dict, found {type(obj).__name__}")
    return obj


def _read_weight_file(path: Path) -> Mapping[str, Any]:
    return _read_safetensors(path) if path.suffix == ".safetensors" else _read_torch(path)


def _encoder_files(src: Path) -> list[Path]:
    for name in WEIGHT_FILES:
        if (src / name).is_file():
            return [src / name]
        index = src / f"{name}.index.json"
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise CheckpointError(f"{index}: not a valid shard index ({e})") from None
            files = [src / f for f in dict.fromkeys(weight_map.values())]
            missing = [str(f) for f in files if not f.is_file()]
            if missing:
                raise CheckpointError(f"{index}: shard file(s) missing: {missing}")
            return files
    raise CheckpointError(f"{src}: no encoder weights (expected one of {list(WEIGHT_FILES)})")


def read_release(src: str | os.PathLike, *, colbert_dim: int | None = None) -> tuple[M3Config, dict]:
    """Reads a release-layout directory into (config, float32 parameter tree). Reports every problem at once."""
    cfg, files = _release_tensors(Path(src), colbert_dim=colbert_dim)
    return cfg, torch_to_params(files, cfg)


def _release_tensors(src: Path, *, colbert_dim: int | None = None) -> tuple[M3Config, dict[str, Mapping]]:
    """(config, {file: {torch key: lazily read float array}}) of a release directory; nothing big is read yet."""
    if not src.is_dir():
        raise CheckpointError(f"{src}: not a directory")
    missing_heads = [str(src / h) for h in HEAD_FILES if not (src / h).is_file()]
    if missing_heads:
        raise CheckpointError(f"head file(s) missing: {missing_heads}; BGE-M3 needs both colbert_linear.pt and "
                              "sparse_linear.pt (without them FlagEmbedding leaves the heads random)")
    heads = {h: _read_torch(src / h) for h in HEAD_FILES}
    if colbert_dim is None or colbert_dim <= 0:
        w = heads["colbert_linear.pt"].get("weight")
        colbert_dim = int(w.shape[0]) if w is not None and len(w.shape) == 2 else None
    cfg = M3Config.from_json_file(src / "config.json", colbert_dim=colbert_dim)

    files = {str(f): _LazyTensors(_read_weight_file(f)) for f in _encoder_files(src)}
    for name, sd in heads.items():
        prefix = name.removesuffix(".pt") + "."
        files[str(src / name)] = _LazyTensors({prefix + k: v for k, v in sd.items()})
    return cfg, files


def export_release(src: Any, dst: str | os.PathLike, *, weights_format: str = "safetensors",
                   overwrite: bool = False) -> Path:
    """Writes m3jax weights in the release layout, which FlagEmbedding's BGEM3FlagModel loads.

    src: an m3jax or release directory, or a (config, params, tokenizer_dir) triple.
    weights_format: "safetensors" (model.safetensors) or "bin" (pytorch_model.bin). Heads are stored in float16,
    as the release stores them. The unused pooler is not written.
    """
    if weights_format not in ("safetensors", "bin"):
        raise ValueError(f"weights_format must be 'safetensors' or 'bin', got {weights_format!r}")
    if isinstance(src, (str, os.PathLike)):
        cfg, params, tok_dir = load_params(src)
    elif isinstance(src, tuple) and len(src) == 3:
        cfg, params, tok_dir = src
    else:
        raise TypeError(f"src must be a directory or a (config, params, tokenizer_dir) triple, got "
                        f"{type(src).__name__}")
    torch = _torch()
    flat = params_to_torch(jax.tree_util.tree_map(np.asarray, params), cfg)
    encoder = {k: v for k, v in flat.items() if not k.startswith(("colbert_linear.", "sparse_linear."))}

    with atomic_dir(dst, overwrite, CheckpointError) as tmp:
        (tmp / "config.json").write_text(json.dumps(cfg.to_hf_config(), indent=2) + "\n")
        if weights_format == "safetensors":
            from safetensors.numpy import save_file
            save_file(encoder, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        else:
            torch.save({k: torch.from_numpy(v) for k, v in encoder.items()}, tmp / "pytorch_model.bin")
        for head in ("colbert_linear", "sparse_linear"):
            sd = {n: torch.from_numpy(np.array(flat[f"{head}.{n}"])).half() for n in ("weight", "bias")}
            torch.save(sd, tmp / f"{head}.pt")
        _copy_tokenizer(tok_dir, tmp)
    return Path(dst)


# ------------------------------------------------------------------------------------------ m3jax layout
def _params_layout(shapes: Mapping[str, tuple[int, ...]]) -> tuple[bytes, dict[str, int]]:
    """(safetensors header, {m3jax path: absolute byte offset}) of params.safetensors: float32 tensors in the
    model's order, those whose size is a multiple of ALIGN first, after a header padded with spaces (as safetensors
    itself pads) to a multiple of ALIGN, so that all of those start aligned and load without a copy."""
    order = sorted(shapes, key=lambda p: 4 * int(np.prod(shapes[p])) % ALIGN != 0)  # stable: model order kept
    header: dict[str, Any] = {"__metadata__": {"format": "m3jax"}}
    pos = 0
    for p in order:
        n = 4 * int(np.prod(shapes[p]))
        header[p] = {"dtype": "F32", "shape": list(shapes[p]), "data_offsets": [pos, pos + n]}
        pos += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-(8 + len(raw)) % ALIGN)
    start = 8 + len(raw)
    return len(raw).to_bytes(8, "little") + raw, {p: start + header[p]["data_offsets"][0] for p in order}


class _ParamsWriter:
    """Writes params.safetensors a tensor (or one layer of a stacked tensor) at a time, with seek + write: a
    writable map would keep every written page resident (dirty pages count toward the process's RSS)."""

    def __init__(self, path: Path, shapes: Mapping[str, tuple[int, ...]]):
        self.shapes = dict(shapes)
        head, self.offsets = _params_layout(self.shapes)
        self.f = open(path, "wb")  # noqa: SIM115 - closed in __exit__
        self.f.write(head)
        self.f.truncate(len(head) + sum(4 * int(np.prod(s)) for s in self.shapes.values()))
        self.f.flush()

    def write(self, path: str, arr: np.ndarray, layer: int | None = None) -> None:
        shape = self.shapes[path] if layer is None else self.shapes[path][1:]
        if arr.shape != shape or arr.dtype != np.float32 or not arr.flags.c_contiguous:
            raise CheckpointError(f"parameter {path!r}: expected a C-contiguous float32 array of shape {shape}, "
                                  f"got {arr.dtype} {arr.shape}")
        self.f.seek(self.offsets[path] + (0 if layer is None else layer * arr.nbytes))
        self.f.write(memoryview(arr).cast("B"))  # large writes bypass the file's buffer: no copy

    def __enter__(self) -> _ParamsWriter:
        return self

    def __exit__(self, exc_type, *_) -> None:
        try:
            if exc_type is None:
                self.f.flush()
                os.fsync(self.f.fileno())  # on disk before the directory is renamed into place
        finally:
            self.f.close()


def _finish_m3jax(tmp: Path, cfg: M3Config, tokenizer_dir: str | os.PathLike, metadata: dict | None) -> None:
    (tmp / "config.json").write_text(json.dumps(cfg.to_hf_config(), indent=2) + "\n")
    meta = {"format": "m3jax", "version": FORMAT_VERSION, "colbert_dim": cfg.colbert_dim, **(metadata or {})}
    _copy_tokenizer(tokenizer_dir, tmp)
    (tmp / MARKER).write_text(json.dumps(meta, indent=2) + "\n")


def save_m3jax(dst: str | os.PathLike, cfg: M3Config, params: Mapping, tokenizer_dir: str | os.PathLike, *,
               overwrite: bool = False, metadata: dict | None = None) -> Path:
    """Writes an m3jax directory atomically: nothing appears at dst unless every file was written.

    params: the nested parameter tree of cfg (numpy or jax arrays, any float dtype; stored as float32).
    """
    shapes = param_shapes(cfg)
    flat = flatten(params)
    problems = [f"missing parameter {p!r} (shape {s})" for p, s in shapes.items() if p not in flat]
    problems += [f"unexpected parameter {p!r}" for p in flat if p not in shapes]
    problems += [f"parameter {p!r} has shape {tuple(np.shape(v))}, expected {shapes[p]}" for p, v in flat.items()
                 if p in shapes and tuple(np.shape(v)) != shapes[p]]
    if problems:
        raise CheckpointError(f"cannot save parameters for this config: {'; '.join(problems)}")
    with atomic_dir(dst, overwrite, CheckpointError) as tmp:
        (tmp / "params").mkdir()
        with _ParamsWriter(tmp / "params" / PARAMS_FILE, shapes) as w:
            for p in shapes:  # one leaf at a time in host memory (a device array is fetched, then dropped)
                w.write(p, np.ascontiguousarray(np.asarray(flat[p]), dtype=np.float32))
        _finish_m3jax(tmp, cfg, tokenizer_dir, metadata)
    return Path(dst)


def convert_release(src: str | os.PathLike, dst: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Release-layout directory (or hub id) -> m3jax directory, streamed: each tensor is read, checked, converted
    and written before the next is read. Every problem is reported at once (ConversionError) and then nothing
    appears at dst: the directory is assembled under a temporary name and renamed only when complete."""
    src = resolve(src)
    cfg, files = _release_tensors(src)
    with atomic_dir(dst, overwrite, CheckpointError) as tmp:
        (tmp / "params").mkdir()
        with _ParamsWriter(tmp / "params" / PARAMS_FILE, param_shapes(cfg)) as w:
            for slot, arr in converted_tensors(files, cfg):
                w.write(slot.path, arr, slot.layer)
                del arr  # before the next tensor is read
        _finish_m3jax(tmp, cfg, src, {"source": str(src)})
    return Path(dst)


def read_m3jax(src: str | os.PathLike, *, dtype: Any = "float32") -> tuple[M3Config, dict]:
    """(config, parameter tree of jax arrays on the host CPU) of an m3jax directory.

    dtype: what the matmul parameters are restored as ("bfloat16" halves the memory a bf16 model needs at load);
    LayerNorm parameters stay float32. Restored as float32, the parameters of a version-2 directory are the pages of
    a read-only memory map of params/params.safetensors (no copy; pages become resident as they are read), so the
    file must not be modified in place while they are in use (m3jax itself only ever replaces whole directories).
    """
    from m3jax.model import resolve_dtype

    src = Path(src).absolute()
    try:
        meta = json.loads((src / MARKER).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{src / MARKER}: unreadable ({e})") from None
    if meta.get("format") != "m3jax" or meta.get("version", 0) > FORMAT_VERSION:
        raise CheckpointError(f"{src / MARKER}: unsupported format {meta.get('format')!r} "
                              f"version {meta.get('version')!r}")
    cfg = M3Config.from_json_file(src / "config.json", colbert_dim=meta.get("colbert_dim"))
    wide = resolve_dtype(dtype)
    if meta.get("version", 0) >= 2:
        return cfg, _map_params(src / "params" / PARAMS_FILE, cfg, wide)
    return cfg, _restore_orbax(src / "params", cfg, wide)


def _map_params(path: Path, cfg: M3Config, wide: Any) -> dict:
    shapes = param_shapes(cfg)
    narrow = np.dtype(wide) != np.float32
    try:  # float32: mapped, no copy. Narrower: each tensor read, cast and dropped (mapped pages would stay resident)
        st = _SafetensorsFile(path, mmap=not narrow)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read parameters ({type(e).__name__}: {e})") from None
    problems = [f"missing parameter {p!r} (shape {s})" for p, s in shapes.items() if p not in st]
    problems += [f"unexpected parameter {p!r}" for p in st if p not in shapes]
    problems += [f"parameter {p!r} is {st.entry(p)['dtype']} {tuple(st.entry(p)['shape'])}, expected F32 {s}"
                 for p, s in shapes.items() if p in st and (st.entry(p)["dtype"] != "F32"
                                                           or tuple(st.entry(p)["shape"]) != s)]
    if problems:
        raise CheckpointError(f"{path}: does not match config.json: {'; '.join(problems)}")
    cpu = jax.local_devices(backend="cpu")[0]
    out = {}
    for p in shapes:
        arr = st[p]
        if "LayerNorm" not in p and narrow:
            arr = arr.astype(wide)
        out[p] = jax.device_put(arr, cpu)  # aliases aligned host arrays (the mapped float32 ones: no copy)
        del arr
    return unflatten(out)


def _restore_orbax(path: Path, cfg: M3Config, wide: Any) -> dict:
    """Format version 1: params/ is an orbax checkpoint of the float32 tree."""
    import orbax.checkpoint as ocp

    cpu = jax.sharding.SingleDeviceSharding(jax.local_devices(backend="cpu")[0])
    target = unflatten({p: jax.ShapeDtypeStruct(s, jnp.float32 if "LayerNorm" in p else wide, sharding=cpu)
                        for p, s in param_shapes(cfg).items()})
    try:
        with ocp.StandardCheckpointer() as ckptr:
            return ckptr.restore(path, target)
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(f"{path}: cannot restore parameters ({type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else ''})") from None


def load_params(name_or_path: str | os.PathLike, *, dtype: Any = "float32", **resolve_kw
                ) -> tuple[M3Config, dict, Path]:
    """(config, parameter tree, tokenizer directory) from either kind of directory, or a hub id. Parameters are
    float32 unless an m3jax directory is restored straight into dtype (see read_m3jax)."""
    src = resolve(name_or_path, **resolve_kw)
    if is_m3jax_dir(src):
        cfg, params = read_m3jax(src, dtype=dtype)
    elif (src / "config.json").is_file():
        cfg, params = read_release(src)
    else:
        raise CheckpointError(f"{src}: neither an m3jax directory ({MARKER}) nor a release directory "
                              "(config.json + weights)")
    return cfg, params, src


def load_pretrained(name_or_path: str | os.PathLike, *, cache_dir: str | None = None, dtype: Any = "float32"
                    ) -> tuple[M3Config, dict, Path]:
    """load_params, except that a hub id is converted once into $M3JAX_HOME/models and reused from there."""
    path = Path(name_or_path).expanduser()
    if not path.exists() and is_hub_id(str(name_or_path)):
        cached = cache_root() / "models" / str(name_or_path).replace("/", "--")
        if not is_m3jax_dir(cached):
            logger.info("converting %s into %s (once)", name_or_path, cached)
            convert_release(resolve(name_or_path, cache_dir=cache_dir), cached, overwrite=True)
        path = cached
    return load_params(path, dtype=dtype)


def params_sha256(params: Any, prefix: bytes = b"") -> str:
    """sha256 of prefix, then every leaf's tree path and float32 bytes, in path order: identifies a set of weights
    whatever their dtype or the order the tree lists them in. params: any pytree of arrays (a parameter dict, an
    nnx.State)."""
    h = hashlib.sha256(prefix)
    flat, _ = jax.tree_util.tree_flatten_with_path(params)
    for path, leaf in sorted(flat, key=lambda kv: jax.tree_util.keystr(kv[0])):
        h.update(jax.tree_util.keystr(path).encode())
        h.update(np.ascontiguousarray(np.asarray(leaf, dtype=np.float32)))  # its buffer: no copy into bytes
    return h.hexdigest()


# ------------------------------------------------------------------------------------------------ helpers
def _copy_tokenizer(src: str | os.PathLike, dst: Path) -> None:
    src = Path(src)
    if not (src / "tokenizer.json").is_file():
        raise CheckpointError(f"{src / 'tokenizer.json'}: missing; m3jax tokenizes with the `tokenizers` "
                              "library and needs tokenizer.json (BAAI/bge-m3 ships one)")
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copyfile(src / name, dst / name)


__all__ = ["CheckpointError", "ConfigError", "ConversionError", "HubUnavailableError", "cache_root", "convert_release",
           "export_release", "load_params", "load_pretrained", "params_sha256", "read_m3jax", "read_release",
           "resolve", "save_m3jax"]
