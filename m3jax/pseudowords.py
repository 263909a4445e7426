"""Pseudo-words in six scripts, for the synthetic datasets (m3jax.evaluate.synthetic, m3jax.train.synthetic).

Latin, Cyrillic, Greek and Arabic words are 2-3 consonant-vowel syllables; Han and Hangul words are two random
characters of the script's main block. They are strings the tokenizer splits like real words of those scripts, and
that no real text is likely to hold.
"""

from __future__ import annotations

import random

SCRIPTS = ("latin", "cyrillic", "greek", "arabic", "han", "hangul")
_SYLLABLES = {
    "latin": ("bdfgklmnprstvz", "aeiou"),
    "cyrillic": ("бвгдклмнпрст", "аеиоуя"),
    "greek": ("βγδκλμνπρστ", "αεηιου"),
    "arabic": ("بتجدرزسشصطعفقكلمنه", "اوي"),
}
_BLOCKS = {"han": (0x4E00, 0x9FA5), "hangul": (0xAC00, 0xD7A3)}


class PseudoWords:
    """Draws pseudo-words from rng, never the same one twice: `words = PseudoWords(rng); words("greek")`.

    The draws depend only on rng's state and the sequence of scripts asked for, so a seeded rng gives a dataset that
    is the same on every machine."""

    def __init__(self, rng: random.Random):
        self.rng = rng
        self.used: set[str] = set()

    def __call__(self, script: str) -> str:
        """A word of `script` (one of SCRIPTS) not returned before."""
        while (w := self._draw(script)) in self.used:
            pass
        self.used.add(w)
        return w

    def _draw(self, script: str) -> str:
        if script in _BLOCKS:
            lo, hi = _BLOCKS[script]
            return "".join(chr(self.rng.randrange(lo, hi)) for _ in range(2))
        cons, vows = _SYLLABLES[script]
        return "".join(self.rng.choice(cons) + self.rng.choice(vows) for _ in range(self.rng.randint(2, 3)))


__all__ = ["SCRIPTS", "PseudoWords"]
