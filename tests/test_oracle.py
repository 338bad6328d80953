"""ds4-test: the official.vec format both ways, the speculative replay oracles (passing on a
correct cycle, failing on an injected verifier bug), and the runner's exit codes."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys

import pytest

from ds4.chat import ThinkMode, render_prompt
from ds4.decode import generate
from ds4.oracle import MTP_PROMPT, Check, check_logprob_vectors, read_vectors, verify_depth, write_vectors
from ds4.session import Engine, Sampler, Session
from ds4.speculative import SpecOptions


@pytest.fixture(scope="module")
def engine(tiny_paths):
    return Engine(str(tiny_paths[0]), mtp_path=str(tiny_paths[1]))


def test_vectors_round_trip_and_catch_a_wrong_token(engine, tmp_path):
    prompts = []
    for i, text in enumerate(["Quel ramo del lago di Como", "def main():\n    return 0\n"]):
        p = tmp_path / f"p{i}.txt"
        p.write_text(text, encoding="utf-8")
        prompts.append(str(p))
    vec = tmp_path / "vectors" / "official.vec"
    vec.parent.mkdir()
    write_vectors(engine, prompts, str(vec), steps=3, top=5)
    cases = read_vectors(str(vec))
    assert [len(c.steps) for c in cases] == [3, 3] and all(len(s.top) == 5 for c in cases for s in c.steps)
    check = Check("logprob-vectors")
    check_logprob_vectors(check, engine, cases)
    assert check.failures == 0
    # Another selected token, and a logprob off by more than 4: both reported.
    text = vec.read_text().splitlines()
    i = next(k for k, line in enumerate(text) if line.startswith("step 1"))
    parts = text[i].split()
    parts[2] = "7a7a7a"
    text[i] = " ".join(parts)
    j = next(k for k, line in enumerate(text) if line.startswith("top"))
    token, lp = text[j].split()[1:]
    text[j] = f"top {token} {float(lp) - 5:.6f}"
    vec.write_text("\n".join(text) + "\n")
    check = Check("logprob-vectors")
    check_logprob_vectors(check, engine, read_vectors(str(vec)))
    assert check.failures == 2


@pytest.fixture(scope="module")
def drafter(engine):
    """Replays the plain greedy continuation of the oracle prompt, every 7th draft wrong."""
    prompt = render_prompt(engine.tokenizer, MTP_PROMPT, "", ThinkMode.NONE)
    stream = generate(Session(engine, 4096), prompt, 140, Sampler(temperature=0.0), engine.tokenizer.eos_id).generated

    def draft(session, first, n):
        base = session.pos - len(prompt)
        return [t if (base + 1 + i) % 7 else (t + 1) % 1000 for i, t in enumerate(stream[base + 1:base + 1 + n])]
    return draft


@pytest.mark.parametrize("depth", [4, 1])
def test_verify_depth_oracle_passes(engine, drafter, depth):
    check = Check("mtp-verify-depth")
    verify_depth(check, engine, SpecOptions(draft=depth, margin=0), drafter, max_tokens=140)
    assert check.failures == 0


def test_verify_depth_oracle_catches_a_bad_verifier(engine, drafter, monkeypatch):
    """A verifier that commits whatever was drafted: the replay oracle must fail."""
    real = Session.verify

    def accepts_everything(self, rows):
        v = real(self, rows)
        return dataclasses.replace(v, argmax=list(rows[1:]) + [v.argmax[-1]])

    monkeypatch.setattr(Session, "verify", accepts_everything)
    bad = Check("mtp-verify-depth")
    verify_depth(bad, engine, SpecOptions(draft=4, margin=0), drafter, max_tokens=140)
    assert bad.failures > 0


def ds4_test(*args, **env):
    return subprocess.run([sys.executable, "-c", "from ds4.oracle import main; main()", *args], capture_output=True,
                          text=True, timeout=300, env={**os.environ, **env})


def test_runner(tiny_paths, tmp_path):
    r = ds4_test("--list")
    assert r.returncode == 0 and "--mtp-verify-depth" in r.stdout
    assert ds4_test("--bogus").returncode == 2
    missing = tmp_path / "missing.gguf"
    r = ds4_test("--all", DS4_TEST_MODEL=str(missing))
    assert r.returncode == 1 and r.stderr == f"ds4-test: {missing}: cannot open model: No such file or directory\n"
    p = tmp_path / "p.txt"
    p.write_text("Ciao", encoding="utf-8")
    vec = tmp_path / "v.vec"
    r = ds4_test("--write-vectors", str(vec), str(p), DS4_TEST_MODEL=str(tiny_paths[0]))
    assert r.returncode == 0, r.stderr
    r = ds4_test("--logprob-vectors", DS4_TEST_MODEL=str(tiny_paths[0]), DS4_TEST_VECTOR_FILE=str(vec))
    assert r.returncode == 0 and "logprob-vectors: OK" in r.stderr and r.stdout == "ds4 tests: ok\n"


@pytest.mark.slow
def test_runner_depth_oracle_on_random_mtp(tiny_paths):
    """The random MTP head never gets a draft accepted: the depth oracle fails with a clear line.
    (Slow: 256 rejected cycles and their replay; the oracle itself is covered above.)"""
    r = ds4_test("--cont-argmax-gap", DS4_TEST_MODEL=str(tiny_paths[0]), DS4_TEST_MTP=str(tiny_paths[1]))
    assert r.returncode == 1 and "a multi-token commit happened" in r.stderr and "1 failure" in r.stderr


def test_a_test_that_checked_nothing_fails(monkeypatch, capsys):
    from ds4 import oracle

    monkeypatch.setitem(oracle.TESTS, "silent", lambda check, ctx: check.say("ran, asserted nothing"))
    monkeypatch.setitem(oracle.TESTS, "asserting", lambda check, ctx: check.require(True, "something"))
    assert oracle.run_tests(["silent", "asserting"], ctx=None) == 1
    err = capsys.readouterr().err
    assert "silent: did not run: it checked nothing\nsilent: ERR" in err and "asserting: OK" in err
