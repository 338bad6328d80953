"""Loading and validating DS4 model files: presets load, every layout violation is one clear error."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
from gguf import GGMLQuantizationType as QT

from ds4 import synth
from ds4.config import ModelConfig
from ds4.errors import GGUFError
from ds4.gguf import ValueType, tensor_nbytes
from ds4.layout import base_tensor_specs, mtp_tensor_specs
from ds4.loader import open_model, open_mtp


def zero_source(spec, qtype):
    """All-zero tensor bytes: valid blocks for every type, and instant to write."""
    yield np.zeros(tensor_nbytes(qtype, spec.dims), np.uint8)


def write_variant(path, vocab, config=None, meta_edit=None, spec_edit=None, quant="q2"):
    config = config or synth.tiny_config(len(vocab[0]))
    meta, specs = synth.base_parts(config, vocab, quant)
    if meta_edit:
        meta = meta_edit(meta)
    if spec_edit:
        specs = spec_edit(specs)
    synth.write_parts(str(path), meta, specs, zero_source)
    return str(path)


def set_meta(key, vtype=None, value=None, item_type=None, drop=False):
    def edit(meta):
        out = []
        for k, t, v, it in meta:
            if k == key:
                if drop:
                    continue
                t, v, it = vtype if vtype is not None else t, value if value is not None else v, item_type or it
            out.append((k, t, v, it))
        return out
    return edit


def edit_spec(name, qtype=None, dims=None, drop=False):
    def edit(specs):
        out = []
        for s, q in specs:
            if s.name == name:
                if drop:
                    continue
                s = type(s)(s.name, dims or s.dims, s.types, s.role)
                q = qtype if qtype is not None else q
            out.append((s, q))
        return out
    return edit


def test_tiny_preset_loads_with_its_mtp(tiny_paths):
    base, mtp = tiny_paths
    model = open_model(str(base))
    c = model.config
    assert (c.n_layer, c.n_embd, c.n_expert, c.n_vocab) == (5, 256, 16, 1024)
    assert c.compress_ratios == (0, 0, 4, 128, 4)
    # 6 global + 23 per layer + 2 biases + 3 hash tables + 3x4 compressor + 2x6 indexer
    assert len(model.tensors) == 6 + 5 * 23 + 2 + 3 + 12 + 12
    assert model.tensors["blk.4.ffn_down_exps.weight"].qtype == QT.Q2_K
    assert model.routed_quant_bits == 2
    head = open_mtp(str(mtp), c)
    assert len(head.tensors) == 32 and head.tensors["mtp.0.ffn_gate_exps.weight"].qtype == QT.Q4_K
    tok = model.tokenizer()
    assert tok.vocab_size == 1024 and tok.bos_id == 0 and tok.eos_id == 1


def test_published_shapes_and_counts():
    """The full-size layout has the published tensor count and byte budget (layout doc: the published files and their tensors)."""
    c = ModelConfig()
    specs = base_tensor_specs(c)
    n_bias = sum(1 for il in range(c.n_layer) if not c.is_hash_layer(il))
    assert len(specs) + n_bias == 1328
    mix = dict(zip(("gate", "up", "down"), (QT.IQ2_XXS, QT.IQ2_XXS, QT.Q2_K)))
    by_type = {}
    for s in specs:
        q = mix[s.name.split("_")[-2].split(".")[-1]] if s.role == "routed" else s.types[0]
        by_type[q] = by_type.get(q, 0) + tensor_nbytes(q, s.dims)
    assert by_type[QT.IQ2_XXS] == 47_613_739_008 and by_type[QT.Q2_K] == 30_299_652_096
    assert by_type[QT.Q8_0] == 6_598_885_376 and by_type[QT.I32] == 9_308_160
    assert by_type[QT.F16] == 2_191_345_664
    assert by_type[QT.F32] + n_bias * 256 * 4 == 1_845_596
    assert len(mtp_tensor_specs(c)) == 32
    assert c.kv_bytes_per_token() == 13_760
    assert c.raw_cap(32768, 2048) == 2304


def test_slice_1_preset_has_real_widths_and_loads(tmp_path):
    path = tmp_path / "slice1.gguf"
    # 16 experts keeps the file at 1.9 GB; the 256-expert layout is covered by the test above.
    config = synth.write_preset("slice-1", str(path), experts=16)
    model = open_model(str(path))
    dims = ("n_layer", "n_embd", "n_vocab", "n_head", "head_dim", "n_expert", "n_ff_exp", "compress_ratios")
    assert [getattr(model.config, f) for f in dims] == [getattr(config, f) for f in dims]
    assert model.config.rms_eps == pytest.approx(1e-6) and model.config.context_length == 1048576
    assert (config.n_embd, config.n_vocab, config.n_head, config.head_dim) == (4096, 129280, 64, 512)
    assert model.tensors["token_embd.weight"].dims == (4096, 129280)
    assert model.tensors["blk.0.ffn_gate_tid2eid.weight"].dims == (6, 129280)
    ids = model.tensors["blk.0.ffn_gate_tid2eid.weight"].data()[:1000]
    assert ids.min() >= 0 and ids.max() < 16
    assert all(len(set(row)) == 6 for row in ids.tolist())
    # The real-width file runs through the same forward: one prompt step and one decode step.
    from ds4.session import Engine, Session

    s = Session(Engine(str(path), model), ctx=64)
    s.sync([0, 1000, 2000])
    s.eval(s.argmax())
    import mlx.core as mx

    assert s.pos == 4 and s.logits.shape == (129280,) and bool(mx.all(mx.isfinite(s.logits)))


BAD_META = [
    (set_meta("deepseek4.expert_count", drop=True), "required metadata key deepseek4.expert_count is missing, expected a uint32 value"),
    (set_meta("deepseek4.block_count", ValueType.UINT64), "metadata key deepseek4.block_count has type uint64, expected a uint32 value"),
    (set_meta("deepseek4.expert_weights_norm", ValueType.UINT32, 1), "has type uint32, expected a bool value"),
    (set_meta("deepseek4.rope.freq_base", value=20000.0), "deepseek4.rope.freq_base is 20000, expected rope.freq_base=10000 for DeepSeek4 Flash"),
    (set_meta("deepseek4.attention.head_count_kv", value=2), "expected attention.head_count_kv=1"),
    (set_meta("deepseek4.attention.compress_ratios", value=[0, 0, 4, 4, 4, 0]), "compress_ratios[3] is 4, expected 128"),
    (set_meta("deepseek4.attention.compress_ratios", value=[0, 0, 4]), "has 3 entries, shorter than the layer count, expected at least 5"),
    (set_meta("deepseek4.attention.compress_ratios", value=[0, -1, 4, 128, 4]), "contains a negative value"),
    (set_meta("deepseek4.attention.compress_ratios", ValueType.ARRAY, [0.0] * 6, ValueType.FLOAT32), "has type array of float32"),
    (set_meta("deepseek4.swiglu_clamp_exp", value=[10.0, 10.0, 7.0, 10.0, 10.0]), "deepseek4.swiglu_clamp_exp is 7"),
    (set_meta("deepseek4.attention.value_length", value=64), "value_length is 64, expected 128"),
    (set_meta("general.architecture", value="llama"), "general.architecture is 'llama', expected 'deepseek4'"),
    (set_meta("tokenizer.ggml.merges", drop=True), "tokenizer table tokenizer.ggml.merges is missing"),
]


@pytest.mark.parametrize("edit, message", BAD_META, ids=[m[:40] for _, m in BAD_META])
def test_bad_metadata_is_one_clear_error(tmp_path, tiny_vocab, edit, message):
    path = write_variant(tmp_path / "bad.gguf", tiny_vocab, meta_edit=edit)
    with pytest.raises(GGUFError) as err:
        open_model(path)
    assert str(err.value).startswith(path + ": ") and message in str(err.value)


def test_token_table_must_match_vocab(tmp_path, tiny_vocab):
    tokens, merges, types = tiny_vocab
    path = write_variant(tmp_path / "bad.gguf", tiny_vocab,
                         meta_edit=set_meta("tokenizer.ggml.tokens", value=tokens[:-1]))
    with pytest.raises(GGUFError, match="tokenizer.ggml.tokens has 1023 entries, expected 1024"):
        open_model(path)


BAD_TENSORS = [
    (edit_spec("blk.2.indexer.proj.weight", drop=True), "required tensor blk.2.indexer.proj.weight is missing, expected F16 [256, 4]"),
    (edit_spec("blk.1.attn_kv.weight", dims=(256, 64)), "tensor blk.1.attn_kv.weight has dim[1]=64 (shape [256, 64]), expected 128"),
    (edit_spec("blk.0.attn_sinks.weight", dims=(4, 1)), "has 2 dimensions [4, 1], expected 1 dimensions [4]"),
    (edit_spec("blk.0.attn_q_a.weight", qtype=QT.F16), "tensor blk.0.attn_q_a.weight has type F16, expected Q8_0"),
    (edit_spec("token_embd.weight", qtype=QT.BF16), "tensor token_embd.weight has type BF16, expected F16"),
    (edit_spec("blk.3.ffn_gate_exps.weight", qtype=QT.Q8_0), "has type Q8_0, expected IQ2_XXS or Q2_K or Q4_K"),
    (edit_spec("blk.3.ffn_up_exps.weight", qtype=QT.Q4_K), "use different quant types, expected the same type for gate and up"),
    (edit_spec("blk.4.exp_probs_b.bias", dims=(8,)), "tensor blk.4.exp_probs_b.bias has dim[0]=8"),
]


@pytest.mark.parametrize("edit, message", BAD_TENSORS, ids=[m[:40] for _, m in BAD_TENSORS])
def test_bad_tensors_are_one_clear_error(tmp_path, tiny_vocab, edit, message):
    path = write_variant(tmp_path / "bad.gguf", tiny_vocab, spec_edit=edit)
    with pytest.raises(GGUFError) as err:
        open_model(path)
    assert str(err.value).startswith(path + ": ") and message in str(err.value)


def test_mixed_expert_types_per_layer_load(tmp_path, tiny_vocab):
    """Routed types are checked per layer, so q2 files with Q4_K layers spliced in are valid."""
    path = write_variant(tmp_path / "mixed.gguf", tiny_vocab, spec_edit=lambda specs: [
        (s, QT.Q4_K if s.name.startswith("blk.4.ffn_") and s.role == "routed" else q) for s, q in specs])
    model = open_model(path)
    assert model.tensors["blk.4.ffn_down_exps.weight"].qtype == QT.Q4_K
    assert model.tensors["blk.3.ffn_down_exps.weight"].qtype == QT.Q2_K


def test_truncated_data_is_reported(tmp_path, tiny_vocab):
    path = write_variant(tmp_path / "cut.gguf", tiny_vocab)
    os.truncate(path, os.path.getsize(path) - 1000)
    with pytest.raises(GGUFError, match="tensor output.weight data ends at byte .* past the end of the file"):
        open_model(path)


def test_mtp_must_fit_the_base(tmp_path, tiny_paths):
    base = open_model(str(tiny_paths[0]))
    wide = synth.tiny_config(1024, n_embd=512)
    path = tmp_path / "wide-mtp.gguf"
    synth.write_parts(str(path), *synth.mtp_parts(wide), zero_source)
    with pytest.raises(GGUFError, match="MTP file has deepseek4.embedding_length=512, expected 256 to fit the base model"):
        open_mtp(str(path), base.config)
    # Without width metadata the tensor shapes still give it away.
    meta, specs = synth.mtp_parts(synth.tiny_config(1024, n_expert=8))
    synth.write_parts(str(path), [m for m in meta if "deepseek4." not in m[0]], specs, zero_source)
    with pytest.raises(GGUFError, match="tensor mtp.0.ffn_gate_inp.weight has dim.1.=8 .*, expected 16"):
        open_mtp(str(path), base.config)
    with pytest.raises(GGUFError, match="required tensor mtp.0.hc_head_base.weight is missing"):
        open_mtp(str(tiny_paths[0]), base.config)


def run_ds4(*args):
    return subprocess.run([sys.executable, "-c", "from ds4.cli import main; main()", *args],
                          capture_output=True, text=True, timeout=120)


def test_inspect_cli(tiny_paths):
    r = run_ds4("--inspect", "-m", str(tiny_paths[0]), "--mtp", str(tiny_paths[1]))
    assert r.returncode == 0, r.stderr
    assert "layers:        5 (2 sliding-window, 2 ratio-4 + indexer, 1 ratio-128; 3 hash-routed)" in r.stdout
    assert "IQ2_XXS" in r.stdout and "Q4_K" in r.stdout
    assert "516 bytes per context token" in r.stdout  # 2 x (128+128)*4/4 + 128*4/128


@pytest.mark.parametrize("content, message", [
    (None, "cannot open model: No such file or directory"),
    (b"GGUF\x02\0\0\0" + b"\0" * 16, "unsupported GGUF version 2, expected version 3"),
])
def test_cli_errors_are_one_line_exit_1(tmp_path, content, message):
    path = tmp_path / "m.gguf"
    if content is not None:
        path.write_bytes(content)
    r = run_ds4("--inspect", "-m", str(path))
    assert r.returncode == 1
    assert r.stderr == f"ds4: {path}: {message}\n"
    assert r.stdout == ""
