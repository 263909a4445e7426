"""Checkpoint I/O: release-layout directories (BAAI/bge-m3), m3jax directories (orbax), and the hub.

A release directory holds `config.json`, `model.safetensors` or `pytorch_model.bin` (optionally sharded with an
`.index.json`), `colbert_linear.pt`, `sparse_linear.pt` (float16 in the release) and tokenizer files.
An m3jax directory holds `m3jax.json` (marker and metadata), `config.json`, `params/` (an orbax checkpoint of the
float32 parameter tree) and the same tokenizer files. Both kinds load everywhere m3jax takes a model path.

torch and safetensors (the `convert` extra) are imported only where release files are read or written.
"""

from __future__ import annotations

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
from m3jax.weights import ConversionError, param_shapes, params_to_torch, torch_to_params, unflatten

MARKER = "m3jax.json"
FORMAT_VERSION = 1
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
    """{key: numpy array} of a .safetensors file, each tensor read with a plain read when asked for.

    Not memory-mapped: mapped file pages count toward the process's resident memory, and reading a 2.3 GB
    checkpoint through a map would double the conversion's peak. bfloat16 tensors come back as float32.
    """

    def __init__(self, path: Path):
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

    def __getitem__(self, key):
        m = self._meta[key]
        begin, end = m["data_offsets"]
        name = _ST_DTYPES[m["dtype"]]
        dtype = np.dtype(jnp.bfloat16) if name == "bfloat16" else np.dtype(name)
        count = (end - begin) // dtype.itemsize
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
    src = Path(src)
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
    return cfg, torch_to_params(files, cfg)


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
def save_m3jax(dst: str | os.PathLike, cfg: M3Config, params: Mapping, tokenizer_dir: str | os.PathLike, *,
               overwrite: bool = False, metadata: dict | None = None) -> Path:
    """Writes an m3jax directory atomically: nothing appears at dst unless every file was written."""
    import orbax.checkpoint as ocp

    # As jax arrays on the host CPU (device_put of an aligned numpy array aliases it, no copy): orbax's numpy path
    # stages about two copies of each leaf, its jax.Array path about one.
    cpu = jax.local_devices(backend="cpu")[0]
    # (In a multi-process job orbax refuses process-local jax.Arrays; numpy arrays are written by this process.)
    place = (lambda x: x) if jax.process_count() > 1 else (lambda x: jax.device_put(x, cpu))
    params = jax.tree_util.tree_map(lambda x: place(np.asarray(x, dtype=np.float32)), dict(params))
    with atomic_dir(dst, overwrite, CheckpointError) as tmp:
        # Only the largest leaf's bytes in flight: the default (96 GB) stages every parameter before writing.
        largest = max(x.nbytes for x in jax.tree_util.tree_leaves(params))
        # This process alone writes (in a multi-host job, one process saves the gathered model): no barrier waits
        # for processes that are not saving.
        alone = ocp.options.MultiprocessingOptions(primary_host=jax.process_index(),
                                                   active_processes={jax.process_index()})
        ckptr = ocp.Checkpointer(ocp.StandardCheckpointHandler(save_concurrent_gb=max(0.1, largest / 1e9 * 1.01),
                                                               multiprocessing_options=alone),
                                 multiprocessing_options=alone)
        ckptr.save((tmp / "params").absolute(), args=ocp.args.StandardSave(params))  # synchronous
        ckptr.close()
        (tmp / "config.json").write_text(json.dumps(cfg.to_hf_config(), indent=2) + "\n")
        meta = {"format": "m3jax", "version": FORMAT_VERSION, "colbert_dim": cfg.colbert_dim, **(metadata or {})}
        _copy_tokenizer(tokenizer_dir, tmp)
        (tmp / MARKER).write_text(json.dumps(meta, indent=2) + "\n")
    return Path(dst)


def convert_release(src: str | os.PathLike, dst: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Release-layout directory (or hub id) -> m3jax directory. Reads and checks everything before writing."""
    src = resolve(src)
    cfg, params = read_release(src)
    return save_m3jax(dst, cfg, params, src, overwrite=overwrite, metadata={"source": str(src)})


def read_m3jax(src: str | os.PathLike, *, dtype: Any = "float32") -> tuple[M3Config, dict]:
    """(config, parameter tree) of an m3jax directory. dtype: what the matmul parameters are restored as
    ("bfloat16" halves the memory a bf16 model needs at load); LayerNorm parameters stay float32."""
    import orbax.checkpoint as ocp

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
    shapes = param_shapes(cfg)
    cpu = jax.sharding.SingleDeviceSharding(jax.local_devices(backend="cpu")[0])
    wide = resolve_dtype(dtype)
    target = unflatten({p: jax.ShapeDtypeStruct(s, jnp.float32 if "LayerNorm" in p else wide, sharding=cpu)
                        for p, s in shapes.items()})
    try:
        with ocp.StandardCheckpointer() as ckptr:
            params = ckptr.restore(src / "params", target)
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(f"{src / 'params'}: cannot restore parameters ({type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else ''})") from None
    return cfg, params


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
           "export_release", "load_params", "load_pretrained", "read_m3jax", "read_release", "resolve",
           "save_m3jax"]
