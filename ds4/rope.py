"""RoPE / YaRN of DS4 Flash, with the angles built on the device from device positions.

Only the last n_rot dims of a head rotate, in interleaved pairs (x[2k], x[2k+1]) (GPT-J style).
Sliding-window layers and the MTP block use base 10000 without scaling; compressed layers base
160000 with YaRN (factor 16, betas 32/1, original context 65536) and magnitude 1. The attention
softmax scale is never corrected.

cos/sin of p * f_k come from two small tables built in float64 on the host: angles of the high
part of p (multiples of 1024) and of the low part, combined on the device by the angle-addition
formulas. A step therefore needs only its positions as a device array (no host tables per
position, no shape that depends on the position), and the values agree with the float64
angles to a few float32 ulps at any position up to the table size.
"""

from __future__ import annotations

import math
from functools import cache

import mlx.core as mx
import numpy as np

from ds4.config import ModelConfig

LOW_BITS = 10  # positions split as hi * 1024 + lo
DEFAULT_POSITIONS = 1 << 20  # tables cover DS4 Flash's 1M context; larger contexts grow them


@cache
def rope_inv_freq(config: ModelConfig, compressed: bool) -> np.ndarray:
    """Angle per position of each rotated pair, float64 [n_rot // 2]."""
    n = config.n_rot
    base = config.compress_rope_freq_base if compressed else config.rope_freq_base
    freq = base ** (-np.arange(0, n, 2, dtype=np.float64) / n)
    if not compressed:
        return freq

    def corr(beta: float) -> float:
        return n * math.log(config.rope_orig_ctx / (2 * math.pi * beta)) / (2 * math.log(base))

    low = max(0, math.floor(corr(config.yarn_beta_fast)))
    high = min(n - 1, math.ceil(corr(config.yarn_beta_slow)))
    k = np.arange(n // 2, dtype=np.float64)
    gamma = 1.0 - np.clip((k - low) / max(0.001, high - low), 0.0, 1.0)
    return freq * (gamma + (1.0 - gamma) / config.rope_scale_factor)


@cache
def _tables(config: ModelConfig, compressed: bool, n_positions: int) -> tuple[mx.array, mx.array]:
    """(hi, lo) tables float32 [n, n_rot // 2, 2] of (cos, sin) for hi * 1024 and for lo."""
    f = rope_inv_freq(config, compressed)
    n_hi = -(-n_positions >> LOW_BITS)

    def table(pos: np.ndarray) -> mx.array:
        theta = pos[:, None].astype(np.float64) * f[None]
        return mx.array(np.stack([np.cos(theta), np.sin(theta)], axis=-1).astype(np.float32))

    return table(np.arange(n_hi) << LOW_BITS), table(np.arange(1 << LOW_BITS))


def table_positions(ctx: int) -> int:
    """Positions the tables must cover for a context of `ctx` tokens."""
    return max(DEFAULT_POSITIONS, 1 << max(0, ctx - 1).bit_length())


def rope_angles(config: ModelConfig, compressed: bool, positions: mx.array,
                n_positions: int = DEFAULT_POSITIONS) -> tuple[mx.array, mx.array]:
    """cos, sin float32 [N, n_rot // 2] for int32 positions [N] (0 <= p < n_positions)."""
    hi_table, lo_table = _tables(config, compressed, n_positions)
    hi = hi_table[positions >> LOW_BITS]
    lo = lo_table[positions & ((1 << LOW_BITS) - 1)]
    ch, sh, cl, sl = hi[..., 0], hi[..., 1], lo[..., 0], lo[..., 1]
    return ch * cl - sh * sl, sh * cl + ch * sl


def rope_tail(x: mx.array, cos: mx.array, sin: mx.array, inverse: bool = False) -> mx.array:
    """Rotate the last n_rot dims of x [T, (H,) D] in interleaved pairs; cos/sin [T, n_rot/2].
    `inverse` rotates by -theta."""
    n_rot = cos.shape[-1] * 2
    if x.ndim == cos.ndim + 1:  # [T, H, D]: broadcast over heads
        cos, sin = cos[:, None, :], sin[:, None, :]
    if inverse:
        sin = -sin
    head, tail = x[..., :-n_rot], x[..., -n_rot:]
    pairs = tail.reshape(*tail.shape[:-1], n_rot // 2, 2)
    x0, x1 = pairs[..., 0], pairs[..., 1]
    rotated = mx.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], axis=-1).reshape(tail.shape)
    return mx.concatenate([head, rotated], axis=-1)
