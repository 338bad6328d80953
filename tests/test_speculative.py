"""MTP speculative decoding: the MTP head against the float64 reference, and the cycle driven by
a test drafter that replays the plain-greedy continuation with errors injected where we choose
(random weights give the real MTP head ~0 acceptance)."""

from __future__ import annotations

import dataclasses

import os
import subprocess
import sys

import mlx.core as mx
import numpy as np
import pytest

from ds4.decode import Speculative, generate
from ds4.session import Engine, Sampler, Session
from ds4.speculative import AdaptiveGate, SpecOptions, SpecStats, speculative_step

CTX = 512


@pytest.fixture(scope="module")
def engine(tiny_paths):
    return Engine(str(tiny_paths[0]), mtp_path=str(tiny_paths[1]))


@pytest.fixture(scope="module")
def prompt():
    return [0] + np.random.default_rng(1).integers(3, 1000, 30).tolist()


@pytest.fixture(scope="module")
def greedy(engine, prompt):
    return generate(Session(engine, CTX), prompt, 48, Sampler(temperature=0.0), engine.tokenizer.eos_id).generated


def replay(prompt, stream, errors=(), inject=None):
    """Drafts the true continuation, except at stream indices in `errors` (a wrong token) and
    `inject` ({index: token}, e.g. an EOS)."""
    def drafter(session, first, n):
        base = session.pos - len(prompt)  # index of `first` in the stream
        out = []
        for j in range(base + 1, base + 1 + n):
            if j >= len(stream):
                break
            t = stream[j]
            if inject and j in inject:
                t = inject[j]
            elif j in errors:
                t = (t + 1) % 1000
            out.append(t)
        return out
    return drafter


def run(engine, prompt, opts, drafter=None, max_tokens=48, ctx=CTX, chunk=None):
    s = Session(engine, ctx, chunk)
    g = generate(s, prompt, max_tokens, Speculative(opts, drafter), engine.tokenizer.eos_id)
    return g.generated, g.spec, s


@pytest.mark.parametrize("draft", [1, 2, 3, 4])
@pytest.mark.parametrize("errors", [(), (5, 9, 10, 22, 23, 24)])
def test_exact_stream_equals_plain_greedy(engine, prompt, greedy, draft, errors):
    out, stats, s = run(engine, prompt, SpecOptions(draft=draft, margin=0), replay(prompt, greedy, errors))
    assert out == greedy
    assert stats.cycles > 0 and sum(stats.accepted.values()) > 0
    if errors:
        assert sum(stats.accepted.values()) < sum(stats.proposed.values())
    else:
        assert sum(stats.accepted.values()) == sum(stats.proposed.values())
    assert stats.trunk_passes < len(out)  # multi-token commits saved trunk passes
    # Committed state equals a fresh session synced to the same tokens: logits and MTP rows.
    fresh = Session(engine, CTX)
    fresh.sync(s.tokens)
    np.testing.assert_array_equal(np.array(s.logits), np.array(fresh.logits))
    assert s.mtp.block.pos == fresh.mtp.block.pos == s.pos - 1
    for a, b in zip(s.mtp.arrays(), fresh.mtp.arrays()):
        np.testing.assert_array_equal(np.array(a), np.array(b))


def test_row_by_row_exact_verifier(engine, prompt, greedy, monkeypatch):
    """Where batched rows are not computed like decodes, the exact verifier steps row by row."""
    monkeypatch.setattr(Engine, "row_invariant", property(lambda self: False))
    calls = []
    monkeypatch.setattr(Session, "verify", lambda *a: calls.append(a))
    out, stats, _ = run(engine, prompt, SpecOptions(draft=3, margin=0), replay(prompt, greedy, (4, 11)))
    assert out == greedy and not calls and sum(stats.accepted.values()) > 0


def test_fast_verifier_commits_only_verifier_argmax(engine, prompt, greedy):
    out, stats, _ = run(engine, prompt, SpecOptions(draft=4, margin=0, exact=False), replay(prompt, greedy, (3, 8)))
    assert out == greedy  # the CPU backend computes batched rows exactly, so fast is exact here


def test_eos_inside_a_draft_and_clamps(engine, prompt, greedy):
    eos = engine.tokenizer.eos_id
    # A draft proposing EOS is cut before it; the stream is untouched.
    out, _, _ = run(engine, prompt, SpecOptions(draft=4, margin=0), replay(prompt, greedy, inject={6: eos}))
    assert out == greedy
    # Token budget: never more than asked, even with long accepted drafts.
    for n in (1, 2, 5, 7):
        out, _, _ = run(engine, prompt, SpecOptions(draft=4, margin=0), replay(prompt, greedy), max_tokens=n)
        assert out == greedy[:n]
    # Context end: the last cycles shrink so nothing passes ctx - 1.
    ctx = len(prompt) + 10
    out, _, s = run(engine, prompt, SpecOptions(draft=4, margin=0), replay(prompt, greedy), ctx=ctx)
    assert out == greedy[:ctx - 1 - len(prompt)] and s.pos <= ctx - 1


def test_eos_from_the_trunk_stops_without_evaluating(engine, prompt, greedy):
    eos = engine.tokenizer.eos_id
    s = Session(engine, CTX)
    s.sync(prompt)
    s._state = dataclasses.replace(s._state, logits=mx.where(mx.arange(s.logits.shape[0]) == eos, 100.0, s.logits),
                                   argmax=eos)
    pos = s.pos
    assert speculative_step(s, SpecOptions(margin=0), 10, eos, SpecStats()) == [eos] and s.pos == pos


@pytest.mark.parametrize("chunk", [1, 2])
def test_prefill_chunk_clamps_draft_depth(engine, prompt, greedy, chunk):
    """Upstream #381: the draft depth is clamped by the prefill chunk (a verify is one chunk)."""
    seen = []

    def drafter(session, first, n):
        seen.append(n)
        return replay(prompt, greedy)(session, first, n)

    out, _, _ = run(engine, prompt, SpecOptions(draft=4, margin=0), drafter, chunk=chunk, max_tokens=12)
    assert out == greedy[:12]
    assert all(n <= chunk - 1 for n in seen)


def test_non_finite_verify_row_falls_back_to_plain_decode(engine, prompt, greedy, monkeypatch):
    real = Session.verify

    def broken(self, rows):
        v = real(self, rows)
        return dataclasses.replace(v, finite=[False] * len(rows))

    monkeypatch.setattr(Session, "verify", broken)
    out, stats, _ = run(engine, prompt, SpecOptions(draft=2, margin=0), replay(prompt, greedy), max_tokens=10)
    assert out == greedy[:10] and stats.failures > 0 and 0 not in out


def test_real_mtp_head_runs_and_stays_exact(engine, prompt, greedy):
    """Random MTP weights: drafts are (almost) always rejected, and every rejection rolls back."""
    out, stats, s = run(engine, prompt, SpecOptions(draft=2, margin=0))
    assert out == greedy and stats.cycles > 0
    fresh = Session(engine, CTX)
    fresh.sync(s.tokens)
    np.testing.assert_array_equal(np.array(s.logits), np.array(fresh.logits))


def test_mtp_head_matches_float64_reference(tiny_paths):
    from ds4.loader import open_model, open_mtp
    from ds4.reference import ReferenceModel, load_reference_weights

    mf = open_model(str(tiny_paths[0]))
    c = mf.config
    ref = ReferenceModel(c, load_reference_weights(mf))
    mtp_weights = load_reference_weights(open_mtp(str(tiny_paths[1]), c))
    head = Engine(str(tiny_paths[0]), mtp_path=str(tiny_paths[1])).mtp
    cache = head.empty_state(256)
    rng = np.random.default_rng(0)
    H = rng.standard_normal((45, c.n_hc, c.n_embd))  # past the 32-row window
    tokens = rng.integers(3, c.n_vocab, 45)
    for q in range(45):
        expected = ref.mtp_draft(mtp_weights, H[q], int(tokens[q]), q)
        logits, cache, _ = head.forward(mx.array(H[q:q + 1].astype(np.float32)), [int(tokens[q])], cache)
        got = np.array(logits)
        assert np.abs(got - expected).max() / np.abs(expected).max() < 1e-3
        assert got.argmax() == expected.argmax()


def test_adaptive_gate_falls_back_and_probes_again():
    gate = AdaptiveGate(window=4, cooldown=3, probe_plain=2)
    assert not gate.speculate()
    gate.record_plain(0.01)
    gate.record_plain(0.01)  # plain: 100 t/s
    assert gate.speculate()

    def cycles(tokens, seconds):
        for _ in range(4):
            gate.record_cycle(tokens, seconds)

    def plain_steps():
        n = 0
        while not gate.speculate():
            gate.record_plain(0.01)
            n += 1
        return n

    cycles(1, 0.03)  # speculation at 33 t/s: back to plain
    assert plain_steps() == 3
    cycles(1, 0.03)  # fails again: the cooldown doubles
    assert plain_steps() == 6
    cycles(4, 0.02)  # 200 t/s: keeps speculating, and the cooldown resets
    assert gate.speculate()
    cycles(1, 0.03)
    assert plain_steps() == 3


def test_cli_mtp_is_exact_and_off_for_sampling(tiny_paths, tmp_path):
    def ds4(*args, env_extra=None):
        return subprocess.run([sys.executable, "-c", "from ds4.cli import main; main()", "-m", str(tiny_paths[0]),
                               "-p", "Ciao", "-n", "16", "--nothink", "--ctx", "256", *args],
                              capture_output=True, text=True, timeout=300, env={**os.environ, **(env_extra or {})})

    plain = ds4("--temp", "0")
    log = tmp_path / "mtp.jsonl"
    spec = ds4("--temp", "0", "--mtp", str(tiny_paths[1]), "--mtp-margin", "0", "--no-mtp-adaptive",
               "--mtp-draft", "2", "--mtp-log", str(log), env_extra={"DS4_MTP_SPEC_LOG": "1", "DS4_MTP_CONF_LOG": "1"})
    assert spec.returncode == 0, spec.stderr
    assert spec.stdout == plain.stdout
    assert "ds4: mtp:" in spec.stderr and log.read_text().count("\n") > 0
    assert "ds4: mtp spec miss first draft=" in spec.stderr and "ds4: mtp conf drafted=" in spec.stderr
    sampled = ds4("--seed", "3", "--mtp", str(tiny_paths[1]))
    assert sampled.stdout == ds4("--seed", "3").stdout
    assert "used only for greedy generation" in sampled.stderr and "ds4: mtp:" not in sampled.stderr


def test_teacher_forcing_replay_oracle(engine, prompt, greedy):
    """The batched verifier's stream replayed through plain decode: every committed token's gap
    to the plain argmax is at most 2.0 (here 0: the CPU computes batched rows exactly). A
    verifier that commits a wrong token shows up as a positive gap and a divergence."""
    from ds4.speculative import replay_gaps

    out, _, _ = run(engine, prompt, SpecOptions(draft=4, margin=0, exact=False), replay(prompt, greedy, (3, 8)))
    gaps = replay_gaps(Session(engine, CTX), prompt, out)
    assert max(gaps) <= 2.0 and sum(g > 0 for g in gaps) == 0
    wrong = list(out)
    wrong[5] = (wrong[5] + 1) % 1000
    gaps = replay_gaps(Session(engine, CTX), prompt, wrong)
    assert gaps[5] > 0 and sum(g > 0 for g in gaps) / len(gaps) > 0


def test_same_position_pairing_diagnostic(engine, prompt, greedy, monkeypatch):
    """DS4_MTP_PAIRING=same drafts from the reference engine's pairing (h_q with token q); the
    verifier keeps the stream exact either way."""
    monkeypatch.setenv("DS4_MTP_PAIRING", "same")
    out, stats, s = run(engine, prompt, SpecOptions(draft=2, margin=0), max_tokens=12)
    assert out == greedy[:12] and stats.cycles > 0
    assert s.mtp.block.pos == s.pos  # every committed position has its row


def test_draft_inputs_always_match_the_committed_tokens(engine, prompt):
    """The drafting anchor (trunk state at the last position and the MTP rows) is part of the
    session state: after sync, eval, rewind, restore and invalidate it is what a fresh session
    synced to the same tokens holds, so a stale anchor cannot exist."""
    s = Session(engine, CTX, 8)

    def same_as_fresh():
        fresh = Session(engine, CTX, 8)
        fresh.sync(s.tokens)
        np.testing.assert_array_equal(np.array(s.hidden), np.array(fresh.hidden))
        assert s.mtp.block.pos == fresh.mtp.block.pos == s.pos - 1
        for a, b in zip(s.mtp.arrays(), fresh.mtp.arrays()):
            np.testing.assert_array_equal(np.array(a), np.array(b))

    s.sync(prompt[:20])
    same_as_fresh()
    snap = s.snapshot()
    s.eval(5)
    s.eval(6)
    same_as_fresh()
    assert s.rewind(2)
    same_as_fresh()
    s.sync(prompt)  # extend past a chunk boundary
    same_as_fresh()
    s.restore(snap)
    same_as_fresh()
    s.invalidate()
    s.sync(prompt[:9])
    same_as_fresh()


def test_speculation_resumes_after_a_loaded_session(engine, prompt, greedy, tmp_path):
    """A saved session carries no MTP state (as in the reference engine): after load, MTP rows
    restart at the loaded position and speculation resumes after one plain step."""
    s = Session(engine, CTX)
    s.sync(prompt)
    s.save(str(tmp_path / "s.ds4"))
    t = Session(engine, CTX)
    t.load(str(tmp_path / "s.ds4"))
    g = generate(t, prompt, 12, Speculative(SpecOptions(draft=2, margin=0)), engine.tokenizer.eos_id)
    out, stats = g.generated, g.spec
    assert out == greedy[:12] and stats.plain_steps >= 1 and stats.cycles > 0
