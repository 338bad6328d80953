"""GGUF container reader: a lazy header parser over a read-only memory map.

The real DS4 Flash file carries a 129,280-entry token table and 127,741 merges in its metadata;
gguf-py's `GGUFReader` decodes every value eagerly (~10 s, ~480 MB). Here the header walk only
records where each value starts: scalars and arrays are decoded when asked for, tensor data is a
numpy view into the mapping and is never copied. Opening touches only the header pages.

GGUF lists tensor dims fastest-first (`dims[0]` is the row length); `GGUFTensor.dims` keeps that
order and `GGUFTensor.data()` reverses it for the numpy view, with quantized rows as raw bytes.

Every malformed input raises `GGUFError` with the file name and what was expected; nothing here
asserts or exits.
"""

from __future__ import annotations

import mmap
import os
import stat
import struct
from dataclasses import dataclass
from enum import IntEnum
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from ds4.atomic import atomic_write
from ds4.errors import GGUFError

GGUF_MAGIC = 0x46554747  # "GGUF" little-endian
GGUF_VERSION = 3
DEFAULT_ALIGNMENT = 32
MIN_ALIGNMENT = 8
MAX_DIMS = 8
MAX_ARRAY_NESTING = 8


class ValueType(IntEnum):
    UINT8 = 0
    INT8 = 1
    UINT16 = 2
    INT16 = 3
    UINT32 = 4
    INT32 = 5
    FLOAT32 = 6
    BOOL = 7
    STRING = 8
    ARRAY = 9
    UINT64 = 10
    INT64 = 11
    FLOAT64 = 12


_SCALAR_DTYPE = {
    ValueType.UINT8: np.dtype("<u1"),
    ValueType.INT8: np.dtype("<i1"),
    ValueType.UINT16: np.dtype("<u2"),
    ValueType.INT16: np.dtype("<i2"),
    ValueType.UINT32: np.dtype("<u4"),
    ValueType.INT32: np.dtype("<i4"),
    ValueType.FLOAT32: np.dtype("<f4"),
    ValueType.BOOL: np.dtype("<u1"),
    ValueType.UINT64: np.dtype("<u8"),
    ValueType.INT64: np.dtype("<i8"),
    ValueType.FLOAT64: np.dtype("<f8"),
}

INTEGER_TYPES = frozenset({ValueType.UINT8, ValueType.INT8, ValueType.UINT16, ValueType.INT16,
                           ValueType.UINT32, ValueType.INT32, ValueType.UINT64, ValueType.INT64})
FLOAT_TYPES = frozenset({ValueType.FLOAT32, ValueType.FLOAT64})

_TYPED_TENSORS = {
    GGMLQuantizationType.F32: np.dtype("<f4"),
    GGMLQuantizationType.F16: np.dtype("<f2"),
    GGMLQuantizationType.I32: np.dtype("<i4"),
}


def _file_kind(mode: int) -> str:
    for test, kind in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return kind
    return "another kind of file"


def type_name(value_type: int) -> str:
    try:
        return ValueType(value_type).name.lower()
    except ValueError:
        return f"type {value_type}"


def qtype_name(qtype: int) -> str:
    try:
        return GGMLQuantizationType(qtype).name
    except ValueError:
        return f"ggml type {qtype}"


@dataclass(frozen=True)
class Field:
    """A metadata entry: its value type, element type for arrays, and where its value starts."""

    key: str
    type: ValueType
    offset: int  # file offset of the value (after the u32 type tag)
    item_type: ValueType | None = None  # arrays only
    count: int = 0  # arrays only


@dataclass(frozen=True)
class GGUFTensor:
    """A tensor directory entry. `dims` is in GGUF order (row length first)."""

    name: str
    qtype: int
    dims: tuple[int, ...]
    offset: int  # absolute file offset of the data
    n_bytes: int
    file: "GGUFFile"

    @property
    def type_name(self) -> str:
        return qtype_name(self.qtype)

    @property
    def n_elements(self) -> int:
        n = 1
        for d in self.dims:
            n *= d
        return n

    def release(self) -> None:
        """Let the pages of this tensor's bytes go from the process (after its data was copied
        to the device): they stay in the page cache, and a later `data()` reads them back."""
        self.file.release_range(self.offset, self.n_bytes)

    def data(self) -> np.ndarray:
        """A read-only numpy view of the tensor bytes, dims reversed (outermost first).

        F32/F16/I32 come back typed; quantized types as uint8 with the row's byte length last.
        """
        shape = tuple(reversed(self.dims))
        dtype = _TYPED_TENSORS.get(self.qtype)
        if dtype is None:
            block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(self.qtype)]
            shape = shape[:-1] + (shape[-1] // block * type_size,)
            dtype = np.dtype(np.uint8)
        count = self.n_bytes // dtype.itemsize
        return np.frombuffer(self.file.buffer, dtype=dtype, count=count, offset=self.offset).reshape(shape)


def tensor_nbytes(qtype: int, dims: tuple[int, ...]) -> int | None:
    """Byte size of a tensor, or None for a type this reader does not know."""
    try:
        block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(qtype)]
    except (ValueError, KeyError):
        return None
    n = 1
    for d in dims:
        n *= d
    return (n + block - 1) // block * type_size


class _Cursor:
    """Bounds-checked little-endian reads from the mapping; running off the end is a truncation."""

    def __init__(self, gguf: "GGUFFile", pos: int = 0):
        self.buf = gguf.buffer
        self.size = gguf.size
        self.path = gguf.path
        self.pos = pos

    def need(self, n: int, what: str) -> None:
        if n < 0 or self.pos + n > self.size:
            raise GGUFError(self.path, f"truncated GGUF file at byte {self.pos} (reading {what})",
                            f"{n} more bytes")

    def unpack(self, fmt: str, what: str):
        n = struct.calcsize(fmt)
        self.need(n, what)
        vals = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += n
        return vals

    def u32(self, what: str) -> int:
        return self.unpack("<I", what)[0]

    def u64(self, what: str) -> int:
        return self.unpack("<Q", what)[0]

    def string(self, what: str) -> str:
        start = self.pos
        n = self.u64(what)
        self.need(n, what)
        raw = bytes(self.buf[self.pos:self.pos + n])
        self.pos += n
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise GGUFError(self.path, f"invalid UTF-8 in {what} at byte {start}", "a UTF-8 string") from None

    def skip_string(self, what: str) -> None:
        n = self.u64(what)
        self.need(n, what)
        self.pos += n

    def value_type(self, what: str) -> ValueType:
        at = self.pos
        raw = self.u32(what)
        try:
            return ValueType(raw)
        except ValueError:
            raise GGUFError(self.path, f"unknown GGUF metadata type {raw} at byte {at}",
                            "a type id 0..12") from None


class GGUFFile:
    """A GGUF file opened over a read-only memory map.

    Attributes:
        path: the file path as given.
        version: the GGUF version (always 3 after a successful open).
        alignment: tensor data alignment (`general.alignment`, default 32).
        fields: metadata entries by key (values decoded lazily by `get`).
        tensors: tensor directory entries by name, in file order.
        data_offset: absolute offset of the tensor data section.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = str(path)
        self._mmap = None
        try:
            # Non-blocking, so a FIFO given as the model is refused instead of waiting for a writer.
            fd = os.open(self.path, os.O_RDONLY | os.O_NONBLOCK)
            try:
                st = os.fstat(fd)
                if not stat.S_ISREG(st.st_mode):
                    raise GGUFError(self.path, f"not a regular file ({_file_kind(st.st_mode)})",
                                    "a GGUF file (it is memory-mapped)")
                self.size = st.st_size
                if self.size < 24:
                    raise GGUFError(self.path, f"file is too small to be GGUF ({self.size} bytes)",
                                    "at least a 24-byte header")
                self._mmap = mmap.mmap(fd, 0, access=mmap.ACCESS_READ)
            finally:
                os.close(fd)
        except OSError as e:
            raise GGUFError(self.path, f"cannot open model: {e.strerror or e}") from None
        self.buffer = memoryview(self._mmap)
        self.fields: dict[str, Field] = {}
        self.tensors: dict[str, GGUFTensor] = {}
        self._parse()

    def release_range(self, offset: int, n_bytes: int) -> None:
        """madvise(DONTNEED) the whole pages inside [offset, offset + n_bytes) of the mapping."""
        page = mmap.PAGESIZE
        start = -(-offset // page) * page
        end = (offset + n_bytes) // page * page
        if self._mmap is not None and end > start and hasattr(self._mmap, "madvise"):
            self._mmap.madvise(mmap.MADV_DONTNEED, start, end - start)

    # -- parsing ---------------------------------------------------------------------------------

    def _parse(self) -> None:
        cur = _Cursor(self)
        magic, self.version = cur.unpack("<II", "header")
        if magic != GGUF_MAGIC:
            raise GGUFError(self.path, f"not a GGUF file (magic 0x{magic:08x})", "magic 'GGUF'")
        if self.version != GGUF_VERSION:
            raise GGUFError(self.path, f"unsupported GGUF version {self.version}", f"version {GGUF_VERSION}")
        n_tensors, n_kv = cur.unpack("<QQ", "header")
        for _ in range(n_kv):
            self._parse_field(cur)
        self.alignment = DEFAULT_ALIGNMENT
        if "general.alignment" in self.fields:
            field = self.fields["general.alignment"]
            align = self.get("general.alignment")
            # The GGUF spec asks for a multiple of 8, which also aligns every element type (f32, i32).
            if field.type != ValueType.UINT32 or align < MIN_ALIGNMENT or align & (align - 1):
                raise GGUFError(self.path, f"bad general.alignment {align!r} ({type_name(field.type)})",
                                f"a power of two >= {MIN_ALIGNMENT} stored as uint32")
            self.alignment = align
        infos = [self._parse_tensor_info(cur) for _ in range(n_tensors)]
        self.data_offset = -(-cur.pos // self.alignment) * self.alignment
        for name, dims, qtype, rel in infos:
            self._add_tensor(name, dims, qtype, rel)
        self._check_overlaps()

    def _parse_field(self, cur: _Cursor) -> None:
        key_at = cur.pos
        key = cur.string("metadata key")
        vtype = cur.value_type(f"type of metadata key {key}")
        field = Field(key, vtype, cur.pos)
        if vtype == ValueType.ARRAY:
            item_type = cur.value_type(f"array type of metadata key {key}")
            count = cur.u64(f"array length of metadata key {key}")
            field = Field(key, vtype, cur.pos, item_type, count)
            self._skip_array(cur, item_type, count, key, depth=1)
        else:
            self._skip_value(cur, vtype, key, depth=0)
        if key in self.fields:
            raise GGUFError(self.path, f"duplicate metadata key {key} at byte {key_at}", "unique keys")
        self.fields[key] = field

    def _skip_value(self, cur: _Cursor, vtype: ValueType, key: str, depth: int) -> None:
        if vtype == ValueType.STRING:
            cur.skip_string(f"value of metadata key {key}")
        elif vtype == ValueType.ARRAY:
            item_type = cur.value_type(f"array type of metadata key {key}")
            count = cur.u64(f"array length of metadata key {key}")
            self._skip_array(cur, item_type, count, key, depth + 1)
        else:
            n = _SCALAR_DTYPE[vtype].itemsize
            cur.need(n, f"value of metadata key {key}")
            cur.pos += n

    def _skip_array(self, cur: _Cursor, item_type: ValueType, count: int, key: str, depth: int) -> None:
        if depth > MAX_ARRAY_NESTING:
            raise GGUFError(self.path, f"metadata array nesting too deep in key {key} at byte {cur.pos}",
                            f"at most {MAX_ARRAY_NESTING} levels")
        if item_type in _SCALAR_DTYPE:
            cur.need(count * _SCALAR_DTYPE[item_type].itemsize, f"array of metadata key {key}")
            cur.pos += count * _SCALAR_DTYPE[item_type].itemsize
            return
        # Strings and nested arrays: every element is at least 8 bytes, so a corrupt count fails
        # fast instead of looping for ever.
        cur.need(count * 8, f"array of metadata key {key}")
        if item_type == ValueType.STRING:
            buf, pos, size = cur.buf, cur.pos, cur.size
            for _ in range(count):
                if pos + 8 > size:
                    cur.pos = pos
                    cur.need(8, f"array of metadata key {key}")
                n = int.from_bytes(buf[pos:pos + 8], "little")
                pos += 8 + n
                if pos > size:
                    cur.pos = pos - n
                    cur.need(n, f"array of metadata key {key}")
            cur.pos = pos
            return
        for _ in range(count):
            self._skip_value(cur, item_type, key, depth)

    def _parse_tensor_info(self, cur: _Cursor) -> tuple[str, tuple[int, ...], int, int]:
        name = cur.string("tensor name")
        ndim = cur.u32(f"dimension count of tensor {name}")
        if not 1 <= ndim <= MAX_DIMS:
            raise GGUFError(self.path, f"tensor {name} has {ndim} dimensions", f"1..{MAX_DIMS}")
        dims = cur.unpack(f"<{ndim}Q", f"dims of tensor {name}")
        qtype = cur.u32(f"type of tensor {name}")
        rel = cur.u64(f"offset of tensor {name}")
        return name, tuple(dims), qtype, rel

    def _add_tensor(self, name: str, dims: tuple[int, ...], qtype: int, rel: int) -> None:
        if name in self.tensors:
            raise GGUFError(self.path, f"duplicate tensor {name}", "unique tensor names")
        n_elems = 1
        for d in dims:
            n_elems *= d
        if n_elems >= 1 << 62:
            raise GGUFError(self.path, f"tensor {name} element count overflows ({list(dims)})",
                            "fewer than 2^62 elements")
        n_bytes = tensor_nbytes(qtype, dims)
        if n_bytes is not None:
            block = GGML_QUANT_SIZES[GGMLQuantizationType(qtype)][0]
            if dims[0] % block:
                raise GGUFError(self.path, f"tensor {name} row length {dims[0]} is not a multiple of "
                                f"the {qtype_name(qtype)} block", f"a multiple of {block}")
        if rel % self.alignment:
            raise GGUFError(self.path, f"{name}: data offset {rel} is not aligned",
                            f"a multiple of general.alignment {self.alignment}")
        offset = self.data_offset + rel
        # An unknown type gets size 0 here; the layout check rejects it if the model needs it.
        if offset + (n_bytes or 0) > self.size:
            raise GGUFError(self.path, f"tensor {name} data ends at byte {offset + (n_bytes or 0)} past "
                            f"the end of the file ({self.size} bytes; truncated?)",
                            "tensor data inside the file")
        self.tensors[name] = GGUFTensor(name, qtype, dims, offset, n_bytes or 0, self)

    def _check_overlaps(self) -> None:
        """Tensor data ranges must be disjoint: a tensor sharing another's bytes is a corrupt table."""
        spans = sorted((t.offset, t.offset + t.n_bytes, t.name) for t in self.tensors.values() if t.n_bytes)
        for (_, end, name), (start, _, nxt) in zip(spans, spans[1:]):
            if start < end:
                raise GGUFError(self.path, f"{nxt}: data at byte {start} overlaps tensor {name} "
                                f"(which ends at byte {end})", "disjoint tensor data")

    # -- metadata access --------------------------------------------------------------------------

    def get(self, key: str, default: Any = None) -> Any:
        """Decode one metadata value: int/float/bool/str, a numpy array for numeric arrays, or a
        list for string and nested arrays. Returns `default` when the key is absent."""
        field = self.fields.get(key)
        if field is None:
            return default
        cur = _Cursor(self, field.offset)
        if field.type == ValueType.ARRAY:
            return self._read_array(cur, field.item_type, field.count, key)
        return self._read_value(cur, field.type, key)

    def _read_value(self, cur: _Cursor, vtype: ValueType, key: str) -> Any:
        if vtype == ValueType.STRING:
            return cur.string(f"value of metadata key {key}")
        if vtype == ValueType.ARRAY:
            item_type = cur.value_type(key)
            count = cur.u64(key)
            return self._read_array(cur, item_type, count, key)
        dtype = _SCALAR_DTYPE[vtype]
        cur.need(dtype.itemsize, key)
        value = np.frombuffer(self.buffer, dtype=dtype, count=1, offset=cur.pos)[0].item()
        cur.pos += dtype.itemsize
        return bool(value) if vtype == ValueType.BOOL else value

    def _read_array(self, cur: _Cursor, item_type: ValueType, count: int, key: str) -> Any:
        if item_type in _SCALAR_DTYPE:
            dtype = _SCALAR_DTYPE[item_type]
            cur.need(count * dtype.itemsize, key)
            arr = np.frombuffer(self.buffer, dtype=dtype, count=count, offset=cur.pos)
            cur.pos += count * dtype.itemsize
            return arr.astype(bool) if item_type == ValueType.BOOL else arr
        return [self._read_value(cur, item_type, key) for _ in range(count)]

    def close(self) -> None:
        """Release the mapping (only once no tensor views are alive)."""
        self.buffer.release()
        if self._mmap is not None:
            self._mmap.close()
            self._mmap = None

    def __enter__(self) -> "GGUFFile":
        return self

    def __exit__(self, *exc) -> None:
        try:
            self.close()
        except BufferError:
            pass  # numpy views still alive: the mapping goes when they do


# -- writing -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class TensorOut:
    """A tensor to write: `chunks()` yields its bytes in order (so giant tensors stream)."""

    name: str
    dims: tuple[int, ...]  # GGUF order
    qtype: int
    chunks: Any  # callable returning an iterator of numpy arrays / bytes


def _pack_string(s: str) -> bytes:
    raw = s.encode("utf-8")
    return struct.pack("<Q", len(raw)) + raw


def _pack_value(vtype: ValueType, value: Any, item_type: ValueType | None = None) -> bytes:
    if vtype == ValueType.STRING:
        return _pack_string(value)
    if vtype == ValueType.ARRAY:
        head = struct.pack("<IQ", item_type, len(value))
        if item_type == ValueType.STRING:
            return head + b"".join(_pack_string(v) for v in value)
        return head + np.asarray(value, dtype=_SCALAR_DTYPE[item_type]).tobytes()
    return np.asarray(value, dtype=_SCALAR_DTYPE[vtype]).tobytes()


def write_gguf(path: str | os.PathLike, metadata: list[tuple[str, ValueType, Any, ValueType | None]],
               tensors: list[TensorOut], alignment: int = DEFAULT_ALIGNMENT, progress=None) -> None:
    """Write a GGUF v3 file, streaming tensor data; the file appears only when complete.

    `metadata` holds (key, value type, value, array item type or None). `progress(n_bytes)` is
    called after each chunk. On any error (or Ctrl+C) the partial file is removed.
    """
    offsets, rel = [], 0
    for t in tensors:
        offsets.append(rel)
        rel += -(-tensor_nbytes(t.qtype, t.dims) // alignment) * alignment
    header = [struct.pack("<IIQQ", GGUF_MAGIC, GGUF_VERSION, len(tensors), len(metadata))]
    for key, vtype, value, item_type in metadata:
        header.append(_pack_string(key) + struct.pack("<I", vtype) + _pack_value(vtype, value, item_type))
    for t, off in zip(tensors, offsets):
        header.append(_pack_string(t.name) + struct.pack(f"<I{len(t.dims)}QIQ", len(t.dims), *t.dims, t.qtype, off))
    header = b"".join(header)
    with atomic_write(path) as f:  # counts bytes itself: a FIFO or a device has no position
        f.write(header + b"\0" * (-len(header) % alignment))
        for t in tensors:
            expected = tensor_nbytes(t.qtype, t.dims)
            written = 0
            for chunk in t.chunks():
                data = chunk.tobytes() if isinstance(chunk, np.ndarray) else bytes(chunk)
                f.write(data)
                written += len(data)
                if progress is not None:
                    progress(len(data))
            if written != expected:
                raise ValueError(f"tensor {t.name}: wrote {written} bytes, expected {expected}")
            f.write(b"\0" * (-written % alignment))
