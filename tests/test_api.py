"""BGEM3 against FlagEmbedding's BGEM3FlagModel: encode, compute_score, helpers, formats, bad input."""

import collections

import jax
import numpy as np
import pytest

from m3jax import pipeline
from m3jax.api import BGEM3, BGEM3FlagModel
from tests.helpers import SENTENCES, long_text, mixed

TOL = 1e-5
EDGE = ["", "   ", "\n", "😀", "🤖🚀✨ emoji only?", "a" * 3000]
TEXTS = SENTENCES + EDGE + [long_text(700, seed=1)] + mixed(12, seed=2)


@pytest.fixture(scope="module")
def tiny(release_dirs):
    return release_dirs["tiny"]


@pytest.fixture(scope="module")
def ours(tiny):
    return BGEM3(tiny, use_fp16=False)


@pytest.fixture(scope="module")
def flag(tiny, flag_model_factory):
    return flag_model_factory(tiny)


def assert_lexical_equal(a: dict, b: dict):
    """Same ids in the same order, values within TOL; an id may be absent on one side only if its weight there
    is within TOL of the ReLU's zero (a sign flip at float rounding)."""
    assert isinstance(a, collections.defaultdict) and isinstance(b, collections.defaultdict)
    for k, v in a.items():
        assert isinstance(k, str) and isinstance(v, np.float32), (type(k), type(v))
    only = set(a) ^ set(b)
    assert all(float(a.get(k, 0) + b.get(k, 0)) <= TOL for k in only), only
    assert [k for k in a if k in b] == [k for k in b if k in a], "ids out of order"
    for k in set(a) & set(b):
        assert abs(float(a[k]) - float(b[k])) <= TOL, (k, a[k], b[k])


def assert_encode_equal(o, r):
    assert o.keys() == r.keys()
    if r["dense_vecs"] is not None:
        assert o["dense_vecs"].dtype == np.float32 and o["dense_vecs"].shape == r["dense_vecs"].shape
        assert np.abs(o["dense_vecs"] - r["dense_vecs"]).max() <= TOL
    else:
        assert o["dense_vecs"] is None
    if r["lexical_weights"] is not None:
        assert len(o["lexical_weights"]) == len(r["lexical_weights"])
        for a, b in zip(o["lexical_weights"], r["lexical_weights"], strict=True):
            assert_lexical_equal(a, b)
    else:
        assert o["lexical_weights"] is None
    if r["colbert_vecs"] is not None:
        assert len(o["colbert_vecs"]) == len(r["colbert_vecs"])
        for a, b in zip(o["colbert_vecs"], r["colbert_vecs"], strict=True):
            assert a.shape == b.shape and a.dtype == np.float32
            assert np.abs(a - b).max() <= TOL
    else:
        assert o["colbert_vecs"] is None


@pytest.mark.parametrize("batch_size,max_length", [(256, 512), (3, 512), (1, 40), (5, 8192)])
def test_encode_matches_flagembedding(ours, flag, batch_size, max_length):
    kw = dict(batch_size=batch_size, max_length=max_length, return_dense=True, return_sparse=True,
              return_colbert_vecs=True)
    assert_encode_equal(ours.encode(TEXTS, **kw), flag.encode(TEXTS, **kw))


def test_default_heads_and_single_string(ours, flag):
    assert_encode_equal(ours.encode(TEXTS[:5]), flag.encode(TEXTS[:5]))  # dense only by default
    kw = dict(return_sparse=True, return_colbert_vecs=True)
    o, r = ours.encode("What is BGE M3?", **kw), flag.encode("What is BGE M3?", **kw)
    assert o["dense_vecs"].shape == r["dense_vecs"].shape == (ours.config.hidden_size,)
    assert np.abs(o["dense_vecs"] - r["dense_vecs"]).max() <= TOL
    assert_lexical_equal(o["lexical_weights"], r["lexical_weights"])
    assert o["colbert_vecs"].shape == r["colbert_vecs"].shape


def test_encode_queries_and_corpus_with_instructions(tiny, flag_model_factory):
    import FlagEmbedding

    kw = dict(query_instruction_for_retrieval="Represent: ", query_instruction_format="{}\\n{}",
              passage_instruction_for_retrieval="Passage: ", query_max_length=16, passage_max_length=24)
    o = BGEM3(tiny, use_fp16=False, **kw)
    r = FlagEmbedding.BGEM3FlagModel(str(tiny), use_fp16=False, devices="cpu", **kw)
    heads = dict(return_sparse=True, return_colbert_vecs=True)
    assert_encode_equal(o.encode_queries(TEXTS, **heads), r.encode_queries(TEXTS, **heads))
    assert_encode_equal(o.encode_corpus(TEXTS, **heads), r.encode_corpus(TEXTS, **heads))


PAIRS = [(SENTENCES[i], TEXTS[j]) for i, j in [(0, 2), (0, 3), (1, 2), (1, 3), (4, 20), (5, 6), (7, 14), (2, 15),
                                                (12, 19), (13, 16), (3, 17)]]


@pytest.mark.parametrize("batch_size,weights,qlen,plen", [(256, None, 512, 512), (4, [0.4, 0.2, 0.4], 8, 128),
                                                         (1, [1.0, 0.3, 1.0], 512, 16)])
def test_compute_score_matches_flagembedding(ours, flag, batch_size, weights, qlen, plen):
    kw = dict(batch_size=batch_size, max_query_length=qlen, max_passage_length=plen,
              weights_for_different_modes=weights)
    o, r = ours.compute_score(PAIRS, **kw), flag.compute_score(PAIRS, **kw)
    assert list(o) == list(r)
    for k in r:
        assert isinstance(o[k], list) and all(isinstance(x, float) for x in o[k])
        assert np.abs(np.array(o[k]) - np.array(r[k])).max() <= TOL, k
    one_o, one_r = ours.compute_score(PAIRS[0], **kw), flag.compute_score(PAIRS[0], **kw)
    assert all(isinstance(one_o[k], float) and abs(one_o[k] - one_r[k]) <= TOL for k in one_r)


def test_compute_score_zero_floor_matches_flagembedding(release_dirs, flag_model_factory):
    """FlagEmbedding floors ColBERT token maxima at 0 only for passages its batch padded; m3jax follows."""
    from m3jax import scoring

    path = release_dirs["tiny_spread_colbert"]
    o, r = BGEM3(path, use_fp16=False), flag_model_factory(path)
    pairs = [(q, p) for q in SENTENCES[:6] for p in ["", "a", SENTENCES[9], long_text(40, seed=2)]]
    q = o.encode_padded([a for a, _ in pairs])
    p = o.encode_padded([b for _, b in pairs])
    plain = np.asarray(scoring.colbert_paired(q.colbert, q.colbert_mask, p.colbert, p.colbert_mask))
    floored = np.asarray(scoring.colbert_paired(q.colbert, q.colbert_mask, p.colbert, p.colbert_mask,
                                                zero_floor=True))
    assert (floored - plain > 1e-3).sum() >= 3, "the checkpoint must make the floor matter"
    for bs in (256, 4, 3, 2, 1):
        got, want = o.compute_score(pairs, batch_size=bs), r.compute_score(pairs, batch_size=bs)
        assert np.abs(np.array(got["colbert"]) - np.array(want["colbert"])).max() <= TOL, bs
        assert np.abs(np.array(got["colbert+sparse+dense"]) - np.array(want["colbert+sparse+dense"])).max() <= TOL


def test_helpers_match_flagembedding(ours, flag):
    kw = dict(return_sparse=True, return_colbert_vecs=True)
    q, p = ours.encode(TEXTS[:6], **kw), ours.encode(TEXTS[6:], **kw)
    lq, lp = q["lexical_weights"], p["lexical_weights"]
    got, want = ours.compute_lexical_matching_score(lq, lp), flag.compute_lexical_matching_score(lq, lp)
    assert got.shape == want.shape == (len(lq), len(lp))
    assert np.abs(got - want).max() <= TOL
    assert abs(float(ours.compute_lexical_matching_score(lq[2], lp[0]))
               - float(flag.compute_lexical_matching_score(lq[2], lp[0]))) <= TOL
    with pytest.raises(ValueError):
        ours.compute_lexical_matching_score(lq, lp[0])
    for a in q["colbert_vecs"]:
        for b in p["colbert_vecs"]:
            assert abs(float(ours.colbert_score(a, b)) - float(flag.colbert_score(a, b))) <= TOL
    assert ours.convert_id_to_token(lq) == flag.convert_id_to_token(lq)
    assert ours.convert_id_to_token(lq[0]) == flag.convert_id_to_token(lq[0])


def test_outputs_invariant_to_batch_and_bucket(ours):
    target = [SENTENCES[2], SENTENCES[6]]
    alone = ours.encode_padded(target, max_length=8192)
    crowded = ours.encode_padded([long_text(1200, seed=4), *mixed(9, seed=3), *target], max_length=8192,
                                 batch_size=4)
    one_by_one = ours.encode_padded(target, max_length=8192, batch_size=1)
    for other, rows in ((crowded, slice(10, 12)), (one_by_one, slice(0, 2))):
        assert np.abs(other.dense[rows] - alone.dense).max() <= 1e-6
        a, b = alone.colbert_list(), [other.colbert_list()[i] for i in range(*rows.indices(len(other)))]
        assert all(np.abs(x - y).max() <= 1e-6 for x, y in zip(a, b, strict=True))
        la, lb = alone.lexical_dicts(), other.lexical_dicts()[rows]
        for x, y in zip(la, lb, strict=True):
            assert x.keys() == y.keys() and max(abs(x[k] - y[k]) for k in x) <= 1e-6


def test_vector_store_formats(ours):
    res = ours.encode_padded(TEXTS, max_length=512)
    dicts, vecs = res.lexical_dicts(), res.colbert_list()
    csr = res.sparse_csr()
    assert csr.shape == (len(TEXTS), 250002) and csr.has_sorted_indices
    for i, d in enumerate(dicts):
        row = csr.getrow(i)
        assert dict(zip(map(str, row.indices), row.data, strict=True)) == dict(d)
        idx, val = res.sparse_rows()[i]
        assert dict(zip(map(str, idx), val, strict=True)) == dict(d)
    flat, offsets = res.colbert_flat()
    assert offsets[0] == 0 and offsets[-1] == len(flat) == sum(len(v) for v in vecs)
    for i, v in enumerate(vecs):
        np.testing.assert_array_equal(flat[offsets[i]:offsets[i + 1]], v)
    assert res.dense_as("float16").dtype == np.float16
    np.testing.assert_allclose(res.dense_as("float16"), res.dense, atol=1e-3)
    assert np.flatnonzero(res.truncated).tolist() == [19, 20] and res.lengths.max() == 512  # "a" * 3000, long
    with pytest.raises(ValueError, match="float32' or 'float16"):
        res.dense_as("int8")


def test_compiled_shapes_stay_bounded(ours):
    rng = np.random.default_rng(0)
    lengths = rng.integers(5, 8193, size=1000)
    stats = pipeline.count_shapes(lengths, batch_size=256)
    print(f"\n1,000 texts of 5-8,192 tokens: {stats}")
    # Deterministic (the plan is pure integer arithmetic on a seeded draw): exact values, not bounds.
    assert (stats["batches"], stats["shapes"], stats["max_shapes_bound"]) == (334, 70, 437)
    assert (stats["padded_tokens"], stats["real_tokens"]) == (4_348_676, 4_229_224)  # padding 2.8%
    # CPU's buckets (every 128 tokens past 2,048): more shapes, less padding.
    cpu = pipeline.count_shapes(lengths, batch_size=256, buckets=pipeline.default_length_buckets("cpu"))
    assert (cpu["batches"], cpu["shapes"], cpu["max_shapes_bound"], cpu["padded_tokens"]) == (339, 112, 512, 4_299_780)
    assert ours.engine.length_buckets == pipeline.CPU_LENGTH_BUCKETS  # the CPU encoder's default
    assert pipeline.default_length_buckets("gpu") == pipeline.LENGTH_BUCKETS
    # TPU: from 128 tokens on, multiples of 128 (splash's lengths), the shorter ones as everywhere; 48 lengths.
    tpu = pipeline.default_length_buckets("tpu")
    assert tpu == pipeline.TPU_LENGTH_BUCKETS and len(tpu) == 48 and tpu[-1] == 8192
    assert all(b % 128 == 0 for b in tpu if b >= 128)
    assert [b for b in tpu if b < 128] == [b for b in pipeline.LENGTH_BUCKETS if b < 128]
    assert pipeline.default_row_buckets("cpu") == pipeline.ROW_BUCKETS
    assert pipeline.default_row_buckets("tpu") == pipeline.default_row_buckets("gpu") == tuple(2**i for i in range(16))
    assert set(pipeline.LENGTH_BUCKETS) < set(pipeline.CPU_LENGTH_BUCKETS)
    assert pipeline.length_bucket(7943, pipeline.CPU_LENGTH_BUCKETS) == 8064
    # And what the compiled cache really holds for a varied workload: at most the planned shapes.
    before = set(ours.compile_seconds)
    texts = mixed(40, seed=11, max_words=300)
    ours.encode_padded(texts, max_length=8192, batch_size=8, heads=("dense",))
    batches, _, _ = ours.batches(texts, batch_size=8, max_length=8192)
    new = set(ours.compile_seconds) - before
    assert new == {(*b.input_ids.shape[::-1], ("dense",)) for b in batches}  # one executable per shape, no more
    ours.encode_padded(texts[::-1], max_length=8192, batch_size=8, heads=("dense",))
    assert set(ours.compile_seconds) - before == new  # same workload, reordered: nothing new compiles


def test_bad_input(ours, capsys):
    empty = ours.encode([], return_sparse=True, return_colbert_vecs=True)
    assert empty["dense_vecs"].shape == (0, ours.config.hidden_size) and empty["dense_vecs"].dtype == np.float32
    assert empty["lexical_weights"] == [] and empty["colbert_vecs"] == []
    assert ours.compute_score([]) == {k: [] for k in ("colbert", "sparse", "dense", "sparse+dense",
                                                      "colbert+sparse+dense")}
    with pytest.raises(TypeError, match=r"sentences\[2\] is int"):
        ours.encode(["a", "b", 3])
    with pytest.raises(TypeError, match=r"sentence_pairs\[1\]"):
        ours.compute_score([("a", "b"), ("a", None)])
    for bad in (0, 8193, -5, 2.5):
        with pytest.raises(ValueError, match=r"max_length must be an int in 1 \.\.\. 8192"):
            ours.encode(["a"], max_length=bad)
    with pytest.raises(TypeError, match="unexpected keyword"):
        ours.encode(["a"], padding="max_length")
    with pytest.raises(ValueError, match="nothing to compute"):
        ours.encode(["a"], return_dense=False)
    ours.encode(["short input"], return_sparse=True)
    out = capsys.readouterr()
    assert out.out == "" and out.err == ""  # short inputs: no bar, nothing on stdout


def test_progress_bar_only_for_long_inputs(ours, capsys):
    ours.encode(mixed(40, seed=5), batch_size=8)
    out = capsys.readouterr()
    assert out.out == "" and "Inference Embeddings" in out.err


def test_flag_alias_and_compilation_cache(tiny, tmp_path):
    assert BGEM3FlagModel is BGEM3
    jax.config.update("jax_compilation_cache_dir", None)
    try:
        m = BGEM3FlagModel(tiny, compilation_cache=str(tmp_path / "jc"), use_fp16=False)
        assert m.compilation_cache_dir == str(tmp_path / "jc") == jax.config.jax_compilation_cache_dir
        assert m.dtype == np.float32
    finally:
        jax.config.update("jax_compilation_cache_dir", None)


def test_constructing_a_model_leaves_jax_config_alone(tiny):
    """The persistent compilation cache is opt-in: BGEM3 and Encoder with their defaults, and an encode, change
    no jax.config value (the cache directory, its minimum compile time, anything else)."""
    from m3jax.engine import Encoder

    before = dict(jax.config.values)
    m = BGEM3(tiny, use_fp16=False)
    m.encode(["one text"], max_length=16)
    Encoder.from_pretrained(tiny)
    after = dict(jax.config.values)
    assert {k: (before.get(k), v) for k, v in after.items() if before.get(k) != v} == {}
    assert m.compilation_cache_dir == before["jax_compilation_cache_dir"]


def test_use_fp16_selects_bfloat16_where_the_cpu_has_it(monkeypatch):
    """use_fp16 (FlagEmbedding's default) computes in bfloat16 on an accelerator and on a CPU with bfloat16
    instructions, float32 on other CPUs; use_bf16 always bfloat16; neither, float32. The CPU's instructions are
    read from /proc/cpuinfo's flags (x86) or Features (ARM)."""
    from m3jax import api, engine

    zen3 = "processor\t: 0\nflags\t\t: fpu sse2 avx2 fma\n"
    sapphire_rapids = "flags\t\t: avx2 avx512f avx512_bf16 amx_bf16 amx_tile\n"
    neoverse = "Features\t: fp asimd sve bf16 i8mm\n"
    assert engine.cpu_bf16_flags(zen3) == set()
    assert engine.cpu_bf16_flags(sapphire_rapids) == {"avx512_bf16", "amx_bf16"}
    assert engine.cpu_bf16_flags(neoverse) == {"bf16"}
    assert engine.cpu_bf16_flags("model name\t: bf16 in a name is not a flag\n") == set()
    for has in (False, True):
        monkeypatch.setattr(api, "cpu_has_bf16", lambda has=has: has)
        assert api.default_dtype("cpu", use_fp16=True, use_bf16=False) == ("bfloat16" if has else "float32")
        assert api.default_dtype("cpu", use_fp16=False, use_bf16=False) == "float32"
        assert api.default_dtype("cpu", use_fp16=False, use_bf16=True) == "bfloat16"
        assert api.default_dtype("tpu", use_fp16=True, use_bf16=False) == "bfloat16"
        assert api.default_dtype("gpu", use_fp16=False, use_bf16=False) == "float32"


def test_compiler_options_reach_every_executable(release_dirs):
    """Encoder(compiler_options=...) compiles with them: an unknown option fails at compile time, naming it; a
    real one (a CPU dot library) gives the same outputs within float32 rounding."""
    from m3jax.engine import Encoder

    texts = ["compiler options", "reach every executable of the engine"]
    plain = Encoder.from_pretrained(release_dirs["tiny"]).encode(texts, max_length=32)
    ynn = Encoder.from_pretrained(release_dirs["tiny"], compiler_options={
        "xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_DOT"}).encode(texts, max_length=32)
    np.testing.assert_allclose(ynn.dense, plain.dense, atol=1e-5)
    bad = Encoder.from_pretrained(release_dirs["tiny"], compiler_options={"xla_no_such_option": True})
    with pytest.raises(Exception, match="xla_no_such_option"):
        bad.encode(texts, max_length=32)


def test_cpu_buckets_get_their_dot_library(release_dirs):
    """With no compiler_options, a CPU bucket up to CPU_EIGEN_MAX_LENGTH compiles with Eigen's dots (no YNNPACK
    fusion in its executable) and a longer one with XLA's own defaults; outputs agree within float32 rounding."""
    from m3jax.engine import CPU_EIGEN_MAX_LENGTH, Encoder, default_compiler_options

    if jax.default_backend() != "cpu":
        pytest.skip("the per-length dot library is a CPU default")
    assert default_compiler_options("cpu", CPU_EIGEN_MAX_LENGTH)
    assert not default_compiler_options("cpu", CPU_EIGEN_MAX_LENGTH + 1)
    assert default_compiler_options("gpu", 64) == {} == default_compiler_options("tpu", 64)
    enc = Encoder.from_pretrained(release_dirs["tiny"], length_buckets=(64, 8192))
    short, long = enc.executable(64, 2).as_text(), enc.executable(2048, 1).as_text()
    assert "__ynn_fusion" not in short
    plain = Encoder.from_pretrained(release_dirs["tiny"], length_buckets=(64, 8192), compiler_options={})
    assert long == plain.executable(2048, 1).as_text()
    texts = ["a short text", "and another one, a little longer than the first"]
    np.testing.assert_allclose(enc.encode(texts, max_length=32).dense, plain.encode(texts, max_length=32).dense,
                               atol=1e-5)


def test_shapes_compile_in_the_background_once(tiny, monkeypatch):
    """Encoder.prepare compiles planned shapes in background threads; `executable` finds them there (or waits), and
    however many threads ask for one shape at once it is compiled once; a failed compile reaches the caller and a
    later call tries again; compile_wait_s counts only the time callers of `executable` spent."""
    import threading

    from m3jax import engine

    enc = engine.Encoder.from_pretrained(tiny, length_buckets=(16, 32, 8192))
    calls, real = [], engine._compile
    gate = threading.Event()

    def counted(lowered, options, defaults):
        calls.append(threading.current_thread().name)
        gate.wait(30)  # held until the test has asked for the shape from several threads
        return real(lowered, options, defaults)

    monkeypatch.setattr(engine, "_compile", counted)
    enc.prepare([(16, 4), (32, 4)], heads=("dense",))
    got = []
    askers = [threading.Thread(target=lambda: got.append(enc.executable(16, 4, heads=("dense",)))) for _ in range(4)]
    for t in askers:
        t.start()
    gate.set()
    for t in askers:
        t.join(60)
    assert len(got) == 4 and all(g is got[0] for g in got)
    assert enc.executable(32, 4, heads=("dense",)) is enc.executable(32, 4, heads=("dense",))
    assert len(calls) == 2 and all(name.startswith("m3jax-compile") for name in calls)  # both in the background
    assert set(enc.compile_seconds) == {(16, 4, ("dense",)), (32, 4, ("dense",))}
    assert 0 < enc.compile_wait_s < sum(enc.compile_seconds.values()) + 60

    def broken(lowered, options, defaults):
        raise RuntimeError("compiler crashed")

    monkeypatch.setattr(engine, "_compile", broken)
    enc.prepare([(16, 8)], heads=("dense",))
    for _ in range(2):  # the background failure, then a fresh try that fails again
        with pytest.raises(RuntimeError, match="compiler crashed"):
            enc.executable(16, 8, heads=("dense",))
    monkeypatch.setattr(engine, "_compile", real)
    assert enc.executable(16, 8, heads=("dense",)) is not None
