"""Model parity against FlagEmbedding's BGEM3FlagModel, run side by side on random release-layout checkpoints."""

import pytest

from m3jax.checkpoint import load_params
from tests.helpers import SENTENCES, long_text
from tests.parity import check_bf16_drift, check_parity, flag_outputs, flag_outputs_float64, m3jax_outputs


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
    report = check_parity(ours, ref, flag_outputs_float64(fe, batch), mask)
    record_property("parity", report)
    print(f"\n{name}: {report}")
    # The sparse head must be non-trivial for the comparison to mean anything.
    frac = (ref["sparse"][mask.astype(bool)] > 0).mean()
    print(f"positive sparse fraction {frac:.3f}")
    assert 0.01 < frac < 0.99


def test_chunked_attention_matches_flagembedding(release_dirs, flag_model_factory):
    path = release_dirs["tiny"]
    fe = flag_model_factory(path)
    batch, ref = flag_outputs(fe, [long_text(1800, seed=3), SENTENCES[2]])
    _, ours = m3jax_outputs(path, batch, attn_impl="chunked")
    check_parity(ours, ref, flag_outputs_float64(fe, batch), batch["attention_mask"].numpy())


def test_bfloat16_drift(release_dirs, flag_model_factory, record_property):
    path = release_dirs["tiny"]
    fe = flag_model_factory(path)
    batch, ref = flag_outputs(fe, SENTENCES)
    _, ours = m3jax_outputs(path, batch, dtype="bfloat16")
    drift = check_bf16_drift(ours, ref, batch["attention_mask"].numpy())
    record_property("bf16_drift", drift)
    print(f"\nbfloat16 drift: {drift}")
