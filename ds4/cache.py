"""KV cache state of DS4 Flash, as immutable values (forward doc §6, layout doc §11.2).

A forward step takes a `ModelCache` and returns a new one; MLX arrays are values, so a snapshot
is just a reference to an old `ModelCache` and restoring it is an assignment: no copies, and no
way for a rejected speculative step to leave stale rows behind. Fixed-capacity buffers are
updated with `slice_update`, which MLX performs in place when nothing else holds the buffer.

Per layer: the raw sliding window (the last `n_swa` KV rows, oldest first, rows of negative
positions unused); for compressed layers the compressed rows (capacity ctx/ratio + 2, the first
`pos // ratio` valid) and the compressor frontier (kv and score rows of the open window, and
for ratio 4 the window before it); for ratio-4 layers the same again for the indexer stream.
Row counts follow from the position, so they cannot disagree with the rows.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import mlx.core as mx

from ds4.config import ModelConfig


@dataclass(frozen=True)
class CompressorState:
    rows: mx.array  # [cap, width] compressed rows
    kv: mx.array  # [coff * ratio, coff * width] frontier values
    score: mx.array  # [coff * ratio, coff * width] frontier scores (-inf where unfilled)

    @classmethod
    def empty(cls, cap: int, width: int, ratio: int) -> "CompressorState":
        coff = 2 if ratio == 4 else 1
        shape = (coff * ratio, coff * width)
        return cls(mx.zeros((cap, width), mx.float32), mx.zeros(shape, mx.float32),
                   mx.full(shape, float("-inf"), mx.float32))


@dataclass(frozen=True)
class LayerCache:
    raw: mx.array  # [n_swa, head_dim]: rows of positions pos - n_swa .. pos - 1
    comp: CompressorState | None = None
    index: CompressorState | None = None
    raw_start: int = 0  # first position with a raw row (the MTP cache may start mid-sequence)

    def arrays(self) -> list[mx.array]:
        out = [self.raw]
        for c in (self.comp, self.index):
            if c is not None:
                out += [c.rows, c.kv, c.score]
        return out


@dataclass(frozen=True)
class ModelCache:
    """The state after `pos` tokens: one LayerCache per layer."""

    pos: int
    ctx: int
    layers: tuple[LayerCache, ...]

    @classmethod
    def empty(cls, config: ModelConfig, ctx: int) -> "ModelCache":
        layers = []
        for il in range(config.n_layer):
            r = config.ratio(il)
            raw = mx.zeros((config.n_swa, config.head_dim), mx.float32)
            comp = index = None
            if r:
                comp = CompressorState.empty(ctx // r + 2, config.head_dim, r)
            if r == 4:
                index = CompressorState.empty(ctx // r + 2, config.indexer_head_dim, r)
            layers.append(LayerCache(raw, comp, index))
        return cls(0, ctx, tuple(layers))

    def with_layers(self, pos: int, layers) -> "ModelCache":
        return replace(self, pos=pos, layers=tuple(layers))

    def arrays(self) -> list[mx.array]:
        return [a for lc in self.layers for a in lc.arrays()]
