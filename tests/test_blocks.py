"""Block by block against transformers' XLM-R modules on the same random weights, so a failure names the block:
embeddings, self-attention, one layer, the layer stack, and each head.

Every block is run three ways on the same float64 inputs cast to float32: m3jax (float32), the torch module
(float32) and the torch module in float64. m3jax's error against float64 must stay about torch's own float32 error
(tests/parity.py explains the bounds).
"""

import copy

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from m3jax.checkpoint import load_params
from m3jax.model import l2_normalize, model_from_params
from tests.helpers import SENTENCES, long_text
from tests.parity import check_against_float64


@pytest.fixture(scope="module")
def blocks(release_dirs):
    from transformers import AutoTokenizer, XLMRobertaModel

    path = release_dirs["tiny_narrow_colbert"]  # every width differs: a transposed or misrouted weight shows
    cfg, params, _ = load_params(path)
    ours = model_from_params(cfg, params)
    hf32 = XLMRobertaModel.from_pretrained(path, attn_implementation="eager").eval()
    hf64 = copy.deepcopy(hf32).double()
    heads = {name: torch.load(path / f"{name}.pt", weights_only=True) for name in ("colbert_linear", "sparse_linear")}
    tok = AutoTokenizer.from_pretrained(path)
    batch = tok([*SENTENCES[:6], long_text(120, seed=2), ""], padding=True, return_tensors="pt")
    return cfg, ours, hf32, hf64, heads, batch


def _check(name, ours, ref32, ref64, where=None):
    ours, ref32, ref64 = (np.asarray(x, np.float64) for x in (ours, ref32, ref64))
    if where is not None:
        ours, ref32, ref64 = ours[where], ref32[where], ref64[where]
    check_against_float64(name, ours, ref32, ref64)
    assert np.abs(ref64).max() > 0.1, f"{name}: the reference is near zero, the comparison would be empty"


def _layer(ours, i):
    """Layer i of the stacked encoder as a module of its own."""
    graphdef, state = nnx.split(ours.encoder.layer)
    return nnx.merge(graphdef, jax.tree_util.tree_map(lambda x: x[i], state))


def _hidden(cfg, batch, seed=0):
    """Random float64 hidden states [B, T, D], the same for every side."""
    b, t = batch["input_ids"].shape
    return np.random.default_rng(seed).standard_normal((b, t, cfg.hidden_size))


def _torch(x, dtype):
    return torch.tensor(np.asarray(x), dtype=dtype)


def _extended_mask(hf, mask, dtype):
    return hf.get_extended_attention_mask(mask, mask.shape, dtype=dtype)


def test_embeddings(blocks):
    cfg, ours, hf32, hf64, _, batch = blocks
    ids = batch["input_ids"]
    with torch.no_grad():
        r32, r64 = hf32.embeddings(input_ids=ids).numpy(), hf64.embeddings(input_ids=ids).numpy()
    _check("embeddings", ours.embeddings(jnp.asarray(ids.numpy())), r32, r64)


def test_self_attention(blocks):
    cfg, ours, hf32, hf64, _, batch = blocks
    x, mask = _hidden(cfg, batch), batch["attention_mask"]
    real = mask.numpy().astype(bool)
    with torch.no_grad():
        r = {dt: hf.encoder.layer[0].attention.self(_torch(x, dt), _extended_mask(hf, mask, dt))[0].numpy()
             for hf, dt in ((hf32, torch.float32), (hf64, torch.float64))}
    got = _layer(ours, 0).attention.self(jnp.asarray(x, jnp.float32), jnp.asarray(real), "xla")
    _check("self-attention", got, r[torch.float32], r[torch.float64], real)


@pytest.mark.parametrize("layer", [0, 2])
def test_one_layer(blocks, layer):
    cfg, ours, hf32, hf64, _, batch = blocks
    x, mask = _hidden(cfg, batch, seed=layer), batch["attention_mask"]
    real = mask.numpy().astype(bool)
    with torch.no_grad():
        r = {dt: hf.encoder.layer[layer](_torch(x, dt), _extended_mask(hf, mask, dt))[0].numpy()
             for hf, dt in ((hf32, torch.float32), (hf64, torch.float64))}
    got = _layer(ours, layer)(jnp.asarray(x, jnp.float32), jnp.asarray(real), "xla")
    _check(f"layer {layer}", got, r[torch.float32], r[torch.float64], real)


@pytest.mark.parametrize("impl", ["xla", "chunked", "tiled"])
def test_layer_stack(blocks, impl):
    cfg, ours, hf32, hf64, _, batch = blocks
    x, mask = _hidden(cfg, batch, seed=9), batch["attention_mask"]
    real = mask.numpy().astype(bool)
    with torch.no_grad():
        r = {dt: hf.encoder(_torch(x, dt), _extended_mask(hf, mask, dt)).last_hidden_state.numpy()
             for hf, dt in ((hf32, torch.float32), (hf64, torch.float64))}
    got = ours.encoder(jnp.asarray(x, jnp.float32), jnp.asarray(real), impl)
    _check(f"layer stack ({impl})", got, r[torch.float32], r[torch.float64], real)


def test_tiled(blocks):
    """Each head on the same hidden states: FlagEmbedding's maths with the release's float16 head weights."""
    cfg, ours, _, _, heads, batch = blocks
    h = _hidden(cfg, batch, seed=4)
    mask = batch["attention_mask"].numpy()
    real = mask.astype(bool)

    def torch_tiled(dt):
        ht = _torch(h, dt)
        lin = {k: (v["weight"].to(dt), v["bias"].to(dt)) for k, v in heads.items()}
        dense = torch.nn.functional.normalize(ht[:, 0], dim=-1)
        sparse = torch.relu(ht @ lin["sparse_linear"][0].T + lin["sparse_linear"][1])[..., 0]
        colbert = (ht[:, 1:] @ lin["colbert_linear"][0].T + lin["colbert_linear"][1]) * _torch(mask[:, 1:, None], dt)
        return dense.numpy(), sparse.numpy(), torch.nn.functional.normalize(colbert, dim=-1).numpy()

    r32, r64 = torch_tiled(torch.float32), torch_tiled(torch.float64)
    hj = jnp.asarray(h, jnp.float32)
    dense = l2_normalize(hj[:, 0])
    sparse = jax.nn.relu(ours.sparse_linear(hj))[..., 0]
    colbert = l2_normalize(ours.colbert_linear(hj[:, 1:]) * jnp.asarray(mask[:, 1:, None]))
    _check("dense head", dense, r32[0], r64[0])
    _check("sparse head", sparse, r32[1], r64[1], real)
    _check("colbert head", colbert, r32[2], r64[2])
    assert 0.05 < (r64[1][real] > 0).mean() < 0.95, "the sparse ReLU must be neither dead nor always on"


def test_split_feed_forward_is_the_same_sums(release_dirs):
    """The feed-forward up-projection in column blocks (what Encoder compiles with Eigen's CPU dots) gives the
    unsplit forward's outputs, on a config whose intermediate width (80) is not a multiple of the hidden (48);
    and Encoder splits exactly when it compiles with Eigen's dots."""
    from m3jax.engine import CPU_EIGEN_DOTS, compile_plan, default_compiler_options, projections
    from m3jax.model import forward

    cfg, params, _ = load_params(release_dirs["tiny_narrow_colbert"])
    graphdef, state = nnx.split(model_from_params(cfg, params))
    rng = np.random.default_rng(0)
    ids = rng.integers(5, cfg.vocab_size, (3, 40)).astype(np.int32)
    mask = (np.arange(40)[None] < np.array([[40], [17], [1]])).astype(np.int32)
    whole, split = (forward(graphdef, state, ids, mask, projections=p) for p in ("xla", "split"))
    for name, a, b in zip(whole._fields, whole, split, strict=True):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-6, atol=1e-6, err_msg=name)
    assert projections("cpu", default_compiler_options("cpu", 512)) == "split"
    assert projections("cpu", default_compiler_options("cpu", 2048)) == "xla"  # YNNPACK's: not faster in blocks
    assert projections("gpu", default_compiler_options("gpu", 512)) == "xla"
    # compile_plan, what Encoder, tests/parity.py and the benchmark compile with: m3jax's options or the user's.
    assert compile_plan("cpu", 512) == (CPU_EIGEN_DOTS, "split")
    assert compile_plan("cpu", 4096) == ({}, "xla")
    assert compile_plan("cpu", 4096, options=CPU_EIGEN_DOTS) == (CPU_EIGEN_DOTS, "split")  # the user's
    assert compile_plan("gpu", 512, options={}) == ({}, "xla")
    assert compile_plan("cpu", 512, dtype="bfloat16") == ({}, "xla")  # YNNPACK's bfloat16 dots are the fast ones
