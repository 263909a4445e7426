"""`fit`: fine-tune a BGE-M3 checkpoint on FlagEmbedding-format training data, as FlagEmbedding's M3 runner does.

    from m3jax.train import TrainConfig, fit
    from m3jax.train.data import DataConfig
    from m3jax.train.loss import LossConfig
    fit("BAAI/bge-m3", ["train.jsonl"], "out", TrainConfig(
        data=DataConfig(train_group_size=8, query_max_len=512, passage_max_len=512),
        loss=LossConfig(unified_finetuning=True, use_self_distill=True, self_distill_start_step=0),
        learning_rate=1e-5, warmup_ratio=0.1, num_train_epochs=1, per_device_batch_size=4, bf16=True))

What a run writes under output_dir:
  train_settings.json: what determines the run (model, data files, every TrainConfig field that changes the
    result, the device count); a rerun with other settings is refused rather than mixed into the same checkpoints.
  checkpoints/<step>/: orbax checkpoints (m3jax.train.checkpoints), every save_steps steps, the last
    save_total_limit kept. A rerun resumes from the latest one, exactly (same parameters as an uninterrupted run).
  train_log.jsonl: one JSON object per optimiser step: step, epoch, loss and the loss terms the loss returns
    (dense, sparse, colbert, ensemble, self_distill), lr (the rate this step used), grad_norm (before clipping),
    tokens (real tokens in the step's batches), tokens_per_s, seconds.
  tensorboard/: the same scalars, only if a TensorBoard writer is importable (tensorboardX or torch's
    torch.utils.tensorboard with the tensorboard package); m3jax does not depend on one.
  final/: the trained model as an m3jax directory; `m3jax export output_dir/final DIR` gives the release layout
    FlagEmbedding loads.

Before training, every row is parsed once (TrainData.validate): the row count sets the number of steps, and a bad
row fails the run before it starts rather than hours in.

Semantics follow the HF Trainer FlagEmbedding runs in: per_device_batch_size queries per device per micro-batch;
gradient_accumulation_steps micro-batches per optimiser step, each its own forward with its own in-batch negatives
(gradients averaged); steps per epoch = (batches per epoch) // accumulation steps (an epoch's leftover micro-batches,
fewer than one step's worth, are skipped and logged); total steps = max_steps if > 0, else
ceil(num_train_epochs · steps per epoch); the AdamW schedule of m3jax.train.step over those steps. Dropout is on
at the checkpoint's rates (torch's model.train()). bf16: the float32 master weights are cast to bfloat16 inside the
step (LayerNorm stays float32); gradients, clipping and AdamW state are float32.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from m3jax._io import settings_diff
from m3jax.train.data import DataConfig, RerankerDataConfig, TrainData
from m3jax.train.loss import LossConfig, RerankerLossConfig
from m3jax.train.step import OptimArgs

logger = logging.getLogger("m3jax")
SETTINGS = "train_settings.json"
LOG = "train_log.jsonl"
SETTINGS_VERSION = 1
# TrainConfig fields that may change between a run and its resumption: they do not change the result.
_RESUMABLE = ("save_steps", "save_total_limit", "quiet")


class TrainError(ValueError):
    """A run that cannot start or resume (wrong settings, too little data, a foreign output directory)."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainConfig(OptimArgs):
    """FlagEmbedding's M3 runner arguments (HF TrainingArguments defaults unless said otherwise), as keywords.

    Attributes:
      data: group size, max lengths, instructions, knowledge distillation (m3jax.train.data.DataConfig).
      loss: the M3 flags and temperature (m3jax.train.loss.LossConfig).
      per_device_batch_size: queries per device per micro-batch (per_device_train_batch_size).
      gradient_accumulation_steps: micro-batches per optimiser step.
      num_train_epochs, max_steps: run length; max_steps > 0 wins.
      learning_rate, warmup_ratio, warmup_steps, weight_decay, adam_beta1, adam_beta2, adam_epsilon,
        max_grad_norm: the optimiser, inherited from m3jax.train.step.OptimArgs (its run length is the total
        steps fit() derives).
      bf16: bfloat16 compute over float32 master weights.
      remat: recompute each encoder layer's activations in the backward pass (gradient_checkpointing): the memory
        of one layer instead of all, for long passages, at the cost of a second forward.
      gradient_cache_chunk: take each micro-batch's gradient through a gradient cache, encoding this many rows at a
        time (m3jax.train.loss.cached_value_and_grad): activation memory of a chunk, not of the micro-batch, with
        the micro-batch's in-batch negatives kept (gradient accumulation loses them), at the cost of a second
        forward. BGE-M3 only (a re-ranker's groups do not interact: use gradient_accumulation_steps).
      fsdp: shard parameters and optimiser state over the data axis (m3jax.train.sharding).
      dropout: train with the checkpoint's dropout rates (False: deterministic forward).
      seed: data order, sampling and dropout.
      save_steps, save_total_limit: checkpoint every N optimiser steps, keep the last K (None: all).
      shuffle_buffer_size: rows held for shuffling (TrainData).
      length_buckets: padded lengths (default m3jax.pipeline.LENGTH_BUCKETS); each side's max length is always one.
        Fewer buckets, fewer compilations: () pads every batch to query_max_len / passage_max_len.
      quiet: no progress bar.
    """

    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    loss: LossConfig = dataclasses.field(default_factory=LossConfig)
    per_device_batch_size: int = 8
    gradient_accumulation_steps: int = 1
    num_train_epochs: float = 3.0
    max_steps: int = -1
    bf16: bool = False
    remat: bool = False
    gradient_cache_chunk: int | None = None
    fsdp: bool = False
    dropout: bool = True
    seed: int = 42
    save_steps: int = 500
    save_total_limit: int | None = None
    shuffle_buffer_size: int = 100_000
    length_buckets: tuple[int, ...] | None = None
    quiet: bool = False

    def __post_init__(self):
        for name in ("per_device_batch_size", "gradient_accumulation_steps", "save_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_steps <= 0 and not self.num_train_epochs > 0:
            raise ValueError(f"give max_steps > 0 or num_train_epochs > 0 (got {self.max_steps}, "
                             f"{self.num_train_epochs})")
        if not self.learning_rate >= 0:
            raise ValueError(f"learning_rate must be >= 0, got {self.learning_rate}")
        if self.gradient_cache_chunk is not None and self.gradient_cache_chunk < 1:
            raise ValueError(f"gradient_cache_chunk must be >= 1 or None, got {self.gradient_cache_chunk}")
        for name, want in zip(("data", "loss"), self._field_types, strict=True):
            if not isinstance(getattr(self, name), want):
                raise TypeError(f"{type(self).__name__}.{name} must be a {want.__name__}, got "
                                f"{type(getattr(self, name)).__name__}")

    _field_types = (DataConfig, LossConfig)

    @property
    def task(self) -> Any:
        """What is trained (m3jax.train.tasks): BGE-M3."""
        from m3jax.train.tasks import M3Task

        return M3Task()

    def settings(self) -> dict:
        """The fields that determine the result, as JSON."""
        d = dataclasses.asdict(self)
        for k in _RESUMABLE:
            d.pop(k)
        return d


@dataclasses.dataclass(frozen=True, kw_only=True)
class RerankerTrainConfig(TrainConfig):
    """A cross-encoder re-ranker's fine-tuning, as FlagEmbedding's encoder-only re-ranker runner
    (FlagEmbedding.finetune.reranker.encoder_only.base): TrainConfig's fields, with the re-ranker's data
    (m3jax.train.data.RerankerDataConfig) and loss (m3jax.train.loss.RerankerLossConfig). fit() then reads a
    release-layout re-ranker (XLMRobertaForSequenceClassification, one label) and writes final/ in that layout.

        fit("BAAI/bge-reranker-v2-m3", ["scored.jsonl"], "out", RerankerTrainConfig(
            data=RerankerDataConfig(train_group_size=16, query_max_len=256, passage_max_len=256,
                                    knowledge_distillation=True),
            learning_rate=6e-5, warmup_ratio=0.1, num_train_epochs=2, per_device_batch_size=2, bf16=True))
    """

    data: RerankerDataConfig = dataclasses.field(default_factory=RerankerDataConfig)
    loss: RerankerLossConfig = dataclasses.field(default_factory=RerankerLossConfig)

    _field_types = (RerankerDataConfig, RerankerLossConfig)

    def __post_init__(self):
        super().__post_init__()
        if self.gradient_cache_chunk is not None:
            raise ValueError("gradient_cache_chunk is for BGE-M3's in-batch negatives; a re-ranker's groups do not "
                             "interact, so gradient_accumulation_steps bounds its memory")

    @property
    def task(self) -> Any:
        """What is trained (m3jax.train.tasks): a cross-encoder re-ranker."""
        from m3jax.train.tasks import RerankerTask

        return RerankerTask()


@dataclasses.dataclass(frozen=True)
class FitResult:
    final_dir: Path | None  # the trained model, an m3jax directory (None when stopped by until_step)
    steps: int  # optimiser steps taken in total (this call and earlier ones)
    resumed_from: int | None  # the checkpoint step this call resumed from
    last: dict  # the last step's logged metrics ({} if this call took no step)


def fit(model: str | os.PathLike, data: str | Sequence[str], output_dir: str | os.PathLike,
        config: TrainConfig | None = None, *, until_step: int | None = None, devices: Any = None,
        coordinator: str | None = None, num_processes: int | None = None, process_id: int | None = None,
        compilation_cache: bool | str = False) -> FitResult:
    """Fine-tunes `model` (m3jax or release directory, or hub id) on `data` (JSON-lines files, directories or
    fsspec URLs in FlagEmbedding's format) and writes output_dir (see the module docstring); resumes from
    output_dir's latest checkpoint when there is one. With a RerankerTrainConfig, `model` is a release-layout
    cross-encoder re-ranker, and final/ is written in that layout.

    until_step: stop after this optimiser step (writing a checkpoint there) without finishing the run, e.g. for
    jobs with a time slice; a later fit() call with the same settings continues. final_dir is then None.

    devices: the mesh's devices (default: all of every process). coordinator, num_processes, process_id:
    multi-host, as `m3jax embed` (m3jax.distributed.initialize; also from $M3JAX_COORDINATOR etc., and
    automatic on Cloud TPU pod slices); each process reads the stream and keeps its own rows of each batch.

    compilation_cache: True or a directory turns on JAX's persistent compilation cache for the process
    (m3jax.configure_compilation_cache; `m3jax train` does); False (the default) leaves jax.config as it is.
    """
    from m3jax.distributed import initialize
    from m3jax.engine import configure_compilation_cache

    config = config or TrainConfig()
    if until_step is not None and until_step < 1:
        raise ValueError(f"until_step must be >= 1 or None, got {until_step}")
    process, nproc = initialize(coordinator, num_processes, process_id)
    configure_compilation_cache(compilation_cache)
    run = _Run(model, data, Path(output_dir).absolute(), config, devices, process, nproc)
    try:
        return run.train(until_step)
    finally:
        run.close()


class _Run:
    """One fit() call: builds everything, then trains, checkpoints and logs."""

    def __init__(self, model, sources, out: Path, config: TrainConfig, devices, process: int, nproc: int):
        from m3jax.train.checkpoints import TrainCheckpoints
        from m3jax.train.sharding import make_mesh

        self.config, self.out, self.process = config, out, process
        self.task = config.task
        self.primary = process == 0
        state = self._load_model(model)
        self.mesh = make_mesh(devices)
        self.world = self.mesh.size
        rows = self._open_data(sources, nproc)
        self.total = self._count_steps(rows)
        self.settings = self._run_settings(model, state, rows, nproc)
        self._check_settings()
        self.plan = plan_step(self.cfg, config, self.mesh, self.total)
        self.state, self.opt_state = self.plan.place(state)
        self.ckpt = TrainCheckpoints(out / "checkpoints", save_steps=config.save_steps, keep=config.save_total_limit)
        try:
            self._resume()
            self._open_logs()
        except BaseException:  # fit() closes a _Run it got; this one never reaches it
            self.ckpt.close()
            raise

    # ------------------------------------------------------------------------------------------------ set-up
    def _load_model(self, model) -> Any:
        """The checkpoint's config and tokenizer directory (on self), and its parameters as a float32 nnx.State of
        host arrays."""
        self.cfg, state, self.tok_dir = self.task.read(model)
        return state

    def _open_data(self, sources, nproc: int) -> int:
        """This process's TrainData (its devices' rows of each global batch); every row is parsed here, so a bad one
        fails the run before it starts. Returns the number of rows."""
        from m3jax.tokenizer import Tokenizer

        c = self.config
        local = sum(d.process_index == jax.process_index() for d in self.mesh.devices.flat)
        self.data = TrainData(sources, Tokenizer(self.tok_dir), c.data, batch_size=c.per_device_batch_size * local,
                              seed=c.seed, process_index=self.process, num_processes=nproc,
                              shuffle_buffer_size=c.shuffle_buffer_size, pad_id=self.cfg.pad_token_id,
                              collate_fn=self.task.collate_fn(self.cfg),
                              **({} if c.length_buckets is None else {"buckets": tuple(c.length_buckets)}))
        return self.data.validate()

    def _count_steps(self, rows: int) -> int:
        """The run's optimiser steps, as the HF Trainer counts them (see the module docstring)."""
        c = self.config
        global_batch = c.per_device_batch_size * self.world
        batches_per_epoch = rows // global_batch
        steps_per_epoch = batches_per_epoch // c.gradient_accumulation_steps
        if steps_per_epoch == 0:
            raise TrainError(f"{rows} training rows make {batches_per_epoch} global batches of {global_batch} "
                             f"({c.per_device_batch_size} per device x {self.world} devices), fewer than one "
                             f"optimiser step of {c.gradient_accumulation_steps} micro-batches")
        return c.max_steps if c.max_steps > 0 else math.ceil(c.num_train_epochs * steps_per_epoch)

    def _run_settings(self, model, state, rows: int, nproc: int) -> dict:
        """What determines the result: written to train_settings.json and every checkpoint, compared on resume."""
        from m3jax.checkpoint import params_sha256

        return {"version": SETTINGS_VERSION, "model": str(model), "model_sha256": params_sha256(state),
                "data": self.data.files, "rows": rows, "devices": self.world, "processes": nproc,
                "total_steps": self.total, "config": _jsonable(self.config.settings())}

    def _check_settings(self) -> None:
        """Refuses an output directory that holds another run; writes train_settings.json into a new one."""
        path = self.out / SETTINGS
        if path.is_file():
            try:
                old = json.loads(path.read_text())
            except json.JSONDecodeError as e:
                raise TrainError(f"{path}: unreadable ({e}); not an m3jax training directory?") from None
            if _comparable(old) != _comparable(self.settings):
                raise TrainError(f"{self.out}: holds a run with other settings; use another output directory, or "
                                 f"the same settings to resume. Differences: "
                                 f"{settings_diff(old, self.settings, SETTINGS)}")
        elif (self.out / "checkpoints").is_dir() and any((self.out / "checkpoints").iterdir()):
            raise TrainError(f"{self.out / 'checkpoints'}: checkpoints without {SETTINGS}; not this run's")
        elif self.primary:
            self.out.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".json.partial")
            tmp.write_text(json.dumps(self.settings, indent=2) + "\n")
            os.replace(tmp, path)

    def _resume(self) -> None:
        """Continues from the latest checkpoint, if there is one and it is this run's; else starts at step 0."""
        self.step, self.epoch, self.consumed = 0, 0, 0
        self.rng = np.asarray(jax.random.key_data(jax.random.PRNGKey(self.config.seed)), np.uint32)
        self.resumed_from = self.ckpt.latest_step()
        if self.resumed_from is None:
            return
        where = self.ckpt.directory / str(self.resumed_from)
        old = self.ckpt.read_meta(self.resumed_from).get("settings")
        if _comparable(old) != _comparable(self.settings):
            raise TrainError(f"{where}: checkpoint of a run with other settings: "
                             f"{settings_diff(old, self.settings, 'the checkpoint')}")
        self.state, self.opt_state, meta = self.ckpt.restore(self.resumed_from, self.state, self.opt_state)
        self.step, self.epoch, self.consumed = meta["step"], meta["epoch"], meta["batches"]
        self.rng = np.asarray(meta["rng"], np.uint32)
        logger.info("resuming from step %d (epoch %d, %d batches in)", self.step, self.epoch, self.consumed)

    def _open_logs(self) -> None:
        """train_log.jsonl without the rows of steps to be taken again, and TensorBoard (process 0 only)."""
        self.log_path = self.out / LOG
        if self.primary:
            _truncate_log(self.log_path, self.step)
        self.tb = _tensorboard(self.out / "tensorboard") if self.primary else None

    # --------------------------------------------------------------------------------------------- the loop
    def train(self, until_step: int | None = None) -> FitResult:
        from m3jax.train.step import linear_schedule

        c = self.config
        stop = self.total if until_step is None else min(until_step, self.total)
        A = c.gradient_accumulation_steps
        schedule = linear_schedule(self.plan.optim)
        bar = None
        if self.primary and not c.quiet:
            from tqdm.auto import tqdm

            bar = tqdm(total=self.total, initial=self.step, desc="m3jax train", unit="step", dynamic_ncols=True)
        last: dict = {}
        t_last = time.perf_counter()
        while self.step < stop:
            pending = []
            for groups in self._examples():
                pending.append(self.data.collate(groups))
                self.consumed += 1
                if len(pending) < A:
                    continue
                lr = float(schedule(self.step))
                metrics = self._step(pending)
                pending = []
                self._check_finite(metrics)
                now = time.perf_counter()
                last = {"step": self.step, "epoch": self.epoch, **metrics, "lr": lr,
                        "tokens_per_s": round(metrics["tokens"] / max(now - t_last, 1e-9), 1),
                        "seconds": round(now - t_last, 4)}
                t_last = now
                self._log(last, bar)
                self.ckpt.save(self.step, self.state, self.opt_state, self._meta(), force=self.step == stop)
                if self.step >= stop:
                    break
            else:
                if pending:
                    logger.warning("epoch %d: skipped its last %d micro-batch(es): fewer than the %d of one "
                                   "optimiser step", self.epoch, len(pending), A)
                self.epoch, self.consumed = self.epoch + 1, 0
        if bar is not None:
            bar.close()
        self.ckpt.save(self.step, self.state, self.opt_state, self._meta(), force=True)
        final = self._write_final() if self.step >= self.total else None
        return FitResult(final, self.step, self.resumed_from, last)

    def _check_finite(self, metrics: dict) -> None:
        """Stops the run at a step whose loss or gradient norm is not finite, before it reaches a checkpoint or the
        log, naming the step and its micro-batches."""
        bad = {k: v for k, v in metrics.items() if k in ("loss", "grad_norm") and not math.isfinite(v)}
        if not bad:
            return
        A = self.config.gradient_accumulation_steps
        kept = self.ckpt.latest_step()
        raise TrainError(f"step {self.step}: {', '.join(f'{k} is {v}' for k, v in bad.items())} on epoch "
                         f"{self.epoch}'s micro-batches {self.consumed - A} ... {self.consumed - 1}; stopped "
                         f"without checkpointing it (the latest checkpoint is "
                         f"{'none' if kept is None else f'step {kept}'}); lower the learning rate or check the data")

    def _examples(self):
        """This epoch's groups of examples from the current data position on (the skipped ones are only read and
        sampled, not tokenized)."""
        it = self.data.examples(self.epoch)
        for _ in range(self.consumed):
            next(it, None)
        return it

    def _step(self, batches: list[dict]) -> dict:
        self.state, self.opt_state, m = self.plan.step(self.state, self.opt_state, self._stack(batches),
                                                       jnp.int32(self.step), jnp.asarray(self.rng))
        self.step += 1
        m = jax.device_get(m)
        return {k: (int(v) if k == "tokens" else float(v)) for k, v in m.items()}

    def _stack(self, batches: list[dict]) -> dict:
        """Micro-batches padded to one shape (the token fields, *_ids and *_mask, to the longest bucket among them,
        agreed by every process) and stacked [A, rows, ...], as one global array per field sharded over the data
        axis."""
        from m3jax.train.sharding import batch_sharding

        tokens = [k for k in batches[0] if k.endswith(("ids", "mask"))]
        lens = np.array([max(b[k].shape[-1] for b in batches) for k in tokens])
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            lens = np.asarray(multihost_utils.process_allgather(lens)).reshape(-1, len(tokens)).max(0)
        out = {}
        for key, L in zip(tokens, lens, strict=True):
            fill = self.data.pad_id if key.endswith("ids") else 0
            out[key] = np.stack([np.pad(b[key], [(0, 0)] * (b[key].ndim - 1) + [(0, L - b[key].shape[-1])],
                                        constant_values=fill) for b in batches])
        for key in batches[0].keys() - set(tokens):
            out[key] = np.stack([b[key] for b in batches])
        sharding = batch_sharding(self.mesh)
        return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in out.items()}

    def _meta(self) -> dict:
        return {"step": self.step, "epoch": self.epoch, "batches": self.consumed, "rng": self.rng.tolist(),
                "forward": self.step * self.config.gradient_accumulation_steps, "settings": self.settings}

    def _log(self, row: dict, bar) -> None:
        if not self.primary:
            return
        with open(self.log_path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
        if self.tb is not None:
            for k, v in row.items():
                if k not in ("step", "epoch"):
                    self.tb.add_scalar(f"train/{k}", v, row["step"])
        if bar is not None:
            bar.set_postfix(loss=f"{row['loss']:.4f}", lr=f"{row['lr']:.2e}", tok_s=f"{row['tokens_per_s']:.0f}")
            bar.update(1)

    def _write_final(self) -> Path:
        final = self.out / "final"
        state = self.state
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            state = multihost_utils.process_allgather(state, tiled=True)
        if self.primary:
            from flax import nnx

            params = jax.tree_util.tree_map(lambda x: np.asarray(x, np.float32), nnx.to_pure_dict(state))
            self.task.save(final, self.cfg, params, self.tok_dir,
                           {"trained_from": self.settings["model"], "steps": self.step, "train_settings": SETTINGS})
        return final

    def close(self) -> None:
        if getattr(self, "ckpt", None) is not None:
            self.ckpt.close()
        if getattr(self, "tb", None) is not None:
            self.tb.close()


# ------------------------------------------------------------------------------------------------- the step
@dataclasses.dataclass(frozen=True)
class StepPlan:
    """How fit() compiles its optimiser step (m3jax.train.step.accumulate_step) for a config and mesh: what
    `m3jax preflight --job train` compiles and benchmarks/bench_train.py times too."""

    graphdef: Any  # the model in the compute dtype, with remat as configured
    optim: Any  # m3jax.train.step.OptimConfig
    tx: Any  # the optax transformation
    mesh: Any  # the step's devices
    state_shardings: Any  # float32 master parameters: replicated, or the FSDP layout
    opt_shardings: Any  # the optimiser state's
    static: dict  # accumulate_step's static keywords

    def place(self, state: Any) -> tuple[Any, Any]:
        """Float32 master parameters (host arrays, the same in every process) -> (parameters, a fresh optimiser
        state), global arrays laid out as the step takes them."""
        state = _place(state, self.state_shardings)
        with jax.set_mesh(self.mesh):
            return state, jax.jit(self.tx.init, out_shardings=self.opt_shardings)(state)

    def step(self, state: Any, opt_state: Any, batches: dict, step: jax.Array, rng: jax.Array
             ) -> tuple[Any, Any, dict]:
        """fit()'s optimiser step: accumulate_step over this plan (its arguments and result there). state and
        opt_state are donated: do not reuse them."""
        from m3jax.train.step import accumulate_step

        with jax.set_mesh(self.mesh):
            return accumulate_step(self.graphdef, state, opt_state, batches, step, rng, **self.static)

    def abstract_inputs(self, cfg: Any, config: TrainConfig, mesh: Any, *lengths: int) -> tuple:
        """ShapeDtypeStructs of accumulate_step's arguments for one step of padded lengths (BGE-M3: query, passage;
        a re-ranker: pair): (state, opt_state, batches, step, rng), laid out as fit() places them."""
        from flax import nnx

        from m3jax.train.sharding import batch_sharding

        _, state = nnx.split(config.task.abstract(cfg, "float32"))
        spec = lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s)  # noqa: E731
        state = jax.tree_util.tree_map(spec, state, self.state_shardings)
        opt_state = jax.tree_util.tree_map(spec, jax.eval_shape(self.tx.init, state), self.opt_shardings)
        a, g = config.gradient_accumulation_steps, config.data.train_group_size
        b = config.per_device_batch_size * mesh.size
        rows = batch_sharding(mesh)
        batches = {k: jax.ShapeDtypeStruct(v, np.int32, sharding=rows)
                   for k, v in config.task.batch_shapes(config, a, b, lengths).items()}
        if config.data.knowledge_distillation:
            batches["teacher_scores"] = jax.ShapeDtypeStruct((a, b, g), np.float32, sharding=rows)
        return (state, opt_state, batches, jax.ShapeDtypeStruct((), np.int32),
                jax.ShapeDtypeStruct((2,), np.uint32))


def plan_step(cfg: Any, config: TrainConfig, mesh: Any, total_steps: int) -> StepPlan:
    """The compute graph (dtype, remat), the optimiser over total_steps, and the shardings of fit()'s step."""
    from flax import nnx

    from m3jax.train.sharding import tree_shardings
    from m3jax.train.step import make_optimizer

    c = config
    compute = "bfloat16" if c.bf16 else "float32"
    skeleton = c.task.abstract(cfg, compute)
    skeleton.encoder.remat = c.remat
    graphdef, _ = nnx.split(skeleton)
    _, state = nnx.split(c.task.abstract(cfg, "float32"))
    optim = c.for_steps(total_steps)
    tx = make_optimizer(state, c.loss, optim)
    state_sh = tree_shardings(state, mesh, c.fsdp)
    opt_sh = tree_shardings(jax.eval_shape(tx.init, state), mesh, c.fsdp)
    static = dict(flags=c.loss, tx=tx, mesh=mesh if mesh.size > 1 else None, fsdp=c.fsdp, compute_dtype=compute,
                  dropout=c.dropout, gradient_cache_chunk=c.gradient_cache_chunk)
    return StepPlan(graphdef, optim, tx, mesh, state_sh, opt_sh, static)


def lower_step(cfg: Any, config: TrainConfig, mesh: Any, query_len: int, passage_len: int,
               total_steps: int = 1000) -> jax.stages.Lowered:
    """fit()'s optimiser step lowered for a mesh (real or compile-only devices) at padded lengths, from shapes only."""
    from m3jax.train.step import accumulate_step

    plan = plan_step(cfg, config, mesh, total_steps)
    with jax.set_mesh(mesh):
        return accumulate_step.lower(plan.graphdef, *plan.abstract_inputs(cfg, config, mesh, query_len, passage_len),
                                     **plan.static)


# ------------------------------------------------------------------------------------------------- helpers
def _place(state, shardings):
    """Host arrays -> global arrays in `shardings` (every process holds the whole value)."""
    return jax.tree_util.tree_map(
        lambda x, s: jax.make_array_from_callback(x.shape, s, lambda idx, x=x: np.asarray(x)[idx]), state, shardings)


def _comparable(settings):
    """Settings as compared on resume: the model by its weights' hash, not by how its path was spelled."""
    return {k: v for k, v in settings.items() if k != "model"} if isinstance(settings, dict) else settings


def _jsonable(x):
    return json.loads(json.dumps(x))


def _truncate_log(path: Path, step: int) -> None:
    """Drops log rows of steps after `step` (taken after the checkpoint resumed from; they are taken again)."""
    if not path.is_file():
        return
    rows = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    keep = [line for line in rows if json.loads(line).get("step", 0) <= step]
    if len(keep) != len(rows):
        tmp = path.with_suffix(".jsonl.partial")
        tmp.write_text("".join(line + "\n" for line in keep), encoding="utf-8")
        os.replace(tmp, path)


def _tensorboard(logdir: Path):
    """A SummaryWriter if one is importable (tensorboardX, or torch's with tensorboard installed), else None."""
    for name in ("tensorboardX", "torch.utils.tensorboard"):
        try:
            module = __import__(name, fromlist=["SummaryWriter"])
            return module.SummaryWriter(str(logdir))
        except Exception:  # noqa: BLE001 - ImportError, or torch's wrapper failing without tensorboard
            continue
    return None


__all__ = ["FitResult", "RerankerTrainConfig", "StepPlan", "TrainConfig", "TrainError", "fit", "lower_step",
           "plan_step"]
