#!/usr/bin/env python3
"""CPU throughput of the fused kernel bodies (ds4/kernels_metal/ds4_kernels.h built as C++ with
-O3, one thread looping over the GPU grid) against the MLX-op reference of the same op, for
real-width routed experts: GB/s of GGUF bytes of the distinct experts a call reads.

    python speed-bench/bench_kernels.py               # M = 1, 2, 4 rows, 6 experts a row
    python speed-bench/bench_kernels.py --native --json kernels.json

The C build is single-threaded and scalar (a check of the bodies, not a CPU runtime path);
MLX's reference decodes the chosen experts and multiplies with its own (threaded) kernels.
Shapes: gate/up IQ2_XXS in=4096 out=2048, down Q2_K in=2048 out=4096, Q4_K in=4096 out=2048.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

CASES = (("IQ2_XXS", 4096, 2048, "gate/up"), ("Q2_K", 2048, 4096, "down"), ("Q4_K", 4096, 2048, "Q4_K"))


def best_time(fn, repeats: int) -> float:
    fn()  # warm-up (MLX builds its kernels, caches fill)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", default="1,2,4", help="M values")
    ap.add_argument("--experts", type=int, default=16, help="experts in the tensor")
    ap.add_argument("--k", type=int, default=6, help="experts per row")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--native", action="store_true", help="build the bodies with -march=native")
    ap.add_argument("--json", help="also write the figures as JSON")
    args = ap.parse_args()

    import ds4  # noqa: F401  (BLAS choice before mlx.core)
    import mlx.core as mx
    import numpy as np
    from gguf import GGMLQuantizationType as QT

    from ds4 import codecs, fused_kernels, kernels, kernels_c, quant

    mx.set_default_device(mx.cpu)
    ck = kernels_c.CKernels(Path(tempfile.mkdtemp(prefix="ds4_bench_kernels_")), opt="-O3", native=args.native)
    rng = np.random.default_rng(0)
    rows = []
    print(f"{'kernel':>8} {'type':>8} {'in':>5} {'out':>5} {'M':>2} {'bytes MB':>8} "
          f"{'C ms':>8} {'C GB/s':>7} {'MLX ms':>8} {'MLX GB/s':>8} {'max rel diff':>12}")
    for name, n_in, n_out, role in CASES:
        qtype = QT[name]
        blocks = codecs.random_blocks(rng, qtype, args.experts * n_out * n_in // 256, 0.02)
        blocks = blocks.reshape(args.experts, n_out, -1)
        experts = quant.QuantExperts(blocks, qtype, (args.experts, n_out, n_in))
        reference = kernels.reference("gather_matmul", name)
        expert_bytes = blocks[0].nbytes
        for M in (int(m) for m in args.rows.split(",")):
            ids = np.stack([rng.choice(args.experts, args.k, replace=False) for _ in range(M)]).astype(np.uint32)
            x = rng.standard_normal((M, n_in)).astype(np.float32)
            inputs, n, shape = fused_kernels.gather_inputs(name, mx.array(x), mx.array(blocks), mx.array(ids))
            host = [np.array(a) for a in inputs]
            got = {}

            def run_c():
                got["c"] = ck.run("gather_matvec", host, n, [shape])[0]

            def run_mlx():
                y = reference(experts, mx.array(x), mx.array(ids))
                mx.eval(y)
                got["mlx"] = y

            t_c, t_mlx = best_time(run_c, args.repeats), best_time(run_mlx, args.repeats)
            ref = np.array(got["mlx"])
            diff = float(np.max(np.abs(got["c"] - ref)) / max(np.max(np.abs(ref)), 1e-30))
            nbytes = len(np.unique(ids)) * expert_bytes
            row = {"kernel": role, "type": name, "in": n_in, "out": n_out, "M": M, "k": args.k, "bytes": nbytes,
                   "c_s": t_c, "c_gbs": nbytes / t_c / 1e9, "mlx_s": t_mlx, "mlx_gbs": nbytes / t_mlx / 1e9,
                   "max_rel_diff": diff}
            rows.append(row)
            print(f"{role:>8} {name:>8} {n_in:>5} {n_out:>5} {M:>2} {nbytes / 1e6:>8.1f} {t_c * 1e3:>8.1f} "
                  f"{row['c_gbs']:>7.3f} {t_mlx * 1e3:>8.1f} {row['mlx_gbs']:>8.3f} {diff:>12.2e}")
    if args.json:
        Path(args.json).write_text(json.dumps({"native": args.native, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
