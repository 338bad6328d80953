"""The MoE FFN sublayer of DS4 Flash: sqrt-softplus router with token-hash routing on the first
layers and biased top-k elsewhere, routed SwiGLU experts with the clamp, and the always-on
shared expert. Every step is per token (no host sync, row-invariant)."""

from __future__ import annotations

import mlx.core as mx

from ds4.numerics import topk_lowest_index

MIN_WEIGHT_SUM = 6.1035e-5  # ds4's floor on the sum of the selected probabilities


def softplus(z: mx.array) -> mx.array:
    """ds4's softplus: z above 20, exp(z) below -20, log1p(exp(z)) between."""
    mid = mx.log1p(mx.exp(mx.clip(z, -20.0, 20.0)))
    return mx.where(z > 20.0, z, mx.where(z < -20.0, mx.exp(z), mid))


def route(w, config, f: mx.array, tokens: mx.array) -> tuple[mx.array, mx.array]:
    """(expert ids [T, k], routing weights [T, k]) for ffn-normed inputs f [T, E].

    Hash layers take the token's row of `tid2eid`; the others the top-k of probs + bias (the
    bias steers selection only). Weights use the unbiased probs, normalised and scaled."""
    probs = mx.sqrt(softplus(w.ffn_gate_inp(f)))
    if w.ffn_gate_tid2eid is not None:
        ids = w.ffn_gate_tid2eid[tokens]
    else:
        biased = probs if w.exp_probs_b is None else probs + w.exp_probs_b
        ids = topk_lowest_index(biased, config.n_expert_used)
    chosen = mx.take_along_axis(probs, ids, axis=-1)
    total = mx.maximum(mx.sum(chosen, axis=-1, keepdims=True), MIN_WEIGHT_SUM)
    return ids, chosen / total * config.expert_weights_scale


def swiglu(gate: mx.array, up: mx.array, clamp: float) -> mx.array:
    """silu(min(gate, clamp)) * clip(up, -clamp, clamp)."""
    gate = mx.minimum(gate, clamp)
    return gate * mx.sigmoid(gate) * mx.clip(up, -clamp, clamp)


def moe(w, config, clamp: float, f: mx.array, tokens: mx.array) -> mx.array:
    """FFN output [T, E] for ffn-normed inputs f [T, E] of tokens [T]."""
    ids, weights = route(w, config, f, tokens)
    mid = swiglu(w.ffn_gate_exps.gather_matmul(f, ids), w.ffn_up_exps.gather_matmul(f, ids), clamp)
    mid = mid * weights[..., None]  # the route weight goes in before the down projection
    routed = mx.sum(w.ffn_down_exps.gather_matmul(mid, ids), axis=1)
    shared = w.ffn_down_shexp(swiglu(w.ffn_gate_shexp(f), w.ffn_up_shexp(f), clamp))
    return routed + shared
