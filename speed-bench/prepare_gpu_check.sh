#!/usr/bin/env bash
# Prepares the wheels speed-bench/gpu_check.sh installs on the offline CUDA machine (run from the
# project root, with network): MLX + mlx-cuda-13 split into .whl/p1 and .whl/p2 by the shared
# tool, plus gguf (pure Python) and PyYAML (which gguf imports) for Python 3.12 in .whl/p1.
set -euo pipefail
bash ../shared/tools/prepare-mlx-cuda-wheels.sh "${1:-0.32.4}"
${PYTHON:-python3} -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl/p1 "gguf==0.19.0" "pyyaml>=5.1"
du -sh .whl/p1 .whl/p2
