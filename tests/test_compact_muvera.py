"""m3jax.compact.fde against fastembed's Muvera (the reference it follows): its random matrices bit for bit; in
float64 its document and query encodings to 1e-10, row by row, over ragged padded batches; in float32 under jit to
float32 rounding. Padding never matters; configs are checked."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from m3jax.compact import MuveraConfig, fde

Muvera = pytest.importorskip("fastembed.postprocess.muvera", reason="fastembed (the MUVERA reference) is missing")
Muvera = Muvera.Muvera

fde_jit = jax.jit(fde, static_argnames=("config", "query"))

CONFIGS = {
    "small": MuveraConfig(dim=32, k_sim=3, dim_proj=8, r_reps=4),
    "defaults": MuveraConfig(dim=64),  # k_sim 5, dim_proj 16 < dim, r_reps 20, seed 42
    "no_projection": MuveraConfig(dim=16, k_sim=4, dim_proj=16, r_reps=3, seed=7),
}
LENGTHS = [1, 3, 9, 40]  # 3 tokens leave most of 8 or 32 clusters empty, 40 fill most


def reference(config: MuveraConfig):
    return Muvera(config.dim, k_sim=config.k_sim, dim_proj=config.dim_proj, r_reps=config.r_reps,
                  random_seed=config.seed)


def ragged_batch(rng, lengths, dim, width=None, pad=np.nan):
    """[B, T, dim] float64 rows of the given lengths, the rest pad (NaN: padding must not reach any sum)."""
    width = width or max(lengths)
    x = np.full((len(lengths), width, dim), pad)
    mask = np.arange(width) < np.array(lengths)[:, None]
    x[mask] = rng.standard_normal((mask.sum(), dim)) / np.sqrt(dim)
    return x, mask


@pytest.mark.parametrize("name", CONFIGS)
def test_matrices_are_fastembeds(name):
    config, ref = CONFIGS[name], reference(CONFIGS[name])
    simhash, proj = config.matrices()
    assert simhash.dtype == np.float64 and proj.dtype == np.int8
    assert simhash.shape == (config.r_reps, config.dim, config.k_sim)
    np.testing.assert_array_equal(simhash, np.stack([s.simhash_vectors for s in ref.simhash_projections]))
    np.testing.assert_array_equal(proj, ref.dim_reduction_projections)
    assert config.out_dim == ref.embedding_size
    assert config.matrices()[0] is simhash and not simhash.flags.writeable  # cached, so kept read-only


@pytest.mark.parametrize("name", CONFIGS)
def test_float64_equals_fastembed(name):
    config, ref = CONFIGS[name], reference(CONFIGS[name])
    x, mask = ragged_batch(np.random.default_rng(1), LENGTHS, config.dim)
    with jax.enable_x64(True):
        for query, want_fn in ((False, ref.process_document), (True, ref.process_query)):
            got = np.asarray(fde_jit(jnp.asarray(x), jnp.asarray(mask), config, query=query))
            assert got.dtype == np.float64 and got.shape == (len(LENGTHS), config.out_dim)
            for i, n in enumerate(LENGTHS):
                want = want_fn(x[i, :n])
                assert np.abs(got[i] - want).max() <= 1e-10, (query, n)


def test_document_fill_is_exercised():
    """The 3-token row leaves clusters empty in every repetition, and their fill differs from a plain mean."""
    config, ref = CONFIGS["defaults"], reference(CONFIGS["defaults"])
    x = np.random.default_rng(2).standard_normal((3, config.dim))
    doc, query = ref.process_document(x), ref.process_query(x)
    assert np.count_nonzero(query) < query.size / 4 and np.count_nonzero(doc) == doc.size
    with jax.enable_x64(True):
        got = np.asarray(fde(jnp.asarray(x[None]), jnp.ones((1, 3), bool), config))[0]
    assert np.abs(got - doc).max() <= 1e-10


def test_float32_jit_matches_fastembed():
    config, ref = CONFIGS["defaults"], reference(CONFIGS["defaults"])
    simhash = config.matrices()[0]
    rng = np.random.default_rng(3)
    # Only a dot product with a hyperplane within float32 rounding of 0 may flip a cluster id between float32 and
    # float64. Keep tokens whose every dot product is at least 1e-4 of |v||s|: float32 rounding of a 64-term dot
    # product is below 64 * 6e-8 ~ 4e-6 of it, so the ids are the same on every CPU.
    pool = (rng.standard_normal((200, config.dim)) / np.sqrt(config.dim)).astype(np.float32)
    cos = np.einsum("td,rdk->trk", pool.astype(np.float64), simhash)
    cos /= np.linalg.norm(pool, axis=1)[:, None, None] * np.linalg.norm(simhash, axis=1)[None]
    pool = pool[np.abs(cos).min((1, 2)) > 1e-4]
    lengths = [1, 4, 30]
    x = np.zeros((3, 32, config.dim), np.float32)
    mask = np.arange(32) < np.array(lengths)[:, None]
    x[mask] = pool[: mask.sum()]
    for query, want_fn in ((False, ref.process_document), (True, ref.process_query)):
        got = np.asarray(fde_jit(x, mask, config, query=query))
        assert got.dtype == np.float32
        for i, n in enumerate(lengths):
            want = want_fn(x[i, :n].astype(np.float64))
            # Vectors of norm ~1 give entries up to ~2: a sum of <= 30 vectors then of 64 ±1/4-weighted terms,
            # each step rounding at float32's 6e-8 relative. 1e-5 absolute is 20x the largest difference seen
            # (5e-7) and far below the O(0.1) change a flipped cluster id would make.
            np.testing.assert_allclose(got[i], want, rtol=0, atol=1e-5, err_msg=f"query={query} n={n}")


@pytest.mark.parametrize("query", [False, True])
def test_padding_invariance(query):
    config = CONFIGS["small"]
    rng = np.random.default_rng(4)
    x, mask = ragged_batch(rng, [5, 8, 2], config.dim, width=8, pad=0.0)
    wide = np.concatenate([x, rng.standard_normal((3, 12, config.dim))], axis=1).astype(np.float32)  # junk padding
    wide_mask = np.pad(mask, ((0, 0), (0, 12)))
    wide[1, 8:] = np.inf
    narrow = np.asarray(fde_jit(x.astype(np.float32), mask, config, query=query))
    got = np.asarray(fde_jit(wide, wide_mask, config, query=query))
    np.testing.assert_allclose(got, narrow, rtol=1e-6, atol=1e-6)
    # A row's FDE does not depend on its neighbours, nor an all-padding row on anything.
    none_in_last = wide_mask.copy()
    none_in_last[2] = False
    empty = np.asarray(fde_jit(wide, none_in_last, config, query=query))
    np.testing.assert_allclose(empty[:2], narrow[:2], rtol=1e-6, atol=1e-6)
    assert np.all(empty[2] == 0)


def test_config_validation():
    assert MuveraConfig(dim=1024).out_dim == 20 * 32 * 16
    assert hash(MuveraConfig(dim=16)) == hash(MuveraConfig(dim=16))
    for kwargs, match in [({"dim": 8, "dim_proj": 16}, "dim_proj"), ({"dim": 0}, "dim"), ({"dim": 16.0}, "dim"),
                          ({"dim": 16, "k_sim": 0}, "k_sim"), ({"dim": 16, "k_sim": 17}, "k_sim"),
                          ({"dim": 16, "r_reps": -1}, "r_reps"), ({"dim": 16, "dim_proj": True}, "dim_proj"),
                          ({"dim": 16, "seed": -1}, "seed")]:
        with pytest.raises(ValueError, match=match):
            MuveraConfig(**kwargs)
    config = MuveraConfig(dim=8, k_sim=2, dim_proj=4, r_reps=2)
    with pytest.raises(ValueError, match="config.dim"):
        fde(jnp.zeros((1, 3, 9)), jnp.ones((1, 3), bool), config)
    with pytest.raises(ValueError, match="mask"):
        fde(jnp.zeros((1, 3, 8)), jnp.ones((1, 4), bool), config)
