"""The model configuration: every `deepseek4.*` metadata key, read and validated in one place.

DS4 Flash has one fixed architecture. Its *dimensions* (layers, widths, experts, vocab, window,
indexer sizes) come from the metadata, so smaller files of the same layout load through the same
code; its *constants* (RoPE/YaRN parameters, expert scale, epsilons, SwiGLU clamp, the per-layer
compression pattern, one KV head, one shared expert, 4 HC streams with 20 Sinkhorn iterations)
must equal the published model's, as ds4.c requires. The synthetic writer writes metadata from
the same key table, so reader and writer cannot drift apart.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field

import numpy as np

from ds4.errors import GGUFError
from ds4.gguf import FLOAT_TYPES, INTEGER_TYPES, GGUFFile, ValueType, type_name

ARCH = "deepseek4"

FP8_BLOCK = 64  # the non-RoPE part of every KV row is FP8 round-tripped in blocks of 64
MAX_WINDOW = 8192  # sliding-window rows: the raw ring's largest size (ModelConfig.raw_cap)


def layer_compress_ratio(il: int) -> int:
    """KV compression ratio of layer `il`: 0 (sliding window only) for layers 0-1, then 4 for even
    layers (with the lightning indexer) and 128 for odd layers."""
    if il < 2:
        return 0
    return 4 if il % 2 == 0 else 128


class LayerKind(enum.Enum):
    """What a layer attends to besides its sliding window of raw rows."""

    SLIDING = 0  # the raw window only (layers 0-1 and the MTP block)
    INDEXED = 4  # ratio-4 compressed rows, the lightning indexer's top-k of them
    COMPRESSED = 128  # ratio-128 compressed rows, all of them

    @property
    def ratio(self) -> int:
        """Tokens pooled into one compressed row (0: none)."""
        return self.value

    @property
    def windows(self) -> int:
        """Windows a compressed row pools: 2 for ratio 4 (overlapping windows, each half of the
        row from one of them; projections and frontiers are twice as wide), else 1."""
        return 2 if self is LayerKind.INDEXED else 1


@dataclass(frozen=True)
class Key:
    """One metadata key: its field name, GGUF key, value kind and (for constants) required value."""

    field: str
    key: str
    kind: str  # "u32", "u64" (u32 or u64), "f32" (any number), "bool", "i32[]", "f32[]"
    fixed: float | int | bool | None = None  # the DS4 Flash value the key must have
    optional: bool = False


KEYS: tuple[Key, ...] = (
    # Dimensions: free, checked for consistency.
    Key("n_layer", f"{ARCH}.block_count", "u32"),
    Key("n_embd", f"{ARCH}.embedding_length", "u32"),
    Key("n_vocab", f"{ARCH}.vocab_size", "u32"),
    Key("n_head", f"{ARCH}.attention.head_count", "u32"),
    Key("head_dim", f"{ARCH}.attention.key_length", "u32"),
    Key("value_dim", f"{ARCH}.attention.value_length", "u32"),
    Key("n_rot", f"{ARCH}.rope.dimension_count", "u32"),
    Key("q_lora_rank", f"{ARCH}.attention.q_lora_rank", "u32"),
    Key("o_lora_rank", f"{ARCH}.attention.output_lora_rank", "u32"),
    Key("n_out_group", f"{ARCH}.attention.output_group_count", "u32"),
    Key("n_expert", f"{ARCH}.expert_count", "u32"),
    Key("n_expert_used", f"{ARCH}.expert_used_count", "u32"),
    Key("n_ff_exp", f"{ARCH}.expert_feed_forward_length", "u32"),
    Key("n_hash_layer", f"{ARCH}.hash_layer_count", "u32"),
    Key("n_swa", f"{ARCH}.attention.sliding_window", "u32"),
    Key("n_indexer_head", f"{ARCH}.attention.indexer.head_count", "u32"),
    Key("indexer_head_dim", f"{ARCH}.attention.indexer.key_length", "u32"),
    Key("indexer_top_k", f"{ARCH}.attention.indexer.top_k", "u32"),
    Key("compress_ratios", f"{ARCH}.attention.compress_ratios", "i32[]"),
    Key("swiglu_clamp", f"{ARCH}.swiglu_clamp_exp", "f32[]", fixed=10.0),
    # Constants of the architecture.
    Key("n_head_kv", f"{ARCH}.attention.head_count_kv", "u32", fixed=1),
    Key("n_expert_shared", f"{ARCH}.expert_shared_count", "u32", fixed=1),
    Key("n_expert_group", f"{ARCH}.expert_group_count", "u32", fixed=0, optional=True),
    Key("n_expert_group_used", f"{ARCH}.expert_group_used_count", "u32", fixed=0, optional=True),
    Key("n_hc", f"{ARCH}.hyper_connection.count", "u32", fixed=4),
    Key("hc_sinkhorn_iters", f"{ARCH}.hyper_connection.sinkhorn_iterations", "u32", fixed=20),
    Key("rope_orig_ctx", f"{ARCH}.rope.scaling.original_context_length", "u64", fixed=65536),
    Key("rope_freq_base", f"{ARCH}.rope.freq_base", "f32", fixed=10000.0),
    Key("rope_scale_factor", f"{ARCH}.rope.scaling.factor", "f32", fixed=16.0),
    Key("yarn_beta_fast", f"{ARCH}.rope.scaling.yarn_beta_fast", "f32", fixed=32.0),
    Key("yarn_beta_slow", f"{ARCH}.rope.scaling.yarn_beta_slow", "f32", fixed=1.0),
    Key("compress_rope_freq_base", f"{ARCH}.attention.compress_rope_freq_base", "f32", fixed=160000.0),
    Key("expert_weights_scale", f"{ARCH}.expert_weights_scale", "f32", fixed=1.5),
    Key("rms_eps", f"{ARCH}.attention.layer_norm_rms_epsilon", "f32", fixed=1e-6),
    Key("hc_eps", f"{ARCH}.hyper_connection.epsilon", "f32", fixed=1e-6),
    Key("expert_weights_norm", f"{ARCH}.expert_weights_norm", "bool", fixed=True),
)

CONTEXT_LENGTH_KEY = f"{ARCH}.context_length"


@dataclass(frozen=True)
class ModelConfig:
    """Dimensions and constants of a DS4 Flash model (defaults: the published model)."""

    n_layer: int = 43
    n_embd: int = 4096
    n_vocab: int = 129280
    n_head: int = 64
    head_dim: int = 512
    value_dim: int = 512
    n_rot: int = 64
    q_lora_rank: int = 1024
    o_lora_rank: int = 1024
    n_out_group: int = 8
    n_expert: int = 256
    n_expert_used: int = 6
    n_ff_exp: int = 2048
    n_hash_layer: int = 3
    n_swa: int = 128
    n_indexer_head: int = 64
    indexer_head_dim: int = 128
    indexer_top_k: int = 512
    compress_ratios: tuple[int, ...] = field(default=())
    swiglu_clamp: tuple[float, ...] = field(default=())
    n_head_kv: int = 1
    n_expert_shared: int = 1
    n_expert_group: int = 0
    n_expert_group_used: int = 0
    n_hc: int = 4
    hc_sinkhorn_iters: int = 20
    rope_orig_ctx: int = 65536
    rope_freq_base: float = 10000.0
    rope_scale_factor: float = 16.0
    yarn_beta_fast: float = 32.0
    yarn_beta_slow: float = 1.0
    compress_rope_freq_base: float = 160000.0
    expert_weights_scale: float = 1.5
    rms_eps: float = 1e-6
    hc_eps: float = 1e-6
    expert_weights_norm: bool = True
    context_length: int | None = None  # informational only

    def __post_init__(self):
        # Fill the per-layer arrays from the fixed pattern when not given (writer side).
        if not self.compress_ratios:
            object.__setattr__(self, "compress_ratios",
                               tuple(layer_compress_ratio(i) for i in range(self.n_layer)))
        if not self.swiglu_clamp:
            object.__setattr__(self, "swiglu_clamp", (10.0,) * self.n_layer)

    # -- derived sizes -------------------------------------------------------------------------

    @property
    def hc_dim(self) -> int:
        return self.n_hc * self.n_embd

    @property
    def hc_mix(self) -> int:
        return 2 * self.n_hc + self.n_hc * self.n_hc

    @property
    def q_dim(self) -> int:
        return self.n_head * self.head_dim

    @property
    def out_low_dim(self) -> int:
        return self.n_out_group * self.o_lora_rank

    @property
    def out_group_in(self) -> int:
        return self.head_dim * (self.n_head // self.n_out_group)

    def ratio(self, il: int) -> int:
        return self.compress_ratios[il]

    def layer_kind(self, il: int) -> LayerKind:
        return LayerKind(self.compress_ratios[il])

    def is_hash_layer(self, il: int) -> bool:
        return il < self.n_hash_layer

    def context_problem(self, ctx: int) -> str | None:
        """Why sessions of `ctx` tokens cannot be made for this model (None: they can): beyond the
        model's context length its buffers are only a way to exhaust memory."""
        if self.context_length and ctx > self.context_length:
            return f"a context of {ctx} tokens exceeds the model's {self.context_length} ({CONTEXT_LENGTH_KEY})"
        return None

    # -- KV cache sizes (forward doc: cache state; layout doc: KV cache sizes; all cache rows are float32) -----------

    def kv_bytes_per_token(self) -> float:
        """Asymptotic compressed-cache bytes per context token (13,760 for DS4 Flash)."""
        total = 0.0
        for il in range(self.n_layer):
            kind = self.layer_kind(il)
            if kind is not LayerKind.SLIDING:
                width = self.head_dim + (self.indexer_head_dim if kind is LayerKind.INDEXED else 0)
                total += width * 4 / kind.ratio
        return total

    def raw_cap(self, ctx: int, prefill_cap: int) -> int:
        """Rows of the raw sliding-window ring: room for a window plus one prefill chunk."""
        cap = min(self.n_swa + prefill_cap, ctx)
        cap = -(-cap // 256) * 256
        return max(min(cap, 8192), min(self.n_swa, ctx))

    def kv_cache_bytes(self, ctx: int, prefill_cap: int) -> int:
        """Allocated cache bytes for a context: raw rings plus compressed rows (no scratch)."""
        raw = self.n_layer * self.raw_cap(ctx, prefill_cap) * self.head_dim * 4
        comp = 0
        for il in range(self.n_layer):
            kind = self.layer_kind(il)
            if kind is not LayerKind.SLIDING:
                width = self.head_dim + (self.indexer_head_dim if kind is LayerKind.INDEXED else 0)
                comp += (ctx // kind.ratio + 2) * width * 4
        return raw + comp

    def kv_payload_bytes(self, n_tokens: int) -> int:
        """Bytes of a saved session of n tokens in ds4's payload layout (mtp-session doc, the saved payload):
        13-word header, tokens, logits, two row counters per layer, then per layer the live raw
        rows, the compressed rows and compressor frontiers (kv and score). This is ds4-bench's
        `kvcache_bytes` column."""
        size = 13 * 4 + 4 * n_tokens + 4 * self.n_vocab + 2 * 4 * self.n_layer
        for il in range(self.n_layer):
            size += min(n_tokens, self.n_swa) * self.head_dim * 4
            kind = self.layer_kind(il)
            r, coff = kind.ratio, kind.windows
            widths = {LayerKind.SLIDING: (), LayerKind.COMPRESSED: (self.head_dim,),
                      LayerKind.INDEXED: (self.head_dim, self.indexer_head_dim)}[kind]
            for width in widths:  # rows, then the frontier's kv and score
                size += (n_tokens // r) * width * 4 + 2 * (coff * r) * (coff * width) * 4
        return size

    # -- metadata I/O --------------------------------------------------------------------------

    @classmethod
    def from_gguf(cls, gguf: GGUFFile) -> "ModelConfig":
        """Read and validate every key; raises GGUFError naming the key and the expected value."""
        values = {}
        for k in KEYS:
            value = _read_key(gguf, k)
            if value is not None:
                values[k.field] = value
        ctx = gguf.fields.get(CONTEXT_LENGTH_KEY)
        if ctx is not None and ctx.type in INTEGER_TYPES:
            values["context_length"] = int(gguf.get(CONTEXT_LENGTH_KEY))
        n_layer = values["n_layer"]
        for name in ("compress_ratios", "swiglu_clamp"):
            key = next(k.key for k in KEYS if k.field == name)
            arr = values[name]
            if len(arr) < n_layer:
                raise GGUFError(gguf.path, f"{key} has {len(arr)} entries, shorter than the layer count",
                                f"at least {n_layer}")
            # Extra entries are ignored, as ds4.c does (the published file has 44, the last is 0).
            values[name] = tuple(arr[:n_layer])
        config = cls(**values)
        config.validate(gguf.path)
        return config

    def metadata(self) -> list[tuple[str, str, object]]:
        """(key, kind, value) for every key, in table order: what the writer puts in a file."""
        return [(k.key, k.kind, getattr(self, k.field)) for k in KEYS]

    def validate(self, path: str) -> None:
        """Check constants and the consistency of dimensions (the layout the forward pass assumes)."""
        for k in KEYS:
            value = getattr(self, k.field)
            if k.fixed is None:
                continue
            values = value if isinstance(value, tuple) else (value,)
            for v in values:
                if not _same(v, k.fixed):
                    short = k.key.removeprefix(f"{ARCH}.")
                    raise GGUFError(path, f"{k.key} is {_fmt(v)}",
                                    f"{short}={_fmt(k.fixed)} for DeepSeek4 Flash")
        for il, r in enumerate(self.compress_ratios):
            if r != layer_compress_ratio(il):
                raise GGUFError(path, f"{ARCH}.attention.compress_ratios[{il}] is {r}",
                                f"{layer_compress_ratio(il)} (DS4 layer pattern)")
        key = {k.field: k.key for k in KEYS}

        def need(ok: bool, fld: str, what: str) -> None:
            if not ok:
                raise GGUFError(path, f"{key[fld]} is {getattr(self, fld)}", what)

        for fld in ("n_layer", "n_embd", "n_vocab", "n_head", "head_dim", "n_rot", "q_lora_rank",
                    "o_lora_rank", "n_out_group", "n_expert", "n_expert_used", "n_ff_exp", "n_swa",
                    "n_indexer_head", "indexer_head_dim", "indexer_top_k"):
            need(getattr(self, fld) > 0, fld, "a positive value")
        need(self.value_dim == self.head_dim, "value_dim", f"{self.head_dim} (= key_length: K and V share the row)")
        need(self.n_rot % 2 == 0 and self.n_rot <= self.head_dim, "n_rot",
             f"an even number <= key_length {self.head_dim}")
        need((self.head_dim - self.n_rot) % FP8_BLOCK == 0, "n_rot",
             f"key_length - rope dims a multiple of {FP8_BLOCK} (FP8 blocks)")
        need(self.n_head % self.n_out_group == 0, "n_out_group", f"a divisor of head_count {self.n_head}")
        need(self.n_expert_used <= self.n_expert, "n_expert_used", f"at most expert_count {self.n_expert}")
        # Not tied to a tensor shape, so not bounded by the file's size: every layer allocates
        # this many raw KV rows whatever the context.
        need(self.n_swa <= MAX_WINDOW, "n_swa", f"at most {MAX_WINDOW} (DS4 Flash: 128)")
        ihd = self.indexer_head_dim
        need(ihd >= max(32, self.n_rot) and ihd & (ihd - 1) == 0, "indexer_head_dim",
             f"a power of two >= 32 and >= rope dims {self.n_rot} (Hadamard rotation, FP4 blocks of 32, RoPE tail)")


def _same(value, expected) -> bool:
    if isinstance(expected, bool):
        return value is expected or value == expected
    if isinstance(expected, int):
        return value == expected
    # ds4.c's config_expect_f32: relative error 1e-6, scaled by max(1, |expected|).
    return abs(float(value) - expected) <= 1e-6 * max(1.0, abs(expected))


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:g}"
    return str(v)


def _read_key(gguf: GGUFFile, k: Key):
    field_ = gguf.fields.get(k.key)
    if field_ is None:
        if k.optional:
            return None
        raise GGUFError(gguf.path, f"required metadata key {k.key} is missing", _kind_desc(k.kind))
    t = field_.type
    ok = {
        "u32": t == ValueType.UINT32,
        "u64": t in (ValueType.UINT32, ValueType.UINT64),
        "f32": t in FLOAT_TYPES or t in (ValueType.UINT32, ValueType.INT32),
        "bool": t == ValueType.BOOL,
        "i32[]": t == ValueType.ARRAY and field_.item_type in (ValueType.INT32, ValueType.UINT32),
        "f32[]": t == ValueType.ARRAY and field_.item_type in FLOAT_TYPES,
    }[k.kind]
    if not ok:
        got = type_name(t) if t != ValueType.ARRAY else f"array of {type_name(field_.item_type)}"
        raise GGUFError(gguf.path, f"metadata key {k.key} has type {got}", _kind_desc(k.kind))
    value = gguf.get(k.key)
    if k.kind == "i32[]":
        if np.any(value < 0):
            raise GGUFError(gguf.path, f"metadata array {k.key} contains a negative value",
                            "non-negative compression ratios")
        return tuple(int(x) for x in value)
    if k.kind == "f32[]":
        return tuple(float(x) for x in value)
    if k.kind == "f32":
        value = float(value)
        if not math.isfinite(value):
            raise GGUFError(gguf.path, f"metadata key {k.key} is {value}", "a finite number")
        return value
    if k.kind == "bool":
        return bool(value)
    return int(value)


def _kind_desc(kind: str) -> str:
    return {
        "u32": "a uint32 value",
        "u64": "a uint32 or uint64 value",
        "f32": "a float (or integer) value",
        "bool": "a bool value",
        "i32[]": "an array of int32 or uint32",
        "f32[]": "an array of float32 or float64",
    }[kind]
