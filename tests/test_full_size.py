"""Parity on the full BGE-M3 architecture (24 x 1024 x 4096, 8,194 positions) with random weights."""

import gc

import numpy as np
import pytest

from m3jax.config import M3Config
from m3jax.testing import write_random_release
from tests.helpers import SENTENCES, long_text
from tests.parity import check_bf16_drift, check_parity, flag_outputs, flag_outputs_float64, m3jax_outputs

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def full_release(tmp_path_factory):
    cfg = M3Config.bge_m3()
    assert (cfg.num_layers, cfg.hidden_size, cfg.intermediate_size, cfg.max_position_embeddings) == (
        24, 1024, 4096, 8194)
    return write_random_release(tmp_path_factory.mktemp("full") / "bge-m3-random", cfg, seed=7)


def test_full_size_forward_matches_flagembedding(full_release, record_property):
    import FlagEmbedding

    fe = FlagEmbedding.BGEM3FlagModel(str(full_release), use_fp16=False, devices="cpu")
    texts = SENTENCES[:5] + [long_text(140, seed=5)]  # six rows of six lengths, the longest ~270 tokens
    batch, ref = flag_outputs(fe, texts)
    ref64 = flag_outputs_float64(fe, batch)
    del fe
    gc.collect()
    mask = batch["attention_mask"].numpy()
    assert mask.sum(1).max() > 200 and len(set(mask.sum(1).tolist())) > 5
    cfg, ours = m3jax_outputs(full_release, batch)
    assert cfg == M3Config.bge_m3()
    report = check_parity(ours, ref, ref64, mask)
    record_property("parity", report)
    print(f"\nfull size: {report}")
    assert (ref["sparse"][mask.astype(bool)] > 0).mean() > 0.01
    assert np.abs(ref["last_hidden_state"]).max() > 0.1
    _, bf16 = m3jax_outputs(full_release, batch, dtype="bfloat16")  # 24 layers of bfloat16 rounding
    drift = check_bf16_drift(bf16, ref, mask)
    record_property("bf16_drift", drift)
    print(f"full size, bfloat16 drift: {drift}")
