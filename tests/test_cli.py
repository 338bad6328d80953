"""`ds4` end to end on the tiny synthetic model: one-shot greedy and sampled generation, logprob
dumps, token dumps, the interactive chat, and errors as one line with the right exit code."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from ds4 import kernels
from ds4.chat import render_prompt, ThinkMode
from ds4.session import Engine, Session


def ds4(*args, stdin=None):
    return subprocess.run([sys.executable, "-c", "from ds4.cli import main; main()", *args], input=stdin,
                          capture_output=True, text=True, timeout=300)


def test_greedy_is_deterministic_and_matches_the_session(tiny_paths, tmp_path):
    model = str(tiny_paths[0])
    a = ds4("-m", model, "-p", "Quel ramo del lago", "-n", "12", "--temp", "0", "--nothink", "--ctx", "256")
    b = ds4("-m", model, "-p", "Quel ramo del lago", "-n", "12", "--temp", "0", "--nothink", "--ctx", "256")
    assert a.returncode == 0, a.stderr
    assert a.stdout == b.stdout and a.stdout.endswith("\n")
    assert "ds4: context buffers" in a.stderr and "ds4: prefill:" in a.stderr.splitlines()[-1]
    # The same greedy continuation, token by token through the library.
    engine = Engine(model)
    ids = render_prompt(engine.tokenizer, "Quel ramo del lago", think=ThinkMode.NONE)
    s = Session(engine, 256)
    s.sync(ids)
    out = []
    for _ in range(12):
        t = s.argmax()
        if t == engine.tokenizer.eos_id:
            break
        out.append(t)
        s.eval(t)
    text = engine.tokenizer.decode(out)
    assert a.stdout == text + ("" if text.endswith("\n") else "\n")


def test_sampling_is_reproducible_with_a_seed(tiny_paths):
    args = ("-m", str(tiny_paths[0]), "-p", "Ciao", "-n", "10", "--seed", "42", "--ctx", "256", "--nothink")
    a, b = ds4(*args), ds4(*args)
    assert a.returncode == 0 and a.stdout == b.stdout
    c = ds4(*args[:-3], "--seed", "43", "--ctx", "256", "--nothink")
    assert c.returncode == 0


def test_dump_logprobs_and_prompt_tokens(tiny_paths, tmp_path):
    ids = [0, 40, 41, 42, 43]
    pt = tmp_path / "p.json"
    pt.write_text(json.dumps(ids))
    out = tmp_path / "d.json"
    r = ds4("-m", str(tiny_paths[0]), "--prompt-tokens", str(pt), "-n", "3", "--dump-logprobs", str(out),
            "--logprobs-top-k", "5", "--ctx", "256")
    assert r.returncode == 0, r.stderr
    doc = json.loads(out.read_text())
    assert doc["prompt_tokens"] == 5 and doc["top_k"] == 5 and doc["ctx"] == 256
    steps = doc["steps"]
    assert 1 <= len(steps) <= 3
    engine = Engine(str(tiny_paths[0]))
    s = Session(engine, 256)
    s.sync(ids)
    first = steps[0]
    assert first["selected"]["id"] == s.argmax() == first["top_logprobs"][0]["token"]["id"]
    lps = [e["logprob"] for e in first["top_logprobs"]]
    assert lps == sorted(lps, reverse=True) and len(lps) == 5
    ref = s.top_logprobs(5)
    assert [e["token"]["id"] for e in first["top_logprobs"]] == [i for i, _, _ in ref]
    assert np.allclose([e["logit"] for e in first["top_logprobs"]], [lg for _, lg, _ in ref])
    tok = engine.tokenizer
    assert bytes(first["selected"]["bytes"]) == tok.token_bytes(first["selected"]["id"])


def test_dump_tokens_needs_no_weights(tiny_paths):
    r = ds4("-m", str(tiny_paths[0]), "--dump-tokens", "-p", "<｜begin▁of▁sentence｜>Hi<｜User｜>x")
    assert r.returncode == 0
    lines = r.stdout.splitlines()
    ids = json.loads(lines[0])
    assert ids[0] == 0 and len(lines) == 1 + len(ids)
    assert lines[1].split() == ["0", "<｜begin▁of▁sentence｜>"]


def test_interactive_chat_keeps_transcript_and_session_together(tiny_paths):
    r = ds4("-m", str(tiny_paths[0]), "-n", "4", "--temp", "0", "--ctx", "512",
            stdin="ciao\n/nothink\n/bogus\ncome stai?\n/quit\n")
    assert r.returncode == 0, r.stderr
    assert r.stderr.count("ds4: prefill:") == 2
    assert "unknown command /bogus" in r.stderr


@pytest.mark.parametrize("args, code, message", [
    (["-p", "x", "--prompt-file", "/dev/null"], 2, "give only one of"),
    (["-p", "x", "--ctx", "16", "-sys", "lorem ipsum " * 20], 1, "exceeds the context of 16 tokens"),
    (["-p", "x", "--temp", "-1"], 2, "Invalid value for '--temp'"),
    (["-p", "x", "--backend", "UNAVAILABLE"], 1, "backend unavailable in this MLX build"),
])
def test_bad_arguments(tiny_paths, args, code, message):
    if "UNAVAILABLE" in args:
        import mlx.core as mx

        missing = [b for b, ok in (("metal", mx.metal.is_available()), ("cuda", mx.cuda.is_available())) if not ok]
        if not missing:
            pytest.skip("both GPU backends are available here")
        args = [missing[0] if a == "UNAVAILABLE" else a for a in args]
    r = ds4("-m", str(tiny_paths[0]), *args)
    assert r.returncode == code
    assert message in r.stderr and "Traceback" not in r.stderr


def test_bad_prompt_tokens_file(tiny_paths, tmp_path):
    p = tmp_path / "t.json"
    p.write_text("[1, 2, 99999]")
    r = ds4("-m", str(tiny_paths[0]), "--prompt-tokens", str(p))
    assert r.returncode == 1 and r.stderr.startswith(f"ds4: {p}: prompt tokens must be")


def test_quality_runs_the_reference_kernels(tiny_paths, tmp_path):
    """--quality is strict everything: every op's reference, as DS4_KERNELS=reference gives."""
    with kernels.reference_kernels():
        assert kernels.reference_only() and kernels.lookup("rms_norm") is kernels.reference("rms_norm")
    assert kernels.lookup("rms_norm") is not kernels.reference("rms_norm")  # a fast entry exists ("any")
    args = ["-m", str(tiny_paths[0]), "-p", "Quel ramo", "-n", "4", "--temp", "0", "--nothink", "--ctx", "256"]
    env = {k: v for k, v in os.environ.items() if k != "DS4_KERNELS"}
    runs = {}
    for name, extra, kernel_env in (("quality", ["--quality"], {}), ("env", [], {"DS4_KERNELS": "reference"})):
        path = tmp_path / f"{name}.json"
        r = subprocess.run([sys.executable, "-c", "from ds4.cli import main; main()", *args, *extra,
                            "--dump-logprobs", str(path)], capture_output=True, text=True, timeout=300,
                           env={**env, **kernel_env})
        assert r.returncode == 0, r.stderr
        runs[name] = json.loads(path.read_text())
    assert runs["quality"]["steps"] == runs["env"]["steps"]
