"""The MTP (multi-token prediction) head of DS4 Flash and the state it keeps beside the trunk.

One extra block, bound from the `mtp.0.*` tensors of the MTP GGUF, run as an uncompressed
sliding-window layer (layer-1 semantics: RoPE base 10000, biased top-k routing) with its own
raw window. It shares the base model's token embedding and output head.

Pairing (DeepSeek-V3 convention): the row at position q takes the trunk's final HC state h_q and
the embedding of token q+1, and its logits predict token q+2. So after the trunk commits tokens
up to position p, the MTP block holds rows for positions up to p - 1, and a draft for the token
after the next one pairs h_p with that next token. Setting DS4_MTP_PAIRING=same pairs h_q with
token q instead (what the reference engine's eval-time draft feeds), a diagnostic for comparing
acceptance on real weights.

`MTPState` is a value like the trunk's state (a snapshot is a reference): the session carries
one in every snapshot, so rewinds, restores and rejected drafts roll it back with the rest.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import partial

import mlx.core as mx

from ds4 import kernels
from ds4.config import LayerKind
from ds4.layout import MTP_PREFIX, mtp_tensor_specs
from ds4.loader import ModelFile
from ds4.model import LayerWeights, Model, bind_tensors, block, field_name, hc_head
from ds4.numerics import Numerics, rms_norm
from ds4.rope import table_positions
from ds4.state import LayerState, StepState


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
        self._compiled: dict = {}

    @classmethod
    def load(cls, mtp_file: ModelFile, base: Model, numerics: Numerics = Numerics()) -> MTPHead:
        """Bind a validated MTP GGUF's tensors to the device."""
        return cls(bind_tensors(mtp_file, mtp_tensor_specs(base.config), numerics), base, numerics)

    def empty_state(self, ctx: int, start: int = 0) -> StepState:
        """A block state whose first row will be at position `start`."""
        return StepState.empty(self.config, ctx, None, kinds=[LayerKind.SLIDING], start=start)

    def _rows(self, n_positions: int, head: bool, x: mx.array, hidden: mx.array, tokens: mx.array, p0: mx.array,
              start: mx.array, raw: mx.array):
        c = self.config
        X = self.e_proj(rms_norm(x, self.enorm, c.rms_eps))[:, None, :] + \
            self.h_proj(rms_norm(hidden, self.hnorm, c.rms_eps))
        X, state, _, _ = block(self.block, LayerKind.SLIDING, c, c.swiglu_clamp[0], X, tokens, p0, start,
                               LayerState(raw), (None, None), 0, n_positions, self.numerics)
        return (self.logits(X[-1:])[0] if head else None), X, state.raw

    def forward(self, hidden: mx.array, tokens, state: StepState, head: bool = True, compiled: bool = True):
        """MTP rows for positions state.pos.. from trunk (or MTP) HC states hidden [T, M, E] and
        the paired tokens [T]. Returns (logits [V] of the last row or None, new state, the
        block's output HC states [T, M, E]); lazy."""
        if not isinstance(tokens, mx.array):
            tokens = mx.array(list(tokens), dtype=mx.int32)
        T = tokens.shape[0]
        n_positions = table_positions(state.ctx + 8 * T + 256)
        fn = partial(self._rows, n_positions, head)
        if compiled and kernels.compile_steps():
            key = (T, head, n_positions)
            if key not in self._compiled:
                self._compiled[key] = mx.compile(fn)
            fn = self._compiled[key]
        logits, X, raw = fn(self.base.embed(tokens), hidden, tokens, mx.array(state.pos, mx.int32),
                            mx.array(state.start, mx.int32), state.layers[0].raw)
        return logits, state.with_layers(state.pos + T, [LayerState(raw)]), X

    def logits(self, X: mx.array) -> mx.array:
        """The head: HC collapse, norm and the shared vocabulary projection, [T, M, E] -> [T, V]."""
        h = hc_head(X, *self.hc_head, self.config)
        return self.base.output(rms_norm(h, self.norm, self.config.rms_eps))


@dataclass(frozen=True)
class MTPState:
    """The MTP block's rows for the committed positions, and what drafting starts from.

    block: the block's state; its position is the trunk's minus one (DeepSeek-V3 pairing), or
        the trunk's (same-position pairing).
    hidden: the block's output HC state of its last row (same-position pairing only: drafts
        chain from it).
    """

    block: StepState
    hidden: mx.array | None = None

    @classmethod
    def empty(cls, head: MTPHead, ctx: int, start: int = 0) -> MTPState:
        return cls(head.empty_state(ctx, start))

    def advanced(self, head: MTPHead, last_hidden: mx.array | None, X: mx.array, tokens: tuple[int, ...]) -> MTPState:
        """The state after the trunk committed `tokens` whose HC states are X [T, M, E], the trunk
        having held `last_hidden` [M, E] (None at the start) before them. The rows that became
        complete are run now (lazily): position q pairs h_q with token q+1, so the new rows run
        from the old last position to the new second-to-last."""
        if same_position_pairing():
            _, block, M = head.forward(X, tokens, self.block, head=False)
            return MTPState(block, M[-1])
        hidden = X[:-1] if last_hidden is None else mx.concatenate([last_hidden[None], X[:-1]])
        paired = tokens if last_hidden is not None else tokens[1:]
        if not paired:
            return self
        _, block, _ = head.forward(hidden, paired, self.block, head=False)
        return MTPState(block)

    def ready(self, trunk_pos: int) -> bool:
        """Whether a draft can follow the trunk at `trunk_pos` (the rows are in step with it)."""
        return self.block.pos == (trunk_pos if same_position_pairing() else trunk_pos - 1)

    def arrays(self) -> list[mx.array]:
        return self.block.arrays() + ([self.hidden] if self.hidden is not None else [])
