"""Chat prompt rendering for DS4: the CLI one-shot prompt and the REPL transcript.

Prompts are built as token lists, never as one string: each text span (Think-Max prefix, system,
user text) is BPE'd on its own with plain `Tokenizer.encode`, and the chat markers are inserted as
single ids. So a user typing `<｜User｜>` gets sub-word tokens, not a turn marker (ds4
`encode_chat_prompt`). Only a prompt that already starts with the BOS string is taken as rendered
chat and scanned for specials.
"""

from __future__ import annotations

import enum

from ds4.tokenizer import BOS, Tokenizer


class ThinkMode(enum.Enum):
    NONE = "none"
    HIGH = "high"
    MAX = "max"


DEFAULT_SYSTEM = "You are a helpful assistant"
THINK_MAX_PREFIX = (
    "Reasoning Effort: Absolute maximum with no shortcuts permitted.\n"
    "You MUST be very thorough in your thinking and comprehensively decompose the problem to resolve "
    "the root cause, rigorously stress-testing your logic against all potential paths, edge cases, "
    "and adversarial scenarios.\n"
    "Explicitly write out your entire deliberation process, documenting every intermediate step, "
    "considered alternative, and rejected hypothesis to ensure absolutely no assumption is left "
    "unchecked.\n\n"
)
# Think-Max needs room for very long reasoning; below this context ds4 falls back to HIGH.
THINK_MAX_MIN_CONTEXT = 393216


def think_mode_for_context(mode: ThinkMode, ctx: int) -> tuple[ThinkMode, str | None]:
    """The think mode that applies at context size `ctx`, and a warning when MAX was downgraded."""
    if mode is ThinkMode.MAX and ctx < THINK_MAX_MIN_CONTEXT:
        warning = (f"think mode max needs a context of at least {THINK_MAX_MIN_CONTEXT} tokens "
                   f"(got {ctx}); using high")
        return ThinkMode.HIGH, warning
    return mode, None


def _think_marker(tok: Tokenizer, think: ThinkMode) -> int:
    return tok.think_end_id if think is ThinkMode.NONE else tok.think_id


def _opening(tok: Tokenizer, system: str, think: ThinkMode) -> list[int]:
    """[BOS] (+ BPE(max prefix) if MAX) (+ BPE(system) if non-empty)."""
    ids = [tok.bos_id]
    if think is ThinkMode.MAX:
        ids += tok.encode(THINK_MAX_PREFIX)
    return ids + tok.encode(system)


def _user_turn(tok: Tokenizer, text: str, think: ThinkMode) -> list[int]:
    """[User] BPE(text) [Assistant] [<think> | </think>]."""
    return [tok.user_id, *tok.encode(text), tok.assistant_id, _think_marker(tok, think)]


def render_prompt(
    tok: Tokenizer, prompt: str, system: str = DEFAULT_SYSTEM, think: ThinkMode = ThinkMode.HIGH
) -> list[int]:
    """Tokens of a one-shot chat prompt, as `ds4 -p PROMPT` builds them.

    A prompt beginning with the BOS string is already rendered: it is tokenized with special
    recognition and `system`/`think` are ignored. Otherwise the result is
    `[BOS] (+max prefix) (+system) [User] prompt [Assistant] [<think>|</think>]`; the caller applies
    `think_mode_for_context` first.
    """
    if prompt.startswith(BOS):
        return tok.encode_rendered(prompt)
    return _opening(tok, system, think) + _user_turn(tok, prompt, think)


class ChatTranscript:
    """The growing token timeline of an interactive chat (the ds4 REPL).

    Starts as [BOS] (+ Think-Max prefix when `think` is MAX) + BPE(system); each turn appends the
    user block, then the sampled assistant tokens, then [EOS]. Earlier thinking stays in place.
    """

    def __init__(self, tok: Tokenizer, system: str = DEFAULT_SYSTEM, think: ThinkMode = ThinkMode.HIGH):
        self._tok = tok
        self._ids = _opening(tok, system, think)

    @property
    def tokens(self) -> list[int]:
        """A copy of the full token list so far."""
        return list(self._ids)

    def __len__(self) -> int:
        return len(self._ids)

    def add_user_turn(self, text: str, think: ThinkMode = ThinkMode.HIGH) -> list[int]:
        """Append `[User] BPE(text) [Assistant] [<think>|</think>]`; returns the appended ids."""
        ids = _user_turn(self._tok, text, think)
        self._ids += ids
        return ids

    def add_assistant_tokens(self, ids: list[int]) -> None:
        """Append tokens the model produced for the current assistant turn."""
        self._ids += ids

    def truncate(self, n: int) -> None:
        """Keep only the first n tokens (to drop a turn that was not answered)."""
        del self._ids[n:]

    def end_turn(self) -> None:
        """Close the assistant turn with [EOS], unless the sampled tokens already ended with it."""
        if not self._ids or self._ids[-1] != self._tok.eos_id:
            self._ids.append(self._tok.eos_id)
