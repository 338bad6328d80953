"""The interactive chat (`ds4` without a prompt): a transcript that grows turn by turn over one
session, so each turn prefills only its new tokens.

Ctrl+C during a reply stops it; the transcript keeps what the session committed, so the two
always agree. Ctrl+C at the prompt or Ctrl+D leaves.
"""

from __future__ import annotations

import sys

import click

from ds4.chat import ChatTranscript, ThinkMode, think_mode_for_context
from ds4.errors import Ds4Error
from ds4.decode import DecodeStats, decode
from ds4.session import Sampler, Session
from ds4.terminal import ThinkPrinter
from ds4.textfile import read_text, undecodable

HELP = """commands:
  /help            this text
  /think           thinking on (default)
  /nothink         thinking off
  /think-max       maximum reasoning effort (needs ctx >= 393216; starts a new conversation)
  /ctx N           new context size (starts a new conversation)
  /read FILE       send the file's text as the next message
  /quit, /exit     leave (also Ctrl+D)
Ctrl+C stops a reply."""


def run_repl(session: Session, tok, system: str, think: ThinkMode, max_tokens: int, sampler: Sampler) -> None:
    transcript = ChatTranscript(tok, system, think)
    click.echo(HELP, err=True)
    if hasattr(sys.stdin, "reconfigure"):
        # Bytes that are not UTF-8 arrive as surrogates instead of ending the chat: that line is refused below.
        sys.stdin.reconfigure(errors="surrogateescape")
    while True:
        try:
            line = input("ds4> ")
        except EOFError:
            click.echo("", err=True)
            return
        except KeyboardInterrupt:
            click.echo("", err=True)
            return
        problem = undecodable(line)
        if problem:
            click.echo(f"ds4: that line is not UTF-8 text ({problem}); not sent", err=True)
            continue
        text = line
        if line.startswith("/"):
            cmd, _, arg = line.partition(" ")
            if cmd in ("/quit", "/exit"):
                return
            if cmd == "/help":
                click.echo(HELP, err=True)
                continue
            if cmd in ("/think", "/nothink", "/think-max"):
                wanted = {"/think": ThinkMode.HIGH, "/nothink": ThinkMode.NONE, "/think-max": ThinkMode.MAX}[cmd]
                new, warning = think_mode_for_context(wanted, session.ctx)
                if warning:
                    click.echo(f"ds4: warning: {warning}", err=True)
                if (new is ThinkMode.MAX) != (think is ThinkMode.MAX):
                    transcript = ChatTranscript(tok, system, new)  # the prefix sits right after BOS
                    session.invalidate()
                    click.echo("ds4: new conversation", err=True)
                think = new
                continue
            if cmd == "/ctx":
                try:
                    ctx = int(arg)
                    if ctx < 16:
                        raise ValueError
                except ValueError:
                    click.echo(f"ds4: /ctx needs a number >= 16, got {arg!r}", err=True)
                    continue
                if problem := session.config.context_problem(ctx):
                    click.echo(f"ds4: /ctx: {problem}", err=True)
                    continue
                session = Session(session.engine, ctx, None)
                transcript = ChatTranscript(tok, system, think)
                click.echo(f"ds4: context {ctx} tokens; new conversation", err=True)
                continue
            if cmd == "/read":
                try:
                    text = read_text(arg.strip(), "/read file")
                except Ds4Error as e:
                    click.echo(f"ds4: {e}; the conversation goes on", err=True)
                    continue
            else:
                click.echo(f"ds4: unknown command {cmd} (try /help)", err=True)
                continue
        if not text.strip():
            continue
        _turn(session, tok, transcript, text, think, max_tokens, sampler)


def _turn(session: Session, tok, transcript: ChatTranscript, text: str, think: ThinkMode, max_tokens: int,
          sampler: Sampler) -> None:
    before = len(transcript)
    transcript.add_user_turn(text, think)
    prompt = transcript.tokens
    if len(prompt) >= session.ctx - 1:
        click.echo(f"ds4: the conversation ({len(prompt)} tokens) no longer fits the context of "
                   f"{session.ctx}; use /ctx to start a larger one", err=True)
        transcript.truncate(before)  # drop the turn that did not fit
        return
    printer = ThinkPrinter(thinking=think is not ThinkMode.NONE)
    stream = tok.stream_decoder()
    stats = DecodeStats()
    try:
        for token in decode(session, prompt, max_tokens, sampler, tok.eos_id, stats):
            printer.write(stream.push(token))
    except KeyboardInterrupt:
        click.echo("\nds4: stopped", err=True)
    finally:
        printer.write(stream.flush())
        printer.close()
    live = session.tokens
    if session.valid and live[:len(prompt)] == prompt:
        transcript.add_assistant_tokens(live[len(prompt):])
        transcript.end_turn()
    else:
        transcript.truncate(before)  # interrupted during prefill: forget the turn
    click.echo(stats.line(), err=True)
