"""`ds4-test` (also `ds4_test`): oracle checks of a model through the engine.

Tests (run in this order by --all, each printing `<name>:`, its lines and `<name>: OK|ERR|SKIP`
on stderr; the run ends with `ds4 tests: ok` on stdout and exit 0, or `ds4 tests: N failure(s)`
on stderr and exit 1; a missing model or MTP file is a skip, not a failure):

  --logprob-vectors   official.vec cases (DS4_TEST_VECTOR_FILE): per step the local argmax's bytes
                      equal the selected bytes, every listed top token is in the local top-20
                      within 4.0 of its logprob. `--write-vectors FILE PROMPT...` writes such a
                      file from this engine.
  --mtp-verify-depth  greedy speculative capture (depth 4, > 128 tokens, a multi-token commit),
                      replayed through plain decode: worst argmax gap <= 2.0.
  --cont-argmax-gap   the same oracle in continuous depth-1 mode.
  --verify-divergence the fast (batched) verifier's divergence rate and gap histogram, no gate.

Models: DS4_TEST_MODEL (default ./ds4flash.gguf, else the embedded demo model, whose MTP head and
logprob vectors are then the defaults of DS4_TEST_MTP and DS4_TEST_VECTOR_FILE) and DS4_TEST_MTP.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from typing import Callable

import click

from ds4.errors import Ds4Error

VEC_HEADER = """# ds4-official-logprob-vectors-v1
# case <id> <ctx> <steps> <prompt-file>
# step <index> <selected-token-hex> <top-count>
# top <token-hex> <official-logprob>
"""
MTP_PROMPT = ("Reproduce exactly this C code inside one code block, with nothing else:\n\n"
              "static uint32_t clamp_u32(uint32_t v, uint32_t lo, uint32_t hi) {\n"
              "    return v < lo ? lo : (v > hi ? hi : v);\n}\n\n"
              "static size_t ring_advance(size_t pos, size_t step, size_t cap) {\n"
              "    return (pos + step) % cap;\n}\n\n"
              "static void scratch_init(uint8_t *buf, size_t n) {\n"
              "    for (size_t i = 0; i < n; i++) buf[i] = (uint8_t)(i * 31u);\n}\n")


class Check:
    """Collects failures of one test; tests keep running after a failed assertion."""

    def __init__(self, name: str):
        self.name, self.failures = name, 0

    def say(self, line: str) -> None:
        click.echo(f"{self.name}: {line}", err=True)

    def require(self, ok: bool, what: str) -> None:
        if not ok:
            self.failures += 1
            self.say(f"assertion failed: {what}")


class Skip(Exception):
    pass


# -- official.vec ------------------------------------------------------------------------------

@dataclass
class VecStep:
    selected: bytes
    top: list[tuple[bytes, float]] = field(default_factory=list)


@dataclass
class VecCase:
    id: str
    ctx: int
    prompt_file: str
    steps: list[VecStep] = field(default_factory=list)


def read_vectors(path: str) -> list[VecCase]:
    """Parse an official.vec file; prompt files are relative to the file's folder."""
    cases, case, step = [], None, None
    base = os.path.dirname(os.path.abspath(path))
    try:
        lines = open(path, encoding="utf-8").read().splitlines()
    except OSError as e:
        raise Ds4Error(f"{path}: cannot read vectors: {e.strerror}") from None
    for n, line in enumerate(lines, 1):
        parts = line.split()
        if not parts or parts[0].startswith("#"):
            continue
        try:
            if parts[0] == "case":
                case = VecCase(parts[1], int(parts[2]), os.path.join(base, parts[4]))
            elif parts[0] == "step":
                step = VecStep(bytes.fromhex(parts[2]))
                case.steps.append(step)
            elif parts[0] == "top":
                step.top.append((bytes.fromhex(parts[1]), float(parts[2])))
            elif parts[0] == "end":
                cases.append(case)
                case = step = None
            else:
                raise ValueError(parts[0])
        except (IndexError, ValueError, AttributeError):
            raise Ds4Error(f"{path}:{n}: malformed line {line!r}, expected case/step/top/end") from None
    return cases


def write_vectors(engine, prompt_files: list[str], path: str, steps: int = 4, top: int = 20, ctx: int = 4096) -> None:
    """Write an official.vec-format file from this engine's greedy top logprobs."""
    from ds4.chat import ThinkMode, render_prompt
    from ds4.session import Session

    tok = engine.tokenizer
    out = [VEC_HEADER]
    for i, prompt_file in enumerate(prompt_files):
        text = open(prompt_file, encoding="utf-8").read()
        s = Session(engine, ctx)
        s.sync(render_prompt(tok, text, "", ThinkMode.NONE))
        rel = os.path.relpath(os.path.abspath(prompt_file), os.path.dirname(os.path.abspath(path)))
        out.append(f"case case{i} {ctx} {steps} {rel}\n")
        for k in range(steps):
            chosen = s.argmax()
            entries = s.top_logprobs(top)
            out.append(f"step {k} {tok.token_bytes(chosen).hex()} {len(entries)}\n")
            out += [f"top {tok.token_bytes(t).hex()} {lp:.6f}\n" for t, _, lp in entries]
            if k + 1 < steps:
                s.eval(chosen)
        out.append("end\n")
    with open(path, "w", encoding="utf-8") as f:
        f.write("".join(out))


def check_logprob_vectors(check: Check, engine, cases: list[VecCase]) -> None:
    from ds4.chat import ThinkMode, render_prompt
    from ds4.session import Session

    tok = engine.tokenizer
    for case in cases:
        text = open(case.prompt_file, encoding="utf-8").read()
        s = Session(engine, case.ctx)
        s.sync(render_prompt(tok, text, "", ThinkMode.NONE))
        for k, step in enumerate(case.steps):
            chosen = s.argmax()
            local = {tok.token_bytes(t): lp for t, _, lp in s.top_logprobs(20)}
            check.require(tok.token_bytes(chosen) == step.selected,
                          f"{case.id} step {k}: argmax {tok.token_bytes(chosen).hex()} != selected {step.selected.hex()}")
            for raw, lp in step.top:
                check.require(raw in local and abs(local[raw] - lp) <= 4.0,
                              f"{case.id} step {k}: top token {raw.hex()} (logprob {lp:.3f}) not in the local top-20 "
                              f"within 4.0" + (f" (local {local[raw]:.3f})" if raw in local else ""))
            if k + 1 < len(case.steps):
                s.eval(chosen)
        check.say(f"case {case.id}: {len(case.steps)} steps checked")


# -- speculative oracles -------------------------------------------------------------------------

def capture_speculative(engine, prompt: list[int], opts, max_tokens: int = 256, drafter=None):
    """Greedy speculative run; returns (committed tokens, largest commit of one cycle, stats)."""
    from ds4.session import Session
    from ds4.speculative import SpecStats, speculative_step

    s = Session(engine, 32768)
    s.sync(prompt)
    stats, out, max_chunk = SpecStats(), [], 0
    eos = engine.tokenizer.eos_id
    while len(out) < max_tokens:
        committed = speculative_step(s, opts, max_tokens - len(out), eos, stats, drafter)
        if committed == [eos]:
            break
        max_chunk = max(max_chunk, len(committed))
        out += committed
    return out, max_chunk, stats


def verify_depth(check: Check, engine, opts, drafter=None, min_tokens: int = 128, max_tokens: int = 256) -> None:
    from ds4.chat import ThinkMode, render_prompt
    from ds4.session import Session
    from ds4.speculative import replay_gaps

    prompt = render_prompt(engine.tokenizer, MTP_PROMPT, "", ThinkMode.NONE)
    out, max_chunk, stats = capture_speculative(engine, prompt, opts, max_tokens, drafter)
    gaps = replay_gaps(Session(engine, 32768), prompt, out)
    worst = max(gaps) if gaps else 0.0
    at = gaps.index(worst) if gaps else -1
    check.say(f"nspec={len(out)} max_chunk={max_chunk} worst_argmax_gap={worst:.3f} at={at}")
    check.require(max_chunk > 1, f"a multi-token commit happened (max_chunk {max_chunk}; drafts accepted "
                  f"{sum(stats.accepted.values())}/{sum(stats.proposed.values())})")
    check.require(len(out) > min_tokens, f"nspec {len(out)} > {min_tokens}")
    check.require(worst <= 2.0, f"worst argmax gap {worst:.3f} <= 2.0 (token {at})")


def verify_divergence(check: Check, engine, drafter=None) -> None:
    from ds4.chat import ThinkMode, render_prompt
    from ds4.session import Session
    from ds4.speculative import SpecOptions, replay_gaps

    prompt = render_prompt(engine.tokenizer, MTP_PROMPT, "", ThinkMode.NONE)
    out, _, _ = capture_speculative(engine, prompt, SpecOptions(draft=4, margin=0, exact=False), drafter=drafter)
    gaps = replay_gaps(Session(engine, 32768), prompt, out)
    diverged = [g for g in gaps if g > 0]
    bins = [(0.0, 0.01), (0.01, 0.1), (0.1, 0.5), (0.5, 2.0), (2.0, float("inf"))]
    hist = " ".join(f"({lo},{hi}]={sum(lo < g <= hi for g in diverged)}" for lo, hi in bins)
    check.say(f"tokens={len(out)} divergence_rate={len(diverged) / max(1, len(out)):.4f} gaps {hist}")


# -- runner --------------------------------------------------------------------------------------

@dataclass
class Context:
    model: str
    mtp: str | None
    vectors: str | None
    _engines: dict = field(default_factory=dict)

    def engine(self, with_mtp: bool = False):
        from ds4.session import Engine

        if not os.path.exists(self.model):
            raise Skip(f"missing model {self.model} (set DS4_TEST_MODEL)")
        if with_mtp and not (self.mtp and os.path.exists(self.mtp)):
            raise Skip("missing MTP support model (set DS4_TEST_MTP=FILE)")
        key = with_mtp
        if key not in self._engines:
            self._engines[key] = Engine(self.model, mtp_path=self.mtp if with_mtp else None)
        return self._engines[key]


def _logprob_vectors(check, ctx):
    if not ctx.vectors or not os.path.exists(ctx.vectors):
        raise Skip(f"missing vector file {ctx.vectors} (set DS4_TEST_VECTOR_FILE)")
    check_logprob_vectors(check, ctx.engine(), read_vectors(ctx.vectors))


def _mtp_verify_depth(check, ctx):
    from ds4.speculative import SpecOptions

    verify_depth(check, ctx.engine(with_mtp=True), SpecOptions(draft=4, margin=0))


def _cont_argmax_gap(check, ctx):
    from ds4.speculative import SpecOptions

    verify_depth(check, ctx.engine(with_mtp=True), SpecOptions(draft=1, margin=0))


def _verify_divergence(check, ctx):
    verify_divergence(check, ctx.engine(with_mtp=True))


TESTS: dict[str, Callable] = {
    "logprob-vectors": _logprob_vectors,
    "mtp-verify-depth": _mtp_verify_depth,
    "cont-argmax-gap": _cont_argmax_gap,
    "verify-divergence": _verify_divergence,
}


def run_tests(names: list[str], ctx: Context) -> int:
    failures = 0
    for name in names:
        check = Check(name)
        click.echo(f"{name}:", err=True)
        try:
            TESTS[name](check, ctx)
        except Skip as e:
            click.echo(f"{name}: SKIP ({e})", err=True)
            continue
        failures += check.failures
        click.echo(f"{name}: {'OK' if not check.failures else 'ERR'}", err=True)
    return failures


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] in (["-h"], ["--help"]):
        click.echo(__doc__)
        return
    if argv[:1] == ["--list"]:
        click.echo("\n".join(f"--{n}" for n in TESTS))
        return
    from ds4.loader import EMBEDDED_VECTORS, choose_model

    try:
        choice = choose_model(os.environ.get("DS4_TEST_MODEL"))
        if choice.notice:
            click.echo(f"ds4-test: {choice.notice}", err=True)
        mtp = os.environ.get("DS4_TEST_MTP") or choice.mtp(None, choice.embedded)
        vectors = os.environ.get("DS4_TEST_VECTOR_FILE") or (str(EMBEDDED_VECTORS) if choice.embedded else None)
        ctx = Context(choice.path, mtp, vectors)
        if argv[:1] == ["--write-vectors"]:
            if len(argv) < 3:
                raise click.UsageError("usage: ds4-test --write-vectors FILE PROMPT_FILE...")
            write_vectors(ctx.engine(), argv[2:], argv[1])
            click.echo(f"ds4-test: wrote {argv[1]}", err=True)
            return
        names = []
        for arg in argv or ["--all"]:
            if arg == "--all":
                names += list(TESTS)
            elif arg.startswith("--") and arg[2:] in TESTS:
                names.append(arg[2:])
            else:
                raise click.UsageError(f"unknown test {arg} (see --list)")
        failures = run_tests(list(dict.fromkeys(names)), ctx)
    except click.UsageError as e:
        e.show()
        sys.exit(2)
    except Skip as e:
        click.echo(f"ds4-test: {e}", err=True)
        sys.exit(1)
    except Ds4Error as e:
        click.echo(f"ds4-test: {e}", err=True)
        sys.exit(1)
    if failures:
        click.echo(f"ds4 tests: {failures} failure(s)", err=True)
        sys.exit(1)
    click.echo("ds4 tests: ok")
