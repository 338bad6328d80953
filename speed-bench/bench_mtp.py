#!/usr/bin/env python3
"""MTP costs side by side: a plain decode step, a 2-row verify, one MTP draft, and greedy
generation tokens/s plain vs speculative (continuous depth-1 and depth 4), with the real MTP head
and with an oracle drafter that replays the plain continuation (the ceiling, 100 % acceptance).

Without --model it writes the tiny preset (random weights: the real head's drafts are rejected,
so its rows show the cost of speculation that does not pay, and the adaptive row how the gate
limits it).

    python speed-bench/bench_mtp.py
    python speed-bench/bench_mtp.py --model m.gguf --mtp m-mtp.gguf --tokens 128
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model")
    ap.add_argument("--mtp")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--steps", type=int, default=20)
    args = ap.parse_args()
    import ds4  # before mlx.core: the BLAS choice
    import mlx.core as mx
    import numpy as np
    from ds4.decode import Speculative, generate
    from ds4.session import Engine, Sampler, Session
    from ds4.speculative import SpecOptions

    tmp = None
    if args.model is None:
        from ds4 import synth

        tmp = tempfile.TemporaryDirectory()
        args.model, args.mtp = os.path.join(tmp.name, "tiny.gguf"), os.path.join(tmp.name, "tiny-mtp.gguf")
        synth.write_preset("tiny", args.model, args.mtp)
    engine = Engine(args.model, mtp_path=args.mtp)
    eos = engine.tokenizer.eos_id
    prompt = [0] + np.random.default_rng(0).integers(3, engine.config.n_vocab, 63).tolist()
    s = Session(engine, 4096)
    s.sync(prompt)
    first = s.argmax()

    def timed(fn) -> float:
        fn()
        t = time.perf_counter()
        for _ in range(args.steps):
            fn()
        return (time.perf_counter() - t) / args.steps * 1e3

    def plain():
        out = engine.model.step([first], s.state)
        mx.eval(out.arrays())

    def draft():
        logits, block, _ = engine.mtp.forward(s.hidden[None], [first], s.mtp.block)
        mx.eval(mx.argmax(logits), *block.arrays())

    print(f"model {os.path.basename(args.model)}, device {mx.default_device()}, blas {ds4.BLAS or 'bundled'}")
    t_plain = timed(plain)
    t_verify = timed(lambda: s.verify([first, first]))
    t_draft = timed(draft)
    print(f"plain step {t_plain:.2f} ms | 2-row verify {t_verify:.2f} ms ({t_verify / t_plain:.2f}x) | "
          f"MTP draft {t_draft:.2f} ms ({t_draft / t_plain:.2f}x)")

    greedy = generate(Session(engine, 4096), prompt, args.tokens, Sampler(temperature=0.0), eos)
    stream = greedy.generated

    def oracle(session, first_token, n):
        base = session.pos - len(prompt)
        return stream[base + 1:base + 1 + n]

    print(f"{'mode':<34}{'tokens/s':>10}{'tokens/cycle':>14}{'passes/token':>14}{'identical':>11}")
    print(f"{'plain greedy':<34}{len(stream) / greedy.decode_seconds:>10.2f}{1:>14.2f}{1:>14.2f}{'-':>11}")
    for label, drafter, depth, adaptive in (
            ("MTP head, continuous depth-1", None, 1, False), ("MTP head, depth 4", None, 4, False),
            ("MTP head, continuous, adaptive", None, 1, True),
            ("oracle drafter, continuous", oracle, 1, False), ("oracle drafter, depth 4", oracle, 4, False)):
        g = generate(Session(engine, 4096), prompt, args.tokens,
                     Speculative(SpecOptions(draft=depth, margin=0), drafter, adaptive), eos)
        stats = g.spec
        per_cycle = stats.committed / max(1, stats.cycles + stats.plain_steps)
        print(f"{label:<34}{len(g.generated) / g.decode_seconds:>10.2f}{per_cycle:>14.2f}"
              f"{stats.trunk_passes / stats.committed:>14.2f}{str(g.generated == stream):>11}")
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
