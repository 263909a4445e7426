"""Re-ranker fine-tuning (m3jax.train with RerankerTrainConfig) against FlagEmbedding's encoder-only re-ranker
trainer: its examples draw for draw and token for token (AbsRerankerTrainDataset, AbsRerankerCollator), the loss
fit() logs on the batch it built (CrossEncoderModel's on the reference's batch of the same groups), and the final
model, written in the release layout, loaded by FlagEmbedding's FlagReranker."""

import json
import random

import numpy as np
import pytest

from m3jax.train.data import RerankerDataConfig, collate_pairs, parse_row, sample_group
from tests.helpers import SENTENCES, long_text, mixed


def make_rows(n, seed=0):
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        n_pos, n_neg = rng.randint(1, 2), rng.choice([1, 2, 5])
        row = {"query": f"q{i} " + (long_text(60, seed=i) if i % 5 == 0 else rng.choice(SENTENCES)),
               "pos": [f"p{i}.{j} " + t for j, t in enumerate(mixed(n_pos, seed=i, max_words=50))],
               "neg": [f"n{i}.{j} " + t for j, t in enumerate(mixed(n_neg, seed=500 + i, max_words=50))],
               "prompt": "for LLM re-rankers only"}
        row["pos_scores"] = [rng.uniform(0, 3) for _ in row["pos"]]
        row["neg_scores"] = [rng.uniform(-3, 1) for _ in row["neg"]]
        if i % 3 == 0:
            row["query_prompt"], row["passage_prompt"] = "Q? ", "P: "
        if i % 4 == 0:
            row["pos"][0] += " " + "y" * 120  # long, so shuffle_ratio can fire
        rows.append(row)
    return rows


@pytest.fixture(scope="module")
def reranker_dir(tmp_path_factory):
    from m3jax.config import M3Config
    from m3jax.testing import write_random_reranker

    return write_random_reranker(tmp_path_factory.mktemp("reranker"), M3Config.tiny(), seed=5)


def reference_dataset(reranker_dir, **kw):
    """FlagEmbedding's AbsRerankerTrainDataset with its real __getitem__ (rows served from a list: its __init__
    only loads files through `datasets`)."""
    from FlagEmbedding.abc.finetune.reranker.AbsArguments import AbsRerankerDataArguments
    from FlagEmbedding.abc.finetune.reranker.AbsDataset import AbsRerankerTrainDataset
    from transformers import AutoTokenizer

    args = AbsRerankerDataArguments(train_data=[str(reranker_dir / "config.json")], **kw)  # must exist; unread
    ref = AbsRerankerTrainDataset.__new__(AbsRerankerTrainDataset)
    ref.args, ref.tokenizer = args, AutoTokenizer.from_pretrained(str(reranker_dir))
    ref.max_length = args.query_max_len + args.passage_max_len
    return ref


def unpadded(ids, mask):
    return [row[m.astype(bool)].tolist() for row, m in zip(ids.reshape(-1, ids.shape[-1]),
                                                           mask.reshape(-1, mask.shape[-1]), strict=True)]


CONFIGS = {
    "plain": dict(train_group_size=4),
    "distilled, instructions, short": dict(train_group_size=3, query_max_len=8, passage_max_len=20,
                                           knowledge_distillation=True, query_instruction_for_rerank="Query: ",
                                           query_instruction_format="{}\\n{}",
                                           passage_instruction_for_rerank="Passage: "),
    "shuffled text": dict(train_group_size=2, shuffle_ratio=0.5, knowledge_distillation=True),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_examples_match_flagembedding_draw_for_draw_and_token_for_token(reranker_dir, name):
    """From the same seed, sample_group + collate_pairs give each group's pairs exactly as the reference's dataset
    and collator do (its draws, instructions and per-row query_prompt / passage_prompt, the query and passage cut
    and the pair truncated to query_max_len + passage_max_len), and the same teacher scores."""
    from FlagEmbedding.abc.finetune.reranker.AbsDataset import AbsRerankerCollator

    from m3jax.config import M3Config
    from m3jax.tokenizer import Tokenizer

    kw = CONFIGS[name]
    rows = make_rows(30, seed=len(name))
    ref = reference_dataset(reranker_dir, **kw)
    ref.dataset = [r if ref.args.knowledge_distillation else {k: v for k, v in r.items() if "scores" not in k}
                   for r in rows]
    random.seed(99)
    expected = [ref[i] for i in range(len(rows))]
    cfg, rng, tok = RerankerDataConfig(**kw), random.Random(99), Tokenizer(reranker_dir)
    groups = [sample_group(parse_row("d.jsonl", i + 1, json.dumps(r), cfg), rng, cfg) for i, r in enumerate(rows)]
    batch = collate_pairs(groups, tok, cfg, pad_id=1, model_cfg=M3Config.tiny())
    collated = AbsRerankerCollator(tokenizer=ref.tokenizer, query_max_len=cfg.query_max_len,
                                   passage_max_len=cfg.passage_max_len, padding=True, return_tensors="np")(expected)
    theirs = unpadded(collated["pair"]["input_ids"], collated["pair"]["attention_mask"])
    assert unpadded(batch["ids"], batch["mask"]) == theirs
    assert batch["ids"].shape[:2] == (len(rows), cfg.train_group_size)
    assert max(len(t) for t in theirs) == cfg.max_len  # some pairs were cut to fit
    if cfg.knowledge_distillation:
        np.testing.assert_array_equal(batch["teacher_scores"].reshape(-1), np.float32(collated["teacher_scores"]))
    else:
        assert "teacher_scores" not in batch
    if kw.get("shuffle_ratio"):
        assert any(g[1][0] not in rows[i]["pos"] for i, g in enumerate(groups)), "no positive was text-shuffled"


def test_configs_refuse_the_other_task():
    from m3jax.train import DataConfig, LossConfig, RerankerLossConfig, RerankerTrainConfig, TrainConfig

    with pytest.raises(TypeError, match="RerankerTrainConfig.data must be a RerankerDataConfig, got DataConfig"):
        RerankerTrainConfig(data=DataConfig())
    with pytest.raises(TypeError, match="TrainConfig.loss must be a LossConfig, got RerankerLossConfig"):
        TrainConfig(loss=RerankerLossConfig())
    with pytest.raises(ValueError, match="passage_max_len must be >= 6"):
        RerankerDataConfig(passage_max_len=5)
    assert RerankerTrainConfig(loss=RerankerLossConfig()).data == RerankerDataConfig()
    assert TrainConfig().loss == LossConfig()


@pytest.fixture(scope="module")
def trained(reranker_dir, tmp_path_factory):
    """`m3jax train --reranker` on a random re-ranker: 12 rows with teacher scores, 3 groups of 3 per micro-batch,
    2 micro-batches per step (2 steps an epoch), 12 steps at a learning rate a tiny model learns its data at;
    dropout off, so that the logged losses are the exact forward's. Returns the RerankerTrainConfig the flags
    mean, the final directory, the log and the data's directory."""
    from m3jax import cli
    from m3jax.train import RerankerTrainConfig

    root = tmp_path_factory.mktemp("fit")
    rows = make_rows(12, seed=4)
    (root / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = RerankerTrainConfig(
        data=RerankerDataConfig(train_group_size=3, query_max_len=16, passage_max_len=32, knowledge_distillation=True,
                                query_instruction_for_rerank="Q: "),
        per_device_batch_size=3, gradient_accumulation_steps=2, max_steps=12, learning_rate=5e-3, warmup_steps=1,
        dropout=False, save_steps=3, quiet=True)
    flags = ["--train-group-size", "3", "--query-max-len", "16", "--passage-max-len", "32",
             "--knowledge-distillation", "--query-instruction-for-rerank", "Q: ", "--per-device-batch-size", "3",
             "--gradient-accumulation-steps", "2", "--max-steps", "12", "--learning-rate", "5e-3",
             "--warmup-steps", "1", "--no-dropout", "--save-steps", "3", "--quiet"]
    out = root / "out"
    assert cli.main(["train", str(root / "train.jsonl"), "--reranker", "--model", str(reranker_dir),
                     "--output", str(out), *flags]) == 0
    assert json.loads((out / "train_settings.json").read_text())["config"] == json.loads(
        json.dumps(config.settings()))
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    return config, out / "final", log, root


def test_cli_refuses_the_other_tasks_flags(reranker_dir, tmp_path, capsys):
    from m3jax import cli

    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps(make_rows(1)[0]) + "\n")
    base = ["train", str(data), "--model", str(reranker_dir), "--output", str(tmp_path / "o")]
    assert cli.main([*base, "--reranker", "--unified-finetuning", "--temperature", "0.05"]) == 2
    assert "--temperature, --unified-finetuning are for BGE-M3, not a re-ranker" in capsys.readouterr().err
    assert cli.main([*base, "--query-instruction-for-rerank", "Q: "]) == 2
    assert "--query-instruction-for-rerank is for re-rankers (with --reranker)" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_fit_logs_flagembeddings_loss_on_its_first_step(reranker_dir, trained):
    """Step 1's logged loss (the mean over its two micro-batches) equals CrossEncoderModel's training loss on the
    reference collator's batches of the same groups, with the same teacher scores."""
    import torch
    from FlagEmbedding.abc.finetune.reranker.AbsDataset import AbsRerankerCollator
    from FlagEmbedding.finetune.reranker.encoder_only.base.modeling import CrossEncoderModel
    from transformers import AutoModelForSequenceClassification

    from m3jax.tokenizer import Tokenizer
    from m3jax.train.data import TrainData

    config, _, log, root = trained
    data = TrainData([root / "train.jsonl"], Tokenizer(reranker_dir), config.data,
                     batch_size=config.per_device_batch_size, seed=config.seed)
    it = data.examples(0)
    micro = [next(it), next(it)]
    ref = reference_dataset(reranker_dir, **{k: getattr(config.data, k) for k in (
        "train_group_size", "query_max_len", "passage_max_len", "knowledge_distillation")})
    hf = AutoModelForSequenceClassification.from_pretrained(reranker_dir, hidden_dropout_prob=0.0,
                                                            attention_probs_dropout_prob=0.0)
    model = CrossEncoderModel(hf, tokenizer=ref.tokenizer, train_batch_size=config.per_device_batch_size)
    model.train()
    collator = AbsRerankerCollator(tokenizer=ref.tokenizer, query_max_len=16, passage_max_len=32, padding=True,
                                   return_tensors="pt")
    losses = []
    with torch.no_grad():
        for groups in micro:  # sampled groups, instructions applied: the reference's dataset items from them
            items = [([ref.create_one_example(q, p) for p in passages], teacher) for q, passages, teacher in groups]
            batch = collator(items)
            losses.append(float(model(batch["pair"], teacher_scores=batch["teacher_scores"]).loss))
    assert log[0]["step"] == 1
    np.testing.assert_allclose(log[0]["loss"], np.mean(losses), rtol=0, atol=1e-5)


def test_fit_learns_and_writes_a_reranker_flagembedding_loads(reranker_dir, trained):
    """Twelve steps lower the loss well below where it starts; final/ is in the release layout: FlagEmbedding's
    FlagReranker and m3jax's give the same scores from it (<= 1e-5), and they are not the untrained model's."""
    from FlagEmbedding import FlagReranker as TheirReranker

    from m3jax import FlagReranker

    _, final, log, _ = trained
    assert [r["step"] for r in log] == list(range(1, 13))
    assert all(np.isfinite(r["loss"]) and r["grad_norm"] > 0 for r in log)
    losses = [r["loss"] for r in log]
    assert np.mean(losses[-4:]) < 0.6 * np.mean(losses[:2]), losses
    assert json.loads((final / "config.json").read_text())["architectures"] == ["XLMRobertaForSequenceClassification"]
    assert json.loads((final / "training_metadata.json").read_text())["steps"] == 12
    pairs = [[q, p] for q in SENTENCES[:3] for p in mixed(3, seed=8, max_words=30)]
    ours = FlagReranker(final).compute_score(pairs)
    theirs = TheirReranker(str(final), use_fp16=False, devices="cpu").compute_score(pairs)
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-5)
    before = FlagReranker(reranker_dir).compute_score(pairs)
    assert np.abs(np.subtract(ours, before)).max() > 1e-3


def test_dropout_only_with_a_key(reranker_dir):
    """RerankerModel drops activations (encoder and classification head) only when given a key, differently per
    key: the training forward fit() runs unless told --no-dropout."""
    import jax

    from m3jax.reranker import read_reranker

    _, model = read_reranker(reranker_dir)
    ids = np.asarray([[0, 100, 200, 2, 2, 300, 400, 2], [0, 500, 2, 2, 600, 2, 1, 1]], np.int32)
    mask = (ids != 1).astype(np.int32)
    exact = np.asarray(model(ids, mask))
    np.testing.assert_array_equal(np.asarray(model(ids, mask, dropout_rng=None)), exact)
    a, b = (np.asarray(model(ids, mask, dropout_rng=jax.random.key(s))) for s in (0, 1))
    assert np.abs(a - exact).max() > 1e-4 and np.abs(a - b).max() > 1e-4
