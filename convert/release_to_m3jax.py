#!/usr/bin/env python
"""Convert a BAAI/bge-m3 release-layout directory (or hub id) into an m3jax directory.

    python convert/release_to_m3jax.py SRC DST [--overwrite]

Same as `m3jax convert` and `m3jax.convert_release(src, dst)`. Every tensor is checked before anything is written;
DST appears only when complete.
"""

import sys

from m3jax.cli import main

if __name__ == "__main__":
    sys.exit(main(["convert", *sys.argv[1:]]))
