"""The gradient cache (m3jax.train.loss.cached_value_and_grad, `m3jax train --gradient-cache-chunk`): its loss and
gradients equal the plain backward pass's, and fit()'s step with it equals the plain step. Over a mesh (cross-device
negatives, FSDP) in tests/test_train_sharding.py; its memory in benchmarks/RESULTS.md."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from m3jax.config import M3Config
from m3jax.model import init_model
from m3jax.train.loss import LossConfig, cached_value_and_grad, value_and_grad
from m3jax.train.step import OptimConfig, accumulate_step, make_optimizer

# Every loss term: dense, sparse, ColBERT, ensemble, self-distillation, teacher scores, Matryoshka widths.
FLAGS = LossConfig(unified_finetuning=True, use_self_distill=True, self_distill_start_step=0,
                   kd_loss_type="m3_kd_loss", use_mrl=True, mrl_dims=(8, 32), colbert_mrl_dims=(16,),
                   fix_position_embedding=True)
B, G, LQ, LP = 4, 3, 12, 20


def batch(seed, vocab=1000):
    rng = np.random.default_rng(seed)
    qm = (np.arange(LQ) < rng.integers(3, LQ + 1, (B, 1))).astype(np.int32)
    pm = (np.arange(LP) < rng.integers(5, LP + 1, (B * G, 1))).astype(np.int32)
    return {"q_ids": np.where(qm, rng.integers(4, vocab, qm.shape), 1).astype(np.int32), "q_mask": qm,
            "p_ids": np.where(pm, rng.integers(4, vocab, pm.shape), 1).astype(np.int32), "p_mask": pm,
            "teacher_scores": rng.standard_normal((B, G)).astype(np.float32)}


@pytest.fixture(scope="module")
def model():
    return nnx.split(init_model(M3Config.tiny(vocab_size=1000, num_layers=1), seed=1))


def leaves(tree):
    return {jax.tree_util.keystr(k): np.asarray(v) for k, v in jax.tree_util.tree_leaves_with_path(tree)}


@pytest.mark.parametrize("chunk", [1, 2])
def test_cached_loss_and_gradients_equal_the_plain_ones(model, chunk):
    """Chunks of 1 and of 2 rows give the plain loss, each loss term and every parameter's gradient to float32
    rounding: at most 1e-5 of the parameter's largest gradient (for the attention key bias, whose exact gradient is
    0, of its layer's key kernel's); frozen parameters (the position table) get exactly 0. A chunk that does not
    divide the rows is refused."""
    graphdef, state = model
    b, step = batch(0), jnp.int32(1)
    cached_fn = jax.jit(cached_value_and_grad, static_argnums=(0, 4, 5))
    (loss, parts), grads = value_and_grad(graphdef, state, b, step, FLAGS)
    (c_loss, c_parts), c_grads = cached_fn(graphdef, state, b, step, FLAGS, chunk)
    np.testing.assert_allclose(float(c_loss), float(loss), rtol=1e-6)
    assert set(c_parts) == set(parts) == {"dense", "sparse", "colbert", "ensemble", "self_distill"}
    for k in parts:
        np.testing.assert_allclose(float(c_parts[k]), float(parts[k]), rtol=1e-6, err_msg=k)
    plain, cached = leaves(grads), leaves(c_grads)
    for k, g in plain.items():
        if "position_embeddings" in k:
            assert np.abs(g).max() == 0 and np.abs(cached[k]).max() == 0
            continue
        scale = np.abs(plain[k.replace("['key']['bias']", "['key']['kernel']")]).max()
        assert scale > 0, k
        assert np.abs(cached[k] - g).max() <= 1e-5 * scale, (k, np.abs(cached[k] - g).max() / scale)
    if chunk == 2:
        with pytest.raises(ValueError, match="4 rows are not a whole number of chunks of 3"):
            cached_fn(graphdef, state, b, step, FLAGS, 3)


def test_step_with_the_cache_equals_the_plain_step(model):
    """Two optimiser steps of two accumulated micro-batches each: the parameters after them and the logged metrics
    match the plain step's (float32; bfloat16 compute reaches the masters through the same cast back, and the mesh
    cases are in tests/test_train_sharding.py); with dropout on, the cached step runs and moves the parameters (its
    masks differ from the plain step's by design)."""
    graphdef, state0 = model
    tx = make_optimizer(state0, FLAGS, OptimConfig(num_training_steps=4, learning_rate=1e-3, adam_epsilon=1.0))
    stacked = [{k: np.stack([v, batch(10 + s)[k]]) for k, v in batch(s).items()} for s in range(2)]
    key = jax.random.key_data(jax.random.PRNGKey(0))

    def run(cache, dropout=False):
        state = jax.tree_util.tree_map(jnp.array, state0)
        opt = tx.init(state)
        for s, b in enumerate(stacked):
            state, opt, m = accumulate_step(graphdef, state, opt, b, jnp.int32(s), key, flags=FLAGS, tx=tx,
                                            dropout=dropout, gradient_cache_chunk=cache)
        return leaves(state), {k: float(v) for k, v in m.items()}

    (plain, mp), (cached, mc) = run(None), run(2)
    moved = max(np.abs(plain[k] - np.asarray(v)).max() for k, v in leaves(state0).items())
    worst = max(np.abs(plain[k] - cached[k]).max() for k in plain)
    assert moved > 0 and worst <= 1e-5 * moved, (worst, moved)
    assert mc["tokens"] == mp["tokens"] and abs(mc["loss"] - mp["loss"]) <= 1e-5 * abs(mp["loss"])
    dropped, m = run(2, dropout=True)
    assert np.isfinite(m["loss"]) and any(np.abs(dropped[k] - plain[k]).max() > 0 for k in plain)
