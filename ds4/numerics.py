"""Numerical building blocks of the DS4 forward pass: the numeric options, RMSNorm, the QAT
round-trips (FP8 E4M3 on KV rows, Hadamard + FP4 E2M1 on indexer rows, f16 cache rounding) and
the deterministic top-k.

Every function here is elementwise or reduces along the last axis only, so a row's result never
depends on how many rows are computed with it (the row-invariance the decode, verify and prefill
paths rely on).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cache

import mlx.core as mx
import numpy as np

from ds4 import kernels
from ds4.config import FP8_BLOCK

FP8_MAX = 448.0
FP4_BLOCK = 32
FP4_MAX = 6.0
NEG_INF = float("-inf")


@dataclass(frozen=True)
class Numerics:
    """Numerical options of the forward pass.

    qat: the FP8/FP4 round-trips and f16 rounding of cache rows. They are part of the model's
        definition (DeepSeek trained with them) and on by default; off only to compare with an
        unrounded reference.
    act_quant: quantize activations to int8 blocks before quantized matmuls as ds4's CPU path
        does (Q8_0 before Q8_0 weights, Q8_K before routed experts), for bit-close comparison
        with the C engine. Off by default: it costs time and is not part of the model.
    straight_through: training only (ds4.train): the same values, identity gradients through
        the round-trips.
    """

    qat: bool = True
    act_quant: bool = False
    straight_through: bool = False


@cache
def iota(n: int, dtype=mx.int32) -> mx.array:
    """arange(n), evaluated once: a compiled step reads it as a constant instead of launching a
    kernel to fill it every step."""
    a = mx.arange(n, dtype=dtype)
    mx.eval(a)
    return a


def round_trip(x: mx.array, fn, numerics: Numerics) -> mx.array:
    """fn(x) where QAT is on; in training the straight-through estimator (value fn(x),
    gradient of the identity), since rounding has a zero gradient almost everywhere."""
    if not numerics.qat:
        return x
    if numerics.straight_through:
        return x + mx.stop_gradient(fn(x) - x)
    return fn(x)


def rms_norm(x: mx.array, weight: mx.array | None, eps: float) -> mx.array:
    """RMSNorm over the last axis (float32 sums; ds4's CPU sums squares in float64)."""
    return kernels.lookup("rms_norm")(x, weight, eps)


def _rms_norm_reference(x: mx.array, weight: mx.array | None, eps: float) -> mx.array:
    y = x * mx.rsqrt(mx.mean(mx.square(x), axis=-1, keepdims=True) + eps)
    return y if weight is None else y * weight


kernels.register_reference("rms_norm", _rms_norm_reference)
kernels.register("rms_norm", None, "any", lambda x, w, eps: mx.fast.rms_norm(x, w, eps))


def f16_round(x: mx.array) -> mx.array:
    return x.astype(mx.float16).astype(mx.float32)


def _exponent(x: mx.array) -> mx.array:
    """floor(log2(|x|)) of a positive normal float32, read exactly from the bits."""
    return ((x.view(mx.uint32) >> 23) & 0xFF).astype(mx.int32) - 127


def _pow2(e: mx.array) -> mx.array:
    """2^e exactly for int32 exponents in the normal float32 range (built from the bits)."""
    return ((e + 127).astype(mx.uint32) << 23).view(mx.float32)


def _pow2_ceil_scale(amax: mx.array, top: float) -> mx.array:
    """2^ceil(log2(amax / top)) exactly (a power of two: the 'ue8m0' block scale)."""
    y = amax / top
    e = _exponent(y) + ((y.view(mx.uint32) & 0x7FFFFF) != 0).astype(mx.int32)
    return _pow2(e)


def fp8_e4m3_round(v: mx.array) -> mx.array:
    """Round float32 values in [-448, 448] to the nearest E4M3FN value (ties to even)."""
    e = mx.maximum(_exponent(mx.maximum(mx.abs(v), 2.0 ** -6)), -6)  # subnormals share the 2^-6 binade
    step = _pow2(e - 3)
    return mx.round(v / step) * step


_FP4_MIDPOINTS = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)  # between consecutive E2M1 magnitudes
_FP4_LEVELS = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)


def fp4_e2m1_round(v: mx.array) -> mx.array:
    """Round float32 values in [-6, 6] to the nearest E2M1 value, ties to the even level index.

    Written as a chain of selects (no table gather) so that a compiled step fuses it."""
    a = mx.abs(v)
    mag = 0.0
    for i, m in enumerate(_FP4_MIDPOINTS):
        up = (a > m) | (a == m) if (i + 1) % 2 == 0 else a > m
        mag = mx.where(up, _FP4_LEVELS[i + 1], mag)
    return mx.where(v < 0, -mag, mag)


def _block_round_trip(x: mx.array, block: int, amax_floor: float, top: float, rounder) -> mx.array:
    """Round-trip rows x [..., n] in blocks along the last axis, each with a power-of-two scale
    2^ceil(log2(amax / top)) (amax floored at `amax_floor`): rounder(clip(x/scale)) * scale."""
    blocks = x.reshape(*x.shape[:-1], x.shape[-1] // block, block)
    amax = mx.maximum(mx.max(mx.abs(blocks), axis=-1, keepdims=True), amax_floor)
    scale = _pow2_ceil_scale(amax, top)
    return (rounder(mx.clip(blocks / scale, -top, top)) * scale).reshape(x.shape)


def fp8_round_trip(x: mx.array, n_dims: int) -> mx.array:
    """FP8 E4M3 round-trip of the first `n_dims` dims of rows x [..., D] in blocks of 64, each with
    a power-of-two scale; the remaining (RoPE) dims pass through."""
    if n_dims == 0:
        return x
    D = x.shape[-1]
    if D % FP8_BLOCK:
        head = _block_round_trip(x[..., :n_dims], FP8_BLOCK, 1e-4, FP8_MAX, fp8_e4m3_round)
        return mx.concatenate([head, x[..., n_dims:]], axis=-1)
    # Whole rows in blocks (n_dims is a multiple of the block), then keep the tail as it was:
    # a select instead of a slice and a concatenation.
    rounded = _block_round_trip(x, FP8_BLOCK, 1e-4, FP8_MAX, fp8_e4m3_round)
    return mx.where(iota(D) < n_dims, rounded, x)


@cache
def hadamard_matrix(n: int) -> mx.array:
    """The Walsh-Hadamard matrix in Sylvester (natural) order, scaled by 1/sqrt(n), float32."""
    h = np.array([[1.0]])
    while h.shape[0] < n:
        h = np.block([[h, h], [h, -h]])
    return mx.array((h / math.sqrt(n)).astype(np.float32))


def hadamard_fp4_round_trip(x: mx.array) -> mx.array:
    """Walsh-Hadamard rotation (scaled 1/sqrt(n)) of rows x [..., n], then an FP4 E2M1 round-trip
    in blocks of 32 with power-of-two scales (the indexer's q and key rows)."""
    rotated = kernels.matmul_rows(x, hadamard_matrix(x.shape[-1]))
    return _block_round_trip(rotated, FP4_BLOCK, 7.05e-38, FP4_MAX, fp4_e2m1_round)


def kv_row_qat(rows: mx.array, n_nope: int, numerics: Numerics) -> mx.array:
    """What a KV row goes through before it is cached: FP8 on the non-RoPE dims, f16 rounding."""
    return round_trip(rows, lambda r: f16_round(fp8_round_trip(r, n_nope)), numerics)


def index_qat(x: mx.array, numerics: Numerics) -> mx.array:
    """The indexer's Hadamard + FP4 round-trip (q rows; they stay float32)."""
    return round_trip(x, hadamard_fp4_round_trip, numerics)


def index_row_qat(x: mx.array, numerics: Numerics) -> mx.array:
    """An indexer key row before it is cached: Hadamard + FP4, then f16 rounding."""
    return round_trip(x, lambda r: f16_round(hadamard_fp4_round_trip(r)), numerics)


def topk_lowest_index(scores: mx.array, k: int) -> mx.array:
    """Indices of the k largest scores along the last axis, ties to the lower index (as ds4's
    CPU selection does), sorted ascending. scores: float32 [..., N], k <= N."""
    n = scores.shape[-1]
    # An order-preserving integer key for float32 (ints compare like the floats), then the index
    # breaks ties: key * N + (N - 1 - i) is unique and larger for lower indices.
    bits = scores.view(mx.int32).astype(mx.int64)
    key = mx.where(bits < 0, -(bits & 0x7FFFFFFF) - 1, bits)
    key = key * n + (n - 1 - iota(n, mx.int64))
    idx = mx.argpartition(-key, kth=k - 1, axis=-1)[..., :k]
    return mx.stop_gradient(mx.sort(idx, axis=-1))  # a choice: no gradient flows through it
