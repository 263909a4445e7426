"""A synthetic multilingual retrieval task that a model can learn, for the learning test and the fine-tuning notebook.

Six scripts; each has 12 common and 30 rare pseudo-words (m3jax.pseudowords). A passage is 3 rare words of
its script plus 6 common ones; its query is 2 of its rare words plus 3 common ones. Training rows are random
combinations, each with 7 negatives of the same script; the held-out set (36 passages by default) uses each rare word
in exactly one passage, and no held-out passage is a training passage. What transfers is the skill, not the answers:
match on the rare words, ignore the common ones (which every passage of a script shares). Queries share words with
their passage, so even a random model is above chance (lexical overlap).
"""

from __future__ import annotations

import random

from m3jax.pseudowords import SCRIPTS, PseudoWords


def retrieval_task(seed: int = 0, train: int = 480, held_out: int = 36) -> tuple[list[dict], list[str], list[str]]:
    """(training rows in FlagEmbedding's format, held-out passages, held-out queries; query i's answer is passage
    i). held_out is at most 60 (each of 6 scripts has 30 rare words, 3 per passage)."""
    if not 1 <= held_out <= 60:
        raise ValueError(f"held_out must be in 1 ... 60, got {held_out}")
    rng = random.Random(seed)
    fresh = PseudoWords(rng)
    common = {s: [fresh(s) for _ in range(12)] for s in SCRIPTS}
    rare = {s: [fresh(s) for _ in range(30)] for s in SCRIPTS}

    def make(s, own):
        words, query = own + rng.sample(common[s], 6), own[:2] + rng.sample(common[s], 3)
        rng.shuffle(words)
        rng.shuffle(query)
        return " ".join(words), " ".join(query)

    pools = {s: rng.sample(rare[s], 30) for s in SCRIPTS}
    test = [make(SCRIPTS[i % 6], [pools[SCRIPTS[i % 6]].pop() for _ in range(3)]) for i in range(held_out)]
    pairs = [make(SCRIPTS[i % 6], rng.sample(rare[SCRIPTS[i % 6]], 3)) for i in range(train)]
    seen = {frozenset(p.split()) for p, _ in test}
    pairs = [(p, q) for p, q in pairs if frozenset(p.split()) not in seen]
    rows = [{"query": q, "pos": [p], "neg": [pairs[j][0] for j in range(i % 6, len(pairs), 6) if j != i][:7]}
            for i, (p, q) in enumerate(pairs)]
    return rows, [p for p, _ in test], [q for _, q in test]
