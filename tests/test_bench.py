"""ds4-bench: frontier walk, the exact CSV format, kvcache_bytes, MTP columns, plots, errors."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from ds4.bench import frontiers
from ds4.config import ModelConfig

ROW = re.compile(r"^\d+,\d+,\d+\.\d{2},\d+,\d+\.\d{2},\d+$")


def bench(*args):
    return subprocess.run([sys.executable, "-c", "from ds4.bench import main; main()", *args],
                          capture_output=True, text=True, timeout=300)


def test_frontiers():
    assert frontiers(2048, 8192, 2048, 1.0) == [2048, 4096, 6144, 8192]
    assert frontiers(100, 250, 100, 1.0) == [100, 200, 250]
    assert frontiers(10, 40, 1, 1.5) == [10, 15, 23, 35, 40]
    assert frontiers(1, 3, 1, 1.1) == [1, 2, 3]  # at least +1
    assert frontiers(64, 64, 64, 1.0) == [64]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "text.txt"
    path.write_text(open("tests/data/italian_sample.txt", encoding="utf-8").read() * 3, encoding="utf-8")
    return str(path)


def test_sweep_csv_and_plot(tiny_paths, corpus, tmp_path):
    out = tmp_path / "sweep.csv"
    r = bench("-m", str(tiny_paths[0]), "--prompt-file", corpus, "--ctx-start", "48", "--ctx-max", "144",
              "--step-incr", "48", "--gen-tokens", "4", "--csv", str(out))
    assert r.returncode == 0, r.stderr
    lines = out.read_text().splitlines()
    assert lines[0] == "ctx_tokens,prefill_tokens,prefill_tps,gen_tokens,gen_tps,kvcache_bytes"
    assert all(ROW.match(line) for line in lines[1:]) and len(lines) == 4
    rows = [line.split(",") for line in lines[1:]]
    assert [int(r[0]) for r in rows] == [48, 96, 144] and [int(r[1]) for r in rows] == [48, 48, 48]
    from ds4.loader import open_model

    c = open_model(str(tiny_paths[0])).config
    assert [int(r[5]) for r in rows] == [c.kv_payload_bytes(n) for n in (48, 96, 144)]
    p = bench("plot", str(out), "-o", str(tmp_path / "fig"), "--title", "tiny")
    assert p.returncode == 0, p.stderr
    assert (tmp_path / "fig.svg").stat().st_size > 0 and (tmp_path / "fig.png").stat().st_size > 0


def test_sweep_with_mtp_columns(tiny_paths, corpus):
    r = bench("-m", str(tiny_paths[0]), "--mtp", str(tiny_paths[1]), "--mtp-margin", "0", "--chat-prompt-file",
              corpus, "--ctx-start", "60", "--ctx-max", "90", "--step-mul", "1.5", "--gen-tokens", "4")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].endswith(",mtp_accept_k0,mtp_tokens_per_cycle,mtp_trunk_passes_per_token")
    assert [line.split(",")[0] for line in lines[1:]] == ["60", "90"]
    assert all(len(line.split(",")) == 9 for line in lines[1:])


@pytest.mark.parametrize("args, message", [
    (["--ctx-max", "100000"], "expected at least --ctx-max 100000"),
    (["--ctx-start", "500", "--ctx-max", "100"], "is above --ctx-max"),
    (["--ctx-start", "50", "--ctx-max", "100", "--ctx-alloc", "50"], "must exceed ctx-max + gen-tokens"),
])
def test_sweep_errors(tiny_paths, corpus, args, message):
    r = bench("-m", str(tiny_paths[0]), "--prompt-file", corpus, *args)
    assert r.returncode in (1, 2) and message in r.stderr and "Traceback" not in r.stderr


def test_plot_rejects_other_csv(tmp_path):
    bad = tmp_path / "x.csv"
    bad.write_text("a,b\n1,2\n")
    r = bench("plot", str(bad))
    assert r.returncode == 1 and "not a ds4-bench CSV" in r.stderr


def test_payload_formula_reference_row():
    """speed-bench/m4_max.csv row 1 of the reference engine: 2048 tokens -> 52184460 bytes."""
    assert ModelConfig().kv_payload_bytes(2048) == 52184460
