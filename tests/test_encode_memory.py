"""encode() keeps each row at its own size: one 8,000-token text among 1,000 short ones costs its own vectors, not
[N, T, C] of padding. Peak RSS measured in fresh processes on a tiny model with a wide ColBERT head."""

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.helpers import long_text, mixed

ROOT = Path(__file__).resolve().parents[1]
COLBERT_DIM = 512  # wide, so that padding every row to the long one would dwarf everything else
LONG = 8000

SCRIPT = """
import json, resource, sys
import numpy as np
from m3jax.api import BGEM3
texts = json.load(open(sys.argv[2], encoding="utf-8"))
m = BGEM3(sys.argv[1], use_fp16=False, show_progress=False)
out = m.encode(texts, max_length=8000, return_dense=True, return_sparse=True, return_colbert_vecs=True)
own = out["dense_vecs"].nbytes + sum(v.nbytes for v in out["colbert_vecs"]) + 8 * sum(map(len, out["lexical_weights"]))
# VmHWM, not ru_maxrss: a child's ru_maxrss starts from its parent's (pytest's) peak across fork + exec.
hwm = int([l for l in open("/proc/self/status") if l.startswith("VmHWM:")][0].split()[1]) * 1024
print(json.dumps({"peak": hwm, "own": own,
                  "lengths": [len(v) + 1 for v in out["colbert_vecs"]], "dim": int(out["colbert_vecs"][0].shape[1])}))
"""


def measure(model, texts, tmp_path, name):
    src = tmp_path / f"{name}.json"
    src.write_text(json.dumps(texts), encoding="utf-8")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "M3JAX_HOME": str(tmp_path / "home")}
    r = subprocess.run([sys.executable, "-c", SCRIPT, str(model), str(src)], capture_output=True, text=True,
                       env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.splitlines()[-1])


def test_one_long_text_costs_only_its_own_vectors(tmp_path):
    from flax import nnx

    from m3jax.checkpoint import save_m3jax
    from m3jax.config import M3Config
    from m3jax.model import init_model
    from m3jax.random_weights import random_m3jax_dir

    cfg = M3Config.tiny(colbert_dim=COLBERT_DIM)
    wide = save_m3jax(tmp_path / "wide", cfg, nnx.to_pure_dict(nnx.state(init_model(cfg, seed=0), nnx.Param)),
                      random_m3jax_dir("tiny"))
    short = mixed(1000, seed=5, max_words=12)
    base = measure(wide, short, tmp_path, "short")
    res = measure(wide, short + [long_text(7000, seed=6)], tmp_path, "long")

    assert res["lengths"][:-1] == base["lengths"] and res["lengths"][-1] == LONG  # cut at max_length=8000
    assert res["dim"] == COLBERT_DIM
    bound = 1.5 * base["peak"] + res["own"]
    # What the ColBERT output alone would take, padded to the long text: far past the bound, so holding it (or
    # any [N, T, C] buffer) fails this test.
    padded = len(res["lengths"]) * (LONG - 1) * COLBERT_DIM * 4
    mib = 2**20
    print(f"\npeak RSS: 1,000 short texts {base['peak'] / mib:.0f} MiB; plus one {LONG}-token text "
          f"{res['peak'] / mib:.0f} MiB (output {res['own'] / mib:.0f} MiB; bound {bound / mib:.0f} MiB); "
          f"padded [N, T, C] ColBERT would be {padded / mib:,.0f} MiB")
    assert padded > 4 * bound
    assert res["peak"] <= bound
