"""The `ds4` command line. Errors become one `ds4: ...` line and an exit status in
`ds4.frontend`, the boundary every ds4 command shares."""

from __future__ import annotations

import json

import click

from ds4.atomic import atomic_write, json_lines_log
from ds4.chat import DEFAULT_SYSTEM, ThinkMode, render_prompt, think_mode_for_context
from ds4.chat_repl import run_repl
from ds4.config import LayerKind
from ds4.decode import DecodeStats, decode
from ds4.errors import Ds4Error
from ds4.frontend import BACKENDS, OUTPUT_HELP, SEED, UTF8_TEXT, FiniteFloat, run_click, select_backend
from ds4.kernels import reference_kernels
from ds4.loader import DS4FLASH, choose_model, open_model, open_mtp
from ds4.numerics import Numerics
from ds4.options import GenerateOptions, MtpOptions
from ds4.session import DEFAULT_CTX, Engine, Sampler, Session, default_prefill_chunk
from ds4.speculative import SpecOptions, SpecStats
from ds4.terminal import ThinkPrinter, prefill_bar
from ds4.textfile import read_text


def format_inspect(model, mtp=None) -> str:
    """The `--inspect` summary: dims, tensor counts and bytes per quant type, KV bytes per token."""
    c = model.config
    kinds = [c.layer_kind(il) for il in range(c.n_layer)]
    lines = [
        f"file:          {model.path}",
        f"name:          {model.name or '-'}",
        f"layers:        {c.n_layer} ({kinds.count(LayerKind.SLIDING)} sliding-window, "
        f"{kinds.count(LayerKind.INDEXED)} ratio-4 + indexer, {kinds.count(LayerKind.COMPRESSED)} ratio-128; "
        f"{min(c.n_hash_layer, c.n_layer)} hash-routed)",
        f"embedding:     {c.n_embd} x {c.n_hc} hyper-connection streams, vocab {c.n_vocab}",
        f"attention:     {c.n_head} heads x {c.head_dim} (rope {c.n_rot}), 1 KV head, q-lora {c.q_lora_rank}, "
        f"output {c.n_out_group} groups x {c.o_lora_rank}, window {c.n_swa}",
        f"indexer:       {c.n_indexer_head} heads x {c.indexer_head_dim}, top-{c.indexer_top_k}",
        f"experts:       {c.n_expert} routed (top-{c.n_expert_used}) + {c.n_expert_shared} shared, "
        f"ffn {c.n_ff_exp}",
    ]
    for label, f in (("tensors:", model),) + ((("mtp tensors:", mtp),) if mtp else ()):
        by_type = f.tensor_bytes_by_type()
        n = sum(k for k, _ in by_type.values())
        total = sum(b for _, b in by_type.values())
        lines.append(f"{label:<14} {n} in {f.path}, {total:,} bytes ({total / 2**30:.2f} GiB)")
        for name, (count, size) in by_type.items():
            lines.append(f"  {name:<10} {count:5d} tensors {size:>18,} bytes ({size / 2**30:8.3f} GiB)")
    ctx, chunk = DEFAULT_CTX, default_prefill_chunk(DEFAULT_CTX)
    lines += [
        f"kv cache:      {c.kv_bytes_per_token():,.0f} bytes per context token (compressed rows, f32)",
        f"               {c.kv_cache_bytes(ctx, chunk):,} bytes at ctx {ctx} "
        f"(raw rings {c.raw_cap(ctx, chunk)} rows/layer + compressed rows)",
    ]
    return "\n".join(lines)


def _token_json(tok, token_id: int) -> dict:
    raw = tok.token_bytes(token_id)
    return {"id": token_id, "text": raw.decode("utf-8", errors="replace"), "bytes": list(raw)}


def _read_prompt_tokens(path: str, n_vocab: int) -> list[int]:
    text = read_text(path, "prompt tokens")
    try:
        ids = json.loads(text)
    except ValueError as e:
        raise Ds4Error(f"{path}: prompt tokens are not JSON ({e}), expected a JSON list of token ids") from None
    # `type(i) is int`: JSON true/false are Python bools, which isinstance(.., int) would take as 1/0.
    if not isinstance(ids, list) or not ids or not all(type(i) is int and 0 <= i < n_vocab for i in ids):
        raise Ds4Error(f"{path}: prompt tokens must be a non-empty JSON list of ids in 0..{n_vocab - 1}")
    return ids


THINK_MODES = {"think": ThinkMode.HIGH, "nothink": ThinkMode.NONE, "think_max": ThinkMode.MAX}


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-m", "--model", "model_path", type=click.Path(dir_okay=False), default=None,
              help=f"base DS4 Flash GGUF (default {DS4FLASH}, else the embedded demo model)")
@click.option("--mtp", "mtp_path", type=click.Path(dir_okay=False),
              help="MTP support GGUF (the embedded model brings its own)")
@click.option("--inspect", is_flag=True, help="validate the model file(s), print a summary and exit")
@click.option("-p", "--prompt", type=UTF8_TEXT, help="one-shot prompt (no prompt: interactive chat)")
@click.option("--prompt-file", type=click.Path(dir_okay=False, exists=True), help="read the prompt from a UTF-8 file")
@click.option("--prompt-tokens", type=click.Path(dir_okay=False, exists=True),
              help="a JSON list of token ids fed as-is (no chat template)")
@click.option("-n", "--tokens", "n_tokens", type=click.IntRange(min=1), default=50000, show_default=True,
              help="tokens to generate (clamped to the context left)")
@click.option("--temp", type=FiniteFloat(0, 100), default=1.0, show_default=True, help="temperature; 0 = greedy")
@click.option("--top-p", type=FiniteFloat(0, 1, min_open=True), default=1.0, show_default=True)
@click.option("--top-k", type=click.IntRange(min=0), default=0, show_default=True, help="0 = off")
@click.option("--min-p", type=FiniteFloat(0, 1), default=0.05, show_default=True, help="relative to the top token")
@click.option("--seed", type=SEED, help="sampling seed (default: random)")
@click.option("-c", "--ctx", type=click.IntRange(min=16), default=DEFAULT_CTX, show_default=True, help="context size")
@click.option("-sys", "--system", type=UTF8_TEXT, default=DEFAULT_SYSTEM, show_default=True,
              help='system prompt ("" for none)')
@click.option("--think", "think", flag_value="think", default=True, help="thinking on (default)")
@click.option("--nothink", "think", flag_value="nothink", help="thinking off")
@click.option("--think-max", "think", flag_value="think_max", help="maximum reasoning effort (needs ctx >= 393216)")
@click.option("--dump-tokens", is_flag=True, help="print the prompt's tokens (rendered-chat tokenization) and exit")
@click.option("--dump-logprobs", type=click.Path(dir_okay=False),
              help=f"write a greedy JSON dump of top logprobs ({OUTPUT_HELP})")
@click.option("--logprobs-top-k", type=click.IntRange(1, 128), default=20, show_default=True)
@click.option("--prefill-chunk", type=click.IntRange(min=1), help="prefill chunk size (default 2048, or ctx if smaller)")
@click.option("--backend", type=BACKENDS, help="default: the best available")
@click.option("--mtp-draft", type=click.IntRange(1, 16), help="MTP drafts per cycle (default 1: continuous depth-1)")
@click.option("--mtp-margin", type=FiniteFloat(0, 1000),
              help="keep drafting only while the MTP top1-top2 logit margin is at least this (0: off; "
                   "default: the MTP file's ds4.mtp.draft_margin, else 3.0)")
@click.option("--mtp-continuous", is_flag=True, help="continuous depth-1 cycle (the default with --mtp)")
@click.option("--mtp-fast-verify", is_flag=True, help="always verify in one batched pass (near-greedy)")
@click.option("--quality", is_flag=True, help="strict: reference kernels for every op and the exact MTP verifier")
@click.option("--mtp-log", type=click.Path(dir_okay=False),
              help="write one JSON line per speculative cycle (as it runs, in place: through symlinks and devices)")
@click.option("--mtp-adaptive/--no-mtp-adaptive", default=True, show_default=True,
              help="fall back to plain decode while speculation does not pay")
@click.option("--act-quant", is_flag=True,
              help="int8-quantize activations before quantized matmuls as ds4's CPU path does (to compare logits with it)")
def cli(model_path, mtp_path, inspect, prompt, prompt_file, prompt_tokens, n_tokens, temp, top_p, top_k, min_p,
        seed, ctx, system, think, dump_tokens, dump_logprobs, logprobs_top_k, prefill_chunk, backend, mtp_draft,
        mtp_margin, mtp_continuous, mtp_fast_verify, quality, mtp_log, mtp_adaptive, act_quant):
    """DeepSeek V4 Flash inference on MLX."""
    if sum(x is not None for x in (prompt, prompt_file, prompt_tokens)) > 1:
        raise click.UsageError("give only one of -p, --prompt-file and --prompt-tokens")
    mtp_opts = MtpOptions.from_flags(mtp_draft, mtp_margin, mtp_continuous, mtp_fast_verify, quality, mtp_adaptive,
                                     mtp_log)
    opts = GenerateOptions(n_tokens, temp, top_k, top_p, min_p, seed, mtp_opts, quality)
    if prompt_file is not None:
        prompt = read_text(prompt_file, "prompt file")
    choice = choose_model(model_path)
    if choice.notice:
        click.echo(f"ds4: {choice.notice}", err=True)
    mtp_path = choice.mtp(mtp_path, mtp_opts.requested or (inspect and choice.embedded))
    model_file = open_model(choice.path)
    mtp = open_mtp(mtp_path, model_file.config) if mtp_path else None
    if inspect:
        click.echo(format_inspect(model_file, mtp))
        return
    tok = model_file.tokenizer()
    if dump_tokens:
        if prompt is None:
            raise click.UsageError("--dump-tokens needs a prompt")
        ids = tok.encode_rendered(prompt)
        click.echo(json.dumps(ids))
        for i in ids:
            click.echo(f"{i:6d}  {tok.token_bytes(i).decode('utf-8', errors='replace')}")
        return
    think_mode, warning = think_mode_for_context(THINK_MODES[think], ctx)
    if warning:
        click.echo(f"ds4: warning: {warning}", err=True)
    if prompt_tokens is not None:
        ids = _read_prompt_tokens(prompt_tokens, model_file.config.n_vocab)
    elif prompt is not None:
        ids = render_prompt(tok, prompt, system, think_mode)
    else:
        ids = None
    if problem := model_file.config.context_problem(ctx):
        raise Ds4Error(f"--ctx: {problem}")
    if ids is not None and len(ids) >= ctx:
        raise Ds4Error(f"prompt of {len(ids)} tokens exceeds the context of {ctx} tokens (raise --ctx)")
    backend = select_backend(backend)
    speculate = opts.speculates(mtp is not None, ids is not None and not dump_logprobs)
    if mtp is not None and not speculate:
        click.echo("ds4: MTP drafts are used only for greedy generation (--temp 0); decoding without them",
                   err=True)
    spec = mtp_opts.spec_options(mtp.mtp_margin) if speculate else None
    with reference_kernels(opts.quality):
        engine = Engine(model_file.path, model_file, Numerics(act_quant=act_quant), mtp_path if speculate else None)
        session = Session(engine, ctx, prefill_chunk)
        if spec is not None:
            click.echo(f"ds4: MTP support model loaded: {mtp_path} (draft={spec.draft}, "
                       f"margin={spec.margin:g}, verify={'exact' if spec.exact else 'fast'})", err=True)
        c = model_file.config
        click.echo(f"ds4: context buffers {c.kv_cache_bytes(ctx, session.prefill_chunk) / 2**20:.2f} MiB "
                   f"(ctx={ctx}, backend={backend}, prefill_chunk={session.prefill_chunk}, "
                   f"raw_kv_rows={c.n_swa}, compressed_kv_rows={ctx // 4 + 2})", err=True)
        if ids is None:
            run_repl(session, tok, system, think_mode, n_tokens, opts.sampler())
        elif dump_logprobs:
            _dump_logprobs(session, tok, ids, n_tokens, logprobs_top_k, dump_logprobs, prompt or prompt_tokens)
        else:
            thinking = think_mode is not ThinkMode.NONE and prompt_tokens is None
            _one_shot(session, tok, ids, opts, spec, thinking)


def _one_shot(session: Session, tok, ids: list[int], opts: GenerateOptions, spec: SpecOptions | None,
              thinking: bool) -> None:
    """`ds4 -p`: stream the reply to stdout, the speeds (and speculation telemetry) to stderr."""
    err = lambda line: click.echo(line, err=True)  # noqa: E731
    mtp = opts.mtp
    stats = DecodeStats(spec=SpecStats(log=json_lines_log(mtp.log_path) if mtp.log_path else None,
                                       spec_log=err if mtp.spec_log else None,
                                       conf_log=err if mtp.conf_log else None))
    printer = ThinkPrinter(thinking=thinking)
    stream = tok.stream_decoder()
    bar = prefill_bar(session, len(ids))
    try:
        for token in decode(session, ids, opts.max_tokens, opts.policy(spec), tok.eos_id, stats):
            printer.write(stream.push(token))
    finally:
        if bar is not None:
            bar.close()
        printer.write(stream.flush())
        printer.close()
    err(stats.line())
    if spec is not None:
        err(stats.spec.summary())


def _dump_logprobs(session: Session, tok, ids: list[int], n_tokens: int, top_k: int, path: str, source: str) -> None:
    """Greedy decode of n steps, recording each step's selected token and top-k logprobs (the
    reference's JSON shape). Written atomically."""
    steps = []
    stats = DecodeStats()
    for token in decode(session, ids, n_tokens, Sampler(temperature=0.0), tok.eos_id, stats):
        steps.append({
            "step": len(steps),
            "selected": _token_json(tok, token),
            "top_logprobs": [{"token": _token_json(tok, i), "logit": logit, "logprob": lp}
                             for i, logit, lp in session.top_logprobs(top_k)],
        })
    doc = {"source": source, "prompt_tokens": len(ids), "ctx": session.ctx, "top_k": top_k, "steps": steps}
    with atomic_write(path, "w", encoding="utf-8") as f:
        json.dump(doc, f, ensure_ascii=False)
    click.echo(stats.line(), err=True)


def main(argv: list[str] | None = None) -> None:
    run_click(cli, argv, "ds4")
