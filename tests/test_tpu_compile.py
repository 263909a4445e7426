"""The deviceless TPU compile tier: every accelerator path of m3jax compiled for real TPU topologies with libtpu's
compile-only devices (no TPU here), with the compiler's per-chip memory. Numbers are tested elsewhere (splash in
interpret mode in test_attention); this tier proves the shapes, sharding, kernels and memory a TPU run would meet.
libtpu comes with the test extra (`jax[tpu]`, pinned to the jax version)."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from m3jax import accelerators, pipeline
from m3jax.attention import attention, choose_impl, splash_block
from m3jax.config import M3Config
from m3jax.engine import Encoder
from m3jax.preflight import embed_checks

pytest.importorskip("libtpu", reason="the TPU compile tier needs libtpu: pip install -e '.[test]' brings it")


def one_chip_mesh():
    return jax.sharding.Mesh(np.array(accelerators.compile_only_devices("v5e:2x2")[:1]), ("data",))


def test_every_tpu_bucket_compiles_its_attention_kernel():
    """Each of LENGTH_BUCKETS: "auto" under a TPU mesh picks splash where the length allows it (a multiple of 128,
    block = the largest of 512/256/128 dividing it) and the Mosaic kernel compiles; shorter buckets take XLA's."""
    mesh = one_chip_mesh()
    spec = lambda *s, dt=jnp.bfloat16: jax.ShapeDtypeStruct(s, dt)  # noqa: E731
    blocks = {}
    for t in pipeline.LENGTH_BUCKETS:
        with jax.set_mesh(mesh):
            impl = choose_impl(t, jnp.bfloat16)
            lowered = jax.jit(lambda q, k, v, m: attention(q, k, v, m)).lower(
                spec(2, t, 16, 64), spec(2, t, 16, 64), spec(2, t, 16, 64), spec(2, t, dt=jnp.bool_))
        hlo = lowered.as_text()
        if t % 128 == 0:
            assert impl == "splash", t
            assert "tpu_custom_call" in hlo, t  # the Mosaic kernel, not a fallback
            blocks[t] = splash_block(t)
        else:
            assert impl == ("chunked" if t > 512 else "xla"), (t, impl)
            assert "tpu_custom_call" not in hlo, t
        lowered.compile()
    assert blocks[640] == 128 and blocks[2304] == 256 and blocks[7936] == 256 and blocks[8192] == 512
    assert len(blocks) == sum(t % 128 == 0 for t in pipeline.LENGTH_BUCKETS)


@pytest.mark.parametrize("lengths,mcls", [((16, 640), None), ((8192,), None), ((1024,), 256)],
                         ids=["smallest-non-multiple", "8192", "mcls"])
def test_encode_step_compiles_and_fits(lengths, mcls):
    """The full-size bf16 encode step, all three outputs, data-parallel over a v5e host's 4 chips, as `m3jax embed`
    compiles it (the Encoder's planner, sharding and kernels), at the smallest bucket, a length that is not a
    multiple of 512 (640 failed before: splash took min(512, T) as its block), 8,192, and MCLS; 512 is compiled by
    the pod test below."""
    checks = embed_checks("v5e:2x2", lengths=lengths, max_length=1000 if mcls else 8192, mcls_interval=mcls,
                          batch_size=4096,
                          max_tokens_per_batch=4 * 16384)
    assert [c.length for c in checks] == list(lengths)
    for c in checks:
        assert c.ok, c.problem()
        assert c.rows_per_device == -(-(4 * 16384 // c.length) // 4)  # the budget's rows, rounded up to 4 chips
        assert 1 << 30 < c.needed < 16 << 30  # the bf16 parameters (1.06 GiB) are on every chip


@pytest.mark.parametrize("target", ["v2:2x2", "v5e:1x1"])
def test_colab_tpus_compile_the_encode_step(target):
    """Colab's TPU runtimes: a v2-8 (8 cores, each a device with 8 GiB; Mosaic rejects splash's bf16 matmuls on v2
    and v3, so attention is XLA's there) and a single v5e chip."""
    (check,) = embed_checks(target, lengths=[640], max_tokens_per_batch=16384 * 8)
    assert check.ok, check.problem()


def test_data_parallel_embed_partitions_on_a_pod():
    """256 chips (v5e:16x16, 64 hosts), one data-parallel mesh (what `m3jax embed` runs there by default: the
    lockstep global mesh), 128 rows of 512 per host, 32 per chip: the splash kernel runs per chip's rows
    (shard_map); unpartitioned, XLA gathered all 8,192 rows onto every chip (23 GiB of temporaries)."""
    pod = accelerators.compile_only_devices("v5e:16x16")
    assert len(pod) == 256 and len(accelerators.host_devices(pod)) == 4
    (check,) = embed_checks("v5e:16x16", lengths=[512], batch_size=128, max_tokens_per_batch=128 * 512)
    assert check.ok, check.problem()
    assert check.name == "embed [128 x 512] x 64 hosts" and check.rows_per_device == 32
    assert check.memory.temps < 1 << 30


def test_rows_per_bucket_come_from_the_compiler(monkeypatch, tmp_path):
    """On an accelerator the rows of a bucket are the most whose executable fits a chip with the headroom to
    spare (here a tiny model on a chip given 64 MiB, so that memory binds); the table is cached per model, chip and
    dtype, and a new Encoder reads it without compiling. A batch size below what fits costs no measuring."""
    monkeypatch.setenv("M3JAX_HOME", str(tmp_path))
    monkeypatch.setitem(accelerators.HBM_GIB, "TPU v5 lite", 1 / 16)
    devices = accelerators.compile_only_devices("v5e:2x2")
    cfg = M3Config.tiny()
    enc = Encoder(cfg, None, None, dtype="bfloat16", devices=devices)
    assert enc.max_tokens_per_batch is None
    rows = enc.rows_that_fit(512)
    usable = accelerators.usable_memory(devices[0])
    fits = lambda r: accelerators.MemoryUse.of(enc.executable(512, r)).in_flight <= usable  # noqa: E731
    assert rows % 4 == 0 and 4 <= rows < 4 * 4096
    assert fits(rows)
    assert not fits(rows + 4 * max(2, rows // 40))  # at most 5% (or 2 rows per chip) short of the largest
    plan = enc.plan(np.array([500] * 10_000), batch_size=100_000)
    assert plan[0][1] == rows
    (table,) = (tmp_path / "batch_rows").glob("*.json")
    saved = json.loads(table.read_text())
    assert saved["device_kind"] == "TPU v5 lite" and saved["rows_per_device"] == {"512": rows // 4}
    again = Encoder(cfg, None, None, dtype="bfloat16", devices=devices)
    assert again.rows_that_fit(512) == rows and not again.compile_seconds
    # A batch size that fits is taken as it is: one compile, the batch's own, and nothing measured or cached.
    assert again.rows_that_fit(256, at_most=6) == 8 and list(again.compile_seconds) == [(256, 8, pipeline.HEADS)]
    assert json.loads(table.read_text())["rows_per_device"] == {"512": rows // 4}


def test_train_step_compiles_on_v5e_2x2_and_fits_with_fsdp():
    """fit()'s step for full-size bge-m3 on 4 v5e chips (16 GiB each): 8 queries x 8 passages of 512 tokens per
    chip, bf16 compute over float32 masters, remat, FSDP: the float32 masters and Adam moments, which data
    parallelism would hold on every chip (17.40 GiB/chip: it does not fit, benchmarks/RESULTS.md; that compile left
    the suite for time), split four ways, and the step fits."""
    from m3jax.train import DataConfig, TrainConfig
    from m3jax.train.preflight import train_checks

    config = TrainConfig(data=DataConfig(train_group_size=8, query_max_len=32, passage_max_len=512),
                         per_device_batch_size=8, bf16=True, remat=True, fsdp=True)
    (check,) = train_checks("v5e:2x2", config)
    assert check.memory is not None, check.problem()
    assert check.ok, check.problem()
    assert check.memory.arguments < 2.5 * 2**30


@pytest.mark.parametrize("dropout, cache", [(False, None), (True, 2)], ids=["no dropout", "dropout, gradient cache"])
def test_train_step_compiles_at_long_lengths_on_a_mesh(dropout, cache):
    """Past 512 tokens on a 4-chip mesh the step's per-device loss (inside shard_map) runs the blocked attention,
    whose scan carries must vary over the data axis as its outputs do, and not splash, whose Pallas call does not
    type-check there (tiny model, 1,024-token passages; without dropout, and with it through the gradient cache)."""
    from m3jax.train import DataConfig, TrainConfig
    from m3jax.train.preflight import train_checks

    config = TrainConfig(data=DataConfig(train_group_size=2, query_max_len=32, passage_max_len=1024),
                         per_device_batch_size=2, bf16=True, remat=True, dropout=dropout, gradient_cache_chunk=cache)
    (check,) = train_checks("v5e:2x2", config, model="tiny")
    assert check.ok, check.problem()


def test_preflight_cli_passes_and_names_what_fails(capsys):
    """`m3jax preflight` prints one row per shape and exits 0 when all compile and fit; otherwise 1, naming each
    failing shape. v5e slices of 32 chips and more refuse an executable over one host's chips ("device assignment
    should include all slice devices"), which is how `m3jax embed --mesh host` runs each host: preflight says so;
    the default there (mesh auto: global, in lockstep) compiles."""
    from m3jax.cli import main

    assert main(["preflight", "--target", "v5e:2x2", "--job", "embed", "--model", "tiny", "--lengths", "128,640",
                 "--max-tokens-per-batch", "16384"]) == 0
    out = capsys.readouterr().out
    assert "embed [128 x 128]" in out and "embed [28 x 640]" in out and "2 shape(s)" in out and "0 problem(s)" in out
    assert main(["preflight", "--target", "v5e:4x8", "--job", "embed", "--model", "tiny", "--lengths", "128",
                 "--max-tokens-per-batch", "16384", "--mesh", "host"]) == 1
    captured = capsys.readouterr()
    assert "COMPILE FAILED" in captured.out
    assert "embed [128 x 128]: did not compile" in captured.err and "all slice devices" in captured.err
    assert main(["preflight", "--target", "v5e:4x8", "--job", "embed", "--model", "tiny", "--lengths", "128",
                 "--max-tokens-per-batch", "16384"]) == 0
    assert "embed [128 x 128] x 8 hosts" in capsys.readouterr().out
    assert main(["preflight", "--target", "v9:2x2", "--job", "embed"]) == 2
    assert "expected a TPU topology" in capsys.readouterr().err
