"""The cross-encoder re-ranker (bge-reranker-v2-m3 and its kind): XLM-RoBERTa with a sequence-classification head,
and `FlagReranker`, a drop-in for FlagEmbedding's (FlagEmbedding/inference/reranker/encoder_only/base.py).

    from m3jax import FlagReranker
    reranker = FlagReranker("BAAI/bge-reranker-v2-m3", use_fp16=True)
    reranker.compute_score([["what is panda?", "The giant panda is a bear native to China."]], normalize=True)

Weights are read from the release layout (`XLMRobertaForSequenceClassification`: `roberta.*` plus the classifier's
`dense` and `out_proj`). A pair is tokenised as FlagEmbedding does: the query truncated to query_max_length tokens
and the passage to max_length, then `<s> query </s></s> passage </s>`, the passage cut so the whole fits
max_length. Batches are planned, padded and compiled per bucket shape by the embedder's own planner
(m3jax.pipeline.plan_batches / make_batch).
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from m3jax import pipeline
from m3jax.attention import dropout
from m3jax.config import M3Config
from m3jax.model import Embeddings, TransformerStack, _linear, project, resolve_dtype
from m3jax.tokenizer import Tokenizer

CLASSIFIER = {"classifier.dense.weight": ("dense", "kernel"), "classifier.dense.bias": ("dense", "bias"),
              "classifier.out_proj.weight": ("out_proj", "kernel"), "classifier.out_proj.bias": ("out_proj", "bias")}


class RerankerModel(nnx.Module):
    """XLM-RoBERTa and RobertaClassificationHead: score = out_proj(tanh(dense(h[<s>]))), one logit per row. In
    training (a dropout key), the head drops its input and dense's output at the hidden rate, as the head does with
    classifier_dropout unset (the release's)."""

    def __init__(self, cfg: M3Config, *, dtype: Any = "float32", rngs: nnx.Rngs | None = None):
        rngs = rngs if rngs is not None else nnx.Rngs(0)
        dtype = resolve_dtype(dtype)
        self.config, self.dtype = cfg, dtype
        self.embeddings = Embeddings(cfg, dtype, rngs)
        self.encoder = TransformerStack(cfg, dtype, rngs)
        self.dense = _linear(cfg.hidden_size, cfg.hidden_size, dtype, rngs)
        self.out_proj = _linear(cfg.hidden_size, 1, dtype, rngs)

    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array, *, attn_impl: str = "auto",
                 projections: str = "xla", dropout_rng: jax.Array | None = None) -> jax.Array:
        """[B] float32 logits; dropout_rng: a key turns on dropout at the config's rates (training)."""
        r = [None] * 4 if dropout_rng is None else list(jax.random.split(dropout_rng, 4))
        h = self.encoder(self.embeddings(input_ids, r[0]), attention_mask.astype(bool), attn_impl, r[1], projections)
        rate = self.config.hidden_dropout_prob
        x = jnp.tanh(project(self.dense, dropout(h[:, 0], rate, r[2]).astype(self.dtype)))
        return project(self.out_proj, dropout(x, rate, r[3]))[:, 0].astype(jnp.float32)


@functools.partial(jax.jit, static_argnames=("graphdef", "attn_impl"))
def score_step(graphdef: nnx.GraphDef, state: nnx.State, input_ids: jax.Array, attention_mask: jax.Array, *,
               attn_impl: str = "auto") -> jax.Array:
    """[B] logits of one padded batch (compiled once per bucket shape)."""
    return nnx.merge(graphdef, state)(input_ids, attention_mask, attn_impl=attn_impl)


def read_reranker(src: str | os.PathLike, *, dtype: Any = "float32") -> tuple[M3Config, RerankerModel]:
    """A release-layout re-ranker directory (config.json, model.safetensors or pytorch_model.bin) as a model."""
    from m3jax import checkpoint, weights

    src = Path(src)
    cfg = M3Config.from_json_file(src / "config.json")
    hf = json.loads((src / "config.json").read_text())
    if hf.get("num_labels", len(hf.get("id2label", {0: ""}))) != 1:
        raise checkpoint.CheckpointError(f"{src}: a re-ranker has one label; config.json has "
                                         f"{hf.get('num_labels', len(hf.get('id2label', {})))}")
    files = {str(f): checkpoint._read_weight_file(f) for f in checkpoint._encoder_files(src)}
    head = {}
    encoder_files = {}
    for name, tensors in files.items():
        encoder_files[name] = {k: v for k, v in tensors.items() if k not in CLASSIFIER}
        head.update({k: np.asarray(tensors[k], np.float32) for k in CLASSIFIER if k in tensors})
    missing = sorted(set(CLASSIFIER) - set(head))
    if missing:
        raise checkpoint.CheckpointError(f"{src}: not a sequence-classification checkpoint: missing {missing}")
    params = weights.torch_to_params({k: checkpoint._LazyTensors(v) for k, v in encoder_files.items()}, cfg,
                                     heads=False)
    for key, (layer, leaf) in CLASSIFIER.items():
        params.setdefault(layer, {})[leaf] = head[key].T if leaf == "kernel" else head[key]
    return cfg, reranker_from_params(cfg, params, dtype=dtype)


def export_reranker(dst: str | os.PathLike, cfg: M3Config, params: Any, tokenizer_dir: str | os.PathLike, *,
                    overwrite: bool = False, metadata: dict | None = None) -> Path:
    """Writes a re-ranker's parameters in the release layout read_reranker and FlagEmbedding's FlagReranker load
    (XLMRobertaForSequenceClassification, one label, float32 model.safetensors), atomically; metadata, if given,
    as training_metadata.json beside them."""
    from safetensors.numpy import save_file

    from m3jax import checkpoint, weights
    from m3jax._io import atomic_dir

    params = jax.tree_util.tree_map(lambda x: np.asarray(x, np.float32), dict(params))
    tensors = {weights.PREFIX + k: v for k, v in weights.params_to_torch(params, cfg, heads=False).items()}
    for key, (layer, leaf) in CLASSIFIER.items():
        arr = params[layer][leaf]
        tensors[key] = np.ascontiguousarray(arr.T if leaf == "kernel" else arr)
    hf = {**cfg.to_hf_config(), "architectures": ["XLMRobertaForSequenceClassification"],
          "id2label": {"0": "LABEL_0"}, "label2id": {"LABEL_0": 0}}
    with atomic_dir(dst, overwrite, checkpoint.CheckpointError) as tmp:
        (tmp / "config.json").write_text(json.dumps(hf, indent=2) + "\n")
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        checkpoint._copy_tokenizer(tokenizer_dir, tmp)
        if metadata is not None:
            (tmp / "training_metadata.json").write_text(json.dumps(metadata, indent=2) + "\n")
    return Path(dst)


def abstract_reranker(cfg: M3Config, *, dtype: Any = "float32") -> RerankerModel:
    """The model's structure with shape-only parameters (no memory), as m3jax.model.abstract_model."""
    return nnx.eval_shape(lambda: RerankerModel(cfg, dtype=dtype, rngs=nnx.Rngs(0)))


def reranker_from_params(cfg: M3Config, params: Any, *, dtype: Any = "float32") -> RerankerModel:
    graphdef, abstract = nnx.split(abstract_reranker(cfg, dtype=dtype))
    pure = nnx.to_pure_dict(abstract)
    cast = jax.tree_util.tree_map(lambda a, p: jnp.asarray(p, dtype=a.dtype), pure, dict(params))
    nnx.replace_by_pure_dict(abstract, cast)
    return nnx.merge(graphdef, abstract)


class FlagReranker:
    """FlagEmbedding's `FlagReranker` (encoder-only), in JAX: the same keywords, defaults and outputs.

    compute_score(pairs) takes one [query, passage] pair or a list of them and returns a list of float scores (raw
    logits; with normalize, their sigmoid). use_fp16 computes in bfloat16 (on CPU only with bfloat16 instructions,
    as m3jax.BGEM3). trust_remote_code and devices are accepted for compatibility; the model runs on JAX's default
    device. `model`: a RerankerModel to use instead of reading model_name_or_path's weights (its tokenizer is still
    read from there), e.g. m3jax.random_weights.random_reranker's.
    """

    def __init__(self, model_name_or_path: str | os.PathLike, use_fp16: bool = False,
                 query_instruction_for_rerank: str | None = None, query_instruction_format: str = "{}{}",
                 passage_instruction_for_rerank: str | None = None, passage_instruction_format: str = "{}{}",
                 trust_remote_code: bool = False, cache_dir: str | None = None, devices: Any = None,
                 batch_size: int = 128, query_max_length: int | None = None, max_length: int = 512,
                 normalize: bool = False, model: RerankerModel | None = None, **kwargs: Any):
        from m3jax import checkpoint
        from m3jax.api import default_dtype

        self.model_name_or_path = str(model_name_or_path)
        path = Path(model_name_or_path) if model is not None else checkpoint.resolve(model_name_or_path,
                                                                                      cache_dir=cache_dir)
        self.platform = jax.devices()[0].platform
        self.dtype = default_dtype(self.platform, use_fp16, False)
        if model is None:
            self.config, model = read_reranker(path, dtype=self.dtype)
        self.config = model.config
        self.graphdef, self.state = nnx.split(model)
        self.tokenizer = Tokenizer(path)
        self.query_instruction_for_rerank, self.query_instruction_format = (query_instruction_for_rerank,
                                                                            query_instruction_format)
        self.passage_instruction_for_rerank, self.passage_instruction_format = (passage_instruction_for_rerank,
                                                                                passage_instruction_format)
        self.batch_size, self.query_max_length, self.max_length = batch_size, query_max_length, max_length
        self.normalize = normalize
        self.length_buckets = pipeline.default_length_buckets(self.platform)

    def compute_score(self, sentence_pairs: Sequence[Sequence[str]] | Sequence[str], batch_size: int | None = None,
                      query_max_length: int | None = None, max_length: int | None = None,
                      normalize: bool | None = None, **kwargs: Any) -> list[float]:
        batch_size = batch_size or self.batch_size
        max_length = max_length or self.max_length
        query_max_length = query_max_length or self.query_max_length or max_length * 3 // 4
        normalize = self.normalize if normalize is None else normalize
        pairs = [sentence_pairs] if isinstance(sentence_pairs[0], str) else list(sentence_pairs)
        for i, p in enumerate(pairs):
            if not (len(p) == 2 and isinstance(p[0], str) and isinstance(p[1], str)):
                raise TypeError(f"pair {i}: expected [query, passage] strings, got {p!r:.80}")
        queries = [self._instruct(self.query_instruction_format, self.query_instruction_for_rerank, q)
                   for q, _ in pairs]
        passages = [self._instruct(self.passage_instruction_format, self.passage_instruction_for_rerank, p)
                    for _, p in pairs]
        ids = pair_ids(self.tokenizer.encode_plain(queries, query_max_length),
                       self.tokenizer.encode_plain(passages, max_length), max_length, self.config)
        scores = np.asarray(self._scores(ids, batch_size), np.float64)
        if normalize:
            scores = 1.0 / (1.0 + np.exp(-scores))
        return [float(x) for x in scores]

    @staticmethod
    def _instruct(fmt: str, instruction: str | None, text: str) -> str:
        return text if instruction is None else fmt.replace("\\n", "\n").format(instruction, text)

    def _scores(self, ids: list[np.ndarray], batch_size: int) -> np.ndarray:
        cfg, out = self.config, np.zeros(len(ids), np.float32)
        lengths = np.array([len(x) for x in ids], np.int64)
        plan = pipeline.plan_batches(lengths, batch_size=batch_size, max_tokens=pipeline.DEFAULT_MAX_TOKENS,
                                     buckets=self.length_buckets,
                                     row_buckets=pipeline.default_row_buckets(self.platform))
        for L, rows, idx in plan:
            b = pipeline.make_batch(ids, idx, L, rows, cfg.pad_token_id, cfg.bos_token_id, cfg.eos_token_id)
            logits = score_step(self.graphdef, self.state, b.input_ids, b.attention_mask)
            out[idx] = np.asarray(logits)[:len(idx)]
        return out


def rerank_candidates(reranker: Any, query_texts: Sequence[str], candidates: Sequence[Sequence[str]], k: int
                      ) -> list[tuple[np.ndarray, np.ndarray]]:
    """Each query's candidate passages (texts, in first-stage order) re-scored by a cross-encoder in one
    compute_score call: per query (the positions among its candidates of its top k, their scores), ranked by score,
    ties in first-stage order. CorpusIndex.search and m3jax eval re-rank through it."""
    pairs = [[q, t] for q, texts in zip(query_texts, candidates, strict=True) for t in texts]
    scores = np.asarray(reranker.compute_score(pairs) if pairs else [], np.float32)
    out, start = [], 0
    for texts in candidates:
        s = scores[start:start + len(texts)]
        start += len(texts)
        order = np.argsort(-s, kind="stable")[:k]
        out.append((order, s[order]))
    return out


def pair_ids(queries: list[np.ndarray], passages: list[np.ndarray], max_length: int, cfg: M3Config
             ) -> list[np.ndarray]:
    """`<s> q </s></s> p </s>`, the passage cut from its end so the whole fits max_length (transformers'
    prepare_for_model with truncation="only_second"; like it, a query too long for that leaves the pair uncut)."""
    bos, eos = cfg.bos_token_id, cfg.eos_token_id
    out = []
    for q, p in zip(queries, passages, strict=True):
        over = len(q) + len(p) + 4 - max_length
        if 0 < over < len(p):
            p = p[:len(p) - over]
        elif over >= len(p) and over > 0 and len(q) + len(p) + 4 > cfg.max_length:
            raise ValueError(f"a query of {len(q)} tokens leaves no room for its passage within max_length "
                             f"{max_length}, and the pair exceeds the model's {cfg.max_length} positions")
        out.append(np.concatenate([[bos], q, [eos, eos], p, [eos]]).astype(np.int32))
    return out
