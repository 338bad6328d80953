"""Engine (a loaded model) and Session (one inference timeline over it).

Invariant of a Session: `tokens`, the KV cache and `logits` always describe the same prefix
(the cache holds exactly positions 0..len(tokens)-1 and `logits` is the next-token distribution
after them), or the session is marked invalid and the next `sync` rebuilds. State changes are
committed only after a step has been fully evaluated, so an exception or Ctrl+C in the middle of
a step leaves the previous consistent state in place.

Snapshots are cheap: the cache is an immutable value (see cache.py), so a snapshot holds
references. The session remembers the snapshots it handed out (the most recent few) so that
`rewind` and `sync` can return to a real earlier state instead of truncating a stale cache.
"""

from __future__ import annotations

import hashlib
import os
import struct
from dataclasses import dataclass
from typing import Callable

import mlx.core as mx
import numpy as np

from ds4.atomic import atomic_write
from ds4.attention import Numerics
from ds4.cache import CompressorState, LayerCache, ModelCache
from ds4.errors import Ds4Error
from ds4.loader import ModelFile, open_model, open_mtp
from ds4.mtp import same_position_pairing

DEFAULT_CTX = 32768
MAX_CHECKPOINTS = 4


class SessionError(Ds4Error):
    """A session operation that cannot be done (context overflow, mismatched saved state...)."""


def default_prefill_chunk(ctx: int) -> int:
    """ds4's default: 2048-token chunks, or the whole context when it is smaller."""
    return 2048 if ctx > 2048 else ctx


class Engine:
    """A loaded model: validated file, weights on the device, tokenizer, and the MTP head when an
    MTP file is given. Immutable after load."""

    def __init__(self, model_path: str, model_file: ModelFile | None = None, numerics: Numerics = Numerics(),
                 mtp_path: str | None = None):
        from ds4.model import Model
        from ds4.mtp import MTPHead

        self.file = model_file or open_model(model_path)
        self.config = self.file.config
        self.tokenizer = self.file.tokenizer()
        self.model = Model.load(self.file, numerics)
        self.mtp_file = open_mtp(mtp_path, self.config) if mtp_path else None
        self.mtp = MTPHead.load(self.mtp_file, self.model, numerics) if mtp_path else None

    @property
    def row_invariant(self) -> bool:
        """Whether an M-row pass computes every row exactly as a 1-row decode does, so a batched
        verify is bit-identical to plain decode. True on the CPU with MLX's bundled BLAS (proven
        by the decode-vs-prefill tests); other BLAS libraries and the GPU kernels reorder sums."""
        import ds4

        return mx.default_device() == mx.cpu and ds4.BLAS is None

    def fingerprint(self) -> bytes:
        """sha256 over the model's header (metadata, tensor names, types, shapes, offsets) and
        its size: a saved session only loads into the same model file and quantization."""
        g = self.file.gguf
        h = hashlib.sha256(bytes(g.buffer[:g.data_offset]))
        h.update(struct.pack("<Q", g.size))
        return h.digest()


@dataclass(frozen=True)
class Snapshot:
    """A session state. Every field is immutable, so holding one costs only references."""

    tokens: tuple[int, ...]
    cache: ModelCache
    logits: mx.array | None  # next-token logits [V]; None: the state is invalid
    hidden: mx.array | None  # trunk's final HC state [M, E] at the last position
    mtp_cache: ModelCache | None = None  # MTP rows for positions up to len(tokens) - 2
    mtp_hidden: mx.array | None = None  # MTP output HC of the last row (same-position pairing only)

    def arrays(self) -> list[mx.array]:
        out = self.cache.arrays() + [a for a in (self.logits, self.hidden, self.mtp_hidden) if a is not None]
        return out + (self.mtp_cache.arrays() if self.mtp_cache is not None else [])


@dataclass(frozen=True)
class Verified:
    """An evaluated, uncommitted forward over draft rows (see Session.verify)."""

    tokens: tuple[int, ...]
    argmax: list[int]  # greedy token after each row
    finite: list[bool]  # whether each row's logits are all finite
    logits: mx.array  # [T, V]
    cache: ModelCache
    hidden: mx.array  # [T, M, E]
    before: ModelCache  # the cache the rows were run on
    chunks: list  # per-layer ChunkRows: the cache after any first n rows

class Session:
    """One timeline: tokens, KV cache, logits of the next token.

    Args:
        engine: the loaded model.
        ctx: context size in tokens (the cache capacity).
        prefill_chunk: tokens per prefill step; chunks are aligned to absolute multiples of it.
        progress: called as progress(done, total) after each prefill chunk.
        use_mtp: keep the MTP head's cache in step with the trunk (default: when the engine has
            one). Off for sampled generation, where drafts would go unused.
    """

    def __init__(self, engine: Engine, ctx: int = DEFAULT_CTX, prefill_chunk: int | None = None,
                 progress: Callable[[int, int], None] | None = None, use_mtp: bool | None = None):
        if ctx < 2:
            raise SessionError(f"context size {ctx} is too small, expected at least 2")
        self.engine = engine
        self.config = engine.config
        self.ctx = ctx
        self.prefill_chunk = prefill_chunk or default_prefill_chunk(ctx)
        if self.prefill_chunk < 1:
            raise SessionError(f"prefill chunk {prefill_chunk} is invalid, expected at least 1")
        self.progress = progress
        self.use_mtp = engine.mtp is not None if use_mtp is None else use_mtp and engine.mtp is not None
        self._checkpoints: list[Snapshot] = []
        self.invalidate()

    # -- state -----------------------------------------------------------------------------------

    @property
    def valid(self) -> bool:
        return self._state.logits is not None

    @property
    def tokens(self) -> list[int]:
        return list(self._state.tokens)

    @property
    def pos(self) -> int:
        return len(self._state.tokens)

    @property
    def logits(self) -> mx.array:
        """Logits [V] of the next token (float32)."""
        self._require_logits()
        return self._state.logits

    @property
    def hidden(self) -> mx.array | None:
        """The trunk's final HC state [M, E] at the last position (the MTP head's input)."""
        return self._state.hidden

    @property
    def mtp_cache(self) -> ModelCache | None:
        return self._state.mtp_cache

    @property
    def mtp_hidden(self) -> mx.array | None:
        """The MTP block's output HC state of its last row (same-position pairing only)."""
        return self._state.mtp_hidden

    def _set(self, state: Snapshot) -> None:
        """Evaluate a new state, then make it current: an interruption leaves the old one."""
        mx.eval(*state.arrays())
        self._state = state

    def invalidate(self) -> None:
        """Forget everything; the next sync prefills from scratch."""
        mtp = self.engine.mtp.empty_cache(self.ctx) if self.use_mtp else None
        self._state = Snapshot((), ModelCache.empty(self.config, self.ctx), None, None, mtp)

    def _require_logits(self) -> None:
        if not self.valid:
            raise SessionError("the session has no logits: sync a prompt first")

    # -- stepping ---------------------------------------------------------------------------------

    def _advanced(self, tokens: tuple[int, ...], logits: mx.array, cache: ModelCache, X: mx.array) -> Snapshot:
        """The state after committing `tokens` whose forward gave (last logits, cache, HC rows X).

        The MTP cache gets the rows that became complete: position q pairs h_q with token q+1,
        so the new rows run from the old last position to the new second-to-last. (With the
        same-position diagnostic pairing, row q pairs h_q with token q: every new row.)"""
        old = self._state
        mtp_cache, mtp_hidden = old.mtp_cache, None
        if mtp_cache is not None and same_position_pairing():
            _, mtp_cache, M = self.engine.mtp.forward(X, tokens, mtp_cache, head=False)
            mtp_hidden = M[-1]
        elif mtp_cache is not None:
            hidden = X[:-1] if old.hidden is None else mx.concatenate([old.hidden[None], X[:-1]])
            paired = tokens if old.hidden is not None else tokens[1:]
            if paired:
                _, mtp_cache, _ = self.engine.mtp.forward(hidden, paired, mtp_cache, head=False)
        return Snapshot(old.tokens + tokens, cache, logits, X[-1], mtp_cache, mtp_hidden)

    def _run(self, tokens: list[int]) -> None:
        """Feed tokens after the current state in one forward and commit the result."""
        logits, cache, X = self.engine.model.forward(tokens, self._state.cache)
        self._set(self._advanced(tuple(tokens), logits[-1], cache, X))

    def eval(self, token: int) -> None:
        """Decode one token at the next position."""
        self._require_logits()
        if self.pos + 1 >= self.ctx:
            raise SessionError(f"context is full ({self.ctx} tokens)")
        self._run([int(token)])

    def verify(self, rows: list[int]) -> Verified:
        """Run rows after the current state in one M-row pass without committing: the greedy
        token after each row and whether its logits are finite come back in one host sync."""
        self._require_logits()
        if self.pos + len(rows) >= self.ctx:
            raise SessionError(f"{len(rows)} rows do not fit the context left ({self.ctx - self.pos - 1})")
        before = self._state.cache
        logits, cache, X, chunks = self.engine.model.run(rows, before, all_logits=True)
        finite = mx.all(mx.isfinite(logits), axis=-1)
        top = mx.argmax(logits, axis=-1)
        mx.eval(top, finite, logits, X, *cache.arrays())
        return Verified(tuple(rows), top.tolist(), finite.tolist(), logits, cache, X, before, chunks)

    def accept(self, v: Verified, n: int) -> None:
        """Commit the first n rows of a verified pass: its logits and hidden rows, and the cache
        after n rows (the pass's own for all rows; for fewer, built from the rows it kept, with
        no second pass)."""
        if n <= 0:
            return
        if v.before is not self._state.cache:
            raise SessionError("the verified rows were run on another state")
        cache = v.cache if n == len(v.tokens) else self.engine.model.cache_after(v.before, v.chunks, n)
        self._set(self._advanced(v.tokens[:n], v.logits[n - 1], cache, v.hidden[:n]))

    def sync(self, tokens) -> None:
        """Bring the state to exactly `tokens`: reuse the live prefix (or the longest remembered
        snapshot that is a prefix), extend it with chunked prefill, or rebuild from scratch."""
        tokens = tuple(int(t) for t in tokens)
        if not tokens:
            raise SessionError("cannot sync an empty prompt")
        if len(tokens) >= self.ctx:
            raise SessionError(f"prompt of {len(tokens)} tokens exceeds the context of {self.ctx} tokens")
        if not (self.valid and tokens[:self.pos] == self._state.tokens):
            best = max((s for s in self._checkpoints if tokens[:len(s.tokens)] == s.tokens),
                       key=lambda s: len(s.tokens), default=None)
            if best is not None:
                self.restore(best)
            else:
                self.invalidate()
        start, total = self.pos, len(tokens)
        while self.pos < total:
            # Chunks end on absolute multiples of the chunk size, so a resumed prefill finalises
            # compressor rows in the same grouping as a cold one.
            end = min(total, (self.pos // self.prefill_chunk + 1) * self.prefill_chunk)
            self._run(list(tokens[self.pos:end]))
            if self.progress is not None:
                self.progress(self.pos - start, total - start)

    # -- snapshots --------------------------------------------------------------------------------

    def snapshot(self) -> Snapshot:
        """The current state (cheap: references to immutable arrays), remembered for rewind."""
        snap = self._state
        if self.valid:
            self._checkpoints = [s for s in self._checkpoints if s.tokens != snap.tokens][-(MAX_CHECKPOINTS - 1):]
            self._checkpoints.append(snap)
        return snap

    def restore(self, snap: Snapshot) -> None:
        if snap.logits is None:
            self.invalidate()
            return
        if snap.cache.ctx != self.ctx:
            raise SessionError(f"snapshot was taken with ctx {snap.cache.ctx}, this session has {self.ctx}")
        if (snap.mtp_cache is not None) != self.use_mtp:
            raise SessionError("snapshot was taken with the MTP head " + ("off" if self.use_mtp else "on"))
        self._state = snap

    def rewind(self, n: int) -> bool:
        """Drop the last n tokens by restoring a remembered snapshot of exactly that prefix.

        Returns True when a real earlier state was restored; otherwise the session is
        invalidated (the next sync rebuilds) and False is returned. Never truncates tokens
        over a cache that still holds them."""
        if n < 0 or n > self.pos:
            raise SessionError(f"cannot rewind {n} tokens of {self.pos}")
        if n == 0:
            return self.valid
        target = self._state.tokens[:self.pos - n]
        for s in reversed(self._checkpoints):
            if s.tokens == target:
                self.restore(s)
                return True
        self.invalidate()
        return False

    # -- reading the distribution -------------------------------------------------------------------

    def argmax(self, exclude: int | None = None) -> int:
        """Greedy next token: the lowest id among the maxima, optionally never `exclude` (the
        benchmark skips EOS). Non-finite logits are an error, never a silent token 0 (#750)."""
        self._require_logits()
        logits = self._state.logits
        if not bool(mx.all(mx.isfinite(logits))):
            raise SessionError("non-finite logits")
        if exclude is not None:
            logits = mx.where(mx.arange(logits.shape[0]) == exclude, float("-inf"), logits)
        return int(mx.argmax(logits))

    def top_logprobs(self, k: int) -> list[tuple[int, float, float]]:
        """The k most likely next tokens as (id, logit, logprob), descending (log-softmax in float64)."""
        self._require_logits()
        logits = np.asarray(self._state.logits, dtype=np.float64)
        finite = np.isfinite(logits)
        m = logits[finite].max()
        lse = m + np.log(np.sum(np.exp(logits[finite] - m)))
        order = np.argsort(-np.where(finite, logits, -np.inf), kind="stable")[:k]
        return [(int(i), float(logits[i]), float(logits[i] - lse)) for i in order]

    def sample(self, sampler: "Sampler") -> int:
        self._require_logits()
        return sampler(self._state.logits)

    # -- persistence ------------------------------------------------------------------------------

    def payload_bytes(self) -> int:
        """Size of the saved KV payload (`kvcache_bytes` in ds4-bench terms)."""
        return self.config.kv_payload_bytes(self.pos)

    def save(self, path: str) -> None:
        """Write the session to `path` (atomically): a header fingerprinting the model, then the
        payload, then its sha256."""
        self._require_logits()
        payload = self._payload()
        header = SAVE_MAGIC + struct.pack("<I", SAVE_VERSION) + self.engine.fingerprint()
        with atomic_write(path) as f:
            f.write(header + payload + hashlib.sha256(header + payload).digest())

    def load(self, path: str) -> None:
        """Load a saved session; a file for another model, corrupt or truncated is refused with a
        clear error and the current state is kept."""
        try:
            data = open(path, "rb").read()
        except OSError as e:
            raise SessionError(f"{path}: cannot read saved session: {e.strerror}") from None
        head = len(SAVE_MAGIC) + 4 + 32
        if data[:len(SAVE_MAGIC)] != SAVE_MAGIC and not SAVE_MAGIC.startswith(data):
            raise SessionError(f"{path}: not a ds4 saved session, expected magic {SAVE_MAGIC!r}")
        if len(data) < head + 32:
            raise SessionError(f"{path}: saved session is truncated ({len(data)} bytes)")
        (version,) = struct.unpack_from("<I", data, len(SAVE_MAGIC))
        if version != SAVE_VERSION:
            raise SessionError(f"{path}: saved session version {version}, expected {SAVE_VERSION}")
        if data[len(SAVE_MAGIC) + 4:head] != self.engine.fingerprint():
            raise SessionError(f"{path}: saved session belongs to another model or quantization, "
                               f"expected one saved with {self.engine.file.path}")
        if hashlib.sha256(data[:-32]).digest() != data[-32:]:
            raise SessionError(f"{path}: saved session is corrupt (checksum mismatch)")
        self._load_payload(path, memoryview(data)[head:-32])

    # The payload follows ds4's session payload (v1) field order, so kvcache_bytes matches ds4-bench.

    def _payload(self) -> bytes:
        c, n = self.config, self.pos
        raw_live = min(n, c.n_swa)
        layers = self._state.cache.layers
        n_comp = [n // c.ratio(il) if c.ratio(il) else 0 for il in range(c.n_layer)]
        n_index = [n_comp[il] if c.ratio(il) == 4 else 0 for il in range(c.n_layer)]
        parts = [struct.pack("<13I", PAYLOAD_MAGIC, 1, self.ctx, self.prefill_chunk,
                             c.raw_cap(self.ctx, self.prefill_chunk), c.n_swa, self.ctx // 4 + 2, n,
                             c.n_layer, c.head_dim, c.indexer_head_dim, c.n_vocab, raw_live),
                 np.asarray(self._state.tokens, np.uint32).tobytes(),
                 np.asarray(self._state.logits, np.float32).tobytes(),
                 np.asarray(n_comp, np.uint32).tobytes(), np.asarray(n_index, np.uint32).tobytes()]
        arrays = []
        for il, lc in enumerate(layers):
            arrays.append(lc.raw[c.n_swa - raw_live:])
            for state, count in ((lc.comp, n_comp[il]), (lc.index, n_index[il])):
                if state is not None:
                    arrays += [state.rows[:count], state.kv, state.score]
        parts += [np.asarray(a, np.float32).tobytes() for a in arrays]
        return b"".join(parts)

    def _load_payload(self, path: str, buf: memoryview) -> None:
        c = self.config
        try:
            head = struct.unpack_from("<13I", buf, 0)
        except struct.error:
            raise SessionError(f"{path}: saved session is truncated") from None
        magic, version, ctx, chunk, _, window, _, n, n_layer, head_dim, index_dim, vocab, raw_live = head
        if (magic, version) != (PAYLOAD_MAGIC, 1):
            raise SessionError(f"{path}: bad payload header, expected a v1 DS4 session payload")
        if (n_layer, head_dim, index_dim, vocab, window) != (c.n_layer, c.head_dim, c.indexer_head_dim,
                                                             c.n_vocab, c.n_swa):
            raise SessionError(f"{path}: saved session has other model dimensions")
        if n >= self.ctx or n < 1:
            raise SessionError(f"{path}: saved session holds {n} tokens, expected 1..{self.ctx - 1} for this context")
        if raw_live != min(n, c.n_swa):
            raise SessionError(f"{path}: saved session has {raw_live} raw rows, expected {min(n, c.n_swa)}")
        pos = 13 * 4

        def take(count: int, dtype, shape=None) -> np.ndarray:
            nonlocal pos
            nbytes = count * np.dtype(dtype).itemsize
            if pos + nbytes > len(buf):
                raise SessionError(f"{path}: saved session is truncated")
            a = np.frombuffer(buf, dtype=dtype, count=count, offset=pos)
            pos += nbytes
            return a.reshape(shape) if shape else a

        tokens = take(n, np.uint32)
        logits = take(c.n_vocab, np.float32)
        n_comp, n_index = take(c.n_layer, np.uint32), take(c.n_layer, np.uint32)
        empty = ModelCache.empty(c, self.ctx)
        layers = []
        for il, lc in enumerate(empty.layers):
            rows = take(raw_live * c.head_dim, np.float32, (raw_live, c.head_dim))
            raw = mx.concatenate([lc.raw[:c.n_swa - raw_live], mx.array(rows)], axis=0)
            states = []
            for state, count, width in ((lc.comp, n_comp[il], c.head_dim), (lc.index, n_index[il], c.indexer_head_dim)):
                if state is None:
                    states.append(None)
                    continue
                r = c.ratio(il)
                if count != n // r:
                    raise SessionError(f"{path}: layer {il} has {count} compressed rows, expected {n // r}")
                got = take(int(count) * width, np.float32, (int(count), width))
                kv = take(state.kv.size, np.float32, state.kv.shape)
                score = take(state.score.size, np.float32, state.score.shape)
                rows_all = mx.slice_update(state.rows, mx.array(got), mx.array([0]), axes=(0,)) if count else state.rows
                states.append(CompressorState(rows_all, mx.array(kv), mx.array(score)))
            layers.append(LayerCache(raw, *states))
        if pos != len(buf):
            raise SessionError(f"{path}: saved session has {len(buf) - pos} trailing bytes")
        cache = ModelCache(int(n), self.ctx, tuple(layers))
        # The trunk's HC state is not part of the payload (as in ds4): MTP rows restart after it.
        mtp = self.engine.mtp.empty_cache(self.ctx, start=int(n)) if self.use_mtp else None
        self._set(Snapshot(tuple(int(t) for t in tokens), cache, mx.array(logits), None, mtp))


SAVE_MAGIC = b"DS4SESS\0"
SAVE_VERSION = 1
PAYLOAD_MAGIC = 0x34565344  # "DSV4"


@dataclass(frozen=True)
class Sampler:
    """Temperature / top-k / top-p / min-p sampling on the device; temperature 0 is greedy.

    Each call draws from the next key of a seeded stream, so a run is reproducible."""

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.05
    seed: int | None = None

    def __post_init__(self):
        object.__setattr__(self, "_key", [mx.random.key(self.seed if self.seed is not None
                                                        else int.from_bytes(os.urandom(4), "little"))])

    def __call__(self, logits: mx.array) -> int:
        if not bool(mx.all(mx.isfinite(logits))):
            raise SessionError("non-finite logits")
        if self.temperature <= 0:
            return int(mx.argmax(logits))
        key, sub = mx.random.split(self._key[0])
        self._key[0] = key
        x = logits.astype(mx.float32) / self.temperature
        if self.top_k > 0 and self.top_k < x.shape[-1]:
            kth = mx.sort(x)[-self.top_k]
            x = mx.where(x < kth, float("-inf"), x)
        probs = mx.softmax(x, precise=True)
        if self.min_p > 0:
            x = mx.where(probs < self.min_p * mx.max(probs), float("-inf"), x)
        if self.top_p < 1.0:
            order = mx.argsort(-x)
            sorted_p = mx.softmax(x[order], precise=True)
            keep_sorted = (mx.cumsum(sorted_p) - sorted_p) < self.top_p  # always keeps the first
            keep = mx.zeros(x.shape, mx.bool_)
            keep = mx.put_along_axis(keep, order, keep_sorted, axis=-1)
            x = mx.where(keep, x, float("-inf"))
        return int(mx.random.categorical(x, key=sub))
