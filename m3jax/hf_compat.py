"""The torch / Hugging Face surface that code written for FlagEmbedding's BGEM3FlagModel reads, without torch.

Clients (pymilvus-model, Xinference, LlamaIndex, export scripts; see the README's "Drop-in for FlagEmbedding") read
`len(model.tokenizer)`, call `model.tokenizer(texts, truncation=True, max_length=n).input_ids` and
`model.tokenizer.decode(ids)`, read sizes through `model.model.model.config.hidden_size` and
`model.model.colbert_linear.out_features`, and call `.item()` / `.numpy()` on `colbert_score`. This module gives
them those objects: `HFTokenizer` (the m3jax tokenizer plus XLMRobertaTokenizerFast's calls), `TorchLikeModel` (a
view over the NNX module shaped like FlagEmbedding's `model.model`), `ColbertScore`, and the keyword handling of
BGEM3's constructor and encode.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from m3jax.config import M3Config
from m3jax.tokenizer import _CLEANUP, Tokenizer

logger = logging.getLogger("m3jax")

# ---------------------------------------------------------------------------------------------------- keywords
# FlagEmbedding's encode forwards its **kwargs to both tokenizer(...) and tokenizer.pad(...), so only keywords both
# accept get through (the rest raise TypeError there too). These leave FlagEmbedding's outputs unchanged; m3jax
# accepts them and ignores them. padding_side="left" also gets through FlagEmbedding, but changes its dense output
# (the CLS position then holds padding), which m3jax does not reproduce: it is refused with the other values.
ENCODE_NO_EFFECT = {"convert_to_numpy": None, "pad_to_multiple_of": None, "verbose": None,
                    "return_attention_mask": (True,), "padding_side": ("right",)}
_warned_encode: set[str] = set()


def check_encode_kwargs(method: str, kwargs: Mapping[str, Any]) -> None:
    """Accepts (warning once per name) the encode keywords FlagEmbedding accepts without effect; TypeError else."""
    for name, value in kwargs.items():
        allowed = ENCODE_NO_EFFECT.get(name, ())
        if name not in ENCODE_NO_EFFECT or (allowed is not None and value not in allowed):
            hint = (f" (only {name}={allowed[0]!r} is accepted)" if allowed
                    else " (FlagEmbedding forwards it to the tokenizer, which rejects it too)")
            raise TypeError(f"{method}() got an unexpected keyword argument {name}={value!r:.40}{hint}")
        if name not in _warned_encode:
            _warned_encode.add(name)
            logger.warning("%s(): keyword %s has no effect in m3jax (accepted for FlagEmbedding compatibility)",
                           method, name)


def merge_device_kwargs(devices: Any, device: Any) -> Any:
    """FlagEmbedding 1.2's `device=` and 1.4's `devices=` as one device spec; torch.device objects become
    "type:index" strings (duck-typed: anything with str `.type` and int-or-None `.index`)."""
    if device is not None and devices is not None and _device_spec(device) != _device_spec(devices):
        logger.warning("both devices=%r and device=%r given: using devices", devices, device)
    return _device_spec(devices if devices is not None else device)


def _device_spec(d: Any) -> Any:
    if isinstance(d, (list, tuple)):
        return [_device_spec(x) for x in d]
    kind, index = getattr(d, "type", None), getattr(d, "index", None)
    if isinstance(kind, str) and (index is None or isinstance(index, int)) and not isinstance(d, str):
        return kind if index is None else f"{kind}:{index}"
    return d


def accept_unknown_kwargs(obj: Any, kwargs: Mapping[str, Any]) -> None:
    """FlagEmbedding's constructor sets every extra keyword as an attribute and otherwise ignores it; so does
    m3jax, with one warning naming them. Names of BGEM3 methods or properties are not set (they would break it)."""
    if not kwargs:
        return
    clash = sorted(k for k in kwargs if hasattr(type(obj), k))
    logger.warning("%s: unused keyword argument(s) %s kept as attributes and otherwise ignored, as FlagEmbedding "
                   "does%s",
                   type(obj).__name__, ", ".join(f"{k}={v!r:.40}" for k, v in kwargs.items()),
                   f" (not set, they name methods: {', '.join(clash)})" if clash else "")
    for k, v in kwargs.items():
        if k not in clash:
            setattr(obj, k, v)


# --------------------------------------------------------------------------------------------------- scores
class ColbertScore(np.float32):
    """np.float32 with the torch calls clients make on FlagEmbedding's 0-d tensor: `.numpy()`, `.cpu()`,
    `.detach()` (`.item()`, `.tolist()` and `float()` are numpy's own)."""

    def numpy(self) -> np.ndarray:
        return np.asarray(self, dtype=np.float32)  # 0-d, as torch's Tensor.numpy() of a 0-d tensor

    def cpu(self) -> ColbertScore:
        return self

    def detach(self) -> ColbertScore:
        return self


# ------------------------------------------------------------------------------------------------ tokenizer
_SPECIAL_DEFAULTS = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "sep_token": "</s>",
                     "pad_token": "<pad>", "cls_token": "<s>", "mask_token": "<mask>"}
_TRUNCATION = {True: "longest_first", "longest_first": "longest_first", "only_first": "only_first",
               "only_second": "only_second"}
_PADDING = {True: "longest", "longest": "longest", "max_length": "max_length"}


class BatchEncoding(dict):
    """transformers' BatchEncoding as far as clients use it: a dict whose keys are also attributes."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(f"BatchEncoding has no {name!r}; keys: {sorted(self)}") from None

    @property
    def data(self) -> dict:
        return dict(self)


class HFTokenizer(Tokenizer):
    """m3jax's Tokenizer plus the calls clients make on FlagEmbedding's XLMRobertaTokenizerFast.

    Same library (`tokenizers`) and files as transformers' fast tokenizer, so ids, tokens and text agree with it
    exactly (tests/test_clients.py checks each call). `encode(texts: list, max_length)` keeps m3jax's batched
    contract; `encode(text: str, ...)` is transformers' single-text form (a list of ids).
    Not provided: offsets and overflow outputs, `apply_chat_template`, `return_tensors="tf"`.
    """

    padding_side = "right"
    truncation_side = "right"
    is_fast = True
    model_input_names = ["input_ids", "attention_mask"]

    def __init__(self, directory, *, share: Tokenizer | None = None):
        super().__init__(directory, share=share)
        directory = Path(directory)
        self.name_or_path = str(directory)
        self._directory = directory
        cfg = {}
        for name in ("tokenizer_config.json", "special_tokens_map.json"):
            if (directory / name).is_file():
                cfg.update(json.loads((directory / name).read_text()))
        self.model_max_length = int(cfg.get("model_max_length", 8192))
        self.special_tokens_map = {k: _content(cfg.get(k, v)) for k, v in _SPECIAL_DEFAULTS.items()}
        for k, v in self.special_tokens_map.items():
            setattr(self, k, v)
            setattr(self, f"{k}_id", self._tok.token_to_id(v))
        self.all_special_tokens = list(dict.fromkeys(self.special_tokens_map.values()))
        self.all_special_ids = [self._tok.token_to_id(t) for t in self.all_special_tokens]

    def __len__(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def __repr__(self) -> str:
        return f"HFTokenizer(name_or_path={self.name_or_path!r}, vocab_size={len(self)})"

    def get_vocab(self) -> dict[str, int]:
        return self._tok.get_vocab(with_added_tokens=True)

    def __call__(self, text: str | Sequence[str], text_pair: str | Sequence[str] | None = None, *,
                 add_special_tokens: bool = True, padding: bool | str = False, truncation: bool | str | None = None,
                 max_length: int | None = None, stride: int = 0, pad_to_multiple_of: int | None = None,
                 return_tensors: str | None = None, return_token_type_ids: bool | None = None,
                 return_attention_mask: bool | None = None, return_special_tokens_mask: bool = False,
                 return_length: bool = False, verbose: bool = True) -> BatchEncoding:
        """tokenizer(text or list of texts[, pairs]) -> {"input_ids", "attention_mask"} lists (one text) or
        lists of lists; padded, with return_tensors "np" / "pt" / "jax", as arrays [N, T]."""
        del verbose
        single = isinstance(text, str)
        texts = [text] if single else text
        if not isinstance(texts, (list, tuple)) or not all(isinstance(t, str) for t in texts):
            raise TypeError(f"text must be a str or a list of str, got {type(text).__name__}")
        pairs = None
        if text_pair is not None:
            pairs = [text_pair] if isinstance(text_pair, str) else list(text_pair)
            if len(pairs) != len(texts) or not all(isinstance(t, str) for t in pairs):
                raise ValueError(f"text_pair must match text: {len(pairs)} pairs for {len(texts)} texts")
        inputs = list(zip(texts, pairs, strict=True)) if pairs is not None else list(texts)
        with self._lock:
            encs = self._configured(padding, truncation, max_length, stride, pad_to_multiple_of).encode_batch(
                inputs, add_special_tokens=add_special_tokens)
        out = {"input_ids": [e.ids for e in encs]}
        if return_token_type_ids:
            out["token_type_ids"] = [e.type_ids for e in encs]
        if return_attention_mask is not False:
            out["attention_mask"] = [e.attention_mask for e in encs]
        if return_special_tokens_mask:
            out["special_tokens_mask"] = [e.special_tokens_mask for e in encs]
        if return_length:
            out["length"] = [len(e.ids) for e in encs]
        if single:  # transformers keeps `length` a list for one text
            out = {k: (v if k == "length" else v[0]) for k, v in out.items()}
        return BatchEncoding({k: _as_tensor(v, return_tensors, k) for k, v in out.items()})

    def _configured(self, padding, truncation, max_length, stride, pad_to_multiple_of):
        tok = self._tok
        if truncation is None and max_length is not None:
            truncation = True  # transformers: max_length without truncation truncates (with a warning)
        if truncation not in (None, False, "do_not_truncate"):
            if truncation not in _TRUNCATION:
                raise ValueError(f"truncation must be a bool or one of {sorted(map(str, _TRUNCATION))}, "
                                 f"got {truncation!r}")
            tok.enable_truncation(max_length or self.model_max_length, stride=stride,
                                  strategy=_TRUNCATION[truncation], direction=self.truncation_side)
        else:
            tok.no_truncation()
        if padding not in (False, None, "do_not_pad"):
            if padding not in _PADDING:
                raise ValueError(f"padding must be a bool, 'longest' or 'max_length', got {padding!r}")
            length = (max_length or self.model_max_length) if _PADDING[padding] == "max_length" else None
            tok.enable_padding(direction=self.padding_side, pad_id=self.pad_token_id, pad_token=self.pad_token,
                               length=length, pad_to_multiple_of=pad_to_multiple_of)
        else:
            tok.no_padding()
        return tok

    def encode(self, texts, max_length=None, **kwargs):
        """Batched m3jax form `encode(list_of_texts, max_length)` (see Tokenizer.encode), or transformers'
        `encode(text: str, add_special_tokens=True, truncation=..., max_length=...)` -> list of ids."""
        if isinstance(texts, str):
            return self(texts, max_length=max_length, **kwargs)["input_ids"]
        if kwargs or max_length is None:
            raise TypeError("encode(list_of_texts, max_length) is m3jax's batched form; for transformers' form "
                            "pass one str, or call the tokenizer on the list")
        return super().encode(texts, max_length)

    def save_pretrained(self, save_directory) -> tuple[str, ...]:
        """Copies the tokenizer's files (tokenizer.json and the configs it came with) into save_directory, which
        transformers' AutoTokenizer.from_pretrained then loads as FlagEmbedding's tokenizer."""
        import shutil

        from m3jax.checkpoint import TOKENIZER_FILES

        dst = Path(save_directory)
        if dst.is_file():
            raise ValueError(f"save_directory {dst}: is a file, expected a directory")
        dst.mkdir(parents=True, exist_ok=True)
        written = []
        for name in TOKENIZER_FILES:
            if (self._directory / name).is_file():
                shutil.copyfile(self._directory / name, dst / name)
                written.append(str(dst / name))
        return tuple(written)

    def tokenize(self, text: str, pair: str | None = None, add_special_tokens: bool = False) -> list[str]:
        with self._lock:
            return self._plain(None).encode(text, pair, add_special_tokens=add_special_tokens).tokens

    def pad(self, encoded_inputs: Mapping | Sequence[Mapping], padding: bool | str = True,
            max_length: int | None = None, pad_to_multiple_of: int | None = None,
            return_attention_mask: bool | None = None, return_tensors: str | None = None,
            verbose: bool = True) -> BatchEncoding:
        """Right-pads {"input_ids": [[...], ...]} (or a list of such dicts) as transformers' tokenizer.pad."""
        del verbose
        if isinstance(encoded_inputs, (list, tuple)):
            encoded_inputs = {k: [row[k] for row in encoded_inputs] for k in (encoded_inputs[0] if
                                                                              encoded_inputs else {})}
        rows = [list(np.asarray(r).tolist()) for r in encoded_inputs["input_ids"]]
        masks = encoded_inputs.get("attention_mask")
        masks = [[1] * len(r) for r in rows] if masks is None else [list(np.asarray(m).tolist()) for m in masks]
        target = max((len(r) for r in rows), default=0)
        if padding == "max_length":
            target = max_length or self.model_max_length
        elif padding in (False, "do_not_pad"):
            target = 0
        if target and pad_to_multiple_of:
            target = -(-target // pad_to_multiple_of) * pad_to_multiple_of
        out = {"input_ids": [r + [self.pad_token_id] * (target - len(r)) for r in rows]}
        if return_attention_mask is not False:
            out["attention_mask"] = [list(m) + [0] * (target - len(m)) for m in masks]
        return BatchEncoding({k: _as_tensor(v, return_tensors, k) for k, v in out.items()})

    def decode(self, token_ids, skip_special_tokens: bool = False,
               clean_up_tokenization_spaces: bool | None = None) -> str:
        ids = _id_list(token_ids)
        text = self._tok.decode(ids, skip_special_tokens=skip_special_tokens)
        if self.cleanup if clean_up_tokenization_spaces is None else clean_up_tokenization_spaces:
            text = _clean_up(text)
        return text

    def batch_decode(self, sequences, skip_special_tokens: bool = False,
                     clean_up_tokenization_spaces: bool | None = None) -> list[str]:
        return [self.decode(s, skip_special_tokens, clean_up_tokenization_spaces) for s in _id_list(sequences,
                                                                                                   nested=True)]

    def convert_ids_to_tokens(self, ids, skip_special_tokens: bool = False):
        if isinstance(ids, (int, np.integer)):
            return self._tok.id_to_token(int(ids))
        skip = set(self.all_special_ids) if skip_special_tokens else set()
        return [self._tok.id_to_token(i) for i in _id_list(ids) if i not in skip]

    def convert_tokens_to_ids(self, tokens):
        def one(t):
            i = self._tok.token_to_id(t)
            return self.unk_token_id if i is None else i

        return one(tokens) if isinstance(tokens, str) else [one(t) for t in tokens]


def _content(token: Any) -> str:
    return token["content"] if isinstance(token, dict) else str(token)


def _clean_up(text: str) -> str:
    for a, b in _CLEANUP:
        text = text.replace(a, b)
    return text


def _id_list(ids: Any, nested: bool = False) -> list:
    """ints, lists, numpy arrays and torch tensors (anything with .tolist()) as a list of int (of lists)."""
    if hasattr(ids, "tolist"):
        ids = ids.tolist()
    if isinstance(ids, int):
        return [ids]
    if nested:
        return [_id_list(x) for x in ids]
    return [int(i) for i in ids]


def _as_tensor(value: list, return_tensors: str | None, key: str):
    if return_tensors is None:
        return value
    if return_tensors not in ("np", "pt", "jax"):
        raise ValueError(f"return_tensors must be None, 'np', 'pt' or 'jax', got {return_tensors!r}")
    try:
        arr = np.asarray(value, dtype=np.int64)
    except ValueError:
        raise ValueError(f"{key}: rows of different lengths cannot become a tensor; pass padding=True") from None
    if return_tensors == "pt":
        import torch

        return torch.from_numpy(arr)
    if return_tensors == "jax":
        import jax.numpy as jnp

        return jnp.asarray(arr)
    return arr


# ---------------------------------------------------------------------------------------------------- model
class HFConfigView:
    """transformers' XLMRobertaConfig attributes (`hidden_size`, `num_hidden_layers`, `vocab_size`, ...) of an
    M3Config, read-only."""

    def __init__(self, cfg: M3Config):
        self.__dict__.update(cfg.to_hf_config())

    def to_dict(self) -> dict:
        return dict(self.__dict__)

    def __repr__(self) -> str:
        return f"HFConfigView({self.__dict__})"


class EncoderOutput(tuple):
    """(last_hidden_state,) with `.last_hidden_state`, as transformers' BaseModelOutput indexes and reads."""

    @property
    def last_hidden_state(self):
        return self[0]

    def __getitem__(self, key):
        return self.last_hidden_state if key == "last_hidden_state" else tuple.__getitem__(self, key)


class EncoderView:
    """FlagEmbedding's `model.model.model` (the XLMRobertaModel): `.config`, and a call
    `(input_ids=, attention_mask=, return_dict=True)` returning `.last_hidden_state` [B, T, D] (a jax array)."""

    def __init__(self, module):
        self._module = module
        self.config = HFConfigView(module.config)

    def __getattr__(self, name: str) -> Any:  # embeddings, encoder: the NNX submodules
        if name == "_module":  # not yet set (copy, unpickling)
            raise AttributeError(name)
        return getattr(self._module, name)

    def eval(self) -> EncoderView:
        return self

    def __call__(self, input_ids=None, attention_mask=None, return_dict: bool = True, **kwargs) -> EncoderOutput:
        from flax import nnx

        from m3jax.model import forward

        for k, v in kwargs.items():  # accepted only where they change nothing
            if k == "token_type_ids" and (v is None or not _to_numpy(v).any()) or (
                    k in ("output_hidden_states", "output_attentions") and not v):
                continue
            raise TypeError(f"m3jax's encoder view takes input_ids and attention_mask only, got {k}={v!r:.40}")
        if input_ids is None:
            raise TypeError("input_ids is required")
        ids = _to_numpy(input_ids).astype(np.int32)
        mask = np.ones_like(ids) if attention_mask is None else _to_numpy(attention_mask).astype(np.int32)
        if ids.ndim != 2 or mask.shape != ids.shape:
            raise ValueError(f"input_ids must be [B, T] with attention_mask of the same shape, got {ids.shape} "
                             f"and {mask.shape}")
        graphdef, state = nnx.split(self._module)
        h = forward(graphdef, state, ids, mask).last_hidden_state
        return EncoderOutput((h,)) if return_dict else (h,)


class TorchLikeModel:
    """FlagEmbedding's `model.model` as clients read it, over m3jax's NNX module (`.nnx`).

    `.model` is the encoder view (`.model.config.hidden_size`); `colbert_linear` / `sparse_linear` are the NNX
    Linear layers (`in_features`, `out_features`; `.kernel` [in, out], not torch's `.weight` [out, in]);
    `eval()` returns the view (inference has no dropout); `tokenizer` is the BGEM3's. Any other attribute, and
    calling it, go to the NNX module (`BGEM3Model.__call__(input_ids, attention_mask)`). Pass `.nnx` (or
    `BGEM3.nnx_model`) to nnx.split / nnx.state.
    """

    def __init__(self, module, tokenizer):
        self.nnx = module
        self.model = EncoderView(module)
        self.tokenizer = tokenizer

    def __getattr__(self, name: str) -> Any:
        if name == "nnx":  # not yet set (copy, unpickling)
            raise AttributeError(name)
        return getattr(self.nnx, name)

    def __call__(self, *args, **kwargs):
        return self.nnx(*args, **kwargs)

    def eval(self) -> TorchLikeModel:
        return self

    def __repr__(self) -> str:
        return f"TorchLikeModel(over {type(self.nnx).__name__}, config={self.nnx.config})"


def _to_numpy(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):  # a torch tensor
        x = x.detach().cpu().numpy()
    return np.asarray(x)

