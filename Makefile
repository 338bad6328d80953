# Set-up, tests and benchmarks. `make install` creates .venv and installs ds4 with its test extras.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: install test test-all bench quality oracle train clean gpu-check gpu-check-keep gpu-check-prepare

install:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip
	$(BIN)/python -m pip install -e '.[test]'

# The default suite: everything but tests marked slow (each covered by a faster test).
test:
	$(BIN)/python -m pytest -q -m "not slow"

test-all:
	$(BIN)/python -m pytest -q

bench:
	$(BIN)/python speed-bench/bench_codecs.py
	$(BIN)/python speed-bench/bench_open.py
	$(BIN)/python speed-bench/bench_forward.py
	$(BIN)/python speed-bench/bench_mtp.py

# Quality bars of the embedded demo model (float vs quantized perplexity, MTP acceptance, plain
# vs speculative tokens/s); the float rows need the checkpoint `make train` writes.
quality:
	$(BIN)/python speed-bench/quality_small.py $(if $(wildcard build/train/small.safetensors),--checkpoint build/train/small.safetensors) \
		$(if $(wildcard build/train/ds4-small-q4.gguf),--q4 build/train/ds4-small-q4.gguf)

# Oracle checks through the engine: DS4_TEST_MODEL / DS4_TEST_MTP / DS4_TEST_VECTOR_FILE, by default
# ./ds4flash.gguf or else the embedded demo model with its MTP head and logprob vectors.
oracle:
	$(BIN)/ds4-test --all

# Retrain the embedded demo model on the CPU in the stages it was trained in (~95 min on 2 cores;
# README: "The embedded demo model"); the GGUFs land in build/train/.
train:
	$(BIN)/ds4-train --steps 1000 --out build/train/stage1.safetensors
	$(BIN)/ds4-train --resume build/train/stage1.safetensors --steps 500 --lr 2e-3 --seed 2 \
		--mtp-distill-steps 300 --out build/train/stage2.safetensors
	$(BIN)/ds4-train --resume build/train/stage2.safetensors --steps 0 --seed 3 --mtp-distill-steps 600 \
		--out build/train/small.safetensors --export-dir build/train

# Fused kernels on a CUDA machine (speed-bench/README.md, "GPU check"): prepare the wheels here,
# then two runs there, the first carrying .whl/p1 (gpu-check-keep), the second .whl/p2 (gpu-check).
gpu-check-prepare:
	bash speed-bench/prepare_gpu_check.sh

gpu-check-keep:
	bash speed-bench/gpu_check.sh keep

gpu-check:
	bash speed-bench/gpu_check.sh run

clean:
	rm -rf build dist *.egg-info .pytest_cache .hypothesis
