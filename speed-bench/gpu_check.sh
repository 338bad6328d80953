#!/usr/bin/env bash
# GPU check of the fused kernels on the lent CUDA machine (CUDA 13, Python 3.12, no MLX, no gguf,
# no package index; the repo arrives as a working tree, $OUT comes back). Each transfer carries at
# most 64 MiB, so the wheels prepared by speed-bench/prepare_gpu_check.sh travel in two runs:
#
#   bash speed-bench/gpu_check.sh keep   # run 1, carry .whl/p1: keeps the mlx wheel, part.aa and
#                                        #   the gguf/pyyaml wheels in /tmp/keep
#   bash speed-bench/gpu_check.sh run    # run 2, carry .whl/p2: joins part.aa + part.ab, installs
#                                        #   into /tmp/site, writes a real-width slice, runs
#                                        #   speed-bench/gpu_check.py (kernel checks, then decode /
#                                        #   verify / prefill fused vs reference)
#
# Results: $OUT/gpu_check.txt (one line), $OUT/gpu_check.json, $OUT/gpu_check.log. About 5-7 min;
# SLICE_LAYERS / SLICE_EXPERTS (default 4 / 256) shrink the slice if time is short.
set -euo pipefail
stage=${1:-run}
KEEP=${KEEP:-/tmp/keep}
SITE=${SITE:-/tmp/site}
OUT=${OUT:-$PWD/out}
PY=${PY:-python3}

case "$stage" in
keep)
    mkdir -p "$KEEP"
    cp .whl/p1/* "$KEEP"/
    ls -la "$KEEP"
    exit 0 ;;
run) ;;
*) echo "usage: $0 keep|run" >&2; exit 2 ;;
esac

mkdir -p "$OUT"
exec > >(tee "$OUT/gpu_check.log") 2>&1
t0=$(date +%s)
if [ ! -f "$SITE/.ds4-installed" ]; then
    wheel=$(cat .whl/p2/WHEEL_NAME)
    cat "$KEEP/part.aa" .whl/p2/part.ab > "$KEEP/$wheel"
    rm -f "$KEEP/part.aa"
    if $PY -m pip --version >/dev/null 2>&1; then
        $PY -m pip install -q --no-index --no-deps --target "$SITE" "$KEEP"/*.whl
    else  # no pip: a wheel is a zip of its install tree (none of these needs install-time scripts)
        $PY -c 'import sys, zipfile; [zipfile.ZipFile(w).extractall(sys.argv[1]) for w in sys.argv[2:]]' "$SITE" "$KEEP"/*.whl
    fi
    touch "$SITE/.ds4-installed"
fi
export PYTHONPATH="$SITE:$PWD"
$PY -c 'import mlx.core as mx, gguf; print("mlx", mx.__version__, "cuda", mx.cuda.is_available())'
echo "install: $(( $(date +%s) - t0 )) s"

slice=/tmp/ds4-slice-${SLICE_LAYERS:-4}-${SLICE_EXPERTS:-256}.gguf
if [ ! -f "$slice" ]; then
    timeout 300 $PY -m ds4.synth "slice-${SLICE_LAYERS:-4}" --experts "${SLICE_EXPERTS:-256}" -o "$slice"
fi
echo "slice: $(( $(date +%s) - t0 )) s, $(du -h "$slice" | cut -f1)"
rc=0
timeout "${CHECK_TIMEOUT:-300}" $PY speed-bench/gpu_check.py --model "$slice" --out "$OUT" || rc=$?
echo "total: $(( $(date +%s) - t0 )) s, rc $rc"
exit $rc
