"""Helpers shared by the tests (the only module tests import from, with tests/parity.py for torch parity):
deterministic multilingual texts, synthetic encode outputs, and the CorpusIndex cases run on 1, 4 and 8 devices."""

import random

import jax
import numpy as np

from m3jax.index import CorpusIndex

# ------------------------------------------------------------------------------------------------ texts
SENTENCES = [
    "What is BGE M3?",
    "Defination of BM25",
    "BGE M3 is an embedding model supporting dense retrieval, lexical matching and multi-vector interaction.",
    "BM25 is a bag-of-words retrieval function that ranks a set of documents based on the query terms.",
    "北京是中华人民共和国的首都，也是全国的政治和文化中心。",
    "Берлин — столица и крупнейший город Германии.",
    "東京は日本の首都であり、世界最大級の都市圏を持つ。",
    "القاهرة هي عاصمة جمهورية مصر العربية وأكبر مدنها.",
    "La tour Eiffel est une tour de fer puddlé de 330 m de hauteur située à Paris.",
    "Der schnelle braune Fuchs springt über den faulen Hund.",
    "सूर्य पृथ्वी से लगभग 15 करोड़ किलोमीटर दूर है।",
    "서울은 대한민국의 수도이다.",
    "Ο Παρθενώνας είναι ναός στην Ακρόπολη της Αθήνας.",
    "🤖 Robots 🚀 and emoji 😀 in one line ✨",
]


def long_text(n_words: int = 1500, seed: int = 0) -> str:
    """A multilingual document of roughly n_words words (well over 2,000 tokens for 1,500 words)."""
    rng = random.Random(seed)
    words = " ".join(SENTENCES).split()
    return " ".join(rng.choice(words) for _ in range(n_words))


def mixed(n: int, seed: int = 0, max_words: int = 60) -> list[str]:
    rng = random.Random(seed)
    words = " ".join(SENTENCES).split()
    return [" ".join(rng.choice(words) for _ in range(rng.randint(1, max_words))) for _ in range(n)]


# ---------------------------------------------------------------------------------------- synthetic vectors
SPECIAL = (0, 1, 2, 3)  # <s>, <pad>, </s>, <unk>: what FlagEmbedding drops from lexical weights
SMALL_VOCAB = 60  # small, so that random queries and passages share ids


# ------------------------------------------------------------------------------------------------ synthetic data
def make_dense(rng, n, d=16):
    x = rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def make_tokens(rng, n, lo, hi, vocab=SMALL_VOCAB):
    """Raw token sequences (with repeats and special ids) and ReLU'd per-token weights, as the sparse head sees."""
    out = []
    for _ in range(n):
        t = int(rng.integers(lo, hi + 1))
        ids = rng.integers(4, vocab, t)
        ids[rng.random(t) < 0.15] = rng.choice(SPECIAL)
        ids[rng.random(t) < 0.2] = ids[0]  # repeated tokens: only their max weight counts
        w = np.maximum(rng.standard_normal(t).astype(np.float32), 0.0)
        out.append((np.concatenate([[0], ids, [2]]), np.concatenate([[0.7], w, [0.5]]).astype(np.float32)))
    return out


def pad_lexical(tokens, k=None):
    """The encode pipeline's padded (ids [N, K] -1-padded, weights [N, K]): max per id, specials and zeros dropped."""
    rows = []
    for ids, w in tokens:
        best = {}
        for i, wi in zip(ids.tolist(), w.tolist(), strict=True):
            if i not in SPECIAL and wi > 0:
                best[i] = max(best.get(i, 0.0), wi)
        rows.append(best)
    k = k or max(1, max(len(r) for r in rows))
    ids = np.full((len(rows), k), -1, np.int32)
    weights = np.zeros((len(rows), k), np.float32)
    for r, best in enumerate(rows):
        ids[r, : len(best)] = list(best)
        weights[r, : len(best)] = list(best.values())
    return ids, weights


def make_sparse(rng, n, lo, hi, k=None, vocab=SMALL_VOCAB):
    return pad_lexical(make_tokens(rng, n, lo, hi, vocab), k)


def make_colbert(rng, n, lo, hi, t=None, c=12):
    """Normalised token vectors [N, T, C] with zero rows past each length, and the mask [N, T]."""
    t = t or hi
    lengths = rng.integers(lo, hi + 1, n)
    x = rng.standard_normal((n, t, c)).astype(np.float32)
    x /= np.linalg.norm(x, axis=-1, keepdims=True)
    mask = np.arange(t)[None] < lengths[:, None]
    return x * mask[..., None], mask


def lexical_dicts(ids, weights):
    """FlagEmbedding's lexical_weights: {str(token id): np.float32 weight}."""
    return [{str(i): np.float32(w) for i, w in zip(r_ids, r_w, strict=True) if i >= 0}
            for r_ids, r_w in zip(ids, weights, strict=True)]


# ------------------------------------------------------------------------------------------ CorpusIndex cases
def random_data(seed=0, n=61, q=7):
    rng = np.random.default_rng(seed)
    p_ids, p_w = make_sparse(rng, n, 3, 30)
    q_ids, q_w = make_sparse(rng, q, 2, 10)
    p_col, p_mask = make_colbert(rng, n, 1, 20)
    q_col, q_mask = make_colbert(rng, q, 1, 6)
    corpus = dict(dense=make_dense(rng, n), sparse_ids=p_ids, sparse_weights=p_w, colbert=p_col, colbert_mask=p_mask)
    queries = dict(dense=make_dense(rng, q), sparse_ids=q_ids, sparse_weights=q_w, colbert=q_col, colbert_mask=q_mask)
    return corpus, queries


def tie_data(n=40):
    """Exact ties everywhere: doc i is one of 4 one-hot patterns (i % 4), so every score is exact in float32."""
    eye = np.eye(8, dtype=np.float32)
    group = np.arange(n) % 4
    colbert = np.zeros((n, 3, 8), np.float32)
    colbert[:, 0] = eye[group]
    mask = np.zeros((n, 3), bool)
    mask[:, 0] = True
    corpus = dict(dense=eye[group], sparse_ids=np.stack([group + 10, np.full(n, -1)], 1).astype(np.int32),
                  sparse_weights=np.stack([np.full(n, 0.5), np.zeros(n)], 1).astype(np.float32),
                  colbert=colbert, colbert_mask=mask)
    # Query 0 prefers group 1 then group 0; query 1 scores every document equally (all ties).
    qd = np.stack([0.25 * eye[0] + 0.5 * eye[1], 0.5 * (eye[0] + eye[1] + eye[2] + eye[3])]).astype(np.float32)
    queries = dict(dense=qd, sparse_ids=np.array([[11, 10], [10, -1]], np.int32),
                   sparse_weights=np.array([[1.0, 0.5], [0.25, 0.0]], np.float32),
                   colbert=qd[:, None].repeat(2, 1), colbert_mask=np.array([[True, False], [True, True]]))
    return corpus, queries


CASES = [  # (name, search kwargs); every case runs on the random and on the tie data
    ("dense", dict(mode="dense", k=5)),
    ("sparse", dict(mode="sparse", k=5)),
    ("colbert", dict(mode="colbert", k=5)),
    ("colbert0", dict(mode="colbert", k=5, zero_floor=True)),
    ("hybrid", dict(mode="hybrid", k=4, candidates=12)),
    ("hybrid_ds", dict(mode="hybrid", k=4, candidates=12, first_stage="dense+sparse", weights=(0.5, 1.0, 2.0))),
    ("all", dict(mode="dense", k=None)),  # k = num_docs: every real document exactly once, no padding row
]


def run_cases(devices=None, chunk_size=8):
    out = {}
    for data_name, (corpus, queries) in (("random", random_data()), ("ties", tie_data())):
        index = CorpusIndex(**corpus, devices=devices, chunk_size=chunk_size)
        for name, kw in CASES:
            kw = dict(kw, k=kw["k"] or index.num_docs)
            scores, ids = index.search(queries, batch_size=3, **kw)
            out[f"{data_name}/{name}/scores"], out[f"{data_name}/{name}/ids"] = scores, ids
    return out


def multi_device_cases(path):
    """Run in a subprocess with 8 forced host devices: the cases on 4 and on 8 devices, written to path (npz)."""
    devices = jax.local_devices()
    assert len(devices) == 8, devices
    out = {}
    for ndev in (4, 8):
        index = CorpusIndex(**random_data()[0], devices=devices[:ndev], chunk_size=8)
        assert len(index.corpus["dense"].sharding.device_set) == ndev
        assert index.corpus["dense"].shape[0] % ndev == 0
        out.update({f"{ndev}/{key}": value for key, value in run_cases(devices[:ndev]).items()})
    np.savez(path, **out)
