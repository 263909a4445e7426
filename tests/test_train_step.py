"""fit()'s jitted AdamW step (accumulate_step) lowers the loss on a fixed batch and leaves frozen parameters untouched;
the schedule, decay mask and clipping follow transformers and torch."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from m3jax.config import M3Config
from m3jax.model import init_model
from m3jax.train.loss import LossConfig
from m3jax.train.step import OptimConfig, accumulate_step, decays, linear_schedule, make_optimizer


def test_train_step_lowers_loss_and_respects_freezing(tmp_path):
    """A batch from TrainData (teacher scores, m3_kd_loss, self-distillation) through the jitted step, as one
    micro-batch per optimiser step."""
    import json

    from m3jax.testing import write_tokenizer
    from m3jax.tokenizer import Tokenizer
    from m3jax.train.data import DataConfig, TrainData
    from tests.helpers import SENTENCES, mixed

    write_tokenizer(tmp_path)
    rows = [{"query": q, "pos": [p], "neg": mixed(3, seed=i, max_words=20), "pos_scores": [1.0],
             "neg_scores": [0.5, 0.0, -0.5]} for i, (q, p) in enumerate(zip(SENTENCES[:4], SENTENCES[4:8],
                                                                                strict=True))]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = TrainData(str(tmp_path / "train.jsonl"), Tokenizer(tmp_path),
                     DataConfig(train_group_size=2, passage_max_len=48, knowledge_distillation=True), batch_size=4)
    batches = {k: v[None] for k, v in next(iter(data.epoch(0))).items()}  # [1, ...]: one micro-batch
    graphdef, state = nnx.split(init_model(M3Config.tiny(num_layers=1), seed=0))
    flags = LossConfig(unified_finetuning=True, use_self_distill=True, self_distill_start_step=0,
                       kd_loss_type="m3_kd_loss", fix_position_embedding=True)
    opt = OptimConfig(num_training_steps=20, learning_rate=1e-3, weight_decay=0.01, warmup_steps=2)
    tx = make_optimizer(state, flags, opt)
    opt_state = tx.init(state)
    pos_before = np.asarray(state["embeddings"]["position_embeddings"]["embedding"][...]).copy()
    rng = jax.random.key_data(jax.random.PRNGKey(0))
    losses = []
    for step in range(8):
        state, opt_state, m = accumulate_step(graphdef, state, opt_state, batches, jnp.int32(step), rng, flags=flags,
                                              tx=tx, dropout=False)
        losses.append(float(m["loss"]))
        assert m["grad_norm"] > 0 and int(m["tokens"]) == int(batches["q_mask"].sum() + batches["p_mask"].sum())
    assert losses[-1] < 0.5 * losses[0], losses
    np.testing.assert_array_equal(np.asarray(state["embeddings"]["position_embeddings"]["embedding"][...]),
                                  pos_before)


def test_schedule_and_decay_mask_follow_transformers():
    import torch
    from transformers import get_linear_schedule_with_warmup

    opt = OptimConfig(num_training_steps=50, learning_rate=2e-5, warmup_ratio=0.1)
    sched = linear_schedule(opt)
    p = torch.nn.Parameter(torch.zeros(1))
    torch_opt = torch.optim.AdamW([p], lr=opt.learning_rate)
    ref = get_linear_schedule_with_warmup(torch_opt, opt.num_warmup_steps, opt.num_training_steps)
    for step in range(opt.num_training_steps):
        assert abs(float(sched(step)) - torch_opt.param_groups[0]["lr"]) <= 1e-12 + 1e-6 * opt.learning_rate
        torch_opt.step()
        ref.step()
    assert not decays("encoder/layer/attention/output/LayerNorm/scale") and not decays("sparse_linear/bias")
    assert decays("encoder/layer/intermediate/dense/kernel") and decays("embeddings/word_embeddings/embedding")


def test_optimizer_matches_torch_adamw_with_clipping_and_schedule():
    """make_optimizer against what the HF Trainer builds: torch AdamW with a no-decay group for biases,
    clip_grad_norm_ over all parameters, get_linear_schedule_with_warmup; four steps."""
    import torch
    from transformers import get_linear_schedule_with_warmup

    opt = OptimConfig(num_training_steps=6, learning_rate=1e-2, weight_decay=0.1, max_grad_norm=0.5, warmup_steps=1)
    rng = np.random.default_rng(1)
    w0 = {"kernel": rng.standard_normal((3, 4)).astype(np.float32), "bias": rng.standard_normal(4).astype(np.float32)}
    grads = [{k: rng.standard_normal(v.shape).astype(np.float32) for k, v in w0.items()} for _ in range(4)]
    tp = {k: torch.nn.Parameter(torch.tensor(v)) for k, v in w0.items()}
    topt = torch.optim.AdamW([{"params": [tp["kernel"]], "weight_decay": opt.weight_decay},
                              {"params": [tp["bias"]], "weight_decay": 0.0}], lr=opt.learning_rate,
                             eps=opt.adam_epsilon)
    sched = get_linear_schedule_with_warmup(topt, opt.num_warmup_steps, opt.num_training_steps)
    for g in grads:
        for k in tp:
            tp[k].grad = torch.tensor(g[k])
        torch.nn.utils.clip_grad_norm_(list(tp.values()), opt.max_grad_norm)
        topt.step()
        sched.step()
    state = {"intermediate": {"dense": {k: jnp.asarray(v) for k, v in w0.items()}}}
    tx = make_optimizer(state, LossConfig(), opt)
    s = tx.init(state)
    for g in grads:
        u, s = tx.update({"intermediate": {"dense": {k: jnp.asarray(v) for k, v in g.items()}}}, s, state)
        state = optax.apply_updates(state, u)
    for k in tp:
        np.testing.assert_allclose(np.asarray(state["intermediate"]["dense"][k]), tp[k].detach().numpy(),
                                   rtol=1e-5, atol=1e-6)


def test_train_config_hands_its_optimizer_fields_on():
    """TrainConfig holds OptimArgs' fields (same keywords and defaults, all in the saved settings); fit()'s optimiser
    is them over the run's length."""
    import dataclasses

    from m3jax.train import TrainConfig
    from m3jax.train.step import OptimArgs

    c = TrainConfig(learning_rate=1e-5, warmup_ratio=0.1, weight_decay=0.01, max_grad_norm=0.5, adam_epsilon=1e-6)
    assert c.for_steps(100) == OptimConfig(num_training_steps=100, learning_rate=1e-5, warmup_ratio=0.1,
                                           weight_decay=0.01, max_grad_norm=0.5, adam_epsilon=1e-6)
    assert TrainConfig().for_steps(7) == OptimConfig(num_training_steps=7)
    assert {f.name for f in dataclasses.fields(OptimArgs)} <= set(c.settings())
