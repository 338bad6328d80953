"""GGUF quant blocks on the MLX device: dequantizers and the weight classes the model uses.

`dequantize` decodes GGML blocks with MLX ops only (bit ops, gathers into the IQ2_XXS tables,
f16 fields read by viewing byte pairs), so it runs on the CPU, CUDA and Metal backends alike.
It is bit-exact against gguf-py's numpy decoders (`ds4.codecs.dequantize`), and not by luck
of evaluation order: an f16 scale has 11 significant bits and the codes and sub-scales it
meets add at most 11 more, so every product fits float32's 24 bits exactly and only the
final `- dmin*m` of the K types rounds. FMA contraction or reassociation cannot change a
result.

Weights and their matmul paths:

    type      QuantWeight / QuantExperts path                      weights the matmul sees
    F32, F16  float32 matmul (F16 upcast once at load)              exact
    Q8_0      MLX affine 8-bit g32: quantized_matmul / gather_qmm   exact (a -0 may read +0)
    Q4_K      MLX affine 4-bit g32: quantized_matmul / gather_qmm   exact
    Q2_K      MLX-op dequantize, float32 matmul / gather_mm         exact
    IQ2_XXS   MLX-op dequantize, float32 matmul / gather_mm         exact

Only the matmul's float32 summation order differs from a float64 reference (MLX's quantized
matmul also folds scale and bias into its sums), so outputs agree to float32 rounding.

Affine scales and biases are float32: exactness needs them (d*sc has up to 17 significant
bits), and on the MLX CPU backend f16 scales made a 4096x4096 q4 matvec 37x slower.

The weights call their products through the kernel table (`ds4.kernels`: ops "matmul",
"grouped_matmul", "gather_matmul" and "dequant", keyed by the quant type); the MLX-op paths
here are the reference entries that fused kernels are tested against.
"""

from __future__ import annotations

from functools import cache

import mlx.core as mx
import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from ds4 import kernels
from ds4.codecs import row_bytes
from ds4.errors import QuantError
from ds4.numerics import iota

QT = GGMLQuantizationType

SUPPORTED = (QT.F32, QT.F16, QT.Q8_0, QT.Q2_K, QT.Q4_K, QT.IQ2_XXS)
# Types transcoded once to MLX affine quantization: qtype -> bits (group size 32).
AFFINE_BITS = {QT.Q8_0: 8, QT.Q4_K: 4}
GROUP_SIZE = 32

# Rows transcoded per MLX graph at load time, to bound the temporaries.
_TRANSCODE_ROWS = 1 << 14


# ---------------------------------------------------------------------------
# Dequantizers built from MLX ops. Each takes blocks uint8 [R, n_blocks, type_size] and
# returns float32 [R, n_blocks, block_size], in gguf-py's order of operations.


def _f16_field(b: mx.array, start: int) -> mx.array:
    """The little-endian f16 at bytes start..start+1 of each block, as float32 [..., 1]."""
    return b[..., start : start + 2].view(mx.float16).astype(mx.float32)


def _dequant_q8_0(b: mx.array) -> mx.array:
    # [ d: f16 ][ qs[32]: int8 ]   w = qs * d
    d = _f16_field(b, 0)
    return b[..., 2:].view(mx.int8).astype(mx.float32) * d


def _dequant_q2_k(b: mx.array) -> mx.array:
    # [ scales[16]: mmmm ssss ][ qs[64] ][ d: f16 ][ dmin: f16 ]
    # qs[32n + l] holds element 128n + 32k + l in bits 2k..2k+1; it lies in sub-block 8n + 2k + l//16.
    R, nb = b.shape[:2]
    scales = b[..., :16]
    d, dmin = _f16_field(b, 80), _f16_field(b, 82)
    dl = (d * (scales & 0xF).astype(mx.float32)).reshape(R, nb, 16, 1)
    ml = (dmin * (scales >> 4).astype(mx.float32)).reshape(R, nb, 16, 1)
    shift = mx.array([0, 2, 4, 6], dtype=mx.uint8).reshape(1, 1, 1, 4, 1)
    q = (b[..., 16:80].reshape(R, nb, 2, 1, 32) >> shift) & 3  # [R, nb, n, k, l]
    q = q.reshape(R, nb, 16, 16).astype(mx.float32)
    return (dl * q - ml).reshape(R, nb, 256)


def _q4_k_scale_min(scales: mx.array) -> tuple[mx.array, mx.array]:
    """Unpack Q4_K's 12 scale bytes [..., 12] into 6-bit (sc, m), uint8 [..., 8] each.

        0..3   hh SSSSSS   sc[0..3], top bits of sc[4..7]
        4..7   hh MMMMMM   m[0..3], top bits of m[4..7]
        8..11  mmmm ssss   low bits of m[4..7] and sc[4..7]
    """
    s, m, md = scales[..., 0:4], scales[..., 4:8], scales[..., 8:12]
    sc = mx.concatenate([s & 0x3F, (md & 0x0F) | ((s >> 2) & 0x30)], axis=-1)
    mn = mx.concatenate([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], axis=-1)
    return sc, mn


def _q4_k_codes(b: mx.array) -> mx.array:
    """Q4_K 4-bit codes in element order, uint8 [R, nb, 8, 32].

    qs[32i + l] = q(64i+32+l) << 4 | q(64i+l): sub-block 2i in the low nibble, 2i+1 in the high.
    """
    R, nb = b.shape[:2]
    qs = b[..., 16:144].reshape(R, nb, 4, 1, 32)
    return ((qs >> mx.array([0, 4], dtype=mx.uint8).reshape(1, 1, 1, 2, 1)) & 0xF).reshape(R, nb, 8, 32)


def _dequant_q4_k(b: mx.array) -> mx.array:
    # [ d: f16 ][ dmin: f16 ][ scales[12] ][ qs[128] ]   w = d*sc*q - dmin*m per 32-element sub-block
    R, nb = b.shape[:2]
    d, dmin = _f16_field(b, 0), _f16_field(b, 2)
    sc, m = _q4_k_scale_min(b[..., 4:16])
    dl = (d * sc.astype(mx.float32)).reshape(R, nb, 8, 1)
    ml = (dmin * m.astype(mx.float32)).reshape(R, nb, 8, 1)
    return (dl * _q4_k_codes(b).astype(mx.float32) - ml).reshape(R, nb, 256)


@cache
def _iq2_xxs_tables() -> tuple[mx.array, mx.array, mx.array]:
    """IQ2_XXS lookup tables from gguf-py's copies of ggml's, built once.

    Returns (grid float32 [256, 8], ksigns uint8 [128], signed float32 [256 * 128, 8]) where
    signed[a * 128 + s] is grid[a] with the signs of ksigns[s] applied: one gather then
    gives a sub-group's eight signed levels (on the CPU a gather costs as much as a multiply
    over the same output, so folding the sign table in halves the work).
    """
    from gguf.quants import IQ2_XXS

    IQ2_XXS.init_grid()
    grid = IQ2_XXS.grid.reshape(256, 8).astype(np.float32)
    ksigns = np.frombuffer(IQ2_XXS.ksigns, dtype=np.uint8)
    negative = (ksigns[:, None] >> np.arange(8, dtype=np.uint8)) & 1  # [128, 8]
    signed = np.where(negative[None] == 1, -grid[:, None], grid[:, None]).reshape(256 * 128, 8)
    return mx.array(grid), mx.array(ksigns), mx.array(signed)


def _dequant_iq2_xxs(b: mx.array) -> mx.array:
    # [ d: f16 ][ 8 groups x ( a0 a1 a2 a3 | u32 s ) ]
    # s bits 0..27: four 7-bit sign indices (sub-group t at 7t), bits 28..31: scale ls.
    # w(32g + 8t + j) = d * (0.5 + ls) * 0.25 * grid[a_t][j] * (-1 if ksigns[sign_t] bit j else 1)
    # gguf-py multiplies by the sign last; db * (+-g) is the same float, as rounding is
    # symmetric under negation.
    R, nb = b.shape[:2]
    signed = _iq2_xxs_tables()[2]
    d = _f16_field(b, 0).reshape(R, nb, 1, 1)
    groups = b[..., 2:].reshape(R, nb, 8, 8)
    s = groups[..., 4:8].view(mx.uint32)  # [R, nb, 8, 1]
    db = (d * (0.5 + (s >> 28).astype(mx.float32)) * 0.25)[..., None]  # [R, nb, 8, 1, 1]
    sign_idx = (s >> mx.array([0, 7, 14, 21], dtype=mx.uint32)) & 127  # [R, nb, 8, 4]
    v = signed[groups[..., 0:4].astype(mx.uint32) * 128 + sign_idx]  # [R, nb, 8, 4, 8]
    return (db * v).reshape(R, nb, 256)


_DEQUANTIZERS = {
    QT.Q8_0: _dequant_q8_0,
    QT.Q2_K: _dequant_q2_k,
    QT.Q4_K: _dequant_q4_k,
    QT.IQ2_XXS: _dequant_iq2_xxs,
}


def dequantize(blocks: mx.array, qtype: QT, n_elems: int) -> mx.array:
    """Decode GGUF rows to float32 [..., n_elems].

    Args:
        blocks: uint8 [..., row_bytes] (for F16/F32 also the typed array [..., n_elems]).
        qtype: the GGML type of the rows.
        n_elems: elements per row.
    """
    qtype = QT(qtype)
    if qtype in (QT.F32, QT.F16):
        float_dtype = mx.float32 if qtype == QT.F32 else mx.float16
        rows = blocks.view(float_dtype) if blocks.dtype == mx.uint8 else blocks
        if rows.shape[-1] != n_elems:
            raise QuantError(f"{qtype.name}: rows of {rows.shape[-1]} elements, expected {n_elems}")
        return rows.astype(mx.float32)
    if qtype not in _DEQUANTIZERS:
        raise QuantError(f"no MLX dequantizer for {qtype.name}, expected one of {[t.name for t in SUPPORTED]}")
    block, type_size = GGML_QUANT_SIZES[qtype]
    lead = blocks.shape[:-1]
    if blocks.shape[-1] != row_bytes(qtype, n_elems):
        raise QuantError(f"{qtype.name}: rows of {blocks.shape[-1]} bytes, expected {row_bytes(qtype, n_elems)}")
    b = blocks.reshape(-1, n_elems // block, type_size)
    return _DEQUANTIZERS[qtype](b).reshape(*lead, n_elems)


# ---------------------------------------------------------------------------
# Transcoding to MLX affine quantization (w = scale * q + bias, q unsigned, per 32 elements).
# mx.quantize packs q little-endian into uint32 words: element 0 in the lowest bits.


def _affine_q8_0(b: mx.array) -> tuple[mx.array, mx.array, mx.array]:
    # int8 q -> uint8 q + 128 (flip the sign bit), scale = d, bias = -128 d. Every term is
    # exact (d*(q+128) needs 11 + 8 bits) and so is their sum d*q, so the weight equals the
    # reference d*q, except that a zero comes out +0 where the reference gives -0 for d < 0.
    R, nb = b.shape[:2]
    d = _f16_field(b, 0).reshape(R, nb)
    q = (b[..., 2:] ^ 0x80).reshape(R, nb * 32)
    return q.view(mx.uint32), d, d * -128.0


def _affine_q4_k(b: mx.array) -> tuple[mx.array, mx.array, mx.array]:
    # scale = d*sc, bias = -(dmin*m): both exact, as is scale*q (21 bits), so scale*q + bias
    # rounds once, exactly like the reference d*sc*q - dmin*m (x - y is x + (-y) in IEEE).
    R, nb = b.shape[:2]
    d, dmin = _f16_field(b, 0), _f16_field(b, 2)
    sc, m = _q4_k_scale_min(b[..., 4:16])
    scales = (d * sc.astype(mx.float32)).reshape(R, nb * 8)
    biases = -(dmin * m.astype(mx.float32)).reshape(R, nb * 8)
    q = _q4_k_codes(b).reshape(R, nb * 128, 2)
    packed = q[..., 0] | (q[..., 1] << 4)  # two codes per byte, the even element low
    return packed.view(mx.uint32), scales, biases


_AFFINE = {QT.Q8_0: _affine_q8_0, QT.Q4_K: _affine_q4_k}


def _transcode(data: np.ndarray, qtype: QT, n_in: int) -> tuple[mx.array, mx.array, mx.array]:
    """GGUF rows uint8 [R, row_bytes] -> MLX affine (w_q, scales, biases) [R, ...], evaluated.

    Chunks of rows are written in place into the outputs, so the load never holds more than
    the result and one chunk's temporaries."""
    block, type_size = GGML_QUANT_SIZES[qtype]
    R = data.shape[0]
    out = None
    for r0 in range(0, R, _TRANSCODE_ROWS):
        chunk = mx.array(np.ascontiguousarray(data[r0 : r0 + _TRANSCODE_ROWS]))
        parts = _AFFINE[qtype](chunk.reshape(chunk.shape[0], n_in // block, type_size))
        if out is None:
            if chunk.shape[0] == R:
                mx.eval(*parts)
                return parts
            out = [mx.zeros((R, p.shape[1]), p.dtype) for p in parts]
        start = mx.array([r0])
        out = [mx.slice_update(o, p, start, axes=(0,)) for o, p in zip(out, parts)]
        mx.eval(*out)
    return tuple(out)


@cache
def _iq2_grid_bytes() -> mx.array:
    """The IQ2_XXS grid as uint8 [256 * 8] (levels 8, 25, 43), for the fused kernels."""
    return _iq2_xxs_tables()[0].reshape(-1).astype(mx.uint8)


for _qt in _DEQUANTIZERS:
    kernels.register_reference("dequant", lambda blocks, n, _qt=_qt: dequantize(blocks, _qt, n), _qt.name)


# ---------------------------------------------------------------------------
# Weights.


def _check_data(data: np.ndarray, qtype: QT, shape: tuple[int, ...]) -> np.ndarray:
    """Return `data` as the numpy view the weight keeps: typed [..., in] for F16/F32, uint8
    [..., row_bytes] otherwise; raise QuantError when it does not match `shape`."""
    if qtype not in SUPPORTED:
        raise QuantError(f"no weight path for {qtype.name}, expected one of {[t.name for t in SUPPORTED]}")
    *lead, n_in = shape
    if qtype in (QT.F32, QT.F16):
        want = np.float32 if qtype == QT.F32 else np.float16
        data = data.view(want) if data.dtype == np.uint8 else data
        expected, dtype_ok = (*lead, n_in), data.dtype == want
    else:
        expected, dtype_ok = (*lead, row_bytes(qtype, n_in)), data.dtype == np.uint8
    if tuple(data.shape) != tuple(expected) or not dtype_ok:
        raise QuantError(
            f"{qtype.name} weight of shape {tuple(shape)}: got {data.dtype} {tuple(data.shape)}, expected {tuple(expected)}"
        )
    return data


class _DeviceBlocks:
    """GGUF rows [..., out, in] kept on the device: Q8_0 and Q4_K transcoded once to MLX affine
    blocks (w_q, scales, biases), F16/F32 as float32 (`dense`), the other types as their GGUF
    bytes (`blocks`)."""

    def __init__(self, data: np.ndarray, qtype: QT, shape: tuple[int, ...]):
        self.qtype = QT(qtype)
        self.shape = tuple(int(s) for s in shape)
        data = _check_data(data, self.qtype, self.shape)
        self.bits = AFFINE_BITS.get(self.qtype)
        self.dense = self.blocks = None
        if self.bits is not None:
            flat = data.reshape(-1, data.shape[-1])
            lead = self.shape[:-1]
            self.w_q, self.scales, self.biases = (a.reshape(*lead, -1) for a in _transcode(flat, self.qtype, self.shape[-1]))
        elif self.qtype in (QT.F32, QT.F16):
            # float32 once at load: every product then runs on it directly (f16 -> f32 is exact)
            self.dense = _to_device(data).astype(mx.float32)
            mx.eval(self.dense)
        else:
            self.blocks = _to_device(data)

    @property
    def kind(self) -> str:
        return self.qtype.name

    @property
    def nbytes(self) -> int:
        """Bytes held on the device."""
        if self.bits is not None:
            return self.w_q.nbytes + self.scales.nbytes + self.biases.nbytes
        return (self.dense if self.dense is not None else self.blocks).nbytes

    def _decode(self, index=None) -> mx.array:
        """float32 weights [..., out, in] (of the leading entries `index`, when given)."""
        if self.bits is not None:
            parts = (self.w_q, self.scales, self.biases)
            if index is not None:
                parts = tuple(p[index] for p in parts)
            return mx.dequantize(*parts, group_size=GROUP_SIZE, bits=self.bits)
        if self.dense is not None:
            return self.dense if index is None else self.dense[index]
        blocks = self.blocks if index is None else self.blocks[index]
        return kernels.lookup("dequant", self.kind)(blocks, self.shape[-1])


def _f32(x: mx.array) -> mx.array:
    return x if x.dtype == mx.float32 else x.astype(mx.float32)


def _to_device(data: np.ndarray) -> mx.array:
    """A host tensor copied to the device and evaluated (the copy no longer needs the host pages)."""
    a = mx.array(np.ascontiguousarray(data))
    mx.eval(a)
    return a


class QuantWeight(_DeviceBlocks):
    """A 2-D GGUF weight W [out, in] (GGUF dims [in, out]) kept in its GGUF form on the device.

    `w(x)` computes x @ W.T in float32 and `w.grouped(x)` the block-diagonal grouped product,
    each through the kernel table (`ds4.kernels`, ops "matmul" and "grouped_matmul" keyed by
    the quant type); the references below define the results."""

    def dequantize(self) -> mx.array:
        """The weight as float32 [out, in]."""
        return self._decode()

    def grouped(self, x: mx.array) -> mx.array:
        """Block-diagonal product for G row groups: x [T, G, in] -> [T, G, out / G], group g
        times rows g*out/G .. (g+1)*out/G (the grouped low-rank attention output)."""
        return kernels.lookup("grouped_matmul", self.kind)(self, _f32(x))

    def __call__(self, x: mx.array) -> mx.array:
        """x [..., in] -> x @ W.T [..., out], float32."""
        return kernels.lookup("matmul", self.kind)(self, _f32(x))


def _matmul_reference(w: QuantWeight, x: mx.array) -> mx.array:
    if w.bits is not None:
        # MLX multiplies by the exact weights, folding scale and bias into its own sums; its
        # kernels compute each row alike whatever the row count.
        return mx.quantized_matmul(x, w.w_q, w.scales, w.biases, transpose=True, group_size=GROUP_SIZE, bits=w.bits)
    return kernels.matmul_rows(x, w._decode().T)  # exact float32 weights, float32 products


def _grouped_matmul_reference(w: QuantWeight, x: mx.array) -> mx.array:
    T, G, n_in = x.shape
    rows = w.shape[0] // G
    if w.bits is not None:
        parts = [a.reshape(G, rows, -1) for a in (w.w_q, w.scales, w.biases)]
        y = mx.gather_qmm(x[:, :, None, :], *parts, lhs_indices=_batch_index((T, G), (T, G)),
                          rhs_indices=mx.broadcast_to(iota(G), (T, G)), transpose=True, group_size=GROUP_SIZE, bits=w.bits)
        return y.squeeze(-2)
    wt = w._decode().reshape(G, rows, n_in).swapaxes(-1, -2)  # [G, in, rows]
    if kernels.rows_independent():
        return (x[:, :, None, :] @ mx.broadcast_to(wt, (T, G, n_in, rows))).squeeze(-2)
    return mx.einsum("tgi,gio->tgo", x, wt)


class QuantExperts(_DeviceBlocks):
    """Routed experts [n_expert, out, in] from a 3-D GGUF tensor (GGUF dims [in, out, n_expert],
    expert e contiguous), multiplied only for the experts each row selects (kernel table op
    "gather_matmul", keyed by the quant type).

    Reference: Q8_0 and Q4_K go through `mx.gather_qmm` on MLX affine blocks. The others
    (IQ2_XXS, Q2_K, F16, F32) decode the chosen experts to float32 and use `mx.gather_mm`;
    with several rows the chosen ids are deduplicated on the device (a sort and a prefix sum,
    no host sync), so each expert is decoded once per call."""

    @property
    def n_expert(self) -> int:
        return self.shape[0]

    def dequantize(self, experts: mx.array) -> mx.array:
        """Experts `experts` [U] as float32 [U, out, in]."""
        return self._decode(experts)

    def gather_matmul(self, x: mx.array, expert_ids: mx.array) -> mx.array:
        """Row m times each of its experts: y[m, j] = x[m] @ W[expert_ids[m, j]].T.

        Args:
            x: float [M, in], shared by a row's experts, or [M, k, in], one input per expert.
            expert_ids: int [M, k].

        Returns:
            float32 [M, k, out].
        """
        return kernels.lookup("gather_matmul", self.kind)(self, _f32(x), expert_ids)


def unique_experts(expert_ids: mx.array, n_expert: int) -> tuple[mx.array, mx.array]:
    """(experts [U], slots [M, k]) with expert_ids == experts[slots], U = min(M * k, n_expert)
    fixed by the shape. Computed on the device (sort, first occurrences, prefix sum); slots
    past the distinct count hold expert 0 and are never referenced."""
    M, k = expert_ids.shape
    if M == 1:
        return expert_ids.reshape(-1), iota(k).reshape(1, k)
    if M * k >= n_expert:
        return iota(n_expert), expert_ids
    flat = expert_ids.reshape(-1).astype(mx.int32)
    order = mx.argsort(flat)
    ranked = flat[order]
    first = mx.concatenate([mx.ones((1,), mx.int32), (ranked[1:] != ranked[:-1]).astype(mx.int32)])
    rank = mx.cumsum(first) - 1  # the slot of each sorted entry
    experts = mx.zeros((M * k,), mx.int32)
    experts[rank] = ranked
    slots = mx.zeros((M * k,), mx.int32)
    slots[order] = rank
    return experts, slots.reshape(M, k)


def _batch_index(batch: tuple[int, ...], shape: tuple[int, ...]) -> mx.array:
    """Indices into the flattened batch dims `batch` of a gathered product's lhs, broadcast to
    `shape` (given explicitly, so that MLX does not build them every step)."""
    return mx.broadcast_to(iota(int(np.prod(batch))).reshape(batch), shape)


# (row, expert) pairs from which a call outside the row-invariant widths (a prefill chunk) runs
# them sorted by expert: MLX then reads each expert's weights in one run (on the CPU, 1.7x faster
# for 128 rows of 6 experts through gather_mm, the same bits), as mlx-lm's SwitchGLU does.
SORT_MIN_PAIRS = 64


def _gather_matmul_reference(w: QuantExperts, x: mx.array, expert_ids: mx.array) -> mx.array:
    x = x[:, None, None, :] if x.ndim == 2 else x[:, :, None, :]  # [M, 1 or k, 1, in]
    lhs = _batch_index(x.shape[:2], expert_ids.shape)
    if w.bits is not None:
        rhs = expert_ids

        def product(lhs, rhs, sort):
            return mx.gather_qmm(x, w.w_q, w.scales, w.biases, lhs_indices=lhs, rhs_indices=rhs, transpose=True,
                                 group_size=GROUP_SIZE, bits=w.bits, sorted_indices=sort)
    else:
        experts, rhs = unique_experts(expert_ids, w.n_expert)
        weights = w.dequantize(experts).swapaxes(-1, -2)  # [U, in, out]

        def product(lhs, rhs, sort):
            return mx.gather_mm(x, weights, lhs_indices=lhs, rhs_indices=rhs, sorted_indices=sort)
    if kernels.rows_independent() or expert_ids.size < SORT_MIN_PAIRS:
        return product(lhs, rhs, False).squeeze(-2)
    order = mx.argsort(rhs.reshape(-1))
    y = product(lhs.reshape(-1)[order], rhs.reshape(-1)[order], True)  # [M * k, 1, out], by expert
    return y.squeeze(-2)[mx.argsort(order)].reshape(*expert_ids.shape, -1)


for _qt in SUPPORTED:
    kernels.register_reference("matmul", _matmul_reference, _qt.name)
    kernels.register_reference("grouped_matmul", _grouped_matmul_reference, _qt.name)
    kernels.register_reference("gather_matmul", _gather_matmul_reference, _qt.name)


# ---------------------------------------------------------------------------
# Activation quantization as ds4's CPU path does it (forward doc, kernel rounding), for bit-close
# comparison with the C engine: the CPU quantizes each activation row to int8 blocks before a
# quantized dot, so its products see q * d rather than x.


def int8_round_trip(x: mx.array, kind: str) -> mx.array:
    """Round activations x [..., n] through ds4's int8 block quantization.

    kind "q8_0": blocks of 32, d = amax / 127, q = round_half_even(x / d) in [-128, 127].
    kind "q8_k": blocks of 256, iscale = -127 / m where m is the block's largest-magnitude value
    with its sign, q = round_half_even(iscale * x) capped at 127, d = 1 / iscale.
    """
    block = 32 if kind == "q8_0" else 256
    b = x.astype(mx.float32).reshape(*x.shape[:-1], x.shape[-1] // block, block)
    if kind == "q8_0":
        d = mx.max(mx.abs(b), axis=-1, keepdims=True) / 127.0
        q = mx.clip(mx.round(b / mx.where(d == 0, 1.0, d)), -128, 127)
    else:
        at = mx.argmax(mx.abs(b), axis=-1, keepdims=True)
        m = mx.take_along_axis(b, at, axis=-1)
        iscale = -127.0 / mx.where(m == 0, 1.0, m)
        q = mx.minimum(mx.round(iscale * b), 127)
        d = mx.where(m == 0, 0.0, 1.0 / iscale)
    return (q * d).reshape(x.shape)


class ActQuantized:
    """A QuantWeight or QuantExperts whose inputs first go through `int8_round_trip`."""

    def __init__(self, inner, kind: str):
        self.inner, self.kind = inner, kind
        self.shape = inner.shape

    def __call__(self, x: mx.array) -> mx.array:
        return self.inner(int8_round_trip(x, self.kind))

    def grouped(self, x: mx.array) -> mx.array:
        return self.inner.grouped(int8_round_trip(x, self.kind))

    def gather_matmul(self, x: mx.array, expert_ids: mx.array) -> mx.array:
        return self.inner.gather_matmul(int8_round_trip(x, self.kind), expert_ids)
