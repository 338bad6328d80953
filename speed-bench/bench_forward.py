#!/usr/bin/env python3
"""Forward-pass speed and memory: load time, prefill and decode tokens/s, verify-shaped batches,
per-layer cost, peak RSS (after loading and at the end, with the model file's size beside it).

Each measurement evaluates whole steps as one MLX graph (one `mx.eval` per step). Without
--model it writes the `tiny` preset to a temp dir. Numbers on the CPU depend on the BLAS MLX
uses: ds4 preloads the system OpenBLAS when present; DS4_BLAS=none keeps MLX's bundled
reference BLAS. `--compare-blas` runs both side by side in one invocation.

    python speed-bench/bench_forward.py                          # tiny model, CPU
    python speed-bench/bench_forward.py --compare-blas
    python speed-bench/bench_forward.py --model slice2.gguf --backend cuda --ctx 4096
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time


def measure(args) -> dict:
    import ds4
    import mlx.core as mx
    import numpy as np

    from ds4.session import Engine

    if args.backend != "cpu":
        mx.set_default_device(mx.gpu)
    else:
        mx.set_default_device(mx.cpu)
    t_load = time.perf_counter()
    engine = Engine(args.model)
    load_s = time.perf_counter() - t_load
    rss_load = peak_rss_gb()
    weights_gb = mx.get_active_memory() / 1e9  # what the bound weights hold on the device
    model, c = engine.model, engine.config
    rng = np.random.default_rng(0)
    prompt = rng.integers(3, c.n_vocab, args.prefill).tolist()

    def run(tokens, state):
        out = model.step(tokens, state, all_logits=len(tokens) <= 16)
        mx.eval(out.arrays())
        state.store.record(state.pos, tokens)
        return out.state

    # Prefill, chunked as a session would.
    run(prompt[:args.chunk], model.empty_state(args.ctx, args.chunk))  # warm-up (traces the chunk shape)
    t0 = time.perf_counter()
    state = model.empty_state(args.ctx, args.chunk)
    for i in range(0, len(prompt), args.chunk):
        state = run(prompt[i:i + args.chunk], state)
    prefill_s = time.perf_counter() - t0

    def step_time(m: int, layers=None) -> float:
        saved = model.layers, model.kinds, model._compiled
        if layers is not None:
            model.layers, model.kinds, model._compiled = saved[0][:layers], saved[1][:layers], {}
        try:
            run(prompt[:m], state)
            t = time.perf_counter()
            for k in range(args.steps):
                run(prompt[k:k + m], state)  # each step from the same prefix state
            return (time.perf_counter() - t) / args.steps
        finally:
            model.layers, model.kinds, model._compiled = saved

    decode = step_time(1)
    head_only = step_time(1, layers=0)
    out = {
        "model": os.path.basename(args.model), "backend": args.backend, "blas": ds4.BLAS or "bundled",
        "file_gb": os.path.getsize(args.model) / 1e9, "load_s": load_s, "peak_rss_after_load_gb": rss_load,
        "prefill_tokens": len(prompt), "prefill_tps": len(prompt) / prefill_s,
        "decode_ms": decode * 1e3, "decode_tps": 1 / decode,
        "per_layer_decode_ms": (decode - head_only) * 1e3 / c.n_layer, "embed_head_ms": head_only * 1e3,
    }
    for m in (2, 4):
        t = step_time(m)
        out[f"verify{m}_ms"] = t * 1e3
        out[f"verify{m}_over_decode"] = t / decode
    out["peak_rss_gb"] = peak_rss_gb()
    out["peak_rss_over_file"] = out["peak_rss_gb"] / out["file_gb"]
    out["device_weights_gb"] = weights_gb
    out["device_peak_gb"] = mx.get_peak_memory() / 1e9  # weights + states + step temporaries
    return out


def peak_rss_gb() -> float:
    """The process's peak resident set so far (Linux reports KiB, macOS bytes)."""
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1e9 if sys.platform == "darwin" else 1e6)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="GGUF (default: write the tiny preset)")
    ap.add_argument("--backend", choices=["cpu", "metal", "cuda"], default="cpu")
    ap.add_argument("--ctx", type=int, default=4096)
    ap.add_argument("--prefill", type=int, default=1024, help="prompt tokens to prefill")
    ap.add_argument("--chunk", type=int, default=1024, help="prefill chunk")
    ap.add_argument("--steps", type=int, default=10, help="timed decode/verify steps")
    ap.add_argument("--compare-blas", action="store_true", help="run with the bundled BLAS and with OpenBLAS")
    ap.add_argument("--json", action="store_true", help=argparse.SUPPRESS)  # child mode
    args = ap.parse_args()
    tmp = None
    if args.model is None:
        from ds4 import synth

        tmp = tempfile.TemporaryDirectory()
        args.model = os.path.join(tmp.name, "tiny.gguf")
        synth.write_preset("tiny", args.model)
    if args.json:
        print(json.dumps(measure(args)))
        return
    envs = [("bundled", "none"), ("system", "")] if args.compare_blas else [(None, os.environ.get("DS4_BLAS", ""))]
    rows = []
    for _, blas in envs:
        cmd = [sys.executable, __file__, "--json", "--model", args.model, "--backend", args.backend, "--ctx",
               str(args.ctx), "--prefill", str(args.prefill), "--chunk", str(args.chunk), "--steps", str(args.steps)]
        out = subprocess.run(cmd, env={**os.environ, "DS4_BLAS": blas}, capture_output=True, text=True, check=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    keys = [k for k in rows[0] if k != "model"]
    print(f"model {rows[0]['model']}")
    for k in keys:
        cells = [f"{r[k]:.2f}" if isinstance(r[k], float) else str(r[k]) for r in rows]
        print(f"{k:<22}" + "".join(f"{c:>18}" for c in cells))
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
