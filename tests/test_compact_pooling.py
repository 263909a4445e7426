"""m3jax.compact.pool_tokens against PyLate's ColBERT.pool_embeddings_hierarchical, transcribed below with its torch
ops (PyLate itself is not a dependency): the current code (condensed distances, protected vectors first) and, with
legacy=True, the released code up to 1.4.0 (square distance matrix, protected vectors last). Same count, same order,
values to 1e-6."""

import numpy as np
import pytest
from scipy.cluster import hierarchy

from m3jax.compact import pool_tokens
from m3jax.compact.pooling import pooled_count

torch = pytest.importorskip("torch", reason="torch runs the PyLate transcription")


def pylate_pool(documents_embeddings, pool_factor=1, protected_tokens=1):
    """lightonai/pylate pylate/models/colbert.py, ColBERT.pool_embeddings_hierarchical at commit 1f1f47c (main,
    April 2026; this version since 06305e3, "Optimized hierarchical pooling function", #206), self dropped."""
    pooled_embeddings = []

    for document_embeddings in documents_embeddings:
        # Stay on CPU since scipy clustering requires CPU anyway
        document_embeddings_cpu = document_embeddings.cpu()

        # Separate protected tokens from the rest
        protected = document_embeddings_cpu[:protected_tokens]
        to_pool = document_embeddings_cpu[protected_tokens:]

        num_embeddings = len(to_pool)
        num_clusters = max(num_embeddings // pool_factor, 1)

        # Skip pooling if it wouldn't reduce anything
        if num_clusters >= num_embeddings:
            pooled_embeddings.append(document_embeddings_cpu)
            continue

        # Compute cosine similarity and convert to condensed distance matrix
        cos_sim = torch.mm(to_pool, to_pool.t()).numpy()
        dist_full = 1 - cos_sim
        # Extract upper triangle as condensed form for scipy linkage
        condensed = dist_full[np.triu_indices(num_embeddings, k=1)]

        # Hierarchical clustering
        linkage_matrix = hierarchy.linkage(condensed, method="ward")
        labels = hierarchy.fcluster(linkage_matrix, t=num_clusters, criterion="maxclust")

        # Vectorized cluster mean via scatter_add_
        labels_tensor = torch.from_numpy(labels.astype(np.int64)) - 1  # 0-indexed
        dim = to_pool.shape[1]
        cluster_sums = torch.zeros(num_clusters, dim, dtype=to_pool.dtype)
        cluster_counts = torch.zeros(num_clusters, dtype=torch.long)

        expanded_labels = labels_tensor.unsqueeze(1).expand_as(to_pool)
        cluster_sums.scatter_add_(0, expanded_labels, to_pool)
        cluster_counts.scatter_add_(0, labels_tensor, torch.ones(num_embeddings, dtype=torch.long))

        # fcluster may return fewer clusters than num_clusters requested,
        # leaving some rows in cluster_sums at zero. Filter those out.
        mask = cluster_counts > 0
        pooled = cluster_sums[mask] / cluster_counts[mask].unsqueeze(1)

        pooled_embeddings.append(torch.cat([protected, pooled], dim=0))

    return pooled_embeddings


def pylate_pool_v140(documents_embeddings, pool_factor=1, protected_tokens=1):
    """lightonai/pylate pylate/models/colbert.py, ColBERT.pool_embeddings_hierarchical at tag v1.4.0 (the latest
    release; the same clustering as Answer.AI's colbert pool_embeddings_hierarchical), self dropped."""
    device = torch.device(device="cuda" if torch.cuda.is_available() else "cpu")
    pooled_embeddings = []

    for document_embeddings in documents_embeddings:
        document_embeddings = document_embeddings.to(device=device)

        # Separate protected tokens from the rest
        protected_embeddings = document_embeddings[:protected_tokens]
        embeddings_to_pool = document_embeddings[protected_tokens:]

        # Compute cosine similarity and convert to distance matrix
        cosine_similarities = torch.mm(input=embeddings_to_pool, mat2=embeddings_to_pool.t())
        distance_matrix = 1 - cosine_similarities.cpu().numpy()

        # Perform hierarchical clustering using Ward's method
        clusters = hierarchy.linkage(distance_matrix, method="ward")
        num_embeddings = len(embeddings_to_pool)

        # Determine the number of clusters based on pool_factor
        num_clusters = max(num_embeddings // pool_factor, 1)
        cluster_labels = hierarchy.fcluster(clusters, t=num_clusters, criterion="maxclust")

        # Pool embeddings within each cluster
        pooled_document_embeddings = []
        for cluster_id in range(1, num_clusters + 1):
            cluster_indices = torch.where(condition=torch.tensor(data=cluster_labels == cluster_id, device=device))[0]
            if cluster_indices.numel() > 0:
                cluster_embedding = embeddings_to_pool[cluster_indices].mean(dim=0)
                pooled_document_embeddings.append(cluster_embedding)

        # Re-append protected embeddings
        pooled_document_embeddings.extend(protected_embeddings)
        pooled_embeddings.append(torch.stack(tensors=pooled_document_embeddings))

    return pooled_embeddings


def unit_vectors(n, c=48, seed=0):
    x = np.random.default_rng(seed).standard_normal((n, c)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.mark.parametrize("pool_factor", [1, 2, 3, 4])
@pytest.mark.parametrize("protected", [0, 1])
def test_equals_pylate(pool_factor, protected):
    for n in (1, 2, 5, 17, 64):
        x = unit_vectors(n, seed=n)
        want = pylate_pool([torch.from_numpy(x)], pool_factor=pool_factor, protected_tokens=protected)[0].numpy()
        got = pool_tokens(x, pool_factor, protected)
        assert got.dtype == np.float32 and got.shape == want.shape == (pooled_count(n, pool_factor, protected), 48)
        assert np.abs(got - want).max() <= 1e-6, (n, pool_factor, protected)


@pytest.mark.parametrize("pool_factor", [2, 3, 4])
@pytest.mark.parametrize("protected", [0, 1])
def test_legacy_equals_pylate_1_4_0(pool_factor, protected):
    # PyLate pools only for pool_factor > 1, and its 1.4.0 code fails on fewer than 2 vectors to pool.
    for n in (protected + 2, 5, 17, 64):
        x = unit_vectors(n, seed=100 + n)
        want = pylate_pool_v140([torch.from_numpy(x)], pool_factor=pool_factor, protected_tokens=protected)[0]
        got = pool_tokens(x, pool_factor, protected, legacy=True)
        assert got.shape == want.shape == (pooled_count(n, pool_factor, protected), 48)
        assert np.abs(got - want.numpy()).max() <= 1e-6, (n, pool_factor, protected)


def test_square_and_condensed_differ():
    """The two PyLate versions cluster differently: pinning one of them is a choice."""
    x = unit_vectors(64, seed=5)
    assert not np.allclose(pool_tokens(x, 4), pool_tokens(x, 4, legacy=True))


def test_identity_protected_and_small():
    x = unit_vectors(20, seed=6)
    np.testing.assert_array_equal(pool_tokens(x, 1), x)
    np.testing.assert_array_equal(pool_tokens(x.astype(np.float16), 1), x.astype(np.float16).astype(np.float32))
    got = pool_tokens(x, 3, protected=2)
    assert len(got) == pooled_count(20, 3, 2) == 2 + 6
    np.testing.assert_array_equal(got[:2], x[:2])
    # Pooled vectors are cluster means, not re-normalised: shorter than 1 unless a cluster is one vector.
    assert np.all(np.linalg.norm(got[2:], axis=1) <= 1 + 1e-6) and np.any(np.linalg.norm(got[2:], axis=1) < 0.99)
    np.testing.assert_array_equal(pool_tokens(x[:1], 4), x[:1])
    np.testing.assert_array_equal(pool_tokens(x[:3], 4, protected=3), x[:3])
    assert pooled_count(1, 4) == 1 and pooled_count(3, 4, protected=3) == 3 and pooled_count(2, 2) == 1


def test_fewer_clusters_on_ties():
    """maxclust gives fewer clusters than asked when merge heights tie: pooled_count is an upper bound."""
    e = np.eye(4, dtype=np.float32)
    x = np.concatenate([e[[0] * 4], e[[1] * 4]])  # two distinct vectors, four copies each: distances exactly 0, 1
    got = pool_tokens(x, 2)
    want = pylate_pool([torch.from_numpy(x)], pool_factor=2, protected_tokens=0)[0].numpy()
    assert pooled_count(8, 2) == 4 and len(got) == 2
    np.testing.assert_array_equal(got, want)


def test_bad_arguments():
    x = unit_vectors(4)
    for bad in (0, -1, 1.5, True, None):
        with pytest.raises(ValueError, match="pool_factor"):
            pool_tokens(x, bad)
        with pytest.raises(ValueError, match="pool_factor"):
            pooled_count(4, bad)
    with pytest.raises(ValueError, match="protected"):
        pool_tokens(x, 2, protected=-1)
    with pytest.raises(ValueError, match=r"\[n, C\]"):
        pool_tokens(x[None], 2)
