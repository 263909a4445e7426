"""The training loop end to end on a tiny model: `m3jax train` (the CLI) against fit() stopped and resumed, exact to
the bit; the log; refusing foreign settings; the final model exported and loaded by FlagEmbedding."""

import dataclasses
import json

import jax
import numpy as np
import pytest

from m3jax import cli
from m3jax.checkpoint import export_release, load_params
from m3jax.train import DataConfig, LossConfig, TrainConfig, TrainError, fit
from tests.helpers import SENTENCES, mixed

# 16 rows, 2 queries per micro-batch, 2 micro-batches per step: 4 steps per epoch; 6 steps cross an epoch.
CONFIG = TrainConfig(data=DataConfig(train_group_size=2, query_max_len=16, passage_max_len=16),
                     loss=LossConfig(unified_finetuning=True, use_self_distill=True, self_distill_start_step=0),
                     per_device_batch_size=2, gradient_accumulation_steps=2, max_steps=6, learning_rate=1e-3,
                     warmup_steps=1, weight_decay=0.01, save_steps=2, save_total_limit=2, quiet=True)
CLI_FLAGS = ["--train-group-size", "2", "--query-max-len", "16", "--passage-max-len", "16",
             "--unified-finetuning", "--use-self-distill", "True", "--self-distill-start-step", "0",
             "--per-device-batch-size", "2", "--gradient-accumulation-steps", "2", "--max-steps", "6",
             "--learning-rate", "1e-3", "--warmup-steps", "1", "--weight-decay", "0.01", "--save-steps", "2",
             "--save-total-limit", "2", "--quiet"]
LOSS_TERMS = {"loss", "dense", "sparse", "colbert", "ensemble", "self_distill"}


class FakeTensorBoard:
    """Stands in for tensorboardX (not installed here): records what fit() writes."""

    scalars: list = []

    class SummaryWriter:
        def __init__(self, logdir):
            self.logdir = logdir

        def add_scalar(self, tag, value, step):
            FakeTensorBoard.scalars.append((tag, value, step))

        def close(self):
            pass


def leaves(path):
    _, params, _ = load_params(path)
    return {jax.tree_util.keystr(k): np.asarray(v) for k, v in jax.tree_util.tree_leaves_with_path(params)}


@pytest.fixture(scope="module")
def runs(release_dirs, tmp_path_factory):
    """The same 6 steps twice: straight through `m3jax train`, and as fit() to step 3 + a new fit() to the end."""
    root = tmp_path_factory.mktemp("train")
    data = root / "train.jsonl"
    queries, passages = mixed(16, seed=1, max_words=5), mixed(16, seed=2, max_words=12) + SENTENCES
    data.write_text("".join(json.dumps({"query": q, "pos": [p], "neg": mixed(3, seed=i, max_words=10)}) + "\n"
                            for i, (q, p) in enumerate(zip(queries, passages, strict=False))))
    model = release_dirs["tiny"]
    assert cli.main(["train", str(data), "--model", str(model), "--output", str(root / "straight"), *CLI_FLAGS]) == 0
    import sys

    saved = sys.modules.get("tensorboardX")
    sys.modules["tensorboardX"] = FakeTensorBoard
    try:
        first = fit(model, str(data), root / "split", CONFIG, until_step=3)
        second = fit(model, str(data), root / "split", CONFIG)
    finally:
        if saved is None:
            del sys.modules["tensorboardX"]
        else:
            sys.modules["tensorboardX"] = saved
    return {"root": root, "data": data, "model": model, "first": first, "second": second}


def test_resumed_run_equals_straight_run_exactly(runs):
    root = runs["root"]
    assert runs["first"].final_dir is None and runs["first"].steps == 3
    assert runs["second"].resumed_from == 3 and runs["second"].steps == 6
    straight, split = leaves(root / "straight" / "final"), leaves(root / "split" / "final")
    start = leaves(runs["model"])
    assert straight.keys() == split.keys() == start.keys()
    for k in straight:
        np.testing.assert_array_equal(split[k], straight[k], err_msg=k)
    # The run changed every trained parameter (and so the comparison above compares something).
    assert all(not np.array_equal(straight[k], start[k]) for k in straight)
    rows = [json.loads(line) for line in (root / "straight" / "train_log.jsonl").read_text().splitlines()]
    again = [json.loads(line) for line in (root / "split" / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [r["step"] for r in again] == [1, 2, 3, 4, 5, 6]
    assert [r["epoch"] for r in rows] == [0, 0, 0, 0, 1, 1]
    for a, b in zip(rows, again, strict=True):
        assert {k: a[k] for k in LOSS_TERMS | {"grad_norm", "lr", "tokens"}} == \
               {k: b[k] for k in LOSS_TERMS | {"grad_norm", "lr", "tokens"}}
        assert LOSS_TERMS | {"lr", "grad_norm", "tokens", "tokens_per_s", "seconds", "step", "epoch"} <= set(a)
        assert a["tokens_per_s"] > 0 and np.isfinite(a["loss"])
    # The rate each step used: warm-up over 1 step (0 at step 0), then linear decay to 0 at step 6.
    assert [r["lr"] for r in rows] == pytest.approx([0.0, 1e-3, 8e-4, 6e-4, 4e-4, 2e-4])
    # TensorBoard, when a writer is importable: the same scalars as the log.
    logged = {(f"train/{k}", v, r["step"]) for r in again for k, v in r.items() if k not in ("step", "epoch")}
    assert set(FakeTensorBoard.scalars) == logged and len(FakeTensorBoard.scalars) == len(logged)
    # save_steps 2, save_total_limit 2: the last two of 2, 4, 6 are kept.
    assert sorted(int(p.name) for p in (root / "straight" / "checkpoints").iterdir() if p.name.isdigit()) == [4, 6]


def test_rerun_with_other_settings_or_model_is_refused(runs, release_dirs):
    out = runs["root"] / "split"
    with pytest.raises(TrainError, match="learning_rate"):
        fit(runs["model"], str(runs["data"]), out, dataclasses.replace(CONFIG, learning_rate=2e-3))
    with pytest.raises(TrainError, match="model"):
        fit(release_dirs["tiny_bin"], str(runs["data"]), out, CONFIG)


def test_trained_model_exports_and_flagembedding_agrees(runs, flag_model_factory, tmp_path):
    from tests.parity import check_parity, flag_outputs, flag_outputs_float64, m3jax_outputs

    final = runs["root"] / "straight" / "final"
    release = export_release(final, tmp_path / "release")
    assert cli.main(["export", str(final), str(tmp_path / "release2")]) == 0
    # The release keeps the trained encoder bit for bit and the heads in float16, as BAAI's release stores them.
    trained, exported = leaves(final), leaves(release)
    for k in trained:
        want = trained[k].astype(np.float16).astype(np.float32) if "_linear" in k else trained[k]
        np.testing.assert_array_equal(exported[k], want, err_msg=k)
    fe = flag_model_factory(release)
    batch, ref = flag_outputs(fe, SENTENCES)
    _, ours = m3jax_outputs(release, batch)
    check_parity(ours, ref, flag_outputs_float64(fe, batch), batch["attention_mask"].numpy())


def test_killed_run_resumes_to_the_same_parameters(runs, tmp_path):
    """`m3jax train` SIGKILLed right after its step-2 checkpoint (while writing later ones), then fit() again: the
    same parameters as the straight run (save_steps may differ between a run and its resumption)."""
    import os
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "killed"
    flags = [f if f != "2" or CLI_FLAGS[i - 1] != "--save-steps" else "1" for i, f in enumerate(CLI_FLAGS)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, "-m", "m3jax", "train", str(runs["data"]), "--model", str(runs["model"]),
                             "--output", str(out), *flags], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 300
        while not (out / "checkpoints" / "2").is_dir():
            assert proc.poll() is None, proc.stderr.read()[-3000:].decode()
            assert time.monotonic() < deadline, "no step-2 checkpoint within 300 s"
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    assert not (out / "final").exists(), "the run finished before it was killed: nothing was tested"
    result = fit(runs["model"], str(runs["data"]), out, CONFIG)
    assert 2 <= result.resumed_from < 6
    straight, resumed = leaves(runs["root"] / "straight" / "final"), leaves(out / "final")
    for k in straight:
        np.testing.assert_array_equal(resumed[k], straight[k], err_msg=k)


def test_a_non_finite_loss_stops_the_run_before_its_checkpoint(runs, tmp_path, monkeypatch):
    """A step whose loss comes back NaN stops fit() naming the step and its micro-batches; the steps before it are
    checkpointed, the bad one is neither checkpointed nor logged."""
    from m3jax.train import loop

    real = loop._Run._step

    def poisoned(self, batches):
        m = real(self, batches)
        return {**m, "loss": float("nan")} if self.step == 3 else m

    monkeypatch.setattr(loop._Run, "_step", poisoned)
    out = tmp_path / "nan"
    with pytest.raises(TrainError, match=r"step 3: loss is nan on epoch 0's micro-batches 4 \.\.\. 5; stopped "
                                         r"without checkpointing it \(the latest checkpoint is step 2\)"):
        fit(runs["model"], str(runs["data"]), out, CONFIG)
    assert sorted(int(p.name) for p in (out / "checkpoints").iterdir() if p.name.isdigit()) == [2]
    assert [json.loads(x)["step"] for x in (out / "train_log.jsonl").read_text().splitlines()] == [1, 2]
