"""`ds4-bench`: context-frontier sweeps writing ds4-compatible CSV, and `ds4-bench plot`.

One session walks the frontiers: incremental prefill to each frontier (timed), a snapshot,
`--gen-tokens` greedy steps that never emit EOS (timed), a restore, the next frontier. Rows are
`ctx_tokens,prefill_tokens,prefill_tps,gen_tokens,gen_tps,kvcache_bytes` exactly as the
reference engine writes them; with `--mtp` three columns follow (first-draft acceptance,
committed tokens per cycle, trunk passes per token).
"""

from __future__ import annotations

import csv
import io
import math
import os
import sys
import time

import click
from tqdm import tqdm

from ds4.atomic import atomic_write
from ds4.chat import ThinkMode, render_prompt
from ds4.decode import DecodeStats, Speculative, generate
from ds4.errors import Ds4Error
from ds4.frontend import BACKENDS, OUTPUT_HELP, UTF8_TEXT, FiniteFloat, run_click, select_backend
from ds4.loader import choose_model, open_model
from ds4.options import MtpOptions
from ds4.session import Engine, Sampler, Session
from ds4.speculative import SpecOptions
from ds4.textfile import read_text

HEADER = "ctx_tokens,prefill_tokens,prefill_tps,gen_tokens,gen_tps,kvcache_bytes"
MTP_HEADER = ",mtp_accept_k0,mtp_tokens_per_cycle,mtp_trunk_passes_per_token"
BENCH_SYSTEM = "You are a helpful assistant."  # ds4-bench's default (with the period)


def frontiers(start: int, stop: int, incr: int, mul: float) -> list[int]:
    """ctx-start, then +incr (or x mul, at least +1) each time, ending exactly at ctx-max."""
    out, f = [], start
    while True:
        out.append(f)
        if f >= stop:
            return out
        f = min(stop, max(f + 1, math.ceil(f * mul)) if mul > 1 else f + incr)


def run_sweep(session, prompt: list[int], points: list[int], gen_tokens: int, eos: int, out,
              spec: SpecOptions | None = None, progress: bool = True) -> None:
    """Write the CSV header and one row per frontier; generation is greedy (speculative with
    `spec`) and never emits EOS, so every row times `gen_tokens` tokens."""
    policy = Sampler(temperature=0.0) if spec is None else Speculative(spec)
    out.write(HEADER + (MTP_HEADER if spec else "") + "\n")
    out.flush()
    previous = 0
    for f in tqdm(points, desc="frontiers", unit="ctx", file=sys.stderr, disable=None if progress else True):
        t0 = time.perf_counter()
        session.sync(prompt[:f])
        prefill_s = time.perf_counter() - t0
        snap = session.snapshot()
        gen = DecodeStats()
        t0 = time.perf_counter()
        generate(session, None, gen_tokens, policy, eos, stats=gen, exclude_eos=True)
        gen_s = time.perf_counter() - t0
        stats = gen.spec
        row = (f"{f:d},{f - previous:d},{(f - previous) / prefill_s:.2f},{gen_tokens:d},"
               f"{gen_tokens / gen_s:.2f},{session.config.kv_payload_bytes(f):d}")
        if spec:
            k0 = stats.accepted[0] / stats.proposed[0] if stats.proposed[0] else 0.0
            cycles = stats.cycles + stats.plain_steps
            row += f",{k0:.4f},{stats.committed / max(1, cycles):.3f},{stats.trunk_passes / max(1, stats.committed):.3f}"
        out.write(row + "\n")
        out.flush()
        session.restore(snap)
        previous = f


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-m", "--model", "model_path", type=click.Path(dir_okay=False),
              help="base GGUF (default ./ds4flash.gguf, else the embedded demo model)")
@click.option("--prompt-file", type=click.Path(dir_okay=False, exists=True), help="raw text, no chat template")
@click.option("--chat-prompt-file", type=click.Path(dir_okay=False, exists=True),
              help="the file as one no-thinking chat user message")
@click.option("-sys", "--system", type=UTF8_TEXT, default=BENCH_SYSTEM, show_default=True,
              help="with --chat-prompt-file")
@click.option("--ctx-start", type=click.IntRange(min=1), default=2048, show_default=True)
@click.option("--ctx-max", type=click.IntRange(min=1), default=32768, show_default=True)
@click.option("--ctx-alloc", type=click.IntRange(min=2), help="context allocated (default ctx-max + gen-tokens + 1)")
@click.option("--step-incr", type=click.IntRange(min=1), default=2048, show_default=True)
@click.option("--step-mul", type=FiniteFloat(min=1), default=1.0, show_default=True)
@click.option("-n", "--gen-tokens", "--tokens", type=click.IntRange(min=1), default=128, show_default=True)
@click.option("--csv", "csv_path", type=click.Path(dir_okay=False),
              help=f"output CSV (default stdout; {OUTPUT_HELP})")
@click.option("--backend", type=BACKENDS)
@click.option("--prefill-chunk", type=click.IntRange(min=1))
@click.option("--mtp", "mtp_path", type=click.Path(dir_okay=False), help="bench speculative generation")
@click.option("--mtp-draft", type=click.IntRange(1, 16), help="drafts per cycle (default 1)")
@click.option("--mtp-continuous", is_flag=True, help="continuous depth-1 (same as --mtp-draft 1)")
@click.option("--mtp-margin", type=FiniteFloat(0, 1000),
              help="draft confidence margin (default: the MTP file's, else 3.0)")
def sweep(model_path, prompt_file, chat_prompt_file, system, ctx_start, ctx_max, ctx_alloc, step_incr, step_mul,
          gen_tokens, csv_path, backend, prefill_chunk, mtp_path, mtp_draft, mtp_continuous, mtp_margin):
    """Context-frontier sweep: prefill and generation tokens/s at growing contexts."""
    mtp_opts = MtpOptions.from_flags(mtp_draft, mtp_margin, mtp_continuous)
    if (prompt_file is None) == (chat_prompt_file is None):
        raise click.UsageError("give exactly one of --prompt-file and --chat-prompt-file")
    if ctx_start > ctx_max:
        raise click.UsageError(f"--ctx-start {ctx_start} is above --ctx-max {ctx_max}")
    ctx_alloc = ctx_alloc or ctx_max + gen_tokens + 1
    if ctx_alloc <= ctx_max + gen_tokens:
        raise click.UsageError(f"--ctx-alloc {ctx_alloc} must exceed ctx-max + gen-tokens = {ctx_max + gen_tokens}")
    choice = choose_model(model_path)
    if choice.notice:
        click.echo(f"ds4-bench: {choice.notice}", err=True)
    model_path = choice.path
    mtp_path = choice.mtp(mtp_path, mtp_opts.requested)
    model_file = open_model(model_path)
    if problem := model_file.config.context_problem(ctx_alloc):
        raise Ds4Error(f"--ctx-alloc: {problem}")
    tok = model_file.tokenizer()
    text = read_text(prompt_file or chat_prompt_file, "prompt file")
    prompt = tok.encode(text) if prompt_file else render_prompt(tok, text, system, ThinkMode.NONE)
    if len(prompt) < ctx_max:
        raise Ds4Error(f"{prompt_file or chat_prompt_file}: the prompt has {len(prompt)} tokens, "
                       f"expected at least --ctx-max {ctx_max}")
    backend = select_backend(backend)
    engine = Engine(model_path, model_file, mtp_path=mtp_path)
    session = Session(engine, ctx_alloc, prefill_chunk)
    spec = None
    if mtp_path:
        spec = mtp_opts.spec_options(engine.mtp_file.mtp_margin)
    click.echo(f"ds4-bench: context buffers {model_file.config.kv_cache_bytes(ctx_alloc, session.prefill_chunk) / 2**20:.2f}"
               f" MiB (ctx={ctx_alloc}, backend={backend}, prefill_chunk={session.prefill_chunk})", err=True)
    points = frontiers(ctx_start, ctx_max, step_incr, step_mul)
    if csv_path:
        with atomic_write(csv_path, "w") as out:
            run_sweep(session, prompt, points, gen_tokens, tok.eos_id, out, spec)
    else:
        run_sweep(session, prompt, points, gen_tokens, tok.eos_id, sys.stdout, spec)


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("csv_files", nargs=-1, required=True, type=click.Path(dir_okay=False, exists=True))
@click.option("-o", "--out",
              help=f"output stem (default: the first CSV's name + _ts); writes .svg and .png ({OUTPUT_HELP})")
@click.option("--title", type=UTF8_TEXT, default="ds4-bench", show_default=True)
def plot(csv_files, out, title):
    """Prefill and generation tokens/s against context, one line per CSV, on two y axes."""
    try:  # an optional dependency, needed only here
        import matplotlib
    except ImportError:
        raise Ds4Error("ds4-bench plot needs matplotlib (pip install matplotlib)") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax_prefill = plt.subplots(figsize=(9, 5))
    ax_gen = ax_prefill.twinx()
    for i, path in enumerate(csv_files):
        ctx, prefill, gen = read_sweep_csv(path)
        label = os.path.splitext(os.path.basename(path))[0]
        color = f"C{i}"
        ax_prefill.plot(ctx, prefill, color=color, marker="o", label=f"{label} prefill")
        ax_gen.plot(ctx, gen, color=color, marker="s", linestyle="--", label=f"{label} generation")
    ax_prefill.set_ylim(bottom=0)
    ax_gen.set_ylim(bottom=0)
    ax_prefill.set_xlabel("context tokens")
    ax_prefill.set_ylabel("prefill tokens/s (solid)")
    ax_gen.set_ylabel("generation tokens/s (dashed)")
    ax_prefill.set_title(title)
    lines = ax_prefill.get_legend_handles_labels()
    more = ax_gen.get_legend_handles_labels()
    ax_prefill.legend(lines[0] + more[0], lines[1] + more[1], fontsize=8, loc="best")
    fig.tight_layout()
    stem = out or os.path.splitext(csv_files[0])[0] + "_ts"
    for ext in ("svg", "png"):
        with atomic_write(f"{stem}.{ext}") as f:
            fig.savefig(f, format=ext)
    click.echo(f"wrote {stem}.svg and {stem}.png", err=True)


def read_sweep_csv(path: str) -> tuple[list[int], list[float], list[float]]:
    """(ctx_tokens, prefill_tps, gen_tps) of a ds4-bench CSV; a Ds4Error names a bad row."""
    text = read_text(path, "ds4-bench CSV").removeprefix("\ufeff")
    rows = list(csv.DictReader(io.StringIO(text, newline="")))
    if not rows or not set(HEADER.split(",")) <= set(rows[0]):
        raise Ds4Error(f"{path}: not a ds4-bench CSV, expected the header {HEADER}")
    ctx, prefill, gen = [], [], []
    for line, r in enumerate(rows, 2):
        try:  # a short row reads as None (TypeError), a bad cell fails the conversion
            ctx.append(int(r["ctx_tokens"]))
            prefill.append(float(r["prefill_tps"]))
            gen.append(float(r["gen_tps"]))
        except (TypeError, ValueError):
            raise Ds4Error(f"{path}:{line}: malformed row, expected numbers under {HEADER}") from None
    return ctx, prefill, gen


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["plot"]:
        run_click(plot, argv[1:], "ds4-bench plot")
    else:
        run_click(sweep, argv, "ds4-bench")
