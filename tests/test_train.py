"""The trainer (ds4/train.py): float weights through the engine's own forward, gradients, the
training windows, balancing, and export through the synthetic writer."""

from __future__ import annotations

import mlx.core as mx
import mlx.optimizers as optim
import numpy as np
import pytest
from gguf import GGMLQuantizationType as QT

from ds4 import codecs, synth, train
from ds4.numerics import Numerics
from ds4.loader import open_model, open_mtp
from ds4.model import Model
from ds4.mtp import MTPHead
from ds4.quant import QuantExperts, QuantWeight
from ds4.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def tiny():
    vocab = synth.make_vocab("synthetic", None)
    config = synth.tiny_config(len(vocab[0]))
    params, fixed = train.init_weights(config, seed=3)
    return config, vocab, params, fixed


def _seq(config, n, seed=0):
    return np.random.default_rng(seed).integers(3, config.n_vocab - 20, n).astype(np.int32)


def test_float_weight_matches_quant_weight_on_f32_data():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((64, 96)).astype(np.float32)
    x = mx.array(rng.standard_normal((5, 96)).astype(np.float32))
    fw, qw = train.FloatWeight(mx.array(w)), QuantWeight(w, QT.F32, (64, 96))
    assert np.allclose(np.array(fw(x)), np.array(qw(x)), rtol=1e-5, atol=1e-5)
    xg = mx.array(rng.standard_normal((5, 2, 48)).astype(np.float32))
    wg = rng.standard_normal((64, 48)).astype(np.float32)
    assert np.allclose(np.array(train.FloatWeight(mx.array(wg)).grouped(xg)),
                       np.array(QuantWeight(wg, QT.F32, (64, 48)).grouped(xg)), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("per_expert_input", [False, True])
def test_float_experts_match_routed_product(per_expert_input):
    rng = np.random.default_rng(1)
    w = rng.standard_normal((8, 32, 64)).astype(np.float32)
    ids = np.stack([rng.permutation(8)[:3] for _ in range(7)]).astype(np.int32)
    x = rng.standard_normal((7, 3, 64) if per_expert_input else (7, 64)).astype(np.float32)
    got = np.array(train.FloatExperts(mx.array(w)).gather_matmul(mx.array(x), mx.array(ids)))
    ref = np.array(QuantExperts(w, QT.F32, (8, 32, 64)).gather_matmul(mx.array(x), mx.array(ids)))
    manual = np.stack([[w[e] @ (x[m, j] if per_expert_input else x[m]) for j, e in enumerate(ids[m])]
                       for m in range(7)])
    assert np.allclose(got, manual, rtol=1e-4, atol=1e-4)
    assert np.allclose(ref, manual, rtol=1e-4, atol=1e-4)


def test_gradients_reach_trunk_mtp_and_kv_through_qat(tiny):
    config, _, params, fixed = tiny
    seq = _seq(config, 41)

    def loss(p):
        model, mtp = train.build({**p, **fixed}, config)
        a, b = train.sequence_losses(model, mtp, seq)
        return a + 0.3 * b

    grads = mx.grad(loss)(params)
    norms = {k: float(mx.sqrt(mx.sum(g * g)).item()) for k, g in grads.items()}
    for name in ("token_embd.weight", "output.weight", "blk.0.attn_q_a.weight", "blk.2.attn_kv.weight",
                 "blk.2.attn_compressor_kv.weight", "blk.4.ffn_gate_exps.weight", "blk.4.ffn_gate_inp.weight",
                 "blk.1.hc_attn_fn.weight", "mtp.0.e_proj.weight", "mtp.0.ffn_down_exps.weight"):
        assert norms[name] > 0, name
    assert all(np.isfinite(v) for v in norms.values())
    # The indexer, hash tables and balancing biases are not trained by gradient.
    assert not any("indexer" in k or "tid2eid" in k or "exp_probs_b" in k for k in params)


def test_training_steps_fit_a_window(tiny):
    config, _, params, fixed = tiny
    seq = _seq(config, 33, seed=5)

    def loss(p):
        model, mtp = train.build({**p, **fixed}, config)
        a, b = train.sequence_losses(model, mtp, seq)
        return a + b

    step = mx.value_and_grad(loss)
    opt = optim.Adam(learning_rate=3e-3)
    first, p = None, dict(params)
    for _ in range(12):
        value, g = step(p)
        p = opt.apply_gradients(g, p)
        mx.eval(p, value)
        first = first if first is not None else value.item()
    assert value.item() < first - 1.0


def test_sample_windows(tiny):
    config, vocab, _, _ = tiny
    tok = Tokenizer.from_vocab(vocab[0], vocab[1])
    corpus = train.Corpus.from_text(tok, synth.CORPUS * 20, held_out=0.2)
    assert len(corpus.valid) > 0 and len(corpus.train) > 4 * len(corpus.valid) - 200
    rng = np.random.default_rng(0)
    plain = train.sample_window(corpus, 64, rng, 0.0, 0.0)
    assert len(plain) == 64 and any(np.array_equal(plain, corpus.train[i:i + 64]) for i in range(len(corpus.train) - 63))
    for _ in range(5):
        w = train.sample_window(corpus, 64, rng, 1.0, 0.0)
        assert any(np.array_equal(w[a:a + 16], w[b:b + 16]) for a in range(48) for b in range(a + 16, 49))
    c = corpus.chat
    for _ in range(5):
        w = train.sample_window(corpus, 600, rng, 0.0, 1.0).tolist()
        assert len(w) == 600 and w[0] == c["bos"]
        assert w.index(c["user"]) < w.index(c["assistant"]) < w.index(c["think_end"])
        # The answer ends at a sentence end with EOS, at least 17 tokens in.
        end = w.index(c["eos"])
        assert end > w.index(c["think_end"]) + 17 and c["sentence_end"][w[end - 1]]


def test_balancing_moves_bias_against_load(tiny):
    config, _, params, fixed = tiny
    model, mtp = train.build({**params, **fixed}, config)
    train.sequence_losses(model, mtp, _seq(config, 40))
    loads = train.expert_loads(model, mtp)
    names = train.balance_bias_names(config)
    assert len(loads) == len(names)
    # 39 trunk rows and 38 MTP rows, n_expert_used experts each.
    assert [int(mx.sum(x).item()) for x in loads] == [39 * config.n_expert_used] * (len(names) - 1) + \
        [38 * config.n_expert_used]
    new = {n: fixed[n] + train.BIAS_STEP * mx.sign(mx.mean(x) - x) for n, x in zip(names, loads)}
    x, n = loads[0], names[0]
    busiest, idlest = int(mx.argmax(x).item()), int(mx.argmin(x).item())
    assert new[n][busiest].item() < fixed[n][busiest].item()
    assert new[n][idlest].item() > fixed[n][idlest].item()


def test_export_runs_the_same_model_through_the_gguf_path(tiny, tmp_path):
    config, vocab, params, fixed = tiny
    arrays = {**params, **fixed}
    base, mtp_path = str(tmp_path / "m.gguf"), str(tmp_path / "m-mtp.gguf")
    train.export(arrays, config, vocab, base, mtp_path, quant="q4")
    mf = open_model(base)
    dims = ("n_layer", "n_embd", "n_vocab", "n_expert", "n_hash_layer", "n_swa", "compress_ratios")
    assert [getattr(mf.config, k) for k in dims] == [getattr(config, k) for k in dims]
    assert mf.tensors["blk.0.ffn_gate_exps.weight"].qtype == QT.Q4_K
    assert np.array_equal(mf.tensors["blk.0.ffn_gate_tid2eid.weight"].data(), np.array(fixed["blk.0.ffn_gate_tid2eid.weight"]))
    # Every tensor holds its float weights up to the codec's own error (orientation included).
    bound = {QT.F32: 0.0, QT.F16: 1e-3, QT.Q8_0: 0.006, QT.Q4_K: 0.076}
    for name, t in mf.tensors.items():
        if t.qtype == QT.I32:
            continue
        a = np.array(arrays[name])
        back = np.asarray(codecs.dequantize(t.data(), QT(t.qtype)), np.float32).reshape(a.shape)
        assert np.linalg.norm(back - a) <= bound[QT(t.qtype)] * np.linalg.norm(a) + 1e-12, name
    # And the engine runs the exported files as the float model (random weights amplify the
    # per-weight error through 5 layers; a transposed tensor would give a relative error ~1.4).
    qmodel = Model.load(mf)
    qmtp = MTPHead.load(open_mtp(mtp_path, config), qmodel)
    fmodel, fmtp = train.build(arrays, config, Numerics())
    seq = _seq(config, 48, seed=9)
    a = np.array(fmodel.forward(seq, fmodel.empty_state(64, 64), all_logits=True)[0])
    b = np.array(qmodel.forward(seq, qmodel.empty_state(64, 64), all_logits=True)[0])
    assert np.linalg.norm(a - b) / np.linalg.norm(a) < 0.25
    fa, fb = train.evaluate(fmodel, fmtp, seq, seq_len=32, n_windows=2), train.evaluate(qmodel, qmtp, seq, 32, 2)
    assert abs(fa[0] - fb[0]) < 0.1 and abs(fa[1] - fb[1]) < 0.1


def test_mtp_distillation_trains_only_the_mtp_block(tiny):
    config, vocab, params, fixed = tiny
    tok = Tokenizer.from_vocab(vocab[0], vocab[1])
    corpus = train.Corpus.from_text(tok, synth.CORPUS * 20, held_out=0.2)
    opts = train.TrainOptions(seq_len=32, batch=1, lr=3e-3)
    seen = []
    new_params, new_fixed = train.distill_mtp(config, corpus, opts, dict(params), dict(fixed), 8,
                                              log=lambda step, kl, agree: seen.append(kl))
    assert seen[-1] < seen[0]
    assert set(new_params) == set(params) and set(new_fixed) == set(fixed)
    for k in params:
        same = bool(mx.array_equal(new_params[k], params[k]).item())
        assert same != k.startswith("mtp."), k
    assert not mx.array_equal(new_fixed["mtp.0.exp_probs_b.bias"], fixed["mtp.0.exp_probs_b.bias"]).item()
    assert mx.array_equal(new_fixed["blk.3.exp_probs_b.bias"], fixed["blk.3.exp_probs_b.bias"]).item()


def test_cli_errors_are_one_line(tmp_path):
    import subprocess
    import sys

    corpus = tmp_path / "c.txt"
    corpus.write_text(synth.CORPUS * 5, encoding="utf-8")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"junk")

    def ds4_train(*args):
        return subprocess.run([sys.executable, "-c", "from ds4.train import main; main()", "--corpus", str(corpus),
                               *args], capture_output=True, text=True, timeout=300, cwd=tmp_path)

    r = ds4_train("--resume", str(bad), "--steps", "1")
    assert r.returncode == 1 and "not a ds4-train checkpoint" in r.stderr and "Traceback" not in r.stderr
    r = ds4_train("--focus", "not in the text", "--steps", "1")
    assert r.returncode == 2 and "--focus" in r.stderr and "Traceback" not in r.stderr
    assert not list(tmp_path.glob("build"))
