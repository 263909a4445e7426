"""Model parity against FlagEmbedding's BGEM3FlagModel, run side by side on random release-layout checkpoints."""

import numpy as np
import pytest
import torch
from flax import nnx

from m3jax.checkpoint import load_params
from m3jax.model import forward, model_from_params
from tests.texts import SENTENCES, long_text

TOL = 1e-5


def flag_outputs(fe, texts, max_length=8192):
    batch = fe.tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    with torch.no_grad():
        hidden = fe.model.model(**batch).last_hidden_state
        out = fe.model(batch, return_dense=True, return_sparse=True, return_colbert_vecs=True)
    return batch, {
        "last_hidden_state": hidden.numpy(),
        "dense": out["dense_vecs"].numpy(),
        "sparse": out["sparse_vecs"].squeeze(-1).numpy(),
        "colbert": out["colbert_vecs"].numpy(),
    }


def m3jax_outputs(path, batch, dtype="float32", attn_impl="auto"):
    cfg, params, _ = load_params(path)
    graphdef, state = nnx.split(model_from_params(cfg, params, dtype=dtype))
    out = forward(graphdef, state, batch["input_ids"].numpy(), batch["attention_mask"].numpy(),
                  attn_impl=attn_impl)
    return cfg, {k: np.asarray(v) for k, v in out.items()}


def max_diffs(ours, ref, mask):
    real = mask.astype(bool)
    return {
        "last_hidden_state": float(np.abs(ours["last_hidden_state"] - ref["last_hidden_state"])[real].max()),
        "dense": float(np.abs(ours["dense"] - ref["dense"]).max()),
        "sparse": float(np.abs(ours["sparse"] - ref["sparse"])[real].max()),
        "colbert": float(np.abs(ours["colbert"] - ref["colbert"]).max()),
    }


@pytest.mark.parametrize("name", ["tiny", "tiny_bin", "tiny_narrow_colbert", "tiny_prefixed"])
def test_forward_matches_flagembedding(release_dirs, flag_model_factory, name, record_property):
    path = release_dirs[name]
    texts = SENTENCES + [long_text(), ""]
    cfg_probe, _, _ = load_params(path)
    fe = flag_model_factory(path, colbert_dim=cfg_probe.colbert_dim)
    batch, ref = flag_outputs(fe, texts)
    mask = batch["attention_mask"].numpy()
    assert mask.sum(1).max() >= 2000, "the long text must reach 2,000 tokens"
    assert len(set(mask.sum(1).tolist())) > 5, "the batch must mix lengths"
    cfg, ours = m3jax_outputs(path, batch)
    assert ours["colbert"].shape == ref["colbert"].shape == (len(texts), mask.shape[1] - 1, cfg.colbert_dim)
    diffs = max_diffs(ours, ref, mask)
    record_property("max_abs_diff", diffs)
    print(f"\n{name}: max abs diff {diffs}")
    for head, d in diffs.items():
        assert d <= TOL, f"{head}: max abs diff {d:.3g} > {TOL}"
    # The sparse head must be non-trivial for the comparison to mean anything.
    frac = (ref["sparse"][mask.astype(bool)] > 0).mean()
    print(f"positive sparse fraction {frac:.3f}")
    assert 0.01 < frac < 0.99


def test_chunked_attention_matches_flagembedding(release_dirs, flag_model_factory):
    path = release_dirs["tiny"]
    fe = flag_model_factory(path)
    batch, ref = flag_outputs(fe, [long_text(1800, seed=3), SENTENCES[2]])
    _, ours = m3jax_outputs(path, batch, attn_impl="chunked")
    diffs = max_diffs(ours, ref, batch["attention_mask"].numpy())
    for head, d in diffs.items():
        assert d <= TOL, f"{head}: max abs diff {d:.3g} > {TOL}"


def test_bfloat16_drift(release_dirs, flag_model_factory, record_property):
    path = release_dirs["tiny"]
    fe = flag_model_factory(path)
    batch, ref = flag_outputs(fe, SENTENCES)
    _, ours = m3jax_outputs(path, batch, dtype="bfloat16")
    mask = batch["attention_mask"].numpy()
    cos = (ours["dense"] * ref["dense"]).sum(-1)  # both unit vectors
    diffs = max_diffs(ours, ref, mask)
    record_property("bf16_drift", {"min_dense_cosine": float(cos.min()), **diffs})
    print(f"\nbfloat16 drift: min dense cosine {cos.min():.6f}, max abs diffs {diffs}")
    assert cos.min() >= 0.999
    assert all(v < 0.1 for v in diffs.values()), diffs  # bf16 has 8 bits of mantissa, not a broken model
