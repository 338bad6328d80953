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

from ds4.config import LayerKind, ModelConfig
from ds4.numerics import Numerics, index_row_qat, iota, kv_row_qat, rms_norm
from ds4.rope import Rotation
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


def pool_windows(frontier: Frontier, kv: mx.array, score: mx.array, p0: mx.array, kind: LayerKind) -> mx.array:
    """Pooled values [n_win, Wc / windows] of windows p0 // ratio ... for the chunk's
    projections kv, score [T, Wc] at positions p0.., over the frontier before it."""
    T, R, Wc, ratio = kv.shape[0], frontier.kv.shape[0], kv.shape[1], kind.ratio
    seq_kv = mx.concatenate([frontier.kv, kv])  # positions p0 - R .. p0 + T - 1
    seq_sc = mx.concatenate([frontier.score, score])
    n_win = windows_touched(T, ratio)
    if kind.windows == 2:  # the previous window's first-half dims, then the current window's second half
        offsets, width = iota(2 * ratio)[:, None] - ratio, Wc // 2
        dims = iota(width)[None, :] + (iota(2 * ratio)[:, None] >= ratio) * width  # [2 ratio, width]
    else:
        offsets, width, dims = iota(ratio)[:, None], Wc, iota(Wc)[None, :]
    pos = (p0 // ratio + iota(n_win))[:, None, None] * ratio + offsets[None]  # [n_win, C, 1]
    row = mx.minimum(pos - (p0 - R), R + T - 1)  # never below 0: the frontier reaches back far enough
    flat = row * Wc + dims[None]  # [n_win, C, width]: one gather per array, no slicing
    cand_kv, cand_sc = seq_kv.reshape(-1)[flat], seq_sc.reshape(-1)[flat]
    filled = (pos >= 0) & (pos < p0 + T)
    cand_sc = mx.where(filled, cand_sc, UNFILLED_SCORE)
    return mx.sum(mx.softmax(cand_sc, axis=1, precise=True) * cand_kv, axis=1)


def finish_rows(pooled: mx.array, norm: mx.array, config: ModelConfig, first_window: mx.array, ratio: int,
                indexer: bool, numerics: Numerics, n_positions: int) -> mx.array:
    """Cached rows from pooled values: RMSNorm, RoPE at each window's first position, then the
    QAT round-trip (FP8 on the non-RoPE dims for attention rows, Hadamard + FP4 for indexer
    rows) and f16 rounding."""
    positions = (first_window + iota(pooled.shape[0])) * ratio
    c = Rotation.at(config, True, positions, pooled.shape[-1], n_positions).apply(rms_norm(pooled, norm, config.rms_eps))
    return index_row_qat(c, numerics) if indexer else kv_row_qat(c, c.shape[-1] - config.n_rot, numerics)


def emit(store: mx.array, frontier: Frontier, kv: mx.array, score: mx.array, p0: mx.array, norm: mx.array,
         config: ModelConfig, kind: LayerKind, indexer: bool, numerics: Numerics, n_positions: int) -> mx.array:
    """Write the rows of every window the chunk touches into `store` [cap, width] (in place when
    the store is referenced only by this graph); returns the updated store."""
    first = p0 // kind.ratio
    pooled = pool_windows(frontier, kv, score, p0, kind)
    rows = finish_rows(pooled, norm, config, first, kind.ratio, indexer, numerics, n_positions)
    return mx.slice_update(store, rows, first.reshape(1), axes=(0,))
