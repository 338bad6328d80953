"""Fused kernels from one source: the bodies in `ds4/kernels_metal/ds4_kernels.h` (after the
portability prelude `ds4_prelude.h`) built for Metal with `mx.fast.metal_kernel` and for CUDA
with `mx.fast.cuda_kernel`, and registered in the kernel table (`ds4.kernels`) beside their
MLX-op references:

    op              qtype     body (per thread)              reference
    gather_matmul   IQ2_XXS   ds4_gather_matvec              ds4.quant._gather_matmul_reference
    gather_matmul   Q2_K      ds4_gather_matvec              ds4.quant._gather_matmul_reference
    expert_swiglu   IQ2_XXS   ds4_gather_swiglu              ds4.moe._expert_swiglu_reference
    expert_swiglu   Q2_K      ds4_gather_swiglu              ds4.moe._expert_swiglu_reference
    hc_pre          -         ds4_hc_pre_mix, ds4_hc_pre_apply   ds4.model._hc_pre_reference
    hc_post         -         ds4_hc_post                    ds4.model._hc_post_reference
    dequant         IQ2_XXS, Q2_K, Q4_K   ds4_dequant_<type>  ds4.quant.dequantize

Above MATVEC_MAX_ROWS rows (prefill chunks) the gathered products take their references, which
decode each chosen expert once through the "dequant" entry and multiply with `mx.gather_mm`.

A wrapper's source is only the body call with the thread index, so the CPU build of the same
bodies (`ds4.kernels_c`, a C++ loop over the grid) checks their indexing and arithmetic in
every test run. `ds4_gather_matvec` on Q4_K blocks is built and tested the same way but not registered:
Q4_K experts are held as MLX affine blocks (`mx.gather_qmm` is already one kernel on them),
so the GGUF blocks it reads are not kept on the device.

While `kernels.as_device` picks a backend this machine lacks (the census counts a GPU's
launches on the CPU), a launch builds `kernels.stand_in` nodes under `kernels.stand_ins()` and
fails otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

import mlx.core as mx
import numpy as np

import ds4.model  # noqa: F401  (registers the references of hc_pre/hc_post and, through ds4.moe,
#   expert_swiglu; ds4.model imports this module last)
from ds4 import kernels
from ds4.quant import QuantExperts, QuantWeight, _iq2_grid_bytes, _iq2_xxs_tables

PRELUDE = kernels.KERNELS_METAL / "ds4_prelude.h"
BODIES = kernels.KERNELS_METAL / "ds4_kernels.h"


@dataclass(frozen=True)
class KernelSpec:
    """One body entry: `ds4_<name>(i, inputs..., outputs...)`; inputs are (name, C type),
    outputs float32."""

    name: str
    inputs: tuple[tuple[str, str], ...]
    outputs: tuple[str, ...]

    @property
    def function(self) -> str:
        return f"ds4_{self.name}"

    def call(self, index: str) -> str:
        args = ", ".join([index, *(n for n, _ in self.inputs), *self.outputs])
        return f"{self.function}({args});"


SPECS = {
    s.name: s
    for s in (
        KernelSpec("dequant_iq2_xxs", (("blocks", "uint8_t"), ("grid", "uint8_t"), ("ksigns", "uint8_t"),
                                       ("dims", "uint32_t")), ("out",)),
        KernelSpec("dequant_q2_k", (("blocks", "uint8_t"), ("dims", "uint32_t")), ("out",)),
        KernelSpec("dequant_q4_k", (("blocks", "uint8_t"), ("dims", "uint32_t")), ("out",)),
        KernelSpec("gather_matvec", (("x", "float"), ("w", "uint8_t"), ("ids", "uint32_t"), ("dims", "uint32_t"),
                                     ("grid", "uint8_t"), ("ksigns", "uint8_t")), ("y",)),
        KernelSpec("gather_swiglu", (("x", "float"), ("wg", "uint8_t"), ("wu", "uint8_t"), ("ids", "uint32_t"),
                                     ("weight", "float"), ("dims", "uint32_t"), ("clamp", "float"),
                                     ("grid", "uint8_t"), ("ksigns", "uint8_t")), ("mid",)),
        KernelSpec("hc_pre_mix", (("X", "float"), ("fn", "float"), ("scale", "float"), ("base", "float"),
                                  ("dims", "uint32_t"), ("eps", "float")), ("mix",)),
        KernelSpec("hc_pre_apply", (("X", "float"), ("mix", "float"), ("dims", "uint32_t"), ("eps", "float")),
                   ("y", "post", "comb")),
        KernelSpec("hc_post", (("out", "float"), ("X", "float"), ("post", "float"), ("comb", "float"),
                               ("dims", "uint32_t")), ("Y",)),
    )
}

# The thread index each backend's wrapper passes (MLX writes the rest of the signature).
THREAD_INDEX = {"metal": "thread_position_in_grid.x", "cuda": "blockIdx.x * blockDim.x + threadIdx.x"}
THREADGROUP = 256


@cache
def header() -> str:
    """The prelude and the bodies, as the `header` of a generated kernel."""
    return PRELUDE.read_text() + "\n" + BODIES.read_text()


@cache
def _built(name: str, device: str):
    spec = SPECS[name]
    make = mx.fast.metal_kernel if device == "metal" else mx.fast.cuda_kernel
    return make(name=f"ds4_{name}", input_names=[n for n, _ in spec.inputs], output_names=list(spec.outputs),
                source=spec.call(THREAD_INDEX[device]), header=header())


def launch(name: str, inputs: list[mx.array], n_threads: int, output_shapes: list[tuple[int, ...]]) -> list[mx.array]:
    """Run body `name` over a grid of n_threads on the current backend (kernels.device_kind())."""
    device = kernels.device_kind()
    if not kernels.backend_present(device):
        return kernels.stand_in(f"ds4_{name}", device, inputs, output_shapes)
    return _built(name, device)(
        inputs=inputs, grid=(n_threads, 1, 1), threadgroup=(min(THREADGROUP, n_threads), 1, 1),
        output_shapes=output_shapes, output_dtypes=[mx.float32] * len(output_shapes))


@cache
def _u32(values: tuple[int, ...]) -> mx.array:
    a = mx.array(values, dtype=mx.uint32)
    mx.eval(a)
    return a


@cache
def _f32(values: tuple[float, ...]) -> mx.array:
    a = mx.array(values, dtype=mx.float32)
    mx.eval(a)
    return a


# ---------------------------------------------------------------------------------------------
# The ops.

# Elements one dequant thread writes.
DEQUANT_PER_THREAD = {"IQ2_XXS": 8, "Q2_K": 16, "Q4_K": 32}


def dequant_inputs(kind: str, blocks: mx.array, n_elems: int) -> tuple[list[mx.array], int, tuple]:
    """(inputs, threads, output shape) of the dequant body for GGUF rows uint8 [..., row_bytes]."""
    R = int(np.prod(blocks.shape[:-1])) if blocks.ndim > 1 else 1
    n = R * n_elems // DEQUANT_PER_THREAD[kind]
    inputs = [blocks.reshape(-1)]
    if kind == "IQ2_XXS":
        inputs += [_iq2_grid_bytes(), _iq2_xxs_tables()[1]]
    return inputs + [_u32((n,))], n, (R, n_elems)


def dequant(kind: str):
    """The dequant entry for quant type `kind`: rows uint8 [..., row_bytes] -> float32 [..., n]."""
    def run(blocks: mx.array, n_elems: int) -> mx.array:
        inputs, n, shape = dequant_inputs(kind, blocks, n_elems)
        return launch(f"dequant_{kind.lower()}", inputs, n, [shape])[0].reshape(*blocks.shape[:-1], n_elems)
    return run


# Rows above which the gathered products decode each chosen expert once (dequant, then MLX's
# gather_mm) instead of one thread per output re-decoding its weight row for every row: the
# decode and verify widths (ds4.model.MAX_VERIFY_ROWS) keep the row-invariant matvec.
MATVEC_MAX_ROWS = 17

QTYPE_CODE = {"IQ2_XXS": 0, "Q2_K": 1, "Q4_K": 2}  # dims[5] of gather_matvec and gather_swiglu


def _expert_ids(expert_ids: mx.array) -> mx.array:
    """Routed expert ids as the bodies read them (routers hand over int32 or uint32)."""
    return expert_ids if expert_ids.dtype == mx.uint32 else expert_ids.astype(mx.uint32)

def gather_inputs(kind: str, x: mx.array, blocks: mx.array, expert_ids: mx.array) -> tuple[list[mx.array], int, tuple]:
    """(inputs, threads, output shape) of the gathered matvec body for GGUF expert blocks
    uint8 [n_expert, n_out, row_bytes], x [M, in] or [M, k, in], expert_ids [M, k]."""
    M, k = expert_ids.shape
    n_out = blocks.shape[1]
    x3 = x[:, None, :] if x.ndim == 2 else x
    n_in = x3.shape[-1]
    dims = _u32((M, k, n_in, n_out, x3.shape[1], QTYPE_CODE[kind]))
    inputs = [x3, blocks, _expert_ids(expert_ids), dims, _iq2_grid_bytes(), _iq2_xxs_tables()[1]]
    return inputs, M * k * n_out, (M, k, n_out)


def gather_matmul(w, x: mx.array, expert_ids: mx.array) -> mx.array:
    """QuantExperts product y[m, j] = x[m] @ W[expert_ids[m, j]].T with the fused body: one
    thread per (row, slot, output), decoding the expert's blocks as it goes."""
    if expert_ids.shape[0] > MATVEC_MAX_ROWS:
        return kernels.reference("gather_matmul", w.kind)(w, x, expert_ids)  # dequant through the table
    inputs, n, shape = gather_inputs(w.kind, x, w.blocks, expert_ids)
    return launch("gather_matvec", inputs, n, [shape])[0]


def swiglu_inputs(kind: str, x: mx.array, gate_blocks: mx.array, up_blocks: mx.array, expert_ids: mx.array,
                  weights: mx.array, clamp: float) -> tuple[list[mx.array], int, tuple]:
    """(inputs, threads, output shape) of the route-weighted SwiGLU body: x [M, in], expert
    blocks uint8 [n_expert, n_ff, row_bytes] each, expert_ids and weights [M, k]."""
    M, k = expert_ids.shape
    n_ff, n_in = gate_blocks.shape[1], x.shape[-1]
    dims = _u32((M, k, n_in, n_ff, 1, QTYPE_CODE[kind]))
    inputs = [x, gate_blocks, up_blocks, _expert_ids(expert_ids), weights, dims, _f32((clamp,)), _iq2_grid_bytes(),
              _iq2_xxs_tables()[1]]
    return inputs, M * k * n_ff, (M, k, n_ff)


def expert_swiglu(gate, up, f: mx.array, ids: mx.array, weights: mx.array, clamp: float) -> mx.array:
    """Gate and up experts, SwiGLU and the route weight in one launch (one thread per output);
    the reference unless both are GGUF-block experts of the same type and shape."""
    if not (isinstance(up, QuantExperts) and up.qtype == gate.qtype and up.shape == gate.shape
            and gate.blocks is not None and up.blocks is not None and f.ndim == 2 and ids.shape[0] <= MATVEC_MAX_ROWS):
        return kernels.reference("expert_swiglu", gate.qtype.name)(gate, up, f, ids, weights, clamp)
    f, weights = (a if a.dtype == mx.float32 else a.astype(mx.float32) for a in (f, weights))
    inputs, n, shape = swiglu_inputs(gate.kind, f, gate.blocks, up.blocks, ids, weights, float(clamp))
    return launch("gather_swiglu", inputs, n, [shape])[0]


HC_MAX_STREAMS = 8  # DS4_HC_MAX in ds4_kernels.h: the Sinkhorn matrix a thread holds


def hc_pre(X: mx.array, fn, scale: mx.array, base: mx.array, config) -> tuple[mx.array, mx.array, mx.array]:
    """HC pre in two launches (mix columns, then the mixed input with post gates and Sinkhorn);
    the reference for mix weights it cannot read as float32 (activation-quantized emulation) or
    more streams than a thread holds."""
    if not isinstance(fn, QuantWeight) or fn.dense is None or X.shape[1] > HC_MAX_STREAMS:
        return kernels.reference("hc_pre")(X, fn, scale, base, config)
    T, M, E = X.shape
    C = 2 * M + M * M
    eps = _f32((config.rms_eps, config.hc_eps))
    (mix,) = launch("hc_pre_mix", [X, fn.dense, scale, base, _u32((T, M, E)), eps], T * C, [(T, C)])
    return tuple(launch("hc_pre_apply", [X, mix, _u32((T, M, E, config.hc_sinkhorn_iters)), eps],
                        T * (E + M + M * M), [(T, E), (T, M), (T, M, M)]))


def hc_post(out: mx.array, X: mx.array, post: mx.array, comb: mx.array) -> mx.array:
    """HC post in one launch: one thread per (token, stream, element)."""
    T, M, E = X.shape
    return launch("hc_post", [out, X, post, comb, _u32((T, M, E))], T * M * E, [(T, M, E)])[0]


for _device in ("metal", "cuda"):
    for _qt in DEQUANT_PER_THREAD:
        kernels.register("dequant", _qt, _device, dequant(_qt))
    for _qt in ("IQ2_XXS", "Q2_K"):
        kernels.register("gather_matmul", _qt, _device, gather_matmul)
        kernels.register("expert_swiglu", _qt, _device, expert_swiglu)
    kernels.register("hc_pre", None, _device, hc_pre)
    kernels.register("hc_post", None, _device, hc_post)
