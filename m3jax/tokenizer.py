"""XLM-R tokenisation with the `tokenizers` library, truncating as FlagEmbedding's HF fast tokenizer does."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import numpy as np

# transformers' clean_up_tokenization, applied by decode() when tokenizer_config.json asks for it.
_CLEANUP = ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"), (" 'm", "'m"),
            (" 's", "'s"), (" 've", "'ve"), (" 're", "'re"))


class Tokenizer:
    """Batched encoding to id arrays with `<s> … </s>` kept under truncation.

    share: another Tokenizer whose loaded `tokenizers` instance (and lock) this one uses instead of loading
    tokenizer.json again; XLM-R's 250k-entry vocabulary holds about 290 MB of memory per instance. Wrappers of one
    instance each set its truncation and padding, under the shared lock, before they encode.
    """

    def __init__(self, directory: str | os.PathLike, *, share: Tokenizer | None = None):
        directory = Path(directory)
        if share is not None:
            self._tok, self._lock = share._tok, share._lock
        else:
            from tokenizers import Tokenizer as _HFTokenizer

            path = directory / "tokenizer.json"
            if not path.is_file():
                raise FileNotFoundError(f"{path}: missing; m3jax needs the model's tokenizer.json")
            self._tok, self._lock = _HFTokenizer.from_file(str(path)), threading.Lock()
        cfg_path = directory / "tokenizer_config.json"
        cfg = json.loads(cfg_path.read_text()) if cfg_path.is_file() else {}
        self.cleanup = bool(cfg.get("clean_up_tokenization_spaces", False))
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, texts: list[str], max_length: int) -> tuple[list[np.ndarray], np.ndarray]:
        """(token ids per text, `<s>` and `</s>` included, at most max(max_length, 2) long; [N] bool truncated).

        tokenizers cannot truncate below the two special tokens (it then returns the text untruncated, and so
        does FlagEmbedding); m3jax keeps `<s></s>` instead, so no output ever exceeds the position table.
        """
        with self._lock:
            encodings = self._plain(max(int(max_length), 2)).encode_batch(texts)
        ids = [np.asarray(e.ids, dtype=np.int32) for e in encodings]
        return ids, np.array([bool(e.overflowing) for e in encodings], dtype=bool)

    def encode_plain(self, texts: list[str], max_length: int) -> list[np.ndarray]:
        """Token ids without `<s>`/`</s>`, at most max_length each (transformers' tokenizer(texts,
        add_special_tokens=False, truncation=True, max_length=max_length))."""
        with self._lock:
            encodings = self._plain(int(max_length)).encode_batch(texts, add_special_tokens=False)
        return [np.asarray(e.ids, dtype=np.int32) for e in encodings]

    def _plain(self, truncate: int | None):
        """The `tokenizers` instance without padding, truncating at `truncate` tokens (None: not at all), whatever
        another wrapper of it set last. Called under self._lock."""
        tok = self._tok
        if tok.padding is not None:
            tok.no_padding()
        if truncate is None:
            if tok.truncation is not None:
                tok.no_truncation()
        elif tok.truncation != {"max_length": truncate, "stride": 0, "strategy": "longest_first",
                                "direction": "right"}:
            tok.enable_truncation(truncate)
        return tok

    def decode_one(self, token_id: int) -> str:
        """transformers' `tokenizer.decode([token_id])`."""
        text = self._tok.decode([int(token_id)], skip_special_tokens=False)
        if self.cleanup:
            for a, b in _CLEANUP:
                text = text.replace(a, b)
        return text
