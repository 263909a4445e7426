"""m3jax embed over jax.distributed: 2 processes x 2 CPU devices, a local coordinator; each process writes the
shards k % 2 == its id, process 0 the manifest. Each process on its own devices (mesh "host"): the output equals a
single 2-device process's, row for row; one mesh over all 4 devices in lockstep (mesh "global"): the same rows, the
values to float32 rounding."""

import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from m3jax.embed import EmbeddingReader
from tests.helpers import SENTENCES, mixed

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = """
import sys
from m3jax.embed import embed
src, model, out, coord, nproc, pid, mesh = sys.argv[1:8]
m = embed(src, model, out, max_length=32, batch_size=4, length_buckets=(16, 32, 8192), shard_size=6, window=4,
          colbert_dtype="float32", coordinator=coord or None, num_processes=int(nproc) if coord else None,
          process_id=int(pid) if coord else None, mesh=mesh)
print("ROWS", m["rows"], "SKIPPED", m["run"]["skipped_shards"], "TEXTS", m["run"]["texts"])
print("SHAPES", sorted(m["run"]["shapes"]), "MESH", m["settings"].get("mesh", "host"))
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_equal_one(tmp_path):
    from m3jax.testing import random_m3jax_dir

    model = random_m3jax_dir("tiny")
    texts = SENTENCES + mixed(19, seed=9, max_words=8)  # 33 rows: 6 shards, the last one partial
    src = tmp_path / "c.txt"
    src.write_text("".join(t + "\n" for t in texts))
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2", "JAX_PLATFORMS": "cpu",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    coords = [f"127.0.0.1:{_free_port()}" for _ in range(2)]
    runs = [(tmp_path / mesh, c, "2", str(p), mesh) for mesh, c in zip(("host", "global"), coords, strict=True)
            for p in range(2)] + [(tmp_path / "single", "", "1", "0", "host")]
    procs = [subprocess.Popen([sys.executable, "-c", SCRIPT, str(src), str(model), str(out), *args], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for out, *args in runs]
    outs = [p.communicate(timeout=600) for p in procs]  # the five run at once
    for p, (_, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err[-3000:]
    # Each process embedded only its own shards: 0, 2, 4 (18 rows) and 1, 3, 5 (15 rows).
    for a, b in ((0, 1), (2, 3)):
        assert "ROWS 33" in outs[a][0] and "TEXTS 18" in outs[a][0] and "TEXTS 15" in outs[b][0]
    assert "TEXTS 33" in outs[4][0]
    shapes = [re.search(r"SHAPES (.*) MESH (\w+)", o).groups() for o, _ in outs]
    assert [m for _, m in shapes] == ["host", "host", "global", "global", "host"]
    # In lockstep both processes ran the same steps; on their own, each its own (the planner's shapes differ).
    assert shapes[2][0] == shapes[3][0] and shapes[0][0] != shapes[1][0]

    a, g, b = (EmbeddingReader(tmp_path / name) for name in ("host", "global", "single"))
    assert a.manifest["runtime"]["processes"] == 2 and len(a) == len(b) == len(g) == len(texts)
    assert a.manifest["runtime"]["local_devices"] == g.manifest["runtime"]["local_devices"] == 2
    assert a.manifest["shards"] == b.manifest["shards"] == g.manifest["shards"]
    for s in b.manifest["shards"]:
        ta, tb = pq.read_table(tmp_path / "host" / s["file"]), pq.read_table(tmp_path / "single" / s["file"])
        assert ta.equals(tb), s["file"]  # row for row, every value
    assert a.ids().tolist() == g.ids().tolist() == [str(i) for i in range(len(texts))]
    np.testing.assert_array_equal(g.lengths(), b.lengths())
    np.testing.assert_allclose(g.dense(), b.dense(), rtol=0, atol=1e-5)
    (gi, gw), (bi, bw) = g.sparse_padded(), b.sparse_padded()
    np.testing.assert_array_equal(gi, bi)
    np.testing.assert_allclose(gw, bw, rtol=0, atol=1e-5)
    (gv, go), (bv, bo) = g.colbert(), b.colbert()
    np.testing.assert_array_equal(go, bo)
    np.testing.assert_allclose(gv, bv, rtol=0, atol=1e-5)


def test_cloud_tpu_vm_joins_its_pod_slice_without_flags(monkeypatch):
    """On a Cloud TPU VM with no flags, jax.distributed.initialize() is called with no arguments (JAX reads the slice
    from the TPU metadata); flags win; a failure says what to pass instead; elsewhere nothing is initialised."""
    import jax
    import pytest

    from m3jax import distributed

    calls = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda *a, **k: calls.append((a, k)))
    for var in distributed.ENV.values():
        monkeypatch.delenv(var, raising=False)
    assert distributed.initialize() == (0, 1) and calls == []  # this machine: no TPU VM
    monkeypatch.setattr(distributed, "_on_cloud_tpu_vm", lambda: True)
    distributed.initialize()
    assert calls == [((), {})]
    distributed.initialize("10.0.0.2:1234", 4, 3)
    assert calls[-1] == ((), {"coordinator_address": "10.0.0.2:1234", "num_processes": 4, "process_id": 3})

    def fail(*a, **k):
        raise RuntimeError("Getting metadata['agent-worker-number'] failed for 6 tries")

    monkeypatch.setattr(jax.distributed, "initialize", fail)
    with pytest.raises(ValueError, match="agent-worker-number.*pass --coordinator HOST:PORT --num-processes"):
        distributed.initialize()

    def too_late(*a, **k):  # JAX's own error when something already computed: a warning, one process
        raise RuntimeError("jax.distributed.initialize() must be called before any JAX computations are executed.")

    monkeypatch.setattr(jax.distributed, "initialize", too_late)
    assert distributed.initialize() == (0, 1)


def test_tpu_vm_detection_reads_pci_vendors(monkeypatch, tmp_path):
    """A host is a Cloud TPU VM when libtpu is installed and a PCI device has Google's vendor id."""
    import importlib.util

    from m3jax import distributed

    def vendors(*ids):
        root = tmp_path / "_".join(ids)
        for i, v in enumerate(ids):
            (root / f"0000:00:0{i}.0").mkdir(parents=True)
            (root / f"0000:00:0{i}.0" / "vendor").write_text(v + "\n")
        return root

    real_path = distributed.Path
    for ids, libtpu, want in [(("0x8086", "0x1ae0"), True, True), (("0x8086", "0x1af4"), True, False),
                              (("0x1ae0",), False, False)]:
        root = vendors(*ids)
        monkeypatch.setattr(distributed, "Path", lambda p, root=root: root if p == "/sys/bus/pci/devices"
                            else real_path(p))
        monkeypatch.setattr(importlib.util, "find_spec", lambda name, libtpu=libtpu: object() if libtpu else None)
        assert distributed._on_cloud_tpu_vm() is want, (ids, libtpu)
