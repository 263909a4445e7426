"""FlagEmbedding 1.4.2's BGE-M3 training loss (`EncoderOnlyEmbedderM3Model.forward` on `AbsEmbedderModel`), in JAX.

Every function mirrors one reference method; the names say which. Scores are divided by the temperature, as the
reference's `compute_*_score` do. Shapes: B queries per device, G passages per query (positive first), N = B·G
passages, D hidden width, C ColBERT width, V vocabulary, W devices on the data axis.

Two places where m3jax's static shapes would otherwise change the reference's numbers:
  * ColBERT: the reference takes max over every passage position, padding included; a padded position holds a zero
    vector, so a passage shorter than the padded batch gets a floor of 0 on each query token's max. Training batches
    here are padded to length buckets, not to the longest passage, so the floor is applied from the lengths: a passage
    shorter than `reference_pad_length` (longest passage in the device batch, rounded up to pad_to_multiple_of, as
    transformers' `tokenizer.pad(padding=True)` does) gets it, whatever the bucket.
  * Sparse: the vocabulary vector is the max over positions of the scattered token weights (the reference's
    training path); padding positions carry the pad id, whose column is zeroed, so padding never counts.
Cross-device negatives follow the reference's DDP semantics exactly: the gathered representations of other devices
are constants (torch.distributed.all_gather does not backpropagate), the device's own block keeps its gradient, and
gradients are averaged over devices (`value_and_grad` with a mesh). So, as in FlagEmbedding, the cross-device dense
term's gradient is 1/W of the gradient of the global loss whose value every device reports.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

KD_LOSS_TYPES = ("kl_div", "m3_kd_loss")
ENSEMBLE_WEIGHTS = (1.0, 0.3, 1.0)  # dense, sparse, colbert: EncoderOnlyEmbedderM3Model.ensemble_score
DATA_AXIS = "data"


@dataclasses.dataclass(frozen=True)
class LossConfig:
    """The reference's training flags (EncoderOnlyEmbedderM3TrainingArguments and AbsEmbedderTrainingArguments);
    defaults are the argparse defaults the M3 runner passes, not the model class's own defaults.

    Attributes:
      temperature: scores are divided by it (0.02).
      unified_finetuning: train the sparse and ColBERT heads too: loss (L_d + L_e + 0.1 L_s + L_c) / 4; off: L_d only
        and the heads are frozen (the reference does not even build them into the model).
      use_self_distill: add the self-distillation term once step > self_distill_start_step (unified only).
      self_distill_start_step: see above; `step` counts forward calls before this one (the reference's self.step).
      kd_loss_type: "kl_div" or "m3_kd_loss", used when the batch carries teacher scores.
      negatives_cross_device: the dense loss takes negatives from every device on the data axis.
      no_in_batch_neg: the reference's per-dataset `no_in_batch_neg_flag`: each query only sees its own G passages.
      sentence_pooling_method: "cls" or "mean".
      normalize_embeddings: L2-normalise dense and ColBERT vectors.
      fix_encoder: train only colbert_linear and sparse_linear.
      fix_position_embedding: freeze embeddings.position_embeddings.
      pad_to_multiple_of: the data collator's pad_to_multiple_of (None: pad to the longest); sets where the
        reference's ColBERT zero floor applies (see the module docstring).
      use_mrl, mrl_dims: Matryoshka training of the dense vector, as FlagEmbedding's dense embedders define it
        (AbsEmbedderModel with use_mrl; its M3 model raises NotImplementedError): the dense loss is the mean of the
        dense losses over the first d dimensions of the pooled vector, normalised after truncation, for each d in
        mrl_dims (a d above the width counts as the full width, as the reference's warning says).
      colbert_mrl_dims: the same for the ColBERT projection (unified_finetuning with use_mrl): the ColBERT loss is
        the mean over these widths. The ensemble and self-distillation scores keep the full widths. Inference serves
        a trained width with truncate_dim.
    """

    temperature: float = 0.02
    unified_finetuning: bool = False
    use_self_distill: bool = False
    self_distill_start_step: int = -1
    kd_loss_type: str = "kl_div"
    negatives_cross_device: bool = False
    no_in_batch_neg: bool = False
    sentence_pooling_method: str = "cls"
    normalize_embeddings: bool = True
    fix_encoder: bool = False
    fix_position_embedding: bool = False
    pad_to_multiple_of: int | None = None
    use_mrl: bool = False
    mrl_dims: tuple[int, ...] = ()
    colbert_mrl_dims: tuple[int, ...] = ()

    def __post_init__(self):
        for name in ("mrl_dims", "colbert_mrl_dims"):
            object.__setattr__(self, name, tuple(int(d) for d in getattr(self, name)))
            if any(d < 1 for d in getattr(self, name)):
                raise ValueError(f"{name} must be positive widths, got {getattr(self, name)}")
        if self.use_mrl and not self.mrl_dims:
            raise ValueError("mrl_dims should be provided when use_mrl is True")  # the reference's own check
        if self.colbert_mrl_dims and not (self.use_mrl and self.unified_finetuning):
            raise ValueError("colbert_mrl_dims needs use_mrl and unified_finetuning (the ColBERT loss)")
        if self.mrl_dims and not self.use_mrl:
            raise ValueError(f"mrl_dims {self.mrl_dims} given without use_mrl")
        if self.kd_loss_type not in KD_LOSS_TYPES:
            raise ValueError(f"kd_loss_type must be one of {KD_LOSS_TYPES}, got {self.kd_loss_type!r}")
        if self.sentence_pooling_method not in ("cls", "mean"):
            raise ValueError(f"sentence_pooling_method must be 'cls' or 'mean' (FlagEmbedding's 'last_token' is "
                             f"for decoders), got {self.sentence_pooling_method!r}")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if self.pad_to_multiple_of is not None and self.pad_to_multiple_of <= 0:
            raise ValueError(f"pad_to_multiple_of must be None or positive, got {self.pad_to_multiple_of}")
        if self.fix_encoder and not self.unified_finetuning:
            raise ValueError("fix_encoder without unified_finetuning leaves nothing to train")

    def trainable(self, path: str) -> bool:
        """is_trainable under these flags."""
        return is_trainable(path, self)

    def objective(self, graphdef: nnx.GraphDef, state: nnx.State, batch: dict, step: jax.Array,
                  axis_name: str | None = None, dropout_rng: jax.Array | None = None) -> tuple[jax.Array, dict]:
        """The loss accumulate_step differentiates: loss_fn under these flags."""
        return loss_fn(graphdef, state, batch, step, self, axis_name, dropout_rng)


@dataclasses.dataclass(frozen=True)
class RerankerLossConfig:
    """The re-ranker's training objective, FlagEmbedding's encoder-only CrossEncoderModel: listwise cross-entropy
    over each group (positive first), plus the distillation term when the batch carries teacher scores
    (reranker_loss). FlagEmbedding gives it no options, and every parameter trains."""

    def trainable(self, path: str) -> bool:
        return True

    def objective(self, graphdef: nnx.GraphDef, state: nnx.State, batch: dict, step: jax.Array,
                  axis_name: str | None = None, dropout_rng: jax.Array | None = None) -> tuple[jax.Array, dict]:
        """reranker_loss over a RerankerModel's logits. batch: ids, mask [B, G, L] (pairs, each group's positive
        first); optional teacher_scores [B, G]. Each device's loss is its own groups' (as each DDP rank's)."""
        B, G, L = batch["ids"].shape
        model = nnx.merge(graphdef, state)
        logits = model(batch["ids"].reshape(B * G, L), batch["mask"].reshape(B * G, L), dropout_rng=dropout_rng)
        teacher = batch.get("teacher_scores")
        return reranker_loss(logits, G, None if teacher is None else teacher.reshape(-1)), {}


# ------------------------------------------------------------------------------------------------------- scores
def dense_scores(q: jax.Array, p: jax.Array, temperature: float) -> jax.Array:
    """q [B, D], p [N, D] -> [B, N]."""
    return jnp.matmul(q, p.T, precision="highest") / temperature


def sparse_vectors(input_ids: jax.Array, weights: jax.Array, attention_mask: jax.Array, vocab_size: int,
                   special_ids: tuple[int, ...]) -> jax.Array:
    """Vocabulary vectors [B, V]: per token id the max weight over the row's positions, special ids zeroed.

    input_ids, weights (relu'd sparse_linear outputs), attention_mask: [B, T]. The reference scatters into
    [B, T, V] and takes max over T; a scatter-max straight into [B, V] gives the same values, and the same gradient
    unless one id carries exactly the same positive weight at two positions (then JAX splits it, torch picks one).
    """
    b = input_ids.shape[0]
    w = weights.astype(jnp.float32) * attention_mask.astype(jnp.float32)  # padding carries the pad id anyway
    vec = jnp.zeros((b, vocab_size), jnp.float32).at[jnp.arange(b)[:, None], input_ids].max(w)
    return vec.at[:, jnp.asarray(special_ids)].set(0.0)


def sparse_scores(q: jax.Array, p: jax.Array, temperature: float) -> jax.Array:
    """q [B, V], p [N, V] -> [B, N]."""
    return jnp.matmul(q, p.T, precision="highest") / temperature


def reference_pad_length(attention_mask: jax.Array, pad_to_multiple_of: int | None) -> jax.Array:
    """The length transformers' tokenizer.pad(padding=True, pad_to_multiple_of=m) gives this batch: a scalar."""
    n = attention_mask.astype(jnp.int32).sum(1).max()
    return n if not pad_to_multiple_of else -(-n // pad_to_multiple_of) * pad_to_multiple_of


def colbert_scores(q: jax.Array, q_mask: jax.Array, p: jax.Array, p_mask: jax.Array, temperature: float,
                   ref_len: jax.Array) -> jax.Array:
    """Late interaction: q [B, Tq-1, C], q_mask [B, Tq], p [N, Tp-1, C], p_mask [N, Tp] -> [B, N].

    Per query token the max over the passage's real tokens, floored at 0 when the passage is shorter than ref_len
    (it had zero-vector padding in the reference's batch); summed over query tokens, divided by the query's
    token count (q_mask[:, 1:]) and the temperature.
    """
    tok = jnp.einsum("qin,pjn->qipj", q, p, precision="highest")  # [B, Tq-1, N, Tp-1]
    real = p_mask[:, 1:].astype(bool)
    best = jnp.where(real[None, None], tok, -jnp.inf).max(-1)  # [B, Tq-1, N]
    padded = p_mask.astype(jnp.int32).sum(1) < ref_len  # [N]
    best = jnp.where(padded[None, None], jnp.maximum(best, 0.0), best)
    # Query padding rows are zero vectors in q, so they add 0 to the sum, as in the reference.
    return best.sum(1) / q_mask[:, 1:].astype(jnp.float32).sum(-1, keepdims=True) / temperature


# ------------------------------------------------------------------------------------------------------- losses
def cross_entropy(scores: jax.Array, targets: jax.Array) -> jax.Array:
    """torch.nn.CrossEntropyLoss(reduction='mean'): scores [R, N], targets [R] int."""
    logp = jax.nn.log_softmax(scores, axis=-1)
    return -jnp.take_along_axis(logp, targets[:, None], axis=-1)[:, 0].mean()


def local_scores(scores: jax.Array, group_size: int) -> jax.Array:
    """AbsEmbedderModel.get_local_score: scores [R, M] -> [R, G], row r's columns r·G .. r·G+G-1."""
    rows = jnp.arange(scores.shape[0])
    return jnp.stack([scores[rows, rows * group_size + i] for i in range(group_size)], axis=1)


def kl_div(teacher_targets: jax.Array, student_scores: jax.Array) -> jax.Array:
    """distill_loss('kl_div'): -mean_r Σ_j t[r, j] · log_softmax(s)[r, j] (broadcasting as torch does)."""
    return -jnp.mean(jnp.sum(jax.nn.log_softmax(student_scores, axis=-1) * teacher_targets, axis=-1))


def reranker_loss(logits: jax.Array, group_size: int, teacher_scores: jax.Array | None = None) -> jax.Array:
    """FlagEmbedding's encoder-only re-ranker loss (AbsRerankerModel.forward in training): logits [B * G] of B groups,
    each its positive first and G - 1 negatives; cross-entropy towards the positive, mean over groups, plus with
    teacher_scores [B * G] (pos_scores, neg_scores) kl_div against their softmax per group."""
    grouped = logits.reshape(-1, group_size).astype(jnp.float32)
    loss = cross_entropy(grouped, jnp.zeros(grouped.shape[0], jnp.int32))
    if teacher_scores is not None:
        teacher = jax.nn.softmax(jnp.asarray(teacher_scores, jnp.float32).reshape(-1, group_size), axis=-1)
        loss = loss + kl_div(jax.lax.stop_gradient(teacher), grouped)
    return loss


def m3_kd_loss(teacher_targets: jax.Array, student_scores: jax.Array, group_size: int) -> jax.Array:
    """distill_loss('m3_kd_loss'): Σ_i mean_r t[r, i] · CE(s_r + mask, r·G + i), where after step i the column
    r·G + i of row r is pushed to float32's min (a listwise, Plackett-Luce-like target over the group).

    teacher_targets [R, G]; student_scores [R, M] (M = R·G for in-batch scores).
    """
    rows = jnp.arange(student_scores.shape[0])
    labels = rows * group_size
    mask = jnp.zeros_like(student_scores)
    loss = 0.0
    for i in range(group_size):
        target = labels + i
        logp = jax.nn.log_softmax(student_scores + mask, axis=-1)
        ce = -logp[rows, target]
        loss = loss + jnp.mean(teacher_targets[:, i] * ce)
        mask = mask.at[rows, target].set(jnp.finfo(student_scores.dtype).min)
    return loss


def distill_loss(kd_loss_type: str, teacher_targets: jax.Array, student_scores: jax.Array,
                 group_size: int) -> jax.Array:
    if kd_loss_type == "kl_div":
        return kl_div(teacher_targets, student_scores)
    return m3_kd_loss(teacher_targets, student_scores, group_size)


def no_in_batch_neg_loss(scores: jax.Array, group_size: int, teacher_targets: jax.Array | None,
                         kd_loss_type: str) -> tuple[jax.Array, jax.Array]:
    """_compute_no_in_batch_neg_loss on precomputed all-pairs scores [B, M]: (local scores [B, G], loss)."""
    local = local_scores(scores, group_size)
    zeros = jnp.zeros(local.shape[0], jnp.int32)
    if teacher_targets is None:
        return local, cross_entropy(local, zeros)
    loss = distill_loss(kd_loss_type, teacher_targets, local, group_size)
    if kd_loss_type == "kl_div":
        loss = loss + cross_entropy(local, zeros)
    return local, loss


def in_batch_neg_loss(scores: jax.Array, group_size: int, teacher_targets: jax.Array | None,
                      kd_loss_type: str) -> tuple[jax.Array, jax.Array]:
    """_compute_in_batch_neg_loss on scores [B, B·G]: (scores, loss); target of query b is passage b·G."""
    targets = jnp.arange(scores.shape[0]) * group_size
    if teacher_targets is None:
        return scores, cross_entropy(scores, targets)
    if kd_loss_type == "kl_div":
        loss = kl_div(teacher_targets, local_scores(scores, group_size)) + cross_entropy(scores, targets)
    else:
        loss = m3_kd_loss(teacher_targets, scores, group_size)
    return scores, loss


def gather_constant(x: jax.Array, axis_name: str) -> jax.Array:
    """AbsEmbedderModel._dist_gather_tensor: [R, ...] -> [W·R, ...] over the data axis; other devices' blocks are
    constants and this device's block is x itself (so only it carries a gradient), as with torch.distributed."""
    everyone = jax.lax.all_gather(jax.lax.stop_gradient(x), axis_name, tiled=True)
    start = jax.lax.axis_index(axis_name) * x.shape[0]
    return jax.lax.dynamic_update_slice_in_dim(everyone, x, start, axis=0)


def cross_device_neg_loss(q: jax.Array, p: jax.Array, group_size: int, teacher_targets: jax.Array | None,
                          kd_loss_type: str, score_fn, axis_name: str) -> tuple[jax.Array, jax.Array]:
    """_compute_cross_device_neg_loss: (global scores [W·B, W·B·G], loss); call inside shard_map over axis_name."""
    cq, cp = gather_constant(q, axis_name), gather_constant(p, axis_name)
    scores = score_fn(cq, cp)
    targets = jnp.arange(scores.shape[0]) * group_size
    if teacher_targets is None:
        return scores, cross_entropy(scores, targets)
    if kd_loss_type == "kl_div":
        b = q.shape[0]
        mine = jax.lax.dynamic_slice_in_dim(local_scores(scores, group_size),
                                            jax.lax.axis_index(axis_name) * b, b, axis=0)
        loss = kl_div(teacher_targets, mine) + cross_entropy(scores, targets)
    else:
        loss = m3_kd_loss(gather_constant(teacher_targets, axis_name), scores, group_size)
    return scores, loss


# ------------------------------------------------------------------------------------------------- combination
def m3_loss(q: dict, p: dict, q_mask: jax.Array, p_mask: jax.Array, teacher_scores: jax.Array | None,
            step: jax.Array, flags: LossConfig, axis_name: str | None = None) -> tuple[jax.Array, dict]:
    """EncoderOnlyEmbedderM3Model.forward's training branch, on representations.

    Args:
      q, p: {"dense": [B|N, D], "sparse": [B|N, V] vocabulary vectors, "colbert": [B|N, T-1, C]} (sparse and
        colbert only read with unified_finetuning).
      q_mask [B, Tq], p_mask [N, Tp]: attention masks (ColBERT's query token count and padding floor).
      teacher_scores: [B, G] raw teacher scores (softmaxed here) or None.
      step: scalar int, forward calls before this one (self-distillation starts when step > start step).
      axis_name: the data axis when called inside shard_map; None means one device (cross-device negatives then
        reduce to in-batch negatives, as with a world of one).
    Returns (loss, {component: value}).
    """
    B, N = q["dense"].shape[0], p["dense"].shape[0]
    if N % B:
        raise ValueError(f"{N} passages for {B} queries: not a whole group per query")
    G = N // B
    temp = flags.temperature
    teacher = None if teacher_scores is None else jax.nn.softmax(
        jax.lax.stop_gradient(teacher_scores.astype(jnp.float32)).reshape(B, -1), axis=-1)
    kd = flags.kd_loss_type
    dense_fn = functools.partial(dense_scores, temperature=temp)
    cross = flags.negatives_cross_device and axis_name is not None and not flags.no_in_batch_neg

    if flags.no_in_batch_neg and teacher is not None and kd == "m3_kd_loss" and B > 1:
        raise ValueError("no_in_batch_neg with m3_kd_loss fails in FlagEmbedding 1.4.2 for batch size > 1: its "
                         "targets b·G + i fall outside the [B, G] local scores")

    def dense_loss(qd, pd):
        if flags.no_in_batch_neg:
            return no_in_batch_neg_loss(dense_fn(qd, pd), G, teacher, kd)
        if cross:
            return cross_device_neg_loss(qd, pd, G, teacher, kd, dense_fn, axis_name)
        return in_batch_neg_loss(dense_fn(qd, pd), G, teacher, kd)

    d_scores, d_loss = dense_loss(q["dense"], p["dense"])
    if flags.use_mrl:
        d_loss = _mrl_mean(lambda d: dense_loss(*(mrl_truncate(x["dense_raw"], d, flags) for x in (q, p)))[1],
                           flags.mrl_dims, q["dense_raw"].shape[-1])
    parts = {"dense": d_loss}
    if not flags.unified_finetuning:
        return d_loss, parts

    local_loss = no_in_batch_neg_loss if flags.no_in_batch_neg else in_batch_neg_loss
    s_scores, s_loss = local_loss(sparse_scores(q["sparse"], p["sparse"], temp), G, teacher, kd)
    ref_len = reference_pad_length(p_mask, flags.pad_to_multiple_of)
    colbert_loss = lambda qc, pc: local_loss(colbert_scores(qc, q_mask, pc, p_mask, temp, ref_len),  # noqa: E731
                                             G, teacher, kd)
    c_scores, c_loss = colbert_loss(q["colbert"], p["colbert"])
    if flags.colbert_mrl_dims:
        c_loss = _mrl_mean(lambda d: colbert_loss(*(mrl_truncate(x["colbert_raw"], d, flags) for x in (q, p)))[1],
                           flags.colbert_mrl_dims, q["colbert_raw"].shape[-1])
    if cross:
        start = jax.lax.axis_index(axis_name)
        d_scores = jax.lax.dynamic_slice(d_scores, (start * B, start * N), (B, N))
    w_d, w_s, w_c = ENSEMBLE_WEIGHTS
    ens = w_d * d_scores + w_s * s_scores + w_c * c_scores
    if flags.no_in_batch_neg:
        # The reference passes p_dense_vecs[::G] (B rows) here, so its group size becomes 1 and get_local_score
        # picks ens[b, b] from the [B, G] local matrix (FlagEmbedding issue #1410's fix); mirrored as is.
        if B > G:
            raise ValueError(f"no_in_batch_neg with unified_finetuning needs batch size <= group size ({B} > {G}): "
                             "FlagEmbedding 1.4.2 indexes out of range there")
        e_scores, e_loss = no_in_batch_neg_loss(ens, 1, teacher, kd)
    else:
        e_scores, e_loss = in_batch_neg_loss(ens, G, teacher, kd)
    loss = (d_loss + e_loss + 0.1 * s_loss + c_loss) / 4
    parts.update(sparse=s_loss, colbert=c_loss, ensemble=e_loss)
    if flags.use_self_distill:
        target = jax.nn.softmax(jax.lax.stop_gradient(e_scores), axis=-1)
        sd = (kl_div(target, d_scores) + 0.1 * kl_div(target, s_scores) + kl_div(target, c_scores)) / 3
        parts["self_distill"] = sd
        loss = jnp.where(step > flags.self_distill_start_step, (loss + sd) / 2, loss)
    return loss, parts


def mrl_truncate(x: jax.Array, dim: int, flags: LossConfig) -> jax.Array:
    """The first dim features of un-normalised vectors (all of them if dim exceeds the width), normalised after
    truncation when the flags normalise: AbsEmbedderModel.encode's MRL branch."""
    x = x[..., :dim]
    return l2_normalize(x) if flags.normalize_embeddings else x


def _mrl_mean(loss_at, dims: tuple[int, ...], width: int) -> jax.Array:
    """The mean of loss_at(d) over dims (AbsEmbedderModel.forward's MRL loss: summed, divided by len(mrl_dims))."""
    return sum(loss_at(min(d, width)) for d in dims) / len(dims)


# ----------------------------------------------------------------------------------------------- over the model
def is_trainable(path: str, flags: LossConfig) -> bool:
    """Whether the parameter at m3jax path ("embeddings/position_embeddings/embedding") gets a gradient, as the
    M3 runner sets requires_grad (names matched on the torch side: "position_embeddings", "colbert_linear",
    "sparse_linear"); without unified_finetuning the heads are not part of the reference's model at all."""
    head = path.startswith(("colbert_linear/", "sparse_linear/"))
    if head:
        return flags.unified_finetuning
    if flags.fix_encoder:
        return False
    return not (flags.fix_position_embedding and "position_embeddings" in path)


def param_path(keypath) -> str:
    """A state keypath as an m3jax parameter path: "encoder/layer/attention/self/query/kernel"."""
    return "/".join(str(k.key) for k in keypath if isinstance(k, jax.tree_util.DictKey))


def trainable_mask(state: Any, flags: LossConfig) -> Any:
    """A pytree like state with True where the parameter is trained (for optax.masked and the like)."""
    return jax.tree_util.tree_map_with_path(lambda kp, _: is_trainable(param_path(kp), flags), state)


def freeze(state: Any, flags: LossConfig) -> Any:
    """state with stop_gradient on every frozen parameter: their gradients are exactly zero."""
    return jax.tree_util.tree_map_with_path(
        lambda kp, x: x if is_trainable(param_path(kp), flags) else jax.lax.stop_gradient(x), state)


def encode(model, input_ids: jax.Array, attention_mask: jax.Array, flags: LossConfig,
           dropout_rng: jax.Array | None = None) -> dict:
    """EncoderOnlyEmbedderM3Model._encode: dense [R, D], sparse vocabulary vectors [R, V], colbert [R, T-1, C]; with
    MRL also the un-normalised dense_raw and (colbert_mrl_dims) colbert_raw, which mrl_truncate cuts.
    dropout_rng: a key turns on the model's dropout (training); None computes without it (parity)."""
    out = model(input_ids, attention_mask, pooling=flags.sentence_pooling_method, normalize=False,
                dropout_rng=dropout_rng)
    cfg = model.config
    norm = l2_normalize if flags.normalize_embeddings else (lambda x: x)
    reps = {"dense": norm(out.dense)}
    if flags.use_mrl:
        reps["dense_raw"] = out.dense
    if flags.unified_finetuning:
        reps["sparse"] = sparse_vectors(input_ids, out.sparse, attention_mask, cfg.vocab_size, cfg.special_ids)
        reps["colbert"] = norm(out.colbert)
        if flags.colbert_mrl_dims:
            reps["colbert_raw"] = out.colbert
    return reps


def l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
    """torch.nn.functional.normalize over the last axis, with its gradient at 0: padded ColBERT rows are zero
    vectors, where jnp.linalg.norm's gradient is NaN and torch's is 0."""
    sq = jnp.sum(x * x, axis=-1, keepdims=True)
    norm = jnp.where(sq > 0, jnp.sqrt(jnp.where(sq > 0, sq, 1.0)), 0.0)
    return x / jnp.maximum(norm, eps)


def loss_fn(graphdef: nnx.GraphDef, state: nnx.State, batch: dict, step: jax.Array, flags: LossConfig,
            axis_name: str | None = None, dropout_rng: jax.Array | None = None) -> tuple[jax.Array, dict]:
    """The reference's training loss over the NNX model; differentiate with respect to state.

    batch: q_ids, q_mask [B, Tq]; p_ids, p_mask [B·G, Tp] (each query's positive first); optional
    teacher_scores [B, G]. Frozen parameters (see is_trainable) get zero gradients. dropout_rng: a key applies
    dropout at the config's rates (training); None applies none (parity runs the reference with probabilities 0).
    """
    model = nnx.merge(graphdef, freeze(state, flags))
    kq, kp = (None, None) if dropout_rng is None else tuple(jax.random.split(dropout_rng))
    q = encode(model, batch["q_ids"], batch["q_mask"], flags, kq)
    p = encode(model, batch["p_ids"], batch["p_mask"], flags, kp)
    return m3_loss(q, p, batch["q_mask"], batch["p_mask"], batch.get("teacher_scores"), step, flags, axis_name)


def cached_value_and_grad(graphdef: nnx.GraphDef, state: nnx.State, batch: dict, step: jax.Array, flags: LossConfig,
                          chunk: int, axis_name: str | None = None, dropout_rng: jax.Array | None = None
                          ) -> tuple[tuple[jax.Array, dict], nnx.State]:
    """((loss, parts), gradients with respect to state) of loss_fn, by a gradient cache (GradCache, Gao et al. 2021):
    every query and passage is encoded `chunk` rows at a time without keeping activations; the loss and its gradient
    with respect to those representations are taken; then each chunk is encoded again and its part of the parameter
    gradient is the vector-Jacobian product with the representations' gradient. Peak memory is one chunk's
    activations plus the batch's representations, not the whole batch's activations, and the result equals
    jax.value_and_grad(loss_fn) to float32 rounding (the sums are ordered differently). Without dropout; with it,
    each chunk draws its own masks (the same in both passes), so the draw differs from loss_fn's.

    chunk: rows per encoder call (capped at the query and the passage counts, each of which it must divide).
    """
    frozen = lambda st: freeze(st, flags)  # noqa: E731
    kq, kp = (None, None) if dropout_rng is None else tuple(jax.random.split(dropout_rng))

    def chunked(ids, mask, key):
        rows = ids.shape[0]
        c = min(chunk, rows)
        if rows % c:
            raise ValueError(f"gradient cache: {rows} rows are not a whole number of chunks of {c}")
        n = jnp.arange(rows // c)
        keys = n if key is None else jax.vmap(lambda i: jax.random.fold_in(key, i))(n)  # chunk i: fold_in(key, i)
        return ids.reshape(rows // c, c, -1), mask.reshape(rows // c, c, -1), keys, key is not None

    def encode_chunk(st, ids, mask, key, keyed):
        return encode(nnx.merge(graphdef, frozen(st)), ids, mask, flags, key if keyed else None)

    def forward(ids, mask, key):
        xs, ms, ks, keyed = chunked(ids, mask, key)
        reps = jax.lax.map(lambda a: encode_chunk(state, *a, keyed), (xs, ms, ks))
        return jax.tree_util.tree_map(lambda r: r.reshape(-1, *r.shape[2:]), reps)

    q = jax.lax.stop_gradient(forward(batch["q_ids"], batch["q_mask"], kq))
    p = jax.lax.stop_gradient(forward(batch["p_ids"], batch["p_mask"], kp))

    def on_reps(q, p):
        return m3_loss(q, p, batch["q_mask"], batch["p_mask"], batch.get("teacher_scores"), step, flags, axis_name)

    (loss, parts), (gq, gp) = jax.value_and_grad(on_reps, argnums=(0, 1), has_aux=True)(q, p)

    def backward(grads, ids, mask, key, cot):
        xs, ms, ks, keyed = chunked(ids, mask, key)
        cots = jax.tree_util.tree_map(lambda g: g.reshape(xs.shape[0], xs.shape[1], *g.shape[1:]), cot)

        def body(acc, a):
            *inputs, c = a
            _, vjp = jax.vjp(lambda st: encode_chunk(st, *inputs, keyed), state)
            return jax.tree_util.tree_map(jnp.add, acc, vjp(c)[0]), None

        return jax.lax.scan(body, grads, (xs, ms, ks, cots))[0]

    grads = jax.tree_util.tree_map(jnp.zeros_like, state)
    grads = backward(grads, batch["q_ids"], batch["q_mask"], kq, gq)
    grads = backward(grads, batch["p_ids"], batch["p_mask"], kp, gp)
    return (loss, parts), grads


@functools.partial(jax.jit, static_argnames=("graphdef", "flags", "mesh", "axis_name"))
def value_and_grad(graphdef: nnx.GraphDef, state: nnx.State, batch: dict, step: jax.Array, flags: LossConfig,
                   mesh: jax.sharding.Mesh | None = None, axis_name: str = DATA_AXIS
                   ) -> tuple[tuple[jax.Array, dict], nnx.State]:
    """((loss, parts), grads). With a mesh, the batch's leading axes are split over mesh axis axis_name, each device
    computes the reference's per-rank loss, and loss, parts and gradients are averaged over devices (DDP)."""
    if mesh is None:
        return jax.value_and_grad(loss_fn, argnums=1, has_aux=True)(graphdef, state, batch, step, flags)
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    world = mesh.shape[axis_name]
    for key, x in batch.items():
        if x.shape[0] % world:
            raise ValueError(f"batch[{key!r}] has {x.shape[0]} rows, not divisible by the {world} devices of mesh "
                             f"axis {axis_name!r}")
    rows = NamedSharding(mesh, P(axis_name))
    explicit = mesh.axis_types[mesh.axis_names.index(axis_name)] == jax.sharding.AxisType.Explicit
    batch = jax.reshard(batch, rows) if explicit else jax.lax.with_sharding_constraint(batch, rows)

    def per_device(state, batch, step):
        loss, parts = loss_fn(graphdef, state, batch, step, flags, axis_name)
        return jax.tree_util.tree_map(lambda x: x[None], (loss, parts))

    def mean_loss(state):
        stacked = jax.shard_map(per_device, mesh=mesh, in_specs=(P(), P(axis_name), P()),
                                out_specs=P(axis_name))(state, batch, step)
        loss, parts = jax.tree_util.tree_map(lambda x: x.mean(0), stacked)
        return loss, parts

    return jax.value_and_grad(mean_loss, has_aux=True)(state)
