"""The MoE FFN sublayer of DS4 Flash: sqrt-softplus router with token-hash routing on the first
layers and biased top-k elsewhere, routed SwiGLU experts with the clamp, and the always-on
shared expert. Every step is per token (no host sync, row-invariant)."""

from __future__ import annotations

import mlx.core as mx

from ds4 import kernels
from ds4.numerics import topk_lowest_index
from ds4.quant import SUPPORTED, QuantExperts

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


def expert_swiglu(gate, up, f: mx.array, ids: mx.array, weights: mx.array, clamp: float) -> mx.array:
    """The route-weighted SwiGLU of each row's experts, [T, k, n_ff]: swiglu(f @ gate[e].T,
    f @ up[e].T) * weight. Through the kernel table (op "expert_swiglu", keyed by the gate's quant
    type; None for activation-quantized experts)."""
    qtype = gate.qtype.name if isinstance(gate, QuantExperts) else None
    return kernels.lookup("expert_swiglu", qtype)(gate, up, f, ids, weights, clamp)


def _expert_swiglu_reference(gate, up, f: mx.array, ids: mx.array, weights: mx.array, clamp: float) -> mx.array:
    mid = swiglu(gate.gather_matmul(f, ids), up.gather_matmul(f, ids), clamp)
    return mid * weights[..., None]  # the route weight goes in before the down projection


for _qtype in [None, *(t.name for t in SUPPORTED)]:
    kernels.register_reference("expert_swiglu", _expert_swiglu_reference, _qtype)


def moe(w, config, clamp: float, f: mx.array, tokens: mx.array) -> mx.array:
    """FFN output [T, E] for ffn-normed inputs f [T, E] of tokens [T]."""
    ids, weights = route(w, config, f, tokens)
    mid = expert_swiglu(w.ffn_gate_exps, w.ffn_up_exps, f, ids, weights, clamp)
    routed = mx.sum(w.ffn_down_exps.gather_matmul(mid, ids), axis=1)
    shared = w.ffn_down_shexp(swiglu(w.ffn_gate_shexp(f), w.ffn_up_shexp(f), clamp))
    return routed + shared
