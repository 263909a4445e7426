"""Data-parallel encoding over several devices (4 forced host devices, in a subprocess) equals one device."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from m3jax.api import BGEM3
from tests.helpers import SENTENCES, mixed

ROOT = Path(__file__).resolve().parents[1]
TEXTS = SENTENCES + mixed(9, seed=8)

SCRIPT = """
import json, sys
import jax
from m3jax.api import BGEM3
texts = json.loads(sys.argv[2])
m = BGEM3(sys.argv[1], use_fp16=False, batch_size=3)
assert len(m.devices) == 4, m.devices
r = m.encode_padded(texts)
shardings = {str(v.sharding) for v in jax.tree_util.tree_leaves(m.state)}
print(json.dumps({"dense": r.dense.tolist(), "ids": r.sparse_ids.tolist(), "w": r.sparse_weights.tolist(),
                  "colbert": r.colbert.tolist(), "rows": [b.input_ids.shape[0] for b in m.batches(texts,
                  batch_size=3, max_length=512)[0]], "shardings": sorted(shardings)}))
"""


def test_four_devices_match_one(release_dirs):
    path = release_dirs["tiny"]
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    r = subprocess.run([sys.executable, "-c", SCRIPT, str(path), json.dumps(TEXTS)], capture_output=True, text=True,
                       env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    multi = json.loads(r.stdout.splitlines()[-1])
    assert all(rows % 4 == 0 for rows in multi["rows"])  # every batch splits evenly over the devices
    assert any("NamedSharding" in s for s in multi["shardings"])
    one = BGEM3(path, use_fp16=False, batch_size=3).encode_padded(TEXTS)
    assert np.abs(np.array(multi["dense"]) - one.dense).max() <= 1e-6
    np.testing.assert_array_equal(np.array(multi["ids"]), one.sparse_ids)
    assert np.abs(np.array(multi["w"]) - one.sparse_weights).max() <= 1e-6
    assert np.abs(np.array(multi["colbert"]) - one.colbert).max() <= 1e-6


KERNELS = """
import json
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
from m3jax.attention import attention
rng = np.random.default_rng(0)
q, k, v = (jnp.asarray(rng.normal(size=(4, 128, 2, 64)), jnp.float32) for _ in range(3))
mask = jnp.asarray(np.arange(128)[None, :] < np.array([128, 77, 5, 128])[:, None])
ref = np.asarray(attention(q, k, v, mask, impl="xla"))
mesh = jax.sharding.Mesh(np.array(jax.devices()), ("data",))
rows = NamedSharding(mesh, P("data"))
out = {}
for impl in ("splash",):
    f = jax.jit(lambda q, k, v, m: attention(q, k, v, m, impl=impl))
    with jax.set_mesh(mesh):
        args = jax.device_put((q, k, v, mask), rows)
        hlo = f.lower(*args).compile().as_text()
        got = np.asarray(f(*args))
    real = np.asarray(mask)[..., None, None]
    out[impl] = {"err": float(np.abs(np.where(real, got - ref, 0)).max()), "gathers": hlo.count("all-gather")}
print(json.dumps(out))
"""


def test_kernels_run_per_device_rows():
    """Custom-call attention kernels under a 4-device mesh run on each device's rows (shard_map; no all-gather of
    the batch) and give the single-device result: splash (Pallas, interpret mode on CPU)."""
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    r = subprocess.run([sys.executable, "-c", KERNELS], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.splitlines()[-1])
    for impl, res in out.items():
        assert res["gathers"] == 0, (impl, res)
        assert res["err"] <= 1e-5, (impl, res)
