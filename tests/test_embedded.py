"""The embedded demo model (ds4/data): DS4 layout, language-model quality on held-out text, the
`ds4` default, speculative decoding with its trained MTP head, and ds4-test's oracles on it."""

from __future__ import annotations

import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from gguf import GGMLQuantizationType as QT

from ds4 import train
from ds4.chat import ThinkMode, render_prompt
from ds4.decode import Speculative, generate
from ds4.loader import (
    EMBEDDED_MODEL,
    EMBEDDED_MTP,
    EMBEDDED_VECTORS,
    choose_model,
    open_model,
    open_mtp,
)
from ds4.session import Engine, Sampler, Session
from ds4.speculative import SpecOptions
from ds4.tokenizer import BOS

CORPUS = Path(__file__).resolve().parents[1] / "speed-bench" / "promessi_sposi.txt"


@pytest.fixture(scope="module")
def engine():
    return Engine(str(EMBEDDED_MODEL), mtp_path=str(EMBEDDED_MTP))


@pytest.fixture(scope="module")
def corpus(engine):
    return train.Corpus.from_text(engine.tokenizer, CORPUS.read_text(encoding="utf-8"))


def run(prog: str, *args, cwd, env=None):
    return subprocess.run([sys.executable, "-c", f"from {prog} import main; main()", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=600, env={**os.environ, **(env or {})})


def test_files_have_the_ds4_layout_and_fit_the_package():
    base = open_model(str(EMBEDDED_MODEL))
    mtp = open_mtp(str(EMBEDDED_MTP), base.config)
    c = base.config
    assert c.compress_ratios == (0, 0, 4, 128, 4, 128) and c.n_hash_layer == 3 and c.n_hc == 4
    assert base.tensors["blk.0.ffn_gate_exps.weight"].qtype == QT.IQ2_XXS
    assert base.tensors["blk.0.ffn_down_exps.weight"].qtype == QT.Q2_K
    assert base.tensors["blk.2.attn_q_a.weight"].qtype == QT.Q8_0
    assert mtp.tensors["mtp.0.ffn_gate_exps.weight"].qtype == QT.Q4_K
    assert EMBEDDED_MODEL.stat().st_size + EMBEDDED_MTP.stat().st_size < 25 * 2**20
    tok = base.tokenizer()
    assert tok.token_bytes(tok.bos_id) == BOS.encode()


def test_tokenizer_is_a_bpe_learnt_on_the_corpus(engine, corpus):
    tok = engine.tokenizer
    text = tok.decode(corpus.valid[:2000].tolist())
    assert len(text) / 2000 > 2.8  # Italian prose: ~3 characters per token with 2048 ids
    assert tok.decode(tok.encode(text)) == text
    # Merges learnt on the corpus: its frequent words are single tokens.
    assert all(len(tok.encode(w)) == 1 for w in (" che", " di", " non", " Renzo"))


def test_held_out_perplexity_is_far_below_unigram(engine, corpus):
    """The quantized model predicts unseen text of the corpus: its cross-entropy sits well below
    the corpus's own unigram entropy (what a model without context could reach)."""
    counts = Counter(corpus.train.tolist())
    p = np.array(list(counts.values()), np.float64) / len(corpus.train)
    unigram = float(-(p * np.log(p)).sum())
    trunk, mtp_ce = train.evaluate(engine.model, engine.mtp, corpus.valid, seq_len=128, n_windows=4)
    assert trunk < unigram - 1.0, (trunk, unigram)
    assert mtp_ce < unigram - 0.5, (mtp_ce, unigram)


def test_greedy_continues_the_novels_opening(engine):
    """The novel's first line, as a raw prompt and as a `ds4 -p` chat prompt: the greedy
    continuation is the book's text (the trainer's --focus passage)."""
    tok = engine.tokenizer
    text = CORPUS.read_text(encoding="utf-8")
    start = text.index("Quel ramo del lago di Como")
    prompt, follow = text[start:start + 52], tok.encode(text[start + 52:start + 120])
    assert prompt.endswith("mezzogiorno,")
    g = generate(Session(engine, 512), tok.encode(prompt), 8, Sampler(temperature=0.0), tok.eos_id)
    assert g.generated[:6] == follow[:6], tok.decode(g.generated)
    chat = render_prompt(tok, "Quel ramo del lago di Como", think=ThinkMode.NONE)  # the README's demo
    g = generate(Session(engine, 512), chat, 12, Sampler(temperature=0.0), tok.eos_id)
    assert tok.decode(g.generated).startswith(", che volge a mezzogiorno"), tok.decode(g.generated)


def test_ds4_without_model_uses_the_embedded_one(tmp_path):
    r = run("ds4.cli", "-p", "Renzo e Lucia", "-n", "24", "--temp", "0", "--ctx", "512", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "embedded demo model" in r.stderr and r.stdout.strip()
    m = run("ds4.cli", "-p", "Renzo e Lucia", "-n", "24", "--temp", "0", "--ctx", "512", "--mtp-continuous",
            cwd=tmp_path)
    assert m.returncode == 0, m.stderr
    assert "MTP support model loaded" in m.stderr and EMBEDDED_MTP.name in m.stderr
    assert m.stdout == r.stdout  # exact verifier: the plain greedy text
    other = run("ds4.cli", "-m", str(EMBEDDED_MODEL.with_name("missing.gguf")), "-p", "x", "--mtp-draft", "2",
                cwd=tmp_path)
    assert other.returncode == 1 and "need --mtp FILE" in other.stderr and "Traceback" not in other.stderr


def test_choose_model_prefers_ds4flash_in_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert choose_model(None).embedded and choose_model(None).notice
    (tmp_path / "ds4flash.gguf").write_bytes(b"")
    choice = choose_model(None)
    assert choice.path == "./ds4flash.gguf" and not choice.embedded and choice.notice is None
    assert choose_model(str(EMBEDDED_MODEL)).embedded


def test_speculation_commits_several_tokens_per_pass_on_copy(engine, corpus):
    """Continuous depth-1 with the trained MTP head on a passage seen in the prompt: most drafts
    are accepted, and the stream is plain greedy's."""
    tok = engine.tokenizer
    passage = corpus.valid[500:580].tolist()
    prompt = passage + tok.encode("\n\n") + passage[:8]
    plain = generate(Session(engine, 512), prompt, 48, Sampler(temperature=0.0), tok.eos_id)
    spec = generate(Session(engine, 512), prompt, 48, Speculative(SpecOptions(draft=1, margin=0)), tok.eos_id)
    stats = spec.spec
    assert spec.generated == plain.generated
    assert stats.accepted[0] / stats.proposed[0] > 0.6
    assert stats.trunk_passes / stats.committed < 0.7


@pytest.mark.slow  # `make oracle`, which CI runs after `make test`, runs these checks and one more
def test_ds4_test_oracles_pass_on_the_embedded_model(tmp_path):
    assert EMBEDDED_VECTORS.exists()
    r = run("ds4.oracle", "--logprob-vectors", "--mtp-verify-depth", "--cont-argmax-gap", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "ds4 tests: ok"
    for name in ("logprob-vectors", "mtp-verify-depth", "cont-argmax-gap"):
        assert f"{name}: OK" in r.stderr
    assert "SKIP" not in r.stderr
