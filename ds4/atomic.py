"""Files that appear only when complete: written to `<path>.partial`, renamed on success,
removed on any error or Ctrl+C, so nothing half-written is ever left under the real name."""

from __future__ import annotations

import os
from contextlib import contextmanager


@contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb", **kwargs):
    path = str(path)
    tmp = f"{path}.partial"
    try:
        with open(tmp, mode, **kwargs) as f:
            yield f
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
