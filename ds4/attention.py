"""Attention of DS4 Flash in MLX: RoPE/YaRN, the QAT round-trips, compressors, the lightning
indexer, and attention with sinks over raw and compressed rows (forward doc §5, §10.2).

Everything here works on a chunk of T consecutive tokens at positions p0..p0+T-1 (T = 1 is a
decode step); a chunk gives exactly what feeding its tokens one at a time gives (doc §9): the
raw window, compressor emissions and indexer choices are per token, in position order. Decode
and multi-row (verify, prefill) batches therefore share one attention policy (the #915 lesson).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cache

import mlx.core as mx
import numpy as np

from ds4.config import FP8_BLOCK, ModelConfig

@dataclass(frozen=True)
class Numerics:
    """Numerical options of the forward pass.

    qat: the FP8/FP4 round-trips and f16 rounding of cache rows (§10.2). They are part of the
        model's definition and on by default; off only to compare with an unrounded reference.
    act_quant: quantize activations to int8 blocks before quantized matmuls as ds4's CPU path
        does (Q8_0 before Q8_0 weights, Q8_K before routed experts), for bit-close comparison
        with the C engine. Off by default: it costs time and is not part of the model.
    straight_through: training only (ds4.train): the same values, identity gradients through
        the round-trips.
    """

    qat: bool = True
    act_quant: bool = False
    straight_through: bool = False  # training: round-trips pass gradients through unchanged


def _round_trip(x: mx.array, fn, numerics: Numerics) -> mx.array:
    """fn(x) where QAT is on; in training the straight-through estimator (value fn(x),
    gradient of the identity), since rounding has a zero gradient almost everywhere."""
    if not numerics.qat:
        return x
    if numerics.straight_through:
        return x + mx.stop_gradient(fn(x) - x)
    return fn(x)


FP8_MAX = 448.0
FP4_BLOCK = 32
FP4_MAX = 6.0
NEG_INF = float("-inf")


# -- RoPE / YaRN (§5.3) ----------------------------------------------------------------------

@cache
def rope_inv_freq(config: ModelConfig, compressed: bool) -> np.ndarray:
    """Angle per position of each rotated pair, float64 [n_rot // 2].

    Uncompressed layers (and the MTP block): base 10000, no scaling. Compressed layers: base
    160000 with YaRN (factor 16, betas 32/1, original context 65536), magnitude 1.
    """
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


def rope_cos_sin(config: ModelConfig, compressed: bool, positions: np.ndarray) -> tuple[mx.array, mx.array]:
    """cos, sin float32 [len(positions), n_rot // 2], angles computed in float64."""
    theta = np.asarray(positions, dtype=np.float64)[:, None] * rope_inv_freq(config, compressed)[None]
    return mx.array(np.cos(theta).astype(np.float32)), mx.array(np.sin(theta).astype(np.float32))


def rope_tail(x: mx.array, cos: mx.array, sin: mx.array, inverse: bool = False) -> mx.array:
    """Rotate the last n_rot dims of x [..., T, (H,) D] in interleaved pairs (x[2k], x[2k+1]).

    cos/sin are [T, n_rot/2]; `x` may have a head axis after T. `inverse` rotates by -theta.
    """
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


# -- QAT round-trips (§10.2) -------------------------------------------------------------------

def _exponent(x: mx.array) -> mx.array:
    """floor(log2(|x|)) of a positive normal float32, read exactly from the bits."""
    return ((x.view(mx.uint32) >> 23) & 0xFF).astype(mx.int32) - 127


def _pow2_ceil_scale(amax: mx.array, top: float) -> mx.array:
    """2^ceil(log2(amax / top)) exactly (a power of two: the 'ue8m0' block scale)."""
    y = amax / top
    bits = y.view(mx.uint32)
    e = _exponent(y) + ((bits & 0x7FFFFF) != 0).astype(mx.int32)
    return mx.power(mx.array(2.0, mx.float32), e.astype(mx.float32))


def fp8_e4m3_round(v: mx.array) -> mx.array:
    """Round float32 values in [-448, 448] to the nearest E4M3FN value (ties to even)."""
    a = mx.abs(v)
    e = mx.maximum(_exponent(mx.maximum(a, 2.0 ** -6)), -6)  # subnormals share the 2^-6 binade
    step = mx.power(mx.array(2.0, mx.float32), (e - 3).astype(mx.float32))
    return mx.round(v / step) * step


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
    head = _block_round_trip(x[..., :n_dims], FP8_BLOCK, 1e-4, FP8_MAX, fp8_e4m3_round)
    return mx.concatenate([head, x[..., n_dims:]], axis=-1)


_FP4_MIDPOINTS = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)  # between consecutive E2M1 magnitudes
_FP4_LEVELS = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)


def fp4_e2m1_round(v: mx.array) -> mx.array:
    """Round float32 values in [-6, 6] to the nearest E2M1 value, ties to the even level index."""
    a = mx.abs(v)
    idx = mx.zeros(a.shape, mx.int32)
    for i, m in enumerate(_FP4_MIDPOINTS):
        up = (a > m) | ((a == m) & ((i + 1) % 2 == 0))
        idx = idx + up.astype(mx.int32)
    mag = mx.array(np.array(_FP4_LEVELS, np.float32))[idx]
    return mx.where(v < 0, -mag, mag)


@cache
def _hadamard(n: int) -> mx.array:
    h = np.array([[1.0]])
    while h.shape[0] < n:
        h = np.block([[h, h], [h, -h]])  # Sylvester (natural) order
    return mx.array((h / math.sqrt(n)).astype(np.float32))


def hadamard_fp4_round_trip(x: mx.array) -> mx.array:
    """Walsh-Hadamard rotation (scaled 1/sqrt(n)) of rows x [..., n], then an FP4 E2M1 round-trip
    in blocks of 32 with power-of-two scales (the indexer's q and key rows)."""
    return _block_round_trip(x @ _hadamard(x.shape[-1]), FP4_BLOCK, 7.05e-38, FP4_MAX, fp4_e2m1_round)


def f16_round(x: mx.array) -> mx.array:
    return x.astype(mx.float16).astype(mx.float32)


def rms_norm(x: mx.array, weight: mx.array | None, eps: float) -> mx.array:
    """RMSNorm over the last axis (sum of squares in float32 here; ds4's CPU uses float64)."""
    y = x * mx.rsqrt(mx.mean(mx.square(x), axis=-1, keepdims=True) + eps)
    return y if weight is None else y * weight


# -- deterministic top-k -----------------------------------------------------------------------

def topk_lowest_index(scores: mx.array, k: int) -> mx.array:
    """Indices of the k largest scores along the last axis, ties to the lower index (as ds4's
    CPU selection does), sorted ascending. scores: float32 [..., N], k <= N."""
    n = scores.shape[-1]
    # An order-preserving integer key for float32 (ints compare like the floats), then the index
    # breaks ties: key * N + (N - 1 - i) is unique and larger for lower indices.
    bits = scores.view(mx.int32).astype(mx.int64)
    key = mx.where(bits < 0, -(bits & 0x7FFFFFFF) - 1, bits)
    key = key * n + (n - 1 - mx.arange(n, dtype=mx.int64))
    idx = mx.argpartition(-key, kth=k - 1, axis=-1)[..., :k]
    return mx.stop_gradient(mx.sort(idx, axis=-1))  # a choice: no gradient flows through it


# -- compressor (§5.4, §5.5) -------------------------------------------------------------------

def compress_chunk(kv: mx.array, score: mx.array, state_kv: mx.array, state_score: mx.array,
                   p0: int, ratio: int) -> tuple[mx.array, mx.array, mx.array, int]:
    """Run a compressor over a chunk: per-token projections (kv, score) [T, Wc] of tokens
    p0..p0+T-1 (score already has ape added) against the frontier state.

    The state holds the current window's rows for ratio 128 ([128, Wc]); for ratio 4 the previous
    window's rows (0..3) then the current window's (4..7), [8, Wc]; unfilled score rows are -inf.
    Ratio 4 pools overlapping windows: row k pools tokens 4k-4..4k-1 through the first Wc/2
    dims and 4k..4k+3 through the second half, 8 candidates per output dim.

    Returns (pooled rows [n_new, Wc/coff], new state kv, new state score, first window index).
    """
    T = kv.shape[0]
    overlap = ratio == 4
    filled = p0 % ratio  # rows of the current window already in the state
    w0 = p0 // ratio  # window of the chunk's first token
    cur = slice(ratio, ratio + filled) if overlap else slice(0, filled)
    seq_kv = mx.concatenate([state_kv[cur], kv], axis=0)
    seq_sc = mx.concatenate([state_score[cur], score], axis=0)
    n_windows = -(-(filled + T) // ratio)
    pad = n_windows * ratio - (filled + T)
    if pad:
        seq_kv = mx.concatenate([seq_kv, mx.zeros((pad, kv.shape[1]), kv.dtype)], axis=0)
        seq_sc = mx.concatenate([seq_sc, mx.full((pad, kv.shape[1]), NEG_INF, kv.dtype)], axis=0)
    win_kv = seq_kv.reshape(n_windows, ratio, -1)
    win_sc = seq_sc.reshape(n_windows, ratio, -1)
    n_done = (filled + T) // ratio  # windows completed in this chunk
    if overlap:
        prev_kv = mx.concatenate([state_kv[None, :ratio], win_kv[:-1]], axis=0)
        prev_sc = mx.concatenate([state_score[None, :ratio], win_sc[:-1]], axis=0)
    pooled = None
    if n_done:
        if overlap:
            half = kv.shape[1] // 2
            cand_kv = mx.concatenate([prev_kv[:n_done, :, :half], win_kv[:n_done, :, half:]], axis=1)
            cand_sc = mx.concatenate([prev_sc[:n_done, :, :half], win_sc[:n_done, :, half:]], axis=1)
        else:
            cand_kv, cand_sc = win_kv[:n_done], win_sc[:n_done]
        pooled = mx.sum(mx.softmax(cand_sc, axis=1, precise=True) * cand_kv, axis=1)
    # New frontier: the last (incomplete) window, and for ratio 4 the window before it.
    last = n_windows - 1 if (filled + T) % ratio else n_windows
    if last < n_windows:
        cur_kv, cur_sc = win_kv[last], win_sc[last]
    else:
        cur_kv = mx.zeros((ratio, kv.shape[1]), kv.dtype)
        cur_sc = mx.full((ratio, kv.shape[1]), NEG_INF, kv.dtype)
    if overlap:
        before_kv = win_kv[last - 1] if last >= 1 else state_kv[:ratio]
        before_sc = win_sc[last - 1] if last >= 1 else state_score[:ratio]
        new_kv = mx.concatenate([before_kv, cur_kv], axis=0)
        new_sc = mx.concatenate([before_sc, cur_sc], axis=0)
    else:
        new_kv, new_sc = cur_kv, cur_sc
    return pooled, new_kv, new_sc, w0


def kv_row_qat(rows: mx.array, n_nope: int, numerics: Numerics) -> mx.array:
    """What a KV row goes through before it is cached: FP8 on the non-RoPE dims, f16 rounding."""
    return _round_trip(rows, lambda r: f16_round(fp8_round_trip(r, n_nope)), numerics)


def index_qat(x: mx.array, numerics: Numerics) -> mx.array:
    """The indexer's Hadamard + FP4 round-trip (q and key rows)."""
    return _round_trip(x, hadamard_fp4_round_trip, numerics)


def _finish_rows(pooled: mx.array, norm: mx.array, config: ModelConfig, first_window: int, ratio: int,
                 indexer: bool, numerics: Numerics) -> mx.array:
    """Compressed rows from pooled values: RMSNorm, RoPE at the window's first position, then the
    QAT round-trip (FP8 on the non-RoPE dims for attention rows, Hadamard + FP4 for indexer
    rows) and f16 rounding."""
    n = pooled.shape[0]
    cos, sin = rope_cos_sin(config, True, ratio * np.arange(first_window, first_window + n))
    c = rope_tail(rms_norm(pooled, norm, config.rms_eps), cos, sin)
    if indexer:
        return _round_trip(c, lambda r: f16_round(hadamard_fp4_round_trip(r)), numerics)
    return kv_row_qat(c, c.shape[-1] - config.n_rot, numerics)


def _advance_compressor(state, kv: mx.array, score: mx.array, norm: mx.array, p0: int, config: ModelConfig,
                        ratio: int, indexer: bool, numerics: Numerics):
    """Push a chunk's compressor projections (kv, score with ape) [T, Wc] of tokens p0.. into a
    compressor state, emitting the finished rows into its cache; returns the new state."""
    from ds4.cache import CompressorState

    pooled, new_kv, new_score, w0 = compress_chunk(kv, score, state.kv, state.score, p0, ratio)
    rows = state.rows
    if pooled is not None:
        done = _finish_rows(pooled, norm, config, w0, ratio, indexer, numerics)
        rows = mx.slice_update(rows, done, mx.array([w0]), axes=(0,))
    return CompressorState(rows, new_kv, new_score)


def _compressor_inputs(w_kv, w_gate, ape, a: mx.array, positions: np.ndarray, ratio: int):
    """Per-token compressor projections of a chunk: (kv, score + ape) [T, Wc]."""
    return w_kv(a), w_gate(a) + ape[mx.array(positions % ratio)]


@dataclass(frozen=True)
class ChunkRows:
    """What a chunk of T tokens adds to one layer's cache, row by row: the cache after any first n
    rows follows without another pass (a partially accepted speculative verify)."""

    before: object  # the LayerCache the chunk started from
    p0: int
    ratio: int
    kv: mx.array  # [T, head_dim] raw KV rows, as cached
    comp: tuple[mx.array, mx.array] | None = None  # attention compressor projections
    index: tuple[mx.array, mx.array] | None = None  # indexer compressor projections

    def cache_after(self, w, config: ModelConfig, n: int, numerics: Numerics):
        """The layer's cache after the chunk's first n rows (exactly what feeding them alone gives)."""
        from ds4.cache import LayerCache

        lc = self.before
        raw = mx.concatenate([lc.raw, self.kv[:n]], axis=0)[-config.n_swa:]
        if not self.ratio:
            return LayerCache(raw, raw_start=lc.raw_start)
        comp = _advance_compressor(lc.comp, self.comp[0][:n], self.comp[1][:n], w.attn_compressor_norm, self.p0,
                                   config, self.ratio, False, numerics)
        index = None
        if self.index is not None:
            index = _advance_compressor(lc.index, self.index[0][:n], self.index[1][:n], w.indexer_compressor_norm,
                                        self.p0, config, self.ratio, True, numerics)
        return LayerCache(raw, comp, index, lc.raw_start)


def _indexer_mask(w, config, a, qn, positions, cos, sin, index_rows, n_visible, numerics):
    """[T, C] mask of the compressed rows each token attends: all visible rows while there are at
    most top_k of them, else the top_k by the lightning indexer's score (ties to lower index)."""
    T, C = len(positions), index_rows.shape[0]
    visible = mx.arange(C)[None, :] < mx.array(n_visible)[:, None]
    top_k = config.indexer_top_k
    if int(n_visible.max()) <= top_k:
        return visible
    H, D = config.n_indexer_head, config.indexer_head_dim
    q = w.indexer_attn_q_b(qn).reshape(T, H, D)
    q = index_qat(rope_tail(q, cos, sin), numerics)
    weights = w.indexer_proj(a) / math.sqrt(D * H)  # [T, H]
    dots = mx.maximum(mx.einsum("thd,cd->thc", q, index_rows), 0.0)
    score = mx.einsum("th,thc->tc", weights, dots)
    score = mx.where(visible, score, NEG_INF)
    picked = topk_lowest_index(score, top_k)
    chosen = mx.put_along_axis(mx.zeros((T, C), mx.bool_), picked, mx.array(True), axis=-1)
    many = mx.array(n_visible > top_k)[:, None]
    return mx.where(many, chosen & visible, visible)


def attend_with_sinks(q: mx.array, keys: mx.array, mask: mx.array, sinks: mx.array, block: int = 256) -> mx.array:
    """Softmax attention of q [T, H, D] over rows keys [K, D] (each row is key and value) with a
    per-head sink logit in the denominator (§5.6); mask [T, K]. Queries go in blocks to bound the
    [T, H, K] score tensor."""
    T, H, D = q.shape
    scale = 1.0 / math.sqrt(D)
    outs = []
    for t0 in range(0, T, block):
        qb, mb = q[t0:t0 + block], mask[t0:t0 + block]
        logits = mx.einsum("thd,kd->thk", qb, keys) * scale
        logits = mx.where(mb[:, None, :], logits, NEG_INF)
        m = mx.maximum(mx.max(logits, axis=-1, keepdims=True), sinks[None, :, None])
        p = mx.exp(logits - m)
        denom = mx.exp(sinks[None, :, None] - m) + mx.sum(p, axis=-1, keepdims=True)
        outs.append(mx.einsum("thk,kd->thd", p, keys) / denom)
    return outs[0] if len(outs) == 1 else mx.concatenate(outs, axis=0)


def attention(w, config: ModelConfig, ratio: int, a: mx.array, p0: int, lc, numerics: Numerics = Numerics()):
    """The attention sublayer for tokens p0..p0+T-1 with attn-normed input a [T, E].

    Returns (output [T, E], new LayerCache, ChunkRows). `ratio` is the layer's compression ratio
    (0 for sliding-window layers and the MTP block)."""
    T = a.shape[0]
    H, D, W = config.n_head, config.head_dim, config.n_swa
    positions = np.arange(p0, p0 + T)
    cos, sin = rope_cos_sin(config, ratio != 0, positions)
    qn = rms_norm(w.attn_q_a(a), w.attn_q_a_norm, config.rms_eps)
    q = rms_norm(w.attn_q_b(qn).reshape(T, H, D), None, config.rms_eps)
    q = rope_tail(q, cos, sin)
    kv = rms_norm(w.attn_kv(a), w.attn_kv_a_norm, config.rms_eps)
    kv = kv_row_qat(rope_tail(kv, cos, sin), D - config.n_rot, numerics)

    # Raw window: the cached rows of positions p0-W..p0-1, then this chunk's rows (pushed
    # before attention, so each token sees itself and the W-1 before it).
    keys = mx.concatenate([lc.raw, kv], axis=0)
    key_pos = np.arange(p0 - W, p0 + T)
    p = positions[:, None]
    mask = mx.array((key_pos[None] <= p) & (key_pos[None] > p - W) & (key_pos[None] >= lc.raw_start))
    comp_in = index_in = None
    if ratio:
        comp_in = _compressor_inputs(w.attn_compressor_kv, w.attn_compressor_gate, w.attn_compressor_ape, a,
                                     positions, ratio)
    if ratio == 4:
        index_in = _compressor_inputs(w.indexer_compressor_kv, w.indexer_compressor_gate,
                                      w.indexer_compressor_ape, a, positions, ratio)
    chunk = ChunkRows(lc, p0, ratio, kv, comp_in, index_in)
    new_lc = chunk.cache_after(w, config, T, numerics)

    if ratio:
        n_rows = (p0 + T) // ratio
        n_visible = (positions + 1) // ratio  # row k is emitted by the token at r(k+1) - 1
        if ratio == 4:
            comp_mask = _indexer_mask(w, config, a, qn, positions, cos, sin, new_lc.index.rows[:n_rows], n_visible,
                                      numerics)
        else:
            comp_mask = mx.arange(n_rows)[None, :] < mx.array(n_visible)[:, None]
        keys = mx.concatenate([keys, new_lc.comp.rows[:n_rows]], axis=0)
        mask = mx.concatenate([mask, comp_mask], axis=1)

    o = attend_with_sinks(q, keys, mask, w.attn_sinks)
    o = rope_tail(o, cos, sin, inverse=True)
    G = config.n_out_group
    low = w.attn_output_a.grouped(o.reshape(T, G, -1))  # [T, G, o_lora_rank]
    return w.attn_output_b(low.reshape(T, -1)), new_lc, chunk
