"""Misuse of every ds4 command, as a table: each case must end in one `ds4...` line on stderr (after
any progress lines, which start with `ds4` too), exit status 1 (runtime) or 2 (usage) and no
traceback. New flags add their bad values here.

Most cases call a command's `main(argv)` in this process (fast); signals, FIFOs, environment
variables read at import and redirections of stdout run a subprocess. Nothing here relies on
permissions (the tests may run as root): unwritable outputs are a missing folder, a path under a
regular file, or a full device (conftest.full_device).
"""

from __future__ import annotations

import math
import os
import signal
import struct
import subprocess
import sys
from pathlib import Path

import click
import pytest

from ds4 import bench, cli, frontend, oracle, synth, train
from ds4.errors import Ds4Error
from ds4.gguf import GGUFFile
from ds4.loader import EMBEDDED_MODEL, EMBEDDED_MTP, MTP_MARGIN_KEY

MAINS = {"ds4": cli.main, "ds4-bench": bench.main, "ds4-test": oracle.main, "ds4-synth": synth.main,
         "ds4-train": train.main}
NOT_UTF8 = "caf\udce9"  # what Python makes of the argument bytes b"caf\xe9"


def run_main(capsys, command: str, *argv: str) -> tuple[int, str, str]:
    try:
        MAINS[command](list(argv))
        code = 0
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def assert_clean_error(code: int, err: str, expected_code: int, fragment: str) -> None:
    """Exit status as expected, no traceback, every stderr line a `ds4...` line, the last one
    (the error) naming what went wrong."""
    lines = err.splitlines()
    assert code == expected_code, err
    assert "Traceback" not in err and lines, err
    assert all(line.startswith("ds4") for line in lines), err
    assert fragment in lines[-1], err
    if expected_code == 2:
        assert len(lines) == 1, err  # a usage error is refused before anything runs


def tensor_table_entry(data: bytes, name: str) -> int:
    """Offset of a tensor's dimension count in the table (dims, type and data offset follow)."""
    raw = name.encode()
    return data.index(struct.pack("<Q", len(raw)) + raw) + 8 + len(raw)


@pytest.fixture(scope="module")
def files(tiny_paths, tmp_path_factory, full_device):
    """Bad inputs of every kind, written once."""
    d = tmp_path_factory.mktemp("misuse")
    tiny, tiny_mtp = (str(p) for p in tiny_paths)
    pristine = Path(tiny).read_bytes()
    f = GGUFFile(tiny)
    tid2eid = f.tensors["blk.0.ffn_gate_tid2eid.weight"]
    align_at = f.fields["general.alignment"].offset
    window_at = f.fields["deepseek4.attention.sliding_window"].offset
    f.close()

    def variant(name: str, *edits: tuple[int, str, int | float]) -> str:
        buf = bytearray(pristine)
        for offset, fmt, value in edits:
            struct.pack_into(fmt, buf, offset, value)
        (d / name).write_bytes(buf)
        return str(d / name)

    files = {"tiny": tiny, "tiny_mtp": tiny_mtp, "dir": str(d), "embedded": str(EMBEDDED_MODEL), "full": full_device}
    # Token 0's first hash-routing entry (the prompt below starts with token 0).
    for label, value in (("huge", 10**9), ("5000", 5000), ("n_expert", 16), ("negative", -1)):
        files[f"route_{label}"] = variant(f"route_{label}.gguf", (tid2eid.offset, "<i", value))
    files["align2"] = variant("align2.gguf", (align_at, "<I", 2))
    files["window"] = variant("window.gguf", (window_at, "<I", 2**32 - 1))
    first = tensor_table_entry(pristine, "token_embd.weight")
    second = tensor_table_entry(pristine, "blk.0.hc_attn_fn.weight")
    rel = struct.unpack_from("<Q", pristine, second + 4 + 8 * 2 + 4)[0]  # 2 dims, then type, offset
    files["misaligned"] = variant("misaligned.gguf", (second + 4 + 16 + 4, "<Q", rel + 4))
    first_rel = struct.unpack_from("<Q", pristine, first + 4 + 16 + 4)[0]
    files["overlap"] = variant("overlap.gguf", (second + 4 + 16 + 4, "<Q", first_rel))
    # The embedded MTP head states its draft margin: NaN, inf and negative ones.
    mtp_data = EMBEDDED_MTP.read_bytes()
    with GGUFFile(EMBEDDED_MTP) as m:
        margin_at = m.fields[MTP_MARGIN_KEY].offset
    for label, value in (("nan", math.nan), ("inf", math.inf), ("negative", -1.0)):
        buf = bytearray(mtp_data)
        struct.pack_into("<f", buf, margin_at, value)
        (d / f"margin_{label}.gguf").write_bytes(buf)
        files[f"margin_{label}"] = str(d / f"margin_{label}.gguf")
    (d / "latin1.txt").write_bytes(b"Quel ramo del lago di Como, caf\xe9\n")
    files["latin1"] = str(d / "latin1.txt")
    (d / "bools.json").write_text("[true, false]")
    files["bools"] = str(d / "bools.json")
    (d / "notjson.txt").write_text("this is not JSON")
    files["notjson"] = str(d / "notjson.txt")
    (d / "array.json").write_text("[1, 2, 3]")
    files["array"] = str(d / "array.json")
    (d / "bad.csv").write_text(f"{bench.HEADER}\n128,128,oops,4,2.0,100\n")
    files["bad_csv"] = str(d / "bad.csv")
    (d / "short.csv").write_text(f"{bench.HEADER}\n128,128\n")
    files["short_csv"] = str(d / "short.csv")
    (d / "regular").write_text("a regular file, not a folder")
    files["under_file"] = str(d / "regular" / "out")
    files["missing_dir"] = str(d / "missing" / "out")
    (d / "empty.vec").write_text(oracle.VEC_HEADER)
    files["empty_vec"] = str(d / "empty.vec")
    (d / "prompt.txt").write_text("Ciao", encoding="utf-8")
    files["prompt"] = str(d / "prompt.txt")
    (d / "open.vec").write_text("case c0 64 1 prompt.txt\nstep 0 41 1\ntop 41 -0.5\n")
    files["open_vec"] = str(d / "open.vec")
    (d / "corpus.txt").write_text(synth.CORPUS * 5, encoding="utf-8")
    files["corpus"] = str(d / "corpus.txt")
    return files


# (command, argv, exit status, fragment of the error line); {name} is a path from `files`.
GENERATE = ["-p", "Quel ramo", "-n", "1", "--ctx", "64", "--nothink"]
BENCH = ["-m", "{tiny}", "--prompt-file", "{corpus}", "--ctx-start", "8", "--ctx-max", "8", "-n", "1"]
CASES = [
    # Model files whose values index memory.
    ("ds4", ["--inspect", "-m", "{route_huge}"], 1, "ffn_gate_tid2eid.weight: token 0 routes to expert 1000000000"),
    ("ds4", ["-m", "{route_5000}", *GENERATE], 1, "routes to expert 5000"),
    ("ds4", ["-m", "{route_n_expert}", *GENERATE], 1,
     "routes to expert 16 (1 ids out of range), expected expert ids in 0..15"),
    ("ds4", ["-m", "{route_negative}", *GENERATE], 1, "routes to expert -1"),
    ("ds4", ["--inspect", "-m", "{align2}"], 1, "bad general.alignment 2"),
    ("ds4", ["-m", "{window}", *GENERATE], 1, "sliding_window is 4294967295, expected at most 8192"),
    ("ds4", ["--inspect", "-m", "{misaligned}"], 1, "blk.0.hc_attn_fn.weight: data offset"),
    ("ds4", ["--inspect", "-m", "{overlap}"], 1,
     "token_embd.weight: data at byte 48320 overlaps tensor blk.0.hc_attn_fn.weight"),
    ("ds4", ["--inspect", "-m", "{embedded}", "--mtp", "{margin_nan}"], 1, "ds4.mtp.draft_margin is nan"),
    ("ds4", ["--inspect", "-m", "{embedded}", "--mtp", "{margin_inf}"], 1, "ds4.mtp.draft_margin is inf"),
    ("ds4", ["--inspect", "-m", "{embedded}", "--mtp", "{margin_negative}"], 1, "ds4.mtp.draft_margin is -1"),
    ("ds4", ["--inspect", "-m", "/dev/null"], 1, "not a regular file (a character device)"),
    ("ds4", ["--inspect", "-m", "{missing_dir}"], 1, "cannot open model: No such file or directory"),
    # Option values.
    ("ds4", ["-m", "{tiny}", "-p", "x", "--temp", "nan"], 2, "'nan' is not a finite number"),
    ("ds4", ["-m", "{tiny}", "-p", "x", "--temp", "inf"], 2, "'inf' is not a finite number"),
    ("ds4", ["-m", "{tiny}", "-p", "x", "--top-p", "nan"], 2, "--top-p"),
    ("ds4", ["-m", "{tiny}", "-p", "x", "--min-p", "nan"], 2, "--min-p"),
    ("ds4", ["-m", "{tiny}", "-p", "x", "--mtp-margin", "nan"], 2, "--mtp-margin"),
    ("ds4", ["-m", "{tiny}", "-p", "x", "--mtp-margin", "-inf"], 2, "--mtp-margin"),
    ("ds4", ["-m", "{tiny}", "-p", "x", "--seed", str(2**64)], 2, "--seed"),
    ("ds4", ["-m", "{tiny}", "-p", "x", "--seed", "-1"], 2, "--seed"),
    ("ds4", ["-m", "{tiny}", "-p", "x", "--ctx", "100000000"], 1,
     "--ctx: a context of 100000000 tokens exceeds the model's 1048576 (deepseek4.context_length)"),
    ("ds4-bench", [*BENCH, "--ctx-alloc", "100000000"], 1, "--ctx-alloc: a context of 100000000 tokens exceeds"),
    ("ds4", ["-m", "{tiny}", "-p", NOT_UTF8], 2, "not UTF-8 text (byte 0xe9 at offset 3)"),
    ("ds4", ["-m", "{tiny}", "-p", "x", "-sys", NOT_UTF8], 2, "'-sys' / '--system': not UTF-8 text"),
    ("ds4", ["-m", "{tiny}", "-p", "x", "--prompt-file", "{prompt}"], 2, "give only one of"),
    ("ds4", ["-m", "{tiny}", "--bogus"], 2, "No such option '--bogus'. (see ds4 --help)"),
    ("ds4-bench", ["-m", "{tiny}", "--prompt-file", "{prompt}", "--step-mul", "inf"], 2, "'inf' is not a finite number"),
    ("ds4-synth", ["tiny", "-o", "{dir}/x.gguf", "--seed", "-1"], 2, "--seed"),
    ("ds4-synth", ["tiny", "-o", "{dir}/x.gguf", "--seed", str(2**64)], 2, "--seed"),
    ("ds4-synth", ["tiny", "-o", "{dir}/x.gguf", "--experts", "3"], 1, "--experts 3: a token uses 6 experts"),
    ("ds4-synth", ["tiny", "-o", "{dir}/x.gguf", "--tokenizer", "{notjson}"], 1, "notjson.txt: not JSON"),
    ("ds4-synth", ["tiny", "-o", "{dir}/x.gguf", "--tokenizer", "{array}"], 1, "not an HF tokenizer.json"),
    ("ds4-synth", ["tiny", "-o", "{dir}/x.gguf", "--tokenizer", "{latin1}"], 1, "tokenizer.json is not UTF-8 text"),
    ("ds4-synth", ["tiny", "-o", "{dir}/x.gguf", "--tokenizer", "{missing_dir}"], 1, "cannot read tokenizer.json"),
    ("ds4-synth", ["bogus", "-o", "{dir}/x.gguf"], 1, "unknown preset 'bogus'"),
    ("ds4-train", ["--corpus", "{corpus}", "--lr", "nan"], 2, "--lr"),
    ("ds4-train", ["--corpus", "{corpus}", "--seed", str(2**64)], 2, "--seed"),
    ("ds4-train", ["--corpus", "{corpus}", "--steps", "0"], 2, "--steps 0 needs --resume"),
    ("ds4-train", ["--corpus", "{corpus}", "--focus", NOT_UTF8], 2, "not UTF-8 text"),
    # Input files that are not UTF-8 or not what they claim.
    ("ds4", ["-m", "{tiny}", "--prompt-file", "{latin1}"], 1, "latin1.txt: prompt file is not UTF-8 text (byte 0xe9"),
    ("ds4", ["-m", "{tiny}", "--prompt-tokens", "{bools}"], 1, "must be a non-empty JSON list of ids"),
    ("ds4", ["-m", "{tiny}", "--prompt-tokens", "{notjson}"], 1, "prompt tokens are not JSON"),
    ("ds4", ["-m", "{tiny}", "--prompt-tokens", "{latin1}"], 1, "prompt tokens is not UTF-8 text"),
    ("ds4-bench", ["-m", "{tiny}", "--prompt-file", "{latin1}", "--ctx-max", "8", "--ctx-start", "8"], 1,
     "latin1.txt: prompt file is not UTF-8 text"),
    ("ds4-bench", ["plot", "{latin1}"], 1, "ds4-bench CSV is not UTF-8 text"),
    ("ds4-bench", ["plot", "{bad_csv}"], 1, "bad.csv:2: malformed row"),
    ("ds4-bench", ["plot", "{short_csv}"], 1, "short.csv:2: malformed row"),
    ("ds4-train", ["--corpus", "{latin1}"], 1, "corpus is not UTF-8 text"),
    # Outputs that cannot be written: nothing is left behind, the path is named.
    ("ds4", ["-m", "{tiny}", *GENERATE, "--dump-logprobs", "{missing_dir}"], 1, "missing/out: cannot write: No such file"),
    ("ds4", ["-m", "{tiny}", *GENERATE, "--dump-logprobs", "{under_file}"], 1, "regular/out: cannot write: Not a directory"),
    ("ds4", ["-m", "{tiny}", *GENERATE, "--temp", "0", "--mtp", "{tiny_mtp}", "--mtp-log", "{missing_dir}"], 1,
     "missing/out: cannot write: No such file"),
    ("ds4-bench", [*BENCH, "--csv", "{under_file}"], 1, "regular/out: cannot write: Not a directory"),
    ("ds4-synth", ["tiny", "-o", "{missing_dir}"], 1, "missing/out: cannot write: No such file"),
    ("ds4-train", ["--corpus", "{corpus}", "--steps", "1", "--out", "{under_file}/ckpt.safetensors"], 1,
     "cannot create the output folder"),
]
# A full device as output ({full}: see conftest.full_device).
CASES += [
    ("ds4", ["-m", "{tiny}", *GENERATE, "--dump-logprobs", "{full}"], 1, "full: cannot write: No space left"),
    ("ds4", ["-m", "{tiny}", *GENERATE, "-n", "4", "--temp", "0", "--mtp", "{tiny_mtp}", "--mtp-margin", "0",
             "--no-mtp-adaptive", "--mtp-log", "{full}"], 1, "full: cannot write: No space left"),
    ("ds4-bench", [*BENCH, "--csv", "{full}"], 1, "full: cannot write: No space left"),
    ("ds4-synth", ["tiny", "-o", "{full}"], 1, "full: cannot write: No space left"),
]


@pytest.mark.parametrize("command, argv, code, fragment", CASES, ids=[f"{c[0]} {' '.join(c[1])}" for c in CASES])
def test_misuse_is_one_line(capsys, files, command, argv, code, fragment):
    if "{full}" in argv and files["full"] is None:
        pytest.skip("no full device here")
    code_, out, err = run_main(capsys, command, *[a.format(**files) for a in argv])
    assert_clean_error(code_, err, code, fragment)


def test_plot_output_in_a_missing_folder(capsys, files, tmp_path):
    csv = tmp_path / "ok.csv"
    csv.write_text(f"{bench.HEADER}\n2,2,10.0,1,5.0,100\n")
    code, _, err = run_main(capsys, "ds4-bench", "plot", str(csv), "-o", files["missing_dir"])
    assert_clean_error(code, err, 1, "missing/out.svg: cannot write: No such file")


# -- ds4-test: a run that checked nothing fails -----------------------------------------------

@pytest.mark.parametrize("env, args, reason", [
    ({"DS4_TEST_VECTOR_FILE": "{missing_dir}"}, ["--logprob-vectors"], "cannot read vector file: No such file"),
    ({"DS4_TEST_VECTOR_FILE": "{empty_vec}"}, ["--logprob-vectors"], "empty.vec: no test cases"),
    ({"DS4_TEST_VECTOR_FILE": "{open_vec}"}, ["--logprob-vectors"], "case c0 has no end"),
    ({"DS4_TEST_VECTOR_FILE": "{latin1}"}, ["--logprob-vectors"], "vector file is not UTF-8 text"),
    ({}, ["--logprob-vectors"], "no vector file (set DS4_TEST_VECTOR_FILE)"),
    ({}, ["--mtp-verify-depth"], "no MTP support model (set DS4_TEST_MTP=FILE)"),
])
def test_ds4_test_fails_when_a_check_did_not_run(capsys, monkeypatch, files, env, args, reason):
    monkeypatch.setenv("DS4_TEST_MODEL", files["tiny"])
    monkeypatch.delenv("DS4_TEST_VECTOR_FILE", raising=False)
    monkeypatch.delenv("DS4_TEST_MTP", raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value.format(**files))
    code, out, err = run_main(capsys, "ds4-test", *args)
    name = args[0][2:]
    assert code == 1 and out == "" and "Traceback" not in err, err
    assert f"{name}: did not run: " in err and reason in err and f"{name}: ERR" in err, err
    assert err.splitlines()[-1] == "ds4 tests: 1 failure(s)"


def test_ds4_test_write_vectors_into_a_missing_folder(capsys, monkeypatch, files):
    monkeypatch.setenv("DS4_TEST_MODEL", files["tiny"])
    code, _, err = run_main(capsys, "ds4-test", "--write-vectors", files["missing_dir"], files["prompt"])
    assert_clean_error(code, err, 1, "missing/out: cannot write: No such file or directory")


@pytest.mark.parametrize("model, fragment", [
    ("{latin1}", "not a GGUF file"),
    ("{prompt}", "file is too small to be GGUF"),
    ("{corpus}", "not a GGUF file"),
    ("{missing_dir}", "cannot open model: No such file or directory"),
    ("{route_huge}", "routes to expert 1000000000"),
])
def test_ds4_test_cannot_open_the_model(capsys, monkeypatch, files, model, fragment):
    monkeypatch.setenv("DS4_TEST_MODEL", model.format(**files))
    code, out, err = run_main(capsys, "ds4-test", "--logprob-vectors")
    assert_clean_error(code, err, 1, fragment)
    assert len(err.splitlines()) == 1 and out == ""


# -- cases needing the chat, the library, signals or a real process -----------------------------

def test_chat_reports_a_failed_read_and_goes_on(capsys, monkeypatch, files):
    import io

    lines = [f"/read {files['latin1']}", f"/read {files['missing_dir']}", "caf\xe9 \udce9", "ciao", "/quit"]
    raw = "\n".join(lines).encode("utf-8", "surrogateescape") + b"\n"
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(raw), encoding="utf-8"))
    code, out, err = run_main(capsys, "ds4", "-m", files["tiny"], "-n", "2", "--temp", "0", "--ctx", "256")
    assert code == 0 and "Traceback" not in err, err
    assert (f"ds4: {files['latin1']}: /read file is not UTF-8 text (byte 0xe9 at offset 31); "
            "the conversation goes on") in err
    assert "cannot read /read file: No such file or directory" in err
    assert "ds4: that line is not UTF-8 text (byte 0xe9 at offset 6); not sent" in err
    assert err.count("ds4: prefill:") == 1  # "ciao" still got its reply


def test_synth_interrupted_during_the_mtp_file_says_what_was_written(capsys, monkeypatch, tmp_path):
    real = synth.write_parts
    calls = []

    def interrupted_second_file(path, *args, **kwargs):
        calls.append(path)
        if len(calls) == 2:
            raise KeyboardInterrupt
        real(path, *args, **kwargs)

    monkeypatch.setattr(synth, "write_parts", interrupted_second_file)
    base, mtp = tmp_path / "t.gguf", tmp_path / "t-mtp.gguf"
    code, _, err = run_main(capsys, "ds4-synth", "tiny", "-o", str(base), "--mtp-out", str(mtp))
    assert code == 130 and err == f"ds4-synth: interrupted; wrote {base}, not {mtp}\n"
    assert base.exists() and not mtp.exists()
    calls.clear()
    monkeypatch.setattr(synth, "write_parts", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt()))
    code, _, err = run_main(capsys, "ds4-synth", "tiny", "-o", str(tmp_path / "u.gguf"))
    assert code == 130 and err == "ds4-synth: interrupted; no file written\n"


def test_saved_session_cut_after_the_header_is_truncated(tiny_paths, tmp_path):
    from ds4.session import Engine, Session, SessionError

    engine = Engine(str(tiny_paths[0]))
    s = Session(engine, 64)
    s.sync([0, 5, 6])
    path = tmp_path / "s.ds4"
    s.save(str(path))
    header = 8 + 4 + 32
    path.write_bytes(path.read_bytes()[:header + 10])
    with pytest.raises(SessionError, match=r"saved session is truncated \(54 bytes\)"):
        s.load(str(path))
    path.write_bytes(b"DS4S")
    with pytest.raises(SessionError, match="truncated"):
        s.load(str(path))
    path.write_bytes(b"GGUF" + bytes(100))
    with pytest.raises(SessionError, match="not a ds4 saved session"):
        s.load(str(path))


def ds4_process(*args, env=None, **kwargs):
    return subprocess.Popen([sys.executable, "-c", "from ds4.cli import main; main()", *args],
                            env={**os.environ, **(env or {})}, stderr=subprocess.PIPE, text=True, **kwargs)


def test_inspect_of_a_fifo_fails_at_once(tmp_path):
    fifo = tmp_path / "model.fifo"
    os.mkfifo(fifo)
    p = ds4_process("--inspect", "-m", str(fifo), stdout=subprocess.PIPE)
    _, err = p.communicate(timeout=120)  # the bug was a hang in open()
    assert_clean_error(p.returncode, err, 1, "not a regular file (a FIFO)")


def test_a_closed_stdout_stops_quietly(tiny_paths):
    """`ds4 -p ... | head -c0`: the first token's write finds the pipe closed; no message, and
    141 (128 + SIGPIPE) as a C program killed by SIGPIPE would report."""
    p = ds4_process("-m", str(tiny_paths[0]), "-p", "Quel ramo", "-n", "50", "--ctx", "256", "--nothink",
                    stdout=subprocess.PIPE)
    p.stdout.close()
    err = p.stderr.read()
    assert p.wait(timeout=120) == 141, err
    assert "Traceback" not in err and "Broken pipe" not in err and "Exception ignored" not in err, err


def test_stdout_on_a_full_device(tiny_paths, full_device):
    if full_device is None:
        pytest.skip("no full device here")
    with open(full_device, "w") as full:
        p = ds4_process("--inspect", "-m", str(tiny_paths[0]), stdout=full)
        _, err = p.communicate(timeout=120)
    assert_clean_error(p.returncode, err, 1, "ds4: stdout: cannot write: No space left on device")


def test_ctrl_c_during_generation(tiny_paths):
    p = ds4_process("-m", str(tiny_paths[0]), "-p", "Quel ramo", "-n", "5000", "--ctx", "6000", "--nothink",
                    "--temp", "1", "--min-p", "0", stdout=subprocess.PIPE)
    p.stdout.read(1)  # generating
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=120)
    assert_clean_error(p.returncode, err, 130, "ds4: interrupted")


def test_unloadable_blas_is_a_warning(tiny_paths):
    p = ds4_process("--inspect", "-m", str(tiny_paths[0]), stdout=subprocess.PIPE,
                    env={"DS4_BLAS": "/nonexistent/libblas.so"})
    out, err = p.communicate(timeout=120)
    assert p.returncode == 0 and "layers:" in out
    assert err.startswith("ds4: warning: DS4_BLAS=/nonexistent/libblas.so: cannot load it (") and \
        err.rstrip().endswith("using MLX's bundled BLAS"), err


def test_non_utf8_argument_bytes_from_a_real_command_line(tiny_paths):
    p = subprocess.run([sys.executable.encode(), b"-c", b"from ds4.cli import main; main()", b"-m",
                        str(tiny_paths[0]).encode(), b"-p", b"caf\xe9"], capture_output=True, timeout=120)
    assert p.returncode == 2
    assert p.stderr.decode().startswith("ds4: Invalid value for '-p' / '--prompt': not UTF-8 text")
    assert len(p.stderr.splitlines()) == 1


def test_help_names_the_output_file_rule(capsys):
    code, out, _ = run_main(capsys, "ds4", "--help")
    assert code == 0 and "a symlink's target is replaced, a device or FIFO written in place" in " ".join(out.split())


# -- the boundary itself -------------------------------------------------------------------------

def _raise(e: BaseException):
    def body():
        raise e
    return body


@pytest.mark.parametrize("error, code, line", [
    (Ds4Error("a token `\nsi` out of vocabulary"), 1, "ds4: a token `\\nsi` out of vocabulary"),
    (FileNotFoundError(2, "No such file or directory", "in.txt"), 1, "ds4: in.txt: No such file or directory"),
    (OSError(18, "Invalid cross-device link", "a.partial", None, "b"), 1,
     "ds4: a.partial -> b: Invalid cross-device link"),
    (OSError(28, "No space left on device"), 1, "ds4: stdout: cannot write: No space left on device"),
    (UnicodeDecodeError("utf-8", b"ok\xff", 2, 3, "invalid start byte"), 1,
     "ds4: input is not UTF-8 text (byte 0xff at offset 2)"),
    (MemoryError(), 1, "ds4: out of memory"),
    (KeyboardInterrupt(), 130, "ds4: interrupted"),
    (click.UsageError("give only one of -p and --prompt-file"), 2,
     "ds4: give only one of -p and --prompt-file (see ds4 --help)"),
])
def test_the_boundary_turns_errors_into_one_line(capsys, error, code, line):
    with pytest.raises(SystemExit) as e:
        frontend.run("ds4", _raise(error))
    assert e.value.code == code and capsys.readouterr().err == line + "\n"


def test_the_boundary_keeps_the_traceback_of_a_bug():
    with pytest.raises(ZeroDivisionError):
        frontend.run("ds4", lambda: 1 / 0)
