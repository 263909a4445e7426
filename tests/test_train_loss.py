"""Training-loss parity against FlagEmbedding 1.4.2's EncoderOnlyEmbedderM3Model, run side by side.

Two tiers, because every flag combination through the whole encoder would cost one ~10 s XLA compile each:
  * the loss maths over a grid of flag combinations, on given representations (dense, sparse vocabulary vectors,
    ColBERT): the reference's forward with its `encode` replaced by a lookup, against m3jax.train.loss.m3_loss;
    loss and the gradient of every representation;
  * the whole model (encoder and heads) for a set of combinations that together exercise every model-level flag:
    loss and the gradient of every parameter, through m3jax.train.loss.value_and_grad;
  * cross-device negatives with 4 forced host devices (a subprocess), against the reference run once per rank in a
    faked torch.distributed world, gradients averaged as DDP averages them.
Tolerances: loss 1e-5 relative; gradients 1e-4 relative to the parameter's largest reference gradient. The one
exception is attention.self.key.bias, whose exact gradient is 0 (a key bias adds q·b to a whole softmax row): both
sides are float32 rounding noise there, bounded relative to the same layer's key kernel gradient.
"""

import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from m3jax.checkpoint import load_params
from m3jax.model import model_from_params
from m3jax.train.loss import LossConfig, m3_loss, value_and_grad
from tests.helpers import SENTENCES, mixed
from tests.train_reference import (
    FakeWorld,
    compare_grads,
    m3jax_grads_as_torch,
    reference_loss_and_grads,
    reference_model,
    rep_model,
)

ROOT = Path(__file__).resolve().parents[1]
LOSS_TOL, GRAD_TOL = 1e-5, 1e-4
ZERO_GRAD_KEYS = "attention.self.key.bias"  # exact gradient 0; see the module docstring


def ref_kwargs(flags: LossConfig) -> dict:
    return dict(temperature=flags.temperature, kd_loss_type=flags.kd_loss_type,
                sentence_pooling_method=flags.sentence_pooling_method,
                normalize_embeddings=flags.normalize_embeddings, unified_finetuning=flags.unified_finetuning,
                use_self_distill=flags.use_self_distill, self_distill_start_step=flags.self_distill_start_step,
                negatives_cross_device=flags.negatives_cross_device)


def grad_report(ours: dict, ref: dict) -> dict[str, float]:
    """compare_grads, with key biases measured against their layer's key kernel gradient."""
    plain = {k: v for k, v in ours.items() if not k.endswith(ZERO_GRAD_KEYS)}
    out = compare_grads(plain, ref)
    for k in set(ours) - set(plain):
        if ref.get(k) is None:
            out.update(compare_grads({k: ours[k]}, ref))
            continue
        scale = float(np.abs(ref[k.replace(".bias", ".weight")]).max())
        assert float(np.abs(ref[k]).max()) <= 1e-4 * scale, f"{k}: reference gradient is not rounding noise"
        out[k] = float(np.abs(ours[k] - ref[k]).max()) / scale
    return out


# --------------------------------------------------------------------------------------------- representation tier
def random_reps(rng, n, t, d, c, v, lengths):
    """dense [n, d] unit rows, sparse [n, v] (non-negative, some zeros), colbert [n, t-1, c] unit rows with zero
    padding, mask [n, t]."""
    dense = rng.standard_normal((n, d)).astype(np.float32)
    dense /= np.linalg.norm(dense, axis=-1, keepdims=True)
    sparse = np.maximum(rng.standard_normal((n, v)), 0).astype(np.float32)
    mask = (np.arange(t)[None] < np.asarray(lengths)[:, None]).astype(np.int64)
    colbert = rng.standard_normal((n, t - 1, c)).astype(np.float32)
    colbert /= np.linalg.norm(colbert, axis=-1, keepdims=True)
    colbert *= mask[:, 1:, None]
    return dense, sparse, colbert, mask


def rep_grid():
    for unified, kd, sd, cross_free in itertools.product((False, True), (None, "kl_div", "m3_kd_loss"),
                                                         ("off", "before", "after"), (False, True)):
        if sd != "off" and not unified:
            continue  # self-distillation lives inside the unified branch
        if cross_free and kd == "m3_kd_loss":
            continue  # FlagEmbedding 1.4.2 itself fails there (m3jax raises a clear error instead)
        yield dict(unified=unified, kd=kd, sd=sd, no_in_batch=cross_free, temperature=0.02)
    yield dict(unified=True, kd="m3_kd_loss", sd="after", no_in_batch=False, temperature=0.05)
    yield dict(unified=True, kd=None, sd="after", no_in_batch=False, temperature=1.0)


def flags_of(case, **kw) -> LossConfig:
    return LossConfig(temperature=case["temperature"], unified_finetuning=case["unified"],
                      use_self_distill=case["sd"] != "off", self_distill_start_step=5,
                      kd_loss_type=case["kd"] or "kl_div", no_in_batch_neg=case["no_in_batch"], **kw)


def rep_inputs(seed, B=3, G=3, D=16, C=8, V=40, Tq=6, Tp=9, extra=4):
    """Reference tensors at the reference's padding, m3jax arrays with `extra` more padding columns."""
    rng = np.random.default_rng(seed)
    q = random_reps(rng, B, Tq, D, C, V, rng.integers(2, Tq + 1, B))
    p_len = rng.integers(2, Tp + 1, B * G)
    p_len[0] = Tp  # the reference pads to the longest passage
    p = random_reps(rng, B * G, Tp, D, C, V, p_len)
    teacher = rng.standard_normal((B, G)).astype(np.float32)
    pad = lambda x, axis: np.concatenate(  # noqa: E731
        [x, np.zeros(x.shape[:axis] + (extra,) + x.shape[axis + 1:], x.dtype)], axis=axis)
    ours = {"q": {"dense": q[0], "sparse": q[1], "colbert": pad(q[2], 1)},
            "p": {"dense": p[0], "sparse": p[1], "colbert": pad(p[2], 1)},
            "q_mask": pad(q[3], 1), "p_mask": pad(p[3], 1), "teacher": teacher}
    return q, p, teacher, ours


def reference_on_reps(case, q, p, teacher, step, flags):
    model = rep_model(q[1].shape[1], **ref_kwargs(flags))
    heads = ("dense", "sparse", "colbert")
    leaves = {f"{s}_{h}": torch.tensor(x, requires_grad=True)
              for s, reps in (("q", q), ("p", p)) for h, x in zip(heads, reps[:3], strict=True)}
    queries = {"attention_mask": torch.tensor(q[3]),
               "reps": (leaves["q_dense"], leaves["q_sparse"], leaves["q_colbert"])}
    passages = {"attention_mask": torch.tensor(p[3]),
                "reps": (leaves["p_dense"], leaves["p_sparse"], leaves["p_colbert"])}
    model.step = step
    loss = model(queries=queries, passages=passages, no_in_batch_neg_flag=case["no_in_batch"],
                 teacher_scores=None if case["kd"] is None else teacher.reshape(-1).tolist()).loss
    loss.backward()
    return float(loss.detach()), {k: (v.grad.numpy() if v.grad is not None else np.zeros_like(v.detach().numpy()))
                         for k, v in leaves.items()}


def ours_on_reps(ours, case, step, flags, unpad=True):
    def f(reps):
        return m3_loss(reps["q"], reps["p"], ours["q_mask"], ours["p_mask"],
                       None if case["kd"] is None else ours["teacher"], jnp.int32(step), flags)[0]

    reps = {"q": ours["q"], "p": ours["p"]}
    loss, g = jax.value_and_grad(f)(reps)
    out = {f"{s}_{h}": np.asarray(g[s][h]) for s in ("q", "p") for h in ("dense", "sparse", "colbert")}
    # Drop the extra padding columns. Passage padding is masked out of the max (gradient 0); query padding rows
    # get a gradient, as the reference's own padding rows do, which the model's mask multiplies away.
    t = ours["p_mask"].shape[1] - 1 - 4
    assert not out["p_colbert"][:, t:].any()
    for s in ("q", "p"):
        out[f"{s}_colbert"] = out[f"{s}_colbert"][:, :ours[f"{s}_mask"].shape[1] - 1 - 4]
    return float(loss), out


def rel(a, b):
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


@pytest.mark.parametrize("case", list(rep_grid()), ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_loss_on_representations(case, record_property):
    flags = flags_of(case)
    q, p, teacher, ours = rep_inputs(0)
    step = {"off": 0, "before": 5, "after": 6}[case["sd"]]
    ref_loss, ref_grads = reference_on_reps(case, q, p, teacher, step, flags)
    loss, grads = ours_on_reps(ours, case, step, flags)
    loss_rel = abs(loss - ref_loss) / abs(ref_loss)
    # ColBERT padding rows: the model multiplies them by the mask, so their gradient never reaches a parameter,
    # and there the two differ legitimately (the reference's max over all-zero rows, or onto a padding vector,
    # routes gradient to one tied index; m3jax's masked max and zero floor route it elsewhere).
    for s, m in (("q", q[3]), ("p", p[3])):
        real = m[:, 1:, None].astype(bool)
        ref_grads[f"{s}_colbert"], grads[f"{s}_colbert"] = (ref_grads[f"{s}_colbert"] * real,
                                                            grads[f"{s}_colbert"] * real)
    grad_rel = {k: rel(grads[k], ref_grads[k]) for k in grads if np.abs(ref_grads[k]).max() > 0}
    for k in grads:  # where the reference has no gradient (unused heads), neither may m3jax
        if not np.abs(ref_grads[k]).max() > 0:
            assert not grads[k].any(), k
    record_property("loss_rel", loss_rel)
    record_property("grad_rel", max(grad_rel.values()))
    print(f"\n{case}: loss {loss:.6f} rel {loss_rel:.2e}, max grad rel {max(grad_rel.values()):.2e}")
    assert loss_rel <= LOSS_TOL
    assert max(grad_rel.values()) <= GRAD_TOL, grad_rel


@pytest.mark.parametrize("unified", [False, True])
def test_no_in_batch_m3_kd_raises(unified):
    case = dict(unified=unified, kd="m3_kd_loss", sd="off", no_in_batch=True, temperature=0.02)
    _, _, _, ours = rep_inputs(0)
    with pytest.raises(ValueError, match="m3_kd_loss fails in FlagEmbedding"):
        ours_on_reps(ours, case, 0, flags_of(case))


# --------------------------------------------------------------------------------------------------- model tier
B, G = 3, 3
QUERIES = SENTENCES[:B]
PASSAGES = SENTENCES[3:10] + mixed(2, seed=3, max_words=25)
MODEL_CASES = {
    # every head, teacher scores through m3_kd_loss, self-distillation active, the collator's pad_to_multiple_of
    "unified-m3kd-selfdistill": (LossConfig(unified_finetuning=True, use_self_distill=True, self_distill_start_step=0,
                                            kd_loss_type="m3_kd_loss", pad_to_multiple_of=8), 1, True),
    # dense only, mean pooling, no normalisation, frozen positions, another temperature, no teacher
    "dense-mean-unnormalized-fixpos": (LossConfig(sentence_pooling_method="mean", normalize_embeddings=False,
                                                  fix_position_embedding=True, temperature=0.05), 0, False),
    # heads only, kl_div teacher, self-distillation not yet started
    "fixencoder-kldiv-beforedistill": (LossConfig(unified_finetuning=True, fix_encoder=True, use_self_distill=True,
                                                  self_distill_start_step=3), 3, True),
}


@pytest.fixture(scope="module")
def release(release_dirs):
    path = release_dirs["tiny_spread_colbert"]
    cfg, params, _ = load_params(path)
    return path, cfg, nnx.split(model_from_params(cfg, params))


def token_batch(tok, texts, max_len, multiple, extra):
    """(reference features as its collator pads them, m3jax ids/mask with `extra` more padding columns)."""
    f = tok(texts, truncation=True, max_length=max_len, padding=True, pad_to_multiple_of=multiple,
            return_tensors="pt")
    ids = np.pad(f["input_ids"].numpy(), ((0, 0), (0, extra)), constant_values=tok.pad_token_id)
    mask = np.pad(f["attention_mask"].numpy(), ((0, 0), (0, extra)))
    return f, ids.astype(np.int32), mask.astype(np.int32)


@pytest.mark.parametrize("name", list(MODEL_CASES))
def test_model_loss_and_every_gradient(release, name, record_property):
    from transformers import AutoTokenizer

    path, cfg, (graphdef, state) = release
    flags, step, with_teacher = MODEL_CASES[name]
    tok = AutoTokenizer.from_pretrained(str(path))
    qf, q_ids, q_mask = token_batch(tok, QUERIES, 32, flags.pad_to_multiple_of, 3)
    pf, p_ids, p_mask = token_batch(tok, PASSAGES, 64, flags.pad_to_multiple_of, 7)
    teacher = np.random.default_rng(1).standard_normal((B, G)).astype(np.float32) * 3
    ref = reference_model(path, fix_encoder=flags.fix_encoder, fix_position_embedding=flags.fix_position_embedding,
                          **ref_kwargs(flags))
    ref_loss, ref_grads = reference_loss_and_grads(ref, qf, pf, teacher.reshape(-1).tolist() if with_teacher
                                                   else None, step=step)
    batch = {"q_ids": q_ids, "q_mask": q_mask, "p_ids": p_ids, "p_mask": p_mask}
    if with_teacher:
        batch["teacher_scores"] = teacher
    (loss, parts), grads = value_and_grad(graphdef, state, batch, jnp.int32(step), flags)
    loss_rel = abs(float(loss) - ref_loss) / abs(ref_loss)
    diffs = grad_report(m3jax_grads_as_torch(grads, cfg), ref_grads)
    worst = max(diffs, key=diffs.get)
    record_property("loss_rel", loss_rel)
    record_property("grad_rel", diffs[worst])
    print(f"\n{name}: loss {float(loss):.6f} (ref {ref_loss:.6f}) rel {loss_rel:.2e}; worst grad {worst} "
          f"{diffs[worst]:.2e}; parts { {k: round(float(v), 5) for k, v in parts.items()} }")
    assert loss_rel <= LOSS_TOL
    assert diffs[worst] <= GRAD_TOL, sorted(diffs.items(), key=lambda kv: -kv[1])[:5]
    trained = [k for k, v in ref_grads.items() if v is not None and not k.startswith("pooler.")]
    assert set(trained) <= set(diffs), "a parameter the reference trains has no m3jax counterpart"


# -------------------------------------------------------------------------------------------- cross-device tier
W, BL, GL = 4, 2, 2  # devices, queries per device, group size
CROSS_MODEL_FLAGS = LossConfig(unified_finetuning=True, use_self_distill=True, self_distill_start_step=0,
                               kd_loss_type="m3_kd_loss", negatives_cross_device=True)
CROSS_REP_CASES = [dict(unified=False, kd=None, sd="off", no_in_batch=False, temperature=0.02),
                   dict(unified=False, kd="kl_div", sd="off", no_in_batch=False, temperature=0.02),
                   dict(unified=True, kd="kl_div", sd="after", no_in_batch=False, temperature=0.02),
                   dict(unified=True, kd="m3_kd_loss", sd="after", no_in_batch=False, temperature=0.05)]

CROSS_SCRIPT = """
import json, sys
import jax, jax.numpy as jnp, numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P
from m3jax.checkpoint import load_params
from m3jax.model import model_from_params
from m3jax.train.loss import LossConfig, m3_loss, value_and_grad
from m3jax.weights import params_to_torch

assert jax.device_count() == 4, jax.devices()
path, work = sys.argv[1], sys.argv[2]
spec = json.load(open(work + "/spec.json"))
mesh = jax.make_mesh((4,), ("data",))
rows = NamedSharding(mesh, P("data"))
out = {}

cfg, params, _ = load_params(path)
graphdef, state = nnx.split(model_from_params(cfg, params))
batch = dict(np.load(work + "/batch.npz"))  # value_and_grad shards it
flags = LossConfig(**spec["model_flags"])
(loss, parts), grads = value_and_grad(graphdef, state, batch, jnp.int32(spec["model_step"]), flags, mesh=mesh)
out["model_loss"] = np.float64(loss)
odd = {k: v[:3] for k, v in batch.items()}
try:
    value_and_grad(graphdef, state, odd, jnp.int32(0), flags, mesh=mesh)
    raise AssertionError("3 rows over 4 devices must be refused")
except ValueError as e:
    assert "not divisible by the 4 devices" in str(e), e
for k, v in params_to_torch(nnx.to_pure_dict(grads), cfg).items():
    out["grad/" + k] = v

reps = {k: jax.device_put(v, rows) for k, v in np.load(work + "/reps.npz").items()}
for i, case in enumerate(spec["rep_cases"]):
    flags = LossConfig(**case["flags"])
    teacher = reps["teacher"] if case["teacher"] else None
    def per_device(q, p, qm, pm, t):
        loss = m3_loss(q, p, qm, pm, t, jnp.int32(case["step"]), flags, axis_name="data")[0]
        return loss[None]
    def mean_loss(q, p):
        f = jax.shard_map(per_device, mesh=mesh, in_specs=P("data"), out_specs=P("data"))
        return f(q, p, reps["q_mask"], reps["p_mask"], teacher).mean()
    q = {h: reps["q_" + h] for h in ("dense", "sparse", "colbert")}
    p = {h: reps["p_" + h] for h in ("dense", "sparse", "colbert")}
    loss, (gq, gp) = jax.jit(jax.value_and_grad(mean_loss, argnums=(0, 1)))(q, p)
    out[f"rep{i}/loss"] = np.float64(loss)
    for h in ("dense", "sparse", "colbert"):
        out[f"rep{i}/q_{h}"], out[f"rep{i}/p_{h}"] = np.asarray(gq[h]), np.asarray(gp[h])
np.savez(work + "/out.npz", **out)
"""


def rank_rows(x, r, per):
    return x[r * per:(r + 1) * per]


def test_cross_device_negatives_four_devices(release, tmp_path, monkeypatch):
    """m3jax on 4 forced host devices (a subprocess: XLA_FLAGS must precede jax's start) against FlagEmbedding
    run once per rank in a FakeWorld: loss = mean over ranks, gradients = mean over ranks (DDP)."""
    from transformers import AutoTokenizer

    path, cfg, _ = release
    tok = AutoTokenizer.from_pretrained(str(path))
    queries = (SENTENCES + mixed(8, seed=11, max_words=12))[: W * BL]
    passages = mixed(W * BL * GL, seed=12, max_words=30)
    teacher = np.random.default_rng(2).standard_normal((W * BL, GL)).astype(np.float32) * 3
    step = 1

    # m3jax: one global batch, padded past the longest text of any rank.
    _, q_ids, q_mask = token_batch(tok, queries, 32, None, 2)
    _, p_ids, p_mask = token_batch(tok, passages, 64, None, 5)
    np.savez(tmp_path / "batch.npz", q_ids=q_ids, q_mask=q_mask, p_ids=p_ids, p_mask=p_mask, teacher_scores=teacher)
    # Representation cases: global reps with the same masks as the reference's per-rank padding would have.
    rng = np.random.default_rng(5)
    Tq, Tp = 6, 9
    q_len, p_len = rng.integers(2, Tq + 1, W * BL), rng.integers(2, Tp + 1, W * BL * GL)
    q = random_reps(rng, W * BL, Tq, 16, 8, 40, q_len)
    p = random_reps(rng, W * BL * GL, Tp, 16, 8, 40, p_len)
    np.savez(tmp_path / "reps.npz", q_dense=q[0], q_sparse=q[1], q_colbert=q[2], q_mask=q[3], p_dense=p[0],
             p_sparse=p[1], p_colbert=p[2], p_mask=p[3], teacher=teacher)
    rep_specs = []
    for case in CROSS_REP_CASES:
        f = flags_of(case, negatives_cross_device=True)
        rep_specs.append({"flags": {k: getattr(f, k) for k in f.__dataclass_fields__},
                          "teacher": case["kd"] is not None, "step": {"off": 0, "after": 6}[case["sd"]]})
    spec = {"model_flags": {k: getattr(CROSS_MODEL_FLAGS, k) for k in CROSS_MODEL_FLAGS.__dataclass_fields__},
            "model_step": step, "rep_cases": rep_specs}
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, "-c", CROSS_SCRIPT, str(path), str(tmp_path)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    # Meanwhile, the reference, rank by rank.
    world = FakeWorld(monkeypatch, W)
    ref = reference_model(path, **ref_kwargs(CROSS_MODEL_FLAGS))
    feats = []
    for r in range(W):
        qf = tok(rank_rows(queries, r, BL), truncation=True, max_length=32, padding=True, return_tensors="pt")
        pf = tok(rank_rows(passages, r, BL * GL), truncation=True, max_length=64, padding=True, return_tensors="pt")
        feats.append((qf, pf, rank_rows(teacher, r, BL).reshape(-1).tolist()))
    for mode in ("record", "replay"):
        losses, grads = [], []
        for r in range(W):
            world.start(r, mode)
            ref.process_rank = r
            loss, g = reference_loss_and_grads(ref, *feats[r][:2], feats[r][2], step=step)
            losses.append(loss)
            grads.append(g)
    ref_loss = float(np.mean(losses))
    ref_grads = {k: None if grads[0][k] is None else np.mean([g[k] for g in grads], axis=0) for k in grads[0]}

    rep_refs = []
    for case in CROSS_REP_CASES:
        f = flags_of(case, negatives_cross_device=True)
        model = rep_model(40, **ref_kwargs(f))
        per_rank = []
        for mode in ("record", "replay"):
            per_rank = []
            for r in range(W):
                world.start(r, mode)
                model.process_rank = r
                sl = lambda x, per, r=r: rank_rows(x, r, per)  # noqa: E731
                per_rank.append(reference_on_reps(case, [sl(x, BL) for x in q], [sl(x, BL * GL) for x in p],
                                                  sl(teacher, BL), {"off": 0, "after": 6}[case["sd"]], f))
        rep_refs.append(per_rank)

    stdout, stderr = proc.communicate(timeout=900)
    assert proc.returncode == 0, stderr[-3000:]
    ours = dict(np.load(tmp_path / "out.npz"))

    loss_rel = abs(float(ours["model_loss"]) - ref_loss) / abs(ref_loss)
    diffs = grad_report({k[5:]: v for k, v in ours.items() if k.startswith("grad/")}, ref_grads)
    worst = max(diffs, key=diffs.get)
    print(f"\ncross-device model: loss rel {loss_rel:.2e}, worst grad {worst} {diffs[worst]:.2e}")
    assert loss_rel <= LOSS_TOL
    assert diffs[worst] <= GRAD_TOL, sorted(diffs.items(), key=lambda kv: -kv[1])[:5]

    for i, (case, per_rank) in enumerate(zip(CROSS_REP_CASES, rep_refs, strict=True)):
        ref_loss = float(np.mean([lr for lr, _ in per_rank]))
        loss_rel = abs(float(ours[f"rep{i}/loss"]) - ref_loss) / abs(ref_loss)
        worst = 0.0
        for key in ("q_dense", "q_sparse", "q_colbert", "p_dense", "p_sparse", "p_colbert"):
            # Rank r's rows get gradient only from rank r's loss; DDP divides by W.
            ref_g = np.concatenate([g[key] for _, g in per_rank]) / W
            g = ours[f"rep{i}/{key}"]
            if key.endswith("colbert"):  # padding rows: see test_loss_on_representations
                real = (q if key[0] == "q" else p)[3][:, 1:, None].astype(bool)
                ref_g, g = ref_g * real, g * real
            if np.abs(ref_g).max() == 0:
                assert not g.any(), (case, key)
                continue
            worst = max(worst, rel(g, ref_g))
        print(f"cross-device reps {case}: loss rel {loss_rel:.2e}, worst grad rel {worst:.2e}")
        assert loss_rel <= LOSS_TOL, case
        assert worst <= GRAD_TOL, case


# ------------------------------------------------------------------------------------------------ Matryoshka (MRL)
def test_dense_mrl_matches_flagembeddings_dense_embedder(release):
    """use_mrl on the dense-only path == FlagEmbedding's BiEncoderOnlyEmbedderModel with use_mrl (its M3 model has
    none): the mean of the in-batch losses, with teacher scores, over the first 2, 8 and 48 dimensions of the CLS
    vector, normalised after truncation (48 is above the tiny model's 32: the full width, as the reference does);
    the loss and the gradient of every parameter."""
    from FlagEmbedding.finetune.embedder.encoder_only.base.modeling import BiEncoderOnlyEmbedderModel
    from transformers import AutoModel, AutoTokenizer

    path, cfg, (graphdef, state) = release
    flags = LossConfig(use_mrl=True, mrl_dims=(2, 8, 48), temperature=0.02)
    tok = AutoTokenizer.from_pretrained(str(path))
    qf, q_ids, q_mask = token_batch(tok, QUERIES, 32, None, 3)
    pf, p_ids, p_mask = token_batch(tok, PASSAGES, 64, None, 5)
    teacher = np.random.default_rng(2).standard_normal((B, G)).astype(np.float32) * 3
    base = AutoModel.from_pretrained(str(path), hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                                     add_pooling_layer=False)
    ref = BiEncoderOnlyEmbedderModel(base, tokenizer=tok, temperature=0.02, use_mrl=True, mrl_dims=[2, 8, 48],
                                     sentence_pooling_method="cls", normalize_embeddings=True).float().train()
    ref_loss, ref_grads = reference_loss_and_grads(ref, qf, pf, teacher.reshape(-1).tolist())
    batch = {"q_ids": q_ids, "q_mask": q_mask, "p_ids": p_ids, "p_mask": p_mask, "teacher_scores": teacher}
    (loss, _), grads = value_and_grad(graphdef, state, batch, jnp.int32(0), flags)
    (plain, _), _ = value_and_grad(graphdef, state, batch, jnp.int32(0), LossConfig(temperature=0.02))
    assert abs(float(loss) - ref_loss) <= LOSS_TOL * abs(ref_loss) and abs(float(plain) - ref_loss) > 1e-3
    diffs = grad_report(m3jax_grads_as_torch(grads, cfg), ref_grads)
    assert max(diffs.values()) <= GRAD_TOL, sorted(diffs.items(), key=lambda kv: -kv[1])[:5]


def test_colbert_mrl_is_the_mean_over_truncated_widths():
    """colbert_mrl_dims: the ColBERT loss is the mean of the plain ColBERT loss over the projections cut to each
    width and normalised again (computed here from the plain loss on reps truncated by hand); the dense, sparse and
    ensemble terms are the full-width ones."""
    rng = np.random.default_rng(4)
    B_, G_, T, C = 2, 3, 7, 8
    q_mask = (np.arange(T)[None] < rng.integers(3, T + 1, B_)[:, None]).astype(np.int32)
    p_mask = (np.arange(T)[None] < rng.integers(3, T + 1, B_ * G_)[:, None]).astype(np.int32)

    def reps(mask):
        raw = rng.standard_normal((len(mask), T - 1, C)).astype(np.float32) * mask[:, 1:, None]
        unit = lambda x: x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)  # noqa: E731
        dense = rng.standard_normal((len(mask), 16)).astype(np.float32)
        return {"dense": unit(dense), "dense_raw": dense, "sparse": np.abs(rng.standard_normal((len(mask), 30))),
                "colbert": unit(raw), "colbert_raw": raw}, unit

    (q, unit), (p, _) = reps(q_mask), reps(p_mask)
    mrl = LossConfig(unified_finetuning=True, use_mrl=True, mrl_dims=(16,), colbert_mrl_dims=(2, 5, 8, 99))
    _, parts = m3_loss(q, p, q_mask, p_mask, None, jnp.int32(0), mrl)
    plain = LossConfig(unified_finetuning=True)
    cut = lambda x, d: {**x, "colbert": unit(x["colbert_raw"][..., :d])}  # noqa: E731
    want = np.mean([float(m3_loss(cut(q, d), cut(p, d), q_mask, p_mask, None, jnp.int32(0), plain)[1]["colbert"])
                    for d in (2, 5, 8, 8)])
    _, full = m3_loss(q, p, q_mask, p_mask, None, jnp.int32(0), plain)
    np.testing.assert_allclose(float(parts["colbert"]), want, rtol=1e-6)
    for k in ("dense", "sparse", "ensemble"):
        np.testing.assert_allclose(float(parts[k]), float(full[k]), rtol=1e-6)
    assert abs(float(parts["colbert"]) - float(full["colbert"])) > 1e-4
    with pytest.raises(ValueError, match="mrl_dims should be provided"):
        LossConfig(use_mrl=True)
    with pytest.raises(ValueError, match="colbert_mrl_dims needs use_mrl and unified_finetuning"):
        LossConfig(use_mrl=True, mrl_dims=(8,), colbert_mrl_dims=(8,))


def test_train_command_passes_the_mrl_flags(monkeypatch, tmp_path):
    """`m3jax train --use-mrl --mrl-dims ... --colbert-mrl-dims ...` reaches fit() as LossConfig's fields."""
    import m3jax.train
    from m3jax import cli
    from m3jax.train import FitResult

    seen = {}

    def fake_fit(model, data, output, config, **kw):
        seen["config"] = config
        return FitResult(None, 0, None, {})

    monkeypatch.setattr(m3jax.train, "fit", fake_fit)
    assert cli.main(["train", "d.jsonl", "--model", "m", "--output", str(tmp_path), "--quiet", "--unified-finetuning",
                     "--use-mrl", "--mrl-dims", "64", "256", "--colbert-mrl-dims", "128"]) == 0
    assert seen["config"].loss == LossConfig(unified_finetuning=True, use_mrl=True, mrl_dims=(64, 256),
                                             colbert_mrl_dims=(128,))


def test_truncate_dim_serves_a_trained_width(release_dirs):
    """At inference, BGEM3FlagModel(truncate_dim=d) gives what MRL trained: the first d features of the dense and
    ColBERT vectors, normalised after the cut (mrl_truncate), not a cut of the normalised full vectors."""
    from m3jax import BGEM3FlagModel
    from m3jax.train.loss import mrl_truncate

    texts = SENTENCES[:4]
    full = BGEM3FlagModel(release_dirs["tiny"], normalize_embeddings=False).encode(texts, return_colbert_vecs=True)
    cut = BGEM3FlagModel(release_dirs["tiny"], truncate_dim=8).encode(texts, return_colbert_vecs=True)
    flags = LossConfig(use_mrl=True, mrl_dims=(8,))
    np.testing.assert_allclose(cut["dense_vecs"], np.asarray(mrl_truncate(jnp.asarray(full["dense_vecs"]), 8, flags)),
                               rtol=0, atol=1e-6)
    for got, raw in zip(cut["colbert_vecs"], full["colbert_vecs"], strict=True):
        np.testing.assert_allclose(got, np.asarray(mrl_truncate(jnp.asarray(raw), 8, flags)), rtol=0, atol=1e-6)
    assert cut["dense_vecs"].shape == (4, 8)
