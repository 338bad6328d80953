#!/usr/bin/env python3
"""Throughput of the quant paths in ds4.quant on one square weight, per GGML type.

Columns, all in GB/s of the weight's GGUF bytes (what a forward pass streams from the file):

    np deq     gguf-py numpy dequantize (the reference codec), to float32
    mx deq     ds4.quant.dequantize, the MLX-op decoder, to float32
    M=1        QuantWeight(x) for one row (decode matvec)
    M=16       QuantWeight(x) for 16 rows (a short prefill or a verify batch)

`path` says how the matmul runs (affine = transcoded to MLX affine quantization, dequant =
decode then a float32 matmul, float = float32 matmul); `dev MB` is what the weight holds on the
device. Each timed call builds the whole graph and evaluates it once; the median is reported.

    python speed-bench/bench_codecs.py                     # 4096 x 4096, default device
    python speed-bench/bench_codecs.py --size 2048 --repeats 5 --types Q4_K IQ2_XXS
"""

from __future__ import annotations

import argparse
import statistics
import time

import mlx.core as mx
import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as QT

from ds4 import codecs, quant

TYPES = ("F32", "F16", "Q8_0", "Q4_K", "Q2_K", "IQ2_XXS")


def weight_bytes(rng: np.random.Generator, qtype: QT, size: int) -> np.ndarray:
    """A size x size weight in GGUF form with std 1/sqrt(size): typed for F16/F32, else bytes."""
    std = 1 / np.sqrt(size)
    if qtype in (QT.F32, QT.F16):
        return (rng.standard_normal((size, size)) * std).astype(np.float32 if qtype == QT.F32 else np.float16)
    n_blocks = codecs.row_bytes(qtype, size) * size // GGML_QUANT_SIZES[qtype][1]
    return codecs.random_blocks(rng, qtype, n_blocks, std).reshape(size, -1)


def median_seconds(fn, repeats: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench_type(qtype: QT, size: int, repeats: int, rng: np.random.Generator) -> dict:
    data = weight_bytes(rng, qtype, size)
    gguf_bytes = data.nbytes
    w = quant.QuantWeight(data, qtype, (size, size))
    blocks = mx.array(data.view(np.uint8))
    mx.eval(blocks)
    xs = {m: mx.array(rng.standard_normal((m, size)).astype(np.float32)) for m in (1, 16)}
    path = "affine" if w.bits else ("float" if qtype in (QT.F32, QT.F16) else "dequant")

    gbps = lambda s: gguf_bytes / s / 1e9  # noqa: E731
    if qtype == QT.F32:  # decoding F32 is a zero-copy view: nothing to time
        deq = {"np deq": "view", "mx deq": "view"}
    else:
        deq = {
            "np deq": gbps(median_seconds(lambda: codecs.dequantize(data, qtype), max(1, repeats // 3), warmup=1)),
            "mx deq": gbps(median_seconds(lambda: mx.eval(quant.dequantize(blocks, qtype, size)), repeats)),
        }
    return {
        "type": qtype.name,
        "path": path,
        "dev MB": w.nbytes / 2**20,
        **deq,
        "M=1": gbps(median_seconds(lambda: mx.eval(w(xs[1])), repeats)),
        "M=16": gbps(median_seconds(lambda: mx.eval(w(xs[16])), repeats)),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=4096, help="weight is size x size (multiple of 256)")
    ap.add_argument("--repeats", type=int, default=10, help="timed calls per measurement (median)")
    ap.add_argument("--types", nargs="+", default=list(TYPES), choices=TYPES)
    args = ap.parse_args()

    rng = np.random.default_rng(0)
    print(f"device {mx.default_device()}, weight {args.size} x {args.size}, median of {args.repeats}")
    cols = ("type", "path", "dev MB", "np deq", "mx deq", "M=1", "M=16")
    print("".join(f"{c:>9}" for c in cols) + "   (GB/s of GGUF bytes)")
    for name in args.types:
        r = bench_type(QT[name], args.size, args.repeats, rng)
        print("".join(f"{r[c]:>9}" if isinstance(r[c], str) else f"{r[c]:>9.2f}" for c in cols), flush=True)


if __name__ == "__main__":
    main()
