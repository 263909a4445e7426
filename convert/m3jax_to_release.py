#!/usr/bin/env python
"""Export an m3jax directory to the BAAI/bge-m3 release layout, which FlagEmbedding's BGEM3FlagModel loads.

    python convert/m3jax_to_release.py SRC DST [--format safetensors|bin] [--overwrite]

Same as `m3jax export` and `m3jax.export_release(src, dst)`. Heads are written in float16, as in the release.
"""

import sys

from m3jax.cli import main

if __name__ == "__main__":
    sys.exit(main(["export", *sys.argv[1:]]))
