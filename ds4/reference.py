"""Float64 numpy reference forward pass of DeepSeek V4 Flash: slow, literal, for tiny models.

This module is `shared/docs/ds4-forward.md` (not part of this repository) written as code. Every
function is named after the part of that document it transcribes, and the section comments below
name those parts. It is the oracle the MLX forward is tested against, so it favours one obvious
formula per step over speed: float64 everywhere, Python loops over tokens, experts and heads where
that reads better.

What "the model" means here: the math of the top level, hyper-connections, attention, caches, FFN,
head and MTP block, plus the QAT round trips (`qat=True`, the default): an E4M3 FP8 round trip of
the non-RoPE dims of every KV row (raw and compressed), f16 rounding of every cache row, and a
Hadamard + E2M1 FP4 round trip of the indexer queries and indexer rows. The ds4 CPU engine's
*activation* quantisation (Q8_0 / Q8_K before quantised matvecs) is an artefact of its kernels, not
part of the model, and is not emulated; weights are used exactly as dequantised.

Every dimension comes from the `ModelConfig` (and the weight shapes); nothing assumes the
published widths. Choices where the documents are silent or disagree are marked "CHOICE:".

Weights are a dict `{gguf tensor name: float64 array}` in numpy (out, in) order (routed experts
(n_expert, out, in); `ffn_gate_tid2eid` an int array (n_vocab, n_used)), as `load_reference_weights`
builds from an opened model file.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field

import numpy as np
from gguf import GGMLQuantizationType as QT
from gguf.quants import dequantize

from ds4.config import FP8_BLOCK, ModelConfig
from ds4.errors import Ds4Error

# -- Format constants (QAT round trips) -------------------------------------------------------------------

E4M3_MAX = 448.0  # largest finite E4M3FN value (exponent 15, mantissa 6)
E4M3_MIN_NORMAL_EXP = -6  # smallest normal is 2^-6; subnormals are m * 2^-9
E4M3_MANT_BITS = 3
FP8_AMAX_FLOOR = 1e-4
E2M1_GRID = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])  # E2M1 magnitudes by code index
E2M1_MAX = 6.0
FP4_BLOCK = 32
FP4_AMAX_FLOOR = 7.05e-38
ROUTE_WEIGHT_SUM_FLOOR = 6.1035e-5  # router: max(sum of selected probs, this)


# =================================================================================================
# Functions
# =================================================================================================

def rms_norm(v: np.ndarray, w: np.ndarray | None, eps: float) -> np.ndarray:
    """RMSNorm over the last axis: v / sqrt(mean(v^2) + eps), times w when given."""
    out = v / np.sqrt(np.mean(v * v, axis=-1, keepdims=True) + eps)
    return out if w is None else out * w


def sigmoid(z: np.ndarray) -> np.ndarray:
    """The logistic function."""
    return 1.0 / (1.0 + np.exp(-z))


def silu(z: np.ndarray) -> np.ndarray:
    """silu(z) = z * sigmoid(z)."""
    return z * sigmoid(z)


def softplus(z: np.ndarray) -> np.ndarray:
    """Softplus with ds4's cut-offs: z above 20, e^z below -20, log1p(e^z) between."""
    z = np.asarray(z, dtype=np.float64)
    mid = np.log1p(np.exp(np.clip(z, -20.0, 20.0)))
    return np.where(z > 20.0, z, np.where(z < -20.0, np.exp(z), mid))


def softmax(z: np.ndarray, axis: int = -1) -> np.ndarray:
    """Max-subtracted softmax (entries of -inf get weight 0)."""
    e = np.exp(z - np.max(z, axis=axis, keepdims=True))
    return e / np.sum(e, axis=axis, keepdims=True)


def top_k_lower_index(scores: np.ndarray, k: int) -> np.ndarray:
    """Top-k (router and indexer) by descending score; equal scores go to the lower index (ds4 CPU)."""
    return np.argsort(-scores, kind="stable")[:k]


# =================================================================================================
# QAT round trips
# =================================================================================================

def pow2_ceil(v: np.ndarray) -> np.ndarray:
    """2^ceil(log2 v) for v > 0, computed exactly (frexp, no float log)."""
    m, e = np.frexp(v)  # v = m * 2^e with m in [0.5, 1)
    return np.ldexp(1.0, np.where(m == 0.5, e - 1, e))


def e4m3_round(x: np.ndarray) -> np.ndarray:
    """Nearest E4M3FN value, ties to even mantissa, saturating at +-448.

    Normal values are 2^e * (1 + m/8) (e >= -6), subnormals m * 2^-9: in the binade [2^e, 2^e+1)
    the grid step is 2^(e-3), and below 2^-6 it is 2^-9. Rounding x/step to the nearest integer with
    ties to even is ties-to-even-mantissa (the integer is 8 + m, or m for subnormals)."""
    a = np.minimum(np.abs(x), E4M3_MAX)
    _, e = np.frexp(a)  # a in [2^(e-1), 2^e)
    step = np.ldexp(1.0, np.maximum(e - 1, E4M3_MIN_NORMAL_EXP) - E4M3_MANT_BITS)
    return np.sign(x) * np.minimum(np.rint(a / step) * step, E4M3_MAX)


def _block_round_trip(x: np.ndarray, block: int, amax_floor: float, top: float, rounder) -> np.ndarray:
    """Block round trip along the last axis: amax = max(max|x|, floor),
    scale = 2^ceil(log2(amax/top)), x <- rounder(clamp(x/scale, +-top)) * scale."""
    xb = x.reshape(*x.shape[:-1], -1, block)
    amax = np.maximum(np.max(np.abs(xb), axis=-1, keepdims=True), amax_floor)
    scale = pow2_ceil(amax / top)
    y = rounder(np.clip(xb / scale, -top, top)) * scale
    return y.reshape(x.shape)


def fp8_e4m3_roundtrip(x: np.ndarray, block: int = FP8_BLOCK) -> np.ndarray:
    """FP8 round trip: blocks of 64, amax floor 1e-4, E4M3 values up to 448."""
    return _block_round_trip(x, block, FP8_AMAX_FLOOR, E4M3_MAX, e4m3_round)


def e2m1_round(x: np.ndarray) -> np.ndarray:
    """Nearest E2M1 value of {0, 0.5, 1, 1.5, 2, 3, 4, 6} (signed), ties to the even index,
    saturating at +-6."""
    a = np.minimum(np.abs(x), E2M1_MAX)
    lo = np.clip(np.searchsorted(E2M1_GRID, a, side="right") - 1, 0, len(E2M1_GRID) - 2)
    d_lo = a - E2M1_GRID[lo]
    d_hi = E2M1_GRID[lo + 1] - a
    take_hi = (d_hi < d_lo) | ((d_hi == d_lo) & (lo % 2 == 1))
    return np.sign(x) * E2M1_GRID[lo + take_hi]


def fp4_e2m1_roundtrip(x: np.ndarray, block: int = FP4_BLOCK) -> np.ndarray:
    """FP4 round trip: blocks of 32, amax floor 7.05e-38, E2M1 values up to 6."""
    return _block_round_trip(x, block, FP4_AMAX_FLOOR, E2M1_MAX, e2m1_round)


def hadamard(x: np.ndarray) -> np.ndarray:
    """Walsh-Hadamard rotation of the last axis: the unnormalised butterfly in natural
    (Sylvester) order with strides 1, 2, 4, ..., n/2, then times 1/sqrt(n). Orthonormal and its
    own inverse."""
    n = x.shape[-1]
    y = np.array(x, dtype=np.float64)
    h = 1
    while h < n:
        y = y.reshape(*x.shape[:-1], n // (2 * h), 2, h)
        a, b = y[..., 0, :], y[..., 1, :]
        y = np.stack([a + b, a - b], axis=-2).reshape(x.shape)
        h *= 2
    return y / math.sqrt(n)


def f16_round(x: np.ndarray) -> np.ndarray:
    """Cache rows are stored rounded to f16 (round to nearest even)."""
    return np.asarray(x, dtype=np.float16).astype(np.float64)


# =================================================================================================
# Hyper-connection (mHC) machinery
# =================================================================================================

@dataclass
class HCSplit:
    """The three outputs of an HC pre: pre weights, post gates, Sinkhorn-normalised C."""

    pre: np.ndarray  # (M,)
    post: np.ndarray  # (M,)
    comb: np.ndarray  # (M, M): row = source stream, column = destination stream


def hc_mix(X: np.ndarray, fn: np.ndarray, eps: float) -> np.ndarray:
    """HC pre steps 1-2: mix = fn . RMSNorm(flat(X)), the flat state normalised without weight."""
    return fn @ rms_norm(X.reshape(-1), None, eps)


def sinkhorn(C0: np.ndarray, iters: int, eps: float) -> np.ndarray:
    """HC pre step 4: row softmax + eps, column normalise; then (iters - 1) times row normalise and
    column normalise, each dividing by (sum + eps)."""
    C = softmax(C0, axis=1) + eps
    C = C / (C.sum(axis=0, keepdims=True) + eps)
    for _ in range(iters - 1):
        C = C / (C.sum(axis=1, keepdims=True) + eps)
        C = C / (C.sum(axis=0, keepdims=True) + eps)
    return C


def hc_split(mix: np.ndarray, scale: np.ndarray, base: np.ndarray, n_hc: int, iters: int,
             eps: float) -> HCSplit:
    """HC pre step 3: pre = sigmoid(s0 mix + b) + eps, post = 2 sigmoid(s1 mix + b),
    C0[i][j] = s2 mix[2M + M i + j] + b (row i = source), then Sinkhorn.

    CHOICE: ds4-forward.md (HC pre and HC post) puts C[i][j] (i = source, j = destination) at flat offset
    2M + M i + j; ds4-gguf-layout.md (the indexer's tensors) says "index src + 4 dst", the transpose. The forward doc
    (which cites `hc_post_one` and the reference `hc_post`) is followed."""
    M = n_hc
    z = np.empty_like(mix)
    z[:M] = scale[0] * mix[:M]
    z[M:2 * M] = scale[1] * mix[M:2 * M]
    z[2 * M:] = scale[2] * mix[2 * M:]
    z = z + base
    pre = sigmoid(z[:M]) + eps
    post = 2.0 * sigmoid(z[M:2 * M])
    comb = sinkhorn(z[2 * M:].reshape(M, M), iters, eps)
    return HCSplit(pre, post, comb)


def hc_pre(X: np.ndarray, fn: np.ndarray, scale: np.ndarray, base: np.ndarray,
           config: ModelConfig) -> tuple[np.ndarray, HCSplit]:
    """HC pre: the sublayer input y = sum_m pre_m X[m] (raw X) and the split for HC post."""
    mix = hc_mix(X, fn, config.rms_eps)
    s = hc_split(mix, scale, base, config.n_hc, config.hc_sinkhorn_iters, config.hc_eps)
    return s.pre @ X, s


def hc_post(X: np.ndarray, out: np.ndarray, s: HCSplit) -> np.ndarray:
    """HC post: X'[j] = post_j out + sum_i C[i][j] X[i] (X = the state HC pre saw)."""
    return s.post[:, None] * out[None, :] + s.comb.T @ X


def hc_head_collapse(X: np.ndarray, fn: np.ndarray, scale: np.ndarray, base: np.ndarray,
                     config: ModelConfig) -> np.ndarray:
    """Final collapse: w = sigmoid(fn . RMSNorm(flat X) * scale[0] + base) + eps,
    h = sum_m w_m X[m] (no Sinkhorn, no normalisation of w)."""
    q = hc_mix(X, fn, config.rms_eps)
    w = sigmoid(q * scale[0] + base) + config.hc_eps
    return w @ X


# =================================================================================================
# RoPE / YaRN
# =================================================================================================

def yarn_corr_range(n_rot: int, base: float, orig_ctx: int, beta_fast: float,
                    beta_slow: float) -> tuple[int, int]:
    """corr(beta) = n_rot ln(orig / (2 pi beta)) / (2 ln base);
    (low, high) = (max(0, floor(corr(beta_fast))), min(n_rot - 1, ceil(corr(beta_slow))))."""
    def corr(beta: float) -> float:
        return n_rot * math.log(orig_ctx / (2.0 * math.pi * beta)) / (2.0 * math.log(base))
    return max(0, math.floor(corr(beta_fast))), min(n_rot - 1, math.ceil(corr(beta_slow)))


def yarn_gamma(n_rot: int, low: int, high: int) -> np.ndarray:
    """gamma_k = 1 - clamp((k - low) / max(0.001, high - low), 0, 1), k = 0..n_rot/2-1."""
    k = np.arange(n_rot // 2, dtype=np.float64)
    return 1.0 - np.clip((k - low) / max(0.001, high - low), 0.0, 1.0)


@dataclass(frozen=True)
class Rope:
    """One RoPE flavour: rotates the last `n_rot` dims in interleaved pairs
    (x[-n_rot + 2k], x[-n_rot + 2k + 1]) by theta_k(p) = p * freq_k."""

    n_rot: int
    base: float
    yarn_factor: float | None = None  # None: plain RoPE; else YaRN with this scale factor
    orig_ctx: int = 65536
    beta_fast: float = 32.0
    beta_slow: float = 1.0

    def freqs(self) -> np.ndarray:
        """Per-pair angular frequency: f_k = base^(-2k/n_rot), YaRN-mixed
        f_k (gamma_k + (1 - gamma_k) / factor) when scaled."""
        k = np.arange(self.n_rot // 2, dtype=np.float64)
        f = self.base ** (-2.0 * k / self.n_rot)
        if self.yarn_factor is None:
            return f
        low, high = yarn_corr_range(self.n_rot, self.base, self.orig_ctx, self.beta_fast, self.beta_slow)
        g = yarn_gamma(self.n_rot, low, high)
        return f * (g + (1.0 - g) / self.yarn_factor)

    def theta(self, pos: int) -> np.ndarray:
        """The angles theta_k(p) = p * freq_k."""
        return float(pos) * self.freqs()


def apply_rope(x: np.ndarray, theta: np.ndarray) -> np.ndarray:
    """Rotate the last 2*len(theta) dims of x (any leading axes) in interleaved pairs:
    x0' = x0 cos - x1 sin, x1' = x0 sin + x1 cos. Pass -theta for the inverse rotation."""
    n = 2 * len(theta)
    out = np.array(x, dtype=np.float64)
    tail = out[..., x.shape[-1] - n:]
    x0, x1 = tail[..., 0::2].copy(), tail[..., 1::2].copy()
    c, s = np.cos(theta), np.sin(theta)
    tail[..., 0::2] = x0 * c - x1 * s
    tail[..., 1::2] = x0 * s + x1 * c
    return out


def rope_for_layer(config: ModelConfig, ratio: int, n_rot: int | None = None) -> Rope:
    """Ratio-0 layers (and the MTP block): base rope_freq_base, no scaling; compressed layers:
    compress_rope_freq_base with YaRN, for every RoPE use in the layer."""
    n_rot = config.n_rot if n_rot is None else n_rot
    if ratio == 0:
        return Rope(n_rot, config.rope_freq_base)
    return Rope(n_rot, config.compress_rope_freq_base, config.rope_scale_factor, config.rope_orig_ctx,
                config.yarn_beta_fast, config.yarn_beta_slow)


def indexer_rot_dims(config: ModelConfig) -> int:
    """RoPE width of indexer vectors: the last n_rot dims of each indexer head (64 of 128 in
    the published model; the config requires indexer_head_dim >= n_rot)."""
    return config.n_rot


# =================================================================================================
# Compressors, cache state
# =================================================================================================

@dataclass
class CompressorState:
    """One compressor: its frontier (the not-yet-complete window of kv/score rows) and
    its emitted rows.

    Ratio r with overlap (r = 4): 2r state rows, rows [0, r) the previous window, [r, 2r) the
    current one; the width Wc is two halves. Without overlap (r = 128): r rows. Scores start at
    -inf and values at 0, so the first ratio-4 row pools only its own window."""

    ratio: int
    width: int  # Wc, the projection width
    overlap: bool
    kv: np.ndarray = None
    score: np.ndarray = None
    rows: list = field(default_factory=list)  # emitted (finalised, cached) rows, in order
    emit_positions: list = field(default_factory=list)  # token position that emitted each row

    def __post_init__(self):
        n = 2 * self.ratio if self.overlap else self.ratio
        if self.kv is None:
            self.kv = np.zeros((n, self.width))
        if self.score is None:
            self.score = np.full((n, self.width), -np.inf)

    @property
    def n_rows(self) -> int:
        return len(self.rows)

    def stacked(self, dim: int) -> np.ndarray:
        return np.stack(self.rows) if self.rows else np.zeros((0, dim))


def compressor_pool(state: CompressorState) -> np.ndarray:
    """Pooling at emission: per dim, a softmax over the window's scores weights its values.
    Overlap (ratio 4): 2r candidates, the previous window's first halves and the current window's
    second halves. Otherwise the r rows of the window, full width."""
    r = state.ratio
    if state.overlap:
        d = state.width // 2
        kv = np.concatenate([state.kv[:r, :d], state.kv[r:, d:]])
        sc = np.concatenate([state.score[:r, :d], state.score[r:, d:]])
    else:
        kv, sc = state.kv, state.score
    return np.sum(softmax(sc, axis=0) * kv, axis=0)


def compressor_update(state: CompressorState, a: np.ndarray, W_kv: np.ndarray, W_gate: np.ndarray,
                      ape: np.ndarray, pos: int) -> np.ndarray | None:
    """Per-token update: kvp = W_kv a, scp = W_gate a + ape[p mod r] go to state row
    p mod r (r + p mod r with overlap). When (p + 1) mod r == 0 the window is pooled and the pooled
    vector returned (the caller finalises it into a row); with overlap the current rows then move
    to the previous-window rows. Otherwise returns None."""
    r = state.ratio
    slot = (r if state.overlap else 0) + pos % r
    state.kv[slot] = W_kv @ a
    state.score[slot] = W_gate @ a + ape[pos % r]
    if (pos + 1) % r != 0:
        return None
    pooled = compressor_pool(state)
    if state.overlap:
        state.kv[:r] = state.kv[r:]
        state.score[:r] = state.score[r:]
    return pooled


def finalize_comp_row(pooled: np.ndarray, norm_w: np.ndarray, rope: Rope, row_pos: int,
                      config: ModelConfig, qat: bool) -> np.ndarray:
    """Row finalisation: RMSNorm(pooled) with the compressor norm, RoPE on the last n_rot dims
    at the window's first position r*k, FP8 on the non-RoPE dims, f16 storage."""
    c = rms_norm(pooled, norm_w, config.rms_eps)
    c = apply_rope(c, rope.theta(row_pos))
    return kv_row_qat(c, config) if qat else c


def finalize_index_row(pooled: np.ndarray, norm_w: np.ndarray, rope: Rope, row_pos: int,
                       config: ModelConfig, qat: bool) -> np.ndarray:
    """Indexer row finalisation: RMSNorm with the indexer compressor norm, RoPE on the last
    dims at r*k, Hadamard + FP4 over all dims, f16 storage."""
    c = rms_norm(pooled, norm_w, config.rms_eps)
    c = apply_rope(c, rope.theta(row_pos))
    return f16_round(fp4_e2m1_roundtrip(hadamard(c))) if qat else c


def kv_row_qat(kv: np.ndarray, config: ModelConfig) -> np.ndarray:
    """A KV row as cached: FP8 round trip of dims [0, head_dim - n_rot) (the RoPE tail
    stays unquantised), then f16 rounding of all dims."""
    n_nope = config.head_dim - config.n_rot
    out = np.array(kv, dtype=np.float64)
    out[:n_nope] = fp8_e4m3_roundtrip(out[:n_nope], FP8_BLOCK)
    return f16_round(out)


@dataclass
class LayerCache:
    """What one trunk layer carries between tokens: the raw sliding window (last n_swa rows,
    cache-rounded), and for compressed layers the attention compressor (frontier + rows) and, for
    ratio 4, the indexer compressor."""

    ratio: int
    n_swa: int
    raw: list = field(default_factory=list)  # [(position, row)], oldest first, at most n_swa
    attn_comp: CompressorState | None = None
    index_comp: CompressorState | None = None
    last_selected: np.ndarray | None = None  # compressed rows the last query attended (ids, ascending)

    def push_raw(self, pos: int, row: np.ndarray) -> np.ndarray:
        """Push the current token's row (before attention) and return the window: the current
        token and the n_swa - 1 previous ones, oldest first."""
        self.raw.append((pos, row))
        if len(self.raw) > self.n_swa:
            self.raw.pop(0)
        return np.stack([r for _, r in self.raw])

    @property
    def n_comp(self) -> int:
        return self.attn_comp.n_rows if self.attn_comp else 0


@dataclass
class MTPCache:
    """The MTP block's own raw ring: rows by absolute position and the valid-row counter
    mtp_n_raw (capped at the window). Any prefill sets the counter to 0."""

    n_swa: int
    rows: dict = field(default_factory=dict)  # position -> row
    n_raw: int = 0

    def push_raw(self, pos: int, row: np.ndarray) -> np.ndarray:
        """MTP step 4: write the row for position q, then attend min(n_raw + 1, n_swa) rows ending
        at q, oldest first.

        CHOICE: ds4 reads ring slots (slot = pos mod raw_cap, raw_cap > window, contents never
        copied on rollback). Here the ring is unbounded: rows are keyed by position, a row is only
        replaced when its position is written again, and a position inside the visible range that
        was never written (ds4's stale-slot quirk) is skipped."""
        self.rows[pos] = row
        visible = min(self.n_raw + 1, self.n_swa)
        self.n_raw = visible
        return np.stack([self.rows[p] for p in range(pos - visible + 1, pos + 1) if p in self.rows])


# =================================================================================================
# Attention sublayer
# =================================================================================================

def query_path(a: np.ndarray, W_qa: np.ndarray, qa_norm: np.ndarray, W_qb: np.ndarray, rope: Rope,
               pos: int, config: ModelConfig) -> tuple[np.ndarray, np.ndarray]:
    """Query path: qn = RMSNorm(W_qa a) (kept for the indexer); q = W_qb qn as heads x head_dim, each head
    RMS-normalised without weight, RoPE on its last n_rot dims at p. Returns (q, qn)."""
    qn = rms_norm(W_qa @ a, qa_norm, config.rms_eps)
    q = (W_qb @ qn).reshape(config.n_head, config.head_dim)
    q = rms_norm(q, None, config.rms_eps)
    return apply_rope(q, rope.theta(pos)), qn


def kv_path(a: np.ndarray, W_kv: np.ndarray, kv_norm: np.ndarray, rope: Rope, pos: int,
            config: ModelConfig, qat: bool) -> np.ndarray:
    """The shared K=V row: RMSNorm(W_kv a), RoPE on the last n_rot dims at p, then as cached
    (FP8 on the non-RoPE dims, f16 rounding)."""
    kv = rms_norm(W_kv @ a, kv_norm, config.rms_eps)
    kv = apply_rope(kv, rope.theta(pos))
    return kv_row_qat(kv, config) if qat else kv


def indexer_scores(qn: np.ndarray, a: np.ndarray, W_iqb: np.ndarray, W_proj: np.ndarray,
                   index_rows: np.ndarray, rope: Rope, pos: int, config: ModelConfig,
                   qat: bool) -> np.ndarray:
    """Indexer scores of every index row: qI = W_iqb qn (heads x indexer_head_dim), RoPE at p,
    Hadamard + FP4; wI = (W_proj a) / sqrt(indexer_head_dim * n_indexer_head);
    score[c] = sum_h wI_h max(0, qI_h . KI[c]).

    CHOICE: with qat=False the Hadamard rotation is skipped along with FP4, on q and on the rows:
    it is orthonormal and applied to both sides, so the exact scores are unchanged."""
    IH, ID = config.n_indexer_head, config.indexer_head_dim
    qI = apply_rope((W_iqb @ qn).reshape(IH, ID), rope.theta(pos))
    if qat:
        qI = fp4_e2m1_roundtrip(hadamard(qI))
    wI = (W_proj @ a) / math.sqrt(ID * IH)
    return wI @ np.maximum(0.0, qI @ index_rows.T)


def indexer_select(n_comp: int, top_k: int, scores_fn) -> np.ndarray:
    """The compressed rows a query attends: all of them when n_comp <= top_k (the indexer is
    not evaluated), else the top_k highest scores, ties to the lower index. Ascending ids."""
    if n_comp <= top_k:
        return np.arange(n_comp)
    return np.sort(top_k_lower_index(scores_fn(), top_k))


def sink_softmax_weights(logits: np.ndarray, sink: float) -> np.ndarray:
    """Attention weights with a sink: e^(l_r - m) / (e^(sink - m) + sum_r e^(l_r - m)),
    m = max(sink, max l). They sum to less than 1; the sink has no value."""
    m = max(float(sink), float(np.max(logits))) if len(logits) else float(sink)
    e = np.exp(logits - m)
    return e / (math.exp(sink - m) + np.sum(e))


def attention_with_sinks(q: np.ndarray, rows: np.ndarray, sinks: np.ndarray) -> np.ndarray:
    """Attention per head h: l_r = q_h . v_r / sqrt(head_dim) over the row set, sink-softmax weights,
    o_h = sum_r w_r v_r (each row is both key and value)."""
    scale = 1.0 / math.sqrt(q.shape[-1])
    out = np.empty_like(q)
    for h in range(q.shape[0]):
        w = sink_softmax_weights(rows @ q[h] * scale, sinks[h])
        out[h] = w @ rows
    return out


def grouped_output(o: np.ndarray, W_oa: np.ndarray, W_ob: np.ndarray, n_group: int) -> np.ndarray:
    """Grouped low-rank output: group g's heads, concatenated, go through its block of rows of
    W_oa (o_lora_rank each); the concatenated lows go through W_ob."""
    lora = W_oa.shape[0] // n_group
    groups = o.reshape(n_group, -1)  # heads are consecutive: group g = heads g*H/G .. (g+1)*H/G - 1
    low = np.concatenate([W_oa[g * lora:(g + 1) * lora] @ groups[g] for g in range(n_group)])
    return W_ob @ low


# =================================================================================================
# MoE FFN
# =================================================================================================

def router(f: np.ndarray, W_inp: np.ndarray, bias: np.ndarray | None, hash_ids: np.ndarray | None,
           n_used: int, weights_scale: float) -> tuple[np.ndarray, np.ndarray]:
    """Router: prob = sqrt(softplus(W_inp f)); experts = the token's hash row (hash layers) or the top
    n_used of prob + bias (ties to the lower index); weights = prob[S] / max(sum, 6.1035e-5) * scale
    with the unbiased probs. Returns (expert ids, weights)."""
    prob = np.sqrt(softplus(W_inp @ f))
    if hash_ids is not None:
        ids = np.asarray(hash_ids, dtype=np.int64)
    else:
        ids = top_k_lower_index(prob + (0.0 if bias is None else bias), n_used)
    sel = prob[ids]
    return ids, sel / max(float(np.sum(sel)), ROUTE_WEIGHT_SUM_FLOOR) * weights_scale


def swiglu_clamped(g: np.ndarray, u: np.ndarray, clamp: float) -> np.ndarray:
    """SwiGLU with ds4's clamps: gate <= clamp (upper only), up in [-clamp, clamp]."""
    return silu(np.minimum(g, clamp)) * np.clip(u, -clamp, clamp)


def routed_experts(f: np.ndarray, ids: np.ndarray, weights: np.ndarray, W_gate: np.ndarray,
                   W_up: np.ndarray, W_down: np.ndarray, clamp: float) -> np.ndarray:
    """Routed experts: y = sum_k W_down[e_k] (swiglu(W_gate[e_k] f, W_up[e_k] f) * w_k): the route weight is
    applied before the down projection."""
    y = np.zeros(W_down.shape[1])
    for e, w in zip(ids, weights):
        mid = swiglu_clamped(W_gate[e] @ f, W_up[e] @ f, clamp) * w
        y += W_down[e] @ mid
    return y


def shared_expert(f: np.ndarray, W_gate: np.ndarray, W_up: np.ndarray, W_down: np.ndarray,
                  clamp: float) -> np.ndarray:
    """The always-on shared expert, with the same SwiGLU clamps."""
    return W_down @ swiglu_clamped(W_gate @ f, W_up @ f, clamp)


# =================================================================================================
# Head, MTP input
# =================================================================================================

def output_head(X: np.ndarray, hc_fn: np.ndarray, hc_scale: np.ndarray, hc_base: np.ndarray,
                norm_w: np.ndarray, W_out: np.ndarray, config: ModelConfig) -> np.ndarray:
    """Head: logits = W_out . RMSNorm_norm(HC-collapse(X))."""
    h = hc_head_collapse(X, hc_fn, hc_scale, hc_base, config)
    return W_out @ rms_norm(h, norm_w, config.rms_eps)


def mtp_input(emb: np.ndarray, P: np.ndarray, enorm: np.ndarray, e_proj: np.ndarray,
              hnorm: np.ndarray, h_proj: np.ndarray, config: ModelConfig) -> np.ndarray:
    """MTP steps 1-3: X = broadcast(e_proj RMSNorm_enorm(emb)) + h_proj RMSNorm_hnorm(P[m]) per
    stream."""
    e_hat = e_proj @ rms_norm(emb, enorm, config.rms_eps)
    h_hat = rms_norm(P, hnorm, config.rms_eps) @ h_proj.T
    return e_hat[None, :] + h_hat


# =================================================================================================
# The model: top level, layer skeleton, caches, prefill, MTP
# =================================================================================================

class ReferenceModel:
    """The float64 reference forward with its decode state.

    `decode(token)` runs one token at the next position and returns its logits; `prefill(tokens)`
    feeds a prompt; `final_hc` is the trunk's final HC state of the last step (before the head
    collapse); `mtp_draft(...)` runs one MTP step with the MTP block's own cache."""

    def __init__(self, config: ModelConfig, weights: dict[str, np.ndarray], qat: bool = True):
        self.config = config
        self.qat = qat
        self.w = _as_reference_arrays(weights)
        self.reset()

    # -- state ---------------------------------------------------------------------------------

    def reset(self) -> None:
        """Empty caches at position 0 (the initial cache state: no rows, frontier values 0, scores -inf)."""
        c = self.config
        self.pos = 0
        self.caches = [self._new_layer_cache(il) for il in range(c.n_layer)]
        self.final_hc: np.ndarray | None = None
        self.mtp_cache = MTPCache(c.n_swa)
        self.mtp_hc: np.ndarray | None = None  # the MTP block's last output HC state (MTP step 6)

    def _new_layer_cache(self, il: int) -> LayerCache:
        c, p, r = self.config, f"blk.{il}.", self.config.ratio(il)
        cache = LayerCache(r, c.n_swa)
        if r:
            cache.attn_comp = CompressorState(r, self.w[p + "attn_compressor_kv.weight"].shape[0], r == 4)
        if r == 4:
            cache.index_comp = CompressorState(r, self.w[p + "indexer_compressor_kv.weight"].shape[0], True)
        return cache

    def snapshot(self):
        """A deep copy of the decode state (caches, frontiers, counters, position, HC states)."""
        return copy.deepcopy((self.pos, self.caches, self.final_hc, self.mtp_cache, self.mtp_hc))

    def restore(self, snap) -> None:
        """Return to a state taken with `snapshot`."""
        self.pos, self.caches, self.final_hc, self.mtp_cache, self.mtp_hc = copy.deepcopy(snap)

    # -- Top level ----------------------------------------------------------------------------

    def decode(self, token: int) -> np.ndarray:
        """One decode step: token at position self.pos through every layer, updating the caches;
        returns the logits (n_vocab,) and advances the position."""
        c, w = self.config, self.w
        if not 0 <= int(token) < c.n_vocab:
            raise Ds4Error(f"token id {token} outside the vocabulary [0, {c.n_vocab})")
        X = np.repeat(w["token_embd.weight"][int(token)][None, :], c.n_hc, axis=0)  # top-level steps 1-2
        for il in range(c.n_layer):
            X = self._layer(w, f"blk.{il}.", X, self.pos, int(token), self.caches[il], il, c.ratio(il))
        self.final_hc = X
        self.pos += 1
        return output_head(X, w["output_hc_fn.weight"], w["output_hc_scale.weight"],
                           w["output_hc_base.weight"], w["output_norm.weight"], w["output.weight"], c)

    def prefill(self, tokens) -> np.ndarray:
        """A prompt from the current position; returns the logits of its last token.

        The forward doc defines batched prefill as exactly the sequential decode (causal: the same
        raw window, the same compressor emissions, a per-token indexer selection over the rows
        visible to that token), so this loops `decode`. This follows the CPU semantics; the GPU
        chunked path, which runs the indexer only when the chunk-final n_comp exceeds top_k and
        masks invisible rows, is documented to give the same selections (its prefill section and
        open question 6) and differs only in rounding. Like ds4, any prefill resets the MTP raw-row counter."""
        tokens = list(tokens)
        if not tokens:
            raise Ds4Error("prefill needs at least one token")
        self.mtp_cache.n_raw = 0
        for t in tokens:
            logits = self.decode(t)
        return logits

    # -- Layer skeleton ---------------------------------------------------------------------

    def _layer(self, w: dict, p: str, X: np.ndarray, pos: int, token: int, cache, il: int,
               ratio: int) -> np.ndarray:
        """Attention sublayer then FFN sublayer, each wrapped in HC pre / HC post. `w` holds
        the block's tensors under prefix `p`; `cache` is its LayerCache (or the MTPCache)."""
        c = self.config
        y, A = hc_pre(X, w[p + "hc_attn_fn.weight"], w[p + "hc_attn_scale.weight"], w[p + "hc_attn_base.weight"], c)
        a = rms_norm(y, w[p + "attn_norm.weight"], c.rms_eps)
        X1 = hc_post(X, self._attention(w, p, a, pos, cache, ratio), A)
        y, B = hc_pre(X1, w[p + "hc_ffn_fn.weight"], w[p + "hc_ffn_scale.weight"], w[p + "hc_ffn_base.weight"], c)
        f = rms_norm(y, w[p + "ffn_norm.weight"], c.rms_eps)
        return hc_post(X1, self._ffn(w, p, f, token, il), B)

    # -- Attention ------------------------------------------------------------------------------

    def _attention(self, w: dict, p: str, a: np.ndarray, pos: int, cache, ratio: int) -> np.ndarray:
        """Query and KV paths, raw push, compressor updates and emissions (before attention),
        indexer selection, attention with sinks over raw + visible compressed rows, inverse RoPE,
        grouped output."""
        c, qat = self.config, self.qat
        rope = rope_for_layer(c, ratio)
        q, qn = query_path(a, w[p + "attn_q_a.weight"], w[p + "attn_q_a_norm.weight"],
                           w[p + "attn_q_b.weight"], rope, pos, c)
        kv = kv_path(a, w[p + "attn_kv.weight"], w[p + "attn_kv_a_norm.weight"], rope, pos, c, qat)
        rows = cache.push_raw(pos, kv)

        if ratio:
            comp = cache.attn_comp
            pooled = compressor_update(comp, a, w[p + "attn_compressor_kv.weight"],
                                       w[p + "attn_compressor_gate.weight"], w[p + "attn_compressor_ape.weight"], pos)
            if pooled is not None:
                comp.rows.append(finalize_comp_row(pooled, w[p + "attn_compressor_norm.weight"], rope,
                                                   pos + 1 - ratio, c, qat))
                comp.emit_positions.append(pos)
            selected = np.arange(comp.n_rows)
            if ratio == 4:
                selected = self._indexer(w, p, a, qn, pos, cache)
            cache.last_selected = selected
            if len(selected):
                rows = np.concatenate([rows, comp.stacked(c.head_dim)[selected]])

        o = attention_with_sinks(q, rows, w[p + "attn_sinks.weight"])
        o = apply_rope(o, -rope.theta(pos))  # inverse RoPE on each head's output (grouped output)
        return grouped_output(o, w[p + "attn_output_a.weight"], w[p + "attn_output_b.weight"], c.n_out_group)

    def _indexer(self, w: dict, p: str, a: np.ndarray, qn: np.ndarray, pos: int,
                 cache: LayerCache) -> np.ndarray:
        """The indexer compressor update (every token, in step with the attention compressor)
        and the selection of compressed rows for this query."""
        c = self.config
        irope = rope_for_layer(c, 4, indexer_rot_dims(c))
        icomp = cache.index_comp
        pooled = compressor_update(icomp, a, w[p + "indexer_compressor_kv.weight"],
                                   w[p + "indexer_compressor_gate.weight"], w[p + "indexer_compressor_ape.weight"], pos)
        if pooled is not None:
            icomp.rows.append(finalize_index_row(pooled, w[p + "indexer_compressor_norm.weight"], irope,
                                                 pos + 1 - icomp.ratio, c, self.qat))
            icomp.emit_positions.append(pos)
        return indexer_select(cache.n_comp, c.indexer_top_k, lambda: indexer_scores(
            qn, a, w[p + "indexer.attn_q_b.weight"], w[p + "indexer.proj.weight"],
            icomp.stacked(c.indexer_head_dim), irope, pos, c, self.qat))

    # -- FFN ----------------------------------------------------------------------------------

    def _ffn(self, w: dict, p: str, f: np.ndarray, token: int, il: int) -> np.ndarray:
        """Router (hash rows when the layer has ffn_gate_tid2eid, else biased top-k), routed
        experts plus the shared expert."""
        c = self.config
        tid2eid = w.get(p + "ffn_gate_tid2eid.weight")
        ids, weights = router(f, w[p + "ffn_gate_inp.weight"], w.get(p + "exp_probs_b.bias"),
                              None if tid2eid is None else tid2eid[token], c.n_expert_used, c.expert_weights_scale)
        clamp = c.swiglu_clamp[il]
        y = routed_experts(f, ids, weights, w[p + "ffn_gate_exps.weight"], w[p + "ffn_up_exps.weight"],
                           w[p + "ffn_down_exps.weight"], clamp)
        return y + shared_expert(f, w[p + "ffn_gate_shexp.weight"], w[p + "ffn_up_shexp.weight"],
                                 w[p + "ffn_down_shexp.weight"], clamp)

    # -- MTP ---------------------------------------------------------------------------------

    def mtp_draft(self, mtp_weights: dict[str, np.ndarray], hc_state: np.ndarray, token: int,
                  pos: int) -> np.ndarray:
        """One MTP step: input from (token, hc_state), the mtp.0 block run as layer il = 1
        (ratio 0: raw window only with the MTP's own cache, RoPE base rope_freq_base without YaRN,
        biased top-k routing since no tid2eid is bound), then the head with mtp.0.hc_head_* and
        mtp.0.norm over the base `output` matrix. Returns the draft logits; the block's output HC
        state is kept in `self.mtp_hc`.

        ds4's calls: after decoding x_p, (hc_state = final_hc, token = x_p, pos = p); recursive
        drafts use (self.mtp_hc, previous draft, p + n)."""
        c = self.config
        mw = {**{k: self.w[k] for k in ("token_embd.weight", "output.weight")}, **_as_reference_arrays(mtp_weights)}
        pm = "mtp.0."
        X = mtp_input(mw["token_embd.weight"][int(token)], np.asarray(hc_state, dtype=np.float64),
                      mw[pm + "enorm.weight"], mw[pm + "e_proj.weight"], mw[pm + "hnorm.weight"],
                      mw[pm + "h_proj.weight"], c)
        X = self._layer(mw, pm, X, int(pos), int(token), self.mtp_cache, 1, 0)
        self.mtp_hc = X
        return output_head(X, mw[pm + "hc_head_fn.weight"], mw[pm + "hc_head_scale.weight"],
                           mw[pm + "hc_head_base.weight"], mw[pm + "norm.weight"], mw["output.weight"], c)


def _as_reference_arrays(weights: dict) -> dict[str, np.ndarray]:
    """Float tensors as float64 (no copy when they already are), integer tensors unchanged."""
    out = {}
    for k, v in weights.items():
        v = np.asarray(v)
        out[k] = v if np.issubdtype(v.dtype, np.integer) else v.astype(np.float64, copy=False)
    return out


# =================================================================================================
# Loading
# =================================================================================================

def load_reference_weights(model_file, max_elements: int = 1 << 27) -> dict[str, np.ndarray]:
    """{name: array} for the reference from an opened `ds4.loader.ModelFile` (base or MTP): float
    tensors and dequantised quant types as float64 in (out, in) order, I32 tensors as int64.

    Meant for tiny models: refuses files with more than `max_elements` weights (float64 copies)."""
    total = sum(int(np.prod(t.dims)) for t in model_file.tensors.values())
    if total > max_elements:
        raise Ds4Error(f"{model_file.path}: {total} weights is too many for the float64 reference "
                       f"(limit {max_elements}); it is meant for tiny models")
    out: dict[str, np.ndarray] = {}
    for name, t in model_file.tensors.items():
        data = t.data()
        if t.qtype == QT.I32:
            out[name] = np.array(data, dtype=np.int64)
        elif t.qtype in (QT.F32, QT.F16):
            out[name] = np.array(data, dtype=np.float64)
        else:
            out[name] = dequantize(data, t.qtype).astype(np.float64)
    return out
