"""The kernel seam: one dispatch table from (op, quant type, device) to an implementation, with
the MLX-op reference of every op beside it.

The forward pass never calls a fused kernel directly: it asks `lookup(op, qtype)` and gets the
entry registered for the current device ("metal", "cuda" or "cpu"; "any" matches every device),
or the reference when there is none. `DS4_KERNELS=reference` forces the reference everywhere
(A/B checks). Every entry is tested against its reference; the reference is what defines the
result.

Row invariance: a verify pass over M rows must compute each row exactly as a 1-row decode step
does (the exact speculative verifier relies on it). Optimized BLAS libraries and GPU matmul
kernels pick a different reduction order for different row counts, so while `row_invariant()`
is on (the step sets it while tracing decode and verify widths) `matmul_rows` computes each
leading-axis slice with a product of its own shape, whatever the batch.

Kernel sources ship inside the package (`ds4/kernels_metal/`).
"""

from __future__ import annotations

import contextvars
import os
from contextlib import contextmanager
from functools import cache
from pathlib import Path
from typing import Callable

import mlx.core as mx

KERNELS_METAL = Path(__file__).resolve().parent / "kernels_metal"

_REFERENCE: dict[tuple[str, str | None], Callable] = {}
_FAST: dict[tuple[str, str | None, str], Callable] = {}
_ROW_INVARIANT = contextvars.ContextVar("ds4_row_invariant", default=False)
_DEVICE = contextvars.ContextVar("ds4_kernel_device", default=None)
_REFERENCE_ONLY = contextvars.ContextVar("ds4_reference_only", default=False)
_STAND_INS = contextvars.ContextVar("ds4_kernel_stand_ins", default=False)


def device_kind() -> str:
    """The backend the default device runs on: "metal", "cuda" or "cpu" (or what `as_device`
    says while it is active)."""
    if _DEVICE.get() is not None:
        return _DEVICE.get()
    if mx.default_device() == mx.cpu:
        return "cpu"
    if mx.metal.is_available():
        return "metal"
    return "cuda"


def compile_steps() -> bool:
    """Whether steps run as `mx.compile`d graphs: DS4_COMPILE=1 or 0, else on GPU backends only.
    On the CPU, MLX builds every fused kernel with the system C++ compiler the first time it is
    seen (about a minute for a model's step kernels on 2 cores, cached per machine afterwards),
    and the steady-state gain there is small: steps run uncompiled unless asked."""
    value = os.environ.get("DS4_COMPILE", "auto")
    if value in ("0", "1"):
        return value == "1"
    return device_kind() != "cpu"


def reference_only() -> bool:
    """Whether every op runs its reference: DS4_KERNELS=reference, or inside `reference_kernels()`."""
    return _REFERENCE_ONLY.get() or os.environ.get("DS4_KERNELS", "") == "reference"


@contextmanager
def reference_kernels(enabled: bool = True):
    """While active (and `enabled`), `lookup` gives the reference of every op (`ds4 --quality`).
    Graphs are built, and compiled steps traced, on first use: open the engine's first step inside."""
    token = _REFERENCE_ONLY.set(enabled or _REFERENCE_ONLY.get())
    try:
        yield
    finally:
        _REFERENCE_ONLY.reset(token)


def register_reference(op: str, fn: Callable, qtype: str | None = None) -> None:
    """The MLX-op implementation of `op` (for a quant type, where the op depends on one)."""
    _REFERENCE[(op, qtype)] = fn


def register(op: str, qtype: str | None, device: str, fn: Callable) -> None:
    """A faster implementation of `op` on `device` ("metal", "cuda", "cpu" or "any")."""
    if (op, qtype) not in _REFERENCE:
        raise KeyError(f"no reference for {op}/{qtype}: register the reference first")
    _FAST[(op, qtype, device)] = fn


def reference(op: str, qtype: str | None = None) -> Callable:
    return _REFERENCE[(op, qtype)]


def lookup(op: str, qtype: str | None = None, device: str | None = None) -> Callable:
    """The implementation the forward uses for `op` on `device` (default: the current one)."""
    if not reference_only():
        device = device or device_kind()
        fn = _FAST.get((op, qtype, device)) or _FAST.get((op, qtype, "any"))
        if fn is not None:
            return fn
    return _REFERENCE[(op, qtype)]


def table() -> list[tuple[str, str | None, str]]:
    """Every (op, qtype, device) entry: "reference" rows and the registered fast paths."""
    rows = [(op, qt, "reference") for op, qt in _REFERENCE]
    return sorted(rows + list(_FAST), key=lambda r: (r[0], r[1] or "", r[2]))


@contextmanager
def as_device(kind: str):
    """Pick table entries as on another backend while building graphs (the census counts a
    GPU's launches on the CPU this way; entries that need the device itself cannot run)."""
    token = _DEVICE.set(kind)
    try:
        yield
    finally:
        _DEVICE.reset(token)


def backend_present(kind: str) -> bool:
    """Whether custom kernels for `kind` ("metal" or "cuda") can be built and run here."""
    if mx.default_device() == mx.cpu:
        return False
    return mx.metal.is_available() if kind == "metal" else kind == "cuda" and mx.cuda.is_available()


@contextmanager
def stand_ins(enabled: bool = True):
    """While active, a custom-kernel launch for a backend this process lacks (under `as_device`)
    builds `stand_in` nodes instead of failing: the census counts a GPU's launches this way."""
    token = _STAND_INS.set(enabled)
    try:
        yield
    finally:
        _STAND_INS.reset(token)


def stand_in(name: str, kind: str, inputs: list[mx.array], output_shapes: list[tuple[int, ...]]) -> list[mx.array]:
    """What launching custom kernel `name` on backend `kind` gives without that backend: one
    graph node (`mx.depends` over every input; the outputs are views of a float32 input, their
    values meaningless) under `stand_ins()`, so the census counts the site once, as it counts a
    `CustomKernel` node on the GPU; otherwise a RuntimeError."""
    if not _STAND_INS.get():
        raise RuntimeError(f"custom kernel {name} needs the {kind} backend, which this process lacks")
    seed = next((a.reshape(-1)[:1] for a in inputs if a.dtype == mx.float32), None)
    seed = _stand_in_zero() if seed is None else seed
    return mx.depends([mx.broadcast_to(seed, s) for s in output_shapes], inputs)


@cache
def _stand_in_zero() -> mx.array:
    zero = mx.zeros((1,), mx.float32)
    mx.eval(zero)  # an evaluated array is a graph input, not a node the census would count
    return zero


@contextmanager
def row_invariant(enabled: bool = True):
    """While active, `matmul_rows` gives every leading-axis slice a product of its own."""
    token = _ROW_INVARIANT.set(enabled)
    try:
        yield
    finally:
        _ROW_INVARIANT.reset(token)


def rows_independent() -> bool:
    return _ROW_INVARIANT.get()


def matmul_rows(x: mx.array, w: mx.array) -> mx.array:
    """x [B, ..., n] @ w [n, m] -> [B, ..., m].

    Under `row_invariant()` each of the B slices is its own product (a batched matmul over a
    broadcast w, so BLAS and GPU kernels see the same shape whatever B is); otherwise one
    product over all rows (fastest for prefill chunks)."""
    if not _ROW_INVARIANT.get() or x.ndim < 2:
        return x @ w
    B, n, m = x.shape[0], w.shape[0], w.shape[-1]
    y = x.reshape(B, -1, n) @ mx.broadcast_to(w, (B, n, m))
    return y.reshape(*x.shape[:-1], m)
