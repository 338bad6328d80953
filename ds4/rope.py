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
from dataclasses import dataclass
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


def table_positions(ctx: int) -> int:
    """Positions the tables must cover for a context of `ctx` tokens."""
    return max(DEFAULT_POSITIONS, 1 << max(0, ctx - 1).bit_length())


@cache
def _row_tables(config: ModelConfig, compressed: bool, n_positions: int, dim: int) -> tuple[mx.array, mx.array]:
    """(hi, lo) tables float32 [n, dim, 2] of the row factors (cos_row, sin_row) for hi * 1024
    and for lo: the pass-through dims hold (1, 0), each rotated pair (cos, cos) and (-sin, sin)."""
    f = rope_inv_freq(config, compressed)
    head = dim - 2 * len(f)

    def table(pos: np.ndarray) -> mx.array:
        theta = pos[:, None].astype(np.float64) * f[None]
        cos = np.concatenate([np.ones((len(pos), head)), np.repeat(np.cos(theta), 2, axis=1)], axis=1)
        sin = np.concatenate([np.zeros((len(pos), head)), np.stack([-np.sin(theta), np.sin(theta)], 2).reshape(len(pos), -1)], axis=1)
        return mx.array(np.stack([cos, sin], axis=-1).astype(np.float32))

    n_hi = -(-n_positions >> LOW_BITS)
    return table(np.arange(n_hi) << LOW_BITS), table(np.arange(1 << LOW_BITS))


@dataclass(frozen=True)
class Rotation:
    """RoPE of rows at N positions as two row-wide factors [N, D]: the rotated row is
    x * cos_row + swap(x) * sin_row, where swap exchanges the two members of every pair.
    cos_row is 1 and sin_row 0 on the first D - n_rot dims (they pass through); on the tail
    cos_row repeats cos and sin_row holds (-sin, +sin) per pair. The factors come from the
    high and low position tables by the angle-addition formulas (the pair signs cancel in the
    sin * sin term): two gathers and one elementwise kernel; applying them is one more."""

    cos_row: mx.array
    sin_row: mx.array

    @classmethod
    def at(cls, config: ModelConfig, compressed: bool, positions: mx.array, dim: int,
           n_positions: int = DEFAULT_POSITIONS) -> Rotation:
        hi_table, lo_table = _row_tables(config, compressed, n_positions, dim)
        hi = hi_table[positions >> LOW_BITS]
        lo = lo_table[positions & ((1 << LOW_BITS) - 1)]
        ch, sh, cl, sl = hi[..., 0], hi[..., 1], lo[..., 0], lo[..., 1]
        return cls(ch * cl - sh * sl, sh * cl + ch * sl)

    def apply(self, x: mx.array, inverse: bool = False) -> mx.array:
        """Rotate rows x [N, (H,) D] (by -theta when `inverse`)."""
        c, s = self.cos_row, self.sin_row
        if x.ndim == c.ndim + 1:  # [N, H, D]: the same rotation for every head
            c, s = c[:, None, :], s[:, None, :]
        swapped = x.reshape(*x.shape[:-1], x.shape[-1] // 2, 2)[..., ::-1].reshape(x.shape)
        return x * c - swapped * s if inverse else x * c + swapped * s
