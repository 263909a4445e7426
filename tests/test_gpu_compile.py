"""The deviceless GPU compile tier: m3jax's accelerator paths compiled for NVIDIA H100s with jaxlib's CUDA plugin
and XLA's target description of the card (m3jax/targets/h100_sxm.txtpb); no GPU, no driver. cuDNN's fused
attention included. Numbers are not run (no GPU); shapes, sharding, kernels and memory are."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from m3jax import accelerators
from m3jax.attention import attention, choose_impl
from m3jax.config import M3Config
from m3jax.engine import Encoder
from m3jax.preflight import embed_checks

pytest.importorskip("jax_plugins.xla_cuda12", reason="the GPU compile tier needs jaxlib's CUDA plugin: pip install "
                                                     "-e '.[test]' brings it")


def test_cudnn_attention_compiles_per_gpu_rows():
    """bf16 "auto" under an 8-GPU mesh is cuDNN's fused attention, run on each GPU's rows."""
    mesh = jax.sharding.Mesh(np.array(accelerators.compile_only_devices("h100:8")), ("data",))
    rows = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    spec = lambda *s, dt=jnp.bfloat16: jax.ShapeDtypeStruct(s, dt, sharding=rows)  # noqa: E731
    with jax.set_mesh(mesh):
        assert choose_impl(640, jnp.bfloat16) == "cudnn" and choose_impl(640, jnp.float32) == "chunked"
        compiled = jax.jit(lambda q, k, v, m: attention(q, k, v, m)).lower(
            spec(16, 640, 16, 64), spec(16, 640, 16, 64), spec(16, 640, 16, 64), spec(16, 640, dt=jnp.bool_)).compile()
    hlo = compiled.as_text()
    assert "__cudnn$fmha" in hlo
    assert "all-gather" not in hlo
    assert "bf16[2,640,16,64]" in hlo  # each GPU's 2 of the 16 rows


@pytest.mark.parametrize("lengths,mcls", [((16, 640, 8192), None), ((1024,), 256)], ids=["lengths", "mcls"])
def test_encode_step_compiles_and_fits_on_h100(lengths, mcls):
    """The full-size bf16 encode step, all three outputs, as `m3jax embed` compiles it for one H100."""
    checks = embed_checks("h100", lengths=lengths, max_length=1000 if mcls else 8192, mcls_interval=mcls,
                          batch_size=4096, max_tokens_per_batch=16384)
    assert [c.length for c in checks] == list(lengths)
    for c in checks:
        assert c.ok, c.problem()
        assert c.rows_per_device == max(1, 16384 // c.length)


def test_rows_per_bucket_from_the_compiler_on_h100(monkeypatch, tmp_path):
    """The rows that fit an H100 at 8,192 tokens (80 GB: memory binds well below the row cap): the largest whose
    executable fits with the headroom, within 5%."""
    monkeypatch.setenv("M3JAX_HOME", str(tmp_path))
    devices = accelerators.compile_only_devices("h100")
    enc = Encoder(M3Config.bge_m3(), None, None, dtype="bfloat16", devices=devices)
    rows = enc.rows_that_fit(8192)
    usable = accelerators.usable_memory(devices[0])
    need = lambda r: accelerators.MemoryUse.of(enc.executable(8192, r)).in_flight  # noqa: E731
    assert 8 <= rows < 4096
    assert need(rows) <= usable < need(rows + max(2, rows // 20))


def test_train_step_compiles_on_8_h100s():
    """fit()'s step, full size, bf16 over float32 masters, FSDP and remat, over 8 GPUs of one host."""
    from m3jax.train import DataConfig, TrainConfig
    from m3jax.train.preflight import train_checks

    config = TrainConfig(data=DataConfig(train_group_size=8, query_max_len=32, passage_max_len=512),
                         per_device_batch_size=8, bf16=True, remat=True, fsdp=True)
    (check,) = train_checks("h100:8", config)
    assert check.ok, check.problem()
    assert check.memory.arguments < 1.5 * 2**30  # masters and Adam moments split eight ways
