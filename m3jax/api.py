"""`BGEM3`: FlagEmbedding's BGEM3FlagModel surface over the m3jax Encoder (`from m3jax import BGEM3FlagModel`)."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from m3jax import checkpoint, hf_compat, pipeline, scoring
from m3jax.engine import Encoder, configure_compilation_cache, cpu_has_bf16, resolve_devices
from m3jax.model import BGEM3Model

logger = logging.getLogger("m3jax")

SCORE_KEYS = ("colbert", "sparse", "dense", "sparse+dense", "colbert+sparse+dense")


def default_dtype(platform: str, use_fp16: bool, use_bf16: bool) -> str:
    """The compute dtype FlagEmbedding's use_fp16/use_bf16 select on `platform` (see BGEM3, "dtype")."""
    if use_bf16 or (use_fp16 and platform != "cpu"):
        return "bfloat16"
    if use_fp16 and cpu_has_bf16():
        logger.info("use_fp16=True on a CPU with bfloat16 instructions: computing in bfloat16 (use_fp16=False or "
                    "dtype='float32' for float32)")
        return "bfloat16"
    return "float32"


class BGEM3:
    """BGE-M3 in JAX with FlagEmbedding's BGEM3FlagModel API.

    Differences from FlagEmbedding 1.4.2, all deliberate:
      - dtype: "float32" or "bfloat16". use_fp16/use_bf16 are accepted for compatibility: use_bf16 selects
        bfloat16, and so does use_fp16 (the default, as in FlagEmbedding) on an accelerator or on a CPU with
        bfloat16 instructions (AVX512-BF16, AMX, ARM BF16: m3jax.engine.cpu_has_bf16); XLA has no fp16 path worth
        taking. On other CPUs use_fp16 keeps float32, which is what FlagEmbedding computes on any CPU. bfloat16
        drifts from float32 (tests/test_model_parity.py::test_bfloat16_drift states the bound); pass
        use_fp16=False or dtype="float32" for FlagEmbedding's CPU numbers.
      - batching is by length bucket and token budget (see m3jax.pipeline; `length_buckets` replaces the default
        lengths, e.g. with fewer for TPU); batch_size caps the rows of a batch.
        There is no out-of-memory probe: nothing is computed twice.
      - keywords: as FlagEmbedding, the constructor accepts any keyword (an unknown one is set as an attribute
        and otherwise ignored, with a logged warning); `device=` (FlagEmbedding 1.2) is a synonym of `devices=`
        and both take str, int, a list, a torch.device-like object or a jax.Device. encode's extra keywords
        (which FlagEmbedding forwards to its tokenizer) are accepted only where FlagEmbedding accepts them
        without changing its output (m3jax.hf_compat.ENCODE_NO_EFFECT); any other raises TypeError, as there.
      - max_length=1 keeps `<s></s>` (FlagEmbedding's tokenizer then silently skips truncation).
      - compute_score on an empty list returns the dict of empty lists; FlagEmbedding returns [].
      - colbert_score returns a numpy float32 scalar (with torch's .numpy(), .cpu()) rather than a 0-d tensor.
      - `tokenizer` is m3jax's (transformers' calls clients make, no torch); `model` is a torch-like view over
        the NNX module (sizes, `.model.config`, `eval()`), which itself is `nnx_model`. See m3jax.hf_compat.
      - compilation_cache: False (the default) leaves jax.config as it is; True or a directory turns on JAX's
        persistent compilation cache for the process (m3jax.configure_compilation_cache), so a new process loads
        the shapes an earlier one compiled. The `m3jax` command turns it on for itself.
      - encode* take mcls_interval: the paper's multiple CLS for long texts (appendix B.2), which FlagEmbedding
        does not implement (see encode).
    """

    def __init__(
        self,
        model_name_or_path: str | os.PathLike = "BAAI/bge-m3",
        *,
        dtype: str | None = None,
        use_fp16: bool = True,
        use_bf16: bool = False,
        normalize_embeddings: bool = True,
        pooling_method: str = "cls",
        query_instruction_for_retrieval: str | None = None,
        query_instruction_format: str = "{}{}",
        passage_instruction_for_retrieval: str | None = None,
        passage_instruction_format: str = "{}{}",
        devices: Any = None,
        device: Any = None,
        cache_dir: str | None = None,
        colbert_dim: int = -1,
        batch_size: int = 256,
        query_max_length: int = 512,
        passage_max_length: int = 512,
        return_dense: bool = True,
        return_sparse: bool = False,
        return_colbert_vecs: bool = False,
        truncate_dim: int | None = None,
        max_tokens_per_batch: int | None = None,
        length_buckets: Sequence[int] | None = None,
        attn_impl: str = "auto",
        compiler_options: dict[str, Any] | None = None,
        compilation_cache: bool | str = False,
        show_progress: bool | None = None,
        trust_remote_code: bool = False,  # accepted for compatibility; nothing remote is ever executed
        **kwargs: Any,
    ):
        del trust_remote_code
        if device is not None:
            self.device = device  # FlagEmbedding 1.4 keeps it as an attribute too
        hf_compat.accept_unknown_kwargs(self, kwargs)
        self.kwargs = dict(kwargs)
        devs = resolve_devices(hf_compat.merge_device_kwargs(devices, device))
        if dtype is None:
            dtype = default_dtype(devs[0].platform, use_fp16, use_bf16)
        self.compilation_cache_dir = configure_compilation_cache(compilation_cache)
        if pooling_method not in ("cls", "mean"):
            raise ValueError(f"pooling_method must be 'cls' or 'mean', got {pooling_method!r}")
        self.engine = Encoder.from_pretrained(
            model_name_or_path, cache_dir=cache_dir, dtype=dtype, devices=devs, attn_impl=attn_impl,
            length_buckets=length_buckets, max_tokens_per_batch=max_tokens_per_batch, pooling=pooling_method,
            normalize=normalize_embeddings, truncate_dim=truncate_dim, compiler_options=compiler_options)
        cfg = self.engine.config
        # Hugging Face's calls, for clients, over the engine's loaded tokenizer (not a second 290 MB copy)
        self.tokenizer = hf_compat.HFTokenizer(self.engine.tokenizer_dir, share=self.engine.tokenizer)
        if colbert_dim > 0 and colbert_dim != cfg.colbert_dim:
            raise ValueError(f"colbert_dim={colbert_dim}, but the checkpoint's ColBERT head has {cfg.colbert_dim}")
        self.model_name_or_path = str(model_name_or_path)
        self.normalize_embeddings = normalize_embeddings
        self.pooling_method = pooling_method
        self.query_instruction_for_retrieval = query_instruction_for_retrieval
        self.query_instruction_format = query_instruction_format
        self.passage_instruction_for_retrieval = passage_instruction_for_retrieval
        self.passage_instruction_format = passage_instruction_format
        self.batch_size = batch_size
        self.query_max_length = query_max_length
        self.passage_max_length = passage_max_length
        self.return_dense = return_dense
        self.return_sparse = return_sparse
        self.return_colbert_vecs = return_colbert_vecs
        self.truncate_dim = truncate_dim
        self.show_progress = show_progress

    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike = "BAAI/bge-m3", *, dtype: str = "float32",
                        **kwargs) -> BGEM3:
        """Loads an m3jax directory, a release-layout directory, or a hub id (converted once, then cached)."""
        return cls(name_or_path, dtype=dtype, **kwargs)

    # ----------------------------------------------------------------------------------------------- model
    # The engine's state, read through: one place holds the model.
    config = property(lambda self: self.engine.config)
    tokenizer_dir = property(lambda self: self.engine.tokenizer_dir)
    devices = property(lambda self: self.engine.devices)
    dtype = property(lambda self: self.engine.dtype)
    graphdef = property(lambda self: self.engine.graphdef)
    state = property(lambda self: self.engine.state)
    compile_seconds = property(lambda self: self.engine.compile_seconds)
    length_buckets = property(lambda self: self.engine.length_buckets)
    max_tokens_per_batch = property(lambda self: self.engine.max_tokens_per_batch)
    attn_impl = property(lambda self: self.engine.attn_impl)

    @property
    def nnx_model(self) -> BGEM3Model:
        """The NNX module (a view over the current state), for research and fine-tuning."""
        return self.engine.model

    @property
    def model(self) -> hf_compat.TorchLikeModel:
        """FlagEmbedding's `model.model` as clients read it (`.model.config.hidden_size`,
        `.colbert_linear.out_features`, `eval()`); other attributes are the NNX module's (`.nnx`)."""
        return hf_compat.TorchLikeModel(self.nnx_model, self.tokenizer)

    @property
    def params(self) -> dict:
        """float32 numpy parameter tree (what checkpoints store)."""
        return self.engine.params

    def save(self, path: str | os.PathLike, *, overwrite: bool = False) -> Path:
        """Writes an m3jax directory (params.safetensors, config, tokenizer)."""
        return checkpoint.save_m3jax(path, self.config, self.params, self.tokenizer_dir, overwrite=overwrite)

    def export(self, path: str | os.PathLike, *, weights_format: str = "safetensors", overwrite: bool = False
               ) -> Path:
        """Writes the release layout FlagEmbedding loads (see m3jax.checkpoint.export_release)."""
        return checkpoint.export_release((self.config, self.params, self.tokenizer_dir), path,
                                         weights_format=weights_format, overwrite=overwrite)

    # ---------------------------------------------------------------------------------------------- encode
    def encode(self, sentences: str | Sequence[str], batch_size: int | None = None, max_length: int | None = None,
               return_dense: bool | None = None, return_sparse: bool | None = None,
               return_colbert_vecs: bool | None = None, *, show_progress: bool | None = None,
               mcls_interval: int | None = None, **kwargs) -> dict:
        """FlagEmbedding's encode: {"dense_vecs", "lexical_weights", "colbert_vecs"}, None for heads not asked.

        **kwargs: what FlagEmbedding would forward to its tokenizer; the few that change nothing are accepted (and
        logged), any other raises TypeError (see m3jax.hf_compat.check_encode_kwargs).

        mcls_interval: multiple CLS (MCLS, BGE-M3 paper appendix B.2; not in FlagEmbedding), for long documents
        without fine-tuning. None (the default) is plain BGE-M3. With an interval I (the paper uses 256):
          - each text is tokenised and truncated to max_length as usual, then a `<s>` is inserted before every
            block of I text tokens after the first: `<s> t1 ... tI <s> tI+1 ... t2I <s> ... tn </s>`. The inserted
            tokens do not count toward max_length; the longer sequence must still fit the model's position table
            (8,192 tokens for BGE-M3), or a ValueError names the largest max_length that does (8,161 for I = 256).
          - dense: the mean of the last hidden states at all `<s>` positions (then truncate_dim and normalisation,
            as for CLS pooling); needs pooling_method "cls". A text of at most I tokens between `<s>` and `</s>`
            gets no inserted token: its outputs are exactly the plain ones.
          - sparse and ColBERT come from the same forward pass: the inserted `<s>` have special id 0 and are
            dropped from the lexical weights like every special token, and their ColBERT vectors are dropped, so a
            text keeps one vector per token after its first, as without MCLS. The other tokens' values do change
            on longer texts (the inserted tokens take part in attention and shift the positions).
          - EncodeResult.lengths and `m3jax embed`'s token counts stay the text's own tokens.
        """
        hf_compat.check_encode_kwargs("encode", kwargs)
        return self._encode_flag(sentences, batch_size, max_length, self.passage_max_length, return_dense,
                                 return_sparse, return_colbert_vecs, show_progress, None, "{}{}", mcls_interval)

    def encode_queries(self, queries: str | Sequence[str], batch_size: int | None = None,
                       max_length: int | None = None, return_dense: bool | None = None,
                       return_sparse: bool | None = None, return_colbert_vecs: bool | None = None, *,
                       show_progress: bool | None = None, mcls_interval: int | None = None,
                       **kwargs) -> dict:
        """encode() with query_max_length and the query instruction, if any."""
        hf_compat.check_encode_kwargs("encode_queries", kwargs)
        return self._encode_flag(queries, batch_size, max_length, self.query_max_length, return_dense,
                                 return_sparse, return_colbert_vecs, show_progress,
                                 self.query_instruction_for_retrieval, self.query_instruction_format, mcls_interval)

    def encode_corpus(self, corpus: str | Sequence[str], batch_size: int | None = None,
                      max_length: int | None = None, return_dense: bool | None = None,
                      return_sparse: bool | None = None, return_colbert_vecs: bool | None = None, *,
                      show_progress: bool | None = None, mcls_interval: int | None = None,
                      **kwargs) -> dict:
        """encode() with passage_max_length and the passage instruction, if any."""
        hf_compat.check_encode_kwargs("encode_corpus", kwargs)
        return self._encode_flag(corpus, batch_size, max_length, self.passage_max_length, return_dense,
                                 return_sparse, return_colbert_vecs, show_progress,
                                 self.passage_instruction_for_retrieval, self.passage_instruction_format,
                                 mcls_interval)

    def _encode_flag(self, sentences, batch_size, max_length, default_max_length, return_dense, return_sparse,
                     return_colbert_vecs, show_progress, instruction, instruction_format, mcls_interval) -> dict:
        max_length = default_max_length if max_length is None else max_length
        single = isinstance(sentences, str)
        texts = [sentences] if single else sentences
        if instruction is not None:
            texts = apply_instruction(_check_texts(texts), instruction, instruction_format)
        heads = self._heads(return_dense, return_sparse, return_colbert_vecs)
        res = self.encode_padded(texts, batch_size=batch_size, max_length=max_length, heads=heads,
                                 show_progress=show_progress, mcls_interval=mcls_interval)
        out = {
            "dense_vecs": res.dense if "dense" in heads else None,
            "lexical_weights": res.lexical_dicts() if "sparse" in heads else None,
            "colbert_vecs": res.colbert_list() if "colbert" in heads else None,
        }
        if single:
            out = {k: (v[0] if v is not None else None) for k, v in out.items()}
        return out

    def _heads(self, return_dense, return_sparse, return_colbert_vecs) -> tuple[str, ...]:
        flags = (self.return_dense if return_dense is None else return_dense,
                 self.return_sparse if return_sparse is None else return_sparse,
                 self.return_colbert_vecs if return_colbert_vecs is None else return_colbert_vecs)
        heads = tuple(h for h, f in zip(pipeline.HEADS, flags, strict=True) if f)
        if not heads:
            raise ValueError("nothing to compute: set one of return_dense, return_sparse, return_colbert_vecs")
        return heads

    def encode_padded(self, sentences: Sequence[str], *, batch_size: int | None = None,
                      max_length: int | None = None, heads: Sequence[str] = pipeline.HEADS,
                      show_progress: bool | None = None, mcls_interval: int | None = None) -> pipeline.EncodeResult:
        """The JAX-native encode: outputs in input order (see EncodeResult for the vector-store formats).
        mcls_interval: multiple CLS, see encode()."""
        texts = _check_texts(sentences)
        batch_size = self.batch_size if batch_size is None else batch_size
        max_length = self.passage_max_length if max_length is None else max_length
        progress = self._progress(len(texts), batch_size, show_progress)
        try:
            return self.engine.encode(texts, batch_size=batch_size, max_length=max_length, heads=heads,
                                      progress=progress, mcls_interval=mcls_interval)
        finally:
            if progress is not None:
                progress.close()

    def batches(self, texts: Sequence[str], *, batch_size: int, max_length: int, mcls_interval: int | None = None
                ) -> tuple[list[pipeline.Batch], np.ndarray, np.ndarray]:
        """The padded batches encode_padded runs: (batches, lengths [N], truncated [N])."""
        self.engine.check_mcls(max_length, mcls_interval)
        ids, lengths, truncated = self.engine.tokenize(_check_texts(texts), max_length)
        return list(self.engine.batches(ids, batch_size=batch_size, mcls_interval=mcls_interval)), lengths, truncated

    def executable(self, length: int, rows: int, heads: Sequence[str] = pipeline.HEADS,
                   mcls_interval: int | None = None):
        """The compiled encode step for one bucket shape [rows, length] (see Encoder.executable)."""
        return self.engine.executable(length, rows, heads, mcls_interval)

    def _progress(self, n: int, batch_size: int, show: bool | None):
        show = self.show_progress if show is None else show
        if show is None:
            show = n >= batch_size and n > 1  # as FlagEmbedding: a bar only for inputs of several batches
        if not show:
            return None
        try:
            from tqdm.auto import tqdm
        except ImportError:
            return None
        return tqdm(total=n, desc="Inference Embeddings", file=sys.stderr)

    # --------------------------------------------------------------------------------------------- scoring
    def compute_score(self, sentence_pairs: Sequence[tuple[str, str]] | tuple[str, str],
                      batch_size: int | None = None, max_query_length: int | None = None,
                      max_passage_length: int | None = None,
                      weights_for_different_modes: Sequence[float] | None = None) -> dict:
        """FlagEmbedding's compute_score: per pair "colbert", "sparse", "dense", "sparse+dense" and
        "colbert+sparse+dense" as Python floats (scalars for a single pair).

        weights_for_different_modes = [w_dense, w_sparse, w_colbert], default [1, 1, 1]; the combined scores are
        weighted averages. ColBERT follows FlagEmbedding exactly, including its zero floor: FlagEmbedding pads each
        batch of batch_size pairs to its longest passage, and the padded zero vectors take part in the max, so a
        query token's score is max(best real dot product, 0) for every passage shorter than its batch's longest.
        """
        single = isinstance(sentence_pairs, (tuple, list)) and len(sentence_pairs) == 2 \
            and isinstance(sentence_pairs[0], str)
        pairs = [tuple(sentence_pairs)] if single else list(sentence_pairs)
        for i, p in enumerate(pairs):
            if not (isinstance(p, (tuple, list)) and len(p) == 2 and all(isinstance(t, str) for t in p)):
                raise TypeError(f"sentence_pairs[{i}] must be a (query, passage) pair of str, got {p!r:.80}")
        w = [1.0, 1.0, 1.0] if weights_for_different_modes is None else [float(x) for x in
                                                                           weights_for_different_modes]
        if len(w) != 3:
            raise ValueError(f"weights_for_different_modes needs 3 weights [dense, sparse, colbert], got {len(w)}")
        if not pairs:
            return {k: [] for k in SCORE_KEYS}
        batch_size = self.batch_size if batch_size is None else batch_size
        q = self.encode_padded([p[0] for p in pairs], batch_size=batch_size,
                               max_length=self.query_max_length if max_query_length is None else max_query_length)
        p = self.encode_padded([p[1] for p in pairs], batch_size=batch_size,
                               max_length=(self.passage_max_length if max_passage_length is None
                                           else max_passage_length))
        dense = np.asarray(scoring.dense_paired(q.dense, p.dense))
        sparse = np.asarray(scoring.lexical_paired(q.sparse_ids, q.sparse_weights, p.sparse_ids, p.sparse_weights,
                                                   vocab_size=self.config.vocab_size))
        colbert = scoring.flag_colbert_scores(q.colbert_vecs, p.colbert_vecs, batch_size)
        out = {
            "colbert": colbert,
            "sparse": sparse,
            "dense": dense,
            "sparse+dense": (sparse * w[1] + dense * w[0]) / (w[1] + w[0]),
            "colbert+sparse+dense": (colbert * w[2] + sparse * w[1] + dense * w[0]) / sum(w),
        }
        out = {k: np.asarray(v, np.float32).tolist() for k, v in out.items()}
        return {k: v[0] for k, v in out.items()} if single else out

    def compute_lexical_matching_score(self, lexical_weights_1, lexical_weights_2):
        """Σ over shared token ids of w1 * w2: two dicts give a float32 scalar, two lists an array [len1, len2]."""
        if isinstance(lexical_weights_1, dict) and isinstance(lexical_weights_2, dict):
            return self.compute_lexical_matching_score([lexical_weights_1], [lexical_weights_2])[0, 0]
        if isinstance(lexical_weights_1, list) and isinstance(lexical_weights_2, list):
            q, p = _dicts_to_padded(lexical_weights_1, "lexical_weights_1"), _dicts_to_padded(
                lexical_weights_2, "lexical_weights_2")
            return np.asarray(scoring.lexical_all_pairs(*q, *p, vocab_size=self.config.vocab_size))
        raise ValueError("lexical weights must be two dicts or two lists of dicts, got "
                         f"{type(lexical_weights_1).__name__} and {type(lexical_weights_2).__name__}")

    def colbert_score(self, q_reps: np.ndarray, p_reps: np.ndarray) -> hf_compat.ColbertScore:
        """Late interaction of one query [Nq, C] and one passage [Np, C]: mean over query vectors of the max dot
        product (no zero floor, as FlagEmbedding's colbert_score)."""
        q, p = np.asarray(q_reps), np.asarray(p_reps)
        for name, x in (("q_reps", q), ("p_reps", p)):
            if x.ndim != 2:
                raise ValueError(f"{name} must be [n_tokens, dim], got shape {x.shape}")
        q32, p32 = q.astype(np.float32, copy=False), p.astype(np.float32, copy=False)
        score = scoring.colbert_paired(q32[None], np.ones((1, len(q)), bool), p32[None], np.ones((1, len(p)), bool))
        return hf_compat.ColbertScore(score[0])

    def convert_id_to_token(self, lexical_weights: dict | list[dict]):
        """Maps str(token id) keys to token text (as tokenizer.decode([id])); one dict in, one dict out."""
        items = [lexical_weights] if isinstance(lexical_weights, dict) else lexical_weights
        out = [{self.tokenizer.decode_one(int(k)): v for k, v in d.items()} for d in items]
        return out[0] if len(out) == 1 else out


BGEM3FlagModel = BGEM3


def _dicts_to_padded(dicts: Sequence[dict], name: str) -> tuple[np.ndarray, np.ndarray]:
    """Lexical dicts (str(token id) -> weight) as padded (ids [N, K] int32 with -1, weights [N, K] float32)."""
    k = max((len(d) for d in dicts), default=0)
    ids = np.full((len(dicts), k), -1, np.int32)
    weights = np.zeros((len(dicts), k), np.float32)
    for i, d in enumerate(dicts):
        if not isinstance(d, dict):
            raise ValueError(f"{name}[{i}] is {type(d).__name__}, expected a dict of token id -> weight")
        try:
            ids[i, :len(d)] = np.fromiter(d.keys(), dtype=np.int64, count=len(d))
        except ValueError:
            raise ValueError(f"{name}[{i}]: keys must be token ids (as str or int)") from None
        weights[i, :len(d)] = np.fromiter(d.values(), dtype=np.float32, count=len(d))
    return ids, weights


def apply_instruction(texts: Sequence[str], instruction: str | None, instruction_format: str = "{}{}") -> list[str]:
    """Texts with an instruction applied as FlagEmbedding's encode_queries / encode_corpus do it
    (`format.format(instruction, text)`, a literal "\\n" in the format read as a newline); unchanged for None."""
    if instruction is None:
        return list(texts)
    fmt = instruction_format.replace("\\n", "\n")
    return [fmt.format(instruction, t) for t in texts]


def _check_texts(texts: Any) -> Sequence[str]:
    if isinstance(texts, str) or not isinstance(texts, Sequence):
        raise TypeError(f"expected a str or a list of str, got {type(texts).__name__}")
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise TypeError(f"sentences[{i}] is {type(t).__name__}, expected str")
    return texts
