"""Parity helpers shared by the tests: FlagEmbedding's outputs in float32 and float64, m3jax's, and the bounds.

Two bounds, both against FlagEmbedding on the same weights and the same padded batch:
  - what users receive (dense, sparse, ColBERT): max abs diff to FlagEmbedding's float32 outputs <= ABS_TOL;
  - every output, the hidden state included: m3jax's float32 error against a float64 run of FlagEmbedding's own
    model is measured against FlagEmbedding's float32 error against it (check_against_float64). The hidden state
    of a 24-layer float32 network sits at float32 rounding, and where exactly depends on the CPU's kernels; an
    absolute bound there is luck, this one is not.
The root-mean-square error is the steady measure of how far from float64 an implementation is, and is held to
REL_MARGIN x PyTorch's. The largest single error is a maximum over up to millions of roundings and swings with the
CPU's kernels, so it is held to the looser MAX_MARGIN x PyTorch's. Both add ULP_FLOOR float32 ulps of the output's
scale (RMS or largest magnitude), for outputs PyTorch hits almost exactly. A wrong weight, order or dtype is off by
orders of magnitude, far past either bound. m3jax runs compiled as its Encoder compiles that length (m3jax_outputs):
on an AMD Zen 3, with Eigen's dots, the full-size hidden state's RMS error was 1.08x PyTorch's and its largest 0.87x;
with XLA's default YNNPACK dots (2-3x further from float64 on a plain matmul) they were 2.4x and 2.1x.
"""

from __future__ import annotations

import copy

import jax
import numpy as np
import torch
from flax import nnx

from m3jax.checkpoint import load_params
from m3jax.engine import compile_plan
from m3jax.model import forward, model_from_params

ABS_TOL = 1e-5
REL_MARGIN = 2.0  # m3jax's RMS error against float64 may be up to twice PyTorch's float32 one
MAX_MARGIN = 4.0  # ... and its largest error up to 4x PyTorch's largest
ULP_FLOOR = 4  # ... each plus 4 float32 ulps of the output's scale, for outputs PyTorch hits almost exactly
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
    """m3jax's forward compiled as m3jax.Encoder compiles a bucket of this length: on CPU Eigen's dots up to
    CPU_EIGEN_MAX_LENGTH tokens with the feed-forward in column blocks, XLA's defaults beyond."""
    cfg, params, _ = load_params(path)
    graphdef, state = nnx.split(model_from_params(cfg, params, dtype=dtype))
    ids, mask = batch["input_ids"].numpy(), batch["attention_mask"].numpy()
    platform = jax.default_backend()
    options, proj = compile_plan(platform, ids.shape[1], dtype=dtype)
    lowered = forward.lower(graphdef, state, ids, mask, attn_impl=attn_impl, projections=proj)
    out = lowered.compile(options or None)(state, ids, mask)
    return cfg, {k: np.asarray(v) for k, v in out._asdict().items()}


def real_outputs(out, mask) -> dict[str, np.ndarray]:
    """Each output over real tokens only (padding positions are not outputs): per-token ones indexed by the mask."""
    real = mask.astype(bool)
    return {k: out[k][real] if k in ("last_hidden_state", "sparse") else out[k] for k in OUTPUTS}


# m3jax in bfloat16 against FlagEmbedding in float32 (the drift README and BGEM3's docstring state): the dense
# vectors' cosine at least this, every user-visible output within this absolute difference. bfloat16 keeps 8 bits of
# mantissa; these bounds hold a 2-layer and the full 24-layer random model alike.
BF16_MIN_DENSE_COSINE = 0.999
BF16_MAX_ABS = 0.1


def check_bf16_drift(ours, ref, mask) -> dict[str, float]:
    """Asserts BF16_MIN_DENSE_COSINE and BF16_MAX_ABS for bfloat16 outputs against float32 ones; returns the
    measured drift."""
    cos = (ours["dense"] * ref["dense"]).sum(-1)  # both unit vectors
    drift = {"min_dense_cosine": float(cos.min()), **{k: v for k, v in max_diffs(ours, ref, mask).items()
                                                       if k in USER_OUTPUTS}}
    assert drift["min_dense_cosine"] >= BF16_MIN_DENSE_COSINE, drift
    assert all(drift[k] <= BF16_MAX_ABS for k in USER_OUTPUTS), drift
    return drift


def max_diffs(ours, ref, mask) -> dict[str, float]:
    """Max abs diff per output over real tokens."""
    ours, ref = real_outputs(ours, mask), real_outputs(ref, mask)
    return {k: float(np.abs(ours[k] - ref[k]).max()) for k in OUTPUTS}


def check_against_float64(name, ours, ref32, ref64) -> dict[str, float]:
    """Asserts that m3jax's float32 `ours` is about as close to the float64 `ref64` as PyTorch's float32 `ref32` is
    (the module docstring gives the two bounds); returns the errors measured."""
    ours, ref32, ref64 = (np.asarray(x, np.float64).ravel() for x in (ours, ref32, ref64))
    rms = lambda x: float(np.sqrt(np.mean(x**2))) if x.size else 0.0  # noqa: E731
    biggest = lambda x: float(np.abs(x).max(initial=0))  # noqa: E731
    eps = float(np.finfo(np.float32).eps)
    err = {"m3jax_vs_f64": biggest(ours - ref64), "torch32_vs_f64": biggest(ref32 - ref64),
           "m3jax_vs_f64_rms": rms(ours - ref64), "torch32_vs_f64_rms": rms(ref32 - ref64)}
    for stat, margin, scale in (("_rms", REL_MARGIN, rms(ref64)), ("", MAX_MARGIN, biggest(ref64))):
        ours_err, torch_err = err["m3jax_vs_f64" + stat], err["torch32_vs_f64" + stat]
        bound = margin * torch_err + ULP_FLOOR * eps * scale
        what = "RMS" if stat else "largest"
        assert ours_err <= bound, (
            f"{name}: m3jax's {what} float32 error against float64 is {ours_err:.3g}, more than {margin} x "
            f"PyTorch's ({torch_err:.3g}) + {ULP_FLOOR} ulp of {scale:.3g} = {bound:.3g}")
    return err


def check_parity(ours, ref32, ref64, mask) -> dict:
    """Asserts both bounds (see the module docstring) on every output over real tokens; returns the measured errors
    for the test's record."""
    abs_diff = max_diffs(ours, ref32, mask)
    ours, ref32, ref64 = (real_outputs(r, mask) for r in (ours, ref32, ref64))
    report = {k: {**check_against_float64(k, ours[k], ref32[k], ref64[k]), "m3jax_vs_torch32": abs_diff[k]}
              for k in OUTPUTS}
    for k in USER_OUTPUTS:
        assert abs_diff[k] <= ABS_TOL, f"{k}: max abs diff to FlagEmbedding {abs_diff[k]:.3g} > {ABS_TOL}"
    return report
