"""The MTP (multi-token prediction) head of DS4 Flash (forward doc §11).

One extra block, bound from the `mtp.0.*` tensors of the MTP GGUF, run as an uncompressed
sliding-window layer (layer-1 semantics: RoPE base 10000, biased top-k routing) with its own raw
KV cache. It shares the base model's token embedding and output head.

Pairing (DeepSeek-V3 convention): the row at position q takes the trunk's final HC state h_q and
the embedding of token q+1, and its logits predict token q+2. Setting DS4_MTP_PAIRING=same pairs
h_q with token q instead (what the reference engine's eval-time draft feeds, doc open question
1), a diagnostic for comparing acceptance on real weights.
"""

from __future__ import annotations

import os

import mlx.core as mx

from ds4.attention import Numerics, rms_norm
from ds4.cache import LayerCache, ModelCache
from ds4.layout import MTP_PREFIX, mtp_tensor_specs
from ds4.loader import ModelFile
from ds4.model import LayerWeights, Model, bind_tensor, block, field_name, hc_head


def same_position_pairing() -> bool:
    """The diagnostic switch: pair h_q with token q (the reference engine's draft input)."""
    return os.environ.get("DS4_MTP_PAIRING", "") == "same"


class MTPHead:
    """The MTP block and head on the device, drafting for a base `Model`."""

    def __init__(self, tensors: dict, base: Model, numerics: Numerics = Numerics()):
        self.base = base
        self.config = base.config
        self.block = LayerWeights(**{field_name(n, MTP_PREFIX): v for n, v in tensors.items()})
        p = MTP_PREFIX
        self.e_proj, self.h_proj = tensors[p + "e_proj.weight"], tensors[p + "h_proj.weight"]
        self.enorm, self.hnorm, self.norm = tensors[p + "enorm.weight"], tensors[p + "hnorm.weight"], tensors[p + "norm.weight"]
        self.hc_head = (tensors[p + "hc_head_fn.weight"], tensors[p + "hc_head_scale.weight"],
                        tensors[p + "hc_head_base.weight"])
        self.numerics = numerics

    @classmethod
    def load(cls, mtp_file: ModelFile, base: Model, numerics: Numerics = Numerics()) -> MTPHead:
        """Bind a validated MTP GGUF's tensors to the device."""
        return cls({s.name: bind_tensor(mtp_file, s, numerics) for s in mtp_tensor_specs(base.config)},
                   base, numerics)

    def empty_cache(self, ctx: int, start: int = 0) -> ModelCache:
        """An MTP cache whose first row will be at position `start`."""
        raw = mx.zeros((self.config.n_swa, self.config.head_dim), mx.float32)
        return ModelCache(start, ctx, (LayerCache(raw, raw_start=start),))

    def forward(self, hidden: mx.array, tokens, cache: ModelCache, head: bool = True):
        """MTP rows for positions cache.pos.. from trunk (or MTP) HC states hidden [T, M, E] and
        the paired tokens [T]. Returns (logits [V] of the last row or None, new cache, the
        block's output HC states [T, M, E])."""
        c = self.config
        tok = tokens if isinstance(tokens, mx.array) else mx.array(list(tokens), dtype=mx.int32)
        e = self.base.token_embd[tok].astype(mx.float32)
        X = self.e_proj(rms_norm(e, self.enorm, c.rms_eps))[:, None, :] + \
            self.h_proj(rms_norm(hidden, self.hnorm, c.rms_eps))
        X, lc, _ = block(self.block, c, 0, c.swiglu_clamp[0], X, tok, cache.pos, cache.layers[0], self.numerics)
        new_cache = cache.with_layers(cache.pos + X.shape[0], [lc])
        return (self.logits(X[-1:])[0] if head else None), new_cache, X

    def logits(self, X: mx.array) -> mx.array:
        """The head: HC collapse, norm and the shared vocabulary projection, [T, M, E] -> [T, V]."""
        h = hc_head(X, *self.hc_head, self.config)
        return self.base.output(rms_norm(h, self.norm, self.config.rms_eps))
