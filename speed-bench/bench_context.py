#!/usr/bin/env python3
"""Decode cost against the allocated context and against the position, through `ds4-bench`.

1. The same frontiers with two allocations (default 4K and 1M): a step's cost must follow the
   position, not the allocation (target: decode t/s within 10 %).
2. Frontiers 512 -> 32K (x2): decode t/s at 32K over decode t/s at 512 (target >= 0.8; the
   reference engine keeps 0.87 from 2K to 32K on Apple GPUs).

Runs on the embedded model by default; every ds4-bench CSV is printed as it comes.

    python speed-bench/bench_context.py
    python speed-bench/bench_context.py --model m.gguf --gen-tokens 64 --max 65536
"""

from __future__ import annotations

import argparse
import csv
import io
import subprocess
import sys
from pathlib import Path

CORPUS = Path(__file__).with_name("promessi_sposi.txt")


def sweep(args, *flags: str) -> list[dict]:
    cmd = [str(Path(sys.executable).with_name("ds4-bench")), "--prompt-file", str(CORPUS),
           "-n", str(args.gen_tokens), *flags]
    if args.model:
        cmd += ["-m", args.model]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    print(f"$ ds4-bench {' '.join(cmd[1:])}\n{out}", flush=True)
    return list(csv.DictReader(io.StringIO(out)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="GGUF (default: the embedded demo model)")
    ap.add_argument("--gen-tokens", type=int, default=64)
    ap.add_argument("--small-alloc", type=int, default=4096)
    ap.add_argument("--large-alloc", type=int, default=1 << 20)
    ap.add_argument("--max", type=int, default=32768, help="last frontier of the position sweep")
    args = ap.parse_args()

    top = (args.small_alloc - args.gen_tokens - 1) // 1024 * 1024
    points = ["--ctx-start", "1024", "--ctx-max", str(top), "--step-incr", "1024"]
    small = sweep(args, *points, "--ctx-alloc", str(args.small_alloc))
    large = sweep(args, *points, "--ctx-alloc", str(args.large_alloc))
    print("allocation: decode t/s with the large allocation over the small one, per frontier")
    for a, b in zip(small, large):
        print(f"  ctx {a['ctx_tokens']:>6}: {float(b['gen_tps']) / float(a['gen_tps']):.3f}")

    rows = sweep(args, "--ctx-start", "512", "--ctx-max", str(args.max), "--step-mul", "2")
    base = float(rows[0]["gen_tps"])
    print("position: decode t/s over the 512-token frontier's")
    for r in rows:
        print(f"  ctx {r['ctx_tokens']:>6}: {float(r['gen_tps']) / base:.3f}")


if __name__ == "__main__":
    main()
