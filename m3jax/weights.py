"""The one table between PyTorch state-dict keys (BAAI/bge-m3 release layout) and m3jax parameter paths.

Works on numpy arrays only; reading and writing files is `m3jax.checkpoint`'s job. Linear weights are [out, in]
in PyTorch and [in, out] kernels here; per-layer tensors `encoder.layer.{i}.*` are stacked on a leading axis.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping

import jax
import numpy as np

from m3jax.config import M3Config

# torch key (with {i} for the layer index) -> (m3jax path, transpose). Every key the release ships but the pooler.
TABLE: dict[str, tuple[str, bool]] = {
    "embeddings.word_embeddings.weight": ("embeddings/word_embeddings/embedding", False),
    "embeddings.position_embeddings.weight": ("embeddings/position_embeddings/embedding", False),
    "embeddings.token_type_embeddings.weight": ("embeddings/token_type_embeddings/embedding", False),
    "embeddings.LayerNorm.weight": ("embeddings/LayerNorm/scale", False),
    "embeddings.LayerNorm.bias": ("embeddings/LayerNorm/bias", False),
    **{
        f"encoder.layer.{{i}}.{name}.weight": (f"encoder/layer/{name.replace('.', '/')}/kernel", True)
        for name in ("attention.self.query", "attention.self.key", "attention.self.value",
                     "attention.output.dense", "intermediate.dense", "output.dense")
    },
    **{
        f"encoder.layer.{{i}}.{name}.bias": (f"encoder/layer/{name.replace('.', '/')}/bias", False)
        for name in ("attention.self.query", "attention.self.key", "attention.self.value",
                     "attention.output.dense", "intermediate.dense", "output.dense")
    },
    **{
        f"encoder.layer.{{i}}.{name}.LayerNorm.{t}": (f"encoder/layer/{name.replace('.', '/')}/LayerNorm/{j}", False)
        for name in ("attention.output", "output")
        for t, j in (("weight", "scale"), ("bias", "bias"))
    },
    "colbert_linear.weight": ("colbert_linear/kernel", True),
    "colbert_linear.bias": ("colbert_linear/bias", False),
    "sparse_linear.weight": ("sparse_linear/kernel", True),
    "sparse_linear.bias": ("sparse_linear/bias", False),
}
# Present in release checkpoints, unused by BGE-M3: dropped silently.
IGNORED = ("pooler.dense.weight", "pooler.dense.bias", "embeddings.position_ids")
PREFIX = "roberta."
HEAD_KEYS = ("colbert_linear.weight", "colbert_linear.bias", "sparse_linear.weight", "sparse_linear.bias")


class ConversionError(ValueError):
    """Every problem found in one set of weights, reported together."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__(f"{len(problems)} problem(s) in the weights:\n  " + "\n  ".join(problems))


@dataclasses.dataclass(frozen=True)
class Slot:
    path: str  # m3jax path, "/"-separated
    layer: int | None  # index on the stacked axis, or None
    transpose: bool
    torch_shape: tuple[int, ...]


def param_shapes(cfg: M3Config) -> dict[str, tuple[int, ...]]:
    """m3jax path -> shape, from the model definition itself (no memory allocated)."""
    from flax import nnx

    from m3jax.model import abstract_model

    pure = nnx.to_pure_dict(nnx.state(abstract_model(cfg), nnx.Param))
    flat = jax.tree_util.tree_flatten_with_path(pure)[0]
    return {"/".join(str(k.key) for k in kp): tuple(v.shape) for kp, v in flat}


def slots(cfg: M3Config) -> dict[str, Slot]:
    """Concrete torch key -> where it goes, for this config."""
    shapes = param_shapes(cfg)
    out = {}
    for template, (path, transpose) in TABLE.items():
        shape = shapes[path]
        layers = range(cfg.num_layers) if "{i}" in template else [None]
        if "{i}" in template:
            shape = shape[1:]
        torch_shape = tuple(reversed(shape)) if transpose else shape
        for i in layers:
            key = template.format(i=i) if i is not None else template
            out[key] = Slot(path, i, transpose, torch_shape)
    covered = {p for p, _ in TABLE.values()}
    assert covered == set(shapes), f"conversion table out of step with the model: {covered ^ set(shapes)}"
    return out


def converted_tensors(files: Mapping[str, Mapping[str, np.ndarray]], cfg: M3Config, *, dtype=np.float32,
                      heads: bool = True) -> Iterator[tuple[Slot, np.ndarray]]:
    """Yields (slot, C-contiguous array in m3jax's layout and dtype) for each PyTorch tensor, one at a time: each is
    read from its mapping only when its turn comes, so a consumer that writes it out and drops it holds one tensor.

    files: {source name (a file path): {torch key: array}}; the name is what error messages cite. Keys may carry a
    `roberta.` prefix; the pooler is ignored. After the last tensor, raises ConversionError listing every missing,
    unexpected, wrongly shaped, non-float and non-finite tensor at once (tensors already yielded included).
    heads=False: the encoder alone (XLM-RoBERTa's tensors; BGE-M3's sparse and ColBERT heads neither needed nor
    taken).
    """
    table = {k: v for k, v in slots(cfg).items() if heads or k not in HEAD_KEYS}
    problems, seen = [], {}
    for source, tensors in files.items():
        for raw_key in tensors:
            key = raw_key[len(PREFIX):] if raw_key.startswith(PREFIX) else raw_key
            if key in IGNORED:
                continue
            slot = table.get(key)
            if slot is None:
                problems.append(f"{source}: unexpected tensor {raw_key!r}")
                continue
            if key in seen:
                problems.append(f"{source}: tensor {key!r} given twice (also in {seen[key]})")
                continue
            seen[key] = source
            arr = tensors[raw_key]
            if tuple(arr.shape) != slot.torch_shape:
                problems.append(f"{source}: tensor {raw_key!r} has shape {tuple(arr.shape)}, "
                                f"expected {slot.torch_shape}")
                continue
            if not np.issubdtype(arr.dtype, np.floating):
                problems.append(f"{source}: tensor {raw_key!r} has dtype {arr.dtype}, expected a float type")
                continue
            bad = _count_non_finite(arr)
            if bad:
                problems.append(f"{source}: tensor {raw_key!r} has {bad} non-finite value(s)")
                continue
            yield slot, np.ascontiguousarray(arr.T if slot.transpose else arr, dtype=dtype)
            del arr
    where = ", ".join(files) or "no files"
    problems += [f"{where}: missing tensor {k!r} (shape {s.torch_shape})" for k, s in table.items() if k not in seen]
    if problems:
        raise ConversionError(problems)


def _count_non_finite(arr: np.ndarray, rows: int = 1 << 14) -> int:
    """Checked in blocks of rows: a [250002, 1024] table's boolean mask would cost a quarter of the table."""
    flat = arr.reshape(len(arr), -1) if arr.ndim > 1 else arr.reshape(-1, 1)
    return sum(int(flat[i:i + rows].size - np.isfinite(flat[i:i + rows]).sum()) for i in range(0, len(flat), rows))


def torch_to_params(files: Mapping[str, Mapping[str, np.ndarray]], cfg: M3Config, *, dtype=np.float32,
                    heads: bool = True) -> dict:
    """Converts PyTorch tensors (encoder and both heads) into m3jax's nested parameter dict (see converted_tensors
    for `files` and the errors). heads=False: the encoder's only (the result has no head parameters)."""
    head_paths = {TABLE[k][0] for k in HEAD_KEYS}
    flat = {path: np.zeros(shape, dtype) for path, shape in param_shapes(cfg).items()
            if heads or path not in head_paths}
    for slot, arr in converted_tensors(files, cfg, dtype=dtype, heads=heads):
        if slot.layer is None:
            flat[slot.path] = arr
        else:
            flat[slot.path][slot.layer] = arr
    return unflatten(flat)


def params_to_torch(params: Mapping, cfg: M3Config, *, heads: bool = True) -> dict[str, np.ndarray]:
    """The reverse: m3jax's nested parameter dict -> flat {torch key: float32 array}, encoder and heads
    (heads=False: the encoder's only; other parameters in `params` are not looked at)."""
    flat = flatten(params)
    out = {}
    for key, slot in slots(cfg).items():
        if not heads and key in HEAD_KEYS:
            continue
        arr = np.asarray(flat[slot.path], dtype=np.float32)
        if slot.layer is not None:
            arr = arr[slot.layer]
        out[key] = np.ascontiguousarray(arr.T if slot.transpose else arr)
    return out


def flatten(tree: Mapping, prefix: str = "") -> dict[str, np.ndarray]:
    out = {}
    for k, v in tree.items():
        path = f"{prefix}/{k}" if prefix else str(k)
        if isinstance(v, Mapping):
            out.update(flatten(v, path))
        else:
            out[path] = v
    return out


def unflatten(flat: Mapping[str, np.ndarray]) -> dict:
    tree: dict = {}
    for path, v in flat.items():
        node = tree
        *parents, leaf = path.split("/")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = v
    return tree
