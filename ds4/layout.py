"""The DS4 Flash tensor layout: every tensor's name, GGUF dims and accepted quant types.

One table serves both directions: `check_tensors` validates a file against it (name, rank, every
dim, type), and the synthetic writer emits exactly these tensors. Dims are in GGUF order
(`[in, out]` for matrices, `[in, out, n_expert]` for routed experts), as the layout doc lists
them. Extra tensors in a file are ignored, as ds4.c ignores them.
"""

from __future__ import annotations

from dataclasses import dataclass

from gguf import GGMLQuantizationType as QT

from ds4.config import LayerKind, ModelConfig
from ds4.errors import GGUFError
from ds4.gguf import GGUFFile, GGUFTensor, qtype_name

ROUTED_TYPES = (QT.IQ2_XXS, QT.Q2_K, QT.Q4_K)
MTP_PREFIX = "mtp.0."


@dataclass(frozen=True)
class TensorSpec:
    """An expected tensor. `role` tells the synthetic writer what kind of values it holds."""

    name: str
    dims: tuple[int, ...]
    types: tuple[QT, ...]
    role: str


def _layer_specs(c: ModelConfig, p: str, il: int, mtp: bool) -> list[TensorSpec]:
    """Tensors of one block; `mtp` selects the MTP block rules (no compressor, bias required,
    F16-or-F32 HC and router matrices)."""
    E, hc = c.n_embd, c.hc_dim
    plain = (QT.F32, QT.F16) if mtp else (QT.F16,)
    kind = LayerKind.SLIDING if mtp else c.layer_kind(il)
    ratio = kind.ratio
    s = [
        TensorSpec(f"{p}hc_attn_fn.weight", (hc, c.hc_mix), plain, "hc_fn"),
        TensorSpec(f"{p}hc_attn_scale.weight", (3,), (QT.F32,), "hc_scale"),
        TensorSpec(f"{p}hc_attn_base.weight", (c.hc_mix,), (QT.F32,), "hc_base"),
        TensorSpec(f"{p}attn_norm.weight", (E,), (QT.F32,), "norm"),
        TensorSpec(f"{p}attn_q_a.weight", (E, c.q_lora_rank), (QT.Q8_0,), "proj"),
        TensorSpec(f"{p}attn_q_a_norm.weight", (c.q_lora_rank,), (QT.F32,), "norm"),
        TensorSpec(f"{p}attn_q_b.weight", (c.q_lora_rank, c.q_dim), (QT.Q8_0,), "proj"),
        TensorSpec(f"{p}attn_kv.weight", (E, c.head_dim), (QT.Q8_0,), "proj"),
        TensorSpec(f"{p}attn_kv_a_norm.weight", (c.head_dim,), (QT.F32,), "norm"),
        TensorSpec(f"{p}attn_sinks.weight", (c.n_head,), (QT.F32,), "sinks"),
        TensorSpec(f"{p}attn_output_a.weight", (c.out_group_in, c.out_low_dim), (QT.Q8_0,), "proj"),
        TensorSpec(f"{p}attn_output_b.weight", (c.out_low_dim, E), (QT.Q8_0,), "proj"),
    ]
    if kind is not LayerKind.SLIDING:
        width = kind.windows * c.head_dim
        s += [
            TensorSpec(f"{p}attn_compressor_ape.weight", (width, ratio), (QT.F16,), "ape"),
            TensorSpec(f"{p}attn_compressor_kv.weight", (E, width), (QT.F16,), "proj"),
            TensorSpec(f"{p}attn_compressor_gate.weight", (E, width), (QT.F16,), "proj"),
            TensorSpec(f"{p}attn_compressor_norm.weight", (c.head_dim,), (QT.F32,), "norm"),
        ]
    if kind is LayerKind.INDEXED:
        iw = kind.windows * c.indexer_head_dim
        s += [
            TensorSpec(f"{p}indexer.attn_q_b.weight", (c.q_lora_rank, c.n_indexer_head * c.indexer_head_dim),
                       (QT.F16,), "proj"),
            TensorSpec(f"{p}indexer.proj.weight", (E, c.n_indexer_head), (QT.F16,), "proj"),
            TensorSpec(f"{p}indexer_compressor_ape.weight", (iw, ratio), (QT.F16,), "ape"),
            TensorSpec(f"{p}indexer_compressor_kv.weight", (E, iw), (QT.F16,), "proj"),
            TensorSpec(f"{p}indexer_compressor_gate.weight", (E, iw), (QT.F16,), "proj"),
            TensorSpec(f"{p}indexer_compressor_norm.weight", (c.indexer_head_dim,), (QT.F32,), "norm"),
        ]
    s += [
        TensorSpec(f"{p}hc_ffn_fn.weight", (hc, c.hc_mix), plain, "hc_fn"),
        TensorSpec(f"{p}hc_ffn_scale.weight", (3,), (QT.F32,), "hc_scale"),
        TensorSpec(f"{p}hc_ffn_base.weight", (c.hc_mix,), (QT.F32,), "hc_base"),
        TensorSpec(f"{p}ffn_norm.weight", (E,), (QT.F32,), "norm"),
        TensorSpec(f"{p}ffn_gate_inp.weight", (E, c.n_expert), plain, "proj"),
    ]
    if not mtp and c.is_hash_layer(il):
        s.append(TensorSpec(f"{p}ffn_gate_tid2eid.weight", (c.n_expert_used, c.n_vocab), (QT.I32,), "tid2eid"))
    s += [
        TensorSpec(f"{p}ffn_gate_exps.weight", (E, c.n_ff_exp, c.n_expert), ROUTED_TYPES, "routed"),
        TensorSpec(f"{p}ffn_up_exps.weight", (E, c.n_ff_exp, c.n_expert), ROUTED_TYPES, "routed"),
        TensorSpec(f"{p}ffn_down_exps.weight", (c.n_ff_exp, E, c.n_expert), ROUTED_TYPES, "routed"),
        TensorSpec(f"{p}ffn_gate_shexp.weight", (E, c.n_ff_exp), (QT.Q8_0,), "proj"),
        TensorSpec(f"{p}ffn_up_shexp.weight", (E, c.n_ff_exp), (QT.Q8_0,), "proj"),
        TensorSpec(f"{p}ffn_down_shexp.weight", (c.n_ff_exp, E), (QT.Q8_0,), "proj"),
    ]
    return s


def exp_probs_bias_spec(c: ModelConfig, prefix: str) -> TensorSpec:
    """The router's top-k selection bias: optional in base layers (published on non-hash layers
    only), required in the MTP block."""
    return TensorSpec(f"{prefix}exp_probs_b.bias", (c.n_expert,), (QT.F32,), "bias")


def base_tensor_specs(c: ModelConfig) -> list[TensorSpec]:
    """Every required tensor of a base file (the optional per-layer biases are separate)."""
    s = [TensorSpec("token_embd.weight", (c.n_embd, c.n_vocab), (QT.F16,), "embed")]
    for il in range(c.n_layer):
        s += _layer_specs(c, f"blk.{il}.", il, mtp=False)
    s += [
        TensorSpec("output_hc_base.weight", (c.n_hc,), (QT.F32,), "hc_base"),
        TensorSpec("output_hc_fn.weight", (c.hc_dim, c.n_hc), (QT.F16,), "hc_fn"),
        TensorSpec("output_hc_scale.weight", (1,), (QT.F32,), "hc_scale"),
        TensorSpec("output_norm.weight", (c.n_embd,), (QT.F32,), "norm"),
        TensorSpec("output.weight", (c.n_embd, c.n_vocab), (QT.Q8_0,), "output"),
    ]
    return s


def mtp_tensor_specs(c: ModelConfig) -> list[TensorSpec]:
    """Every tensor of an MTP file, sized from the base model's config."""
    p, E, plain = MTP_PREFIX, c.n_embd, (QT.F32, QT.F16)
    s = [
        TensorSpec(f"{p}hc_head_base.weight", (c.n_hc,), (QT.F32,), "hc_base"),
        TensorSpec(f"{p}hc_head_fn.weight", (c.hc_dim, c.n_hc), plain, "hc_fn"),
        TensorSpec(f"{p}hc_head_scale.weight", (1,), (QT.F32,), "hc_scale"),
        TensorSpec(f"{p}e_proj.weight", (E, E), (QT.Q8_0,), "proj"),
        TensorSpec(f"{p}h_proj.weight", (E, E), (QT.Q8_0,), "proj"),
        TensorSpec(f"{p}enorm.weight", (E,), (QT.F32,), "norm"),
        TensorSpec(f"{p}hnorm.weight", (E,), (QT.F32,), "norm"),
        TensorSpec(f"{p}norm.weight", (E,), (QT.F32,), "norm"),
    ]
    s += _layer_specs(c, p, 1, mtp=True)
    s.append(exp_probs_bias_spec(c, p))
    return s


def check_tensor(path: str, t: GGUFTensor | None, spec: TensorSpec) -> GGUFTensor:
    """Check one tensor against its spec; raises GGUFError naming tensor, what and expectation."""
    if t is None:
        raise GGUFError(path, f"required tensor {spec.name} is missing",
                        f"{'/'.join(qtype_name(q) for q in spec.types)} {list(spec.dims)}")
    if len(t.dims) != len(spec.dims):
        raise GGUFError(path, f"tensor {spec.name} has {len(t.dims)} dimensions {list(t.dims)}",
                        f"{len(spec.dims)} dimensions {list(spec.dims)}")
    for i, (got, want) in enumerate(zip(t.dims, spec.dims)):
        if got != want:
            raise GGUFError(path, f"tensor {spec.name} has dim[{i}]={got} (shape {list(t.dims)})",
                            f"{want} (shape {list(spec.dims)})")
    if t.qtype not in spec.types:
        raise GGUFError(path, f"tensor {spec.name} has type {t.type_name}",
                        " or ".join(qtype_name(q) for q in spec.types))
    return t


def check_tensors(gguf: GGUFFile, specs: list[TensorSpec], optional: list[TensorSpec] = ()) -> dict[str, GGUFTensor]:
    """Validate a file's tensors against the layout; returns the bound tensors by name."""
    bound = {s.name: check_tensor(gguf.path, gguf.tensors.get(s.name), s) for s in specs}
    for s in optional:
        if s.name in gguf.tensors:
            bound[s.name] = check_tensor(gguf.path, gguf.tensors[s.name], s)
    # Gate and up are evaluated together, so a layer's two must share a quant type.
    for name, t in bound.items():
        if name.endswith("ffn_gate_exps.weight"):
            up = bound[name.replace("ffn_gate_exps", "ffn_up_exps")]
            if up.qtype != t.qtype:
                raise GGUFError(gguf.path, f"routed experts {name} ({t.type_name}) and {up.name} "
                                f"({up.type_name}) use different quant types", "the same type for gate and up")
    return bound


def base_optional_specs(c: ModelConfig) -> list[TensorSpec]:
    return [exp_probs_bias_spec(c, f"blk.{il}.") for il in range(c.n_layer)]
