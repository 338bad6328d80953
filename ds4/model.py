"""The DS4 Flash forward pass in MLX: weights bound once from a validated GGUF, the
hyper-connection residual, the layer skeleton, the output head, and the compiled step.

`Model.step(tokens, state)` runs a chunk of consecutive tokens (one token is a decode step)
after a `StepState` and returns a `StepOut`: logits (the last row, or every row for a verify),
their argmax and finiteness, the final HC states and the new state. The step is one graph,
compiled with `mx.compile` once per shape class: the token count, the position bucket (a
power of two covering the chunk's last position, which bounds the compressed rows it reads)
and whether every row's logits are wanted. The position itself is a device value, so a
compiled step is reused at every position of its bucket. `Model.forward` is the same
function uncompiled (training differentiates through it).

A chunk gives exactly what feeding its tokens one at a time gives; only the float reduction
order differs, and for the decode and verify widths (up to MAX_VERIFY_ROWS tokens) not even
that: those steps trace under `kernels.row_invariant()`.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache, partial

import mlx.core as mx
import numpy as np
from gguf import GGMLQuantizationType as QT

from ds4 import kernels
from ds4.attention import ChunkRows, attention
from ds4.config import LayerKind, ModelConfig
from ds4.layout import TensorSpec, base_optional_specs, base_tensor_specs
from ds4.loader import ModelFile
from ds4.moe import moe
from ds4.numerics import Numerics, rms_norm
from ds4.quant import ActQuantized, QuantExperts, QuantWeight
from ds4.rope import table_positions
from ds4.state import Frontier, LayerState, RowStore, StepState

MAX_VERIFY_ROWS = 17  # decode and verify widths (1 + up to 16 drafts): traced row-invariant
MIN_BUCKET = 256  # smallest position bucket

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
    the hash-routing table, and the token embedding as the file's own rows on the host (a step
    reads T of them; the table never goes to the device). With `numerics.act_quant`, Q8_0
    matrices and IQ2_XXS/Q2_K experts see their inputs int8-quantized as on ds4's CPU path."""
    t = model.tensors[spec.name]
    data = t.data()
    if spec.role == "embed":
        return data
    if spec.role == "routed":
        n_in, n_out, n_expert = t.dims
        experts = QuantExperts(data, QT(t.qtype), (n_expert, n_out, n_in))
        if numerics.act_quant and t.qtype in (QT.IQ2_XXS, QT.Q2_K):
            return ActQuantized(experts, "q8_k")
        return experts
    if spec.role == "tid2eid":
        return mx.array(np.ascontiguousarray(data))
    if len(t.dims) == 1 or spec.role == "ape":
        return mx.array(np.asarray(data, dtype=np.float32))
    n_in, n_out = t.dims
    weight = QuantWeight(data, QT(t.qtype), (n_out, n_in))
    return ActQuantized(weight, "q8_0") if numerics.act_quant and t.qtype == QT.Q8_0 else weight


def bind_tensors(model: ModelFile, specs: list[TensorSpec], numerics: Numerics) -> dict:
    """Bind tensors one at a time, letting each one's file pages go once it is on the device
    (the embedding stays mapped: steps read its rows), so loading holds at most the device
    weights and one tensor's pages."""
    out = {}
    for spec in specs:
        out[spec.name] = bind_tensor(model, spec, numerics)
        if spec.role != "embed":
            model.tensors[spec.name].release()
    return out


# -- hyper-connections ------------------------------------------------------------------------

@dataclass
class HCMix:
    """HC pre's outputs for one sublayer: the input mix, post gates and combine matrix."""

    y: mx.array  # [T, E]
    post: mx.array  # [T, M]
    comb: mx.array  # [T, M, M]: comb[i, j] moves source stream i into destination stream j


def _slice_sum(x: mx.array, axis: int) -> mx.array:
    """Sum over a short axis as a sum of slices (keepdims): elementwise, so it fuses."""
    return _sum([x[(slice(None),) * axis + (slice(i, i + 1),)] for i in range(x.shape[axis])])


def sinkhorn(logits: mx.array, iters: int, eps: float) -> mx.array:
    """The combine matrix from its logits [T, M, M]: row softmax + eps, then column
    normalisation, then iters - 1 rounds of row and column normalisation, each dividing by
    (sum + eps). Through the kernel table (op "sinkhorn")."""
    return kernels.lookup("sinkhorn")(logits, iters, eps)


def _sinkhorn_reference(logits: mx.array, iters: int, eps: float) -> mx.array:
    c = mx.softmax(logits, axis=-1, precise=True) + eps
    c = c / (mx.sum(c, axis=-2, keepdims=True) + eps)
    for _ in range(iters - 1):
        c = c / (mx.sum(c, axis=-1, keepdims=True) + eps)
        c = c / (mx.sum(c, axis=-2, keepdims=True) + eps)
    return c


def _sinkhorn_fused(logits: mx.array, iters: int, eps: float) -> mx.array:
    """The same with every sum over the M = 4 axis written as a sum of slices: each
    normalisation is then one fused kernel in a compiled step, 41 launches instead of 80 (MLX
    fuses at most 11 ops deep, so not the whole loop). Slower than the reference on the CPU."""
    top = logits[:, :, :1]
    for j in range(1, logits.shape[2]):
        top = mx.maximum(top, logits[:, :, j:j + 1])
    e = mx.exp(logits - top)
    c = e / _slice_sum(e, 2) + eps
    c = c / (_slice_sum(c, 1) + eps)
    for _ in range(iters - 1):
        c = c / (_slice_sum(c, 2) + eps)
        c = c / (_slice_sum(c, 1) + eps)
    return c


kernels.register_reference("sinkhorn", _sinkhorn_reference)
for _device in ("metal", "cuda"):
    kernels.register("sinkhorn", None, _device, _sinkhorn_fused)


def _sum(terms: list[mx.array]) -> mx.array:
    total = terms[0]
    for t in terms[1:]:
        total = total + t
    return total


def _mix_streams(w: mx.array, X: mx.array) -> mx.array:
    """sum_m w[:, m] * X[:, m]: weights [T, M], streams [T, M, E] -> [T, E] (one fused kernel)."""
    return _sum([w[:, m:m + 1] * X[:, m, :] for m in range(X.shape[1])])


def hc_pre(X: mx.array, fn, scale: mx.array, base: mx.array, config: ModelConfig) -> HCMix:
    """Mix the M streams X [T, M, E] into one sublayer input, with Sinkhorn-normalised combine
    weights for HC post. Through the kernel table (op "hc_pre")."""
    return HCMix(*kernels.lookup("hc_pre")(X, fn, scale, base, config))


def _hc_pre_reference(X: mx.array, fn, scale: mx.array, base: mx.array, config: ModelConfig):
    """(y [T, E], post [T, M], comb [T, M, M]) with MLX ops."""
    T, M, E = X.shape
    eps = config.hc_eps
    # pre gates, post gates and combine logits in one elementwise pass over the 2M + M*M mix
    columns, is_gate, gate_mul, gate_add = _gate_constants(M, eps)
    z = _normed_mix(X, fn, config.rms_eps) * (scale @ columns) + base
    gates = mx.where(is_gate, mx.sigmoid(z) * gate_mul + gate_add, z)
    comb = sinkhorn(gates[:, 2 * M:].reshape(T, M, M), config.hc_sinkhorn_iters, eps)
    return _mix_streams(gates[:, :M], X), gates[:, M:2 * M], comb


@cache
def _gate_constants(M: int, eps: float) -> tuple[mx.array, ...]:
    """Per mix column: which of the 3 scales applies (one-hot [3, 2M + M*M]), whether it is a
    gate, and the gate's affine map: pre = sigmoid + eps, post = 2 sigmoid."""
    kind = np.repeat([0, 1, 2], [M, M, M * M])
    out = (np.eye(3, dtype=np.float32)[:, kind], kind < 2, np.where(kind == 0, 1.0, 2.0).astype(np.float32),
           np.where(kind == 0, eps, 0.0).astype(np.float32))
    arrays = tuple(mx.array(a) for a in out)
    mx.eval(*arrays)
    return arrays


def _normed_mix(X: mx.array, fn, eps: float) -> mx.array:
    """fn(RMSNorm(flat X)), the streams normalised first as ds4 does. (Scaling fn(flat X)
    afterwards is the same in exact arithmetic and saves a pass, but rounds differently: with
    ds4's int8 activation emulation it moved the seed-99 oracle logits by up to 0.08.)"""
    T, M, E = X.shape
    return fn(rms_norm(X.reshape(T, M * E), None, eps))


def hc_post(out: mx.array, X: mx.array, mix: HCMix) -> mx.array:
    """X'[j] = post_j * out + sum_i comb[i, j] * X[i]: the residual path of every sublayer.
    Through the kernel table (op "hc_post")."""
    return kernels.lookup("hc_post")(out, X, mix.post, mix.comb)


def _hc_post_reference(out: mx.array, X: mx.array, post: mx.array, comb: mx.array) -> mx.array:
    moved = _sum([comb[:, i, :, None] * X[:, i:i + 1, :] for i in range(X.shape[1])])
    return post[:, :, None] * out[:, None, :] + moved


kernels.register_reference("hc_pre", _hc_pre_reference)
kernels.register_reference("hc_post", _hc_post_reference)


def hc_head(X: mx.array, fn, scale: mx.array, base: mx.array, config: ModelConfig) -> mx.array:
    """Collapse the streams with sigmoid gates (no Sinkhorn): [T, M, E] -> [T, E]."""
    q = _normed_mix(X, fn, config.rms_eps)
    return _mix_streams(mx.sigmoid(q * scale[0:1] + base) + config.hc_eps, X)


def block(w: LayerWeights, kind: LayerKind, config: ModelConfig, clamp: float, X: mx.array, tokens: mx.array,
          p0: mx.array, start: mx.array, state: LayerState, stores: tuple, bucket: int, n_positions: int,
          numerics: Numerics):
    """One layer: HC-wrapped attention then HC-wrapped MoE. Returns (X', new LayerState,
    ChunkRows, updated stores)."""
    a_mix = hc_pre(X, w.hc_attn_fn, w.hc_attn_scale, w.hc_attn_base, config)
    a = rms_norm(a_mix.y, w.attn_norm, config.rms_eps)
    rows = 0 if kind is LayerKind.SLIDING else min(bucket // kind.ratio, stores[0].shape[0])
    out, state, chunk, stores = attention(w, kind, config, a, state, p0, start, stores, rows, n_positions, numerics)
    X = hc_post(out, X, a_mix)
    f_mix = hc_pre(X, w.hc_ffn_fn, w.hc_ffn_scale, w.hc_ffn_base, config)
    f = rms_norm(f_mix.y, w.ffn_norm, config.rms_eps)
    return hc_post(moe(w, config, clamp, f, tokens), X, f_mix), state, chunk, stores


# -- the step -------------------------------------------------------------------------------------

def position_bucket(end: int) -> int:
    """Positions a step ending at `end` may read compressed rows for: a power of two."""
    return max(MIN_BUCKET, 1 << max(0, end - 1).bit_length())


@dataclass(frozen=True)
class StepSpec:
    """The static shape class of a compiled step."""

    n_tokens: int
    bucket: int  # position bucket
    all_logits: bool  # logits for every row (verify), else the last row only
    n_positions: int  # RoPE table size

    @property
    def row_invariant(self) -> bool:
        return self.n_tokens <= MAX_VERIFY_ROWS


@dataclass
class StepOut:
    """A step's results (lazy until evaluated)."""

    logits: mx.array  # [T or 1, V]
    argmax: mx.array  # [T or 1] greedy token after each row (lowest id on ties)
    finite: mx.array  # [T or 1] whether each row's logits are all finite
    hidden: mx.array  # [T, M, E] final HC state of every row
    state: StepState  # after all T tokens
    chunks: list[ChunkRows] | None  # (verify) per layer: the state after any first n rows

    def arrays(self) -> list[mx.array]:
        out = [self.logits, self.argmax, self.finite, self.hidden, *self.state.arrays()]
        return out + (self.state.store.arrays() if self.state.store is not None else [])


def _layer_arrays(s: LayerState) -> list:
    return [s.raw, None if s.comp is None else (s.comp.kv, s.comp.score),
            None if s.index is None else (s.index.kv, s.index.score)]


def _layer_state(a: list) -> LayerState:
    return LayerState(a[0], None if a[1] is None else Frontier(*a[1]), None if a[2] is None else Frontier(*a[2]))


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
        self.kinds = [c.layer_kind(il) for il in range(c.n_layer)]
        self.token_embd = tensors["token_embd.weight"]
        self.output_hc_fn = tensors["output_hc_fn.weight"]
        self.output_hc_scale = tensors["output_hc_scale.weight"]
        self.output_hc_base = tensors["output_hc_base.weight"]
        self.output_norm = tensors["output_norm.weight"]
        self.output = tensors["output.weight"]
        self.traces = 0  # step graphs traced so far (each compiled shape class traces once)
        self._compiled: dict[StepSpec, object] = {}

    @classmethod
    def load(cls, model_file: ModelFile, numerics: Numerics = Numerics()) -> Model:
        """Bind a validated base GGUF's tensors to the device."""
        c = model_file.config
        specs = base_tensor_specs(c) + [s for s in base_optional_specs(c) if s.name in model_file.tensors]
        return cls(c, bind_tensors(model_file, specs, numerics), numerics)

    def embed(self, tokens: mx.array) -> mx.array:
        """Token embeddings [T, E] float32: rows of the file's table read on the host (the ids
        are the committed ones, known there), or of a device table (the trainer's)."""
        if isinstance(self.token_embd, np.ndarray):
            return mx.array(self.token_embd[np.array(tokens, dtype=np.int64)].astype(np.float32))
        return self.token_embd[tokens].astype(mx.float32)

    def head(self, X: mx.array) -> mx.array:
        """HC collapse, final norm and the vocabulary projection: [T, M, E] -> logits [T, V]."""
        h = hc_head(X, self.output_hc_fn, self.output_hc_scale, self.output_hc_base, self.config)
        return self.output(rms_norm(h, self.output_norm, self.config.rms_eps))

    # -- the pure step over arrays (what gets compiled) ---------------------------------------

    def _step_arrays(self, spec: StepSpec, x: mx.array, tokens: mx.array, p0: mx.array, start: mx.array,
                     layers: list, comp: list, index: list) -> dict:
        self.traces += 1
        c = self.config
        X = mx.broadcast_to(x[:, None, :], (x.shape[0], c.n_hc, x.shape[1]))  # every stream starts as e
        new_layers, chunks, comp, index = [], [], list(comp), list(index)
        with kernels.row_invariant(spec.row_invariant):
            for il, (w, kind) in enumerate(zip(self.layers, self.kinds)):
                state = _layer_state(layers[il])
                stores = (comp[il], index[il]) if kind is not LayerKind.SLIDING else (None, None)
                X, state, chunk, stores = block(w, kind, c, c.swiglu_clamp[il], X, tokens, p0, start, state, stores,
                                                spec.bucket, spec.n_positions, self.numerics)
                if kind is not LayerKind.SLIDING:
                    comp[il], index[il] = stores
                new_layers.append(_layer_arrays(state))
                chunks.append([chunk.kv, chunk.comp, chunk.index])
            logits = self.head(X if spec.all_logits else X[-1:])
        return {"logits": logits, "argmax": mx.argmax(logits, axis=-1),
                "finite": mx.all(mx.isfinite(logits), axis=-1), "hidden": X, "layers": new_layers,
                "chunks": chunks if spec.all_logits else None, "comp": comp, "index": index}

    def _function(self, spec: StepSpec, compiled: bool):
        """The step for a shape class: compiled once and kept (`kernels.compile_steps`), or the
        plain function (traced again at every call)."""
        if not (compiled and kernels.compile_steps()):
            return partial(self._step_arrays, spec)
        fn = self._compiled.get(spec)
        if fn is None:
            fn = self._compiled[spec] = mx.compile(partial(self._step_arrays, spec))
        return fn

    def empty_state(self, ctx: int, max_chunk: int) -> StepState:
        """A state before the first token, with a fresh row store for a context of `ctx`."""
        return StepState.empty(self.config, ctx, RowStore(self.config, ctx, max_chunk))

    def step(self, tokens, state: StepState, all_logits: bool = False, compiled: bool = True) -> StepOut:
        """Run tokens at positions state.pos.. after `state` (lazy; the caller evaluates).

        The state's row store is written in place: rows of windows from state.pos // ratio on;
        after evaluating, `state.store.record(state.pos, tokens)`."""
        if not isinstance(tokens, mx.array):
            tokens = mx.array(np.asarray(tokens, dtype=np.int32).reshape(-1))
        T, p0, c = tokens.shape[0], state.pos, self.config
        spec = StepSpec(T, position_bucket(p0 + T), all_logits, table_positions(state.ctx + 8 * T + 256))
        fn = self._function(spec, compiled)
        store = state.store
        comp, index = store.take(p0) if store is not None else ([None] * c.n_layer, [None] * c.n_layer)
        try:
            out = fn(self.embed(tokens), tokens, mx.array(p0, mx.int32), mx.array(state.start, mx.int32),
                     [_layer_arrays(s) for s in state.layers], comp, index)
        except BaseException:
            if store is not None:
                store.put(comp, index)
            raise
        del comp, index
        if store is not None:
            store.put(out["comp"], out["index"])
        chunks = None
        if out["chunks"] is not None:
            chunks = [ChunkRows(kv, None if cp is None else tuple(cp), None if ix is None else tuple(ix))
                      for kv, cp, ix in out["chunks"]]
        new = state.with_layers(p0 + T, [_layer_state(a) for a in out["layers"]])
        return StepOut(out["logits"], out["argmax"], out["finite"], out["hidden"], new, chunks)

    def state_after(self, before: StepState, chunks: list[ChunkRows], n: int) -> StepState:
        """The state after the first n tokens of a verify step run on `before` (its rows are in
        the store already; the raw windows and frontiers follow from the chunk's rows)."""
        return before.with_layers(before.pos + n, [ch.state_after(s, n) for ch, s in zip(chunks, before.layers)])

    def forward(self, tokens, state: StepState, all_logits: bool = False):
        """The step, uncompiled: (logits, new state, final HC [T, M, E]). Training differentiates
        through it; it writes the state's row store like `step`."""
        out = self.step(tokens, state, all_logits, compiled=False)
        return out.logits, out.state, out.hidden


# The fused Metal/CUDA entries register against the references above.
import ds4.fused_kernels  # noqa: E402,F401
