"""ds4: a DeepSeek V4 Flash inference engine for ds4 GGUF files, built on MLX."""

import ctypes
import ctypes.util
import os
import sys


def _preload_blas() -> str | None:
    """Let MLX's CPU backend use an optimized CBLAS when the system has one.

    The Linux mlx-cpu wheels link a bundled reference BLAS: single-threaded, ~20x slower on a
    32x4096x4096 sgemm than OpenBLAS (472 ms vs 26 ms measured on 2 cores). Loading OpenBLAS
    with global symbol scope before `mlx.core` makes the dynamic linker bind MLX's `cblas_*`
    calls to it; results differ only in float summation order. DS4_BLAS=/path/lib.so picks the
    library, DS4_BLAS=none keeps the bundled one. macOS MLX uses Accelerate: nothing to do.

    A DS4_BLAS library that cannot be loaded is a warning on stderr, not an error: the bundled
    BLAS computes the same results, only slower, and this runs at import, also for library users.
    """
    choice = os.environ.get("DS4_BLAS", "")
    if sys.platform == "darwin" or choice == "none" or "mlx.core" in sys.modules:
        return None
    if choice:
        try:
            ctypes.CDLL(choice, mode=ctypes.RTLD_GLOBAL)
            return choice
        except OSError as e:
            sys.stderr.write(f"ds4: warning: DS4_BLAS={choice}: cannot load it ({e}); "
                             "using MLX's bundled BLAS\n")
            return None
    for lib in filter(None, [ctypes.util.find_library("openblas"), "libopenblas.so.0"]):
        try:
            ctypes.CDLL(lib, mode=ctypes.RTLD_GLOBAL)
            return lib
        except OSError:
            continue
    return None


BLAS = _preload_blas()

from ds4.errors import Ds4Error, GGUFError  # noqa: E402

__version__ = "0.1.0"
__all__ = ["BLAS", "Ds4Error", "GGUFError", "__version__"]
