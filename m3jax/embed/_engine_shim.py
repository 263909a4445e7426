"""Stand-in for `m3jax.engine.Encoder` (being written on main) over the current BGEM3 internals.

Delete this file once `m3jax/engine.py` lands; `m3jax.embed` imports the engine first and falls back to this.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Iterator, Sequence

import jax
import numpy as np

from m3jax import encode as pipeline
from m3jax.api import BGEM3


class Encoder:
    """Tokeniser, batch planner and compiled encode steps of one model (the engine interface embed codes against)."""

    def __init__(self, model: BGEM3):
        self._m = model
        self.config = model.config
        self.tokenizer = model.tokenizer
        self.devices = model.devices
        self.compile_seconds = model.compile_seconds
        self._fingerprint: str | None = None

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, *, dtype: str = "float32", devices=None,
                        attn_impl: str = "auto", length_buckets: Sequence[int] | None = None,
                        max_tokens_per_batch: int = pipeline.DEFAULT_MAX_TOKENS) -> Encoder:
        return cls(BGEM3(path, dtype=dtype, devices=devices, attn_impl=attn_impl, length_buckets=length_buckets,
                         max_tokens_per_batch=max_tokens_per_batch))

    @property
    def length_buckets(self) -> tuple[int, ...]:
        return self._m.length_buckets

    @property
    def max_tokens_per_batch(self) -> int:
        return self._m.max_tokens_per_batch

    def plan(self, lengths: np.ndarray, *, batch_size: int) -> list[tuple[int, int, np.ndarray]]:
        """(bucket length, rows, indices) batches for texts of these token counts, as encode_padded plans them."""
        ndev = len(self.devices)
        return pipeline.plan_batches(np.asarray(lengths), batch_size=max(batch_size, ndev) if ndev > 1 else batch_size,
                                     max_tokens=self._m.max_tokens_per_batch, row_multiple=ndev,
                                     buckets=self._m.length_buckets)

    def make_batches(self, ids: Sequence[np.ndarray], plan: Sequence[tuple]) -> list[pipeline.Batch]:
        cfg = self.config
        return [pipeline.make_batch(ids, idx, L, rows, cfg.pad_token_id, cfg.bos_token_id, cfg.eos_token_id)
                for L, rows, idx in plan]

    def run(self, batches: Iterable[pipeline.Batch], heads: Sequence[str] = pipeline.HEADS
            ) -> Iterator[tuple[pipeline.Batch, dict]]:
        """Encodes batches with one in flight ahead; yields (batch, outputs trimmed to len(batch.indices) rows):
        dense [b, D]; sparse_ids [b, T] int32 (-1 padded), sparse_weights [b, T]; colbert [b, T-1, C] with the
        vectors past each text's length zeroed."""
        heads = tuple(h for h in pipeline.HEADS if h in heads)
        m, pending = self._m, None
        for batch in _with_end(batches):
            current = None
            if batch is not None:
                ids, mask = batch.input_ids, batch.attention_mask
                if m._row_sharding is not None:
                    ids, mask = jax.device_put((ids, mask), m._row_sharding)
                current = (batch, m.executable(ids.shape[1], ids.shape[0], heads)(m.state, ids, mask))
            if pending is not None:
                b, out = pending
                k = len(b.indices)
                out = {name: np.asarray(v)[:k] for name, v in jax.device_get(out).items()}
                if "colbert" in out:
                    n = b.attention_mask[:k].sum(1)
                    out["colbert"] = out["colbert"] * (np.arange(out["colbert"].shape[1]) < n[:, None] - 1)[..., None]
                yield b, out
            pending = current

    def fingerprint(self) -> str:
        """sha256 of the config and the float32 weights: equal fingerprints, equal model."""
        if self._fingerprint is None:
            h = hashlib.sha256(json.dumps(self.config.to_hf_config(), sort_keys=True).encode())
            flat = jax.tree_util.tree_flatten_with_path(self._m.params)[0]
            for path, leaf in sorted(flat, key=lambda kv: jax.tree_util.keystr(kv[0])):
                h.update(jax.tree_util.keystr(path).encode())
                h.update(np.ascontiguousarray(leaf, np.float32).tobytes())
            self._fingerprint = h.hexdigest()
        return self._fingerprint


def _with_end(items):
    yield from items
    yield None
