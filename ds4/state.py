"""The state a DS4 step carries between tokens, in fixed-capacity device buffers.

Per layer, as values (a new array each step; a snapshot is a reference, so it costs nothing):
- `raw`: the sliding window, [n_swa, head_dim] rows of positions pos - n_swa .. pos - 1,
  oldest first (rows of positions below `start` unused);
- `comp` / `index`: compressor frontiers (compressed layers; `index` for indexed layers),
  the kv and score projections of positions pos - R .. pos - 1, oldest first, where R covers a
  window (ratio 128) or a window and the one before it (ratio 4, overlapping pooling).

Shared by every state of a session, in place: the compressed rows and indexer rows (`RowStore`),
O(context) in size. A step at position p0 writes rows only for windows w >= p0 // ratio, none
of which is complete before p0, so rows an older state uses are never touched while the
session runs forward. After a rewind and a different continuation they are; the store's
`tokens` record the token sequence its complete rows were computed from, and a state is usable
only while that sequence agrees with its own tokens (`RowStore.serves`). A snapshot that no
longer agrees is detected, never used silently: the session rebuilds (the reference engine's
"rebuild needed" rule).

Row counts follow from the position, so they cannot disagree with the rows.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import mlx.core as mx

from ds4.config import LayerKind, ModelConfig
from ds4.numerics import NEG_INF


def frontier_rows(kind: LayerKind) -> int:
    """Positions a compressor frontier keeps: the windows one compressed row pools."""
    return kind.windows * kind.ratio


def frontier_width(config: ModelConfig, kind: LayerKind, indexer: bool) -> int:
    return kind.windows * (config.indexer_head_dim if indexer else config.head_dim)


def windows_touched(n_tokens: int, ratio: int) -> int:
    """The most windows n consecutive positions can touch (the rows a chunk may write)."""
    return (n_tokens + ratio - 2) // ratio + 1


@dataclass(frozen=True)
class Frontier:
    kv: mx.array  # [R, Wc] compressor kv projections of positions pos - R .. pos - 1
    score: mx.array  # [R, Wc] score projections (+ ape) of the same positions

    @classmethod
    def empty(cls, rows: int, width: int) -> Frontier:
        return cls(mx.zeros((rows, width), mx.float32), mx.full((rows, width), NEG_INF, mx.float32))


@dataclass(frozen=True)
class LayerState:
    raw: mx.array  # [n_swa, head_dim]
    comp: Frontier | None = None
    index: Frontier | None = None

    def arrays(self) -> list[mx.array]:
        out = [self.raw]
        for f in (self.comp, self.index):
            if f is not None:
                out += [f.kv, f.score]
        return out


class RowStore:
    """Compressed and indexer rows of one session, written in place by the steps.

    `comp[il]` is [cap, head_dim] for compressed layers, `index[il]` [cap, indexer_head_dim] for
    indexed layers (None elsewhere); cap leaves room for the windows one chunk can touch past
    the context. `tokens` is the lineage: every row of a window whose last position is below
    len(tokens) was computed from these tokens.

    In-place writes need the buffers referenced only by the step's graph while it runs: a step
    `take`s them (the store lets go), and `put`s the step's outputs back before evaluating."""

    def __init__(self, config: ModelConfig, ctx: int, max_chunk: int):
        self.config, self.ctx, self.max_chunk = config, ctx, max_chunk
        self.reset()

    def reset(self) -> None:
        """Fresh buffers and no lineage (after a failed step: no row can be trusted)."""
        config, ctx = self.config, self.ctx
        self.comp: list[mx.array | None] = []
        self.index: list[mx.array | None] = []
        for il in range(config.n_layer):
            kind = config.layer_kind(il)
            cap = 0 if kind is LayerKind.SLIDING else ctx // kind.ratio + windows_touched(self.max_chunk, kind.ratio) + 1
            self.comp.append(mx.zeros((cap, config.head_dim), mx.float32) if cap else None)
            self.index.append(mx.zeros((cap, config.indexer_head_dim), mx.float32)
                              if kind is LayerKind.INDEXED else None)
        self.tokens: list[int] = []
        self._held = True

    @property
    def unit(self) -> int:
        """Positions per smallest window (the granularity of complete rows)."""
        ratios = [self.config.layer_kind(il).ratio for il in range(self.config.n_layer)]
        return min((r for r in ratios if r), default=0)

    def serves(self, tokens: tuple[int, ...] | list[int]) -> bool:
        """Whether the rows a state after `tokens` reads are the ones computed from them."""
        unit = self.unit
        if not unit:
            return True
        need = len(tokens) - len(tokens) % unit
        return len(self.tokens) >= need and tuple(self.tokens[:need]) == tuple(tokens[:need])

    def arrays(self) -> list[mx.array]:
        return [a for a in self.comp + self.index if a is not None]

    def take(self, p0: int) -> tuple[list, list]:
        """Hand the buffers to a step at p0 (rows from p0 on are about to be rewritten)."""
        if not self._held:
            raise RuntimeError("row store buffers are already taken by another step")
        del self.tokens[p0:]
        comp, index = self.comp, self.index
        self.comp, self.index, self._held = [None] * len(comp), [None] * len(index), False
        return comp, index

    def put(self, comp: list, index: list) -> None:
        """Take back the buffers (the step's lazy outputs, or the originals after a failure)."""
        self.comp, self.index, self._held = list(comp), list(index), True

    def record(self, p0: int, tokens) -> None:
        """After a step at p0 over `tokens` was evaluated: its rows are now in the store."""
        del self.tokens[p0:]
        self.tokens.extend(int(t) for t in tokens)


@dataclass(frozen=True)
class StepState:
    """The state after `pos` tokens: per-layer values plus the session's shared row store."""

    pos: int
    ctx: int
    layers: tuple[LayerState, ...]
    store: RowStore | None = None
    start: int = 0  # first position with a raw row (the MTP block's state may start mid-sequence)

    @classmethod
    def empty(cls, config: ModelConfig, ctx: int, store: RowStore | None, kinds=None, start: int = 0) -> StepState:
        """A state at position `start` with nothing in it; `kinds` (default: the model's layers)
        gives the layer kinds (the MTP block is one sliding-window layer)."""
        layers = []
        for kind in kinds or [config.layer_kind(il) for il in range(config.n_layer)]:
            raw = mx.zeros((config.n_swa, config.head_dim), mx.float32)
            comp = index = None
            if kind is not LayerKind.SLIDING:
                R = frontier_rows(kind)
                comp = Frontier.empty(R, frontier_width(config, kind, False))
                if kind is LayerKind.INDEXED:
                    index = Frontier.empty(R, frontier_width(config, kind, True))
            layers.append(LayerState(raw, comp, index))
        return cls(start, ctx, tuple(layers), store, start)

    def with_layers(self, pos: int, layers) -> StepState:
        return replace(self, pos=pos, layers=tuple(layers))

    def arrays(self) -> list[mx.array]:
        return [a for lc in self.layers for a in lc.arrays()]
