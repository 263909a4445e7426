"""Data parallelism and FSDP over 4 forced host devices (a subprocess: XLA_FLAGS must precede jax's start) give the
parameters of one device, and FSDP really shards parameters and optimiser state.

The single-device reference takes the 4 devices' row blocks as 4 accumulated micro-batches: DDP's semantics (each
rank's in-batch negatives, gradients averaged over ranks) are exactly gradient accumulation's."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from m3jax.train.sharding import fsdp_spec

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = """
import json
import jax, jax.numpy as jnp, numpy as np
from flax import nnx
from jax.sharding import PartitionSpec as P
from m3jax.config import M3Config
from m3jax.model import abstract_model, init_model
from m3jax.train.loss import LossConfig
from m3jax.train.sharding import make_mesh, tree_shardings, batch_sharding
from m3jax.train.step import OptimConfig, accumulate_step, make_optimizer

assert jax.device_count() == 4, jax.devices()
cfg = M3Config.tiny(vocab_size=1000)
flags = LossConfig(unified_finetuning=True, use_self_distill=True)
graphdef = nnx.split(abstract_model(cfg))[0]
state0 = jax.tree_util.tree_map(np.asarray, nnx.split(init_model(cfg, seed=0))[1])
# AdamW with a large epsilon: updates proportional to the gradients (no sign flips of near-zero gradients).
tx = make_optimizer(state0, flags, OptimConfig(num_training_steps=4, learning_rate=1e-2, adam_epsilon=1.0,
                                               weight_decay=0.01))
W, B, G, LQ, LP = 4, 2, 2, 16, 24
rng = np.random.default_rng(0)
def batch():
    qm = (np.arange(LQ) < rng.integers(4, LQ + 1, (W * B, 1))).astype(np.int32)
    pm = (np.arange(LP) < rng.integers(6, LP + 1, (W * B * G, 1))).astype(np.int32)
    return {"q_ids": np.where(qm, rng.integers(4, 1000, qm.shape), 1).astype(np.int32), "q_mask": qm,
            "p_ids": np.where(pm, rng.integers(4, 1000, pm.shape), 1).astype(np.int32), "p_mask": pm}
batches = [batch(), batch()]
key = jax.random.PRNGKey(0)

def run(mesh, fsdp, cache=None, flags=flags):
    state = jax.tree_util.tree_map(jnp.asarray, state0)
    if mesh is not None:
        state = jax.device_put(state, tree_shardings(state, mesh, fsdp))
    opt = jax.jit(tx.init)(state)
    if mesh is not None:
        opt = jax.device_put(opt, tree_shardings(opt, mesh, fsdp))
    for step, b in enumerate(batches):
        if mesh is None:  # device w's rows as micro-batch w
            stacked = {k: v.reshape(W, v.shape[0] // W, *v.shape[1:]) for k, v in b.items()}
        else:
            stacked = jax.device_put({k: v[None] for k, v in b.items()}, batch_sharding(mesh))
        state, opt, m = accumulate_step(graphdef, state, opt, stacked, jnp.int32(step), key, flags=flags, tx=tx,
                                        mesh=mesh, fsdp=fsdp, dropout=False, gradient_cache_chunk=cache)
    return state, opt, m

def max_diff(a, b):
    return max(float(np.abs(np.asarray(x) - np.asarray(y)).max())
               for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)))

out = {}
max_param = max(float(np.abs(x).max()) for x in jax.tree_util.tree_leaves(state0))
one, _, m1 = run(None, False)
mesh = make_mesh()
for name, fsdp in (("dp", False), ("fsdp", True)):
    state, opt, m = run(mesh, fsdp)
    diffs = [float(np.abs(np.asarray(a) - np.asarray(b)).max()) for a, b in
             zip(jax.tree_util.tree_leaves(state), jax.tree_util.tree_leaves(one))]
    moved = [float(np.abs(np.asarray(b) - a).max()) for a, b in
             zip(jax.tree_util.tree_leaves(state0), jax.tree_util.tree_leaves(one))]
    specs = {jax.tree_util.keystr(k): [str(x.sharding.spec), list(x.shape),
                                       list(x.addressable_shards[0].data.shape)]
             for k, x in jax.tree_util.tree_leaves_with_path(state)}
    opt_specs = sorted({str(x.sharding.spec) for x in jax.tree_util.tree_leaves(opt) if x.ndim})
    out[name] = {"max_diff": max(diffs), "max_moved": max(moved), "loss": float(m["loss"]), "max_param": max_param,
                 "loss_one": float(m1["loss"]), "specs": specs, "opt_specs": opt_specs}
# The gradient cache (chunks of 1 query / passage row per device) with FSDP against the plain data-parallel step on
# the same mesh, both with cross-device negatives (every device's representations in each device's loss).
cross = LossConfig(unified_finetuning=True, use_self_distill=True, negatives_cross_device=True)
plain, _, mp = run(mesh, False, None, cross)
cached, _, mc = run(mesh, True, 1, cross)
out["cache-cross"] = {"max_diff": max_diff(cached, plain), "max_moved": max_diff(plain, state0),
                      "loss": float(mc["loss"]), "loss_one": float(mp["loss"]), "max_param": max_param}
print(json.dumps(out))
"""


def test_fsdp_spec_picks_largest_divisible_dimension():
    assert tuple(fsdp_spec((24, 1024, 4096), 4)) == (None, None, "data")
    assert tuple(fsdp_spec((1000, 32), 4)) == ("data", None)
    assert tuple(fsdp_spec((250002, 32), 4)) == (None, "data")  # 250,002 is not divisible by 4
    assert tuple(fsdp_spec((3,), 4)) == () and tuple(fsdp_spec((1024,), 1)) == ()


def test_dp_and_fsdp_equal_one_device(tmp_path):
    """DP and FSDP over 4 devices equal one device; the gradient cache (with FSDP and cross-device negatives) equals
    the plain data-parallel step on the same mesh ("loss_one" then being the plain step's)."""
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    r = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.splitlines()[-1])
    for name in ("dp", "fsdp", "cache-cross"):
        res = out[name]
        print(f"\n{name}: max |param diff| to one device {res['max_diff']:.2e} after two steps that moved parameters "
              f"by up to {res['max_moved']:.2e}; loss {res['loss']:.6f} vs {res['loss_one']:.6f}")
        # float32: the gradient blocks are summed in another order, so an update may round to the neighbouring
        # float32 of a parameter: a relative bound on the updates plus two ulps of the largest parameter.
        ulp = float(np.finfo(np.float32).eps) * res["max_param"]
        assert res["max_diff"] <= 1e-5 * res["max_moved"] + 2 * ulp, res["max_diff"]
        assert abs(res["loss"] - res["loss_one"]) <= 1e-6 * abs(res["loss_one"])
    specs = out["fsdp"]["specs"]
    emb = next(v for k, v in specs.items() if "word_embeddings" in k)
    assert "'data'" in emb[0] and emb[1:] == [[1000, 32], [250, 32]], emb  # a quarter of [1000, 32] per device
    sharded = [v for v in specs.values() if "data" in v[0]]
    assert len(sharded) >= len(specs) // 2, specs  # every leaf with a dimension divisible by 4
    assert any("data" in s for s in out["fsdp"]["opt_specs"])  # the AdamW moments too
    assert all("data" not in v[0] for v in out["dp"]["specs"].values())  # DP replicates
