"""MUVERA fixed-dimensional encodings (FDEs): one vector per passage standing in for its ColBERT vectors.

fastembed's `Muvera` (fastembed/postprocess/muvera.py), value for value, in JAX. For each of r_reps repetitions:
- SimHash: token t goes to cluster sum_k (v_t · s_k > 0) << k, s_k the k_sim Gaussian hyperplanes of the repetition.
- Documents: each cluster's mean; an empty cluster takes the first (lowest index) vector of the nearest occupied
  cluster, nearest by Hamming distance between cluster ids, ties to the lowest id. Queries: each cluster's sum,
  empty clusters stay zero.
- dim_proj < dim: centres @ (±1 matrix) / sqrt(dim_proj); dim_proj == dim: no projection.
The FDE concatenates [r_reps, 2**k_sim, dim_proj] in that order; <query FDE, document FDE> approximates Chamfer
(MaxSim) similarity. The random matrices come from numpy.random.default_rng(seed) drawn in fastembed's order, so a
config gives fastembed's encodings.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

_HIGHEST = jax.lax.Precision.HIGHEST


@dataclasses.dataclass(frozen=True)
class MuveraConfig:
    """fastembed's Muvera parameters and defaults; hashable, so it can be a static argument of a jitted function."""

    dim: int  # input vector size (BGE-M3 ColBERT: 1024)
    k_sim: int = 5  # SimHash hyperplanes: 2**k_sim clusters per repetition
    dim_proj: int = 16  # size of each cluster's projected centre (== dim: no projection)
    r_reps: int = 20  # independent repetitions, concatenated
    seed: int = 42  # numpy.random.default_rng seed (fastembed's random_seed)

    def __post_init__(self):
        for name in ("dim", "k_sim", "dim_proj", "r_reps"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"MuveraConfig.{name} must be a positive int, got {value!r}")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or self.seed < 0:
            raise ValueError(f"MuveraConfig.seed must be a non-negative int, got {self.seed!r}")
        if self.dim_proj > self.dim:
            raise ValueError(f"MuveraConfig.dim_proj ({self.dim_proj}) must be <= dim ({self.dim})")
        # Cluster ids and the int32 keys in fde need k_sim <= 16; 2**16 clusters is far past any useful FDE anyway.
        if self.k_sim > 16:
            raise ValueError(f"MuveraConfig.k_sim must be <= 16 (2**k_sim clusters), got {self.k_sim}")

    @property
    def out_dim(self) -> int:
        """FDE size: r_reps * 2**k_sim * dim_proj."""
        return self.r_reps * 2**self.k_sim * self.dim_proj

    def matrices(self) -> tuple[np.ndarray, np.ndarray]:
        """(simhash [r_reps, dim, k_sim] float64, projections [r_reps, dim, dim_proj] int8 of ±1), drawn from
        numpy.random.default_rng(seed) in fastembed's order, so that the same config gives fastembed's encodings.
        Cached and read-only."""
        return _matrices(self)


@functools.lru_cache(maxsize=16)
def _matrices(config: MuveraConfig) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(config.seed)
    # fastembed: one normal((dim, k_sim)) per repetition, then one choice for all projections (drawn even when
    # dim_proj == dim and unused).
    simhash = np.stack([rng.normal(size=(config.dim, config.k_sim)) for _ in range(config.r_reps)])
    proj = rng.choice([-1, 1], size=(config.r_reps, config.dim, config.dim_proj)).astype(np.int8)
    simhash.flags.writeable = False
    proj.flags.writeable = False
    return simhash, proj


def fde(vectors: jax.Array, mask: jax.Array, config: MuveraConfig, *, query: bool = False) -> jax.Array:
    """[B, T, dim] vectors with [B, T] bool mask (False = padding) -> [B, out_dim] FDEs, fastembed's
    process_document (query=False: cluster centres averaged, empty clusters filled from the nearest occupied cluster
    by Hamming distance of cluster ids) or process_query (query=True: sums, no fill). Jittable with config and query
    static; computed in the vectors' dtype (float32 in, float32 out; float64 under jax x64; half types in float32).
    A row with no valid vector gives zeros (fastembed raises on an empty multivector)."""
    vectors = jnp.asarray(vectors)
    dtype = jnp.promote_types(vectors.dtype, jnp.float32)
    b, t, d = vectors.shape
    if d != config.dim:
        raise ValueError(f"vectors must have shape [B, T, {config.dim}] (config.dim), got {vectors.shape}")
    if mask.shape != (b, t):
        raise ValueError(f"mask must have shape {(b, t)}, got {mask.shape}")
    c = 2**config.k_sim
    simhash, proj = config.matrices()
    mask = jnp.asarray(mask, bool)
    x = jnp.where(mask[..., None], vectors.astype(dtype), 0)  # padding (even NaN) never reaches a sum

    project = config.dim_proj < config.dim
    scale = jnp.asarray(1 / np.sqrt(config.dim_proj), dtype)

    def repetition(mats):  # [D, K] hyperplanes, [D, P] projection -> [B, C, P]; one at a time bounds the memory
        hyperplanes, projection = mats
        dots = jnp.einsum("btd,dk->btk", x, hyperplanes, precision=_HIGHEST)
        ids = ((dots > 0).astype(jnp.int32) << jnp.arange(config.k_sim, dtype=jnp.int32)).sum(-1)  # [B, T]
        member = (ids[..., None] == jnp.arange(c, dtype=jnp.int32)) & mask[..., None]  # [B, T, C]
        centres = jnp.einsum("btc,btd->bcd", member.astype(dtype), x, precision=_HIGHEST)
        if not query:
            counts = member.sum(1)  # [B, C]
            centres = centres / jnp.maximum(counts, 1)[..., None].astype(dtype)
            # Fill: for each cluster, the valid token minimising (Hamming(cluster, its id), its id); argmin takes the
            # lowest index among equal keys, i.e. the first token of the nearest occupied cluster, ties to lowest id.
            ham = jax.lax.population_count(jnp.arange(c, dtype=jnp.int32)[:, None] ^ ids[:, None, :])  # [B, C, T]
            key = jnp.where(mask[:, None, :], ham * c + ids[:, None, :], jnp.iinfo(jnp.int32).max)
            fill = jnp.take_along_axis(x, jnp.argmin(key, axis=-1)[..., None], axis=1)  # [B, C, D]
            centres = jnp.where((counts == 0)[..., None], fill, centres)
        if project:
            centres = scale * jnp.einsum("bcd,dp->bcp", centres, projection, precision=_HIGHEST)
        return centres

    centres = jax.lax.map(repetition, (jnp.asarray(simhash, dtype), jnp.asarray(proj, dtype)))  # [R, B, C, P]
    out = centres.transpose(1, 0, 2, 3).reshape(b, config.out_dim)
    return jnp.where(mask.any(1, keepdims=True), out, 0)


__all__ = ["MuveraConfig", "fde"]
