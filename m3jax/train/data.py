"""FlagEmbedding 1.4.2's training data, streamed: JSON lines in, padded static-shape batches out.

Format (one JSON object per line; files, directories of .json/.jsonl files, or fsspec URLs, compression inferred):
    {"query": str, "pos": [str, ...], "neg": [str, ...],
     "pos_scores": [float, ...], "neg_scores": [float, ...],   # teacher scores, read with knowledge_distillation
     "prompt": str}                                             # per-example query instruction (optional)
JSON lines only: a .json file holding one JSON array (which the reference's `datasets` loader also accepts) is
rejected at its first line. Not carried over: max_example_num_per_dataset, and the same-dataset-per-batch mode
(AbsEmbedderSameDatasetTrainDataset, with per-file batch sizes and `no_in_batch_neg` file names); the loss
supports the latter's no_in_batch_neg flag.

Sampling mirrors AbsEmbedderTrainDataset.__getitem__ draw for draw (`sample_group`): one positive drawn with
random.choice, optionally text-shuffled (shuffle_ratio), then G-1 negatives by random.sample, from the pool repeated
ceil((G-1)/len(neg)) times when it is too small; teacher scores follow the drawn indices; instructions are applied as
the reference applies them. Each example draws from its own random.Random seeded by (seed, epoch, example index), so
what an example gets does not depend on the number of processes.

Order: files in a seeded order, then a seeded shuffle buffer (a uniform shuffle when the data fit in it). Every
process reads the same stream and takes its own slice of each global batch (batch_size rows per process), so the
processes always agree on the batch count; a last, incomplete global batch is dropped and counted (`dropped`).

Shapes: a batch is q_ids/q_mask [B, Lq], p_ids/p_mask [B·G, Lp] (each query's G passages together, positive first),
teacher_scores [B, G]; Lq and Lp are the smallest length buckets (m3jax.pipeline.LENGTH_BUCKETS, capped at the max
lengths) holding the longest text, so a run compiles at most len(bucket_lengths(q)) · len(bucket_lengths(p)) times.
The loss reproduces the reference's own padding where it matters (see m3jax.train.loss).
"""

from __future__ import annotations

import bisect
import dataclasses
import logging
import math
import random
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import numpy as np

from m3jax._io import parse_json_object
from m3jax.pipeline import LENGTH_BUCKETS

logger = logging.getLogger("m3jax")
SUFFIXES = (".json", ".jsonl")
_COMPRESSED = (".gz", ".bz2", ".xz", ".zst")
# Per-row instructions: the embedder's query "prompt"; the re-ranker's "query_prompt" and "passage_prompt".
PROMPT_KEYS = ("prompt", "query_prompt", "passage_prompt")


class DataError(ValueError):
    """A training row or source that cannot be used; the message names the file and line."""


@dataclasses.dataclass(frozen=True)
class GroupConfig:
    """The fields FlagEmbedding's embedder and re-ranker data arguments share (same names and defaults): how a
    training group is drawn and how long its texts may be. DataConfig and RerankerDataConfig add their
    instructions."""

    train_group_size: int = 8
    query_max_len: int = 32
    passage_max_len: int = 128
    knowledge_distillation: bool = False
    query_instruction_format: str = "{}{}"
    passage_instruction_format: str = "{}{}"
    shuffle_ratio: float = 0.0
    # The row keys whose string overrides the configured query / passage instruction (None: no such key).
    QUERY_PROMPT_KEY = "prompt"
    PASSAGE_PROMPT_KEY = None

    def __post_init__(self):
        # As the reference's __post_init__: a literal "\n" typed on a command line means a newline.
        for name in ("query_instruction_format", "passage_instruction_format"):
            object.__setattr__(self, name, getattr(self, name).replace("\\n", "\n"))
        if self.train_group_size < 1:
            raise ValueError(f"train_group_size must be >= 1, got {self.train_group_size}")
        for name in ("query_max_len", "passage_max_len"):
            if getattr(self, name) < 2:
                raise ValueError(f"{name} must be >= 2 (<s> and </s>), got {getattr(self, name)}")
        if not 0.0 <= self.shuffle_ratio <= 1.0:
            raise ValueError(f"shuffle_ratio must be in [0, 1], got {self.shuffle_ratio}")

    def instructions(self) -> tuple[str | None, str | None]:
        """The configured (query, passage) instructions."""
        raise NotImplementedError

    def instruct(self, row: dict, query: str, passages: list[str]) -> tuple[str, list[str]]:
        """The query and passages with the instructions applied as the reference applies them: only when one is
        configured, and then the row's own prompt (QUERY_PROMPT_KEY, PASSAGE_PROMPT_KEY) in its place if it has
        one."""
        q, p = self.instructions()
        if q is not None:
            query = self.query_instruction_format.format(row.get(self.QUERY_PROMPT_KEY, q), query)
        if p is not None:
            p = row.get(self.PASSAGE_PROMPT_KEY, p) if self.PASSAGE_PROMPT_KEY else p
            passages = [self.passage_instruction_format.format(p, t) for t in passages]
        return query, passages


@dataclasses.dataclass(frozen=True)
class DataConfig(GroupConfig):
    """AbsEmbedderDataArguments' fields that shape an example (same names and defaults)."""

    query_instruction_for_retrieval: str | None = None
    passage_instruction_for_retrieval: str | None = None

    def instructions(self) -> tuple[str | None, str | None]:
        return self.query_instruction_for_retrieval, self.passage_instruction_for_retrieval


@dataclasses.dataclass(frozen=True)
class RerankerDataConfig(GroupConfig):
    """AbsRerankerDataArguments' fields that shape a cross-encoder's example (same names and defaults). A pair is
    the query cut to query_max_len + passage_max_len // 4 tokens and the passage to passage_max_len +
    query_max_len // 2, then joined and the passage cut so the pair fits max_len = query_max_len + passage_max_len,
    as AbsRerankerTrainDataset.create_one_example does (the reference's own max_len argument is unused there).
    Rows may carry "query_prompt" / "passage_prompt" in place of the configured instructions; "prompt" is the LLM
    re-rankers' and is not used."""

    query_instruction_for_rerank: str | None = None
    passage_instruction_for_rerank: str | None = None
    QUERY_PROMPT_KEY = "query_prompt"
    PASSAGE_PROMPT_KEY = "passage_prompt"

    def __post_init__(self):
        super().__post_init__()
        if self.passage_max_len < 6:  # below that a full-length query leaves no room for any passage token
            raise ValueError(f"passage_max_len must be >= 6 for a re-ranker, got {self.passage_max_len}")

    @property
    def max_len(self) -> int:
        return self.query_max_len + self.passage_max_len

    def instructions(self) -> tuple[str | None, str | None]:
        return self.query_instruction_for_rerank, self.passage_instruction_for_rerank


# ----------------------------------------------------------------------------------------------------- reading
def list_files(sources: str | Sequence[str]) -> list[str]:
    """Data files (as URLs fsspec opens) from files, directories (their .json/.jsonl files, not recursive, as the
    reference's os.listdir; sorted) and fsspec URLs. A source that does not exist, or a directory without data
    files, is an error."""
    import fsspec

    files = []
    for src in [sources] if isinstance(sources, str) else list(sources):
        fs, path = fsspec.core.url_to_fs(str(src))
        if fs.isdir(path):
            found = sorted(p for p in fs.ls(path, detail=False)
                           if _is_data_name(p) and not fs.isdir(p))
            if not found:
                raise DataError(f"{src}: directory has no {'/'.join(SUFFIXES)} files")
            files += [fs.unstrip_protocol(p) for p in found]
        elif fs.exists(path):
            files.append(fs.unstrip_protocol(path))
        else:
            raise DataError(f"{src}: no such file or directory")
    return files


def _is_data_name(path: str) -> bool:
    name = path.rsplit("/", 1)[-1]
    for c in _COMPRESSED:
        name = name.removesuffix(c)
    return name.endswith(SUFFIXES)


def read_lines(files: Iterable[str]) -> Iterator[tuple[str, int, str]]:
    """(file, 1-based line number, raw line) for every non-blank line, streamed."""
    import fsspec

    for f in files:
        with fsspec.open(f, "rt", encoding="utf-8", compression="infer") as fh:
            for i, line in enumerate(fh, 1):
                if line.strip():
                    yield f, i, line


def check_texts(row: dict, where: str, *, neg_required: bool = True) -> None:
    """A row's texts: 'query' a string, 'pos' a non-empty list of strings, 'neg' a list of strings (with
    neg_required=False it may be absent, as in data whose negatives are still to be mined); DataError otherwise."""
    if not isinstance(row.get("query"), str):
        raise DataError(f"{where}: 'query' must be a string, got {_kind(row.get('query'))}")
    for key in ("pos", "neg") if neg_required or "neg" in row else ("pos",):
        v = row.get(key)
        if not isinstance(v, list) or not all(isinstance(t, str) for t in v):
            raise DataError(f"{where}: {key!r} must be a list of strings, got {_kind(v)}")
    if not row["pos"]:
        raise DataError(f"{where}: 'pos' is empty; every query needs a positive passage")


def parse_row(source: str, line: int, raw: str, cfg: GroupConfig) -> dict:
    """One JSON line -> a checked row {query, pos, neg[, pos_scores, neg_scores][, PROMPT_KEYS]}; DataError
    otherwise."""
    where = f"{source}:{line}"
    row = parse_json_object(raw, where, DataError)
    check_texts(row, where)
    if not row["neg"] and cfg.train_group_size > 1:
        raise DataError(f"{where}: 'neg' is empty but train_group_size={cfg.train_group_size} needs "
                        f"{cfg.train_group_size - 1} negative(s)")
    out = {"query": row["query"], "pos": row["pos"], "neg": row["neg"]}
    for key in PROMPT_KEYS:
        if row.get(key) is not None:
            if not isinstance(row[key], str):
                raise DataError(f"{where}: {key!r} must be a string, got {_kind(row[key])}")
            out[key] = row[key]
    if cfg.knowledge_distillation:
        for key, texts in (("pos_scores", "pos"), ("neg_scores", "neg")):
            v = row.get(key)
            if not isinstance(v, list) or not all(_is_number(s) for s in v):
                raise DataError(f"{where}: knowledge_distillation needs {key!r} as a list of numbers, got {_kind(v)}")
            if len(v) != len(row[texts]):
                raise DataError(f"{where}: {key!r} has {len(v)} score(s) for {len(row[texts])} {texts!r} passage(s)")
            out[key] = [float(s) for s in v]
    return out


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _kind(v: Any) -> str:
    if isinstance(v, list):
        bad = next((t for t in v if not isinstance(t, str)), None)
        return f"a list holding {type(bad).__name__} {bad!r}" if bad is not None or not v else "a list"
    return "nothing" if v is None else f"{type(v).__name__} {str(v)[:40]!r}"


# ---------------------------------------------------------------------------------------------------- sampling
def shuffle_text(text: str, rng: random.Random, ratio: float) -> str:
    """AbsEmbedderTrainDataset._shuffle_text: with probability ratio, a text over 100 characters is cut into 3
    chunks, shuffled and joined with spaces (draws from rng only when ratio > 0 and the text is long enough)."""
    if ratio > 0 and len(text) > 100 and rng.random() < ratio:
        size = len(text) // 3 + 1
        chunks = [text[i:i + size] for i in range(0, len(text), size)]
        rng.shuffle(chunks)
        return " ".join(chunks)
    return text


def sample_group(row: dict, rng: random.Random, cfg: GroupConfig) -> tuple[str, list[str], list[float] | None]:
    """AbsEmbedderTrainDataset.__getitem__ (and AbsRerankerTrainDataset's, which draws alike) on one checked row:
    (query, G passages positive first, G teacher scores or None), making the same calls on rng as the reference
    makes on the `random` module."""
    G = cfg.train_group_size
    pos_idx = rng.choice(list(range(len(row["pos"]))))
    passages = [shuffle_text(row["pos"][pos_idx], rng, cfg.shuffle_ratio)]
    pool = list(range(len(row["neg"])))
    if len(row["neg"]) < G - 1:
        neg_idxs = rng.sample(pool * math.ceil((G - 1) / len(row["neg"])), G - 1)
    else:
        neg_idxs = rng.sample(pool, G - 1)
    passages += [row["neg"][i] for i in neg_idxs]
    teacher = None
    if cfg.knowledge_distillation:
        teacher = [row["pos_scores"][pos_idx]] + [row["neg_scores"][i] for i in neg_idxs]
    query, passages = cfg.instruct(row, row["query"], passages)
    return query, passages, teacher


def example_rng(seed: int, epoch: int, index: int) -> random.Random:
    """The generator example `index` (position in the epoch's shuffled stream) samples from."""
    return random.Random(f"m3jax-train:{seed}:{epoch}:{index}")


# ------------------------------------------------------------------------------------------------------ shapes
def bucket_lengths(max_len: int, buckets: Sequence[int] = LENGTH_BUCKETS) -> tuple[int, ...]:
    """Every padded length a text of at most max_len tokens can get: the buckets below max_len, then max_len."""
    return tuple(b for b in buckets if b < max_len) + (max_len,)


def static_shapes(cfg: DataConfig, batch_size: int, buckets: Sequence[int] = LENGTH_BUCKETS) -> list[tuple]:
    """All (q_ids shape, p_ids shape) pairs a run can produce: the bound on compilations."""
    G = cfg.train_group_size
    return [((batch_size, lq), (batch_size * G, lp)) for lq in bucket_lengths(cfg.query_max_len, buckets)
            for lp in bucket_lengths(cfg.passage_max_len, buckets)]


def pad_batch(ids: Sequence[np.ndarray], lengths: Sequence[int], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Right-pads token id arrays to the smallest of `lengths` that holds the longest: ([R, L] int32, mask)."""
    longest = max(len(x) for x in ids)
    i = bisect.bisect_left(lengths, longest)
    if i == len(lengths):
        raise ValueError(f"a text of {longest} tokens exceeds the longest padded length {lengths[-1]}")
    L = lengths[i]
    out = np.full((len(ids), L), pad_id, np.int32)
    mask = np.zeros((len(ids), L), np.int32)
    for r, x in enumerate(ids):
        out[r, :len(x)], mask[r, :len(x)] = x, 1
    return out, mask


def collate(groups: Sequence[tuple[str, list[str], list[float] | None]], tokenizer, cfg: GroupConfig, pad_id: int,
            buckets: Sequence[int] = LENGTH_BUCKETS) -> dict[str, np.ndarray]:
    """Sampled groups -> a batch: q_ids, q_mask [B, Lq]; p_ids, p_mask [B·G, Lp]; teacher_scores [B, G] float32
    with knowledge_distillation. Texts are truncated to query_max_len / passage_max_len tokens as the reference's
    collator truncates them (`<s>`/`</s>` kept)."""
    q_ids, _ = tokenizer.encode([g[0] for g in groups], cfg.query_max_len)
    p_ids, _ = tokenizer.encode([p for g in groups for p in g[1]], cfg.passage_max_len)
    batch = {}
    batch["q_ids"], batch["q_mask"] = pad_batch(q_ids, bucket_lengths(cfg.query_max_len, buckets), pad_id)
    batch["p_ids"], batch["p_mask"] = pad_batch(p_ids, bucket_lengths(cfg.passage_max_len, buckets), pad_id)
    if cfg.knowledge_distillation:
        batch["teacher_scores"] = np.asarray([g[2] for g in groups], np.float32)
    return batch


def collate_pairs(groups: Sequence[tuple[str, list[str], list[float] | None]], tokenizer, cfg: RerankerDataConfig,
                  pad_id: int, buckets: Sequence[int] = LENGTH_BUCKETS, *, model_cfg: Any) -> dict[str, np.ndarray]:
    """Sampled groups -> a cross-encoder's batch: ids, mask [B, G, L], each group's G pairs `<s> q </s></s> p </s>`
    (positive first) tokenised as AbsRerankerTrainDataset.create_one_example does (see RerankerDataConfig) and
    padded to the smallest bucket of bucket_lengths(cfg.max_len) holding the longest; teacher_scores [B, G] float32
    with knowledge_distillation. model_cfg: the model's M3Config (special token ids)."""
    from m3jax.reranker import pair_ids

    G = cfg.train_group_size
    queries = tokenizer.encode_plain([g[0] for g in groups], cfg.query_max_len + cfg.passage_max_len // 4)
    passages = tokenizer.encode_plain([p for g in groups for p in g[1]], cfg.passage_max_len + cfg.query_max_len // 2)
    pairs = pair_ids([queries[i // G] for i in range(len(passages))], passages, cfg.max_len, model_cfg)
    ids, mask = pad_batch(pairs, bucket_lengths(cfg.max_len, buckets), pad_id)
    batch = {"ids": ids.reshape(len(groups), G, -1), "mask": mask.reshape(len(groups), G, -1)}
    if cfg.knowledge_distillation:
        batch["teacher_scores"] = np.asarray([g[2] for g in groups], np.float32)
    return batch


# ---------------------------------------------------------------------------------------------------- pipeline
def shuffle_buffer(items: Iterable, size: int, rng: np.random.Generator) -> Iterator:
    """Streaming shuffle: a uniform permutation when the stream fits in `size`, a local one otherwise."""
    buf = []
    for item in items:
        if len(buf) < size:
            buf.append(item)
            continue
        j = int(rng.integers(size))
        yield buf[j]
        buf[j] = item
    for j in rng.permutation(len(buf)):
        yield buf[j]


class TrainData:
    """Batches for one process, epoch by epoch: `for batch in data.epoch(e)`.

    Args:
      sources: files, directories or fsspec URLs of JSON lines.
      tokenizer: an m3jax.tokenizer.Tokenizer (the model's tokenizer.json).
      cfg: DataConfig (group size, max lengths, instructions, distillation).
      batch_size: queries per process per batch (the reference's per_device_train_batch_size times the devices
        this process feeds).
      seed: file order, shuffle and sampling all derive from it and the epoch.
      process_index, num_processes: this process's slice of every global batch.
      shuffle_buffer_size: rows (raw lines) held for shuffling.
      pad_id: the tokenizer's pad id (XLM-R: 1).
      buckets: the padded lengths (bucket_lengths).
      collate_fn: (groups, tokenizer, cfg, pad_id, buckets) -> batch; the embedder's `collate` by default.
    """

    def __init__(self, sources: str | Sequence[str], tokenizer, cfg: GroupConfig, *, batch_size: int, seed: int = 0,
                 process_index: int = 0, num_processes: int = 1, shuffle_buffer_size: int = 100_000,
                 pad_id: int = 1, buckets: Sequence[int] = LENGTH_BUCKETS, collate_fn: Callable = collate):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not 0 <= process_index < num_processes:
            raise ValueError(f"process_index {process_index} is not in [0, {num_processes})")
        self.files = list_files(sources)
        self.tokenizer, self.cfg, self.batch_size, self.seed = tokenizer, cfg, batch_size, seed
        self.process_index, self.num_processes = process_index, num_processes
        self.shuffle_buffer_size, self.pad_id, self.buckets = shuffle_buffer_size, pad_id, tuple(buckets)
        self.collate_fn = collate_fn
        self.dropped = 0  # rows of the last epoch's incomplete final global batch

    def stream(self, epoch: int) -> Iterator[tuple[int, str, int, str]]:
        """(index in the epoch, file, line, raw line) in the epoch's shuffled order, identical on every process."""
        rng = np.random.default_rng([self.seed, epoch])
        files = [self.files[i] for i in rng.permutation(len(self.files))]
        lines = shuffle_buffer(read_lines(files), self.shuffle_buffer_size, rng)
        for index, (f, line, raw) in enumerate(lines):
            yield index, f, line, raw

    def examples(self, epoch: int) -> Iterator[list[tuple[str, list[str], list[float] | None]]]:
        """This process's sampled groups, one list of batch_size per global batch."""
        per, world = self.batch_size, self.num_processes
        lo, hi = self.process_index * per, (self.process_index + 1) * per
        pending = []
        self.dropped = 0
        for item in self.stream(epoch):
            pending.append(item)
            if len(pending) < per * world:
                continue
            yield [sample_group(parse_row(f, line, raw, self.cfg), example_rng(self.seed, epoch, i), self.cfg)
                   for i, f, line, raw in pending[lo:hi]]
            pending = []
        if pending:
            self.dropped = len(pending)
            logger.warning("epoch %d: dropped the last %d row(s): not a whole global batch of %d", epoch,
                           len(pending), per * world)

    def collate(self, groups: Sequence[tuple[str, list[str], list[float] | None]]) -> dict[str, np.ndarray]:
        """Sampled groups -> a padded batch, by collate_fn (the embedder's `collate`, or the re-ranker's
        m3jax.train.rerank.collate_pairs)."""
        return self.collate_fn(groups, self.tokenizer, self.cfg, self.pad_id, self.buckets)

    def epoch(self, epoch: int) -> Iterator[dict[str, np.ndarray]]:
        for groups in self.examples(epoch):
            yield self.collate(groups)

    def validate(self, max_problems: int = 20) -> int:
        """Parses every row (all processes' rows) and raises one DataError listing up to max_problems bad rows;
        returns the number of rows."""
        problems, n = [], 0
        for f, line, raw in read_lines(self.files):
            n += 1
            try:
                parse_row(f, line, raw, self.cfg)
            except DataError as e:
                problems.append(str(e))
                if len(problems) >= max_problems:
                    break
        if problems:
            raise DataError(f"{len(problems)} bad row(s){' (stopped there)' if len(problems) >= max_problems else ''}"
                            ":\n  " + "\n  ".join(problems))
        if n == 0:
            raise DataError(f"no rows in {self.files}")
        return n
