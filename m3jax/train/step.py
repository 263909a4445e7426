"""One optimisation step as FlagEmbedding's HF Trainer takes it: AdamW (torch's, decoupled weight decay, not on
biases and LayerNorm parameters), gradients clipped to a global norm, a linear schedule with warm-up; frozen
parameters (fix_encoder, fix_position_embedding, heads without unified_finetuning) are never updated."""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import optax
from flax import nnx

from m3jax.train.loss import LossConfig, is_trainable, param_path, value_and_grad


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """transformers.TrainingArguments' optimiser fields, with its defaults (what the M3 runner gets unless the
    command line says otherwise; the M3 example recipe uses learning_rate 1e-5 and warmup_ratio 0.1)."""

    num_training_steps: int
    learning_rate: float = 5e-5
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    max_grad_norm: float = 1.0
    warmup_ratio: float = 0.0
    warmup_steps: int = 0

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


def make_optimizer(state: nnx.State, flags: LossConfig, cfg: OptimConfig) -> optax.GradientTransformation:
    """Clip, AdamW with the decay mask, schedule; frozen parameters get zero updates (and no optimiser state)."""
    labels = jax.tree_util.tree_map_with_path(
        lambda kp, _: "train" if is_trainable(param_path(kp), flags) else "frozen", state)
    decay_mask = jax.tree_util.tree_map_with_path(lambda kp, _: decays(param_path(kp)), state)
    adamw = optax.adamw(linear_schedule(cfg), b1=cfg.adam_beta1, b2=cfg.adam_beta2, eps=cfg.adam_epsilon,
                        weight_decay=cfg.weight_decay, mask=decay_mask)
    train = optax.chain(optax.clip_by_global_norm(cfg.max_grad_norm), adamw)
    return optax.multi_transform({"train": train, "frozen": optax.set_to_zero()}, labels)


@functools.partial(jax.jit, static_argnames=("graphdef", "flags", "tx", "mesh"),
                   donate_argnames=("state", "opt_state"))
def train_step(graphdef: nnx.GraphDef, state: nnx.State, opt_state: optax.OptState, batch: dict, step: jax.Array,
               *, flags: LossConfig, tx: optax.GradientTransformation, mesh: jax.sharding.Mesh | None = None
               ) -> tuple[nnx.State, optax.OptState, jax.Array, dict]:
    """(new state, new optimiser state, loss, loss parts). state and opt_state are donated: do not reuse them.
    step: forward calls so far (the reference's model.step, which gates self-distillation)."""
    (loss, parts), grads = value_and_grad(graphdef, state, batch, step, flags, mesh)
    # Clipping sees only trainable gradients, as clip_grad_norm_ over parameters whose grad is None would.
    updates, opt_state = tx.update(grads, opt_state, state)
    return optax.apply_updates(state, updates), opt_state, loss, parts
