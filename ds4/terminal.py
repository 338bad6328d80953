"""Terminal output of generation: the streamed reply (`ThinkPrinter`) and the prefill progress bar."""

from __future__ import annotations

import sys

from tqdm import tqdm

from ds4.session import Session


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


def prefill_bar(session: Session, n_prompt: int) -> tqdm | None:
    """A tqdm bar on stderr, fed by the session's prefill progress, for prompts longer than one
    prefill chunk (the caller closes it)."""
    if n_prompt <= session.prefill_chunk:
        return None
    bar = tqdm(total=n_prompt, desc="prefill", unit="tok", file=sys.stderr, leave=False)

    def update(done: int, total: int) -> None:
        bar.n = done
        bar.refresh()

    session.progress = update
    return bar
