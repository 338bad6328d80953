"""The decode loop (ds4/decode.py): every policy's stream, the stopping rules and the stats, on the
tiny synthetic model with a drafter that replays the plain-greedy continuation (the random MTP
head accepts almost nothing)."""

from __future__ import annotations

import numpy as np
import pytest

from ds4.decode import DecodeStats, Speculative, StopReason, decode, generate
from ds4.options import GenerateOptions, MtpOptions
from ds4.session import Engine, Sampler, Session
from ds4.speculative import SpecOptions

import click

CTX = 512
N = 40


@pytest.fixture(scope="module")
def engine(tiny_paths):
    return Engine(str(tiny_paths[0]), mtp_path=str(tiny_paths[1]))


@pytest.fixture(scope="module")
def prompt():
    return [0] + np.random.default_rng(3).integers(3, 1000, 24).tolist()


def step_by_step(engine, prompt, n, sampler, eos):
    """The loop every front end used to write: pick, stop at EOS, evaluate."""
    s = Session(engine, CTX)
    s.sync(prompt)
    out = []
    for _ in range(n):
        token = s.sample(sampler)
        if token == eos:
            break
        out.append(token)
        s.eval(token)
    return out


@pytest.fixture(scope="module")
def greedy(engine, prompt):
    return step_by_step(engine, prompt, N, Sampler(temperature=0.0), engine.tokenizer.eos_id)


def replay(prompt, stream, wrong_every=5):
    def drafter(session, first, n):
        base = session.pos - len(prompt)
        return [t if (base + 1 + i) % wrong_every else (t + 1) % 1000
                for i, t in enumerate(stream[base + 1:base + 1 + n])]
    return drafter


def policies(prompt, greedy):
    return {
        "greedy": Sampler(temperature=0.0),
        "mtp head, depth 2": Speculative(SpecOptions(draft=2, margin=0)),
        "replay, continuous": Speculative(SpecOptions(draft=1, margin=0), replay(prompt, greedy)),
        "replay, depth 4": Speculative(SpecOptions(draft=4, margin=0), replay(prompt, greedy)),
        "replay, depth 3, fast verifier": Speculative(SpecOptions(draft=3, margin=0, exact=False),
                                                      replay(prompt, greedy)),
        "replay, depth 3, adaptive": Speculative(SpecOptions(draft=3, margin=0), replay(prompt, greedy),
                                                 adaptive=True),
    }


@pytest.mark.parametrize("name", ["greedy", "mtp head, depth 2", "replay, continuous", "replay, depth 4",
                                  "replay, depth 3, fast verifier", "replay, depth 3, adaptive"])
def test_every_greedy_policy_streams_plain_greedy(engine, prompt, greedy, name):
    policy = policies(prompt, greedy)[name]
    s = Session(engine, CTX)
    stats = DecodeStats()
    out = list(decode(s, prompt, N, policy, engine.tokenizer.eos_id, stats))
    assert out == greedy == stats.generated
    assert list(s.tokens) == prompt + out  # the last token is evaluated too
    assert stats.prompt_tokens == len(prompt) and stats.stopped_by is StopReason.BUDGET
    if isinstance(policy, Speculative):
        assert stats.spec.committed == len(out)
        assert sum(stats.spec.accepted.values()) <= sum(stats.spec.proposed.values())
        if policy.drafter is not None and not policy.adaptive:
            assert stats.max_commit > 1 and stats.spec.cycles > 0
    else:
        assert stats.max_commit == 1 and stats.spec.committed == 0  # plain steps leave SpecStats alone


def test_sampled_stream_is_the_step_by_step_one(engine, prompt):
    eos = engine.tokenizer.eos_id
    expected = step_by_step(engine, prompt, N, Sampler(temperature=0.8, seed=7), eos)
    out = generate(Session(engine, CTX), prompt, N, Sampler(temperature=0.8, seed=7), eos).generated
    assert out == expected
    assert out != generate(Session(engine, CTX), prompt, N, Sampler(temperature=0.8, seed=8), eos).generated


def test_plain_step_yields_before_evaluating(engine, prompt, greedy):
    """A consumer sees each token while the session still holds the logits that chose it."""
    s = Session(engine, CTX)
    for i, token in enumerate(decode(s, prompt, 6, Sampler(temperature=0.0), engine.tokenizer.eos_id)):
        assert s.pos == len(prompt) + i and s.argmax() == token
    assert s.pos == len(prompt) + 6


@pytest.mark.parametrize("name", ["greedy", "replay, depth 4", "replay, continuous"])
def test_stopping_rules(engine, prompt, greedy, name):
    policy = policies(prompt, greedy)[name]
    eos = engine.tokenizer.eos_id
    # Budget.
    for n in (1, 3, 7):
        g = generate(Session(engine, CTX), prompt, n, policy, eos)
        assert g.generated == greedy[:n] and g.stopped_by is StopReason.BUDGET
    # Context end: one position stays free.
    ctx = len(prompt) + 9
    s = Session(engine, ctx)
    g = generate(s, prompt, N, policy, eos)
    assert g.generated == greedy[:8] and g.stopped_by is StopReason.CONTEXT and s.pos == ctx - 1
    # EOS (here a token greedy decode meets): neither yielded nor evaluated.
    k = greedy.index(greedy[6])
    s = Session(engine, CTX)
    g = generate(s, prompt, N, policy, greedy[6])
    assert g.generated == greedy[:k] and g.stopped_by_eos and s.pos == len(prompt) + k
    # exclude_eos: the best other token instead, a fixed number of tokens.
    g = generate(Session(engine, CTX), prompt, 12, policy, greedy[6], exclude_eos=True)
    assert len(g.generated) == 12 and greedy[6] not in g.generated and g.generated[:k] == greedy[:k]
    assert g.stopped_by is StopReason.BUDGET


def test_exclude_eos_streams_agree_across_policies(engine, prompt, greedy):
    eos = greedy[6]
    plain = generate(Session(engine, CTX), prompt, 16, Sampler(temperature=0.0), eos, exclude_eos=True).generated
    spec = generate(Session(engine, CTX), prompt, 16, Speculative(SpecOptions(draft=3, margin=0)), eos,
                    exclude_eos=True).generated
    assert plain == spec
    with pytest.raises(ValueError):
        list(decode(Session(engine, CTX), prompt, 4, Sampler(temperature=1.0), eos, exclude_eos=True))


def test_decode_goes_on_from_the_session_without_a_prompt(engine, prompt, greedy):
    s = Session(engine, CTX)
    s.sync(prompt)
    g = generate(s, None, 10, Sampler(temperature=0.0), engine.tokenizer.eos_id)
    assert g.generated == greedy[:10] and g.prompt_tokens == 0


def test_reused_prefix_is_not_counted_as_prefill(engine, prompt, greedy):
    s = Session(engine, CTX)
    first = generate(s, prompt, 4, Sampler(temperature=0.0), engine.tokenizer.eos_id)
    follow = prompt + first.generated + [7]
    again = generate(s, follow, 2, Sampler(temperature=0.0), engine.tokenizer.eos_id)
    assert first.prompt_tokens == len(prompt) and again.prompt_tokens == 1


def test_options_pick_the_policy(monkeypatch):
    monkeypatch.delenv("DS4_MTP_CONTINUOUS", raising=False)
    monkeypatch.delenv("DS4_MTP_STRICT", raising=False)
    opts = GenerateOptions(temperature=0.0, mtp=MtpOptions.from_flags(draft=3, fast_verify=True))
    assert opts.speculates(has_mtp=True, one_shot=True)
    assert not opts.speculates(has_mtp=True, one_shot=False) and not opts.speculates(False, True)
    spec = opts.mtp.spec_options(file_margin=2.5)
    assert spec == SpecOptions(draft=3, margin=2.5, exact=False)
    assert isinstance(opts.policy(spec), Speculative) and isinstance(opts.policy(None), Sampler)
    assert not GenerateOptions(temperature=0.7).speculates(True, True)
    # --quality or DS4_MTP_STRICT=1 keep the exact verifier whatever --mtp-fast-verify says.
    assert MtpOptions.from_flags(fast_verify=True, strict=True).exact
    assert MtpOptions.from_flags(fast_verify=True, environ={"DS4_MTP_STRICT": "1"}).exact
    # DS4_MTP_CONTINUOUS=1 is --mtp-continuous, which cannot take a deeper draft.
    cont = MtpOptions.from_flags(environ={"DS4_MTP_CONTINUOUS": "1"})
    assert cont.requested and cont.spec_options(3.0).draft == 1
    with pytest.raises(click.UsageError):
        MtpOptions.from_flags(draft=3, environ={"DS4_MTP_CONTINUOUS": "1"})
    assert MtpOptions.from_flags(margin=0.5).spec_options(3.0).margin == 0.5
