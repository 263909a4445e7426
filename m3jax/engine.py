"""`Encoder`: the encoding engine every job stands on. A model on a set of devices, its compiled bucket
executables, batch planning, and encode as a generator over batches (streaming) or into one EncodeResult.

    enc = Encoder.from_pretrained("BAAI/bge-m3")          # or a release / m3jax directory
    ids, truncated = enc.tokenizer.encode(texts, 512)
    for batch, out in enc.run(enc.batches(ids, batch_size=256)):
        ...                                                # out: EncodeOutputs on the host, batch.indices rows
"""

from __future__ import annotations

import collections
import concurrent.futures
import functools
import hashlib
import itertools
import json
import logging
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from m3jax import accelerators, pipeline
from m3jax._io import cache_root
from m3jax.checkpoint import load_pretrained, params_sha256
from m3jax.config import M3Config
from m3jax.model import BGEM3Model, abstract_model, model_from_params, resolve_dtype
from m3jax.tokenizer import Tokenizer

logger = logging.getLogger("m3jax")

# XLA's CPU dots: its default library (YNNPACK) is the faster for attention's small per-head products, Eigen (the
# other one it ships) for the model's large float32 projections, which dominate short inputs. So float32 buckets up
# to CPU_EIGEN_MAX_LENGTH tokens compile with Eigen's dots and the feed-forward in column blocks (BGEM3Model's
# projections "split"), longer ones and bfloat16 (where YNNPACK's dots are the fast ones) with XLA's defaults.
# Chosen by benchmarks/forward_vs_torch.py on more than one CPU type (benchmarks/RESULTS.md); compiler_options={}
# turns it off.
CPU_EIGEN_MAX_LENGTH = 1024
CPU_EIGEN_DOTS = {"xla_cpu_experimental_ynn_fusion_type": ""}
# Rows per device of the first compile that sizes a bucket on an accelerator (Encoder.rows_that_fit): this many
# tokens, the rest is extrapolated from its memory analysis and checked by a second compile.
PROBE_TOKENS = 16384
MAX_ROWS_PER_DEVICE = 4096
# Threads that compile planned shapes ahead of their first batch (Encoder.prepare); one XLA compile keeps about two
# cores busy.
COMPILE_THREADS = max(1, min(8, (os.cpu_count() or 2) // 2))
LOCKSTEP_AHEAD = 16  # steps whose shapes the processes of a global mesh agree at once (Encoder._lockstep)


def default_compiler_options(platform: str, length: int, dtype: Any = "float32") -> dict[str, Any]:
    """The XLA options an executable for padded `length` gets when the user passes none: on CPU in float32 Eigen's
    dots up to CPU_EIGEN_MAX_LENGTH, XLA's defaults otherwise."""
    eigen = platform == "cpu" and length <= CPU_EIGEN_MAX_LENGTH and jnp.dtype(dtype) == jnp.float32
    return dict(CPU_EIGEN_DOTS) if eigen else {}


def projections(platform: str, options: dict[str, Any]) -> str:
    """BGEM3Model's `projections` for an executable compiled with `options`: on CPU with Eigen's dots "split" (its
    up-projection is faster in column blocks); else "xla"."""
    eigen = platform == "cpu" and options.get("xla_cpu_experimental_ynn_fusion_type") == ""
    return "split" if eigen else "xla"


class CompilePlan(NamedTuple):
    options: dict[str, Any]  # XLA compiler options
    projections: str  # BGEM3Model's projections


def compile_plan(platform: str, length: int, options: dict[str, Any] | None = None,
                 dtype: Any = "float32") -> CompilePlan:
    """How Encoder compiles an executable of padded `length` in `dtype`: `options` as given, or
    default_compiler_options when None, and the projections to match (see `projections`)."""
    if options is None:
        options = default_compiler_options(platform, length, dtype)
    return CompilePlan(options, projections(platform, options))


def configure_compilation_cache(cache: bool | str | os.PathLike = True) -> str | None:
    """Turns on JAX's persistent compilation cache for the whole process (default `$M3JAX_HOME/jax_cache`), unless
    the user already configured one or passed False, and caches every executable however fast it compiled
    (`jax_persistent_cache_min_compile_time_secs` 0). Returns the directory in use.

    Opt-in: the `m3jax` command calls it for its own process; BGEM3(compilation_cache=...) and
    fit(compilation_cache=...) call it when asked; constructing a model never changes jax.config otherwise."""
    current = jax.config.jax_compilation_cache_dir
    if cache is False:
        return current
    if current and cache is True:
        return current
    path = str(cache_root() / "jax_cache") if cache is True else str(cache)
    Path(path).mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", path)
    # A bucket compiles in about a second on CPU, under JAX's default 1 s threshold: cache every one.
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    return path


# /proc/cpuinfo flags of CPUs with bfloat16 dot-product instructions: x86's AVX512-BF16 and AMX-BF16, ARM's BF16.
BF16_CPU_FLAGS = frozenset({"avx512_bf16", "amx_bf16", "bf16"})


def cpu_bf16_flags(cpuinfo: str) -> set[str]:
    """The BF16_CPU_FLAGS among a /proc/cpuinfo text's "flags" (x86) or "Features" (ARM) lines."""
    found = set()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            found |= BF16_CPU_FLAGS.intersection(value.split())
    return found


@functools.cache
def cpu_has_bf16() -> bool:
    """Whether this host's CPU has bfloat16 dot-product instructions (see BF16_CPU_FLAGS; macOS: sysctl's
    hw.optional.arm.FEAT_BF16), which is where bfloat16 is worth computing in on CPU."""
    if sys.platform == "darwin":
        try:
            out = subprocess.run(["sysctl", "-n", "hw.optional.arm.FEAT_BF16"], capture_output=True, text=True,
                                 timeout=10).stdout
        except (OSError, subprocess.SubprocessError):
            return False
        return out.strip() == "1"
    try:
        return bool(cpu_bf16_flags(Path("/proc/cpuinfo").read_text()))
    except OSError:
        return False


def resolve_devices(devices: Any) -> list:
    """None: every local device; "global": every device of every process (a multi-host job in lockstep, see
    Encoder); else a jax.Device, an index, a platform name ("cpu", "gpu", "cuda:1", "tpu"), or a list of those."""
    if devices is None:
        return jax.local_devices()
    if isinstance(devices, str) and devices == "global":
        return jax.devices()
    items = devices if isinstance(devices, (list, tuple)) else [devices]
    out = []
    for d in items:
        if isinstance(d, jax.Device):
            out.append(d)
        elif isinstance(d, int):
            out.append(jax.local_devices()[d])
        elif isinstance(d, str):
            name, _, num = d.partition(":")
            name = {"cuda": "gpu"}.get(name, name)
            try:
                devs = jax.local_devices(backend=name)
            except RuntimeError as e:
                raise ValueError(f"device {d!r}: no {name} backend available ({e})") from None
            out.extend([devs[int(num)]] if num else devs)
        else:
            raise TypeError(f"devices: cannot interpret {d!r} ({type(d).__name__})")
    return out


class Encoder:
    """A BGE-M3 model placed on devices (data-parallel over several), with one compiled executable per bucket
    shape [rows, length] and the batch planner of m3jax.pipeline.

    Args:
      config, params, tokenizer_dir: what m3jax.checkpoint.load_params returns.
      dtype: "float32" or "bfloat16" compute (parameters cast at load).
      devices: see resolve_devices; rows of a batch are split over them. Devices of several processes (a pod
        slice: devices="global", or compile-only devices of a multi-host topology) make one global mesh that the
        processes drive in lockstep: each plans and feeds its own rows (a batch's rows are per process, over its
        own devices), one executable runs on all of them per step, and before each step the processes agree its
        shape (the longest length and most rows any of them brings; one with nothing left feeds filler rows).
        Every process must then call `run` / `encode` equally often until all are done.
      attn_impl: see m3jax.attention ("auto" chooses by platform, length and dtype).
      length_buckets: padded lengths (default m3jax.pipeline.default_length_buckets(platform): finer past 2,048
        tokens on CPU); the largest must hold the model's longest input.
      max_tokens_per_batch: token budget of one batch (rows = min(batch_size, budget // length)). None (the
        default): m3jax.pipeline.DEFAULT_MAX_TOKENS on CPU; on an accelerator the rows that fit each device's memory
        (rows_that_fit: measured from the compiler's memory analysis, cached per model, device kind and dtype).
      pooling, normalize, truncate_dim: FlagEmbedding's pooling_method, normalize_embeddings, truncate_dim.
      compiler_options: XLA options for every executable (`jax.stages.Lowered.compile(compiler_options=...)`),
        e.g. {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_DOT"}; {}: XLA's defaults; None:
        default_compiler_options per bucket (on CPU, Eigen's dots for short buckets).

    params=None builds an Encoder of shapes only (parameters as ShapeDtypeStructs): it plans and compiles exactly as
    a real one, e.g. for compile-only devices (m3jax.accelerators, `m3jax preflight`), but cannot run; tokenizer_dir
    may then be None.
    """

    def __init__(self, config: M3Config, params: Any, tokenizer_dir: str | os.PathLike, *,
                 dtype: Any = "float32", devices: Any = None, attn_impl: str = "auto",
                 length_buckets: Sequence[int] | None = None,
                 max_tokens_per_batch: int | None = None, pooling: str = "cls",
                 normalize: bool = True, truncate_dim: int | None = None,
                 compiler_options: dict[str, Any] | None = None):
        if pooling not in ("cls", "mean"):
            raise ValueError(f"pooling must be 'cls' or 'mean', got {pooling!r}")
        self.devices, self.local_devices, self.process_rank, self.processes = _process_blocks(
            resolve_devices(devices))
        default = pipeline.default_length_buckets(self.devices[0].platform)
        buckets = tuple(sorted(int(b) for b in (length_buckets or default)))
        longest = min(config.max_length, pipeline.LENGTH_BUCKETS[-1])
        if buckets[0] < 2 or buckets[-1] < longest:
            raise ValueError(f"length_buckets must be lengths >= 2 whose largest holds the longest input "
                             f"({longest} tokens), got {length_buckets!r}")
        self.config = config
        self.dtype = resolve_dtype(dtype)
        self.tokenizer_dir = None if tokenizer_dir is None else Path(tokenizer_dir)
        self.tokenizer = None if tokenizer_dir is None else Tokenizer(tokenizer_dir)
        self.attn_impl = attn_impl
        self.length_buckets = buckets
        self.platform = self.devices[0].platform
        if max_tokens_per_batch is None and self.platform == "cpu":
            max_tokens_per_batch = pipeline.DEFAULT_MAX_TOKENS
        self.max_tokens_per_batch = max_tokens_per_batch
        self.pooling, self.normalize, self.truncate_dim = pooling, normalize, truncate_dim
        self.compiler_options = None if compiler_options is None else dict(compiler_options)
        # Executables are lowered under this mesh (jax.set_mesh): attention dispatches by its platform and runs its
        # kernels per device's rows (m3jax.attention).
        self.mesh = jax.sharding.Mesh(np.array(self.devices), ("data",))
        replicated = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec())
        if len(self.devices) > 1:
            self.row_sharding = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec("data"))
        else:
            self.row_sharding, replicated = None, jax.sharding.SingleDeviceSharding(self.devices[0])
        if params is None:
            self.graphdef, state = nnx.split(abstract_model(config, dtype=self.dtype))
            self.state = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated),
                                                state)
        else:
            self.graphdef, state = nnx.split(model_from_params(config, params, dtype=self.dtype))
            if self.processes > 1:  # every process holds the same parameters; each places its devices' copies
                self.state = jax.tree_util.tree_map(lambda x: _replicate(np.asarray(x), replicated), state)
            else:
                self.state = jax.device_put(state, replicated)
        self._compiled: dict[tuple, concurrent.futures.Future] = {}  # key -> its executable, compiled or under way
        self._lock = threading.Lock()
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None  # prepare's, started on first use
        self.compile_wait_s = 0.0  # seconds `executable` spent compiling or waiting for a compile
        self._rows_per_device: dict[int, int] | None = None  # rows_that_fit's table, loaded on first use
        self._batch_fits: dict[tuple[int, int], bool] = {}  # (length, rows) -> whether that batch fits
        # (length, rows, heads), or (length, rows, heads, mcls_interval) with MCLS -> seconds to compile or fetch
        self.compile_seconds: dict[tuple, float] = {}
        self._fingerprint: tuple[Any, str] | None = None  # (the state it was computed from, digest)

    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike, *, cache_dir: str | None = None,
                        dtype: Any = "float32", **kwargs) -> Encoder:
        """An m3jax directory, a release-layout directory, or a hub id (converted once, then cached)."""
        cfg, params, tok_dir = load_pretrained(name_or_path, cache_dir=cache_dir, dtype=resolve_dtype(dtype))
        return cls(cfg, params, tok_dir, dtype=dtype, **kwargs)

    # ---------------------------------------------------------------------------------------------- model
    @property
    def model(self) -> BGEM3Model:
        """The NNX module (a view over the current state)."""
        return nnx.merge(self.graphdef, self.state)

    @property
    def params(self) -> dict:
        """float32 numpy parameter tree (what checkpoints store)."""
        pure = nnx.to_pure_dict(nnx.state(self.model, nnx.Param))
        return jax.tree_util.tree_map(lambda x: np.asarray(x, dtype=np.float32), pure)

    def fingerprint(self) -> str:
        """sha256 of the config and every parameter's bytes (float32): identifies the weights in job manifests.
        Computed once per state (hashing bge-m3's 2.3 GB takes seconds; every `embed` call asks)."""
        if self._fingerprint is not None and self._fingerprint[0] is self.state:
            return self._fingerprint[1]
        digest = params_sha256(nnx.to_pure_dict(nnx.state(self.model, nnx.Param)), repr(self.config).encode())
        self._fingerprint = (self.state, digest)
        return self._fingerprint[1]

    def output_dims(self) -> dict[str, int]:
        """Widths of the dense and ColBERT vectors after truncate_dim."""
        cfg, cut = self.config, self.truncate_dim or max(self.config.hidden_size, self.config.colbert_dim)
        return {"dense": min(cfg.hidden_size, cut), "colbert": min(cfg.colbert_dim, cut)}

    # --------------------------------------------------------------------------------------------- planning
    def tokenize(self, texts: Sequence[str], max_length: int) -> tuple[list[np.ndarray], np.ndarray, np.ndarray]:
        """(ids per text, lengths [N], truncated [N]); logs a warning naming the first truncated text."""
        self.check_max_length(max_length)
        ids, truncated = self.tokenizer.encode(list(texts), max_length)
        lengths = np.array([len(x) for x in ids], dtype=np.int64)
        if truncated.any():
            logger.warning("%d of %d text(s) truncated to max_length=%d tokens (first: index %d); "
                           "EncodeResult.truncated lists them", int(truncated.sum()), len(texts), max_length,
                           int(np.argmax(truncated)))
        return ids, lengths, truncated

    def check_max_length(self, max_length: int) -> None:
        """max_length counts a text's tokens with `<s>` and `</s>`, up to the model's position table."""
        limit = self.config.max_length
        if isinstance(max_length, bool) or not isinstance(max_length, int) or not 1 <= max_length <= limit:
            raise ValueError(f"max_length must be an int in 1 ... {limit}, got {max_length!r}")

    def check_mcls(self, max_length: int, mcls_interval: int | None) -> None:
        """Rejects an MCLS interval that is not a positive int, pooling other than "cls", or a max_length whose
        texts would no longer fit the position table (or the longest bucket) once their `<s>` are inserted: the
        inserted tokens do not count toward max_length, so the rule is fixed by the settings, never by the data."""
        self.check_max_length(max_length)
        if mcls_interval is None:
            return
        if isinstance(mcls_interval, bool) or not isinstance(mcls_interval, int) or mcls_interval < 1:
            raise ValueError(f"mcls_interval must be a positive int (text tokens per CLS) or None, got "
                             f"{mcls_interval!r}")
        if self.pooling != "cls":
            raise ValueError(f"mcls_interval averages CLS states; it needs pooling 'cls', this model pools "
                             f"{self.pooling!r}")
        limit = min(self.config.max_length, self.length_buckets[-1])
        if pipeline.mcls_length(max(max_length, 2), mcls_interval) > limit:
            fits = limit
            while pipeline.mcls_length(fits, mcls_interval) > limit:
                fits -= 1
            raise ValueError(f"max_length={max_length} with mcls_interval={mcls_interval}: a text truncated to "
                             f"{max_length} tokens has {pipeline.mcls_length(max_length, mcls_interval)} with its "
                             f"inserted <s>, more than the {limit} the model takes; use max_length <= {fits}")

    def insert_cls(self, ids: Sequence[np.ndarray], mcls_interval: int | None) -> list[np.ndarray]:
        """Token ids with MCLS's `<s>` inserted (m3jax.pipeline.insert_cls); unchanged for None."""
        if mcls_interval is None:
            return list(ids)
        self.check_mcls(2, mcls_interval)
        out = [pipeline.insert_cls(x, mcls_interval, self.config.bos_token_id) for x in ids]
        limit = min(self.config.max_length, self.length_buckets[-1])
        for i, x in enumerate(out):
            if len(x) > limit:  # callers that tokenised past check_mcls's max_length
                raise ValueError(f"ids[{i}]: {len(ids[i])} tokens, {len(x)} with MCLS's inserted <s>, more than "
                                 f"the {limit} the model takes")
        return out

    def plan(self, lengths: np.ndarray, *, batch_size: int) -> list[tuple[int, int, np.ndarray]]:
        """(bucket length, rows, indices) per batch, longest first (see m3jax.pipeline.plan_batches); rows are a
        multiple of this process's device count, at most batch_rows(length)."""
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        ndev = len(self.local_devices)
        return pipeline.plan_batches(np.asarray(lengths), batch_size=max(batch_size, ndev), row_multiple=ndev,
                                     buckets=self.length_buckets, max_rows=lambda L: self.batch_rows(L, batch_size),
                                     row_buckets=pipeline.default_row_buckets(self.platform))

    def batch_rows(self, length: int, batch_size: int | None = None) -> int:
        """The most rows of a batch of padded `length`: max_tokens_per_batch // length, or with
        max_tokens_per_batch None (accelerators' default) rows_that_fit (given batch_size, a batch of that many
        rows that fits is taken as it is)."""
        if self.max_tokens_per_batch is not None:
            return max(1, self.max_tokens_per_batch // length)
        return self.rows_that_fit(length, batch_size)

    def rows_that_fit(self, length: int, at_most: int | None = None) -> int:
        """The most rows (over this process's devices) of a [rows, length] batch whose executable, all three
        outputs, fits each device's memory with accelerators.HEADROOM to spare while the previous batch's outputs
        are still held (see accelerators.MemoryUse.in_flight). Measured once per bucket from the compiler's memory
        analysis: a probe compile of PROBE_TOKENS tokens per device, extrapolated linearly in rows, then a compile at
        that size that must fit (shrunk until it does); cached in $M3JAX_HOME/batch_rows per model, device kind,
        dtype and jax.

        at_most: the rows the caller wants at most (a batch size). When a batch of that many rows (rounded up to the
        device count) fits, it is the answer, unmeasured: its executable is the one the job runs anyway, so a
        bucket whose batches fit costs no compile beyond its own."""
        if self._rows_per_device is None:
            self._rows_per_device = self._read_rows_table()
        ndev = len(self.local_devices)
        if length not in self._rows_per_device and at_most is not None and at_most <= MAX_ROWS_PER_DEVICE * ndev:
            rows = -(-at_most // ndev) * ndev
            if (length, rows) not in self._batch_fits:  # asked once per planned batch: decided once
                use = accelerators.MemoryUse.of(self.executable(length, rows * self.processes))
                self._batch_fits[length, rows] = use.in_flight <= accelerators.usable_memory(self.devices[0])
            if self._batch_fits[length, rows]:
                return rows
        if length not in self._rows_per_device:
            self._rows_per_device[length] = self._measure_rows(length)
            self._write_rows_table()
        return self._rows_per_device[length] * ndev

    def _measure_rows(self, length: int) -> int:
        ndev, memory = len(self.devices), accelerators.usable_memory(self.devices[0])

        def use(rows: int) -> accelerators.MemoryUse:
            return accelerators.MemoryUse.of(self.executable(length, rows * ndev))

        rows, best = max(1, min(MAX_ROWS_PER_DEVICE, PROBE_TOKENS // length)), 0
        for _ in range(6):
            m = use(rows)
            if m.in_flight <= memory:
                best = max(best, rows)
            fixed = m.arguments + m.code
            guess = max(1, min(MAX_ROWS_PER_DEVICE, int((memory - fixed) * rows / max(1, m.in_flight - fixed))))
            if guess == rows or (best and guess <= best):
                break
            rows = guess
        if not best:
            raise ValueError(f"a batch of {rows} row(s) of {length} tokens needs {m.in_flight / 2**30:.2f} GiB per "
                             f"device, more than the {memory / 2**30:.2f} GiB usable of a "
                             f"{self.devices[0].device_kind}")
        return best

    def _rows_table_path(self) -> Path:
        key = json.dumps([repr(self.config), str(self.dtype), self.devices[0].device_kind, jax.__version__,
                          accelerators.HEADROOM, self.attn_impl, self.pooling, self.truncate_dim])
        return cache_root() / "batch_rows" / f"{hashlib.sha256(key.encode()).hexdigest()[:20]}.json"

    def _read_rows_table(self) -> dict[int, int]:
        path = self._rows_table_path()
        try:
            return {int(k): int(v) for k, v in json.loads(path.read_text())["rows_per_device"].items()}
        except (OSError, ValueError, KeyError, TypeError):
            return {}

    def _write_rows_table(self) -> None:
        path = self._rows_table_path()
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.partial")
        tmp.write_text(json.dumps({"device_kind": self.devices[0].device_kind, "dtype": str(self.dtype),
                                   "jax": jax.__version__, "headroom": accelerators.HEADROOM,
                                   "rows_per_device": {str(k): v for k, v in sorted(self._rows_per_device.items())}},
                                  indent=1))
        os.replace(tmp, path)

    def make_batches(self, ids: Sequence[np.ndarray], plan: Iterable[tuple[int, int, np.ndarray]],
                     mcls_interval: int | None = None) -> list[pipeline.Batch]:
        """The padded batches of a plan (from Encoder.plan) over token ids (insert_cls's, with mcls_interval)."""
        cfg = self.config
        return [pipeline.make_batch(ids, idx, L, rows, cfg.pad_token_id, cfg.bos_token_id, cfg.eos_token_id,
                                    mcls_interval) for L, rows, idx in plan]

    def batches(self, ids: Sequence[np.ndarray], *, batch_size: int, mcls_interval: int | None = None
                ) -> Iterator[pipeline.Batch]:
        """The padded batches for token ids (MCLS's `<s>` inserted here), built lazily in plan order."""
        ids = self.insert_cls(ids, mcls_interval)
        lengths = np.array([len(x) for x in ids], dtype=np.int64)
        for step in self.plan(lengths, batch_size=batch_size):
            yield from self.make_batches(ids, [step], mcls_interval)

    # ------------------------------------------------------------------------------------------------ run
    def executable(self, length: int, rows: int, heads: Sequence[str] = pipeline.HEADS,
                   mcls_interval: int | None = None, out_formats: tuple[tuple[str, Any], ...] = ()):
        """The compiled encode step for one bucket shape [rows, length] (of MCLS rows with mcls_interval; outputs
        cast or quantized on the device per out_formats, see pipeline.encode_step), compiled ahead of time on first
        use (or fetched from the persistent compilation cache); `compile_seconds` records how long each took. A shape
        being compiled in the background (prepare) is waited for: `compile_wait_s` adds up those waits and the
        compiles done here, the compile time on the caller's path."""
        key, static = self._step_key(length, rows, heads, mcls_interval, out_formats)
        t0 = time.perf_counter()
        exe = self._compiled_step(key, length, rows, static)
        self.compile_wait_s += time.perf_counter() - t0
        return exe

    def prepare(self, shapes: Iterable[tuple[int, int]], heads: Sequence[str] = pipeline.HEADS,
                mcls_interval: int | None = None, out_formats: tuple[tuple[str, Any], ...] = ()) -> None:
        """Starts compiling the encode steps of these [rows, length] shapes in background threads
        (COMPILE_THREADS; XLA compiles without holding Python's lock), so that `executable` finds them compiled
        or under way. Shapes already compiled or under way are skipped."""
        for length, rows in shapes:
            key, static = self._step_key(length, rows, heads, mcls_interval, out_formats)
            with self._lock:
                if key in self._compiled:
                    continue
                if self._pool is None:
                    self._pool = concurrent.futures.ThreadPoolExecutor(COMPILE_THREADS,
                                                                       thread_name_prefix="m3jax-compile")
            self._pool.submit(self._compiled_step, key, length, rows, static)

    def _step_key(self, length, rows, heads, mcls_interval, out_formats) -> tuple[tuple, dict]:
        heads = tuple(h for h in pipeline.HEADS if h in heads)
        static = dict(heads=heads, attn_impl=self.attn_impl, pooling=self.pooling, normalize=self.normalize,
                      truncate_dim=self.truncate_dim, special_ids=self.config.special_ids)
        key = (length, rows, heads)
        if mcls_interval is not None:  # the plain step keeps its key and its executable, exactly as without MCLS
            static["mcls_interval"] = mcls_interval
            key = (*key, mcls_interval)
        out_formats = tuple((h, f) for h, f in out_formats if (h in heads or h == "muvera") and f != "float32")
        if out_formats:  # likewise: float32 outputs keep the plain key
            static["out_formats"] = out_formats
            key = (*key, out_formats)
        return key, static

    def _compiled_step(self, key: tuple, length: int, rows: int, static: dict):
        """The executable of `key`, compiled by the first thread to ask; the others wait for it."""
        with self._lock:
            future = self._compiled.get(key)
            mine = future is None
            if mine:
                future = self._compiled[key] = concurrent.futures.Future()
        if not mine:
            return future.result()
        try:
            spec = jax.ShapeDtypeStruct((rows, length), np.int32, sharding=self.row_sharding)
            t0 = time.perf_counter()
            options, proj = compile_plan(self.platform, length, self.compiler_options, self.dtype)
            with jax.set_mesh(self.mesh):
                lowered = pipeline.encode_step.lower(self.graphdef, self.state, spec, spec, **static,
                                                     projections=proj)
            exe = _compile(lowered, options, defaults=self.compiler_options is None)
            self.compile_seconds[key] = time.perf_counter() - t0
        except BaseException as e:
            with self._lock:  # a later call tries again (and raises again)
                del self._compiled[key]
            future.set_exception(e)
            raise
        future.set_result(exe)
        return exe

    def dispatch(self, batch: pipeline.Batch, heads: Sequence[str] = pipeline.HEADS,
                 out_formats: tuple[tuple[str, Any], ...] = ()) -> pipeline.EncodeOutputs:
        """Starts one batch on the devices, and its outputs' copy to the host as soon as they are ready, and returns
        without waiting (device arrays, all rows)."""
        ids, mask = batch.input_ids, batch.attention_mask
        shape = (ids.shape[0] * self.processes, ids.shape[1])
        if self.processes > 1:  # this process's rows are its block of the global batch
            ids, mask = (jax.make_array_from_process_local_data(self.row_sharding, x, shape) for x in (ids, mask))
        elif self.row_sharding is not None:
            ids, mask = jax.device_put((ids, mask), self.row_sharding)
        exe = self.executable(shape[1], shape[0], heads, batch.mcls_interval, out_formats)
        out = exe(self.state, ids, mask)
        for x in out:
            if x is not None and x.is_fully_addressable:
                x.copy_to_host_async()
            elif x is not None:
                for s in x.addressable_shards:
                    s.data.copy_to_host_async()
        return out

    def run(self, batches: Iterable[pipeline.Batch], heads: Sequence[str] = pipeline.HEADS,
            out_formats: tuple[tuple[str, Any], ...] = ()) -> Iterator[tuple[pipeline.Batch, pipeline.EncodeOutputs]]:
        """Yields (batch, outputs on the host trimmed to the batch's real rows), keeping one batch in flight
        ahead so the host's work on a result overlaps the next batch's compute. out_formats: outputs cast or
        quantized on the device, MUVERA FDEs added (see pipeline.encode_step)."""
        heads = _check_heads(heads)
        if self.processes > 1:
            batches = self._lockstep(batches)
        pending = None
        for batch in batches:
            current = (batch, self.dispatch(batch, heads, out_formats))
            if pending is not None and len(pending[0].indices):
                yield self._fetch(*pending)
            pending = current
        if pending is not None and len(pending[0].indices):
            yield self._fetch(*pending)

    def _lockstep(self, batches: Iterable[pipeline.Batch], ahead: int = LOCKSTEP_AHEAD) -> Iterator[pipeline.Batch]:
        """This process's batches, each padded to the shape all processes agreed for that step (the longest length
        and most rows any brings), and filler batches once it has none left, until every process is done. Shapes
        are agreed `ahead` steps at a time: each agreement waits for the devices, so fewer keep them busy."""
        from jax.experimental import multihost_utils

        it, cfg = iter(batches), self.config
        while True:
            mine = list(itertools.islice(it, ahead))
            shapes = np.zeros((ahead, 3), np.int64)  # rows, length, mcls_interval (0: none)
            for j, b in enumerate(mine):
                shapes[j] = (*b.input_ids.shape, b.mcls_interval or 0)
            every = np.asarray(multihost_utils.process_allgather(shapes)).reshape(self.processes, ahead, 3)
            if not every[:, :, 0].any():
                return
            for j in range(ahead):
                rows, length, mcls = every[:, j].max(0)
                if not rows:
                    break
                b = mine[j] if j < len(mine) else pipeline.Batch(np.zeros(0, np.int64), np.zeros((0, 0), np.int32),
                                                                 np.zeros((0, 0), np.int32), mcls or None)
                yield pipeline.pad_batch(b, int(rows), int(length), cfg.pad_token_id, cfg.bos_token_id,
                                         cfg.eos_token_id)

    def _fetch(self, batch: pipeline.Batch, out: pipeline.EncodeOutputs
               ) -> tuple[pipeline.Batch, pipeline.EncodeOutputs]:
        """Outputs on the host, this process's real rows of them."""
        k = len(batch.indices)
        if self.processes == 1:
            host = jax.device_get(out)
        else:
            start = self.process_rank * batch.input_ids.shape[0]
            host = [None if x is None else _rows_of(x, start, start + k) for x in out]
        return batch, pipeline.EncodeOutputs(*(None if x is None else x[:k] for x in host))

    def encode(self, texts: Sequence[str], *, batch_size: int = 256, max_length: int = 512,
               heads: Sequence[str] = pipeline.HEADS, progress: Any = None, mcls_interval: int | None = None
               ) -> pipeline.EncodeResult:
        """Encodes texts into one EncodeResult in input order. progress: anything with update(n), or None.
        mcls_interval: multiple CLS (see BGEM3.encode); lengths and ColBERT rows then count the text's own tokens."""
        heads = _check_heads(heads)
        self.check_mcls(max_length, mcls_interval)
        ids, lengths, truncated = self.tokenize(texts, max_length)
        batches = self.batches(ids, batch_size=batch_size, mcls_interval=mcls_interval)
        return pipeline.collect(self.run(batches, heads), len(ids), lengths, truncated, heads, self.output_dims(),
                                self.config.vocab_size, progress)


def _check_heads(heads: Sequence[str]) -> tuple[str, ...]:
    if not heads or set(heads) - set(pipeline.HEADS):
        raise ValueError(f"heads must be a non-empty subset of {pipeline.HEADS}, got {heads!r}")
    return tuple(h for h in pipeline.HEADS if h in heads)


def _process_blocks(devices: list) -> tuple[list, list, int, int]:
    """(devices ordered process by process, this process's, its rank among them, how many processes): a process's
    rows of a global batch are then one block. The devices of a process that holds none (compile-only devices of a
    topology) count as the first process's."""
    procs = sorted({d.process_index for d in devices})
    if len(procs) == 1:
        return devices, devices, 0, 1
    home = jax.process_index() if jax.process_index() in procs else procs[0]
    devices = sorted(devices, key=lambda d: (d.process_index, d.id))
    counts = collections.Counter(d.process_index for d in devices)
    if len(set(counts.values())) > 1:
        raise ValueError(f"devices of several processes must be as many per process, got {dict(counts)}")
    return devices, [d for d in devices if d.process_index == home], procs.index(home), len(procs)


def _replicate(x: np.ndarray, sharding) -> jax.Array:
    """x on every device of a sharding that spans processes (each process places its own devices' copies)."""
    return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])


def _rows_of(x: jax.Array, start: int, stop: int) -> np.ndarray:
    """Rows [start, stop) of a row-sharded global array, from this process's shards."""
    out = None
    for s in x.addressable_shards:
        a, b, _ = s.index[0].indices(x.shape[0]) if s.index else (0, x.shape[0], 1)
        lo, hi = max(a, start), min(b, stop)
        if lo < hi:
            data = np.asarray(s.data)
            if out is None:
                out = np.empty((stop - start, *data.shape[1:]), data.dtype)
            out[lo - start:hi - start] = data[lo - a:hi - a]
    if out is None and stop > start:
        raise RuntimeError(f"rows {start} ... {stop - 1} of a {x.shape} output are on no device of this process")
    return out if out is not None else np.zeros((0, *x.shape[1:]), x.dtype)


def _compile(lowered: jax.stages.Lowered, options: dict[str, Any], defaults: bool):
    """Compiles with `options`; where they are m3jax's defaults (default_compiler_options) and this jaxlib does not
    know one (an older XLA), with XLA's own defaults instead. The user's options are never dropped."""
    try:
        return lowered.compile(compiler_options=options or None)
    except Exception as e:
        if not (defaults and options) or "No such compile option" not in str(e):
            raise
        logger.info("XLA does not know %s; compiling with its defaults", sorted(options))
        return lowered.compile()
