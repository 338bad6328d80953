"""Shared fixtures: synthetic DS4 models written once per test session."""

from __future__ import annotations

import errno
import os
import stat

# The bundled reference BLAS computes every output row with the same reduction whatever the
# batch, so decode and prefill agree bit for bit and the exactness tests can hold tight bounds.
# An optimized BLAS (ds4 preloads the system OpenBLAS when present) reorders sums; through the
# model's FP8/FP4 round-trips and the indexer's top-k that noise can flip discrete choices.
# The non-rounding checks in test_model.py cover that case with any BLAS.
os.environ.setdefault("DS4_BLAS", "none")

import pytest  # noqa: E402

from ds4 import synth  # noqa: E402


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


@pytest.fixture(scope="session")
def full_device(tmp_path_factory):
    """A path to the "full" character device (every write fails with ENOSPC) for output tests, or
    None where there is none. Where /dev is writable (root), a private node: if writing through
    devices ever regressed to write-then-rename, a test would otherwise replace /dev/full."""
    if not os.access("/dev", os.W_OK):
        return "/dev/full" if os.path.exists("/dev/full") else None
    path = tmp_path_factory.mktemp("dev") / "full"
    try:
        os.mknod(path, stat.S_IFCHR | 0o666, os.makedev(1, 7))
        with open(path, "w") as f:
            f.write("x")
            f.flush()
    except OSError as e:
        if e.errno != errno.ENOSPC:  # anything else: no device node here (no CAP_MKNOD, a nodev mount)
            return None
    return str(path)
