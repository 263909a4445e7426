"""`m3jax embed`: a corpus (text, JSONL, Parquet files or URLs, or an iterable) to sharded Parquet embeddings,
streamed, resumable and multi-host; EmbeddingReader reads the result back. Needs the `embed` extra."""

from m3jax.embed.job import EmbedError, Settings, embed
from m3jax.embed.reader import EmbeddingReader
from m3jax.embed.sources import InputError

__all__ = ["EmbedError", "EmbeddingReader", "InputError", "Settings", "embed"]
