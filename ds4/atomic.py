"""Output files: written whole or not at all, and written *through* what the user named.

* A regular file, or a path that does not exist yet, appears only when complete: the data goes to
  `<name>.<pid>.partial` in the same folder, renamed over `<name>` on success (keeping an existing
  file's permissions) and removed on any error or Ctrl+C.
* A symlink is followed: its target is replaced that way and the link stays a link.
* Anything else (a device such as /dev/null or /dev/stdout, a FIFO, a socket) is opened and
  written in place: renaming over it would replace the device node with a regular file.

A writer killed outright (SIGKILL, power loss) cannot remove its partial file. The next write of
the same output removes the `<name>.*.partial` files whose writer is gone (its process no longer
exists and nothing holds the lock every writer keeps on its partial file).

Errors name the output: `Ds4Error("<path>: cannot write: <reason>")`.
"""

from __future__ import annotations

import fcntl
import glob
import json
import os
import stat
from contextlib import contextmanager
from typing import Callable

from ds4.errors import Ds4Error


@contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb", **kwargs):
    path = os.fsdecode(path)
    try:
        if _write_in_place(path):
            with open(path, mode, **kwargs) as f:
                yield f
            return
        target = os.path.realpath(path)
        _remove_stale_partials(target)
        tmp = f"{target}.{os.getpid()}.partial"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)  # "this partial file is alive" (see _remove_stale_partials)
            if os.path.isfile(target):
                os.fchmod(fd, stat.S_IMODE(os.stat(target).st_mode))
            with os.fdopen(fd, mode, **kwargs) as f:
                fd = None
                yield f
                f.flush()
                os.replace(tmp, target)  # still open, so still locked, until it has its name
        except BaseException:
            if fd is not None:
                os.close(fd)
            if os.path.lexists(tmp):
                os.remove(tmp)
            raise
    except OSError as e:
        # Errors of the output itself (opening, writing: no filename, renaming). An OSError about
        # another file raised by the caller's code inside the block passes through unchanged.
        name = None if e.filename is None else os.fsdecode(e.filename)
        if name is None or name == path or name.startswith(os.path.realpath(path)):
            raise Ds4Error(f"{path}: cannot write: {e.strerror or e}") from None
        raise


def _write_in_place(path: str) -> bool:
    """True for an existing path that is not a regular file, and for the /dev and /proc aliases
    of open descriptors (/dev/stdout, /dev/fd/N) even when they lead to a regular file: that file
    is the caller's redirection, which renaming would detach."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False
    return not stat.S_ISREG(st.st_mode) or os.path.abspath(path).startswith(("/dev/", "/proc/"))


def _remove_stale_partials(target: str) -> None:
    for stale in glob.glob(f"{glob.escape(target)}.*.partial"):
        pid = stale[len(target) + 1:-len(".partial")]
        if not pid.isdigit() or _alive(int(pid)):
            continue
        try:
            fd = os.open(stale, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            os.remove(stale)
        except OSError:
            pass  # held by a writer on another machine (shared folder), or already gone
        finally:
            os.close(fd)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # another user's process
    return True


def json_lines_log(path: str) -> Callable[[dict], None]:
    """A log written one JSON line at a time and flushed, so it can be followed while ds4 runs:
    opened in place (through symlinks and devices), not atomically."""
    try:
        f = open(path, "w", encoding="utf-8")
    except OSError as e:
        raise Ds4Error(f"{path}: cannot write: {e.strerror or e}") from None

    def log(record: dict) -> None:
        try:
            f.write(json.dumps(record) + "\n")
            f.flush()
        except OSError as e:
            raise Ds4Error(f"{path}: cannot write: {e.strerror or e}") from None

    return log
