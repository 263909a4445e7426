"""Flax NNX XLM-RoBERTa encoder with the three BGE-M3 heads, and the pure jitted forward over split state.

Parameter names follow transformers' XLMRobertaModel (`embeddings.word_embeddings`, `attention.self.query`,
`intermediate.dense`, `LayerNorm`) so the conversion table is short. The 24 encoder layers are stored stacked
(leading axis L) under `encoder.layer` and run with `jax.lax.scan`: one layer is compiled, not 24.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from m3jax.attention import attention, dropout, platform_in_use
from m3jax.config import M3Config

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
# How the dense projections run (BGEM3Model's `projections`): "xla" as XLA compiles them; "split", the feed-forward
# up-projection in column blocks. m3jax.engine chooses.
PROJECTIONS = ("xla", "split")


class ModelOutputs(NamedTuple):
    """What BGEM3Model computes for a padded batch [B, T] (float32 arrays).

    last_hidden_state: [B, T, D].
    dense: [B, D'] pooled vector (D' = truncate_dim or D), normalised if asked.
    sparse: [B, T] relu(sparse_linear(h)) per token, padding included (callers mask).
    colbert: [B, T-1, C'] colbert_linear(h[:, 1:]), padding rows zeroed, normalised if asked.
    """

    last_hidden_state: jax.Array
    dense: jax.Array
    sparse: jax.Array
    colbert: jax.Array


def resolve_dtype(dtype: Any) -> jnp.dtype:
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
        return jnp.dtype(DTYPES[dtype])
    dtype = jnp.dtype(dtype)
    if dtype not in (jnp.float32, jnp.bfloat16):
        raise ValueError(f"dtype must be float32 or bfloat16, got {dtype}")
    return dtype


def _linear(din: int, dout: int, dtype, rngs: nnx.Rngs) -> nnx.Linear:
    return nnx.Linear(din, dout, dtype=dtype, param_dtype=dtype,
                      kernel_init=nnx.initializers.normal(0.02), rngs=rngs)


def project(linear: nnx.Linear, x: jax.Array, column_block: int | None = None) -> jax.Array:
    """linear(x), the model's one dense product. On CPU a bfloat16 product is taken with float32 output and rounded
    once, after the bias: XLA's CPU dots are about twice as fast so as with bfloat16 output (benchmarks/RESULTS.md).
    column_block: the product in column blocks of that many outputs, the same sums (projections "split")."""
    kernel, bias = linear.kernel[...], linear.bias[...]
    x, kernel, bias = linear.promote_dtype((x, kernel, bias), dtype=linear.dtype)
    wide = jnp.float32 if x.dtype == jnp.bfloat16 and platform_in_use() == "cpu" else None
    f = kernel.shape[1]
    step = min(column_block or f, f)
    dot = functools.partial(jnp.dot, precision=linear.precision, preferred_element_type=wide)
    y = dot(x, kernel) if step == f else jnp.concatenate([dot(x, kernel[:, i:i + step]) for i in range(0, f, step)],
                                                         axis=-1)
    return (y + bias).astype(x.dtype)


def _layer_norm(dim: int, cfg: M3Config, rngs: nnx.Rngs) -> nnx.LayerNorm:
    # LayerNorm runs and stores its parameters in float32 whatever the model dtype.
    return nnx.LayerNorm(dim, epsilon=cfg.layer_norm_eps, use_fast_variance=False,
                         dtype=jnp.float32, param_dtype=jnp.float32, rngs=rngs)


class Embeddings(nnx.Module):
    def __init__(self, cfg: M3Config, dtype, rngs: nnx.Rngs):
        init = nnx.initializers.normal(0.02)
        d = cfg.hidden_size
        self.word_embeddings = nnx.Embed(cfg.vocab_size, d, dtype=dtype, param_dtype=dtype,
                                         embedding_init=init, rngs=rngs)
        self.position_embeddings = nnx.Embed(cfg.max_position_embeddings, d, dtype=dtype, param_dtype=dtype,
                                             embedding_init=init, rngs=rngs)
        self.token_type_embeddings = nnx.Embed(cfg.type_vocab_size, d, dtype=dtype, param_dtype=dtype,
                                               embedding_init=init, rngs=rngs)
        self.LayerNorm = _layer_norm(d, cfg, rngs)
        self.pad_token_id = cfg.pad_token_id
        self.dropout_rate = cfg.hidden_dropout_prob

    def __call__(self, input_ids: jax.Array, dropout_rng: jax.Array | None = None) -> jax.Array:
        """[B, T] int -> [B, T, D] float32."""
        # XLM-R positions: real tokens count up from pad_id + 1; pad tokens sit on row pad_id. Keyed on the ids,
        # not the attention mask, exactly as create_position_ids_from_input_ids.
        real = (input_ids != self.pad_token_id).astype(jnp.int32)
        positions = jnp.cumsum(real, axis=1) * real + self.pad_token_id
        x = (self.word_embeddings(input_ids).astype(jnp.float32)
             + self.token_type_embeddings.embedding[0].astype(jnp.float32)
             + self.position_embeddings(positions).astype(jnp.float32))
        return dropout(self.LayerNorm(x), self.dropout_rate, dropout_rng)


class SelfAttention(nnx.Module):
    def __init__(self, cfg: M3Config, dtype, rngs: nnx.Rngs):
        d = cfg.hidden_size
        self.query = _linear(d, d, dtype, rngs)
        self.key = _linear(d, d, dtype, rngs)
        self.value = _linear(d, d, dtype, rngs)
        self.num_heads = cfg.num_heads
        self.dropout_rate = cfg.attention_probs_dropout_prob

    def __call__(self, x: jax.Array, mask: jax.Array, impl: str, dropout_rng: jax.Array | None = None) -> jax.Array:
        """x [B, T, D], mask [B, T] -> context [B, T, D]."""
        b, t, d = x.shape
        heads = lambda lin: project(lin, x).reshape(b, t, self.num_heads, -1)  # noqa: E731  [B, T, N, H]
        ctx = attention(heads(self.query), heads(self.key), heads(self.value), mask, impl=impl,
                        dropout_rate=self.dropout_rate, dropout_rng=dropout_rng)
        return ctx.reshape(b, t, d)


class Output(nnx.Module):
    """dense -> (dropout) -> LayerNorm(residual + .): BertSelfOutput and BertOutput alike."""

    def __init__(self, din: int, cfg: M3Config, dtype, rngs: nnx.Rngs):
        self.dense = _linear(din, cfg.hidden_size, dtype, rngs)
        self.LayerNorm = _layer_norm(cfg.hidden_size, cfg, rngs)
        self.dropout_rate = cfg.hidden_dropout_prob

    def __call__(self, h: jax.Array, residual: jax.Array, dropout_rng: jax.Array | None = None) -> jax.Array:
        y = project(self.dense, h).astype(jnp.float32)
        return self.LayerNorm(dropout(y, self.dropout_rate, dropout_rng) + residual)


class Attention(nnx.Module):
    def __init__(self, cfg: M3Config, dtype, rngs: nnx.Rngs):
        self.self = SelfAttention(cfg, dtype, rngs)
        self.output = Output(cfg.hidden_size, cfg, dtype, rngs)


class Intermediate(nnx.Module):
    def __init__(self, cfg: M3Config, dtype, rngs: nnx.Rngs):
        self.dense = _linear(cfg.hidden_size, cfg.intermediate_size, dtype, rngs)

    def __call__(self, x: jax.Array, projections: str = "xla") -> jax.Array:
        """projections "split": column blocks of at most hidden-size outputs (see BGEM3Model's projections)."""
        block = x.shape[-1] if projections == "split" else None
        return jax.nn.gelu(project(self.dense, x, block), approximate=False)  # exact erf, as torch's


class Layer(nnx.Module):
    """Post-LN BERT layer."""

    def __init__(self, cfg: M3Config, dtype, rngs: nnx.Rngs):
        self.attention = Attention(cfg, dtype, rngs)
        self.intermediate = Intermediate(cfg, dtype, rngs)
        self.output = Output(cfg.intermediate_size, cfg, dtype, rngs)
        self.dtype = dtype

    def __call__(self, x: jax.Array, mask: jax.Array, impl: str, dropout_rng: jax.Array | None = None,
                 projections: str = "xla") -> jax.Array:
        """x [B, T, D] float32 residual stream -> [B, T, D] float32. dropout_rng: None at inference."""
        r = [None] * 3 if dropout_rng is None else list(jax.random.split(dropout_rng, 3))
        h = x.astype(self.dtype)
        x = self.attention.output(self.attention.self(h, mask, impl, r[0]), x, r[1])
        return self.output(self.intermediate(x.astype(self.dtype), projections), x, r[2])


class TransformerStack(nnx.Module):
    """The L encoder layers, stored stacked and run with lax.scan (BGEM3Model.encoder, transformers' `encoder`)."""

    def __init__(self, cfg: M3Config, dtype, rngs: nnx.Rngs):
        @nnx.split_rngs(splits=cfg.num_layers)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def make(r: nnx.Rngs) -> Layer:
            return Layer(cfg, dtype, r)

        self.layer = make(rngs)  # every parameter has a leading [L] axis
        # Rematerialisation (training): each layer's activations are recomputed in the backward pass instead of
        # stored, so the memory of a step is one layer's, not L layers'. A static attribute: part of the graphdef.
        self.remat = False

    def __call__(self, x: jax.Array, mask: jax.Array, impl: str, dropout_rng: jax.Array | None = None,
                 projections: str = "xla") -> jax.Array:
        graphdef, state = nnx.split(self.layer)
        num_layers = jax.tree_util.tree_leaves(state)[0].shape[0]
        keys = None if dropout_rng is None else jax.random.split(dropout_rng, num_layers)

        def body(h, xs):
            layer_state, key = xs
            return nnx.merge(graphdef, layer_state)(h, mask, impl, key, projections), None

        x, _ = jax.lax.scan(jax.checkpoint(body) if self.remat else body, x, (state, keys))
        return x


class BGEM3Model(nnx.Module):
    """XLM-RoBERTa + dense (CLS), sparse (`sparse_linear`, D -> 1) and ColBERT (`colbert_linear`, D -> C) heads."""

    def __init__(self, cfg: M3Config, *, dtype: Any = "float32", rngs: nnx.Rngs | None = None):
        rngs = rngs if rngs is not None else nnx.Rngs(0)
        dtype = resolve_dtype(dtype)
        self.config = cfg
        self.dtype = dtype
        self.embeddings = Embeddings(cfg, dtype, rngs)
        self.encoder = TransformerStack(cfg, dtype, rngs)
        self.colbert_linear = _linear(cfg.hidden_size, cfg.colbert_dim, dtype, rngs)
        self.sparse_linear = _linear(cfg.hidden_size, 1, dtype, rngs)

    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array, *, attn_impl: str = "auto",
                 pooling: str = "cls", normalize: bool = True, truncate_dim: int | None = None,
                 dropout_rng: jax.Array | None = None, cls_mask: jax.Array | None = None,
                 projections: str = "xla") -> ModelOutputs:
        """Runs the encoder and all three heads.

        Args:
          input_ids: [B, T] int, right-padded with pad_token_id.
          attention_mask: [B, T], 1 for real tokens.
          attn_impl: see m3jax.attention.
          pooling: "cls" (BGE-M3) or "mean" (masked mean), as FlagEmbedding's pooling_method.
          normalize: L2-normalise dense and ColBERT vectors (FlagEmbedding's normalize_embeddings).
          truncate_dim: keep only the first dims of dense and ColBERT vectors, before normalising.
          dropout_rng: a PRNG key turns on dropout at the config's rates (training); None (inference) is exact.
          cls_mask: [B, T] bool, multiple CLS (MCLS, see m3jax.pipeline.insert_cls): dense is the mean of the hidden
            states at the marked positions instead of position 0's. Only with pooling "cls".
          projections: how the dense projections run, one of PROJECTIONS (m3jax.engine.projections chooses).
            "split": each feed-forward up-projection ([T, D] x [D, 4D]) as four [D, D] column blocks, the same
            sums, faster under Eigen's CPU matmul than one product (XLA's default YNNPACK dots are not faster in
            blocks; benchmarks/RESULTS.md).
        Returns ModelOutputs.
        """
        if pooling not in ("cls", "mean"):
            raise ValueError(f"pooling must be 'cls' or 'mean', got {pooling!r}")
        if cls_mask is not None and pooling != "cls":
            raise ValueError(f"cls_mask (MCLS) pools CLS positions; it needs pooling='cls', got {pooling!r}")
        if projections not in PROJECTIONS:
            raise ValueError(f"projections must be one of {PROJECTIONS}, got {projections!r}")
        mask = attention_mask.astype(bool)
        r = (None, None) if dropout_rng is None else tuple(jax.random.split(dropout_rng))
        h = self.encoder(self.embeddings(input_ids, r[0]), mask, attn_impl, r[1], projections)
        hc = h.astype(self.dtype)
        if cls_mask is not None:
            w = cls_mask.astype(jnp.float32)[..., None]
            dense = (h * w).sum(1) / w.sum(1)
        elif pooling == "cls":
            dense = h[:, 0]
        else:
            dense = (h * mask[..., None]).sum(1) / mask.sum(1, keepdims=True)
        sparse = jax.nn.relu(project(self.sparse_linear, hc).astype(jnp.float32))[..., 0]
        colbert = project(self.colbert_linear, hc[:, 1:]).astype(jnp.float32) * mask[:, 1:, None]
        if truncate_dim is not None:
            dense, colbert = dense[..., :truncate_dim], colbert[..., :truncate_dim]
        if normalize:
            dense, colbert = l2_normalize(dense), l2_normalize(colbert)
        return ModelOutputs(h, dense, sparse, colbert)


def l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
    """x / max(||x||, eps) over the last axis, in float32 (torch.nn.functional.normalize)."""
    x = x.astype(jnp.float32)
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)


def init_model(cfg: M3Config, *, dtype: Any = "float32", seed: int = 0) -> BGEM3Model:
    """A randomly initialised model (the demo's offline fallback, tests, fine-tuning from scratch)."""
    return BGEM3Model(cfg, dtype=dtype, rngs=nnx.Rngs(seed))


def abstract_model(cfg: M3Config, *, dtype: Any = "float32") -> BGEM3Model:
    """The model's structure with ShapeDtypeStruct leaves: no memory, for restoring checkpoints."""
    return nnx.eval_shape(lambda: BGEM3Model(cfg, dtype=dtype, rngs=nnx.Rngs(0)))


def model_from_params(cfg: M3Config, params: Any, *, dtype: Any = "float32") -> BGEM3Model:
    """Builds the model around a (float32) parameter tree, casting each leaf to the model's own dtype."""
    graphdef, abstract = nnx.split(abstract_model(cfg, dtype=dtype))
    pure = nnx.to_pure_dict(abstract)
    cast = jax.tree_util.tree_map(lambda a, p: jnp.asarray(p, dtype=a.dtype), pure, dict(params))
    nnx.replace_by_pure_dict(abstract, cast)
    return nnx.merge(graphdef, abstract)


@functools.partial(jax.jit, static_argnames=("graphdef", "attn_impl", "projections"))
def forward(graphdef: nnx.GraphDef, state: nnx.State, input_ids: jax.Array, attention_mask: jax.Array,
            *, attn_impl: str = "auto", dropout_rng: jax.Array | None = None, projections: str = "xla"
            ) -> ModelOutputs:
    """Pure jitted forward over `nnx.split(model)` (outputs nobody reads are pruned by XLA)."""
    return nnx.merge(graphdef, state)(input_ids, attention_mask, attn_impl=attn_impl, dropout_rng=dropout_rng,
                                      projections=projections)
