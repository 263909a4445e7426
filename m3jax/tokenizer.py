"""XLM-R tokenisation with the `tokenizers` library, truncating as FlagEmbedding's HF fast tokenizer does."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

# transformers' clean_up_tokenization, applied by decode() when tokenizer_config.json asks for it.
_CLEANUP = ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"), (" 'm", "'m"),
            (" 's", "'s"), (" 've", "'ve"), (" 're", "'re"))


class Tokenizer:
    """Batched encoding to id arrays with `<s> … </s>` kept under truncation."""

    def __init__(self, directory: str | os.PathLike):
        from tokenizers import Tokenizer as _HFTokenizer

        directory = Path(directory)
        path = directory / "tokenizer.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path}: missing; m3jax needs the model's tokenizer.json")
        self._tok = _HFTokenizer.from_file(str(path))
        self._tok.no_padding()
        self._tok.no_truncation()
        self._max_length: int | None = None
        cfg_path = directory / "tokenizer_config.json"
        cfg = json.loads(cfg_path.read_text()) if cfg_path.is_file() else {}
        self.cleanup = bool(cfg.get("clean_up_tokenization_spaces", False))
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, texts: list[str], max_length: int) -> tuple[list[np.ndarray], np.ndarray]:
        """(token ids per text, `<s>` and `</s>` included, at most max(max_length, 2) long; [N] bool truncated).

        tokenizers cannot truncate below the two special tokens (it then returns the text untruncated, and so
        does FlagEmbedding); m3jax keeps `<s></s>` instead, so no output ever exceeds the position table.
        """
        max_length = max(int(max_length), 2)
        if self._max_length != max_length:
            self._tok.enable_truncation(max_length)
            self._max_length = max_length
        encodings = self._tok.encode_batch(texts)
        ids = [np.asarray(e.ids, dtype=np.int32) for e in encodings]
        return ids, np.array([bool(e.overflowing) for e in encodings], dtype=bool)

    def decode_one(self, token_id: int) -> str:
        """transformers' `tokenizer.decode([token_id])`."""
        text = self._tok.decode([int(token_id)], skip_special_tokens=False)
        if self.cleanup:
            for a, b in _CLEANUP:
                text = text.replace(a, b)
        return text
