"""The main job (`m3jax demo`) offline, end to end, in a fresh process."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_demo_offline_falls_back_to_random_weights(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hf"),
           "M3JAX_HOME": str(tmp_path / "home")}
    r = subprocess.run([sys.executable, "-m", "m3jax", "demo", "--random-size", "tiny"], capture_output=True,
                       text=True, env=env, cwd=ROOT, timeout=600)
    assert r.returncode == 0, r.stderr
    first, *rest = r.stdout.splitlines()
    assert first.startswith("BAAI/bge-m3: not available") and "RANDOM WEIGHTS" in first
    out = "\n".join(rest)
    for section in ("dense similarities", "top lexical tokens", "ColBERT late-interaction scores"):
        assert section in out
    assert (tmp_path / "home" / "random-tiny" / "m3jax.json").is_file()
    # Second run reuses the random checkpoint written by the first.
    r2 = subprocess.run([sys.executable, "-m", "m3jax", "demo", "--random", "--random-size", "tiny"],
                        capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert r2.returncode == 0, r2.stderr
    assert r2.stdout.splitlines()[-8:] == rest[-8:]  # same weights, same numbers
