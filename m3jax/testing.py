"""Random checkpoints in the exact BAAI/bge-m3 release layout, for parity tests and benchmarks.

Every parameter is randomised (LayerNorm scales and all biases included) so that no mapping mistake can hide
behind an initial value of 0 or 1; the heads are stored in float16 like the release. Needs torch and transformers.
"""

from __future__ import annotations

import os
from pathlib import Path

from m3jax.config import M3Config
from m3jax.random_weights import random_m3jax_dir, write_tokenizer, xlmr_tokenizer_json

__all__ = ["random_m3jax_dir", "write_random_release", "write_tokenizer", "xlmr_tokenizer_json"]


def write_random_release(dst: str | os.PathLike, cfg: M3Config, *, seed: int = 0,
                         weights_format: str = "safetensors", roberta_prefix: bool = False) -> Path:
    """Writes a randomly initialised checkpoint in the release layout and returns its directory.

    weights_format: "safetensors" or "bin". roberta_prefix: store encoder keys as `roberta.*` (as some
    fine-tuned exports do). The pooler is written, as in the release, though BGE-M3 never uses it.
    """
    import torch
    from transformers import XLMRobertaConfig, XLMRobertaModel

    dst = Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    hf = XLMRobertaConfig(**cfg.to_hf_config())
    with torch.device("meta"):
        model = XLMRobertaModel(hf)
    model = model.to_empty(device="cpu")
    with torch.no_grad():  # to_empty leaves the non-persistent id buffers uninitialised
        for name, buf in model.named_buffers():
            buf.copy_(_random_like(name, buf, gen))
    state = {}
    for name, p in model.state_dict().items():
        state[name] = _random_like(name, p, gen)
    model.load_state_dict(state)
    d = cfg.hidden_size
    colbert_w = torch.randn(cfg.colbert_dim, d, generator=gen) / d**0.5
    sparse_w = torch.randn(1, d, generator=gen) / d**0.5
    # Centre the sparse head on real hidden states: with a random bias the ReLU can be dead (or always on) for
    # every token, and a lexical comparison would then test nothing.
    sample = _sample_ids(torch)
    with torch.no_grad():
        logits = (model.eval()(input_ids=sample).last_hidden_state @ sparse_w.half().float().T).flatten()
    sparse_b = -logits.median().reshape(1)
    if roberta_prefix:
        from safetensors.torch import save_file

        hf.save_pretrained(dst)
        save_file({f"roberta.{k}": v.contiguous() for k, v in state.items()}, str(dst / "model.safetensors"),
                  metadata={"format": "pt"})
    else:
        model.save_pretrained(dst, safe_serialization=(weights_format == "safetensors"))
    del model, state
    heads = {
        "colbert_linear": {"weight": colbert_w, "bias": 0.1 * torch.randn(cfg.colbert_dim, generator=gen)},
        "sparse_linear": {"weight": sparse_w, "bias": sparse_b},
    }
    for name, sd in heads.items():
        torch.save({k: v.half() for k, v in sd.items()}, dst / f"{name}.pt")
    write_tokenizer(dst)
    return dst


def write_random_reranker(dst: str | os.PathLike, cfg: M3Config, *, seed: int = 0) -> Path:
    """A randomly initialised re-ranker in bge-reranker-v2-m3's release layout (XLMRobertaForSequenceClassification,
    one label, model.safetensors, the XLM-R tokenizer), every parameter drawn (LayerNorm scales and biases too)."""
    import torch
    from transformers import XLMRobertaConfig, XLMRobertaForSequenceClassification

    dst = Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    hf = XLMRobertaConfig(**{**cfg.to_hf_config(), "architectures": ["XLMRobertaForSequenceClassification"]},
                          num_labels=1)
    model = XLMRobertaForSequenceClassification(hf)
    model.load_state_dict({name: _random_like(name, p, gen) for name, p in model.state_dict().items()})
    model.save_pretrained(dst, safe_serialization=True)
    write_tokenizer(dst)
    return dst


def _sample_ids(torch):
    """A few multilingual sentences as one row of XLM-R token ids."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(xlmr_tokenizer_json()))
    text = ("BGE M3 is an embedding model supporting dense retrieval. 北京是中华人民共和国的首都。 "
            "Берлин — столица Германии. La tour Eiffel est à Paris. 東京は日本の首都である。")
    return torch.tensor([tok.encode(text).ids])


def _random_like(name: str, p, gen):
    import torch

    if name.endswith("position_ids"):
        return torch.arange(p.shape[-1]).expand(p.shape).clone()
    if not p.dtype.is_floating_point:  # token_type_ids buffer
        return torch.zeros_like(p)
    if "LayerNorm.weight" in name:
        return 0.5 + torch.rand(p.shape, generator=gen)  # scales in [0.5, 1.5)
    if name.endswith("bias") or "LayerNorm" in name:
        return 0.1 * torch.randn(p.shape, generator=gen)
    if "embeddings" in name:
        return 0.5 * torch.randn(p.shape, generator=gen)
    return torch.randn(p.shape, generator=gen) / p.shape[1] ** 0.5  # Linear [out, in]: O(1) activations
