"""Training data: sampling draw for draw against FlagEmbedding's AbsEmbedderTrainDataset, tokenisation against its
collator, the streamed multi-process pipeline, static shapes, and errors that name the file and line."""

import gzip
import json
import random

import numpy as np
import pytest

from m3jax.tokenizer import Tokenizer
from m3jax.train.data import (
    DataConfig,
    DataError,
    TrainData,
    bucket_lengths,
    collate,
    parse_row,
    sample_group,
    static_shapes,
)
from tests.helpers import SENTENCES, mixed


def make_rows(n, seed=0, kd=True):
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        n_pos, n_neg = rng.randint(1, 3), rng.choice([1, 2, 3, 9, 12])
        row = {"query": f"q{i} " + rng.choice(SENTENCES), "pos": [f"p{i}.{j} " + t for j, t in
                                                                   enumerate(mixed(n_pos, seed=i, max_words=40))],
               "neg": [f"n{i}.{j} " + t for j, t in enumerate(mixed(n_neg, seed=1000 + i, max_words=40))]}
        if kd:
            row["pos_scores"] = [rng.uniform(0, 1) for _ in row["pos"]]
            row["neg_scores"] = [rng.uniform(-1, 0) for _ in row["neg"]]
        if i % 3 == 0:
            row["prompt"] = "Represent this for retrieval: "
        rows.append(row)
    return rows


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    from m3jax.testing import write_tokenizer

    d = tmp_path_factory.mktemp("tok")
    write_tokenizer(d)
    return d


CONFIGS = {
    "plain": dict(train_group_size=8),
    "kd-instructions": dict(train_group_size=4, knowledge_distillation=True,
                            query_instruction_for_retrieval="Query: ", query_instruction_format="{}\\n{}",
                            passage_instruction_for_retrieval="Passage: "),
    "shuffle-text": dict(train_group_size=3, shuffle_ratio=0.5),
    "group-of-one": dict(train_group_size=1),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_sampling_matches_flagembedding_draw_for_draw(name, tmp_path):
    """The reference dataset (its real __getitem__, rows served from a list) and sample_group, from the same seed:
    identical queries, passages and teacher scores, over rows with too few and with enough negatives."""
    from FlagEmbedding.abc.finetune.embedder.AbsArguments import AbsEmbedderDataArguments
    from FlagEmbedding.abc.finetune.embedder.AbsDataset import AbsEmbedderTrainDataset

    kw = CONFIGS[name]
    rows = make_rows(40, seed=3, kd=True)
    for r in rows[::4]:
        r["pos"][0] = r["pos"][0] + " " + "x" * 120  # long positives, so shuffle_ratio can fire
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = AbsEmbedderDataArguments(train_data=[str(path)], **kw)
    ref = AbsEmbedderTrainDataset.__new__(AbsEmbedderTrainDataset)  # its __init__ only loads files via `datasets`
    ref.args, ref.tokenizer, ref.shuffle_ratio = args, None, args.shuffle_ratio
    ref.dataset = [r if args.knowledge_distillation else {k: v for k, v in r.items() if "scores" not in k}
                   for r in rows]
    random.seed(1234)
    expected = [ref[i] for i in range(len(rows))]
    cfg = DataConfig(**kw)
    rng = random.Random(1234)
    got = [sample_group(parse_row("d.jsonl", i + 1, json.dumps(r), cfg), rng, cfg) for i, r in enumerate(rows)]
    assert [tuple(g) for g in got] == [tuple(e) for e in expected]
    if name == "shuffle-text":
        assert any(g[1][0] not in rows[i]["pos"] for i, g in enumerate(got)), "no positive was text-shuffled"


def test_group_contract():
    """Positive first, G passages, no repeated negative when there are enough, each at most ceil((G-1)/n) times."""
    cfg = DataConfig(train_group_size=8)
    rng = random.Random(0)
    for row in make_rows(60, seed=5, kd=False):
        q, passages, teacher = sample_group(row, rng, cfg)
        assert q == row["query"] and teacher is None and len(passages) == 8
        assert passages[0] in row["pos"] and all(p in row["neg"] for p in passages[1:])
        counts = {p: passages[1:].count(p) for p in passages[1:]}
        limit = 1 if len(row["neg"]) >= 7 else -(-7 // len(row["neg"]))
        assert max(counts.values()) <= limit


def test_collate_matches_flagembedding_collator(tok_dir):
    """Token ids as AbsEmbedderCollator produces them (HF tokenizer, truncation), padded to a bucket."""
    from FlagEmbedding.abc.finetune.embedder.AbsDataset import AbsEmbedderCollator
    from transformers import AutoTokenizer

    cfg = DataConfig(train_group_size=3, query_max_len=20, passage_max_len=48, knowledge_distillation=True)
    rng = random.Random(0)
    groups = [sample_group(r, rng, cfg) for r in make_rows(4, seed=9)]
    groups[0] = (groups[0][0] + " " + " ".join(SENTENCES), *groups[0][1:])  # a query that gets truncated
    batch = collate(groups, Tokenizer(tok_dir), cfg, pad_id=1)
    hf = AutoTokenizer.from_pretrained(str(tok_dir))
    ref = AbsEmbedderCollator(tokenizer=hf, query_max_len=20, passage_max_len=48, padding=True,
                              return_tensors="np")(groups)
    for ours_ids, ours_mask, theirs in (("q_ids", "q_mask", ref["queries"]), ("p_ids", "p_mask", ref["passages"])):
        for r in range(len(theirs["input_ids"])):
            a = batch[ours_ids][r][batch[ours_mask][r].astype(bool)]
            b = theirs["input_ids"][r][theirs["attention_mask"][r].astype(bool)]
            np.testing.assert_array_equal(a, b)
        assert batch[ours_ids].shape[1] in bucket_lengths(20 if ours_ids == "q_ids" else 48)
        assert batch[ours_ids].shape[1] >= theirs["input_ids"].shape[1]
    assert batch["q_mask"][0].sum() == 20  # truncated to query_max_len
    np.testing.assert_allclose(batch["teacher_scores"].reshape(-1), np.float32(ref["teacher_scores"]))
    assert batch["p_ids"].shape[0] == 4 * 3 and batch["teacher_scores"].shape == (4, 3)


def write_dataset(root, rows):
    """Rows spread over a directory: two .jsonl files (one gzipped), one .json, and a file that is not data."""
    root.mkdir()
    parts = [rows[:10], rows[10:17], rows[17:]]
    (root / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in parts[0]) + "\n")  # a blank line too
    with gzip.open(root / "b.jsonl.gz", "wt") as f:
        f.writelines(json.dumps(r) + "\n" for r in parts[1])
    (root / "c.json").write_text("".join(json.dumps(r) + "\n" for r in parts[2]))
    (root / "README.md").write_text("not data")
    return root


def test_pipeline_processes_epochs_and_shapes(tok_dir, tmp_path):
    rows = make_rows(27, seed=1, kd=True)
    root = write_dataset(tmp_path / "data", rows)
    cfg = DataConfig(train_group_size=4, query_max_len=24, passage_max_len=40, knowledge_distillation=True)
    tok = Tokenizer(tok_dir)
    shapes = set(static_shapes(cfg, 3))
    assert len(shapes) == len(bucket_lengths(24)) * len(bucket_lengths(40))

    def run(world, epoch, sources=(str(root),)):
        out = []
        for p in range(world):
            data = TrainData(list(sources), tok, cfg, batch_size=3, seed=7, process_index=p, num_processes=world)
            out.append(list(data.epoch(epoch)))
            assert data.dropped == 27 % (3 * world)
        return out

    two = run(2, 0)
    assert len(two[0]) == len(two[1]) == 27 // 6
    seen = []
    for p in range(2):
        for b in two[p]:
            assert ((3, b["q_ids"].shape[1]), (12, b["p_ids"].shape[1])) in shapes
            assert b["teacher_scores"].shape == (3, 4)
            seen += [tok._tok.decode(list(ids[m.astype(bool)][1:-1])) for ids, m in zip(b["q_ids"], b["q_mask"],
                                                                                        strict=True)]
    assert len(seen) == len(set(seen)) == 24  # every row at most once, over both processes
    # One process fed with both slices sees the same rows, sampled identically (per-example generators).
    one = run(1, 0)[0]
    assert len(one) == 27 // 3
    for k in range(len(two[0])):  # global batch k of two processes = batches 2k and 2k+1 of one
        for p in range(2):
            for key in one[2 * k + p]:
                np.testing.assert_array_equal(two[p][k][key], one[2 * k + p][key])
    again = run(2, 0)
    for a, b in zip(two[0], again[0], strict=True):
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])
    other_epoch = run(2, 1)
    assert any(not np.array_equal(a["q_ids"], b["q_ids"]) for a, b in zip(two[0], other_epoch[0], strict=True))
    # An fsspec URL and explicit files read the same rows.
    files = [f"file://{root}/a.jsonl", str(root / "b.jsonl.gz"), str(root / "c.json")]
    assert sum(len(b) for b in run(1, 0, files)) == len(one)


BAD = [
    ("{not json", "not valid JSON"),
    ("[1, 2]", "expected a JSON object"),
    ('{"pos": ["a"], "neg": ["b"]}', "'query' must be a string"),
    ('{"query": "q", "pos": "a", "neg": ["b"]}', "'pos' must be a list of strings"),
    ('{"query": "q", "pos": ["a", 3], "neg": ["b"]}', "'pos' must be a list of strings, got a list holding int 3"),
    ('{"query": "q", "pos": [], "neg": ["b"]}', "'pos' is empty"),
    ('{"query": "q", "pos": ["a"], "neg": []}', "'neg' is empty but train_group_size=4"),
    ('{"query": "q", "pos": ["a"], "neg": ["b"], "pos_scores": [1.0]}', "'neg_scores' as a list of numbers"),
    ('{"query": "q", "pos": ["a"], "neg": ["b"], "pos_scores": [1.0, 2.0], "neg_scores": [0]}',
     "'pos_scores' has 2 score(s) for 1 'pos'"),
    ('{"query": "q", "pos": ["a"], "neg": ["b"], "pos_scores": [true], "neg_scores": [0]}', "list of numbers"),
]


@pytest.mark.parametrize("raw,message", BAD, ids=[m for _, m in BAD])
def test_bad_rows_name_file_and_line(raw, message):
    cfg = DataConfig(train_group_size=4, knowledge_distillation=True)
    with pytest.raises(DataError) as e:
        parse_row("s3://bucket/train.jsonl", 17, raw, cfg)
    assert str(e.value).startswith("s3://bucket/train.jsonl:17: ") and message in str(e.value)


def test_pipeline_errors(tok_dir, tmp_path):
    tok = Tokenizer(tok_dir)
    cfg = DataConfig(train_group_size=2)
    with pytest.raises(DataError, match="no such file"):
        TrainData([str(tmp_path / "missing.jsonl")], tok, cfg, batch_size=1)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="has no .json/.jsonl files"):
        TrainData([str(tmp_path / "empty")], tok, cfg, batch_size=1)
    good = json.dumps({"query": "q", "pos": ["a"], "neg": ["b"]})
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join([good, "{oops", good, '{"query": 1}', good]) + "\n")
    data = TrainData([str(path)], tok, cfg, batch_size=5, shuffle_buffer_size=1)
    with pytest.raises(DataError, match=r"bad.jsonl:2: not valid JSON"):
        list(data.epoch(0))
    with pytest.raises(DataError) as e:
        data.validate()
    assert "2 bad row(s)" in str(e.value) and "bad.jsonl:2:" in str(e.value) and "bad.jsonl:4:" in str(e.value)
