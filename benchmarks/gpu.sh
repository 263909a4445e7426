#!/usr/bin/env bash
# One command for an NVIDIA GPU machine (the workplace's H200 image: jax[cuda], torch, flax, orbax, transformers 5):
#   bash benchmarks/gpu.sh
# Encoding (m3jax vs FlagEmbedding), then fit's bf16 train step at 512 and 8,192 tokens (not yet run on a GPU).
# Installs m3jax from this checkout without touching the image's packages, then runs benchmarks/gpu_bench.py.
# FlagEmbedding 1.4.2 needs transformers<5: carry wheels in .whl/ (FlagEmbedding, transformers 4.57.x and their
# missing needs) to time FlagEmbedding itself; without them the same torch fp16 computation is timed, and labelled.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false XLA_PYTHON_CLIENT_PREALLOCATE=false
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
timeout 570 python3 benchmarks/gpu_bench.py --out "${OUT:-.}" "$@"   # e.g. --train-only
