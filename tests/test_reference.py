"""The float64 reference forward (ds4/reference.py): its building blocks against independent
transcriptions of ds4-forward.md, and the whole model on the tiny synthetic preset."""

from __future__ import annotations

import math

import numpy as np
import pytest

from ds4 import reference as ref
from ds4 import synth
from ds4.errors import Ds4Error
from ds4.layout import base_tensor_specs, mtp_tensor_specs
from ds4.loader import open_model, open_mtp

SEED = 11


# -- fixtures ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(config, base weights, MTP weights, base path) of the tiny preset."""
    d = tmp_path_factory.mktemp("ref-tiny")
    base, mtp = d / "tiny.gguf", d / "tiny-mtp.gguf"
    synth.write_preset("tiny", out=str(base), mtp_out=str(mtp), seed=SEED)
    model = open_model(str(base))
    mtp_weights = ref.load_reference_weights(open_mtp(str(mtp), model.config))
    return model.config, ref.load_reference_weights(model), mtp_weights, str(base)


def prompt(config, n, seed=0):
    return [int(t) for t in np.random.default_rng(seed).integers(0, config.n_vocab, n)]


@pytest.fixture(scope="module")
def long_run(tiny):
    """A 136-token decode (window wraps, ratio-4 rows exceed top-k, the ratio-128 layer emits once),
    recording each step's logits and per-layer (n_comp, selected count)."""
    config, w, _, _ = tiny
    model = ref.ReferenceModel(config, w)
    steps = []
    for t in prompt(config, 136, seed=1):
        logits = model.decode(t)
        steps.append((logits, [(c.n_comp, None if c.last_selected is None else len(c.last_selected))
                               for c in model.caches]))
    return model, steps


# -- E4M3 / E2M1 grids, enumerated from the format definitions ----------------------------------------

def e4m3_grid():
    """(value, mantissa) for every non-negative finite E4M3FN code."""
    out = [(m * 2.0 ** -9, m) for m in range(8)]  # exponent field 0: subnormals
    for e in range(1, 16):
        for m in range(8):
            if e == 15 and m == 7:
                continue  # NaN
            out.append((2.0 ** (e - 7) * (1 + m / 8), m))
    return out


def e2m1_grid():
    out = [(0.0, 0), (0.5, 1)]
    for e in range(1, 4):
        for m in range(2):
            out.append((2.0 ** (e - 1) * (1 + m / 2), m))
    return out


def brute_round(x, grid):
    """Nearest grid value by exhaustive search, ties to the even mantissa, saturating."""
    vals = np.array([v for v, _ in grid])
    mants = np.array([m for _, m in grid])
    a = min(abs(x), vals.max())
    d = np.abs(vals - a)
    best = np.flatnonzero(d == d.min())
    if len(best) > 1:
        best = [i for i in best if mants[i] % 2 == 0]
    return math.copysign(vals[best[0]], x) if x != 0 else 0.0


def grid_probe_values(grid, rng, n_random):
    vals = sorted(v for v, _ in grid)
    mids = [(a + b) / 2 for a, b in zip(vals, vals[1:])]
    rand = list(np.exp(rng.uniform(math.log(vals[1] / 4), math.log(vals[-1] * 1.2), n_random)))
    probes = vals + mids + [np.nextafter(m, 0) for m in mids] + [np.nextafter(m, 1e9) for m in mids] + rand
    probes += [vals[-1] * 1.5, 1e30]
    return np.array(probes + [-p for p in probes])


def test_e4m3_round_matches_enumerated_grid():
    grid = e4m3_grid()
    assert len(grid) == 127 and max(v for v, _ in grid) == 448.0
    x = grid_probe_values(grid, np.random.default_rng(0), 2000)
    got = ref.e4m3_round(x)
    want = np.array([brute_round(v, grid) for v in x])
    np.testing.assert_array_equal(got, want)
    assert ref.e4m3_round(np.array([1.0 + 1 / 16]))[0] == 1.0  # tie -> even mantissa (m=0)
    assert ref.e4m3_round(np.array([1.0 + 3 / 16]))[0] == 1.25  # tie between m=1 and m=2 -> m=2
    assert ref.e4m3_round(np.array([2.0 ** -10]))[0] == 0.0  # half the smallest subnormal -> 0


def test_e2m1_round_matches_enumerated_grid():
    grid = e2m1_grid()
    assert sorted(v for v, _ in grid) == list(ref.E2M1_GRID)
    x = grid_probe_values(grid, np.random.default_rng(1), 500)
    np.testing.assert_array_equal(ref.e2m1_round(x), [brute_round(v, grid) for v in x])
    np.testing.assert_array_equal(ref.e2m1_round(np.array([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0])),
                                  [0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0])


@pytest.mark.parametrize("kind", ["fp8", "fp4"])
def test_block_roundtrip_idempotent_and_on_grid(kind):
    rng = np.random.default_rng(2)
    if kind == "fp8":
        fn, block, vmax, grid = ref.fp8_e4m3_roundtrip, 64, 448.0, {v for v, _ in e4m3_grid()}
    else:
        fn, block, vmax, grid = ref.fp4_e2m1_roundtrip, 32, 6.0, {v for v, _ in e2m1_grid()}
    scales = np.exp(rng.uniform(-12, 12, (6, 1, 1)))
    x = (rng.standard_normal((6, 3, block)) * scales).reshape(6, 3 * block)
    x[0, :block] = 0.0  # an all-zero block: amax floor
    x[1, 5] = 1e6  # one outlier dominating its block
    y = fn(x)
    np.testing.assert_array_equal(fn(y), y)
    for xb, yb in zip(x.reshape(-1, block), y.reshape(-1, block)):
        amax = max(np.abs(xb).max(), 1e-4 if kind == "fp8" else 7.05e-38)
        scale = 2.0 ** math.ceil(math.log2(amax / vmax))
        assert set(np.abs(yb / scale)) <= grid
        assert np.abs(yb).max() <= vmax * scale
        # the largest element keeps its magnitude within one grid step (relative 1/8 resp. 1/2)
        i = np.argmax(np.abs(xb))
        assert abs(yb[i] - xb[i]) <= abs(xb[i]) * (0.0625 if kind == "fp8" else 0.25) + 1e-300


def test_kv_row_qat_quantizes_only_nope_dims(tiny):
    config = tiny[0]
    rng = np.random.default_rng(3)
    kv = rng.standard_normal(config.head_dim)
    n_nope = config.head_dim - config.n_rot
    row = ref.kv_row_qat(kv, config)
    np.testing.assert_array_equal(row, row.astype(np.float16).astype(np.float64))
    np.testing.assert_array_equal(row[:n_nope], ref.f16_round(ref.fp8_e4m3_roundtrip(kv[:n_nope])))
    np.testing.assert_array_equal(row[n_nope:], ref.f16_round(kv[n_nope:]))


def test_hadamard_is_sylvester_and_orthonormal():
    for n in (32, 128):
        H = np.array([[1.0]])
        while H.shape[0] < n:
            H = np.block([[H, H], [H, -H]])
        x = np.random.default_rng(n).standard_normal((3, n))
        np.testing.assert_allclose(ref.hadamard(x), x @ H.T / math.sqrt(n), atol=1e-12)
        np.testing.assert_allclose(ref.hadamard(ref.hadamard(x)), x, atol=1e-12)
        np.testing.assert_allclose(np.linalg.norm(ref.hadamard(x), axis=1), np.linalg.norm(x, axis=1))


# -- HC ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("spread", [0.1, 1.0, 2.0])
def test_sinkhorn_is_doubly_stochastic(spread):
    C0 = np.random.default_rng(4).standard_normal((4, 4)) * spread
    C = ref.sinkhorn(C0, 20, 1e-6)
    assert (C > 0).all()
    np.testing.assert_allclose(C.sum(axis=0), 1.0, atol=1e-5)  # the last step normalises columns
    np.testing.assert_allclose(C.sum(axis=1), 1.0, atol=1e-3)
    row_err = lambda n: np.abs(ref.sinkhorn(C0, n, 1e-6).sum(axis=1) - 1).max()  # noqa: E731
    assert row_err(60) <= row_err(20) <= row_err(5)
    # the first iteration is a row softmax (+eps) then a column normalisation
    S = np.exp(C0) / np.exp(C0).sum(axis=1, keepdims=True) + 1e-6
    np.testing.assert_allclose(ref.sinkhorn(C0, 1, 1e-6), S / (S.sum(axis=0) + 1e-6), rtol=1e-12)


def test_hc_split_ranges_and_post_direction(tiny):
    config = tiny[0]
    M = config.n_hc
    rng = np.random.default_rng(5)
    s = ref.hc_split(rng.standard_normal(config.hc_mix), np.array([1.0, 1.0, 1.0]),
                     rng.standard_normal(config.hc_mix), M, config.hc_sinkhorn_iters, config.hc_eps)
    assert ((s.pre > config.hc_eps) & (s.pre < 1 + config.hc_eps)).all()
    assert ((s.post > 0) & (s.post < 2)).all()
    # HC post: row i of C is the source stream, column j the destination
    X = rng.standard_normal((M, 8))
    perm = ref.HCSplit(np.ones(M), np.zeros(M), np.roll(np.eye(M), 1, axis=1))  # C[i][i+1] = 1
    out = ref.hc_post(X, np.ones(8), perm)
    np.testing.assert_array_equal(out[1], X[0])
    np.testing.assert_array_equal(out[0], X[M - 1])
    post_only = ref.HCSplit(np.ones(M), np.arange(M, dtype=float), np.zeros((M, M)))
    np.testing.assert_array_equal(ref.hc_post(X, np.ones(8), post_only), np.arange(M)[:, None] * np.ones(8))


def test_hc_pre_and_head_collapse_formulas(tiny):
    config, w, _, _ = tiny
    rng = np.random.default_rng(14)
    M, eps = config.n_hc, config.hc_eps
    X = rng.standard_normal((M, config.n_embd))
    flat = X.reshape(-1)
    xhat = flat / math.sqrt(np.mean(flat ** 2) + config.rms_eps)
    fn, sc, base = (w[f"blk.0.hc_attn_{n}.weight"] for n in ("fn", "scale", "base"))
    mix = fn @ xhat
    pre = 1 / (1 + np.exp(-(sc[0] * mix[:M] + base[:M]))) + eps
    post = 2 / (1 + np.exp(-(sc[1] * mix[M:2 * M] + base[M:2 * M])))
    y, split = ref.hc_pre(X, fn, sc, base, config)
    np.testing.assert_allclose(y, sum(pre[m] * X[m] for m in range(M)), rtol=1e-12)
    np.testing.assert_allclose(split.post, post, rtol=1e-12)
    C0 = (sc[2] * mix[2 * M:] + base[2 * M:]).reshape(M, M)  # row i at offset 2M + M i
    np.testing.assert_allclose(split.comb, ref.sinkhorn(C0, config.hc_sinkhorn_iters, eps), rtol=1e-12)
    hfn, hsc, hbase = w["output_hc_fn.weight"], w["output_hc_scale.weight"], w["output_hc_base.weight"]
    wts = 1 / (1 + np.exp(-((hfn @ xhat) * hsc[0] + hbase))) + eps
    np.testing.assert_allclose(ref.hc_head_collapse(X, hfn, hsc, hbase, config), wts @ X, rtol=1e-12)


# -- RoPE / YaRN -----------------------------------------------------------------------------

def test_rope_is_a_rotation_of_the_tail_and_inverse_undoes_it(tiny):
    config = tiny[0]
    rng = np.random.default_rng(6)
    n_nope = config.head_dim - config.n_rot
    for ratio in (0, 4):
        rope = ref.rope_for_layer(config, ratio)
        x = rng.standard_normal((config.n_head, config.head_dim))
        th = rope.theta(1234)
        y = ref.apply_rope(x, th)
        np.testing.assert_array_equal(y[:, :n_nope], x[:, :n_nope])
        pairs = lambda v: np.hypot(v[:, n_nope::2], v[:, n_nope + 1::2])  # noqa: E731
        np.testing.assert_allclose(pairs(y), pairs(x), rtol=1e-12)
        assert not np.allclose(y, x)
        np.testing.assert_allclose(ref.apply_rope(y, -th), x, atol=1e-12)
        # interleaved pairs: pair k = (tail[2k], tail[2k+1]), x0' = x0 cos - x1 sin
        k = 3
        a, b = x[0, n_nope + 2 * k], x[0, n_nope + 2 * k + 1]
        assert y[0, n_nope + 2 * k] == pytest.approx(a * math.cos(th[k]) - b * math.sin(th[k]))
        # relative positions: <R(p)q, R(s)k> depends only on p - s
        q, kk = rng.standard_normal(config.head_dim), rng.standard_normal(config.head_dim)
        d1 = ref.apply_rope(q, rope.theta(50)) @ ref.apply_rope(kk, rope.theta(20))
        d2 = ref.apply_rope(q, rope.theta(530)) @ ref.apply_rope(kk, rope.theta(500))
        assert d1 == pytest.approx(d2, rel=1e-9)


def test_yarn_frequencies_match_doc_formula():
    # YaRN with the published constants: low = 15, high = 25
    assert ref.yarn_corr_range(64, 160000.0, 65536, 32.0, 1.0) == (15, 25)
    rope = ref.Rope(64, 160000.0, 16.0, 65536, 32.0, 1.0)
    f = rope.freqs()
    for k in (0, 7, 15, 16, 20, 24, 25, 31):
        gamma = 1.0 if k <= 15 else (0.0 if k >= 25 else 1 - (k - 15) / 10)
        want = 160000.0 ** (-2 * k / 64) * (gamma + (1 - gamma) / 16)
        assert f[k] == pytest.approx(want, rel=1e-13), k
    np.testing.assert_allclose(rope.theta(7), 7 * f)
    plain = ref.Rope(64, 10000.0)
    np.testing.assert_allclose(plain.freqs(), [10000.0 ** (-2 * k / 64) for k in range(32)], rtol=1e-14)


def test_rope_choice_per_layer(tiny):
    config = tiny[0]
    assert ref.rope_for_layer(config, 0) == ref.Rope(config.n_rot, 10000.0)
    for r in (4, 128):
        rope = ref.rope_for_layer(config, r)
        assert rope.base == 160000.0 and rope.yarn_factor == 16.0


# -- Compressor -------------------------------------------------------------------------------

@pytest.mark.parametrize("ratio", [4, 128])
def test_compressor_emission_and_pooling(ratio):
    rng = np.random.default_rng(ratio)
    E, D = 16, 8
    width = 2 * D if ratio == 4 else D
    W_kv, W_gate = rng.standard_normal((width, E)), rng.standard_normal((width, E))
    ape = rng.standard_normal((ratio, width))
    st = ref.CompressorState(ratio, width, ratio == 4)
    n_tok = 3 * ratio + 2
    a = rng.standard_normal((n_tok, E))
    kvp, scp = a @ W_kv.T, a @ W_gate.T + ape[np.arange(n_tok) % ratio]
    emitted = []
    for p in range(n_tok):
        pooled = ref.compressor_update(st, a[p], W_kv, W_gate, ape, p)
        assert (pooled is not None) == ((p + 1) % ratio == 0)
        if pooled is not None:
            emitted.append((p, pooled))
    assert [p for p, _ in emitted] == [ratio * (k + 1) - 1 for k in range(n_tok // ratio)]
    for k, (_, pooled) in enumerate(emitted):
        cur = slice(ratio * k, ratio * (k + 1))
        if ratio == 4:  # previous window's first halves + current window's second halves
            prev = slice(max(0, ratio * (k - 1)), ratio * k)
            v = np.concatenate([kvp[prev, :D], kvp[cur, D:]])
            s = np.concatenate([scp[prev, :D], scp[cur, D:]])
            assert len(v) == (4 if k == 0 else 8)
        else:
            v, s = kvp[cur], scp[cur]
        wts = np.exp(s - s.max(axis=0)) / np.exp(s - s.max(axis=0)).sum(axis=0)
        np.testing.assert_allclose(pooled, (wts * v).sum(axis=0), rtol=1e-12, atol=1e-12)


def test_model_compressor_row_counts(tiny, long_run):
    config = tiny[0]
    model, steps = long_run
    for p, (_, per_layer) in enumerate(steps):
        for il, (n_comp, _) in enumerate(per_layer):
            r = config.ratio(il)
            assert n_comp == ((p + 1) // r if r else 0), (p, il)
    for il, cache in enumerate(model.caches):
        r = config.ratio(il)
        assert len(cache.raw) == config.n_swa
        assert [q for q, _ in cache.raw] == list(range(136 - config.n_swa, 136))
        if r:
            assert cache.attn_comp.emit_positions == [r * (k + 1) - 1 for k in range(136 // r)]
        if r == 4:
            assert cache.index_comp.emit_positions == cache.attn_comp.emit_positions
            assert all(row.shape == (config.indexer_head_dim,) for row in cache.index_comp.rows)
    assert any(config.ratio(il) == 128 and c.n_comp == 1 for il, c in enumerate(model.caches))


def test_compressed_rows_are_finalised_at_window_start(tiny, monkeypatch):
    """Compressor and indexer rows: row k = RMSNorm(pooled) roped at r*k (the window's first token), then FP8 + f16
    (attention rows) or Hadamard + FP4 + f16 (indexer rows)."""
    config, w, _, _ = tiny
    pooled_log = []
    real_update = ref.compressor_update

    def recording_update(state, a, W_kv, W_gate, ape, pos):
        pooled = real_update(state, a, W_kv, W_gate, ape, pos)
        if pooled is not None:
            pooled_log.append((id(state), pos, pooled))
        return pooled

    monkeypatch.setattr(ref, "compressor_update", recording_update)
    model = ref.ReferenceModel(config, w)
    for t in prompt(config, 13, seed=6):
        model.decode(t)
    il = next(i for i in range(config.n_layer) if config.ratio(i) == 4)
    cache, p = model.caches[il], f"blk.{il}."
    rope = ref.rope_for_layer(config, 4)
    checked = 0
    for st, norm, final in ((cache.attn_comp, "attn_compressor_norm", lambda c: ref.kv_row_qat(c, config)),
                            (cache.index_comp, "indexer_compressor_norm",
                             lambda c: ref.f16_round(ref.fp4_e2m1_roundtrip(ref.hadamard(c))))):
        logs = [(pos, pooled) for sid, pos, pooled in pooled_log if sid == id(st)]
        assert [pos for pos, _ in logs] == [3, 7, 11]
        for k, (pos, pooled) in enumerate(logs):
            c = pooled / np.sqrt(np.mean(pooled ** 2) + config.rms_eps) * w[p + norm + ".weight"]
            np.testing.assert_array_equal(st.rows[k], final(ref.apply_rope(c, rope.theta(4 * k))))
            checked += 1
    assert checked == 6


def test_cached_rows_carry_the_qat_roundtrips(tiny, long_run):
    config = tiny[0]
    model = long_run[0]
    n_nope = config.head_dim - config.n_rot
    for cache in model.caches:
        rows = [r for _, r in cache.raw] + (cache.attn_comp.rows if cache.attn_comp else [])
        for row in rows:
            np.testing.assert_array_equal(row, ref.f16_round(row))
            nope = row[:n_nope]
            # re-quantising the cached nope dims changes nothing beyond f16 rounding
            np.testing.assert_allclose(ref.fp8_e4m3_roundtrip(nope), nope, rtol=2 ** -10, atol=0)
        if cache.index_comp:
            for row in cache.index_comp.rows:
                np.testing.assert_array_equal(row, ref.f16_round(row))


# -- Indexer ----------------------------------------------------------------------------------

def test_indexer_select_rules():
    def boom():
        raise AssertionError("the indexer must not be evaluated when n_comp <= top_k")
    np.testing.assert_array_equal(ref.indexer_select(5, 8, boom), np.arange(5))
    np.testing.assert_array_equal(ref.indexer_select(8, 8, boom), np.arange(8))
    scores = np.array([0.5, 2.0, 1.0, 2.0, -1.0, 1.0, 3.0, 1.0])
    np.testing.assert_array_equal(ref.indexer_select(8, 4, lambda: scores), [1, 2, 3, 6])  # tie 1.0: lowest id
    np.testing.assert_array_equal(ref.indexer_select(8, 1, lambda: scores), [6])
    many = np.repeat(np.arange(10.0), 20)[np.random.default_rng(7).permutation(200)]
    top = ref.indexer_select(200, 30, lambda: many)
    want = sorted(np.flatnonzero(many == 9.0).tolist() + np.flatnonzero(many == 8.0)[:10].tolist())
    np.testing.assert_array_equal(top, want)


def test_indexer_selects_min_topk_rows(tiny, long_run):
    config = tiny[0]
    _, steps = long_run
    seen_selection = False
    for _, per_layer in steps:
        for il, (n_comp, n_sel) in enumerate(per_layer):
            if config.ratio(il) == 4:
                assert n_sel == min(config.indexer_top_k, n_comp)
                seen_selection |= n_comp > config.indexer_top_k
            elif config.ratio(il) == 128:
                assert n_sel == n_comp
    assert seen_selection


def test_indexer_scores_formula(tiny):
    config = tiny[0]
    IH, ID = config.n_indexer_head, config.indexer_head_dim
    rng = np.random.default_rng(8)
    qn, a = rng.standard_normal(config.q_lora_rank), rng.standard_normal(config.n_embd)
    W_iqb, W_proj = rng.standard_normal((IH * ID, config.q_lora_rank)), rng.standard_normal((IH, config.n_embd))
    rows = rng.standard_normal((11, ID))
    rope = ref.rope_for_layer(config, 4)
    got = ref.indexer_scores(qn, a, W_iqb, W_proj, rows, rope, 41, config, qat=False)
    q = ref.apply_rope((W_iqb @ qn).reshape(IH, ID), rope.theta(41))
    wI = W_proj @ a / math.sqrt(ID * IH)
    want = [sum(wI[h] * max(0.0, q[h] @ row) for h in range(IH)) for row in rows]
    np.testing.assert_allclose(got, want, rtol=1e-12)
    # QAT only changes q by Hadamard (orthonormal, applied to rows too) and FP4 rounding
    got_qat = ref.indexer_scores(qn, a, W_iqb, W_proj, ref.hadamard(rows), rope, 41, config, qat=True)
    assert np.corrcoef(got, got_qat)[0, 1] > 0.95


# -- Sinks, output ---------------------------------------------------------------------

def test_sink_softmax_weights():
    logits = np.array([0.3, -1.0, 2.0, 0.5])
    for sink in (-3.0, 0.0, 1.0, 4.0):
        w = ref.sink_softmax_weights(logits, sink)
        assert (w > 0).all() and w.sum() < 1
        share = math.exp(sink) / (math.exp(sink) + np.exp(logits).sum())
        assert 1 - w.sum() == pytest.approx(share, rel=1e-12)
        np.testing.assert_allclose(w / w.sum(), np.exp(logits) / np.exp(logits).sum(), rtol=1e-12)
    shares = [1 - ref.sink_softmax_weights(logits, s).sum() for s in (-2.0, 0.0, 2.0, 8.0)]
    assert shares == sorted(shares) and shares[-1] > 0.9
    assert ref.sink_softmax_weights(logits, -1e9).sum() == pytest.approx(1.0)
    # no overflow with large logits (max subtraction includes the sink)
    assert np.isfinite(ref.sink_softmax_weights(logits + 1000.0, 1005.0)).all()


def test_attention_with_sinks_per_head():
    rng = np.random.default_rng(9)
    q, rows, sinks = rng.standard_normal((3, 16)), rng.standard_normal((5, 16)), rng.standard_normal(3)
    o = ref.attention_with_sinks(q, rows, sinks)
    for h in range(3):
        l = rows @ q[h] / 4.0
        e = np.exp(l)
        np.testing.assert_allclose(o[h], e @ rows / (math.exp(sinks[h]) + e.sum()), rtol=1e-12)


def test_grouped_output_blocks(tiny):
    config = tiny[0]
    rng = np.random.default_rng(10)
    G, Lo, D, H = config.n_out_group, config.o_lora_rank, config.head_dim, config.n_head
    o = rng.standard_normal((H, D))
    W_oa, W_ob = rng.standard_normal((G * Lo, H // G * D)), rng.standard_normal((config.n_embd, G * Lo))
    hpg = H // G
    low = np.concatenate([W_oa[g * Lo:(g + 1) * Lo] @ np.concatenate(list(o[g * hpg:(g + 1) * hpg]))
                          for g in range(G)])
    np.testing.assert_allclose(ref.grouped_output(o, W_oa, W_ob, G), W_ob @ low, rtol=1e-12)


def _rot(x, theta):
    """RoPE of the last 2*len(theta) dims written with complex numbers (independent of apply_rope)."""
    n = 2 * len(theta)
    z = (x[..., -n::2] + 1j * x[..., -n + 1::2]) * np.exp(1j * theta)
    out = np.array(x, dtype=np.float64)
    out[..., -n::2], out[..., -n + 1::2] = z.real, z.imag
    return out


@pytest.mark.parametrize("qat", [False, True])
def test_raw_window_attention_transcription(tiny, qat):
    """Query, KV row, sink attention and grouped output for a ratio-0 layer, written out directly."""
    config, w, _, _ = tiny
    c, p = config, "blk.0."
    H, D, R = c.n_head, c.head_dim, c.n_rot
    rng = np.random.default_rng(15)
    model = ref.ReferenceModel(config, w, qat=qat)
    cache = ref.LayerCache(0, c.n_swa)
    n_tok = c.n_swa + 3  # the window wraps
    A = rng.standard_normal((n_tok, c.n_embd))
    rn = lambda v, g=1.0: v / np.sqrt(np.mean(v * v, axis=-1, keepdims=True) + c.rms_eps) * g  # noqa: E731
    theta = lambda pos: pos * 10000.0 ** (-np.arange(R // 2) * 2.0 / R)  # noqa: E731
    kv_rows = []
    for pos in range(n_tok):
        got = model._attention(w, p, A[pos], pos, cache, 0)
        a = A[pos]
        qn = rn(w[p + "attn_q_a.weight"] @ a, w[p + "attn_q_a_norm.weight"])
        q = _rot(rn((w[p + "attn_q_b.weight"] @ qn).reshape(H, D)), theta(pos))
        kv = _rot(rn(w[p + "attn_kv.weight"] @ a, w[p + "attn_kv_a_norm.weight"]), theta(pos))
        if qat:
            kv = ref.kv_row_qat(kv, c)
        kv_rows.append(kv)
        rows = np.stack(kv_rows[-c.n_swa:])
        o = np.empty((H, D))
        for h in range(H):
            e = np.exp(rows @ q[h] / math.sqrt(D))
            o[h] = e @ rows / (math.exp(w[p + "attn_sinks.weight"][h]) + e.sum())
        o = _rot(o, -theta(pos))
        G, Lo = c.n_out_group, c.o_lora_rank
        W_oa = w[p + "attn_output_a.weight"]
        low = np.concatenate([W_oa[g * Lo:(g + 1) * Lo] @ o.reshape(G, -1)[g] for g in range(G)])
        np.testing.assert_allclose(got, w[p + "attn_output_b.weight"] @ low, rtol=1e-9, atol=1e-12)


def test_ffn_transcription(tiny):
    """The MoE FFN for a hash layer and a biased top-k layer, written out directly."""
    config, w, _, _ = tiny
    model = ref.ReferenceModel(config, w)
    rng = np.random.default_rng(16)
    f = rng.standard_normal(config.n_embd)
    token = 77
    clampf = lambda g, u: g / (1 + np.exp(-g)) * np.clip(u, -10, 10)  # noqa: E731
    for il in (0, config.n_layer - 1):
        p = f"blk.{il}."
        prob = np.sqrt(np.log1p(np.exp(w[p + "ffn_gate_inp.weight"] @ f)))
        if config.is_hash_layer(il):
            ids = w[p + "ffn_gate_tid2eid.weight"][token]
        else:
            ids = np.argsort(-(prob + w[p + "exp_probs_b.bias"]), kind="stable")[:config.n_expert_used]
        wts = prob[ids] / prob[ids].sum() * 1.5
        y = sum(w[p + "ffn_down_exps.weight"][e] @ (clampf(np.minimum(w[p + "ffn_gate_exps.weight"][e] @ f, 10),
                                                           w[p + "ffn_up_exps.weight"][e] @ f) * wk)
                for e, wk in zip(ids, wts))
        y = y + w[p + "ffn_down_shexp.weight"] @ clampf(np.minimum(w[p + "ffn_gate_shexp.weight"] @ f, 10),
                                                         w[p + "ffn_up_shexp.weight"] @ f)
        np.testing.assert_allclose(model._ffn(w, p, f, token, il), y, rtol=1e-10, atol=1e-12)


# -- MoE ------------------------------------------------------------------------------------------

def test_router_hash_and_biased():
    rng = np.random.default_rng(12)
    NE, E, K = 16, 8, 6
    W, f = rng.standard_normal((NE, E)), rng.standard_normal(E)
    prob = np.sqrt(np.log1p(np.exp(W @ f)))
    ids, wts = ref.router(f, W, None, np.array([3, 1, 4, 15, 9, 2]), K, 1.5)
    np.testing.assert_array_equal(ids, [3, 1, 4, 15, 9, 2])  # table order
    np.testing.assert_allclose(wts, prob[ids] / prob[ids].sum() * 1.5, rtol=1e-12)
    bias = np.zeros(NE)
    bias[np.argsort(prob)[:K]] = 100.0  # the bias picks the six weakest experts
    ids, wts = ref.router(f, W, bias, None, K, 1.5)
    assert set(ids) == set(np.argsort(prob)[:K])
    np.testing.assert_allclose(wts, prob[ids] / prob[ids].sum() * 1.5, rtol=1e-12)  # unbiased probs
    assert wts.sum() == pytest.approx(1.5)
    assert ref.softplus(np.array([25.0]))[0] == 25.0 and ref.softplus(np.array([-25.0]))[0] == math.exp(-25.0)


def test_swiglu_clamps():
    g = np.array([20.0, -20.0, 1.0])
    u = np.array([20.0, -20.0, 1.0])
    np.testing.assert_allclose(ref.swiglu_clamped(g, u, 10.0),
                               [10 / (1 + math.exp(-10)) * 10, -20 / (1 + math.exp(20)) * -10, 1 / (1 + math.exp(-1))])


# -- whole model ---------------------------------------------------------------------------------

def test_load_reference_weights_shapes(tiny):
    config, w, mw, _ = tiny
    for spec in base_tensor_specs(config):
        arr = w[spec.name]
        assert arr.shape == tuple(reversed(spec.dims)), spec.name
        assert arr.dtype == (np.int64 if spec.role == "tid2eid" else np.float64)
    for spec in mtp_tensor_specs(config):
        assert mw[spec.name].shape == tuple(reversed(spec.dims))
    assert w["blk.0.ffn_gate_exps.weight"].shape == (config.n_expert, config.n_ff_exp, config.n_embd)
    assert w["blk.0.ffn_gate_tid2eid.weight"].max() < config.n_expert


def test_load_reference_weights_refuses_big_models(tiny):
    with pytest.raises(Ds4Error, match="too many"):
        ref.load_reference_weights(open_model(tiny[3]), max_elements=1000)


def test_decode_is_finite_and_deterministic(tiny):
    config, w, _, _ = tiny
    toks = prompt(config, 80, seed=2)
    runs = []
    for _ in range(2):
        model = ref.ReferenceModel(config, w)
        logits = [model.decode(t) for t in toks]
        runs.append((np.stack(logits), model.final_hc.copy()))
    (l1, h1), (l2, h2) = runs
    assert l1.shape == (80, config.n_vocab) and np.isfinite(l1).all()
    assert h1.shape == (config.n_hc, config.n_embd) and np.isfinite(h1).all()
    np.testing.assert_array_equal(l1, l2)
    np.testing.assert_array_equal(h1, h2)
    assert l1.std(axis=1).min() > 0.1  # not degenerate
    assert not np.allclose(l1[0], l1[1])
    # prefill = the same causal computation (the forward doc's prefill): its last logits are the decode loop's
    pre = ref.ReferenceModel(config, w)
    np.testing.assert_array_equal(pre.prefill(toks), l1[-1])
    assert pre.pos == 80


def test_snapshot_restore(tiny):
    config, w, _, _ = tiny
    toks = prompt(config, 30, seed=3)
    model = ref.ReferenceModel(config, w)
    for t in toks[:20]:
        model.decode(t)
    snap = model.snapshot()
    first = [model.decode(t) for t in toks[20:]]
    model.restore(snap)
    assert model.pos == 20
    np.testing.assert_array_equal(np.stack([model.decode(t) for t in toks[20:]]), np.stack(first))


def test_qat_flag_changes_cached_rows_only_slightly(tiny):
    config, w, _, _ = tiny
    toks = prompt(config, 24, seed=4)
    a, b = ref.ReferenceModel(config, w, qat=True), ref.ReferenceModel(config, w, qat=False)
    la, lb = [a.decode(t) for t in toks][-1], [b.decode(t) for t in toks][-1]
    row = b.caches[0].raw[-1][1]
    assert not np.array_equal(row, ref.f16_round(row))  # no rounding without QAT
    assert not np.array_equal(la, lb)
    assert np.corrcoef(la, lb)[0, 1] > 0.9


def test_mtp_draft(tiny):
    config, w, mw, _ = tiny
    model = ref.ReferenceModel(config, w)
    toks = prompt(config, 40, seed=5)
    model.prefill(toks)
    p = model.pos - 1
    d0 = model.mtp_draft(mw, model.final_hc, toks[-1], p)
    assert d0.shape == (config.n_vocab,) and np.isfinite(d0).all() and d0.std() > 0.1
    assert model.mtp_hc.shape == (config.n_hc, config.n_embd)
    assert model.mtp_cache.n_raw == 1
    # recursive drafts from the MTP's own state; the counter grows and caps at the window
    tok, hc = int(np.argmax(d0)), model.mtp_hc
    for n in range(1, config.n_swa + 3):
        d = model.mtp_draft(mw, hc, tok, p + n)
        tok, hc = int(np.argmax(d)), model.mtp_hc
        assert np.isfinite(d).all()
        assert model.mtp_cache.n_raw == min(n + 1, config.n_swa)
    # the same inputs from a fresh MTP cache reproduce the first draft; a prefill resets the counter
    again = ref.ReferenceModel(config, w)
    again.prefill(toks)
    np.testing.assert_array_equal(again.mtp_draft(mw, again.final_hc, toks[-1], p), d0)
    model.prefill([toks[0]])
    assert model.mtp_cache.n_raw == 0
    # the MTP block sees the trunk state: a different hc_state gives different logits
    other = ref.ReferenceModel(config, w)
    other.mtp_draft(mw, again.final_hc * 0 + 1.0, toks[-1], p)
    assert not np.array_equal(other.mtp_draft(mw, again.final_hc, toks[-1], p + 1), d0)


def test_decode_rejects_bad_token(tiny):
    config, w, _, _ = tiny
    with pytest.raises(Ds4Error):
        ref.ReferenceModel(config, w).decode(config.n_vocab)
    with pytest.raises(Ds4Error):
        ref.ReferenceModel(config, w).prefill([])


def test_mtp_block_input(tiny):
    config = tiny[0]
    rng = np.random.default_rng(13)
    E, M = config.n_embd, config.n_hc
    emb, P = rng.standard_normal(E), rng.standard_normal((M, E))
    en, hn = rng.standard_normal(E), rng.standard_normal(E)
    Pe, Ph = rng.standard_normal((E, E)), rng.standard_normal((E, E))
    X = ref.mtp_input(emb, P, en, Pe, hn, Ph, config)
    rn = lambda v, g: v / np.sqrt(np.mean(v * v) + config.rms_eps) * g  # noqa: E731
    for m in range(M):
        np.testing.assert_allclose(X[m], Pe @ rn(emb, en) + Ph @ rn(P[m], hn), rtol=1e-10)

