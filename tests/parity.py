"""Parity helpers shared by the tests: FlagEmbedding's outputs in float32 and float64, m3jax's, and the bounds.

Two bounds, both against FlagEmbedding on the same weights and the same padded batch:
  - what users receive (dense, sparse, ColBERT): max abs diff to FlagEmbedding's float32 outputs <= ABS_TOL;
  - every output, the hidden state included: m3jax's float32 error against a float64 run of FlagEmbedding's own
    model is at most REL_MARGIN times FlagEmbedding's float32 error against it, plus ULP_FLOOR units in the last
    place of the output's scale. The hidden state of a 24-layer float32 network sits at float32 rounding, and where
    exactly depends on the CPU's kernels; an absolute bound there is luck, this one is not.
"""

from __future__ import annotations

import copy

import numpy as np
import torch
from flax import nnx

from m3jax.checkpoint import load_params
from m3jax.model import forward, model_from_params

ABS_TOL = 1e-5
REL_MARGIN = 2.0  # m3jax may be up to twice as far from float64 as PyTorch's float32 is
ULP_FLOOR = 4  # ... plus 4 float32 ulps of the output's largest magnitude, for outputs PyTorch hits almost exactly
USER_OUTPUTS = ("dense", "sparse", "colbert")
OUTPUTS = ("last_hidden_state", *USER_OUTPUTS)


def tokenize(fe, texts, max_length=8192):
    return fe.tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")


def run_flag(model, batch) -> dict[str, np.ndarray]:
    """FlagEmbedding's inference model (EncoderOnlyEmbedderM3ModelForInference) on one padded batch."""
    with torch.no_grad():
        hidden = model.model(**batch).last_hidden_state
        out = model(batch, return_dense=True, return_sparse=True, return_colbert_vecs=True)
    return {
        "last_hidden_state": hidden.numpy(),
        "dense": out["dense_vecs"].numpy(),
        "sparse": out["sparse_vecs"].squeeze(-1).numpy(),
        "colbert": out["colbert_vecs"].numpy(),
    }


def flag_outputs(fe, texts, max_length=8192):
    """(batch, FlagEmbedding's float32 outputs) for texts padded into one batch."""
    batch = tokenize(fe, texts, max_length)
    return batch, run_flag(fe.model, batch)


def flag_outputs_float64(fe, batch) -> dict[str, np.ndarray]:
    """The same model and weights in float64: the reference both float32 implementations are measured against."""
    model = copy.deepcopy(fe.model).double().eval()
    try:
        return run_flag(model, batch)
    finally:
        del model


def m3jax_outputs(path, batch, dtype="float32", attn_impl="auto"):
    cfg, params, _ = load_params(path)
    graphdef, state = nnx.split(model_from_params(cfg, params, dtype=dtype))
    out = forward(graphdef, state, batch["input_ids"].numpy(), batch["attention_mask"].numpy(),
                  attn_impl=attn_impl)
    return cfg, {k: np.asarray(v) for k, v in out._asdict().items()}


def max_diffs(ours, ref, mask) -> dict[str, float]:
    """Max abs diff per output over real tokens (padding positions are not outputs)."""
    real = mask.astype(bool)
    return {
        "last_hidden_state": float(np.abs(ours["last_hidden_state"] - ref["last_hidden_state"])[real].max()),
        "dense": float(np.abs(ours["dense"] - ref["dense"]).max()),
        "sparse": float(np.abs(ours["sparse"] - ref["sparse"])[real].max()),
        "colbert": float(np.abs(ours["colbert"] - ref["colbert"]).max()),
    }


def check_parity(ours, ref32, ref64, mask) -> dict:
    """Asserts both bounds (see the module docstring); returns the measured errors for the test's record."""
    ours_err = max_diffs(ours, ref64, mask)
    torch_err = max_diffs(ref32, ref64, mask)
    abs_diff = max_diffs(ours, ref32, mask)
    real = mask.astype(bool)
    scale = {k: float(np.abs(ref64[k][real] if k in ("last_hidden_state", "sparse") else ref64[k]).max())
             for k in OUTPUTS}
    report = {k: {"m3jax_vs_f64": ours_err[k], "torch32_vs_f64": torch_err[k], "m3jax_vs_torch32": abs_diff[k]}
              for k in OUTPUTS}
    for k in OUTPUTS:
        bound = REL_MARGIN * torch_err[k] + ULP_FLOOR * np.finfo(np.float32).eps * scale[k]
        assert ours_err[k] <= bound, (
            f"{k}: m3jax's float32 error against float64 is {ours_err[k]:.3g}, more than {REL_MARGIN} x PyTorch's "
            f"own ({torch_err[k]:.3g}) + {ULP_FLOOR} ulp of {scale[k]:.3g} = {bound:.3g}")
    for k in USER_OUTPUTS:
        assert abs_diff[k] <= ABS_TOL, f"{k}: max abs diff to FlagEmbedding {abs_diff[k]:.3g} > {ABS_TOL}"
    return report
