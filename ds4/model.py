"""The DS4 Flash forward pass in MLX (forward doc §3-§8): weights bound once from a validated
GGUF, the hyper-connection residual, the layer skeleton and the output head.

`Model.forward(tokens, cache)` runs a chunk of consecutive tokens (one token is a decode step)
layer-major and returns the logits, the new cache and the trunk's final HC state. A chunk gives
exactly what feeding its tokens one at a time gives; only the float reduction order differs.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import numpy as np
from gguf import GGMLQuantizationType as QT

from ds4.attention import Numerics, attention, rms_norm
from ds4.cache import ModelCache
from ds4.config import ModelConfig
from ds4.layout import TensorSpec, base_optional_specs, base_tensor_specs
from ds4.loader import ModelFile
from ds4.moe import moe
from ds4.quant import ActQuantized, QuantExperts, QuantWeight

LAYER_FIELDS = (
    "hc_attn_fn", "hc_attn_scale", "hc_attn_base", "attn_norm", "attn_q_a", "attn_q_a_norm", "attn_q_b",
    "attn_kv", "attn_kv_a_norm", "attn_sinks", "attn_output_a", "attn_output_b",
    "attn_compressor_ape", "attn_compressor_kv", "attn_compressor_gate", "attn_compressor_norm",
    "indexer_attn_q_b", "indexer_proj", "indexer_compressor_ape", "indexer_compressor_kv",
    "indexer_compressor_gate", "indexer_compressor_norm",
    "hc_ffn_fn", "hc_ffn_scale", "hc_ffn_base", "ffn_norm", "ffn_gate_inp", "exp_probs_b",
    "ffn_gate_tid2eid", "ffn_gate_exps", "ffn_up_exps", "ffn_down_exps",
    "ffn_gate_shexp", "ffn_up_shexp", "ffn_down_shexp",
)


class LayerWeights:
    """One block's weights; attributes repeat the GGUF names (`blk.L.` and `.weight`/`.bias`
    dropped, dots as underscores). Tensors a layer kind does not have are None."""

    def __init__(self, **tensors):
        for name in LAYER_FIELDS:
            setattr(self, name, tensors.get(name))


def field_name(gguf_name: str, prefix: str) -> str:
    name = gguf_name[len(prefix):]
    for suffix in (".weight", ".bias"):
        name = name.removesuffix(suffix)
    return name.replace(".", "_")


def bind_tensor(model: ModelFile, spec: TensorSpec, numerics: Numerics = Numerics()):
    """A GGUF tensor as what the forward uses: a QuantWeight for matrices, QuantExperts for
    routed experts, float32 arrays for vectors and the compressor position biases, int32 for
    the hash-routing table. With `numerics.act_quant`, Q8_0 matrices and IQ2_XXS/Q2_K experts
    see their inputs int8-quantized as on ds4's CPU path."""
    t = model.tensors[spec.name]
    data = t.data()
    if spec.role == "routed":
        n_in, n_out, n_expert = t.dims
        experts = QuantExperts(data, QT(t.qtype), (n_expert, n_out, n_in))
        if numerics.act_quant and t.qtype in (QT.IQ2_XXS, QT.Q2_K):
            return ActQuantized(experts, "q8_k")
        return experts
    if spec.role in ("tid2eid", "embed"):  # row lookups: the table as stored (I32, F16)
        return mx.array(np.ascontiguousarray(data))
    if len(t.dims) == 1 or spec.role == "ape":
        return mx.array(np.asarray(data, dtype=np.float32))
    n_in, n_out = t.dims
    weight = QuantWeight(data, QT(t.qtype), (n_out, n_in))
    return ActQuantized(weight, "q8_0") if numerics.act_quant and t.qtype == QT.Q8_0 else weight


@dataclass
class HCMix:
    """HC pre's outputs for one sublayer: the input mix, post gates and combine matrix."""

    y: mx.array  # [T, E]
    post: mx.array  # [T, M]
    comb: mx.array  # [T, M, M]: comb[i, j] moves source stream i into destination stream j


def hc_pre(X: mx.array, fn: QuantWeight, scale: mx.array, base: mx.array, config: ModelConfig) -> HCMix:
    """§4.1: mix the M streams X [T, M, E] into one sublayer input, with Sinkhorn-normalised
    combine weights for HC post."""
    T, M, E = X.shape
    eps = config.hc_eps
    mix = fn(rms_norm(X.reshape(T, M * E), None, config.rms_eps))  # [T, 2M + M*M]
    pre = mx.sigmoid(mix[:, :M] * scale[0] + base[:M]) + eps
    post = 2.0 * mx.sigmoid(mix[:, M:2 * M] * scale[1] + base[M:2 * M])
    comb = (mix[:, 2 * M:] * scale[2] + base[2 * M:]).reshape(T, M, M)
    comb = mx.softmax(comb, axis=-1, precise=True) + eps
    comb = comb / (mx.sum(comb, axis=-2, keepdims=True) + eps)
    for _ in range(config.hc_sinkhorn_iters - 1):
        comb = comb / (mx.sum(comb, axis=-1, keepdims=True) + eps)
        comb = comb / (mx.sum(comb, axis=-2, keepdims=True) + eps)
    y = mx.sum(pre[:, :, None] * X, axis=1)
    return HCMix(y, post, comb)


def hc_post(out: mx.array, X: mx.array, mix: HCMix) -> mx.array:
    """§4.2: X'[j] = post_j * out + sum_i comb[i, j] * X[i]; the residual path of every sublayer."""
    return mix.post[:, :, None] * out[:, None, :] + mx.einsum("tij,tie->tje", mix.comb, X)


def hc_head(X: mx.array, fn: QuantWeight, scale: mx.array, base: mx.array, config: ModelConfig) -> mx.array:
    """§4.4: collapse the streams with sigmoid gates (no Sinkhorn): [T, M, E] -> [T, E]."""
    T, M, E = X.shape
    q = fn(rms_norm(X.reshape(T, M * E), None, config.rms_eps))
    w = mx.sigmoid(q * scale[0] + base) + config.hc_eps
    return mx.sum(w[:, :, None] * X, axis=1)


def block(w: LayerWeights, config: ModelConfig, ratio: int, clamp: float, X: mx.array, tokens: mx.array,
          p0: int, lc, numerics: Numerics):
    """One layer (§4.3): HC-wrapped attention then HC-wrapped MoE. Returns (X', new LayerCache,
    the chunk's ChunkRows)."""
    a_mix = hc_pre(X, w.hc_attn_fn, w.hc_attn_scale, w.hc_attn_base, config)
    a = rms_norm(a_mix.y, w.attn_norm, config.rms_eps)
    out, lc, chunk = attention(w, config, ratio, a, p0, lc, numerics)
    X = hc_post(out, X, a_mix)
    f_mix = hc_pre(X, w.hc_ffn_fn, w.hc_ffn_scale, w.hc_ffn_base, config)
    f = rms_norm(f_mix.y, w.ffn_norm, config.rms_eps)
    return hc_post(moe(w, config, clamp, f, tokens), X, f_mix), lc, chunk


class Model:
    """DS4 Flash weights on the MLX device and the forward pass over them.

    `tensors` maps GGUF tensor names to what the forward multiplies by: QuantWeight/QuantExperts
    bound from a file (`Model.load`), or float weights with the same interface (the trainer)."""

    def __init__(self, config: ModelConfig, tensors: dict, numerics: Numerics = Numerics()):
        self.config = c = config
        self.numerics = numerics
        self.layers = []
        for il in range(c.n_layer):
            prefix = f"blk.{il}."
            self.layers.append(LayerWeights(**{field_name(n, prefix): v for n, v in tensors.items()
                                               if n.startswith(prefix)}))
        self.token_embd = tensors["token_embd.weight"]
        self.output_hc_fn = tensors["output_hc_fn.weight"]
        self.output_hc_scale = tensors["output_hc_scale.weight"]
        self.output_hc_base = tensors["output_hc_base.weight"]
        self.output_norm = tensors["output_norm.weight"]
        self.output = tensors["output.weight"]

    @classmethod
    def load(cls, model_file: ModelFile, numerics: Numerics = Numerics()) -> Model:
        """Bind a validated base GGUF's tensors to the device."""
        c = model_file.config
        specs = base_tensor_specs(c) + [s for s in base_optional_specs(c) if s.name in model_file.tensors]
        return cls(c, {s.name: bind_tensor(model_file, s, numerics) for s in specs}, numerics)

    def embed(self, tokens: mx.array) -> mx.array:
        """§3 steps 1-2: every HC stream starts as the token's embedding, [T, M, E]."""
        e = self.token_embd[tokens].astype(mx.float32)
        return mx.broadcast_to(e[:, None, :], (e.shape[0], self.config.n_hc, e.shape[1]))

    def head(self, X: mx.array) -> mx.array:
        """§8: HC collapse, final norm and the vocabulary projection: [T, M, E] -> logits [T, V]."""
        h = hc_head(X, self.output_hc_fn, self.output_hc_scale, self.output_hc_base, self.config)
        return self.output(rms_norm(h, self.output_norm, self.config.rms_eps))

    def forward(self, tokens, cache: ModelCache, all_logits: bool = False):
        """Run tokens (a list or int array) at positions cache.pos.. through the model.

        Returns (logits [T or 1, V] (every row or only the last), new cache, final HC [T, M, E]).
        """
        return self.run(tokens, cache, all_logits)[:3]

    def run(self, tokens, cache: ModelCache, all_logits: bool = False):
        """`forward`, plus each layer's ChunkRows (for `cache_after`)."""
        c = self.config
        tok = tokens if isinstance(tokens, mx.array) else mx.array(np.asarray(tokens, dtype=np.int32))
        p0 = cache.pos
        X = self.embed(tok)
        layers, chunks = [], []
        for il, (w, lc) in enumerate(zip(self.layers, cache.layers)):
            X, lc, chunk = block(w, c, c.ratio(il), c.swiglu_clamp[il], X, tok, p0, lc, self.numerics)
            layers.append(lc)
            chunks.append(chunk)
        logits = self.head(X if all_logits else X[-1:])
        return logits, cache.with_layers(p0 + len(tokens), layers), X, chunks

    def cache_after(self, cache: ModelCache, chunks: list, n: int) -> ModelCache:
        """The cache after the first n tokens of the chunk that `run` fed on `cache`."""
        layers = [ch.cache_after(w, self.config, n, self.numerics) for w, ch in zip(self.layers, chunks)]
        return cache.with_layers(cache.pos + n, layers)
