"""Fuzzing the loader: mutated headers, metadata, tensor tables and truncation.

Whatever the bytes, opening a model ends in a clean load or one `GGUFError` line naming the file:
never another exception, never a traceback at the CLI.
"""

from __future__ import annotations

import struct

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from ds4.errors import GGUFError
from ds4.gguf import GGUFFile
from ds4.loader import open_model, open_mtp

from test_loader import write_variant

INTERESTING = [0, 1, 2, 3, 4, 7, 8, 9, 12, 13, 31, 255, 256, 65535, 2**31 - 1, 2**31, 2**32 - 1, 2**32,
               2**62, 2**63, 2**64 - 1]


@pytest.fixture(scope="module")
def pristine(tmp_path_factory, tiny_vocab):
    path = write_variant(tmp_path_factory.mktemp("fuzz") / "tiny.gguf", tiny_vocab)
    f = GGUFFile(path)
    # Offsets worth hitting: every metadata value, array header and the tensor table.
    hot = sorted({fld.offset for fld in f.fields.values()} | {fld.offset - 12 for fld in f.fields.values()
                                                              if fld.count})
    header_end = f.data_offset
    data = open(path, "rb").read()
    f.close()
    return data, hot, header_end


def attempt(path, base_config=None):
    """Open as a model (and build its tokenizer); the only failure allowed is a GGUFError."""
    try:
        model = open_model(path)
        for key in model.gguf.fields:
            model.gguf.get(key)
        model.tokenizer()
        open_mtp(path, model.config)  # a base file is not an MTP file: must fail cleanly
    except GGUFError as e:
        msg = str(e)
        assert msg.startswith(f"{path}: ") and "\n" not in msg, msg
        return msg
    return None


mutation = st.one_of(
    st.tuples(st.just("byte"), st.integers(0, 2**31), st.integers(0, 255)),
    st.tuples(st.just("u32"), st.integers(0, 2**31), st.sampled_from(INTERESTING)),
    st.tuples(st.just("u64"), st.integers(0, 2**31), st.sampled_from(INTERESTING)),
)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(mutations=st.lists(mutation, min_size=1, max_size=6), use_hot=st.booleans(),
       cut=st.one_of(st.none(), st.floats(0, 1)))
def test_mutated_files_load_or_fail_cleanly(tmp_path, pristine, mutations, use_hot, cut):
    data, hot, header_end = pristine
    buf = bytearray(data)
    for kind, pos, value in mutations:
        pos = hot[pos % len(hot)] if use_hot else pos % header_end
        if kind == "byte":
            buf[pos] = value
        elif kind == "u32":
            buf[pos:pos + 4] = struct.pack("<I", value % 2**32)
        else:
            buf[pos:pos + 8] = struct.pack("<Q", value % 2**64)
    if cut is not None:
        buf = buf[:int(len(buf) * cut)]
    path = tmp_path / "fuzz.gguf"
    path.write_bytes(bytes(buf))
    attempt(str(path))


def test_every_truncation_point_of_the_header_fails_cleanly(tmp_path, pristine):
    data, hot, header_end = pristine
    path = tmp_path / "cut.gguf"
    for n in list(range(0, 64)) + list(range(64, header_end, max(1, header_end // 200))):
        path.write_bytes(data[:n])
        msg = attempt(str(path))
        assert msg is not None, f"a file cut at byte {n} loaded"
