"""Engine (a loaded model) and Session (one inference timeline over it).

Invariant of a Session: `tokens`, the step state and `logits` always describe the same prefix
(the state holds exactly positions 0..len(tokens)-1 and `logits` is the next-token distribution
after them), or the session is marked invalid and the next `sync` rebuilds. State changes are
committed only after a step has been fully evaluated, so an exception or Ctrl+C in the middle of
a step leaves the previous consistent state in place.

Snapshots are cheap: a state's per-layer arrays are immutable values (a snapshot holds
references) and the compressed rows live in the session's append-only row store, shared by every
state (see state.py). A snapshot whose rows were overwritten since (a rewind and a different
continuation) no longer serves: restoring it rebuilds its tokens instead, never silently uses
wrong rows. The session remembers the snapshots it handed out (the most recent few) so that
`rewind` and `sync` can return to a real earlier state instead of recomputing.
"""

from __future__ import annotations

import hashlib
import os
import struct
from dataclasses import dataclass, field
from typing import Callable

import mlx.core as mx
import numpy as np

from ds4.atomic import atomic_write
from ds4.config import LayerKind
from ds4.errors import Ds4Error
from ds4.loader import ModelFile, open_model, open_mtp
from ds4.model import MAX_VERIFY_ROWS, Model, StepOut
from ds4.mtp import MTPHead, MTPState
from ds4.numerics import NEG_INF, Numerics
from ds4.state import Frontier, LayerState, StepState, frontier_rows

DEFAULT_CTX = 32768
MAX_CHECKPOINTS = 4
SAVE_MAGIC = b"DS4SESS\0"
SAVE_VERSION = 1
PAYLOAD_MAGIC = 0x34565344  # "DSV4"


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
        self.file = model_file or open_model(model_path)
        self.config = self.file.config
        self.tokenizer = self.file.tokenizer()
        self.model = Model.load(self.file, numerics)
        self.mtp_file = open_mtp(mtp_path, self.config) if mtp_path else None
        self.mtp = MTPHead.load(self.mtp_file, self.model, numerics) if mtp_path else None

    @property
    def row_invariant(self) -> bool:
        """Whether a verify pass computes every row exactly as a 1-row decode step does, so a
        batched verify is bit-identical to plain decode. The decode and verify widths are traced
        with every per-token product of its own shape (`kernels.row_invariant`), which makes
        them so on the CPU with any BLAS (proven by the verify-vs-decode tests); GPU kernels
        pick other reductions for other batch sizes until proven otherwise."""
        return mx.default_device() == mx.cpu

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
    state: StepState
    logits: mx.array | None  # next-token logits [V]; None: the state is invalid
    hidden: mx.array | None  # trunk's final HC state [M, E] at the last position
    mtp: MTPState | None = None  # the MTP block's rows (when the session keeps them)
    argmax: int | None = None  # greedy next token, when the logits are all finite
    finite: bool = True

    def arrays(self) -> list[mx.array]:
        out = self.state.arrays() + [a for a in (self.logits, self.hidden) if a is not None]
        return out + (self.mtp.arrays() if self.mtp is not None else [])


@dataclass(frozen=True)
class Verified:
    """An evaluated, uncommitted forward over draft rows (see Session.verify)."""

    tokens: tuple[int, ...]
    argmax: list[int]  # greedy token after each row
    finite: list[bool]  # whether each row's logits are all finite
    out: StepOut
    before: Snapshot  # the state the rows were run on


class Session:
    """One timeline: tokens, step state, logits of the next token.

    Args:
        engine: the loaded model.
        ctx: context size in tokens (the state's capacity).
        prefill_chunk: tokens per prefill step; chunks are aligned to absolute multiples of it.
        progress: called as progress(done, total) after each prefill chunk.
        use_mtp: keep the MTP head's rows in step with the trunk (default: when the engine has
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
        self._empty = engine.model.empty_state(ctx, max(self.prefill_chunk, MAX_VERIFY_ROWS))
        self.store = self._empty.store
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
    def mtp(self) -> MTPState | None:
        return self._state.mtp

    @property
    def state(self) -> StepState:
        return self._state.state

    def invalidate(self) -> None:
        """Forget the live state; the next sync prefills (remembered snapshots stay usable)."""
        mtp = MTPState.empty(self.engine.mtp, self.ctx) if self.use_mtp else None
        self._state = Snapshot((), self._empty, None, None, mtp)

    def _require_logits(self) -> None:
        if not self.valid:
            raise SessionError("the session has no logits: sync a prompt first")

    # -- stepping ---------------------------------------------------------------------------------

    def _commit(self, snap: Snapshot, out: StepOut, row: int, p0: int | None, tokens) -> None:
        """Evaluate a new state (one graph, one async_eval; the host waits only for the greedy
        token and the finiteness flag), record its rows in the store, then make it current: an
        interruption leaves the old one. `row` picks the logits row the snapshot keeps."""
        try:
            mx.async_eval(*snap.arrays(), out.argmax, out.finite, *self.store.arrays())
            finite = bool(out.finite.tolist()[row])
            argmax = int(out.argmax.tolist()[row]) if finite else None
        except Exception:
            self._lose_rows()
            raise
        if p0 is not None:
            self.store.record(p0, tokens)
        self._state = Snapshot(snap.tokens, snap.state, snap.logits, snap.hidden, snap.mtp, argmax, finite)

    def _lose_rows(self) -> None:
        """After a failed evaluation the shared rows may be half-written: nothing that reads them
        can be trusted. Start over (remembered snapshots stop serving)."""
        self.store.reset()
        self._checkpoints.clear()
        self.invalidate()

    def _advanced(self, tokens: tuple[int, ...], out: StepOut, row: int, state: StepState, hidden: mx.array) -> Snapshot:
        """The snapshot after committing `tokens` whose step gave `out` (logits row `row`), with
        the trunk state `state` and HC rows `hidden` [n, M, E]; the MTP rows follow (lazily)."""
        old = self._state
        mtp = old.mtp.advanced(self.engine.mtp, old.hidden, hidden, tokens) if old.mtp is not None else None
        return Snapshot(old.tokens + tokens, state, out.logits[row], hidden[-1], mtp)

    def _run(self, tokens: list[int]) -> None:
        """Feed tokens after the current state in one step and commit the result."""
        p0 = self.pos
        out = self.engine.model.step(tokens, self._state.state)
        self._commit(self._advanced(tuple(tokens), out, -1, out.state, out.hidden), out, -1, p0, tokens)

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
        if len(rows) > MAX_VERIFY_ROWS:
            raise SessionError(f"{len(rows)} verify rows, expected at most {MAX_VERIFY_ROWS}")
        before, p0 = self._state, self.pos
        out = self.engine.model.step(rows, before.state, all_logits=True)
        try:
            mx.eval(*out.arrays())
        except Exception:
            self._lose_rows()
            raise
        self.store.record(p0, rows)
        return Verified(tuple(int(t) for t in rows), out.argmax.tolist(), out.finite.tolist(), out, before)

    def accept(self, v: Verified, n: int) -> None:
        """Commit the first n rows of a verified pass: its logits and hidden rows, and the state
        after n rows (the pass's own for all rows; for fewer, built from the rows it kept, with
        no second pass)."""
        if n <= 0:
            return
        if v.before is not self._state:
            raise SessionError("the verified rows were run on another state")
        model = self.engine.model
        state = v.out.state if n == len(v.tokens) else model.state_after(v.before.state, v.out.chunks, n)
        self._commit(self._advanced(v.tokens[:n], v.out, n - 1, state, v.out.hidden[:n]), v.out, n - 1, None, ())

    def sync(self, tokens) -> None:
        """Bring the state to exactly `tokens`: reuse the live prefix (or the longest remembered
        snapshot that is a prefix and still serves), extend it with chunked prefill, or rebuild
        from scratch."""
        tokens = tuple(int(t) for t in tokens)
        if not tokens:
            raise SessionError("cannot sync an empty prompt")
        if len(tokens) >= self.ctx:
            raise SessionError(f"prompt of {len(tokens)} tokens exceeds the context of {self.ctx} tokens")
        if not (self.valid and tokens[:self.pos] == self._state.tokens and self.store.serves(self._state.tokens)):
            best = max((s for s in self._checkpoints if tokens[:len(s.tokens)] == s.tokens and self.store.serves(s.tokens)),
                       key=lambda s: len(s.tokens), default=None)
            if best is not None:
                self._state = best
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

    def restore(self, snap: Snapshot) -> bool:
        """Return to a snapshot of this session. Returns True when its state was reused as it
        is; False when its rows had been overwritten since and its tokens were rebuilt (the
        result is the same state, computed again)."""
        if snap.logits is None:
            self.invalidate()
            return True
        if snap.state.store is not self.store:
            raise SessionError("the snapshot belongs to another session")
        if (snap.mtp is not None) != self.use_mtp:
            raise SessionError("snapshot was taken with the MTP head " + ("off" if self.use_mtp else "on"))
        if self.store.serves(snap.tokens):
            self._state = snap
            return True
        self.invalidate()
        self.sync(snap.tokens)
        return False

    def rewind(self, n: int) -> bool:
        """Drop the last n tokens by restoring a remembered snapshot of exactly that prefix.

        Returns True when a real earlier state was restored; otherwise the session is
        invalidated (the next sync rebuilds) and False is returned. Never truncates tokens
        over a state that still holds them."""
        if n < 0 or n > self.pos:
            raise SessionError(f"cannot rewind {n} tokens of {self.pos}")
        if n == 0:
            return self.valid
        target = self._state.tokens[:self.pos - n]
        for s in reversed(self._checkpoints):
            if s.tokens == target and self.store.serves(s.tokens):
                self._state = s
                return True
        self.invalidate()
        return False

    # -- reading the distribution -------------------------------------------------------------------

    def argmax(self, exclude: int | None = None) -> int:
        """Greedy next token: the lowest id among the maxima, optionally never `exclude` (the
        benchmark skips EOS). Non-finite logits are an error, never a silent token 0 (#750)."""
        self._require_logits()
        if not self._state.finite:
            raise SessionError("non-finite logits")
        if exclude is None or exclude != self._state.argmax:
            return self._state.argmax
        logits = self._state.logits
        return int(mx.argmax(mx.where(mx.arange(logits.shape[0]) == exclude, NEG_INF, logits)))

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
        state = self._state.state
        kinds = [c.layer_kind(il) for il in range(c.n_layer)]
        n_comp = [n // k.ratio if k.ratio else 0 for k in kinds]
        n_index = [n_comp[il] if k is LayerKind.INDEXED else 0 for il, k in enumerate(kinds)]
        parts = [struct.pack("<13I", PAYLOAD_MAGIC, 1, self.ctx, self.prefill_chunk,
                             c.raw_cap(self.ctx, self.prefill_chunk), c.n_swa, self.ctx // 4 + 2, n,
                             c.n_layer, c.head_dim, c.indexer_head_dim, c.n_vocab, raw_live),
                 np.asarray(self._state.tokens, np.uint32).tobytes(),
                 np.asarray(self._state.logits, np.float32).tobytes(),
                 np.asarray(n_comp, np.uint32).tobytes(), np.asarray(n_index, np.uint32).tobytes()]
        arrays = []
        for il, ls in enumerate(state.layers):
            arrays.append(ls.raw[c.n_swa - raw_live:])
            for frontier, store, count in ((ls.comp, self.store.comp[il], n_comp[il]),
                                           (ls.index, self.store.index[il], n_index[il])):
                if frontier is not None:
                    arrays += [store[:count], *_frontier_to_payload(frontier, n, kinds[il])]
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
        layers, rows = [], {}
        for il, ls in enumerate(self._empty.layers):
            raw = take(raw_live * c.head_dim, np.float32, (raw_live, c.head_dim))
            raw = mx.concatenate([ls.raw[:c.n_swa - raw_live], mx.array(raw)], axis=0)
            fronts = []
            kind = c.layer_kind(il)
            for key, frontier, count, width in (("comp", ls.comp, n_comp[il], c.head_dim),
                                                ("index", ls.index, n_index[il], c.indexer_head_dim)):
                if frontier is None:
                    fronts.append(None)
                    continue
                if count != n // kind.ratio:
                    raise SessionError(f"{path}: layer {il} has {count} compressed rows, expected {n // kind.ratio}")
                rows[key, il] = take(int(count) * width, np.float32, (int(count), width))
                shape = (frontier_rows(kind), frontier.kv.shape[1])
                kv, score = take(int(np.prod(shape)), np.float32, shape), take(int(np.prod(shape)), np.float32, shape)
                fronts.append(_frontier_from_payload(kv, score, int(n), kind))
            layers.append(LayerState(raw, *fronts))
        if pos != len(buf):
            raise SessionError(f"{path}: saved session has {len(buf) - pos} trailing bytes")
        # Everything checked: write the rows into the store, then take the state.
        comp, index = self.store.take(0)
        for (key, il), got in rows.items():
            target = comp if key == "comp" else index
            if len(got):
                target[il] = mx.slice_update(target[il], mx.array(got), mx.array([0]), axes=(0,))
        self.store.put(comp, index)
        del comp, index, target
        tokens = tuple(int(t) for t in tokens)
        state = StepState(int(n), self.ctx, tuple(layers), self.store)
        # The trunk's HC state is not part of the payload (as in ds4): MTP rows restart after it.
        mtp = MTPState.empty(self.engine.mtp, self.ctx, start=int(n)) if self.use_mtp else None
        snap = Snapshot(tokens, state, mx.array(logits), None, mtp)
        finite = mx.all(mx.isfinite(snap.logits))
        top = mx.argmax(snap.logits)
        mx.eval(*snap.arrays(), *self.store.arrays(), finite, top)
        self.store.record(0, tokens)
        self._state = Snapshot(tokens, state, snap.logits, None, mtp, int(top) if bool(finite) else None, bool(finite))


def _frontier_to_payload(f: Frontier, n: int, kind: LayerKind) -> tuple[mx.array, mx.array]:
    """A frontier (positions n-R..n-1) in ds4's layout: ratio 4 rows 0-3 the previous window,
    4-7 the current one; ratio 128 row j the current window's position 128w + j; unfilled rows
    (positions >= n or < 0) kv 0, score -inf."""
    R, ratio = frontier_rows(kind), kind.ratio
    start = ratio - n % ratio  # our index of the first position the payload holds
    empty = Frontier.empty(ratio, f.kv.shape[1])
    return (mx.concatenate([f.kv, empty.kv])[start:start + R],
            mx.concatenate([f.score, empty.score])[start:start + R])


def _frontier_from_payload(kv: np.ndarray, score: np.ndarray, n: int, kind: LayerKind) -> Frontier:
    """The inverse of `_frontier_to_payload` (positions the payload lacks come back unfilled)."""
    R, ratio = frontier_rows(kind), kind.ratio
    empty = Frontier.empty(ratio, kv.shape[1])
    f = n % ratio
    return Frontier(mx.concatenate([empty.kv, mx.array(kv)])[f:f + R],
                    mx.concatenate([empty.score, mx.array(score)])[f:f + R])


@dataclass
class Sampler:
    """Temperature / top-k / top-p / min-p sampling on the device; temperature 0 is greedy.

    Stateful: each call draws with the next key of a stream seeded by `seed` (`key` advances), so
    a run is reproducible and two samplers with one seed draw the same tokens."""

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.05
    seed: int | None = None
    key: mx.array = field(init=False, repr=False, compare=False)  # the stream's next key

    def __post_init__(self):
        self.key = mx.random.key(self.seed if self.seed is not None else int.from_bytes(os.urandom(4), "little"))

    def __call__(self, logits: mx.array) -> int:
        if not bool(mx.all(mx.isfinite(logits))):
            raise SessionError("non-finite logits")
        if self.temperature <= 0:
            return int(mx.argmax(logits))
        self.key, sub = mx.random.split(self.key)
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
