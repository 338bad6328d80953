#!/usr/bin/env python3
"""GPU check of the fused kernels (run by speed-bench/gpu_check.sh on the CUDA machine, or on a
Mac): each kernel on the device against its MLX-op reference, then a real-width slice's
prefill, decode and 4-row verify with the fused entries vs DS4_KERNELS=reference.

    python speed-bench/gpu_check.py --model slice4.gguf --out $OUT

Writes OUT/gpu_check.json and OUT/gpu_check.txt (one line); exits 1 when a check fails.
Needs no pytest (the CUDA machine has none): the checks mirror tests/test_kernels_c.py, with
tolerances widened only by what a GPU compiler may fuse (FMA), row invariance still bitwise.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from pathlib import Path
from types import SimpleNamespace


def kernel_checks() -> list[dict]:
    import mlx.core as mx
    import numpy as np
    from gguf import GGMLQuantizationType as QT

    from ds4 import codecs, fused_kernels, kernels, quant
    from ds4.model import _hc_post_reference, _hc_pre_reference
    from ds4.moe import _expert_swiglu_reference

    GATHER_KINDS = ("IQ2_XXS", "Q2_K", "Q4_K")
    rng = np.random.default_rng(0)
    results = []

    def record(name, ok, **info):
        results.append({"check": name, "ok": bool(ok), **info})
        print(f"{'ok  ' if ok else 'FAIL'} {name} {info}", flush=True)

    def fused_gather(kind, x, blocks, ids):
        inputs, n, shape = fused_kernels.gather_inputs(kind, mx.array(x), mx.array(blocks), mx.array(ids))
        y = fused_kernels.launch("gather_matvec", inputs, n, [shape])[0]
        mx.eval(y)
        return np.array(y)

    for kind in GATHER_KINDS:  # dequant: bit-exact, as on the CPU
        qtype = QT[kind]
        data = codecs.random_blocks(rng, qtype, 64 * 4096 // 256, 1.0).reshape(64, -1)
        got = np.array(fused_kernels.dequant(kind)(mx.array(data), 4096))
        want = np.array(quant.dequantize(mx.array(data), qtype, 4096))
        record(f"dequant {kind} 64x4096", np.array_equal(got.view(np.uint32), want.view(np.uint32)))

    shapes = [(5, 7, 768, 3, M) for M in (1, 2, 5, 17)] + [(8, 2048, 4096, 6, 1), (8, 4096, 2048, 6, 4)]
    for kind in GATHER_KINDS:
        qtype = QT[kind]
        for n_expert, n_out, n_in, k, M in shapes:
            blocks = codecs.random_blocks(rng, qtype, n_expert * n_out * n_in // 256, 0.02).reshape(n_expert, n_out, -1)
            ids = np.stack([rng.choice(n_expert, k, replace=False) for _ in range(M)]).astype(np.uint32)
            ids[-1, 0] = ids[0, 0]
            x = rng.standard_normal((M, n_in)).astype(np.float32)
            t0 = time.perf_counter()
            y = fused_gather(kind, x, blocks, ids)
            w = codecs.dequantize(blocks[np.unique(ids)], qtype).astype(np.float64)
            pos = {e: i for i, e in enumerate(np.unique(ids))}
            exact = np.stack([[w[pos[e]] @ x[m].astype(np.float64) for e in ids[m]] for m in range(M)])
            bound = np.stack([[np.abs(w[pos[e]]) @ np.abs(x[m]).astype(np.float64) for e in ids[m]] for m in range(M)])
            err = float(np.max(np.abs(y - exact) / np.maximum(bound, 1e-30)))
            experts = quant.QuantExperts(blocks, qtype, (n_expert, n_out, n_in))
            ref = np.array(kernels.reference("gather_matmul", kind)(experts, mx.array(x), mx.array(ids)))
            ref_err = float(np.max(np.abs(y - ref) / np.maximum(bound, 1e-30)))
            invariant = all(np.array_equal(fused_gather(kind, x[m:m + 1], blocks, ids[m:m + 1])[0].view(np.uint32),
                                           y[m].view(np.uint32)) for m in range(M))
            record(f"gather {kind} out={n_out} in={n_in} M={M}", err <= 4e-6 and ref_err <= 8e-6 and invariant,
                   rel_err_vs_exact=err, rel_err_vs_reference=ref_err, row_invariant=invariant,
                   seconds=round(time.perf_counter() - t0, 3))

    for kind in GATHER_KINDS:  # gate + up + SwiGLU + route weight in one launch, against the MLX ops
        qtype = QT[kind]
        for n_expert, n_ff, n_in, k, M in ((6, 7, 768, 3, 5), (8, 2048, 4096, 6, 1), (8, 2048, 4096, 6, 4)):
            gb, ub = (codecs.random_blocks(rng, qtype, n_expert * n_ff * n_in // 256, 0.02).reshape(n_expert, n_ff, -1)
                      for _ in range(2))
            ids = np.stack([rng.choice(n_expert, k, replace=False) for _ in range(M)]).astype(np.uint32)
            x = rng.standard_normal((M, n_in)).astype(np.float32)
            wts = rng.uniform(0.1, 1, (M, k)).astype(np.float32)
            gate, up = (quant.QuantExperts(b, qtype, (n_expert, n_ff, n_in)) for b in (gb, ub))

            def fused(rows):
                inputs, n, shape = fused_kernels.swiglu_inputs(kind, mx.array(x[rows]), mx.array(gb), mx.array(ub),
                                                               mx.array(ids[rows]), mx.array(wts[rows]), 1.0)
                return np.array(fused_kernels.launch("gather_swiglu", inputs, n, [shape])[0])

            y = fused(slice(None))
            ref = np.array(_expert_swiglu_reference(gate, up, mx.array(x), mx.array(ids), mx.array(wts), 1.0))
            err = float(np.max(np.abs(y - ref)) / np.max(np.abs(ref)))
            invariant = all(np.array_equal(fused(slice(m, m + 1))[0].view(np.uint32), y[m].view(np.uint32))
                            for m in range(M))
            record(f"swiglu {kind} ff={n_ff} in={n_in} M={M}", err <= 2e-5 and invariant, rel_err=err,
                   row_invariant=invariant)

    for T, E, iters in ((1, 4096, 20), (3, 4096, 20), (2, 320, 3)):
        M, C = 4, 24
        X = rng.standard_normal((T, M, E)).astype(np.float32)
        fn = quant.QuantWeight((rng.standard_normal((C, M * E)) * 0.02).astype(np.float16), QT.F16, (C, M * E))
        scale, base = rng.uniform(0.5, 2, 3).astype(np.float32), (rng.standard_normal(C) * 0.5).astype(np.float32)
        config = SimpleNamespace(rms_eps=1e-6, hc_eps=1e-6, hc_sinkhorn_iters=iters)
        args = (mx.array(X), fn, mx.array(scale), mx.array(base), config)
        got = [np.array(a) for a in fused_kernels.hc_pre(*args)]
        want = [np.array(a) for a in _hc_pre_reference(*args)]
        err = max(float(np.max(np.abs(g - w)) / np.max(np.abs(w))) for g, w in zip(got, want))  # of each output's scale
        alone = [np.array(a) for a in fused_kernels.hc_pre(mx.array(X[-1:]), *args[1:])]
        invariant = all(np.array_equal(a[0].view(np.uint32), g[-1].view(np.uint32)) for a, g in zip(alone, got))
        record(f"hc_pre T={T} E={E} iters={iters}", err <= 2e-5 and invariant, rel_err=err, row_invariant=invariant)

        out = rng.standard_normal((T, E)).astype(np.float32)
        post, comb = got[1], got[2]
        y = np.array(fused_kernels.hc_post(*(mx.array(a) for a in (out, X, post, comb))))
        ref = np.array(_hc_post_reference(*(mx.array(a) for a in (out, X, post, comb))))
        err = float(np.max(np.abs(y - ref)) / np.max(np.abs(ref)))
        record(f"hc_post T={T} E={E}", err <= 1e-6, rel_err=err, bit_exact=bool(np.array_equal(y, ref)))
    return results


def slice_bench(model_path: str, prefill: int, steps: int) -> dict:
    import mlx.core as mx
    import numpy as np

    from ds4 import kernels
    from ds4.session import Engine

    t0 = time.perf_counter()
    engine = Engine(model_path)
    model, c = engine.model, engine.config
    out = {"load_s": time.perf_counter() - t0, "model": os.path.basename(model_path), "layers": c.n_layer,
           "experts": c.n_expert, "table": [list(map(str, r)) for r in kernels.table() if r[2] == kernels.device_kind()]}
    prompt = np.random.default_rng(0).integers(3, c.n_vocab, prefill + 8).tolist()

    def run(tokens, state):
        o = model.step(tokens, state, all_logits=len(tokens) <= 16)
        mx.eval(o.arrays())
        state.store.record(state.pos, tokens)
        return o

    logits = {}
    for mode in ("fused", "reference"):
        os.environ["DS4_KERNELS"] = "reference" if mode == "reference" else ""
        model._compiled.clear()
        run(prompt[:prefill], model.empty_state(4096, prefill))  # warm-up: traces and builds the kernels
        t = time.perf_counter()
        state = run(prompt[:prefill], model.empty_state(4096, prefill)).state
        out[f"{mode}_prefill_tps"] = prefill / (time.perf_counter() - t)
        for m in (1, 4):
            first = run(prompt[prefill:prefill + m], state)  # warm-up of this width
            t = time.perf_counter()
            for _ in range(steps):
                run(prompt[prefill:prefill + m], state)
            out[f"{mode}_{'decode' if m == 1 else f'verify{m}'}_ms"] = (time.perf_counter() - t) / steps * 1e3
            logits[(mode, m)] = np.array(first.logits)
    os.environ["DS4_KERNELS"] = ""
    for m in (1, 4):
        a, b = logits[("fused", m)], logits[("reference", m)]
        out[f"max_abs_logit_diff_{m}"] = float(np.max(np.abs(a - b)))
        out[f"argmax_agree_{m}"] = bool(np.array_equal(a.argmax(-1), b.argmax(-1)))
    out["decode_speedup"] = out["reference_decode_ms"] / out["fused_decode_ms"]
    return out


def emulate_launches() -> None:
    """Route fused_kernels.launch through the CPU C++ build of the same bodies."""
    import tempfile

    import mlx.core as mx
    import numpy as np

    from ds4 import fused_kernels, kernels_c

    ck = kernels_c.CKernels(Path(tempfile.mkdtemp(prefix="ds4_gpu_check_")), opt="-O3")

    def launch(name, inputs, n_threads, output_shapes):
        return [mx.array(a) for a in ck.run(name, [np.array(a) for a in inputs], n_threads, output_shapes)]

    fused_kernels.launch = launch


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="real-width slice GGUF for the step benchmark (skipped without)")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--prefill", type=int, default=128)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--emulate", action="store_true",
                    help="on the CPU, launch the bodies' C++ build instead (checks this script, not a GPU)")
    args = ap.parse_args()

    import ds4  # noqa: F401
    import mlx.core as mx

    from ds4 import kernels

    mx.set_default_device(mx.cpu if args.emulate else mx.gpu)
    if args.emulate:
        emulate_launches()
    report = {"device": kernels.device_kind() + (" (emulated by the C++ build)" if args.emulate else ""),
              "mlx": mx.__version__}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    def write(final: bool) -> bool:
        """Write the report as it stands (after each part, so a timeout keeps what was done)."""
        checks = report.get("kernels", [])
        ok = bool(checks) and all(c["ok"] for c in checks) and not any(k.endswith("_error") for k in report)
        line = (f"gpu_check {'PASS' if ok else 'FAIL'}{'' if final else ' (slice pending)'} on {report['device']}:"
                f" {sum(c['ok'] for c in checks)}/{len(checks)} kernel checks")
        s = report.get("slice", {})
        if s:
            line += (f"; {s['model']} decode {s['fused_decode_ms']:.1f} ms fused vs {s['reference_decode_ms']:.1f} ms"
                     f" reference (x{s['decode_speedup']:.2f}), verify4 {s['fused_verify4_ms']:.1f} vs"
                     f" {s['reference_verify4_ms']:.1f} ms, prefill {s['fused_prefill_tps']:.0f} vs"
                     f" {s['reference_prefill_tps']:.0f} t/s, max |dlogit| {s['max_abs_logit_diff_1']:.2e},"
                     f" argmax agree {s['argmax_agree_1'] and s['argmax_agree_4']}")
        (out / "gpu_check.json").write_text(json.dumps(report, indent=1))
        (out / "gpu_check.txt").write_text(line + "\n")
        print(line, flush=True)
        return ok

    try:
        report["kernels"] = kernel_checks()
    except Exception:
        report["kernels_error"] = traceback.format_exc()
        print(report["kernels_error"], flush=True)
    if args.model:
        write(final=False)
        try:
            report["slice"] = slice_bench(args.model, args.prefill, args.steps)
        except Exception:
            report["slice_error"] = traceback.format_exc()
            print(report["slice_error"], flush=True)
    ok = write(final=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
