"""The attention sublayer of DS4 Flash over a fixed-shape step state.

A chunk of T consecutive tokens at device position p0 (T = 1 is a decode step): the query path
(low-rank q, per-head RMSNorm, RoPE), the single shared KV head (K = V, FP8 + f16 rounded, pushed
before attention so a token sees itself and the n_swa - 1 before it), the compressors, and
attention with a per-head sink logit over

- sliding layers: the raw window;
- compressed (ratio 128) layers: the window and every visible compressed row;
- indexed (ratio 4) layers: the window and the compressed rows the lightning indexer picks for
  each token, top_k of them gathered (all visible rows while there are at most top_k).

Compressed rows are read from the first `rows` entries of the session's row store (a bucket
that covers the chunk's last position, so a step's cost follows the position, not the allocated
context); rows a token cannot see yet are masked. Masks and RoPE angles come from p0 on the
device: shapes depend only on T and the bucket.

A chunk gives what feeding its tokens one at a time gives: the window, emissions and indexer
choices are per token, in position order (decode, verify and prefill share one policy, the
lesson of ds4 #915). Under `kernels.row_invariant()` every per-token product has the shape it
has in a 1-token step, so a verify row equals a decode step bit for bit on any backend whose
kernels are deterministic.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import mlx.core as mx

from ds4 import compressor, kernels
from ds4.config import LayerKind, ModelConfig
from ds4.numerics import NEG_INF, Numerics, index_qat, iota, kv_row_qat, rms_norm, topk_lowest_index
from ds4.rope import Rotation
from ds4.state import LayerState

# Bytes one block of queries may spend on [queries, heads, rows] scores or gathered rows; long
# prefill chunks go through attention in blocks of queries to stay within it.
BLOCK_BYTES = 1 << 26


@dataclass(frozen=True)
class ChunkRows:
    """What a chunk adds to one layer's state, per token: enough to build the state after any
    first n tokens without another pass (a partially accepted speculative verify)."""

    kv: mx.array  # [T, head_dim] raw KV rows, as cached
    comp: tuple[mx.array, mx.array] | None = None  # attention compressor (kv, score) [T, Wc]
    index: tuple[mx.array, mx.array] | None = None  # indexer compressor (kv, score) [T, Wc]

    def state_after(self, before: LayerState, n: int, keys: mx.array | None = None) -> LayerState:
        """The layer's state after the chunk's first n tokens (its rows are already stored);
        `keys` may bring the window rows followed by the chunk's, when already built."""
        W = before.raw.shape[0]
        keys = mx.concatenate([before.raw, self.kv[:n]]) if keys is None else keys
        raw = keys[n:n + W]
        comp = compressor.advance(before.comp, *self.comp, n) if self.comp is not None else None
        index = compressor.advance(before.index, *self.index, n) if self.index is not None else None
        return LayerState(raw, comp, index)


def _query_block(n_tokens: int, per_query_bytes: int) -> int:
    return max(1, min(n_tokens, BLOCK_BYTES // max(1, per_query_bytes)))


def attend(q: mx.array, shared: mx.array, shared_mask: mx.array, sinks: mx.array,
           own: mx.array | None = None, own_mask: mx.array | None = None) -> mx.array:
    """Softmax attention with sinks of q [T, H, D] over rows shared by every query [K1, D]
    (mask [T, K1]) and, optionally, rows of each query's own [T, K2, D] (mask [T, K2]). Every
    row is key and value; the sink adds mass to the denominator and has no value. Through the
    kernel table (op "attention")."""
    return kernels.lookup("attention")(q, shared, shared_mask, sinks, own, own_mask)


def _attend_reference(q, shared, shared_mask, sinks, own, own_mask) -> mx.array:
    scale = 1.0 / math.sqrt(q.shape[-1])
    s1 = mx.where(shared_mask[:, None, :], kernels.matmul_rows(q, shared.T) * scale, NEG_INF)
    m = mx.maximum(mx.max(s1, axis=-1, keepdims=True), sinks[None, :, None])
    if own is not None:
        s2 = mx.where(own_mask[:, None, :], (q @ own.swapaxes(-1, -2)) * scale, NEG_INF)
        m = mx.maximum(m, mx.max(s2, axis=-1, keepdims=True))
    p1 = mx.exp(s1 - m)
    denom = mx.exp(sinks[None, :, None] - m) + mx.sum(p1, axis=-1, keepdims=True)
    out = kernels.matmul_rows(p1, shared)
    if own is not None:
        p2 = mx.exp(s2 - m)
        denom = denom + mx.sum(p2, axis=-1, keepdims=True)
        out = out + p2 @ own
    return out / denom


def _attend_fused(q, shared, shared_mask, sinks, own, own_mask) -> mx.array:
    """MLX's fused attention with sinks: one kernel on GPUs. Each query is its own batch entry
    (its keys: the shared rows, then its own)."""
    T, H, D = q.shape
    keys, mask = mx.broadcast_to(shared[None], (T, *shared.shape)), shared_mask
    if own is not None:
        keys, mask = mx.concatenate([keys, own], axis=1), mx.concatenate([shared_mask, own_mask], axis=1)
    out = mx.fast.scaled_dot_product_attention(q[:, :, None, :], keys[:, None], keys[:, None],
                                               scale=1.0 / math.sqrt(D), mask=mask[:, None, None, :], sinks=sinks)
    return out[:, :, 0, :]


kernels.register_reference("attention", _attend_reference)
for _device in ("metal", "cuda"):
    kernels.register("attention", None, _device, _attend_fused)


def _indexer_scores(w, config: ModelConfig, a: mx.array, qn: mx.array, rotation: Rotation,
                    numerics: Numerics) -> tuple[mx.array, mx.array]:
    """The lightning indexer's per-token query rows [T, HI, DI] and head weights [T, 1, HI]."""
    T = a.shape[0]
    H, D = config.n_indexer_head, config.indexer_head_dim
    q = index_qat(rotation.apply(w.indexer_attn_q_b(qn).reshape(T, H, D)), numerics)
    weights = w.indexer_proj(a) / math.sqrt(D * H)
    return q, weights[:, None, :]


def _select(q: mx.array, weights: mx.array, index_rows: mx.array, visible: mx.array, top_k: int) -> mx.array:
    """Per token, the top_k compressed rows by the indexer's score sum_h w_h relu(q_h . k), ties to
    the lower index, among rows [B, DI]; invisible rows score -inf. Returns row ids [T, top_k]."""
    dots = mx.maximum(kernels.matmul_rows(q, index_rows.T), 0.0)  # [T, HI, B]
    score = (weights @ dots)[:, 0, :]
    return topk_lowest_index(mx.where(visible, score, NEG_INF), top_k)


def attention(w, kind: LayerKind, config: ModelConfig, a: mx.array, state: LayerState, p0: mx.array,
              start: mx.array, stores: tuple, rows: int, n_positions: int, numerics: Numerics = Numerics()):
    """The attention sublayer for tokens p0..p0+T-1 with attn-normed input a [T, E].

    `stores` are the layer's (compressed rows, indexer rows) buffers (None where the layer has
    none) and `rows` how many of them the chunk may read. Returns (output [T, E], new
    LayerState, ChunkRows, updated stores)."""
    T = a.shape[0]
    H, D, W = config.n_head, config.head_dim, config.n_swa
    positions = p0 + iota(T)
    compressed = kind is not LayerKind.SLIDING
    rotation = Rotation.at(config, compressed, positions, D, n_positions)
    qn = rms_norm(w.attn_q_a(a), w.attn_q_a_norm, config.rms_eps)
    q = rotation.apply(rms_norm(w.attn_q_b(qn).reshape(T, H, D), None, config.rms_eps))
    kv = rotation.apply(rms_norm(w.attn_kv(a), w.attn_kv_a_norm, config.rms_eps))
    kv = kv_row_qat(kv, D - config.n_rot, numerics)

    # Raw window: rows of positions p0-W..p0-1, then this chunk's (pushed before attention).
    window = mx.concatenate([state.raw, kv])
    key_pos = p0 - W + iota(W + T)
    p = positions[:, None]
    window_mask = (key_pos[None] <= p) & (key_pos[None] > p - W) & (key_pos[None] >= start)

    comp_store, index_store = stores
    comp_in = index_in = None
    if kind is not LayerKind.SLIDING:
        r = kind.ratio
        comp_in = compressor.projections(w.attn_compressor_kv, w.attn_compressor_gate, w.attn_compressor_ape,
                                         a, positions, r)
        comp_store = compressor.emit(comp_store, state.comp, *comp_in, p0, w.attn_compressor_norm, config, kind,
                                     False, numerics, n_positions)
        if kind is LayerKind.INDEXED:
            index_in = compressor.projections(w.indexer_compressor_kv, w.indexer_compressor_gate,
                                              w.indexer_compressor_ape, a, positions, r)
            index_store = compressor.emit(index_store, state.index, *index_in, p0, w.indexer_compressor_norm,
                                          config, kind, True, numerics, n_positions)
    chunk = ChunkRows(kv, comp_in, index_in)

    if kind is LayerKind.SLIDING:
        o = _blocks(T, 4 * H * (W + T), lambda s: attend(q[s], window, window_mask[s], w.attn_sinks))
    else:
        comp_rows = comp_store[:rows]
        visible = iota(rows)[None, :] < ((positions + 1) // kind.ratio)[:, None]  # [T, rows]
        if kind is LayerKind.INDEXED and rows > config.indexer_top_k:
            rot_i = Rotation.at(config, True, positions, config.indexer_head_dim, n_positions)
            qi, wi = _indexer_scores(w, config, a, qn, rot_i, numerics)
            index_rows = index_store[:rows]
            k = config.indexer_top_k

            def sparse(s):
                picked = _select(qi[s], wi[s], index_rows, visible[s], k)
                own_mask = mx.take_along_axis(visible[s], picked, axis=-1)
                return attend(q[s], window, window_mask[s], w.attn_sinks, comp_rows[picked], own_mask)

            per_query = 4 * max(k * D, config.n_indexer_head * rows)
            o = _blocks(T, per_query, sparse)
        else:
            keys = mx.concatenate([window, comp_rows])
            mask = mx.concatenate([window_mask, visible], axis=1)
            o = _blocks(T, 4 * H * keys.shape[0], lambda s: attend(q[s], keys, mask[s], w.attn_sinks))

    o = rotation.apply(o, inverse=True)
    low = w.attn_output_a.grouped(o.reshape(T, config.n_out_group, -1))  # [T, G, o_lora_rank]
    new_state = chunk.state_after(state, T, window)
    return w.attn_output_b(low.reshape(T, -1)), new_state, chunk, (comp_store, index_store)


def _blocks(n_tokens: int, per_query_bytes: int, fn) -> mx.array:
    """fn over slices of the queries, in blocks that keep per-block scores within BLOCK_BYTES."""
    block = _query_block(n_tokens, per_query_bytes)
    if block >= n_tokens:
        return fn(slice(0, n_tokens))
    return mx.concatenate([fn(slice(t, min(t + block, n_tokens))) for t in range(0, n_tokens, block)])
