"""FlagEmbedding's own M3 training model, built as its runner builds it, for the training parity tests.

Dropout: the reference's maths is unchanged, but every dropout probability is set to 0 so a training-mode forward
(needed: the loss is only computed when `model.training`) is deterministic; m3jax's loss has no dropout.
"""

from __future__ import annotations

import numpy as np


def reference_model(path, **kw):
    """EncoderOnlyEmbedderM3Model around runner.get_model(path), fp32, CPU, train mode, no dropout, with the
    runner's freezing (fix_encoder / fix_position_embedding) applied. kw: the model's constructor flags, plus
    fix_encoder / fix_position_embedding."""
    import torch
    from FlagEmbedding.finetune.embedder.encoder_only.m3.modeling import EncoderOnlyEmbedderM3Model
    from FlagEmbedding.finetune.embedder.encoder_only.m3.runner import EncoderOnlyEmbedderM3Runner
    from transformers import AutoTokenizer

    fix_encoder = kw.pop("fix_encoder", False)
    fix_position_embedding = kw.pop("fix_position_embedding", False)
    base = EncoderOnlyEmbedderM3Runner.get_model(str(path))
    for module in base["model"].modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        if hasattr(module, "dropout_prob"):  # the SDPA attention path reads this, not its Dropout module
            module.dropout_prob = 0.0
    model = EncoderOnlyEmbedderM3Model(base, tokenizer=AutoTokenizer.from_pretrained(str(path)), **kw)
    # The runner's freezing, verbatim in effect (runner.load_tokenizer_and_model).
    for k, v in model.named_parameters():
        if fix_position_embedding and "position_embeddings" in k:
            v.requires_grad = False
        if fix_encoder and not ("colbert_linear" in k or "sparse_linear" in k):
            v.requires_grad = False
    return model.float().train()


def reference_loss_and_grads(model, queries, passages, teacher_scores=None, step=0, no_in_batch_neg_flag=False):
    """(loss, {torch key without the 'model.' prefix: grad as numpy, or None where no gradient flows})."""
    model.zero_grad(set_to_none=True)
    model.step = step
    loss = model(queries=queries, passages=passages, teacher_scores=teacher_scores,
                 no_in_batch_neg_flag=no_in_batch_neg_flag).loss
    loss.backward()
    grads = {k.removeprefix("model."): None if v.grad is None else v.grad.detach().numpy().copy()
             for k, v in model.named_parameters()}
    return float(loss.detach()), grads


def m3jax_grads_as_torch(grads, cfg) -> dict[str, np.ndarray]:
    """m3jax gradient tree (nnx.State) -> {torch key: array in torch layout}, through m3jax.weights' table."""
    from flax import nnx

    from m3jax.weights import params_to_torch

    return params_to_torch(nnx.to_pure_dict(grads), cfg)


def compare_grads(ours: dict, ref: dict) -> dict[str, float]:
    """Per torch key: max |ours - ref| / max |ref|; a parameter the reference does not train (grad None) must have
    an all-zero gradient here (reported as its max |ours|)."""
    out = {}
    for key, g in ours.items():
        r = ref.get(key)  # absent: the heads without unified_finetuning are not part of the reference's model
        if r is None:
            out[key] = float(np.abs(g).max())
            assert out[key] == 0.0, f"{key}: frozen in the reference, gradient {out[key]} here"
        else:
            assert g.shape == r.shape, f"{key}: shape {g.shape} vs reference {r.shape}"
            scale = float(np.abs(r).max())
            assert scale > 0, f"{key}: the reference gradient is all zero, the comparison would test nothing"
            out[key] = float(np.abs(g - r).max()) / scale
    return out


def rep_model(vocab_size: int, **kw):
    """EncoderOnlyEmbedderM3Model without an encoder, for loss parity on given representations: its `encode` is
    replaced by a lookup, feature dicts carry {"attention_mask", "reps": (dense, sparse, colbert)}."""
    from types import SimpleNamespace

    from FlagEmbedding.finetune.embedder.encoder_only.m3.modeling import EncoderOnlyEmbedderM3Model

    base = {"model": SimpleNamespace(config=SimpleNamespace(vocab_size=vocab_size)), "colbert_linear": None,
            "sparse_linear": None}
    model = EncoderOnlyEmbedderM3Model(base, tokenizer=SimpleNamespace(padding_side="right"), **kw)
    model.encode = lambda features: features["reps"]
    return model.train()


class FakeWorld:
    """torch.distributed faked for W ranks simulated one after another in this process.

    AbsEmbedderModel calls dist.is_initialized / get_rank / get_world_size (in __init__) and
    dist.all_gather(list_of_W_empty_tensors, t) (in _dist_gather_tensor: q reps, p reps, and with m3_kd_loss the
    teacher targets, in that order), then puts t itself at its own rank. Pass 1 (`record`) runs every rank with
    all_gather filling zeros and records each call's t; pass 2 (`replay`) fills call k's list with the W tensors
    recorded at call k, so each rank sees exactly what a real all_gather would give it.
    """

    def __init__(self, monkeypatch, world: int):
        import torch.distributed as dist

        self.world, self.rank, self.calls, self.recorded, self.mode = world, 0, 0, {}, "record"
        monkeypatch.setattr(dist, "is_initialized", lambda: True)
        monkeypatch.setattr(dist, "get_rank", lambda group=None: self.rank)
        monkeypatch.setattr(dist, "get_world_size", lambda group=None: self.world)
        monkeypatch.setattr(dist, "all_gather", self._all_gather)

    def start(self, rank: int, mode: str):
        self.rank, self.calls, self.mode = rank, 0, mode

    def _all_gather(self, out, t, group=None, async_op=False):
        k = self.calls
        self.calls += 1
        if self.mode == "record":
            self.recorded[(self.rank, k)] = t.detach().clone()
            for o in out:
                o.zero_()
        else:
            for r, o in enumerate(out):
                o.copy_(self.recorded[(r, k)])
