"""The numpy codecs: quantizer accuracy, block layout and robustness, random blocks.

Decoding is always gguf-py's, so a packing mistake shows up as a large round-trip error.
"""

import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as QT
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from ds4 import codecs
from ds4.errors import QuantError

BLOCK_TYPES = (QT.Q8_0, QT.Q4_K, QT.Q2_K, QT.IQ2_XXS)

# Relative RMS error on Gaussian rows, measured (seeds 0-5, scales 0.02/1/300) at:
# F16 2.1e-4, Q8_0 0.0054, Q4_K 0.072, Q2_K 0.272, IQ2_XXS 0.333.
RMS_BOUND = {QT.F32: 0.0, QT.F16: 3e-4, QT.Q8_0: 0.006, QT.Q4_K: 0.076, QT.Q2_K: 0.285, QT.IQ2_XXS: 0.35}


def rel_rms(y: np.ndarray, x: np.ndarray) -> float:
    return float(np.sqrt(np.mean((y.astype(np.float64) - x) ** 2) / np.mean(x.astype(np.float64) ** 2)))


def test_row_bytes():
    assert codecs.row_bytes(QT.Q8_0, 4096) == 4352
    assert codecs.row_bytes(QT.IQ2_XXS, 4096) == 1056
    assert codecs.row_bytes(QT.Q2_K, 2048) == 672
    assert codecs.row_bytes(QT.Q4_K, 2048) == 1152
    assert codecs.row_bytes(QT.F16, 7) == 14
    with pytest.raises(QuantError, match="Q4_K: row of 100 elements .* block size 256"):
        codecs.row_bytes(QT.Q4_K, 100)


@pytest.mark.parametrize("qtype", list(RMS_BOUND), ids=lambda t: t.name)
@pytest.mark.parametrize("scale", [0.02, 1.0, 300.0])
def test_round_trip_error(qtype, scale):
    rng = np.random.default_rng(1)
    x = (rng.standard_normal((16, 1024)) * scale).astype(np.float32)
    q = codecs.quantize(x, qtype)
    assert q.dtype == np.uint8 and q.shape == (16, codecs.row_bytes(qtype, 1024))
    y = codecs.dequantize(q, qtype)
    assert y.dtype == np.float32 and y.shape == x.shape
    assert rel_rms(y, x) <= RMS_BOUND[qtype]


@pytest.mark.parametrize("qtype", BLOCK_TYPES, ids=lambda t: t.name)
def test_zero_rows_stay_zero(qtype):
    x = np.zeros((2, 512), dtype=np.float32)
    assert not codecs.dequantize(codecs.quantize(x, qtype), qtype).any()


@pytest.mark.parametrize("qtype", BLOCK_TYPES, ids=lambda t: t.name)
def test_sub_blocks_are_independent(qtype):
    # One large sub-block must not wreck the accuracy of the others only through the shared
    # super-scale; element order mistakes in packing would scatter the error everywhere.
    rng = np.random.default_rng(2)
    x = rng.standard_normal((4, 256)).astype(np.float32)
    x[:, 32:64] *= 8
    y = codecs.dequantize(codecs.quantize(x, qtype), qtype)
    assert rel_rms(y[:, 32:64], x[:, 32:64]) <= RMS_BOUND[qtype] * 1.3


def test_q8_0_is_gguf_and_exact_on_representable_values():
    rng = np.random.default_rng(3)
    d = np.float16(0.013)
    q = rng.integers(-127, 128, size=(3, 64))
    q[:, ::32] = 127  # every block reaches the top code, so the quantizer picks d back
    x = (q * np.float32(d)).astype(np.float32)
    b = codecs.quantize(x, QT.Q8_0)
    import gguf.quants

    assert np.array_equal(b, gguf.quants.quantize(x, QT.Q8_0))
    assert np.array_equal(codecs.dequantize(b, QT.Q8_0), x)


def test_q4_k_fields():
    # A ramp from -1/2 to 1/2: d and dmin sit in bytes 0-3, and the negative half needs mins.
    x = (np.arange(256, dtype=np.float32) / 256 - 0.5)[None]
    b = codecs.quantize(x, QT.Q4_K)[0]
    d, dmin = b[0:4].view(np.float16)
    assert 0 < d < 1 / 15 and 0 < dmin < 1
    y = codecs.dequantize(b[None], QT.Q4_K)[0]
    # The min only subtracts, so an all-positive sub-block spans [0, max]: a step of 0.5/15.
    assert np.abs(y - x[0]).max() < 0.6 / 30
    assert np.all(np.diff(y.reshape(8, 32)) >= 0)  # packing keeps element order


def test_q2_k_fields():
    x = (np.arange(256, dtype=np.float32) - 128)[None] / 128
    b = codecs.quantize(x, QT.Q2_K)[0]
    d, dmin = b[80:84].view(np.float16)
    assert d > 0 and dmin > 0  # negative values need the min
    y = codecs.dequantize(b[None], QT.Q2_K)[0]
    # As for Q4_K, positive sub-blocks span [0, max]: a step of 1/3 with 2-bit codes.
    assert np.abs(y - x[0]).max() < 1.2 / 6
    assert np.all(np.diff(y.reshape(16, 16)) >= 0)  # within a sub-block codes follow x


def test_iq2_xxs_signs_follow_input():
    # Decoded signs equal the input's except, in a sub-group with an odd number of
    # negatives, at its smallest-magnitude element (the format needs even parity).
    rng = np.random.default_rng(4)
    x = rng.standard_normal((8, 256)).astype(np.float32)
    y = codecs.dequantize(codecs.quantize(x, QT.IQ2_XXS), QT.IQ2_XXS)
    xs, ys = x.reshape(-1, 8), y.reshape(-1, 8)
    assert np.all((ys < 0).sum(-1) % 2 == 0)
    odd = (xs < 0).sum(-1) % 2 == 1
    expected = np.where(odd[:, None] & (np.arange(8) == np.abs(xs).argmin(-1)[:, None]), xs >= 0, xs < 0)
    assert np.array_equal(ys < 0, expected)


def test_quantize_errors():
    with pytest.raises(QuantError, match="no quantizer for Q5_0"):
        codecs.quantize(np.zeros((1, 32), np.float32), QT.Q5_0)
    with pytest.raises(QuantError, match="non-finite"):
        codecs.quantize(np.full((1, 256), np.nan, np.float32), QT.Q4_K)
    with pytest.raises(QuantError, match="block size 32"):
        codecs.quantize(np.zeros((1, 40), np.float32), QT.Q8_0)


def test_float_passthrough_and_i32():
    x = np.array([[1.5, -2.0, 7e4]], dtype=np.float32)
    assert np.array_equal(codecs.dequantize(codecs.quantize(x, QT.F32), QT.F32), x)
    assert np.array_equal(codecs.dequantize(codecs.quantize(x, QT.F16), QT.F16), [[1.5, -2.0, 65504.0]])
    ids = np.array([0, 5, 129279], dtype=np.int32)
    assert np.array_equal(codecs.dequantize(ids, QT.I32), ids.astype(np.float32))


# Magnitudes from subnormal to huge, with exact zeros mixed in.
_floats = st.one_of(
    st.just(0.0),
    st.floats(float(np.float32(-1e-30)), float(np.float32(1e-30)), width=32),
    st.floats(-1e3, 1e3, width=32),
    st.floats(float(np.float32(-3e38)), float(np.float32(3e38)), width=32),
)


@settings(max_examples=100, deadline=None)
@given(
    qtype=st.sampled_from(BLOCK_TYPES + (QT.F16,)),
    rows=st.integers(1, 3),
    x=st.data(),
)
def test_quantize_never_gives_non_finite(qtype, rows, x):
    block = GGML_QUANT_SIZES[qtype][0] if qtype != QT.F16 else 32
    n = block * x.draw(st.integers(1, 2))
    data = x.draw(hnp.arrays(np.float32, (rows, n), elements=_floats))
    y = codecs.dequantize(codecs.quantize(data, qtype), qtype)
    assert y.shape == data.shape and y.dtype == np.float32
    assert np.isfinite(y).all()
    assert not y[(data == 0).all(-1)].any()  # all-zero rows stay zero


@settings(max_examples=100, deadline=None)
@given(hnp.arrays(np.float32, (2, 64), elements=st.floats(-1e6, 1e6, width=32)))
def test_q8_0_error_within_one_step(x):
    # |x - d*q| <= d/2 plus the f16 rounding of d (127 * half an f16 ulp of d), below one step.
    y = codecs.dequantize(codecs.quantize(x, QT.Q8_0), QT.Q8_0)
    step = np.abs(x.reshape(-1, 32)).max(-1, keepdims=True) / 127
    assert np.all(np.abs((y - x).reshape(-1, 32)) <= step + 127 * 2.0**-25)


@pytest.mark.parametrize("qtype", codecs.RANDOM_BLOCK_TYPES, ids=lambda t: t.name)
def test_random_blocks_statistics(qtype):
    rng = np.random.default_rng(5)
    blocks = codecs.random_blocks(rng, qtype, 4000, target_std=0.02)
    assert blocks.dtype == np.uint8 and blocks.shape == (4000, GGML_QUANT_SIZES[qtype][1])
    v = codecs.dequantize(blocks, qtype).astype(np.float64)
    assert np.isfinite(v).all()
    assert abs(v.std() / 0.02 - 1) < 0.03
    assert abs(v.mean()) < 0.02 * 0.01
    # Centred per sub-block too, not just overall: the K types' mins must cancel their codes.
    sub = 16 if qtype == QT.Q2_K else 32
    assert abs(v.reshape(-1, sub).mean(-1)).mean() < 0.25 * 0.02


def test_random_blocks_rejects_other_types():
    with pytest.raises(QuantError, match="no random blocks for F16"):
        codecs.random_blocks(np.random.default_rng(0), QT.F16, 4, 1.0)
