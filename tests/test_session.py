"""Session invariants: tokens, caches and logits agree after any sequence of operations, snapshots
and rewinds restore real states, saved sessions refuse the wrong model or corrupt bytes."""

from __future__ import annotations

import os

import mlx.core as mx
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from ds4 import synth
from ds4.config import ModelConfig
from ds4.session import Engine, Sampler, Session, SessionError

CTX = 256


@pytest.fixture(scope="module")
def engine(tiny_paths):
    return Engine(str(tiny_paths[0]))


def fresh_logits(engine, tokens, chunk=64):
    s = Session(engine, CTX, chunk)
    s.sync(tokens)
    return np.array(s.logits)


def close(a, b):
    np.testing.assert_allclose(np.array(a), np.array(b), atol=1e-4, rtol=0)


token = st.integers(3, 1000)
op = st.one_of(
    st.tuples(st.just("sync_extend"), st.lists(token, min_size=1, max_size=12)),
    st.tuples(st.just("sync_new"), st.lists(token, min_size=1, max_size=40)),
    st.tuples(st.just("sync_prefix"), st.integers(1, 30)),
    st.tuples(st.just("eval"), token),
    st.tuples(st.just("snapshot"), st.just(0)),
    st.tuples(st.just("restore"), st.integers(0, 10)),
    st.tuples(st.just("rewind"), st.integers(0, 6)),
    st.tuples(st.just("invalidate"), st.just(0)),
)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=st.lists(op, min_size=1, max_size=10), chunk=st.sampled_from([5, 16, 64]))
def test_random_operations_match_a_fresh_session(engine, ops, chunk):
    s = Session(engine, CTX, chunk)
    snaps = []
    for kind, arg in ops:
        if kind == "sync_extend":
            s.sync((s.tokens if s.valid else [0]) + arg)
        elif kind == "sync_new":
            s.sync([0] + arg)
        elif kind == "sync_prefix" and s.valid:
            s.sync(s.tokens[:max(1, min(arg, s.pos))])
        elif kind == "eval" and s.valid:
            s.eval(arg)
        elif kind == "snapshot":
            snaps.append(s.snapshot())
        elif kind == "restore" and snaps:
            s.restore(snaps[arg % len(snaps)])
        elif kind == "rewind" and s.valid and arg < s.pos:
            target = s.tokens[:s.pos - arg]
            if s.rewind(arg):
                assert s.tokens == target
            else:
                assert not s.valid
        elif kind == "invalidate":
            s.invalidate()
        if s.valid:
            assert len(s.tokens) == s.pos
    if s.valid:
        close(s.logits, fresh_logits(engine, s.tokens))


def test_sync_reuses_prefix_and_aligns_chunks(engine):
    calls = []
    s = Session(engine, CTX, 16, progress=lambda done, total: calls.append((done, total)))
    s.sync([0] + list(range(10, 30)))  # 21 tokens: chunks 0-16, 16-21
    assert calls == [(16, 21), (21, 21)]
    calls.clear()
    s.sync(s.tokens + list(range(40, 60)))  # 41 tokens from 21: chunk ends at 32, then 41
    assert calls == [(11, 20), (20, 20)]
    close(s.logits, fresh_logits(engine, s.tokens, chunk=7))


def test_interrupted_sync_keeps_the_last_finished_chunk(engine):
    """Ctrl+C during a long prefill: the session holds the chunks already done, consistently."""
    def interrupt(done, total):
        if done >= 16:
            raise KeyboardInterrupt

    s = Session(engine, CTX, 8, progress=interrupt)
    prompt = [0] + list(range(50, 90))
    with pytest.raises(KeyboardInterrupt):
        s.sync(prompt)
    assert s.valid and s.tokens == prompt[:16]
    close(s.logits, fresh_logits(engine, prompt[:16]))
    s.progress = None
    s.sync(prompt)
    close(s.logits, fresh_logits(engine, prompt))


def test_rewind_restores_or_invalidates(engine):
    s = Session(engine, CTX, 32)
    s.sync([0, 5, 6, 7])
    snap = s.snapshot()
    s.eval(8)
    s.eval(9)
    assert s.rewind(2) and s.tokens == [0, 5, 6, 7]
    close(s.logits, snap.logits)
    s.eval(10)
    assert s.rewind(1) and s.tokens == [0, 5, 6, 7]  # the same snapshot serves again
    s.eval(10)
    assert not s.rewind(2)  # nothing remembered for [0, 5, 6]: invalidate, never truncate
    assert not s.valid and s.tokens == []
    with pytest.raises(SessionError, match="no logits"):
        s.argmax()


def test_snapshot_with_overwritten_rows_is_rebuilt_not_used(engine):
    """Compressed rows live in the session's store, shared by its states. After a return to an
    earlier state and a different continuation rewrote the rows a later snapshot reads,
    restoring that snapshot is detected and rebuilds its tokens: never silently wrong rows."""
    s = Session(engine, CTX, 16)
    a = [0] + list(range(100, 140))  # 41 tokens: ratio-4 rows 0..9
    s.sync(a[:20])
    early = s.snapshot()
    s.sync(a)
    late = s.snapshot()
    late_rows = np.array(s.store.comp[2][5:10])
    assert s.restore(early)  # its rows (windows 0..4) were never touched: reused as is
    s.sync(a[:20] + list(range(500, 521)))  # rewrites the rows of windows 5 on
    assert not np.array_equal(late_rows, np.array(s.store.comp[2][5:10]))
    assert not s.store.serves(late.tokens) and s.store.serves(early.tokens)
    assert s.restore(late) is False  # detected: rebuilt from `early`, the best state that serves
    assert s.tokens == a
    np.testing.assert_array_equal(np.array(s.logits), np.array(late.logits))
    np.testing.assert_array_equal(late_rows, np.array(s.store.comp[2][5:10]))
    assert s.restore(early) and s.tokens == a[:20]
    other = Session(engine, CTX, 16)
    with pytest.raises(SessionError, match="another session"):
        other.restore(late)


def test_context_limits(engine):
    s = Session(engine, 32, 8)
    with pytest.raises(SessionError, match="prompt of 32 tokens exceeds the context of 32"):
        s.sync([1] * 32)
    with pytest.raises(SessionError, match="empty prompt"):
        s.sync([])
    s.sync([0] * 30)
    s.eval(3)
    with pytest.raises(SessionError, match="context is full"):
        s.eval(4)


def test_save_load_round_trip_and_refusals(engine, tmp_path, tiny_vocab):
    s = Session(engine, CTX, 32)
    s.sync([0] + list(range(100, 240)))  # 141 tokens: every cache kind holds rows
    path = str(tmp_path / "s.ds4")
    s.save(path)
    assert os.path.getsize(path) == s.payload_bytes() + 8 + 4 + 32 + 32
    t = Session(engine, CTX, 32)
    t.load(path)
    assert t.tokens == s.tokens
    close(t.logits, s.logits)
    again = str(tmp_path / "again.ds4")
    t.save(again)  # the loaded state saves to the same bytes (frontiers converted both ways)
    assert open(again, "rb").read() == open(path, "rb").read()
    s.eval(7)
    t.eval(7)
    close(t.logits, s.logits)
    # Corrupt byte, truncation, wrong model: refused, state kept.
    data = bytearray(open(path, "rb").read())
    bad = tmp_path / "bad.ds4"
    data[5000] ^= 1
    bad.write_bytes(bytes(data))
    with pytest.raises(SessionError, match="corrupt"):
        t.load(str(bad))
    bad.write_bytes(bytes(data[:1000]))
    with pytest.raises(SessionError, match="corrupt|truncated"):
        t.load(str(bad))
    assert t.pos == 142
    other = tmp_path / "other.gguf"
    synth.write_preset("tiny", str(other), seed=99)
    u = Session(Engine(str(other)), CTX, 32)
    with pytest.raises(SessionError, match="another model"):
        u.load(path)
    small = Session(engine, 64, 32)
    with pytest.raises(SessionError, match="holds 141 tokens"):
        small.load(path)


def test_payload_size_formula_matches_ds4():
    """The saved payload of the mtp-session doc: 52,184,460 bytes at 2048 tokens, +28,188,672 per 2048 more."""
    c = ModelConfig()
    assert c.kv_payload_bytes(2048) == 52_184_460
    assert c.kv_payload_bytes(4096) - c.kv_payload_bytes(2048) == 28_188_672


def test_sampling(engine):
    s = Session(engine, CTX, 32)
    s.sync([0, 11, 12, 13])
    greedy = s.argmax()
    assert Sampler(temperature=0.0).__call__(s.logits) == greedy
    assert Sampler(temperature=1.0, top_k=1, seed=1)(s.logits) == greedy
    a = [Sampler(temperature=1.0, seed=5)(s.logits) for _ in range(3)]
    b = Sampler(temperature=1.0, seed=5)
    assert [b(s.logits) for _ in range(1)] == a[:1]
    draws = [Sampler(temperature=1.0, seed=i, min_p=0.2)(s.logits) for i in range(40)]
    probs = np.array(mx.softmax(s.logits))
    assert all(probs[d] >= 0.2 * probs.max() - 1e-9 for d in draws)
    assert len(set(draws)) > 1  # it does sample
    nucleus = [Sampler(temperature=1.0, seed=i, top_p=0.3, min_p=0.0)(s.logits) for i in range(40)]
    order = np.argsort(-probs)
    keep = order[:np.searchsorted(np.cumsum(probs[order]), 0.3) + 1]
    assert set(nucleus) <= set(keep.tolist())


def test_non_finite_logits_are_an_error_not_token_0(tiny_paths):
    """A step whose logits are not all finite (here: a NaN final norm weight) commits them, but
    the greedy token is an error, never a silent token 0 (#750)."""
    engine = Engine(str(tiny_paths[0]))
    engine.model.output_norm = mx.full(engine.model.output_norm.shape, float("nan"))
    s = Session(engine, CTX, 32)
    s.sync([0, 1, 2])
    assert not bool(mx.all(mx.isfinite(s.logits)))
    with pytest.raises(SessionError, match="non-finite"):
        s.argmax()


@pytest.mark.parametrize("start", [30, 125, 127])  # around the ratio-4 and ratio-128 boundaries
def test_partial_accept_equals_plain_steps(tiny_paths, start):
    """Committing the first n of m verified rows gives the state that n plain steps give: the
    cache after n rows comes from the pass's own rows (no second pass), bit for bit on a
    row-invariant backend, MTP rows included."""
    engine = Engine(str(tiny_paths[0]), mtp_path=str(tiny_paths[1]))
    assert engine.row_invariant
    prompt = np.random.default_rng(start).integers(3, 1000, start).tolist()
    rows = [7, 99, 400, 12, 5]
    for n in range(1, len(rows) + 1):
        s = Session(engine, CTX, use_mtp=True)
        s.sync(prompt)
        v = s.verify(rows)
        s.accept(v, n)
        ref = Session(engine, CTX, use_mtp=True)
        ref.sync(prompt)
        for t in rows[:n]:
            ref.eval(t)
        assert s.tokens == ref.tokens
        assert np.array_equal(np.array(s.logits), np.array(ref.logits))
        for a, b in zip(s._state.arrays(), ref._state.arrays()):
            assert np.array_equal(np.array(a), np.array(b))
    s = Session(engine, CTX)
    s.sync(prompt)
    v = s.verify(rows)
    s.eval(3)
    with pytest.raises(SessionError):
        s.accept(v, 2)
