"""Numpy reference codecs for the GGML block types found in ds4 GGUF files.

Dequantization is gguf-py's (`gguf.quants.dequantize`): that code is the spec every other
path (MLX ops in `ds4.quant`, Metal kernels) is tested against bit for bit.

Quantization is ours, vectorized numpy for Q4_K, Q2_K and IQ2_XXS (gguf-py has none for them),
gguf-py's for Q8_0. It is good enough to write test models, not a replacement for llama.cpp's
importance-weighted quantizers. Inputs are clipped to the largest magnitude a format can
hold (its f16 super-scale times its largest code), so finite inputs never give inf or NaN.

This module imports no MLX, so it runs wherever numpy does.
"""

from __future__ import annotations

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf import quants as gguf_quants

from ds4.errors import QuantError

QT = GGMLQuantizationType

QUANTIZABLE = (QT.F32, QT.F16, QT.Q8_0, QT.Q2_K, QT.Q4_K, QT.IQ2_XXS)
RANDOM_BLOCK_TYPES = (QT.Q8_0, QT.Q2_K, QT.Q4_K, QT.IQ2_XXS)

F16_MAX = 65504.0
# Blocks per numpy chunk: keeps the per-candidate temporaries inside a few MB.
_CHUNK_BLOCKS = 8192


def row_bytes(qtype: QT, n_elems: int) -> int:
    """Bytes taken by one row of `n_elems` elements of type `qtype`."""
    block, type_size = GGML_QUANT_SIZES[QT(qtype)]
    if n_elems % block:
        raise QuantError(f"{QT(qtype).name}: row of {n_elems} elements is not a multiple of the block size {block}")
    return n_elems // block * type_size


def dequantize(data: np.ndarray, qtype: QT) -> np.ndarray:
    """Decode `data` (uint8 [..., row_bytes], or a typed F16/F32/I32 array) to float32 [..., n]."""
    qtype = QT(qtype)
    if qtype == QT.I32:
        # Exact for |v| < 2**24, which covers the token and expert ids ds4 stores as I32.
        return data.view(np.int32).astype(np.float32)
    try:
        return np.asarray(gguf_quants.dequantize(data, qtype), dtype=np.float32)
    except NotImplementedError:
        raise QuantError(f"no dequantizer for {qtype.name}") from None


def quantize(x: np.ndarray, qtype: QT) -> np.ndarray:
    """Encode float32 `x` [..., n] as `qtype` bytes, uint8 [..., row_bytes(qtype, n)]."""
    qtype = QT(qtype)
    x = np.asarray(x, dtype=np.float32)
    if x.ndim == 0:
        raise QuantError(f"{qtype.name}: cannot quantize a scalar")
    if qtype == QT.F32:
        return np.ascontiguousarray(x).view(np.uint8)
    if qtype == QT.F16:
        return np.clip(x, -F16_MAX, F16_MAX).astype(np.float16).view(np.uint8)
    if qtype not in _BLOCK_QUANTIZERS:
        raise QuantError(f"no quantizer for {qtype.name}, expected one of {[t.name for t in QUANTIZABLE]}")
    if not np.isfinite(x).all():
        raise QuantError(f"{qtype.name}: cannot quantize non-finite values")
    block, type_size = GGML_QUANT_SIZES[qtype]
    out_shape = (*x.shape[:-1], row_bytes(qtype, x.shape[-1]))
    blocks = np.clip(x, -_LIMITS[qtype], _LIMITS[qtype]).reshape(-1, block)
    # No format here steps finer than 2**-24 (f16 subnormal d times its smallest factor), so
    # values below 2**-32 read as zero; flushing them keeps the scale searches free of overflow.
    blocks = np.where(np.abs(blocks) < 2.0**-32, np.float32(0), blocks)
    out = np.empty((blocks.shape[0], type_size), dtype=np.uint8)
    fn = _BLOCK_QUANTIZERS[qtype]
    for b0 in range(0, blocks.shape[0], _CHUNK_BLOCKS):
        out[b0 : b0 + _CHUNK_BLOCKS] = fn(blocks[b0 : b0 + _CHUNK_BLOCKS])
    return out.reshape(out_shape)


# ---------------------------------------------------------------------------
# Shared helpers.


def _f16(x: np.ndarray) -> np.ndarray:
    """Round to f16, saturating instead of overflowing to inf."""
    return np.minimum(x, F16_MAX).astype(np.float16)


def _f16_bytes(x: np.ndarray) -> np.ndarray:
    """f16 values [n] as their little-endian bytes [n, 2]."""
    return x.astype("<f2").view(np.uint8).reshape(-1, 2)


def _safe_div(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """a / b, with 0 where b == 0."""
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        return np.where(b != 0, a / np.where(b != 0, b, 1), 0).astype(np.float32)


def _fit_scale_min(x: np.ndarray, nmax: int, n_cand: int = 7) -> tuple[np.ndarray, np.ndarray]:
    """Per sub-block (last axis) scale s >= 0 and min m >= 0 with x ~ s*q - m, q in 0..nmax.

    Tries `n_cand` quantization steps between (hi-lo)/(nmax-1) and (hi-lo)/(nmax+1) around
    the plain min/max step, refits (s, m) by least squares for each code assignment and keeps
    the one with the smallest squared error (llama.cpp's make_qkx2_quants, vectorized).
    """
    lo = np.minimum(x.min(axis=-1, keepdims=True), 0)
    hi = x.max(axis=-1, keepdims=True)
    n = np.float32(x.shape[-1])
    sx = x.sum(axis=-1)
    sxx = (x * x).sum(axis=-1)
    best_err = np.full(x.shape[:-1], np.inf, dtype=np.float32)
    best_s = np.zeros(x.shape[:-1], dtype=np.float32)
    best_m = np.zeros(x.shape[:-1], dtype=np.float32)
    for delta in np.linspace(-1.0, 1.0, n_cand, dtype=np.float32):
        iscale = _safe_div(nmax + delta, hi - lo)
        q = np.clip(np.rint((x - lo) * iscale), 0, nmax)
        sq, sqq, sqx = q.sum(axis=-1), (q * q).sum(axis=-1), (q * x).sum(axis=-1)
        det = n * sqq - sq * sq
        s = _safe_div(n * sqx - sq * sx, det)
        b = _safe_div(sqq * sx - sq * sqx, det)
        # The format needs m = -b >= 0; refit the scale alone where the free fit wants b > 0.
        pos = b > 0
        s = np.where(pos, _safe_div(sqx, sqq), s)
        b = np.where(pos, 0, b)
        s = np.maximum(s, 0)
        err = sxx - 2 * s * sqx - 2 * b * sx + s * s * sqq + 2 * s * b * sq + n * b * b
        better = err < best_err
        best_err = np.where(better, err, best_err)
        best_s = np.where(better, s, best_s)
        best_m = np.where(better, -b, best_m)
    return best_s, best_m


def _quantize_scales(s: np.ndarray, nmax_code: int) -> tuple[np.ndarray, np.ndarray]:
    """Sub-block scales s [N, n_sub] -> (f16 super-scale [N], codes [N, n_sub] in 0..nmax_code)."""
    d = _f16(s.max(axis=-1) / nmax_code)
    codes = np.clip(np.rint(_safe_div(s, d.astype(np.float32)[:, None])), 0, nmax_code)
    return d, codes.astype(np.uint8)


def _codes_for(x: np.ndarray, scale: np.ndarray, mins: np.ndarray, nmax: int) -> np.ndarray:
    """Nearest codes q in 0..nmax for x ~ scale*q - mins (scale, mins broadcast over x)."""
    return np.clip(np.rint(_safe_div(x + mins, scale)), 0, nmax).astype(np.uint8)


# ---------------------------------------------------------------------------
# Q8_0: 32 elements, 34 bytes.
#
#   [ d: f16 ][ qs[32]: int8 ]          w = d * qs[i]


def _quantize_q8_0(blocks: np.ndarray) -> np.ndarray:
    return gguf_quants.quantize(blocks, QT.Q8_0)


# ---------------------------------------------------------------------------
# Q2_K: 256 elements, 84 bytes; 16 sub-blocks of 16.
#
#   [ scales[16] ][ qs[64] ][ d: f16 ][ dmin: f16 ]
#   scales[j] = mmmm ssss              (4-bit min code, 4-bit scale code of sub-block j)
#   qs[32n + l] = q(128n+96+l) q(128n+64+l) q(128n+32+l) q(128n+l)    (2 bits each, high to low)
#   w = d * s_j * q - dmin * m_j


def _k_quant(x: np.ndarray, nmax: int, code_max: int):
    """The shared part of Q2_K and Q4_K: per sub-block scale and min ([N, S, L] input), both
    quantized to `code_max`-level codes under an f16 super-block d / dmin, then the element codes.
    Returns (d, scale codes, dmin, min codes, element codes [N, S, L])."""
    s, m = _fit_scale_min(x, nmax=nmax)
    d, sc = _quantize_scales(s, code_max)
    dmin, mc = _quantize_scales(m, code_max)
    scale = d.astype(np.float32)[:, None] * sc
    mins = dmin.astype(np.float32)[:, None] * mc
    return d, sc, dmin, mc, _codes_for(x, scale[..., None], mins[..., None], nmax)


def _quantize_q2_k(blocks: np.ndarray) -> np.ndarray:
    N = blocks.shape[0]
    d, sc, dmin, mc, q = _k_quant(blocks.reshape(N, 16, 16), nmax=3, code_max=15)  # q [N, 16, 16]
    q = q.reshape(N, 2, 4, 32)  # [N, half n, shift k, l]
    qs = q[:, :, 0] | (q[:, :, 1] << 2) | (q[:, :, 2] << 4) | (q[:, :, 3] << 6)
    return np.concatenate([sc | (mc << 4), qs.reshape(N, 64), _f16_bytes(d), _f16_bytes(dmin)], axis=1)


# ---------------------------------------------------------------------------
# Q4_K: 256 elements, 144 bytes; 8 sub-blocks of 32.
#
#   [ d: f16 ][ dmin: f16 ][ scales[12] ][ qs[128] ]
#   scales (6-bit sc_j, m_j):
#      0..3   hh SSSSSS   = sc[0..3] low 6 bits, top 2 bits of sc[4..7]
#      4..7   hh MMMMMM   = m[0..3] low 6 bits, top 2 bits of m[4..7]
#      8..11  mmmm ssss   = low 4 bits of m[4..7] and sc[4..7]
#   qs[32i + l] = q(64i+32+l) << 4 | q(64i+l)      (sub-block 2i in the low nibble)
#   w = d * sc_j * q - dmin * m_j


def _pack_q4_k_scales(sc: np.ndarray, mc: np.ndarray) -> np.ndarray:
    lo_sc, hi_sc = sc[:, :4], sc[:, 4:]
    lo_m, hi_m = mc[:, :4], mc[:, 4:]
    return np.concatenate(
        [lo_sc | ((hi_sc >> 4) << 6), lo_m | ((hi_m >> 4) << 6), (hi_sc & 0xF) | ((hi_m & 0xF) << 4)], axis=1
    )


def _quantize_q4_k(blocks: np.ndarray) -> np.ndarray:
    N = blocks.shape[0]
    d, sc, dmin, mc, q = _k_quant(blocks.reshape(N, 8, 32), nmax=15, code_max=63)
    q = q.reshape(N, 4, 2, 32)
    qs = q[:, :, 0] | (q[:, :, 1] << 4)
    return np.concatenate([_f16_bytes(d), _f16_bytes(dmin), _pack_q4_k_scales(sc, mc), qs.reshape(N, 128)], axis=1)


# ---------------------------------------------------------------------------
# IQ2_XXS: 256 elements, 66 bytes; 8 groups of 32, each 4 sub-groups of 8.
#
#   [ d: f16 ][ group 0: 8 bytes ] ... [ group 7: 8 bytes ]
#   group g:  [ a0 a1 a2 a3 ][ u32 s ]       a_t: grid index of sub-group t (u8)
#   s = llll 6666666 5555555 4444444 3333333  (bits 31..0: 4-bit ls, then 7-bit sign indices t=3..0)
#   w(32g + 8t + j) = d * (0.5 + ls) / 4 * grid[a_t][j] * (-1 if ksigns[sign_t] bit j else +1)
#   grid entries are 8-vectors over {8, 25, 43}; ksigns[i] = i | parity(i) << 7, so every
#   sub-group has an even number of negatives.

_GRID_LEVELS = np.array([8.0, 25.0, 43.0], dtype=np.float32)
_IQ2_NEIGHBOURS = 8  # grid entries tried per sub-group (8: error within 1% of a full scan)
_IQ2_SCALE_STEPS = (0.6, 0.75, 0.9)  # x max|x|/43; more steps gain <0.2% error


def _iq2_grid() -> np.ndarray:
    """The 256 x 8 IQ2_XXS grid as float32 (gguf-py's table, unpacked)."""
    gguf_quants.IQ2_XXS.init_grid()
    return gguf_quants.IQ2_XXS.grid.reshape(256, 8).astype(np.float32)


_IQ2_CACHE: dict[str, np.ndarray] = {}


def _iq2_tables() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Search tables for the nearest-grid lookup, built once.

    For each of the 3**8 per-element level patterns: its K nearest grid entries (index
    [6561, K], values [6561, K, 8], squared norms [6561, K]). A sub-group snaps each element to
    its nearest level and compares only that pattern's candidates, not all 256 entries.
    """
    if not _IQ2_CACHE:
        grid = _iq2_grid()
        digits = (np.arange(3**8)[:, None] // (3 ** np.arange(8))[None, :]) % 3
        patterns = _GRID_LEVELS[digits]  # [6561, 8]
        dist = ((patterns[:, None, :] - grid[None, :, :]) ** 2).sum(-1)  # [6561, 256]
        cand = np.argsort(dist, axis=1, kind="stable")[:, :_IQ2_NEIGHBOURS].astype(np.int32)
        _IQ2_CACHE.update(grid=grid, cand=cand, cand_grid=grid[cand], cand_norm=(grid[cand] ** 2).sum(-1))
    c = _IQ2_CACHE
    return c["grid"], c["cand"], c["cand_grid"], c["cand_norm"]


def _iq2_nearest(u: np.ndarray) -> np.ndarray:
    """Index of the grid entry nearest to each scaled target u [n, 8] -> [n]."""
    _, cand, cand_grid, cand_norm = _iq2_tables()
    level = (u > 16.5).astype(np.int32) + (u > 34.0)  # nearest of 8, 25, 43 per element
    pattern = level @ (3 ** np.arange(8, dtype=np.int32))
    # |g - u|^2 = |g|^2 - 2 g.u + |u|^2, the last term the same for every candidate.
    err = cand_norm[pattern] - 2 * np.einsum("nkj,nj->nk", cand_grid[pattern], u)
    return cand[pattern, err.argmin(-1)]


def _iq2_signs(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sign bits for sub-groups x [..., 8] with an even count of negatives, and the targets t.

    Where x has an odd number of negatives the smallest |x| gets the wrong sign; its target
    becomes -|x|, so the nearest-grid search gives it the smallest level.
    """
    neg = x < 0
    odd = neg.sum(-1) % 2 == 1
    flip = (np.arange(8) == np.abs(x).argmin(-1)[..., None]) & odd[..., None]
    bits = neg ^ flip
    t = np.where(flip, -np.abs(x), np.abs(x))
    return bits, t


def _quantize_iq2_xxs(blocks: np.ndarray) -> np.ndarray:
    N = blocks.shape[0]
    grid = _iq2_tables()[0]
    bits, t = _iq2_signs(blocks.reshape(N, 8, 4, 8))
    t = t.reshape(N, 8, 32)
    amax = np.abs(t).max(-1)  # [N, 8]

    def snap(db):  # grid entries [N, 8, 32] for group scales db [N, 8]
        idx = _iq2_nearest((t * _safe_div(1, db)[..., None]).reshape(-1, 8))
        return idx.reshape(N, 8, 4), grid[idx].reshape(N, 8, 32)

    # Group scale: the best of a few candidates mapping max|x| near the top level 43, each
    # refit by least squares once its grid entries are chosen.
    best_err = np.full((N, 8), np.inf, dtype=np.float32)
    best_db = np.zeros((N, 8), dtype=np.float32)
    for f in _IQ2_SCALE_STEPS:
        _, g = snap(amax * np.float32(f / 43.0))
        fit = np.maximum(_safe_div((g * t).sum(-1), (g * g).sum(-1)), 0)
        err = ((g * fit[..., None] - t) ** 2).sum(-1)
        better = err < best_err
        best_err = np.where(better, err, best_err)
        best_db = np.where(better, fit, best_db)

    # db = d * (0.5 + ls) / 4 with ls in 0..15: the largest group takes ls = 15.
    d = _f16(best_db.max(-1) * np.float32(4 / 15.5))
    d32 = d.astype(np.float32)[:, None]
    ls = np.clip(np.rint(_safe_div(4 * best_db, d32) - 0.5), 0, 15).astype(np.uint32)
    idx, _ = snap(d32 * (np.float32(0.5) + ls) * np.float32(0.25))

    sign_idx = (bits[..., :7] << np.arange(7)).sum(-1).astype(np.uint32)  # [N, 8, 4]
    s = (sign_idx << (7 * np.arange(4, dtype=np.uint32))).sum(-1, dtype=np.uint32) | (ls << 28)
    groups = np.concatenate([idx.astype(np.uint8), s.astype("<u4")[..., None].view(np.uint8)], axis=-1)
    return np.concatenate([_f16_bytes(d), groups.reshape(N, 64)], axis=1)


_BLOCK_QUANTIZERS = {
    QT.Q8_0: _quantize_q8_0,
    QT.Q2_K: _quantize_q2_k,
    QT.Q4_K: _quantize_q4_k,
    QT.IQ2_XXS: _quantize_iq2_xxs,
}

# Largest |w| each format can hold: f16 super-scale times the largest code it multiplies.
_LIMITS = {
    QT.Q8_0: F16_MAX * 127,
    QT.Q2_K: F16_MAX * 15 * 3,
    QT.Q4_K: F16_MAX * 63 * 15,
    QT.IQ2_XXS: F16_MAX * 15.5 / 4 * 43,
}


# ---------------------------------------------------------------------------
# Random blocks for synthetic giant tensors.


def random_blocks(rng: np.random.Generator, qtype: QT, n_blocks: int, target_std: float) -> np.ndarray:
    """Random valid `qtype` blocks, uint8 [n_blocks, type_size], whose values have mean ~0 and
    std ~target_std.

    Codes are random bytes; the f16 super-scales are set so every sub-block is centred
    (for the K types the min code equals the scale code and dmin = d * nmax / 2) and the
    expected mean square matches target_std**2. Each block's d is spread by x0.75..x1.25 so
    blocks differ.
    """
    qtype = QT(qtype)
    if qtype not in RANDOM_BLOCK_TYPES:
        raise QuantError(f"no random blocks for {qtype.name}, expected one of {[t.name for t in RANDOM_BLOCK_TYPES]}")
    _, type_size = GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, size=(n_blocks, type_size), dtype=np.uint8)
    spread = rng.uniform(0.75, 1.25, size=n_blocks).astype(np.float32)
    # E[spread**2] = 1 + 0.5**2 / 12.
    d = np.float32(target_std / np.sqrt(_unit_mean_square(qtype) * (1 + 0.25 / 12))) * spread
    if qtype == QT.Q8_0:
        q = raw[:, 2:].view(np.int8)
        q[q == -128] = 0  # codes -127..127 (0 twice as likely): a symmetric, zero-mean set
        raw[:, 0:2] = _f16_bytes(_f16(d))
    elif qtype == QT.Q2_K:
        sc = raw[:, :16] & 0xF
        raw[:, :16] = sc | (sc << 4)
        raw[:, 80:82] = _f16_bytes(_f16(d))
        raw[:, 82:84] = _f16_bytes(_f16(d * np.float32(1.5)))
    elif qtype == QT.Q4_K:
        sc = raw[:, :8] & 0x3F
        raw[:, 4:16] = _pack_q4_k_scales(sc, sc)
        raw[:, 0:2] = _f16_bytes(_f16(d))
        raw[:, 2:4] = _f16_bytes(_f16(d * np.float32(7.5)))
    else:  # IQ2_XXS: signs are symmetric, so any bytes are centred.
        raw[:, 0:2] = _f16_bytes(_f16(d))
    return raw


def _unit_mean_square(qtype: QT) -> float:
    """E[w**2] of random blocks built as above with d = 1."""
    if qtype == QT.Q8_0:  # d * q, q uniform over the 256 bytes with -128 read as 0
        q = np.arange(-127, 128, dtype=np.float64)
        return float((q**2).sum() / 256)
    if qtype == QT.Q2_K:  # d * sc * (q - 1.5), sc uniform 0..15, q uniform 0..3
        sc, q = np.arange(16.0), np.arange(4.0)
        return float((sc**2).mean() * ((q - 1.5) ** 2).mean())
    if qtype == QT.Q4_K:  # d * sc * (q - 7.5), sc uniform 0..63, q uniform 0..15
        sc, q = np.arange(64.0), np.arange(16.0)
        return float((sc**2).mean() * ((q - 7.5) ** 2).mean())
    # IQ2_XXS: d * (0.5 + ls) / 4 * grid value, ls uniform 0..15, grid entry uniform.
    ls = np.arange(16.0)
    return float((((0.5 + ls) / 4) ** 2).mean() * (_iq2_grid().astype(np.float64) ** 2).mean())
