"""Compressed KV rows of DS4 Flash: the rolling compressors and the rows they emit.

Every token of a compressed layer projects the attn-normed input to a kv and a score vector
(score + ape[p mod ratio]). A row is emitted when a window of `ratio` tokens completes
((p + 1) mod ratio == 0): per dim, a softmax over the window's scores weights its kv values.
Ratio 4 pools overlapping windows: row k takes the first half of the dims from tokens
4k-4..4k-1 and the second half from tokens 4k..4k+3, 8 candidates per dim (positions before 0
do not count). The pooled row is RMS-normed, rotated at position ratio * k, and QAT-rounded
(FP8 for attention rows, Hadamard + FP4 for indexer rows) before it is cached.

A chunk of T tokens at device position p0 computes the rows of every window it can touch, a
fixed number for a given T: complete windows give the emitted rows, the others partial pools
that stay invisible (row k is visible to positions >= ratio * (k + 1) - 1) and are rewritten
when their window completes. So a chunk emits exactly what feeding its tokens one by one emits,
with shapes that do not depend on the position.
"""

from __future__ import annotations

import mlx.core as mx

from ds4.config import ModelConfig
from ds4.numerics import Numerics, index_row_qat, kv_row_qat, rms_norm
from ds4.rope import rope_angles, rope_tail
from ds4.state import Frontier, windows_touched

# Unfilled candidates score this instead of -inf: the weight is exactly 0 either way beside a
# filled one, and a window with no filled candidate yet pools to a finite (invisible) row.
UNFILLED_SCORE = -1e30


def projections(w_kv, w_gate, ape: mx.array, a: mx.array, positions: mx.array, ratio: int):
    """Per-token compressor inputs of a chunk: (kv, score + ape) [T, Wc]."""
    return w_kv(a), w_gate(a) + ape[positions % ratio]


def advance(frontier: Frontier, kv: mx.array, score: mx.array, n: int) -> Frontier:
    """The frontier after the first n rows of a chunk's projections."""
    R = frontier.kv.shape[0]
    return Frontier(mx.concatenate([frontier.kv, kv[:n]])[n:n + R],
                    mx.concatenate([frontier.score, score[:n]])[n:n + R])


def pool_windows(frontier: Frontier, kv: mx.array, score: mx.array, p0: mx.array, ratio: int) -> mx.array:
    """Pooled values [n_win, Wc / coff] of windows p0 // ratio ... for the chunk's projections
    kv, score [T, Wc] at positions p0.., over the frontier before it."""
    T, R = kv.shape[0], frontier.kv.shape[0]
    seq_kv = mx.concatenate([frontier.kv, kv])  # positions p0 - R .. p0 + T - 1
    seq_sc = mx.concatenate([frontier.score, score])
    n_win = windows_touched(T, ratio)
    offsets = mx.arange(-4, 4) if ratio == 4 else mx.arange(ratio)  # ratio 4: previous window, then current
    pos = (p0 // ratio + mx.arange(n_win))[:, None] * ratio + offsets[None]  # [n_win, C]
    idx = mx.minimum(pos - (p0 - R), R + T - 1)  # never below 0: the frontier reaches back far enough
    cand_kv, cand_sc = seq_kv[idx], seq_sc[idx]  # [n_win, C, Wc]
    if ratio == 4:
        half = kv.shape[1] // 2
        cand_kv = mx.concatenate([cand_kv[:, :4, :half], cand_kv[:, 4:, half:]], axis=1)
        cand_sc = mx.concatenate([cand_sc[:, :4, :half], cand_sc[:, 4:, half:]], axis=1)
    filled = ((pos >= 0) & (pos < p0 + T))[..., None]
    cand_sc = mx.where(filled, cand_sc, UNFILLED_SCORE)
    return mx.sum(mx.softmax(cand_sc, axis=1, precise=True) * cand_kv, axis=1)


def finish_rows(pooled: mx.array, norm: mx.array, config: ModelConfig, first_window: mx.array, ratio: int,
                indexer: bool, numerics: Numerics, n_positions: int) -> mx.array:
    """Cached rows from pooled values: RMSNorm, RoPE at each window's first position, then the
    QAT round-trip (FP8 on the non-RoPE dims for attention rows, Hadamard + FP4 for indexer
    rows) and f16 rounding."""
    positions = (first_window + mx.arange(pooled.shape[0])) * ratio
    cos, sin = rope_angles(config, True, positions, n_positions)
    c = rope_tail(rms_norm(pooled, norm, config.rms_eps), cos, sin)
    return index_row_qat(c, numerics) if indexer else kv_row_qat(c, c.shape[-1] - config.n_rot, numerics)


def emit(store: mx.array, frontier: Frontier, kv: mx.array, score: mx.array, p0: mx.array, norm: mx.array,
         config: ModelConfig, ratio: int, indexer: bool, numerics: Numerics, n_positions: int) -> mx.array:
    """Write the rows of every window the chunk touches into `store` [cap, width] (in place when
    the store is referenced only by this graph); returns the updated store."""
    first = p0 // ratio
    pooled = pool_windows(frontier, kv, score, p0, ratio)
    rows = finish_rows(pooled, norm, config, first, ratio, indexer, numerics, n_positions)
    return mx.slice_update(store, rows, first.reshape(1), axes=(0,))
