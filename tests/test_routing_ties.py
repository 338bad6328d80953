"""A biased top-k routing near-tie is decided alike by every path a token can take: one prefill
chunk, one-token decode steps, and a verify batch after a prefix.

Why: on the seed-99 oracle slice the C engine's build picks another 6th expert on layer 3 after
72 tokens in its batched prefill than in its own one-token decode (the scores differ by 0.0008;
its prefill and decode round differently, and the FP8/int8 round-trips amplify that), which moves
the logits by 0.5 (README, "Accuracy against the C engine"). ds4 routes each token from its own
scores, computed the same way whatever the batch, so even a tie within a few float32 steps must
fall the same way on every path. The test builds such a tie on the last layer of the tiny model,
where a token's routing reaches only its own logits, by bisecting one expert's selection bias.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np

from ds4.session import Engine, Session

CTX = 256
TOL = 1e-4  # same-precision paths, as in test_model.py
N_TOKENS = 24
TIE_WIDTH = 1e-6  # the bracket around the tie: a few float32 steps of scores of order 1


def _logits(engine: Engine, tokens: list[int], path: str) -> np.ndarray:
    if path == "prefill":
        s = Session(engine, CTX, prefill_chunk=len(tokens))
        s.sync(tokens)
        return np.array(s.logits)
    if path == "decode":
        s = Session(engine, CTX, prefill_chunk=1)
        s.sync(tokens)
        return np.array(s.logits)
    s = Session(engine, CTX, prefill_chunk=len(tokens))  # verify: 4 rows after a prefix
    s.sync(tokens[:-4])
    return np.array(s.verify(tokens[-4:]).out.logits[-1])


def test_routing_near_tie_is_decided_alike_by_prefill_decode_and_verify(tiny_paths):
    engine = Engine(str(tiny_paths[0]))
    c = engine.config
    # The last layer: its routing of earlier tokens feeds nothing the last token reads (attention
    # and compressors take the layer's input), so the last logits see only the last token's choice.
    layer = c.n_layer - 1
    assert not c.is_hash_layer(layer)
    w = engine.model.layers[layer]
    bias0 = np.zeros(c.n_expert, np.float32) if w.exp_probs_b is None else np.array(w.exp_probs_b)
    tokens = np.random.default_rng(15).integers(3, c.n_vocab, N_TOKENS).tolist()
    expert = 0

    def with_shift(shift: float, path: str = "prefill") -> np.ndarray:
        b = bias0.copy()
        b[expert] = np.float32(b[expert] + shift)
        w.exp_probs_b = mx.array(b)
        engine.model._compiled.clear()  # a compiled step holds the weights it was traced with
        return _logits(engine, tokens, path)

    out, inside = with_shift(-20.0), with_shift(20.0)  # the expert never / always chosen
    assert np.abs(inside - out).max() > 100 * TOL, "the expert's choice must show in the logits"
    lo, hi = -20.0, 20.0
    while hi - lo > TIE_WIDTH:
        mid = (lo + hi) / 2
        got = with_shift(mid)
        if np.array_equal(got, out):
            lo = mid
        else:
            assert np.array_equal(got, inside), "a bias shift changed more than the last token's choice"
            hi = mid
    # lo and hi now sit within TIE_WIDTH on either side of the tie: every path must fall on the
    # same side as the prefill chunk.
    for path in ("decode", "verify"):
        np.testing.assert_allclose(with_shift(lo, path), out, atol=TOL, rtol=0, err_msg=f"{path}, expert out")
        np.testing.assert_allclose(with_shift(hi, path), inside, atol=TOL, rtol=0, err_msg=f"{path}, expert in")
