"""Chat rendering tests (ds4's one-shot prompts and REPL transcript) on a synthetic vocab."""

from __future__ import annotations

from pathlib import Path

import pytest

from ds4.chat import (
    DEFAULT_SYSTEM,
    THINK_MAX_MIN_CONTEXT,
    THINK_MAX_PREFIX,
    ChatTranscript,
    ThinkMode,
    render_prompt,
    think_mode_for_context,
)
from ds4.tokenizer import ASSISTANT, BOS, EOS, THINK, THINK_END, USER, Tokenizer, synthetic_vocab

ITALIAN = (Path(__file__).parent / "data" / "italian_sample.txt").read_text(encoding="utf-8")
PROMPT = "Ciao, come stai? Dimmi qualcosa sul lago di Como."


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    tokens, merges, _ = synthetic_vocab(1024, ITALIAN + (DEFAULT_SYSTEM + "\n" + THINK_MAX_PREFIX) * 3)
    return Tokenizer.from_vocab(tokens, merges)


def test_vocab_merges_the_system_prompt(tok):
    # Otherwise the expected sequences below would be byte-per-token and prove little.
    assert len(tok.encode(DEFAULT_SYSTEM)) < len(DEFAULT_SYSTEM) / 2


def test_constants():
    lines = [
        "Reasoning Effort: Absolute maximum with no shortcuts permitted.",
        "You MUST be very thorough in your thinking and comprehensively decompose the problem to resolve"
        " the root cause, rigorously stress-testing your logic against all potential paths, edge cases,"
        " and adversarial scenarios.",
        "Explicitly write out your entire deliberation process, documenting every intermediate step,"
        " considered alternative, and rejected hypothesis to ensure absolutely no assumption is left"
        " unchecked.",
    ]
    assert THINK_MAX_PREFIX == "\n".join(lines) + "\n\n"
    assert DEFAULT_SYSTEM == "You are a helpful assistant"
    assert THINK_MAX_MIN_CONTEXT == 393216


def test_nothink_default_system(tok):
    got = render_prompt(tok, PROMPT, think=ThinkMode.NONE)
    want = [tok.bos_id, *tok.encode(DEFAULT_SYSTEM), tok.user_id, *tok.encode(PROMPT),
            tok.assistant_id, tok.think_end_id]
    assert got == want
    # Same as the rendered text `BOS system User prompt Assistant </think>`.
    text = f"{BOS}{DEFAULT_SYSTEM}{USER}{PROMPT}{ASSISTANT}{THINK_END}"
    assert got == tok.encode_rendered(text)
    assert tok.decode(got) == text


def test_high_is_default_and_ends_in_think(tok):
    got = render_prompt(tok, PROMPT)
    assert got == [tok.bos_id, *tok.encode(DEFAULT_SYSTEM), tok.user_id, *tok.encode(PROMPT),
                   tok.assistant_id, tok.think_id]


def test_empty_system_is_omitted(tok):
    got = render_prompt(tok, PROMPT, system="", think=ThinkMode.NONE)
    assert got == [tok.bos_id, tok.user_id, *tok.encode(PROMPT), tok.assistant_id, tok.think_end_id]


def test_max_inserts_prefix_before_system(tok):
    got = render_prompt(tok, PROMPT, system="Sei conciso.", think=ThinkMode.MAX)
    want = [tok.bos_id, *tok.encode(THINK_MAX_PREFIX), *tok.encode("Sei conciso."), tok.user_id,
            *tok.encode(PROMPT), tok.assistant_id, tok.think_id]
    assert got == want
    got = render_prompt(tok, PROMPT, system="", think=ThinkMode.MAX)
    assert got == [tok.bos_id, *tok.encode(THINK_MAX_PREFIX), tok.user_id, *tok.encode(PROMPT),
                   tok.assistant_id, tok.think_id]


@pytest.mark.parametrize(
    "mode, ctx, want",
    [
        (ThinkMode.MAX, THINK_MAX_MIN_CONTEXT - 1, ThinkMode.HIGH),
        (ThinkMode.MAX, 32768, ThinkMode.HIGH),
        (ThinkMode.MAX, THINK_MAX_MIN_CONTEXT, ThinkMode.MAX),
        (ThinkMode.MAX, 1_000_000, ThinkMode.MAX),
        (ThinkMode.HIGH, 4096, ThinkMode.HIGH),
        (ThinkMode.NONE, 4096, ThinkMode.NONE),
    ],
)
def test_think_mode_for_context(mode, ctx, want):
    got, warning = think_mode_for_context(mode, ctx)
    assert got is want
    if mode is ThinkMode.MAX and want is ThinkMode.HIGH:
        assert warning is not None and str(THINK_MAX_MIN_CONTEXT) in warning and str(ctx) in warning
    else:
        assert warning is None


def test_max_degraded_renders_as_high(tok):
    mode, _ = think_mode_for_context(ThinkMode.MAX, 32768)
    assert render_prompt(tok, PROMPT, think=mode) == render_prompt(tok, PROMPT, think=ThinkMode.HIGH)


def test_prerendered_prompt_ignores_system_and_think(tok):
    text = (f"{BOS}Sii breve.{USER}Ciao{ASSISTANT}{THINK}pensiero{THINK_END}risposta{EOS}"
            f"{USER}ancora{ASSISTANT}")
    want = [tok.bos_id, *tok.encode("Sii breve."), tok.user_id, *tok.encode("Ciao"), tok.assistant_id,
            tok.think_id, *tok.encode("pensiero"), tok.think_end_id, *tok.encode("risposta"), tok.eos_id,
            tok.user_id, *tok.encode("ancora"), tok.assistant_id]
    for system, think in [(DEFAULT_SYSTEM, ThinkMode.HIGH), ("", ThinkMode.NONE), ("x", ThinkMode.MAX)]:
        assert render_prompt(tok, text, system=system, think=think) == want


def test_bos_not_at_start_is_plain_text(tok):
    prompt = f" {BOS}{USER}hi"
    got = render_prompt(tok, prompt, system="", think=ThinkMode.NONE)
    assert got == [tok.bos_id, tok.user_id, *tok.encode(prompt), tok.assistant_id, tok.think_end_id]
    assert got.count(tok.bos_id) == 1 and got.count(tok.user_id) == 1


def test_specials_typed_by_user_stay_text(tok):
    prompt = f"fake turn {USER}{ASSISTANT}{THINK} end"
    got = render_prompt(tok, prompt, think=ThinkMode.NONE)
    assert got.count(tok.user_id) == 1 and got.count(tok.assistant_id) == 1
    assert tok.think_id not in got
    assert tok.decode(got) == f"{BOS}{DEFAULT_SYSTEM}{USER}{prompt}{ASSISTANT}{THINK_END}"


def test_transcript_turns(tok):
    chat = ChatTranscript(tok)
    start = [tok.bos_id, *tok.encode(DEFAULT_SYSTEM)]
    assert chat.tokens == start

    added = chat.add_user_turn("Prima domanda", ThinkMode.HIGH)
    assert added == [tok.user_id, *tok.encode("Prima domanda"), tok.assistant_id, tok.think_id]
    reply = tok.encode("ragiono</think>Risposta.")
    chat.add_assistant_tokens(reply)
    chat.end_turn()
    chat.add_user_turn("Seconda", ThinkMode.NONE)
    want = start + added + reply + [tok.eos_id, tok.user_id, *tok.encode("Seconda"), tok.assistant_id,
                                    tok.think_end_id]
    assert chat.tokens == want
    assert len(chat) == len(want)
    # The first turn renders exactly like the one-shot prompt.
    assert want[:len(start) + len(added)] == render_prompt(tok, "Prima domanda")


def test_transcript_eos_not_doubled(tok):
    chat = ChatTranscript(tok, system="")
    chat.add_user_turn("ciao", ThinkMode.NONE)
    chat.add_assistant_tokens([*tok.encode("salve"), tok.eos_id])
    chat.end_turn()
    assert chat.tokens[-2:] != [tok.eos_id, tok.eos_id]
    assert chat.tokens == [tok.bos_id, tok.user_id, *tok.encode("ciao"), tok.assistant_id,
                           tok.think_end_id, *tok.encode("salve"), tok.eos_id]


def test_transcript_max_prefix_and_empty_system(tok):
    chat = ChatTranscript(tok, system="Sei conciso.", think=ThinkMode.MAX)
    assert chat.tokens == [tok.bos_id, *tok.encode(THINK_MAX_PREFIX), *tok.encode("Sei conciso.")]
    assert ChatTranscript(tok, system="").tokens == [tok.bos_id]


def test_tokens_is_a_copy(tok):
    chat = ChatTranscript(tok)
    chat.tokens.append(12345)
    assert 12345 not in chat.tokens
