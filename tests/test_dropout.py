"""Dropout: off without a key (inference, parity), on with one at the config's rates (training)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from m3jax.attention import attention
from m3jax.config import M3Config
from m3jax.model import dropout, forward, init_model


@pytest.fixture(scope="module")
def batch():
    rng = np.random.default_rng(0)
    ids = rng.integers(4, 1000, (3, 40)).astype(np.int32)
    ids[:, 0], mask = 0, np.ones((3, 40), np.int32)
    ids[1, 30:], mask[1, 30:] = 1, 0
    return jnp.asarray(ids), jnp.asarray(mask)


def test_dropout_rate_and_scale():
    x = jnp.ones((1000, 1000))
    y = np.asarray(dropout(x, 0.1, jax.random.key(0)))
    assert set(np.unique(y).tolist()) == {0.0, np.float32(1 / 0.9)}
    assert abs((y == 0).mean() - 0.1) < 0.002  # 1e6 draws: the standard error is 3e-4
    np.testing.assert_array_equal(dropout(x, 0.1, None), x)
    np.testing.assert_array_equal(dropout(x, 0.0, jax.random.key(0)), x)


def test_model_dropout_needs_a_key(batch):
    cfg = M3Config.tiny()
    assert cfg.hidden_dropout_prob == cfg.attention_probs_dropout_prob == 0.1  # the release's rates
    graphdef, state = nnx.split(init_model(cfg, seed=1))
    ids, mask = batch
    plain = forward(graphdef, state, ids, mask).last_hidden_state
    again = forward(graphdef, state, ids, mask).last_hidden_state
    np.testing.assert_array_equal(plain, again)
    a = forward(graphdef, state, ids, mask, dropout_rng=jax.random.key(1)).last_hidden_state
    b = forward(graphdef, state, ids, mask, dropout_rng=jax.random.key(1)).last_hidden_state
    c = forward(graphdef, state, ids, mask, dropout_rng=jax.random.key(2)).last_hidden_state
    np.testing.assert_array_equal(a, b)  # a key fixes every mask
    assert np.abs(np.asarray(a) - np.asarray(plain)).max() > 1e-2
    assert np.abs(np.asarray(a) - np.asarray(c)).max() > 1e-2


def test_zero_rates_with_a_key_are_exact(batch):
    cfg = dataclasses.replace(M3Config.tiny(), hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    graphdef, state = nnx.split(init_model(cfg, seed=1))
    ids, mask = batch
    np.testing.assert_array_equal(forward(graphdef, state, ids, mask, dropout_rng=jax.random.key(3)).dense,
                                  forward(graphdef, state, ids, mask).dense)


@pytest.mark.parametrize("impl", ["xla", "chunked", "tiled"])
def test_attention_dropout(impl):
    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.standard_normal((2, 700, 2, 8)), jnp.float32) for _ in range(3))
    mask = jnp.asarray(np.arange(700)[None] < np.array([[700], [650]]))
    plain = attention(q, k, v, mask, impl=impl)
    np.testing.assert_array_equal(attention(q, k, v, mask, impl=impl, dropout_rate=0.1), plain)  # no key: off
    dropped = attention(q, k, v, mask, impl=impl, dropout_rate=0.1, dropout_rng=jax.random.key(0))
    assert np.isfinite(np.asarray(dropped)).all()
    assert np.abs(np.asarray(dropped - plain)).max() > 1e-3
    # Inverted dropout keeps the expectation: the mean over many keys approaches the plain output.
    keys = jax.random.split(jax.random.key(1), 64)
    mean = jax.vmap(lambda key: attention(q[:, :64], k, v, mask, impl="xla", dropout_rate=0.1,
                                          dropout_rng=key))(keys).mean(0)
    ref = attention(q[:, :64], k, v, mask, impl="xla")
    assert float(jnp.abs(mean - ref).mean()) < 0.25 * float(jnp.abs(dropped[:, :64] - plain[:, :64]).mean())
