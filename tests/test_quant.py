"""The MLX side: op-built dequantizers bit-exact against gguf-py, weight and expert matmuls.

Blocks are random bytes reinterpreted as GGML blocks (gguf-py's test trick), with the f16
scale fields either set to finite random values or left as raw bit patterns (NaN, inf,
subnormals); the comparison is on float32 bits, NaN-aware.
"""

import mlx.core as mx
import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as QT

from ds4 import codecs, quant
from ds4.errors import QuantError

QUANT_TYPES = (QT.Q8_0, QT.Q2_K, QT.Q4_K, QT.IQ2_XXS)
ALL_TYPES = QUANT_TYPES + (QT.F16, QT.F32)
# Byte offsets of the f16 fields in each block.
F16_FIELDS = {QT.Q8_0: (0,), QT.Q2_K: (80, 82), QT.Q4_K: (0, 2), QT.IQ2_XXS: (0,)}


def random_rows(rng, qtype, rows, n, finite=True):
    """uint8 [rows, row_bytes]: random bytes, f16 fields finite (|v| ~ 0.01..100) unless not
    `finite`; the first row is all zeros."""
    rb = codecs.row_bytes(qtype, n)
    data = rng.integers(0, 256, size=(rows, rb), dtype=np.uint8)
    if finite and qtype in F16_FIELDS:
        _, type_size = GGML_QUANT_SIZES[qtype]
        blocks = data.reshape(-1, type_size)
        for off in F16_FIELDS[qtype]:
            v = rng.standard_normal(blocks.shape[0]) * 10.0 ** rng.uniform(-2, 2, blocks.shape[0])
            blocks[:, off : off + 2] = v.astype("<f2").view(np.uint8).reshape(-1, 2)
    elif finite and qtype == QT.F16:
        data = rng.standard_normal((rows, n)).astype("<f2").view(np.uint8)
    elif finite and qtype == QT.F32:
        data = rng.standard_normal((rows, n)).astype("<f4").view(np.uint8)
    data[0] = 0
    return data


def assert_bits_equal(got: np.ndarray, ref: np.ndarray):
    assert got.shape == ref.shape and got.dtype == ref.dtype == np.float32
    nan = np.isnan(ref)
    assert np.array_equal(nan, np.isnan(got)), "NaN positions differ"
    bad = (got.view(np.uint32) != ref.view(np.uint32)) & ~nan
    assert not bad.any(), f"{bad.sum()} values differ, first at {np.argwhere(bad)[0]}: {got[bad][0]} vs {ref[bad][0]}"


@pytest.mark.parametrize("qtype", ALL_TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("finite", [True, False], ids=["finite-f16", "raw-bits"])
def test_dequantize_bit_exact(qtype, finite):
    rng = np.random.default_rng(10)
    n = 512
    data = random_rows(rng, qtype, 24, n, finite)
    with np.errstate(invalid="ignore"):  # inf * 0 in the reference on raw bits
        ref = codecs.dequantize(data, qtype)
    got = np.array(quant.dequantize(mx.array(data), qtype, n))
    assert got.shape == (24, n)
    assert_bits_equal(got, ref)


def test_dequantize_keeps_leading_dims_and_checks_rows():
    rng = np.random.default_rng(11)
    data = random_rows(rng, QT.Q4_K, 6, 256).reshape(2, 3, -1)
    got = np.array(quant.dequantize(mx.array(data), QT.Q4_K, 256))
    assert_bits_equal(got, codecs.dequantize(data, QT.Q4_K))
    with pytest.raises(QuantError, match="rows of 144 bytes, expected 288"):
        quant.dequantize(mx.array(data), QT.Q4_K, 512)
    with pytest.raises(QuantError, match="F16: rows of 72 elements, expected 64"):
        quant.dequantize(mx.array(data), QT.F16, 64)
    with pytest.raises(QuantError, match="no MLX dequantizer for Q5_K"):
        quant.dequantize(mx.array(data), QT.Q5_K, 256)


def weight_data(qtype, data: np.ndarray, n: int) -> np.ndarray:
    """The numpy view a GGUF reader hands over: typed for F16/F32, bytes otherwise."""
    if qtype == QT.F32:
        return data.view(np.float32)
    if qtype == QT.F16:
        return data.view(np.float16)
    return data


def assert_matmul_close(y: np.ndarray, x: np.ndarray, w: np.ndarray):
    """y ~ x @ w.T, within float32 summation error: 1e-5 of sum |x||w| (about 20 ulps)."""
    ref = x.astype(np.float64) @ w.T.astype(np.float64)
    bound = 1e-5 * (np.abs(x).astype(np.float64) @ np.abs(w).T.astype(np.float64)) + 1e-30
    assert y.dtype == np.float32 and y.shape == ref.shape
    assert np.all(np.abs(y - ref) <= bound), f"max error ratio {np.max(np.abs(y - ref) / bound):.2f}"


@pytest.mark.parametrize("qtype", ALL_TYPES, ids=lambda t: t.name)
def test_weight_matmul(qtype):
    rng = np.random.default_rng(12)
    out_dim, in_dim = 40, 512
    data = random_rows(rng, qtype, out_dim, in_dim)
    w_ref = codecs.dequantize(data, qtype)
    w = quant.QuantWeight(weight_data(qtype, data, in_dim), qtype, (out_dim, in_dim))
    for M in (1, 2, 7, 16):
        x = rng.standard_normal((M, in_dim)).astype(np.float32)
        assert_matmul_close(np.array(w(mx.array(x))), x, w_ref)
    x = rng.standard_normal((2, 3, in_dim)).astype(np.float32)
    y = np.array(w(mx.array(x)))
    assert_matmul_close(y.reshape(6, out_dim), x.reshape(6, in_dim), w_ref)


@pytest.mark.parametrize("qtype", ALL_TYPES, ids=lambda t: t.name)
def test_weight_dequantize_is_exact(qtype):
    # Transcoded Q8_0/Q4_K included: see the exactness notes in ds4/quant.py. Q8_0 may turn
    # a -0 into +0 (d < 0, q = 0), hence equality of values plus bits on nonzero entries.
    rng = np.random.default_rng(13)
    data = random_rows(rng, qtype, 16, 512)
    ref = codecs.dequantize(data, qtype)
    w = quant.QuantWeight(weight_data(qtype, data, 512), qtype, (16, 512))
    got = np.array(w.dequantize())
    assert np.array_equal(got, ref)
    nz = ref != 0
    assert np.array_equal(got[nz].view(np.uint32), ref[nz].view(np.uint32))
    if qtype != QT.Q8_0:
        assert_bits_equal(got, ref)


def test_affine_transcode_is_used_and_compact():
    rng = np.random.default_rng(14)
    data = random_rows(rng, QT.Q4_K, 8, 1024)
    w = quant.QuantWeight(data, QT.Q4_K, (8, 1024))
    assert w.bits == 4 and w.scales.dtype == mx.float32
    assert w.w_q.shape == (8, 1024 // 8) and w.scales.shape == (8, 1024 // 32)
    # 4 bits per weight plus a float32 scale and bias per 32: 6 bits per weight.
    assert w.nbytes == 8 * 1024 * 6 // 8


def test_transcode_in_chunks(monkeypatch):
    monkeypatch.setattr(quant, "_TRANSCODE_ROWS", 3)
    rng = np.random.default_rng(15)
    data = random_rows(rng, QT.Q8_0, 10, 64)
    w = quant.QuantWeight(data, QT.Q8_0, (10, 64))
    assert np.array_equal(np.array(w.dequantize()), codecs.dequantize(data, QT.Q8_0))


def test_weight_shape_errors():
    data = np.zeros((4, 144), dtype=np.uint8)
    with pytest.raises(QuantError, match=r"Q4_K weight of shape \(4, 512\): got uint8 \(4, 144\), expected \(4, 288\)"):
        quant.QuantWeight(data, QT.Q4_K, (4, 512))
    with pytest.raises(QuantError, match="no weight path for Q5_K"):
        quant.QuantWeight(data, QT.Q5_K, (4, 256))
    with pytest.raises(QuantError, match="F16 weight"):
        quant.QuantWeight(np.zeros((4, 8), np.float32), QT.F16, (4, 8))


@pytest.mark.parametrize("qtype", ALL_TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("M", [1, 5])
@pytest.mark.parametrize("per_expert_x", [False, True])
def test_expert_gather_matmul(qtype, M, per_expert_x):
    rng = np.random.default_rng(16)
    n_expert, out_dim, in_dim, k = 6, 24, 256, 3
    data = random_rows(rng, qtype, n_expert * out_dim, in_dim).reshape(n_expert, out_dim, -1)
    w_ref = codecs.dequantize(data, qtype)  # [E, out, in]
    experts = quant.QuantExperts(weight_data(qtype, data, in_dim), qtype, (n_expert, out_dim, in_dim))
    ids = rng.integers(0, n_expert, size=(M, k))
    ids[-1, :2] = ids[0, 0]  # repeated experts, within a row and across rows
    x = rng.standard_normal((M, k, in_dim) if per_expert_x else (M, in_dim)).astype(np.float32)
    ids_dtype = np.int32 if per_expert_x else np.uint32  # routers hand over either
    y = np.array(experts.gather_matmul(mx.array(x), mx.array(ids.astype(ids_dtype))))
    assert y.shape == (M, k, out_dim)
    for m in range(M):
        for j in range(k):
            xm = x[m, j] if per_expert_x else x[m]
            assert_matmul_close(y[m, j][None], xm[None], w_ref[ids[m, j]])


@pytest.mark.parametrize("qtype", ALL_TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("per_expert_x", [False, True])
def test_prefill_sized_gather_sorts_by_expert_with_the_same_bits(qtype, per_expert_x):
    """A prefill-sized call (outside the row-invariant widths, >= SORT_MIN_PAIRS pairs) runs its
    (row, expert) pairs sorted by expert and puts them back in place: on the CPU each pair is
    still its own product, so the result is bitwise the unsorted, row-invariant one."""
    from ds4 import kernels
    rng = np.random.default_rng(18)
    n_expert, out_dim, in_dim, k, M = 8, 16, 256, 3, 30
    assert M * k >= quant.SORT_MIN_PAIRS
    data = random_rows(rng, qtype, n_expert * out_dim, in_dim).reshape(n_expert, out_dim, -1)
    experts = quant.QuantExperts(weight_data(qtype, data, in_dim), qtype, (n_expert, out_dim, in_dim))
    ids = mx.array(np.stack([rng.permutation(n_expert)[:k] for _ in range(M)]).astype(np.int32))
    x = mx.array(rng.standard_normal((M, k, in_dim) if per_expert_x else (M, in_dim)).astype(np.float32))
    reference = kernels.reference("gather_matmul", qtype.name)
    sorted_pairs = np.array(reference(experts, x, ids))
    with kernels.row_invariant():
        in_order = np.array(reference(experts, x, ids))
    assert sorted_pairs.shape == (M, k, out_dim)
    assert np.array_equal(sorted_pairs, in_order)


@pytest.mark.parametrize("qtype", QUANT_TYPES, ids=lambda t: t.name)
def test_expert_dequantize_is_exact(qtype):
    rng = np.random.default_rng(17)
    data = random_rows(rng, qtype, 4 * 8, 256).reshape(4, 8, -1)
    experts = quant.QuantExperts(data, qtype, (4, 8, 256))
    got = np.array(experts.dequantize(mx.array([3, 1])))
    assert np.array_equal(got, codecs.dequantize(data[[3, 1]], qtype))


def test_kernel_table_falls_back_to_the_reference(monkeypatch):
    """Every op the weights call has a reference entry; a device without a fast entry gets the
    reference, and DS4_KERNELS=reference forces it everywhere."""
    from ds4 import kernels

    for qt in quant.SUPPORTED:
        for op in ("matmul", "grouped_matmul", "gather_matmul"):
            assert kernels.lookup(op, qt.name, "cpu") is kernels.reference(op, qt.name)
    import ds4.fused_kernels  # registers the Metal/CUDA entries (tests/test_kernels_c.py checks them)

    assert kernels.lookup("dequant", "IQ2_XXS", "metal") is not kernels.reference("dequant", "IQ2_XXS")
    assert kernels.lookup("dequant", "IQ2_XXS", "cpu") is kernels.reference("dequant", "IQ2_XXS")
    monkeypatch.setenv("DS4_KERNELS", "reference")
    assert kernels.lookup("dequant", "IQ2_XXS", "metal") is kernels.reference("dequant", "IQ2_XXS")
    assert ("dequant", "IQ2_XXS", "metal") in kernels.table()
    assert ("matmul", "Q8_0", "reference") in kernels.table()
    with pytest.raises(KeyError):
        kernels.register("no-such-op", None, "cpu", lambda: None)


@pytest.mark.parametrize("M, n_expert", [(1, 16), (3, 16), (2, 64), (17, 256)])
def test_unique_experts_on_the_device(M, n_expert):
    """The experts a multi-row call decodes: each chosen id once (within a shape-fixed count,
    computed without leaving the device), and slots that map every (row, choice) back."""
    rng = np.random.default_rng(M)
    ids = np.stack([rng.choice(min(n_expert, 12), 6, replace=False) for _ in range(M)]).astype(np.int32)
    experts, slots = quant.unique_experts(mx.array(ids), n_expert)
    experts, slots = np.array(experts), np.array(slots)
    assert len(experts) == min(M * 6, n_expert)
    np.testing.assert_array_equal(experts[slots], ids)
    if M > 1 and M * 6 < n_expert:
        used = experts[np.unique(slots)]
        assert sorted(used.tolist()) == sorted(set(ids.ravel().tolist()))  # each chosen expert once
