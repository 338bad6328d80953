"""The GGUF container: our reader and writer against gguf-py, and every malformed-input error."""

from __future__ import annotations

import struct

import gguf as gguf_py
import numpy as np
import pytest
from gguf import GGMLQuantizationType as QT

from ds4.errors import GGUFError
from ds4.gguf import GGUFFile, TensorOut, ValueType, write_gguf

META = [
    ("general.architecture", ValueType.STRING, "deepseek4", None),
    ("general.alignment", ValueType.UINT32, 64, None),
    ("t.u8", ValueType.UINT8, 200, None),
    ("t.i8", ValueType.INT8, -5, None),
    ("t.u16", ValueType.UINT16, 65000, None),
    ("t.i16", ValueType.INT16, -30000, None),
    ("t.u32", ValueType.UINT32, 4_000_000_000, None),
    ("t.i32", ValueType.INT32, -2_000_000_000, None),
    ("t.f32", ValueType.FLOAT32, 1.5, None),
    ("t.bool", ValueType.BOOL, True, None),
    ("t.str", ValueType.STRING, "città ｜DSML｜ 😀", None),
    ("t.u64", ValueType.UINT64, 2**40 + 3, None),
    ("t.i64", ValueType.INT64, -(2**40), None),
    ("t.f64", ValueType.FLOAT64, 0.1, None),
    ("t.arr_i32", ValueType.ARRAY, [0, 0, 4, 128, -1], ValueType.INT32),
    ("t.arr_str", ValueType.ARRAY, ["a", "", "Ġthe", "<｜User｜>"], ValueType.STRING),
    ("t.arr_f32", ValueType.ARRAY, [10.0, 0.5], ValueType.FLOAT32),
]


def _tensors(rng):
    f32 = rng.standard_normal((3, 8)).astype(np.float32)
    f16 = rng.standard_normal((2, 64)).astype(np.float16)
    q8 = rng.integers(0, 256, (4, 2 * 34), dtype=np.uint8)  # 4 rows of 64 elements
    q8[:, 0:2] = np.array([0.01], np.float16).view(np.uint8)
    i32 = rng.integers(0, 16, (5, 6), dtype=np.int32)
    return {"a.f32": (f32, QT.F32, (8, 3)), "b.f16": (f16, QT.F16, (64, 2)),
            "c.q8": (q8, QT.Q8_0, (64, 4)), "d.i32": (i32, QT.I32, (6, 5))}


def _write_ours(path, tensors):
    outs = [TensorOut(name, dims, q, (lambda a=a: iter([a]))) for name, (a, q, dims) in tensors.items()]
    write_gguf(path, META, outs, alignment=64)


def test_writer_reader_round_trip_and_gguf_py_agrees(tmp_path):
    tensors = _tensors(np.random.default_rng(0))
    path = tmp_path / "ours.gguf"
    _write_ours(path, tensors)
    f = GGUFFile(path)
    assert f.alignment == 64 and f.data_offset % 64 == 0
    for key, vtype, value, _ in META:
        got = f.get(key)
        if isinstance(value, list):
            assert list(got) == pytest.approx(value) if vtype != ValueType.STRING else got == value
        elif isinstance(value, float):
            assert got == pytest.approx(value, rel=1e-7)
        else:
            assert got == value
    for name, (arr, qtype, dims) in tensors.items():
        t = f.tensors[name]
        assert t.dims == dims and t.qtype == qtype and t.n_bytes == arr.nbytes
        np.testing.assert_array_equal(t.data(), arr)
    # An independent reader sees the same file.
    ref = gguf_py.GGUFReader(path)
    assert ref.fields["t.str"].contents() == "città ｜DSML｜ 😀"
    assert ref.fields["t.arr_str"].contents() == ["a", "", "Ġthe", "<｜User｜>"]
    for t in ref.tensors:
        assert tuple(int(d) for d in t.shape) == f.tensors[t.name].dims
        assert int(t.data_offset) == f.tensors[t.name].offset
        np.testing.assert_array_equal(np.asarray(t.data).reshape(-1).view(np.uint8),
                                      f.tensors[t.name].data().reshape(-1).view(np.uint8))


def test_reads_files_written_by_gguf_py(tmp_path):
    path = tmp_path / "ref.gguf"
    w = gguf_py.GGUFWriter(path, "deepseek4")
    w.add_uint32("deepseek4.block_count", 7)
    w.add_array("tokenizer.ggml.tokens", ["x", "y", "zz"])
    w.add_float32("deepseek4.rope.freq_base", 10000.0)
    data = np.arange(64, dtype=np.float32).reshape(2, 32)
    w.add_tensor("w", data)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    f = GGUFFile(path)
    assert f.get("general.architecture") == "deepseek4"
    assert f.get("deepseek4.block_count") == 7
    assert f.get("tokenizer.ggml.tokens") == ["x", "y", "zz"]
    assert f.fields["tokenizer.ggml.tokens"].count == 3
    assert f.tensors["w"].dims == (32, 2)
    np.testing.assert_array_equal(f.tensors["w"].data(), data)


def _raw(n_tensors=0, n_kv=0, version=3, magic=b"GGUF", body=b""):
    return magic + struct.pack("<IQQ", version, n_tensors, n_kv) + body


def _kv(key, vtype, payload):
    k = key if isinstance(key, bytes) else key.encode()
    return struct.pack("<Q", len(k)) + k + struct.pack("<I", vtype) + payload


def _ti(name, dims, qtype, off):
    n = name.encode()
    return struct.pack("<Q", len(n)) + n + struct.pack(f"<I{len(dims)}QIQ", len(dims), *dims, qtype, off)


@pytest.mark.parametrize("data, message", [
    (b"", "too small"),
    (b"\0" * 40, "not a GGUF file"),
    (_raw(version=2), "unsupported GGUF version 2, expected version 3"),
    (_raw(n_kv=1), "truncated GGUF file at byte 24"),
    (_raw(n_kv=1, body=_kv("k", 99, b"")), "unknown GGUF metadata type 99"),
    (_raw(n_kv=1, body=_kv("k", 8, struct.pack("<Q", 1000) + b"abc")), "truncated"),
    (_raw(n_kv=1, body=_kv("k", 9, struct.pack("<IQ", 8, 2**40))), "truncated"),
    (_raw(n_kv=2, body=_kv("k", 4, b"\1\0\0\0") * 2), "duplicate metadata key k"),
    (_raw(n_kv=1, body=_kv(b"\xff", 8, struct.pack("<Q", 0))), "invalid UTF-8 in metadata key"),
    (_raw(n_kv=1, body=_kv("general.alignment", 4, struct.pack("<I", 48))), "bad general.alignment 48"),
    (_raw(n_tensors=1, body=_ti("t", (), 0, 0)), "tensor t has 0 dimensions, expected 1..8"),
    (_raw(n_tensors=1, body=_ti("t", (1,) * 9, 0, 0)), "tensor t has 9 dimensions"),
    (_raw(n_tensors=1, body=_ti("t", (8, 4), 0, 0)), "tensor t data ends at byte"),
    (_raw(n_tensors=1, body=_ti("t", (2**40, 2**40), 0, 0)), "element count overflows"),
    (_raw(n_tensors=1, body=_ti("t", (100,), 8, 0)), "row length 100 is not a multiple of the Q8_0 block"),
    (_raw(n_tensors=2, body=_ti("t", (1,), 0, 0) * 2 + b"\0" * 64), "duplicate tensor t"),
    (_raw(n_kv=1, body=_kv("k", 9, struct.pack("<IQ", 9, 1) + struct.pack("<IQ", 9, 1) * 9)), "nesting too deep"),
])
def test_malformed_files_give_one_clear_error(tmp_path, data, message):
    path = tmp_path / "bad.gguf"
    path.write_bytes(data)
    with pytest.raises(GGUFError) as err:
        GGUFFile(path)
    text = str(err.value)
    assert text.startswith(f"{path}: ") and message in text and "\n" not in text


def test_string_values_are_decoded_lazily_and_checked(tmp_path):
    path = tmp_path / "lazy.gguf"
    path.write_bytes(_raw(n_kv=1, body=_kv("k", 8, struct.pack("<Q", 2) + b"\xff\xfe")))
    f = GGUFFile(path)  # the header walk only records where values are
    with pytest.raises(GGUFError, match="invalid UTF-8 in value of metadata key k"):
        f.get("k")


def test_missing_file_is_a_gguf_error(tmp_path):
    with pytest.raises(GGUFError, match="cannot open model"):
        GGUFFile(tmp_path / "nope.gguf")


def test_writer_leaves_nothing_on_failure(tmp_path):
    path = tmp_path / "x.gguf"

    def boom():
        yield np.zeros(4, np.float32)
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_gguf(path, META[:1], [TensorOut("t", (8,), QT.F32, boom)])
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ValueError, match="wrote 16 bytes, expected 32"):
        write_gguf(path, META[:1], [TensorOut("t", (8,), QT.F32, lambda: iter([np.zeros(4, np.float32)]))])
    assert list(tmp_path.iterdir()) == []
