"""Fine-tuning BGE-M3 and its cross-encoder re-rankers as FlagEmbedding 1.4.2 does: its training data format and
sampling (data), its losses (loss), the optimiser step (step), the mesh (sharding), checkpoints (checkpoints), what is
trained (tasks) and the loop, `fit` (loop)."""

from m3jax.train.data import DataConfig, DataError, RerankerDataConfig, TrainData, sample_group, static_shapes
from m3jax.train.loop import FitResult, RerankerTrainConfig, TrainConfig, TrainError, fit
from m3jax.train.loss import LossConfig, RerankerLossConfig, loss_fn, m3_loss, trainable_mask, value_and_grad
from m3jax.train.step import OptimConfig, accumulate_step, make_optimizer

__all__ = ["DataConfig", "DataError", "FitResult", "LossConfig", "OptimConfig", "RerankerDataConfig",
           "RerankerLossConfig", "RerankerTrainConfig", "TrainConfig", "TrainData", "TrainError", "accumulate_step",
           "fit", "loss_fn", "m3_loss", "make_optimizer", "sample_group", "static_shapes", "trainable_mask",
           "value_and_grad"]
