"""Fine-tuning BGE-M3 as FlagEmbedding 1.4.2 does: its training data format and sampling (data), its loss (loss),
the optimiser step (step), the mesh (sharding), checkpoints (checkpoints) and the loop, `fit` (loop)."""

from m3jax.train.data import DataConfig, DataError, TrainData, sample_group, static_shapes
from m3jax.train.loop import FitResult, TrainConfig, TrainError, fit
from m3jax.train.loss import LossConfig, loss_fn, m3_loss, trainable_mask, value_and_grad
from m3jax.train.step import OptimConfig, accumulate_step, make_optimizer

__all__ = ["DataConfig", "DataError", "FitResult", "LossConfig", "OptimConfig", "TrainConfig", "TrainData",
           "TrainError", "accumulate_step", "fit", "loss_fn", "m3_loss", "make_optimizer", "sample_group",
           "static_shapes", "trainable_mask", "value_and_grad"]
