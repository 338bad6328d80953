"""`ds4-test` (also `ds4_test`): oracle checks of a model through the engine.

Tests (run in this order by --all, each printing `<name>:`, its lines and `<name>: OK|ERR` on
stderr; the run ends with `ds4 tests: ok` on stdout and exit 0, or `ds4 tests: N failure(s)` on
stderr and exit 1). A run cannot pass on nothing: a selected test that could not run (no MTP file,
no or an empty vector file) or that checked nothing is a failure, with the reason; a model that
cannot be opened is an error (exit 1) before any test.

  --logprob-vectors   official.vec cases (DS4_TEST_VECTOR_FILE): per step the local argmax's bytes
                      equal the selected bytes, every listed top token is in the local top-20
                      within 4.0 of its logprob. `--write-vectors FILE PROMPT...` writes such a
                      file from this engine (replaced only once complete; a symlink's target is
                      replaced, a device or FIFO written in place). A case must end with `end` and hold the steps and
                      top entries its `case` and `step` lines announce.
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

from ds4.atomic import atomic_write
from ds4.chat import ThinkMode, render_prompt
from ds4.decode import DecodeStats, Speculative, generate
from ds4.errors import Ds4Error
from ds4.frontend import run
from ds4.loader import EMBEDDED_VECTORS, choose_model, open_model, open_mtp
from ds4.session import DEFAULT_CTX, Engine, Session
from ds4.speculative import Drafter, SpecOptions, replay_gaps
from ds4.textfile import read_text

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
    """Collects failures of one test; tests keep running after a failed assertion. `checked`
    counts assertions, so a test that asserted nothing can be told from one that passed."""

    def __init__(self, name: str):
        self.name, self.failures, self.checked = name, 0, 0

    def say(self, line: str) -> None:
        click.echo(f"{self.name}: {line}", err=True)

    def require(self, ok: bool, what: str) -> None:
        self.checked += 1
        if not ok:
            self.failures += 1
            self.say(f"assertion failed: {what}")


class NotRun(Exception):
    """A selected test that cannot run here (missing input): reported as a failure."""


# -- official.vec ------------------------------------------------------------------------------

@dataclass
class VecStep:
    selected: bytes
    top: list[tuple[bytes, float]] = field(default_factory=list)
    n_top: int = 0  # as announced by the `step` line


@dataclass
class VecCase:
    id: str
    ctx: int
    prompt_file: str
    steps: list[VecStep] = field(default_factory=list)
    n_steps: int = 0  # as announced by the `case` line


def read_vectors(path: str) -> list[VecCase]:
    """Parse an official.vec file; prompt files are relative to the file's folder. Every case must
    be complete (its announced steps and top entries, then `end`) and there must be one."""
    cases, case, step = [], None, None
    base = os.path.dirname(os.path.abspath(path))

    def expect(ok: bool, what: str) -> None:
        if not ok:
            raise ValueError(what)

    for n, line in enumerate(read_text(path, "vector file").splitlines(), 1):
        parts = line.split()
        if not parts or parts[0].startswith("#"):
            continue
        try:
            kind = parts[0]
            expect(kind in ("case", "step", "top", "end"), "expected case/step/top/end")
            expect(len(parts) == {"case": 5, "step": 4, "top": 3, "end": 1}[kind], "wrong number of fields")
            expect((case is None) == (kind == "case"),
                   f"case {case.id} has no end" if case else f"{kind} outside a case")
            if step is not None and kind != "top":
                expect(len(step.top) == step.n_top, f"step has {len(step.top)} top entries, {step.n_top} announced")
            if kind == "case":
                case = VecCase(parts[1], int(parts[2]), os.path.join(base, parts[4]), n_steps=int(parts[3]))
                expect(case.ctx > 0 and case.n_steps > 0, "ctx and steps must be positive")
            elif kind == "step":
                expect(int(parts[1]) == len(case.steps), f"step {parts[1]} out of order")
                step = VecStep(bytes.fromhex(parts[2]), n_top=int(parts[3]))
                case.steps.append(step)
            elif kind == "top":
                expect(step is not None, "top before any step")
                step.top.append((bytes.fromhex(parts[1]), float(parts[2])))
            else:
                expect(len(case.steps) == case.n_steps, f"case {case.id} has {len(case.steps)} steps, "
                       f"{case.n_steps} announced")
                cases.append(case)
                case = step = None
        except ValueError as e:
            raise Ds4Error(f"{path}:{n}: malformed line {line!r}: {e}") from None
    if case is not None:
        raise Ds4Error(f"{path}: case {case.id} has no end")
    if not cases:
        raise Ds4Error(f"{path}: no test cases")
    return cases


def write_vectors(engine, prompt_files: list[str], path: str, steps: int = 4, top: int = 20, ctx: int = 4096) -> None:
    """Write an official.vec-format file from this engine's greedy top logprobs."""
    tok = engine.tokenizer
    out = [VEC_HEADER]
    for i, prompt_file in enumerate(prompt_files):
        text = read_text(prompt_file, "prompt file")
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
    with atomic_write(path, "w", encoding="utf-8") as f:
        f.write("".join(out))


def check_logprob_vectors(check: Check, engine, cases: list[VecCase]) -> None:
    tok = engine.tokenizer
    for case in cases:
        if problem := engine.config.context_problem(case.ctx):
            raise Ds4Error(f"case {case.id}: {problem}")
        text = read_text(case.prompt_file, f"prompt file of case {case.id}")
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

def capture_speculative(engine, prompt: list[int], opts: SpecOptions, max_tokens: int = 256,
                        drafter: Drafter | None = None) -> DecodeStats:
    """A greedy speculative run from a fresh session (stopping at EOS): its stream and cycles."""
    return generate(Session(engine, DEFAULT_CTX), prompt, max_tokens, Speculative(opts, drafter),
                    engine.tokenizer.eos_id)


def verify_depth(check: Check, engine, opts, drafter=None, min_tokens: int = 128, max_tokens: int = 256) -> None:
    prompt = render_prompt(engine.tokenizer, MTP_PROMPT, "", ThinkMode.NONE)
    run = capture_speculative(engine, prompt, opts, max_tokens, drafter)
    out, max_chunk, stats = run.generated, run.max_commit, run.spec
    gaps = replay_gaps(Session(engine, DEFAULT_CTX), prompt, out)
    worst = max(gaps) if gaps else 0.0
    at = gaps.index(worst) if gaps else -1
    check.say(f"nspec={len(out)} max_chunk={max_chunk} worst_argmax_gap={worst:.3f} at={at}")
    check.require(max_chunk > 1, f"a multi-token commit happened (max_chunk {max_chunk}; drafts accepted "
                  f"{sum(stats.accepted.values())}/{sum(stats.proposed.values())})")
    check.require(len(out) > min_tokens, f"nspec {len(out)} > {min_tokens}")
    check.require(worst <= 2.0, f"worst argmax gap {worst:.3f} <= 2.0 (token {at})")


def verify_divergence(check: Check, engine, drafter=None) -> None:
    prompt = render_prompt(engine.tokenizer, MTP_PROMPT, "", ThinkMode.NONE)
    out = capture_speculative(engine, prompt, SpecOptions(draft=4, margin=0, exact=False), drafter=drafter).generated
    gaps = replay_gaps(Session(engine, DEFAULT_CTX), prompt, out)
    check.require(len(out) > 0, "the speculative capture committed tokens")
    diverged = [g for g in gaps if g > 0]
    bins = [(0.0, 0.01), (0.01, 0.1), (0.1, 0.5), (0.5, 2.0), (2.0, float("inf"))]
    hist = " ".join(f"({lo},{hi}]={sum(lo < g <= hi for g in diverged)}" for lo, hi in bins)
    check.say(f"tokens={len(out)} divergence_rate={len(diverged) / max(1, len(out)):.4f} gaps {hist}")


# -- runner --------------------------------------------------------------------------------------

@dataclass
class Context:
    """The model files of a run, opened (so validated) before any test: a model that cannot be
    opened is an error, not a test that did not run."""

    model: str
    mtp: str | None
    vectors: str | None
    _engines: dict = field(default_factory=dict)

    def __post_init__(self):
        self.model_file = open_model(self.model)

    def open_mtp(self) -> None:
        if self.mtp:
            open_mtp(self.mtp, self.model_file.config)

    def engine(self, with_mtp: bool = False):
        if with_mtp and not self.mtp:
            raise NotRun("no MTP support model (set DS4_TEST_MTP=FILE)")
        if with_mtp not in self._engines:
            self._engines[with_mtp] = Engine(self.model, self.model_file, mtp_path=self.mtp if with_mtp else None)
        return self._engines[with_mtp]


def _logprob_vectors(check, ctx):
    if not ctx.vectors:
        raise NotRun("no vector file (set DS4_TEST_VECTOR_FILE)")
    check_logprob_vectors(check, ctx.engine(), read_vectors(ctx.vectors))


def _mtp_verify_depth(check, ctx):
    verify_depth(check, ctx.engine(with_mtp=True), SpecOptions(draft=4, margin=0))


def _cont_argmax_gap(check, ctx):
    verify_depth(check, ctx.engine(with_mtp=True), SpecOptions(draft=1, margin=0))


def _verify_divergence(check, ctx):
    verify_divergence(check, ctx.engine(with_mtp=True))


TESTS: dict[str, Callable] = {
    "logprob-vectors": _logprob_vectors,
    "mtp-verify-depth": _mtp_verify_depth,
    "cont-argmax-gap": _cont_argmax_gap,
    "verify-divergence": _verify_divergence,
}
MTP_TESTS = ("mtp-verify-depth", "cont-argmax-gap", "verify-divergence")


def run_tests(names: list[str], ctx: Context) -> int:
    """Run the tests; returns the failures, counting a test that did not run or checked nothing as one."""
    failures = 0
    for name in names:
        check = Check(name)
        click.echo(f"{name}:", err=True)
        try:
            TESTS[name](check, ctx)
            if not check.checked:
                raise NotRun("it checked nothing")
        except (NotRun, Ds4Error) as e:
            check.failures += 1
            check.say(f"did not run: {e}")
        failures += check.failures
        click.echo(f"{name}: {'OK' if not check.failures else 'ERR'}", err=True)
    return failures


def main(argv: list[str] | None = None) -> None:
    run("ds4-test", lambda: _main(sys.argv[1:] if argv is None else list(argv)))


def _main(argv: list[str]) -> int:
    if argv[:1] in (["-h"], ["--help"]):
        click.echo(__doc__)
        return 0
    if argv[:1] == ["--list"]:
        click.echo("\n".join(f"--{n}" for n in TESTS))
        return 0
    names = []
    write = argv[:1] == ["--write-vectors"]
    if write and len(argv) < 3:
        raise click.UsageError("usage: ds4-test --write-vectors FILE PROMPT_FILE...")
    for arg in [] if write else argv or ["--all"]:
        if arg == "--all":
            names += list(TESTS)
        elif arg.startswith("--") and arg[2:] in TESTS:
            names.append(arg[2:])
        else:
            raise click.UsageError(f"unknown test {arg} (see --list)")
    choice = choose_model(os.environ.get("DS4_TEST_MODEL"))
    if choice.notice:
        click.echo(f"ds4-test: {choice.notice}", err=True)
    mtp = os.environ.get("DS4_TEST_MTP") or choice.mtp(None, choice.embedded)
    vectors = os.environ.get("DS4_TEST_VECTOR_FILE") or (str(EMBEDDED_VECTORS) if choice.embedded else None)
    ctx = Context(choice.path, mtp, vectors)
    if write:
        write_vectors(ctx.engine(), argv[2:], argv[1])
        click.echo(f"ds4-test: wrote {argv[1]}", err=True)
        return 0
    if any(n in MTP_TESTS for n in names):
        ctx.open_mtp()
    failures = run_tests(list(dict.fromkeys(names)), ctx)
    if failures:
        click.echo(f"ds4 tests: {failures} failure(s)", err=True)
        return 1
    click.echo("ds4 tests: ok")
    return 0
