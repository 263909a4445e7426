"""Apache Beam RunInference handler: BGE-M3 embeddings inside a Beam pipeline (DirectRunner, Dataflow, Flink, ...).
Needs the `beam` extra (`pip install -e '.[beam]'`).

    import apache_beam as beam
    from apache_beam.ml.inference.base import RunInference
    from m3jax.embed.beam import M3EmbedHandler, to_parquet_row

    handler = M3EmbedHandler("BAAI/bge-m3", max_length=512)
    (p | beam.io.ReadFromText("gs://bucket/corpus.tsv") | beam.Map(lambda line: tuple(line.split("\t", 1)))
       | RunInference(handler) | beam.Map(to_parquet_row)
       | beam.io.WriteToParquet("gs://bucket/emb/part", handler.parquet_schema()))

Each element is an (id, text) pair; each result a PredictionResult whose inference is one row with the fields and
dtypes of an `m3jax embed` Parquet row (id, tokens, truncated, dense, sparse_ids, sparse_weights, colbert). Within a
Beam batch the texts are sorted and bucketed exactly as one `m3jax embed` window, so a batch holding the same texts
as a window gives bit-identical rows.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from typing import Any

try:
    from apache_beam.ml.inference.base import ModelHandler, PredictionResult
except ImportError as e:  # the module is the optional part: say which extra it needs
    raise ImportError("m3jax.embed.beam needs Apache Beam: pip install -e '.[beam]'") from e

from m3jax import pipeline
from m3jax.embed import job, writer
from m3jax.embed.planner import plan_windows
from m3jax.embed.sink import WindowOutputs


class M3EmbedHandler(ModelHandler):
    """RunInference handler: (id, text) -> PredictionResult((id, text), row dict). The model (an Encoder) is loaded
    once per worker process (Beam's shared model) and its compiled shapes are reused across batches.

    Args:
      model: m3jax or release directory, or hub id (read by each worker: a local path must exist there).
      outputs, max_length, batch_size, max_tokens_per_batch, length_buckets, dense_dtype, colbert_dtype, dtype,
        attn_impl: as `m3jax embed` (the same defaults, so rows match the job's; dense_dtype "binary" too, not int8).
      devices: see m3jax.engine.resolve_devices.
      min_batch_size, max_batch_size, max_batch_duration_secs: beam.BatchElements' hints; a Beam batch is one
        planning window, so larger batches pad less (its length buckets hold texts of similar length).
      large_model, model_copies: Beam's model sharing across processes on one worker (one copy per accelerator).
    """

    def __init__(self, model: str | os.PathLike, *, outputs: Sequence[str] = pipeline.HEADS, max_length: int = 512,
                 batch_size: int = 256, max_tokens_per_batch: int | None = None,
                 length_buckets: Sequence[int] | None = None, dense_dtype: str = "float32",
                 colbert_dtype: str = "float16", dtype: str = "float32", attn_impl: str = "auto", devices: Any = None,
                 min_batch_size: int | None = None, max_batch_size: int = 1024,
                 max_batch_duration_secs: int | None = None, large_model: bool = False,
                 model_copies: int | None = None):
        super().__init__(min_batch_size=min_batch_size, max_batch_size=max_batch_size,
                         max_batch_duration_secs=max_batch_duration_secs, large_model=large_model,
                         model_copies=model_copies)
        self.model_path = os.fspath(model)
        self.settings = job.Settings(outputs=tuple(h for h in pipeline.HEADS if h in outputs), max_length=max_length,
                                     batch_size=batch_size, max_tokens_per_batch=max_tokens_per_batch,
                                     length_buckets=tuple(int(b) for b in length_buckets) if length_buckets else None,
                                     dense_dtype=dense_dtype, colbert_dtype=colbert_dtype, dtype=dtype,
                                     attn_impl=attn_impl)
        if set(outputs) - set(pipeline.HEADS):
            raise ValueError(f"outputs must be a non-empty subset of {pipeline.HEADS}, got {tuple(outputs)!r}")
        self.settings.check(None)
        if self.settings.int8_heads():
            raise ValueError(f"M3EmbedHandler: {self.settings.int8_heads()[0]} as int8 needs calibration ranges, which "
                             "a Beam pipeline has no pass to calibrate; use `m3jax embed`, or binary / float16")
        self.devices = devices

    def load_model(self):
        from m3jax.engine import Encoder

        s = self.settings
        enc = Encoder.from_pretrained(self.model_path, dtype=s.dtype, devices=self.devices, attn_impl=s.attn_impl,
                                      length_buckets=s.length_buckets, max_tokens_per_batch=s.max_tokens_per_batch)
        s.check(enc.config.max_length)
        return enc

    def run_inference(self, batch: Sequence[tuple[Any, str]], model, inference_args: dict | None = None
                      ) -> Iterable[PredictionResult]:
        if inference_args:
            raise ValueError(f"M3EmbedHandler takes no inference_args, got {sorted(inference_args)}")
        rows = []
        for i, x in enumerate(batch):
            if not (isinstance(x, tuple) and len(x) == 2 and isinstance(x[1], str)):
                raise TypeError(f"element {i} of the batch: expected an (id, text: str) pair, got {_show(x)}")
            rows.append((str(x[0]), x[1]))
        s = self.settings
        windows = plan_windows(model, 0, 0, rows, max_length=s.max_length, batch_size=s.batch_size,
                               window_tokens=1 << 62)  # the whole Beam batch is one window
        out: list = []
        for w in windows:
            acc = WindowOutputs(w, s)
            for b, o in model.run(w.batches, heads=s.outputs, out_formats=s.out_formats()):
                acc.add(b, o)
            out += acc.rows()
        return [PredictionResult(x, row, self.model_path) for x, row in zip(batch, out, strict=True)]

    def get_num_bytes(self, batch: Sequence[tuple[Any, str]]) -> int:
        return sum(len(t.encode("utf-8")) for _, t in batch)

    def get_metrics_namespace(self) -> str:
        return "m3jax"

    def parquet_schema(self, dense_dim: int = 1024, colbert_dim: int = 1024):
        """The pyarrow schema of `m3jax embed`'s shards for these settings and the model's widths (BAAI/bge-m3's
        by default), for beam.io.WriteToParquet."""
        s = self.settings
        return writer.schema(s.outputs, {"dense": dense_dim, "colbert": colbert_dim}, s.dense_dtype, s.colbert_dtype)

def to_parquet_row(result: PredictionResult) -> dict:
    """A RunInference result as a dict beam.io.WriteToParquet writes with M3EmbedHandler.parquet_schema()."""
    row = dict(result.inference)
    if "colbert" in row:
        row["colbert"] = list(row["colbert"])  # list<fixed_size_list>: one 1-D array per vector
    return row


def _show(x: Any) -> str:
    s = repr(x)
    return s if len(s) <= 80 else s[:77] + "..."
