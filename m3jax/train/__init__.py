"""Fine-tuning BGE-M3 as FlagEmbedding 1.4.2 does: its training data format and sampling (data), its loss (loss)."""

from m3jax.train.data import DataConfig, DataError, TrainData, sample_group, static_shapes
from m3jax.train.loss import LossConfig, loss_fn, m3_loss, trainable_mask, value_and_grad

__all__ = ["DataConfig", "DataError", "LossConfig", "TrainData", "loss_fn", "m3_loss", "sample_group",
           "static_shapes", "trainable_mask", "value_and_grad"]
