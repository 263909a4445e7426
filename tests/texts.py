"""Multilingual test inputs, generated deterministically (no data files)."""

import random

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
