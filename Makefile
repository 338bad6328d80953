# Set-up, tests and benchmarks. `make install` creates .venv and installs ds4 with its test extras.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: install test test-all bench oracle clean

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

# Oracle checks through the engine (DS4_TEST_MODEL, DS4_TEST_MTP, DS4_TEST_VECTOR_FILE); a missing
# model is a skip. Joins CI once the package ships a trained default model.
oracle:
	$(BIN)/ds4-test --all

clean:
	rm -rf build dist *.egg-info .pytest_cache .hypothesis
