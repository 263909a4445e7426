"""One optimisation step as FlagEmbedding's HF Trainer takes it: AdamW (torch's, decoupled weight decay, not on
biases and LayerNorm parameters), gradients clipped to a global norm, a linear schedule with warm-up; frozen
parameters (fix_encoder, fix_position_embedding, heads without unified_finetuning) are never updated."""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from m3jax.train.loss import LossConfig, RerankerLossConfig, param_path


@dataclasses.dataclass(frozen=True, kw_only=True)
class OptimArgs:
    """transformers.TrainingArguments' optimiser fields, with its defaults (what the M3 runner gets unless the
    command line says otherwise; the M3 example recipe uses learning_rate 1e-5 and warmup_ratio 0.1). The run's
    length is not one of them: m3jax.train.TrainConfig holds these fields and derives it; OptimConfig adds it."""

    learning_rate: float = 5e-5
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    max_grad_norm: float = 1.0
    warmup_ratio: float = 0.0
    warmup_steps: int = 0

    def for_steps(self, num_training_steps: int) -> OptimConfig:
        """These fields over a run of num_training_steps optimiser steps."""
        return OptimConfig(num_training_steps=num_training_steps,
                           **{f.name: getattr(self, f.name) for f in dataclasses.fields(OptimArgs)})


@dataclasses.dataclass(frozen=True)
class OptimConfig(OptimArgs):
    """The optimiser of a run of num_training_steps optimiser steps (the linear schedule's length)."""

    num_training_steps: int

    @property
    def num_warmup_steps(self) -> int:
        """TrainingArguments.get_warmup_steps: warmup_steps if set, else ceil(warmup_ratio · total)."""
        return self.warmup_steps if self.warmup_steps > 0 else math.ceil(self.num_training_steps * self.warmup_ratio)


def linear_schedule(cfg: OptimConfig) -> optax.Schedule:
    """get_linear_schedule_with_warmup: 0 -> lr over the warm-up, then lr -> 0 at num_training_steps."""
    warm = cfg.num_warmup_steps
    return optax.join_schedules([optax.linear_schedule(0.0, cfg.learning_rate, max(warm, 1)),
                                 optax.linear_schedule(cfg.learning_rate, 0.0,
                                                       max(cfg.num_training_steps - warm, 1))], [warm])


def decays(path: str) -> bool:
    """Trainer.get_decay_parameter_names: everything but biases and LayerNorm parameters."""
    return not (path.endswith("bias") or "LayerNorm" in path)


def make_optimizer(state: nnx.State, flags: LossConfig | RerankerLossConfig, cfg: OptimConfig
                   ) -> optax.GradientTransformation:
    """Clip, AdamW with the decay mask, schedule; frozen parameters get zero updates (and no optimiser state).
    Clipping sees only the trainable gradients, as clip_grad_norm_ over parameters whose grad is None would."""
    labels = jax.tree_util.tree_map_with_path(
        lambda kp, _: "train" if flags.trainable(param_path(kp)) else "frozen", state)
    decay_mask = jax.tree_util.tree_map_with_path(lambda kp, _: decays(param_path(kp)), state)
    adamw = optax.adamw(linear_schedule(cfg), b1=cfg.adam_beta1, b2=cfg.adam_beta2, eps=cfg.adam_epsilon,
                        weight_decay=cfg.weight_decay, mask=decay_mask)
    train = optax.chain(optax.clip_by_global_norm(cfg.max_grad_norm), adamw)
    return optax.multi_transform({"train": train, "frozen": optax.set_to_zero()}, labels)


def cast_params(state: Any, dtype: Any) -> Any:
    """The compute copy of float32 master weights: matmul and embedding parameters in dtype, LayerNorm parameters
    kept float32 (the model computes LayerNorm in float32 whatever its dtype). Differentiable: the gradient of a
    cast is the cast back, so gradients reach the float32 masters as float32."""
    dtype = jnp.dtype(dtype)
    if dtype == jnp.float32:
        return state
    return jax.tree_util.tree_map_with_path(
        lambda kp, x: x if "LayerNorm" in param_path(kp) else x.astype(dtype), state)


@functools.partial(jax.jit, static_argnames=("graphdef", "flags", "tx", "mesh", "fsdp", "compute_dtype", "dropout",
                                             "gradient_cache_chunk"),
                   donate_argnames=("state", "opt_state"))
def accumulate_step(graphdef: nnx.GraphDef, state: nnx.State, opt_state: optax.OptState, batches: dict,
                    step: jax.Array, rng: jax.Array, *, flags: LossConfig | RerankerLossConfig,
                    tx: optax.GradientTransformation,
                    mesh: jax.sharding.Mesh | None = None, fsdp: bool = False, compute_dtype: str = "float32",
                    dropout: bool = True, gradient_cache_chunk: int | None = None
                    ) -> tuple[nnx.State, optax.OptState, dict]:
    """One optimiser step over A micro-batches, as the HF Trainer takes it with gradient_accumulation_steps = A
    (the step fit() compiles, m3jax.train.loop.StepPlan; A = 1 is a plain step):
    each micro-batch its own forward (its own in-batch negatives), the gradients averaged over the A, then clip and
    AdamW once. state (float32 masters) and opt_state are donated: do not reuse them.

    Args:
      graphdef: of a model built with dtype=compute_dtype (its matmuls run in that dtype) and, for
        rematerialisation, encoder.remat = True.
      flags: the objective (LossConfig: BGE-M3's; RerankerLossConfig: a cross-encoder's) and which parameters
        train.
      batches: the batch fields of flags.objective stacked over micro-batches. BGE-M3: q_ids, q_mask [A, B, Lq];
        p_ids, p_mask [A, B·G, Lp]; optional teacher_scores [A, B, G]. A re-ranker: ids, mask [A, B, G, L];
        optional teacher_scores [A, B, G]. With a mesh, B is the global batch, split over the data axis (each
        device computes the reference's per-rank loss; loss and gradients are averaged over devices, as DDP).
      step: optimiser steps taken so far; the forward counter that gates self-distillation is step·A + i.
      rng: a PRNG key; micro-batch i of step s (and device d) draws dropout from fold_in(fold_in(rng, s·A + i), d).
      fsdp: keep gradients, parameters and optimiser state in the FSDP layout (m3jax.train.sharding).
      dropout: apply the config's dropout rates (training, as torch's model.train()); False: exact forward.
      gradient_cache_chunk: BGE-M3 only: each device takes its micro-batch's gradient through a gradient cache
        (m3jax.train.loss.cached_value_and_grad), encoding this many rows at a time: memory bounded by the chunk, not
        the micro-batch, with every in-batch negative kept. None: one forward and backward over the micro-batch.
    Returns (state, opt_state, metrics): loss and its parts (means over micro-batches), grad_norm (before
    clipping), tokens (real tokens in the step's batches).
    """
    from jax.sharding import PartitionSpec as P

    from m3jax.train.loss import DATA_AXIS
    from m3jax.train.sharding import tree_shardings

    masks = [v for k, v in batches.items() if k.endswith("mask")]
    A = masks[0].shape[0]
    layout = (lambda t: t) if mesh is None else (
        lambda t: jax.lax.with_sharding_constraint(t, tree_shardings(t, mesh, fsdp)))

    def dropout_key(key):  # this device's, inside shard_map; None without dropout
        if not dropout:
            return None
        return key if mesh is None else jax.random.fold_in(key, jax.lax.axis_index(DATA_AXIS))

    def device_loss(cstate, micro, fwd_step, key):
        return flags.objective(graphdef, cstate, micro, fwd_step, None if mesh is None else DATA_AXIS,
                               dropout_key(key))

    def micro_loss(state, micro, fwd_step, key):
        cstate = cast_params(state, compute_dtype)
        if mesh is None:
            return device_loss(cstate, micro, fwd_step, key)
        per = jax.shard_map(lambda *a: jax.tree_util.tree_map(lambda x: x[None], device_loss(*a)), mesh=mesh,
                            in_specs=(P(), P(DATA_AXIS), P(), P()), out_specs=P(DATA_AXIS))
        return jax.tree_util.tree_map(lambda x: x.mean(0), per(cstate, micro, fwd_step, key))

    def device_cached(cstate, micro, fwd_step, key):
        from m3jax.train.loss import cached_value_and_grad

        (loss, parts), g = cached_value_and_grad(graphdef, cstate, micro, fwd_step, flags, gradient_cache_chunk,
                                                 None if mesh is None else DATA_AXIS, dropout_key(key))
        if mesh is None:
            return (loss, parts), g
        return jax.tree_util.tree_map(lambda x: x[None], (loss, parts)), jax.lax.pmean(g, DATA_AXIS)

    def micro_grad(state, micro, fwd_step, key):
        """((loss, parts), gradient with respect to the float32 masters) of one micro-batch."""
        if gradient_cache_chunk is None:
            return jax.value_and_grad(micro_loss, has_aux=True)(state, micro, fwd_step, key)
        cstate = cast_params(state, compute_dtype)
        if mesh is None:
            out, g = device_cached(cstate, micro, fwd_step, key)
        else:
            out, g = jax.shard_map(device_cached, mesh=mesh, in_specs=(P(), P(DATA_AXIS), P(), P()),
                                   out_specs=(P(DATA_AXIS), P()))(cstate, micro, fwd_step, key)
            out = jax.tree_util.tree_map(lambda x: x.mean(0), out)
        # The compute copy's gradient, cast back: what differentiating through cast_params gives.
        return out, jax.tree_util.tree_map(lambda gc, x: gc.astype(x.dtype), g, state)

    def body(gsum, xs):
        i, micro = xs
        fwd_step = step * A + i
        (loss, parts), g = micro_grad(state, micro, fwd_step, jax.random.fold_in(rng, fwd_step))
        return layout(jax.tree_util.tree_map(jnp.add, gsum, g)), (loss, parts)

    zeros = layout(jax.tree_util.tree_map(jnp.zeros_like, state))
    gsum, (losses, parts) = jax.lax.scan(body, zeros, (jnp.arange(A), batches))
    grads = jax.tree_util.tree_map(lambda g: g / A, gsum)
    updates, opt_state = tx.update(grads, opt_state, state)
    state = layout(optax.apply_updates(state, updates))
    metrics = {"loss": losses.mean(), **{k: v.mean() for k, v in parts.items()},
               "grad_norm": optax.tree.norm(grads),
               "tokens": sum(m.astype(jnp.int32).sum() for m in masks)}
    return state, layout(opt_state), metrics
