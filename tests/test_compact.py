"""m3jax.compact's quantization against sentence-transformers' quantize_embeddings (the reference the encodings
follow): binary codes bit for bit, int8 codes value for value but at a bin's edge, where float32 division may round
either way; eagerly and under jit. Its scores against numpy's."""

import jax
import numpy as np
import pytest
from sentence_transformers.quantization import quantize_embeddings

from m3jax.compact import dequantize_int8, hamming_scores, int8_ranges, quantize, unpack_bits


@pytest.fixture(scope="module")
def vectors():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((300, 1021)).astype(np.float32)  # a width that is not a whole number of bytes
    x[:, 7] = 0.25  # a constant dimension: a zero range, which the reference steps by 1
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x[:200], x[200:]  # calibration, then vectors partly outside its ranges


@pytest.mark.parametrize("precision", ["int8", "uint8", "binary", "ubinary", "float32"])
def test_codes_equal_sentence_transformers(vectors, precision):
    calibration, x = vectors
    want = quantize_embeddings(x, precision, calibration_embeddings=calibration)
    ranges = int8_ranges(calibration)
    lo, hi = (np.asarray(r, np.float64) for r in ranges)
    step = np.where(hi > lo, (hi - lo) / 255, 1.0)
    position = (x - lo) / step  # in float64: where each value falls among the bins
    for fn in (quantize, jax.jit(quantize, static_argnums=1)):
        got = np.asarray(fn(x, precision, ranges))
        assert got.dtype == want.dtype and got.shape == want.shape
        diff = got.astype(np.int32) - want.astype(np.int32)
        if precision in ("int8", "uint8"):
            # float32 division may round a value lying on a bin edge to either side, in XLA as in numpy: a code
            # may differ by one only there (within float32 rounding of the edge, judged in float64).
            off = np.nonzero(diff)
            assert np.all(np.abs(diff[off]) == 1)
            assert np.all(np.abs(position[off] - np.round(position[off])) < 1e-4), position[off]
            assert len(off[0]) <= 1e-3 * diff.size
        else:
            np.testing.assert_array_equal(got, want)


def test_scores_and_round_trips(vectors):
    calibration, x = vectors
    ranges = int8_ranges(calibration)
    codes = quantize(x, "int8", ranges)
    steps = np.maximum((np.asarray(ranges[1]) - np.asarray(ranges[0])) / 255, 0)
    inside = (x >= np.asarray(ranges[0])) & (x <= np.asarray(ranges[1]))
    err = np.abs(np.asarray(dequantize_int8(codes, ranges)) - x)
    assert np.all(err[inside] <= np.broadcast_to(steps, x.shape)[inside] * (1 + 1e-5) + 1e-7)
    b = quantize(x, "binary")
    np.testing.assert_array_equal(np.asarray(unpack_bits(b, 1021)), (x > 0).astype(np.float32))
    ub = np.asarray(quantize(x, "ubinary"))
    want = 1021 - np.unpackbits(ub[:10, None, :] ^ ub[None, :, :], axis=-1)[..., :1021].sum(-1)
    np.testing.assert_array_equal(np.asarray(hamming_scores(b[:10], b, 1021)), want)
    with pytest.raises(ValueError, match="int8 needs ranges"):
        quantize(x, "int8")
    with pytest.raises(ValueError, match=r"ranges must have shape \(2, 1021\)"):
        quantize(x, "int8", ranges[:, :5])
