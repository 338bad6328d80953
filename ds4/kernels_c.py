"""The fused kernel bodies (`ds4/kernels_metal/ds4_kernels.h`) compiled as C++ for the CPU: the
test vehicle that checks their indexing and arithmetic against the MLX-op references in every
run, and the bodies' CPU throughput in `speed-bench/bench_kernels.py`. Not a runtime path.

Each body gets an `extern "C"` grid function that runs the per-thread function for every index
of the grid in order, exactly as the Metal and CUDA wrappers run it once per thread; the
shared object is built with the system compiler (`c++`, `g++` or `clang++`) and loaded with
ctypes. `-ffp-contract=off` keeps each multiply and add rounded on its own, as MLX's CPU
reference ops round them, so bodies that sum in the reference's order match it bit for bit.
"""

from __future__ import annotations

import ctypes
import shutil
import subprocess
from pathlib import Path

import numpy as np

from ds4.fused_kernels import BODIES, PRELUDE, SPECS, KernelSpec

_NUMPY = {"float": np.float32, "uint8_t": np.uint8, "uint32_t": np.uint32}


def compiler() -> str | None:
    """The system C++ compiler, or None."""
    return next((c for c in ("c++", "g++", "clang++") if shutil.which(c)), None)


def grid_source() -> str:
    """The C++ translation unit: prelude, bodies, and one grid loop per body."""
    parts = [f'#include "{PRELUDE.name}"', f'#include "{BODIES.name}"', ""]
    for spec in SPECS.values():
        params = ", ".join([*(f"const {t}* {n}" for n, t in spec.inputs), *(f"float* {o}" for o in spec.outputs)])
        parts.append(f'extern "C" void grid_{spec.name}(uint32_t n, {params}) {{\n'
                     f"    for (uint32_t i = 0; i < n; ++i) {spec.call('i')}\n}}\n")
    return "\n".join(parts)


class CKernels:
    """The bodies built into a shared object under `workdir`."""

    def __init__(self, workdir: Path, opt: str = "-O2", native: bool = False):
        cxx = compiler()
        if cxx is None:
            raise RuntimeError("no C++ compiler (c++, g++ or clang++) on PATH")
        workdir = Path(workdir)
        src, lib = workdir / "ds4_kernels_cpu.cpp", workdir / "ds4_kernels_cpu.so"
        src.write_text(grid_source())
        cmd = [cxx, opt, "-std=c++17", "-ffp-contract=off", "-fPIC", "-shared", "-Wall", "-Werror",
               f"-I{PRELUDE.parent}", str(src), "-o", str(lib)]
        if native:
            cmd.insert(2, "-march=native")
        subprocess.run(cmd, check=True, capture_output=True, text=True)
        self._lib = ctypes.CDLL(str(lib))

    def run(self, name: str, inputs: list, n_threads: int, output_shapes: list[tuple[int, ...]],
            fill: float = np.nan) -> list[np.ndarray]:
        """Run body `name` over a grid of n_threads; outputs start as `fill` (NaN shows an
        element no thread wrote)."""
        spec: KernelSpec = SPECS[name]
        args = [np.ascontiguousarray(a, dtype=_NUMPY[t]) for a, (_, t) in zip(inputs, spec.inputs, strict=True)]
        outs = [np.full(s, fill, dtype=np.float32) for s in output_shapes]
        fn = getattr(self._lib, f"grid_{name}")
        fn.restype = None
        fn(ctypes.c_uint32(n_threads), *(a.ctypes.data_as(ctypes.c_void_p) for a in args + outs))
        return outs
