"""The token generation loop shared by `ds4 -p` and the interactive chat.

One host sync per token: the chosen id (greedy argmax or a sample, computed on the device).
Ctrl+C between or inside steps leaves the session at its last committed token.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from typing import Callable

from ds4.session import Sampler, Session


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    prefill_seconds: float = 0.0
    generated: list[int] = field(default_factory=list)
    decode_seconds: float = 0.0
    stopped_by_eos: bool = False

    def line(self) -> str:
        prefill = self.prompt_tokens / self.prefill_seconds if self.prefill_seconds > 0 else 0.0
        gen = len(self.generated) / self.decode_seconds if self.decode_seconds > 0 else 0.0
        return f"ds4: prefill: {prefill:.2f} t/s, generation: {gen:.2f} t/s"


class ThinkPrinter:
    """Streams text to stdout: strips the literal <think>/</think> tags, greys thinking text on a
    terminal, and makes sure a newline follows the end of thinking."""

    GREY, RESET = "\x1b[90m", "\x1b[0m"

    def __init__(self, thinking: bool, out=None):
        self.out = sys.stdout if out is None else out  # the stdout of now, not of import time
        self.in_think = thinking
        self.color = self.out.isatty()
        self.pending = ""
        self.last = "\n"
        if self.in_think and self.color:
            self.out.write(self.GREY)

    def write(self, text: str) -> None:
        text = self.pending + text
        self.pending = ""
        while text:
            tag = "</think>" if self.in_think else "<think>"
            i = text.find(tag)
            if i < 0:
                # Hold back a possible partial tag at the end.
                keep = next((k for k in range(min(len(tag) - 1, len(text)), 0, -1) if tag.startswith(text[-k:])), 0)
                self._emit(text[:len(text) - keep])
                self.pending = text[len(text) - keep:]
                return
            self._emit(text[:i])
            text = text[i + len(tag):]
            self.in_think = not self.in_think
            if self.color:
                self.out.write(self.RESET if not self.in_think else self.GREY)
            if not self.in_think:
                if self.last != "\n":
                    self._emit("\n")
                text = text.lstrip("\n")

    def _emit(self, s: str) -> None:
        if s:
            self.out.write(s)
            self.out.flush()
            self.last = s[-1]

    def close(self) -> None:
        self._emit(self.pending)
        self.pending = ""
        if self.color and self.in_think:
            self.out.write(self.RESET)
        if self.last != "\n":
            self._emit("\n")


def timed_sync(session: Session, prompt: list[int], stats: GenerationStats) -> None:
    """Sync the prompt, recording as prefill only the tokens past the reused live prefix."""
    reused = session.pos if session.valid and prompt[:session.pos] == session.tokens else 0
    stats.prompt_tokens = len(prompt) - reused
    t0 = time.perf_counter()
    session.sync(prompt)
    stats.prefill_seconds = time.perf_counter() - t0


def generate(session: Session, prompt: list[int], max_tokens: int, sampler: Sampler, eos_id: int,
             on_token: Callable[[int], None] | None = None, stats: GenerationStats | None = None) -> GenerationStats:
    """Sync the prompt, then pick and evaluate up to `max_tokens` tokens (stops at EOS, which is
    neither passed on nor evaluated). The last picked token is evaluated too, so the session
    always ends holding prompt + generated tokens."""
    stats = stats or GenerationStats()
    timed_sync(session, prompt, stats)
    budget = min(max_tokens, session.ctx - session.pos - 1)
    t0 = time.perf_counter()
    try:
        for _ in range(budget):
            token = session.sample(sampler)
            if token == eos_id:
                stats.stopped_by_eos = True
                break
            stats.generated.append(token)
            if on_token is not None:
                on_token(token)
            session.eval(token)
    finally:
        stats.decode_seconds = time.perf_counter() - t0
    return stats


def generate_speculative(session: Session, prompt: list[int], max_tokens: int, eos_id: int, opts, stats,
                         on_token: Callable[[int], None] | None = None, drafter=None, adaptive: bool = True,
                         gen: GenerationStats | None = None) -> GenerationStats:
    """Greedy generation with MTP speculation (speculative.py); the committed stream is the one
    `generate` gives with greedy sampling. With `adaptive`, cycles that do not pay for
    themselves make way for plain steps for a while (AdaptiveGate)."""
    from ds4.speculative import AdaptiveGate, plain_step, speculative_step

    gen = gen or GenerationStats()
    timed_sync(session, prompt, gen)
    budget = min(max_tokens, session.ctx - session.pos - 1)
    gate = AdaptiveGate() if adaptive else None
    t0 = time.perf_counter()
    try:
        while len(gen.generated) < budget:
            left = budget - len(gen.generated)
            t_step = time.perf_counter()
            if gate is not None and not gate.speculate():
                token = session.argmax()
                if token == eos_id:
                    gen.stopped_by_eos = True
                    break
                plain_step(session, token, stats)
                gate.record_plain(time.perf_counter() - t_step)
                committed = [token]
            else:
                committed = speculative_step(session, opts, left, eos_id, stats, drafter)
                if committed == [eos_id]:
                    gen.stopped_by_eos = True
                    break
                if gate is not None:
                    gate.record_cycle(len(committed), time.perf_counter() - t_step)
            for token in committed:
                gen.generated.append(token)
                if on_token is not None:
                    on_token(token)
    finally:
        gen.decode_seconds = time.perf_counter() - t0
    return gen
