"""Training checkpoints with orbax's CheckpointManager: everything a run needs to continue exactly where it was.

A checkpoint (output_dir/checkpoints/<step>/, written by orbax into a temporary directory and renamed when
complete) holds:
  state: the float32 master parameters (an nnx.State, in the run's sharding);
  opt_state: the optimiser state (AdamW moments, step count, schedule position);
  meta (JSON): step (optimiser steps taken), epoch and batches (global batches of that epoch already consumed),
    rng (the run's PRNG key data), forward (forward calls so far) and the run's settings.
The data position makes resuming exact: every example's sampling depends only on (seed, epoch, index), so skipping
`batches` batches of `epoch` reproduces the stream the uninterrupted run would have seen.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import jax


class TrainCheckpoints:
    """Saves every `save_steps` optimiser steps (and when forced), keeps the last `keep` (None: all).

    Synchronous saves: the step function donates its input buffers, so nothing may still be reading them when the
    next step starts."""

    def __init__(self, directory: str | os.PathLike, *, save_steps: int, keep: int | None):
        import orbax.checkpoint as ocp

        if save_steps < 1:
            raise ValueError(f"save_steps must be >= 1, got {save_steps}")
        if keep is not None and keep < 1:
            raise ValueError(f"save_total_limit must be >= 1 or None, got {keep}")
        self.directory = Path(directory).absolute()
        self._ocp = ocp
        self.manager = ocp.CheckpointManager(
            self.directory, options=ocp.CheckpointManagerOptions(
                max_to_keep=keep, enable_async_checkpointing=False, create=True))
        self.save_steps = save_steps

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(self, step: int, state: Any, opt_state: Any, meta: dict, *, force: bool = False) -> bool:
        """Writes checkpoint `step` if it is due (or force); returns whether it did."""
        ocp = self._ocp
        if (step % self.save_steps and not force) or step in self.manager.all_steps():
            return False
        self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), opt_state=ocp.args.StandardSave(opt_state),
            meta=ocp.args.JsonSave(meta)), force=True)
        self.manager.wait_until_finished()
        return True

    def read_meta(self, step: int) -> dict:
        ocp = self._ocp
        return dict(self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta)

    def restore(self, step: int, state_like: Any, opt_like: Any) -> tuple[Any, Any, dict]:
        """(state, opt_state, meta) of checkpoint `step`, restored into the shapes, dtypes and shardings of
        state_like and opt_like (arrays or jax.ShapeDtypeStructs with shardings)."""
        ocp = self._ocp

        def target(tree):
            return jax.tree_util.tree_map(
                lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)), tree)

        r = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(target(state_like)), opt_state=ocp.args.StandardRestore(target(opt_like)),
            meta=ocp.args.JsonRestore()))
        return r.state, r.opt_state, dict(r.meta)

    def close(self) -> None:
        self.manager.close()
