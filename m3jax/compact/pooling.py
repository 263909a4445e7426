"""ColBERT token pooling: fewer vectors per passage by Ward clustering of its vectors (Clavié et al. 2024,
arXiv 2409.14683), PyLate's `ColBERT.pool_embeddings_hierarchical` (pylate/models/colbert.py), value for value.

PyLate, main since commit 06305e3 ("Optimized hierarchical pooling function", March 2026), for one passage:
- the first `protected` vectors are set aside; the other n are pooled into k = max(n // pool_factor, 1) clusters;
  if k >= n nothing is pooled (the passage comes back as it is);
- distances 1 - x_i·x_j (cosine distance of normalised vectors), the Gram matrix in float32, its upper triangle
  (condensed) handed to scipy `linkage(method="ward")` (which works in float64), cut by
  `fcluster(t=k, criterion="maxclust")`;
- each cluster's mean, in fcluster's label order (1, 2, ...), no re-normalisation; protected vectors first.
PyLate releases up to 1.4.0 and Answer.AI's colbert code hand the square [n, n] distance matrix to linkage instead,
which takes its rows as observations (Ward on Euclidean distances between the rows of 1 - cos), and append the
protected vectors after the pooled ones: `legacy=True`.
"""

from __future__ import annotations

import numpy as np


def _check(pool_factor: int, protected: int):
    if not isinstance(pool_factor, (int, np.integer)) or isinstance(pool_factor, bool) or pool_factor < 1:
        raise ValueError(f"pool_factor must be a positive int, got {pool_factor!r}")
    if not isinstance(protected, (int, np.integer)) or isinstance(protected, bool) or protected < 0:
        raise ValueError(f"protected must be a non-negative int, got {protected!r}")


def pooled_count(n: int, pool_factor: int, protected: int = 0) -> int:
    """Vectors out of pool_tokens for an n-vector passage: min(protected, n) + max((n - protected) // pool_factor, 1),
    or n when that would not reduce anything. An upper bound: fcluster's maxclust cut can make fewer clusters when
    merge heights tie (duplicate vectors, e.g. repeated tokens), never more."""
    _check(pool_factor, protected)
    rest = max(n - protected, 0)
    k = max(rest // pool_factor, 1)
    return n if k >= rest else n - rest + k


def pool_tokens(vectors: np.ndarray, pool_factor: int, protected: int = 0, *, legacy: bool = False) -> np.ndarray:
    """[n, C] one passage's ColBERT vectors -> [m, C] float32 pooled (m <= pooled_count(n, ...)), PyLate's
    pool_embeddings_hierarchical: Ward clustering of the cosine distances 1 - x_i·x_j into max(n // pool_factor, 1)
    clusters, each replaced by its mean (not re-normalised), in fcluster's label order. pool_factor 1 returns the
    vectors unchanged. protected: leading vectors kept as they are, first (PyLate protects 1, its [CLS]; BGE-M3's
    ColBERT output has no [CLS] vector, so m3jax protects none). float16 / float32 in; distances in float32 as PyLate
    (torch float32), linkage in float64 (scipy), means accumulated in float64. legacy: PyLate <= 1.4.0 (square
    distance matrix as observations, protected vectors last)."""
    from scipy.cluster import hierarchy
    from scipy.spatial import distance

    _check(pool_factor, protected)
    x = np.asarray(vectors)
    if x.ndim != 2:
        raise ValueError(f"vectors must have shape [n, C], got {x.shape}")
    x = x.astype(np.float32)
    head, rest = x[:protected], x[protected:]
    n = len(rest)
    k = max(n // pool_factor, 1)
    if k >= n:
        return x
    dist = 1 - rest @ rest.T
    if legacy:
        y = distance.pdist(dist.astype(np.float64), "euclidean")
    else:
        y = dist[np.triu_indices(n, k=1)]
    labels = hierarchy.fcluster(hierarchy.linkage(y, method="ward"), t=k, criterion="maxclust") - 1
    counts = np.bincount(labels, minlength=k)
    sums = np.zeros((k, x.shape[1]))
    np.add.at(sums, labels, rest)
    keep = counts > 0
    pooled = (sums[keep] / counts[keep, None]).astype(np.float32)
    return np.concatenate([pooled, head] if legacy else [head, pooled])


__all__ = ["pool_tokens", "pooled_count"]
