"""Shared fixtures: synthetic DS4 models written once per test session."""

from __future__ import annotations

import pytest

from ds4 import synth


@pytest.fixture(scope="session")
def tiny_paths(tmp_path_factory):
    """(base, mtp) paths of the `tiny` preset, seed 7."""
    d = tmp_path_factory.mktemp("tiny")
    base, mtp = d / "tiny.gguf", d / "tiny-mtp.gguf"
    synth.write_preset("tiny", str(base), str(mtp), seed=7)
    return base, mtp


@pytest.fixture(scope="session")
def tiny_vocab():
    return synth.make_vocab("synthetic", synth.TINY_VOCAB)
