"""Fuzzing model files: whatever the bytes, a file is refused with one `GGUFError` line naming it,
or it is accepted and generates a token (or stops with one clean error line): never a crash, a
traceback, a hang or an unbounded allocation.

The first tests mutate headers and cut files and only open them. The generation fuzz mutates the
tiny synthetic model, the embedded demo model and both MTP heads where their values are read as
indices or sizes (metadata, the tensor table, the hash-routing rows of the prompt's tokens) and
elsewhere in the tensor data, and generates from every file the loader accepts in a pool of
worker processes (`fuzz_worker.py`) under an address-space limit.
"""

from __future__ import annotations

import json
import os
import select
import shutil
import struct
import subprocess
import sys
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from gguf import GGMLQuantizationType as QT
from hypothesis import HealthCheck, given, settings, strategies as st

from ds4.errors import GGUFError
from ds4.gguf import GGUFFile, ValueType
from ds4.loader import EMBEDDED_MODEL, EMBEDDED_MTP, open_model, open_mtp

import fuzz_worker
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


# -- generation from every accepted mutation ---------------------------------------------------

BATCH = 8  # files per example, spread over the workers
EXAMPLES = 200
MEMORY_LIMIT = 3 << 30  # bytes of address space per worker; the tiny models need ~0.4 GiB
TIMEOUT = 120  # seconds for one file on a loaded 2-core machine; ~0.1 s is usual

SMALL_INTS = list(range(-2, 20)) + [31, 32, 33, 64, 127, 128, 255, 256, 1024, 2047, 2048, 5000, 65535, 1 << 20]
INTS = sorted(set(SMALL_INTS + INTERESTING + [-(2**31), -(2**63)]))
FLOATS = [float("nan"), float("inf"), -float("inf"), 0.0, -0.0, -1.0, 1.0, 3.0, 1e-30, 1e30, 65504.0, 1e38]
F16_BITS = [0x7C00, 0xFC00, 0x7E00, 0x0000, 0x8000, 0x7BFF, 0x0001, 0x3C00]
SCALAR_FORMAT = {ValueType.UINT8: "<B", ValueType.INT8: "<b", ValueType.UINT16: "<H", ValueType.INT16: "<h",
                 ValueType.UINT32: "<I", ValueType.INT32: "<i", ValueType.UINT64: "<Q", ValueType.INT64: "<q",
                 ValueType.FLOAT32: "<f", ValueType.FLOAT64: "<d", ValueType.BOOL: "<B"}


class Source:
    """A pristine file and where to mutate it: `spans[kind]` lists (offset, struct format, count)
    runs of `count` elements. Kinds: `meta` (metadata values, array elements and lengths),
    `table` (tensor dims, types and offsets), `route` (hash-routing entries of the prompt's
    tokens), `header` (any header byte: token and merge strings), `data` (each tensor's data)."""

    def __init__(self, name: str, path: Path, base: Path | None):
        self.name, self.path, self.base = name, path, base
        self.data = path.read_bytes()
        f = GGUFFile(path)
        spans: dict[str, list[tuple[int, str, int]]] = {"meta": [], "table": [], "route": [], "data": [],
                                                          "header": [(0, "<B", f.data_offset)]}
        for fld in f.fields.values():
            if fld.type == ValueType.ARRAY:
                spans["meta"].append((fld.offset - 8, "<Q", 1))  # element count
                if fld.item_type in SCALAR_FORMAT:
                    fmt = SCALAR_FORMAT[fld.item_type]
                    spans["meta"].append((fld.offset, fmt, min(fld.count, 64)))
            elif fld.type == ValueType.STRING:
                spans["meta"].append((fld.offset, "<Q", 1))  # string length
            else:
                spans["meta"].append((fld.offset, SCALAR_FORMAT[fld.type], 1))
        header = self.data[:f.data_offset]
        for t in f.tensors.values():
            name = t.name.encode()
            at = header.index(struct.pack("<Q", len(name)) + name) + 8 + len(name)
            ndim = struct.unpack_from("<I", header, at)[0]
            spans["table"] += [(at + 4, "<Q", ndim), (at + 4 + 8 * ndim, "<I", 1), (at + 8 + 8 * ndim, "<Q", 1)]
            if t.name.endswith("ffn_gate_tid2eid.weight"):
                spans["route"] += [(t.offset + 4 * tok * t.dims[0], "<i", t.dims[0]) for tok in fuzz_worker.PROMPT_IDS]
            fmt = {QT.F32: "<f", QT.F16: "<e", QT.I32: "<i"}.get(t.qtype, "<B")  # quantized: bytes
            spans["data"].append((t.offset, fmt, t.n_bytes // struct.calcsize(fmt)))
        self.spans = {k: v for k, v in spans.items() if v}
        f.close()


def value_for(fmt: str):
    if fmt in ("<f", "<d"):
        return st.sampled_from(FLOATS)
    if fmt == "<e":
        return st.sampled_from(F16_BITS)
    if fmt in ("<B", "<b"):
        return st.integers(0, 255)
    return st.sampled_from(INTS)


def apply(buf: bytearray, offset: int, fmt: str, value) -> None:
    if fmt in ("<f", "<d"):
        struct.pack_into(fmt, buf, offset, value)
        return
    fmt = "<H" if fmt == "<e" else fmt  # F16 as bit patterns
    bits = 8 * struct.calcsize(fmt)
    value %= 1 << bits
    if fmt[1].islower() and value >= 1 << (bits - 1):  # signed formats wrap around
        value -= 1 << bits
    struct.pack_into(fmt, buf, offset, value)


class Workers:
    """Worker processes (`fuzz_worker.py`), each answering one request at a time; a worker that
    dies or stays silent is restarted after the failure is recorded."""

    def __init__(self, n: int, logs: Path):
        self.logs = logs
        self.procs = [self._start(i) for i in range(n)]

    def _start(self, i: int) -> subprocess.Popen:
        with open(self.logs / f"worker{i}.log", "ab") as log:
            return subprocess.Popen([sys.executable, fuzz_worker.__file__, str(MEMORY_LIMIT)], stdin=subprocess.PIPE,
                                    stdout=subprocess.PIPE, stderr=log, text=True)

    def ask(self, i: int, request: dict) -> dict:
        proc = self.procs[i]
        proc.stdin.write(json.dumps(request) + "\n")
        proc.stdin.flush()
        ready, _, _ = select.select([proc.stdout], [], [], TIMEOUT)
        line = proc.stdout.readline() if ready else ""
        if line:
            return json.loads(line)
        if ready:
            code = proc.wait()
            what = f"the worker died ({f'signal {-code}' if code < 0 else f'exit {code}'})"
        else:
            proc.kill()
            proc.wait()
            what = f"no answer within {TIMEOUT} s"
        self.procs[i] = self._start(i)
        return {"status": "crash", "detail": what}

    def close(self) -> None:
        for proc in self.procs:
            proc.stdin.close()
            proc.wait(timeout=60)


@pytest.fixture(scope="module")
def sources(tiny_paths):
    tiny, tiny_mtp = tiny_paths
    return [Source("tiny", tiny, None), Source("embedded", EMBEDDED_MODEL, None),
            Source("tiny-mtp", tiny_mtp, tiny), Source("embedded-mtp", EMBEDDED_MTP, EMBEDDED_MODEL)]


def test_accepted_mutations_generate_without_crashing(tmp_path, sources):
    workers = Workers(min(2, os.cpu_count() or 1), tmp_path)
    kept = tmp_path / "failures"
    totals: Counter = Counter()

    @settings(max_examples=EXAMPLES, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(data=st.data())
    def run(data):
        jobs = []
        for slot in range(BATCH):
            src = data.draw(st.sampled_from(sources), label="source")
            muts = []
            for _ in range(data.draw(st.integers(1, 3), label="mutations")):
                kind = data.draw(st.sampled_from(sorted(src.spans)), label="kind")
                start, fmt, count = data.draw(st.sampled_from(src.spans[kind]), label="span")
                offset = start + data.draw(st.integers(0, count - 1), label="element") * struct.calcsize(fmt)
                muts.append((kind, offset, fmt, data.draw(value_for(fmt), label="value")))
            jobs.append((slot, src, muts))

        def serve(i):
            answers = []
            for slot, src, muts in jobs[i::len(workers.procs)]:
                buf = bytearray(src.data)
                for _, offset, fmt, value in muts:
                    apply(buf, offset, fmt, value)
                path = tmp_path / f"slot{slot}.gguf"
                # A fresh file each time, not rewritten in place: a worker may still map the last one.
                path.with_suffix(".tmp").write_bytes(buf)
                os.replace(path.with_suffix(".tmp"), path)
                request = {"path": str(path), "base": src.base and str(src.base)}
                answers.append((src, muts, path, workers.ask(i, request)))
            return answers

        with ThreadPoolExecutor(len(workers.procs)) as pool:
            answers = [a for part in pool.map(serve, range(len(workers.procs))) for a in part]
        for src, muts, path, answer in answers:
            totals[answer["status"]] += 1
            if answer["status"] in ("bug", "crash"):
                kept.mkdir(exist_ok=True)
                copy = kept / f"{src.name}-{len(list(kept.iterdir()))}.gguf"
                shutil.copy(path, copy)
                pytest.fail(f"{src.name} mutated {muts} (kept as {copy}): {answer['status']}: {answer['detail']}")

    try:
        run()
    finally:
        workers.close()
    print(f"fuzzed files: {dict(totals)}")
    # The check cannot pass on nothing: a good share of the files must reach generation.
    assert totals["generated"] >= 0.1 * sum(totals.values()), totals
    assert totals["rejected"] >= 0.1 * sum(totals.values()), totals
