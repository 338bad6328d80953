"""Output files (ds4.atomic): regular files replaced whole, symlinks and special files written
through, stale partial files of dead writers removed, errors naming the output."""

from __future__ import annotations

import fcntl
import os
import stat
import subprocess
import sys
import threading

import pytest

from ds4.atomic import atomic_write
from ds4.errors import Ds4Error


def dead_pid() -> int:
    """A pid no process has: one of ours that has exited and been reaped."""
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_regular_file_is_replaced_whole_keeping_its_mode(tmp_path):
    out = tmp_path / "out.json"
    out.write_text("old")
    out.chmod(0o640)
    with atomic_write(out, "w") as f:
        f.write("new")
        assert out.read_text() == "old"  # nothing visible before the end
    assert out.read_text() == "new" and stat.S_IMODE(out.stat().st_mode) == 0o640
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.json"]


def test_an_error_keeps_the_old_file_and_leaves_no_partial(tmp_path):
    out = tmp_path / "out.json"
    out.write_text("old")
    with pytest.raises(KeyboardInterrupt):
        with atomic_write(out, "w") as f:
            f.write("half")
            raise KeyboardInterrupt
    assert out.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["out.json"]


def test_a_symlink_is_written_through(tmp_path):
    target = tmp_path / "data" / "real.csv"
    target.parent.mkdir()
    target.write_text("old")
    link = tmp_path / "link.csv"
    link.symlink_to(target)
    with atomic_write(link, "w") as f:
        f.write("new")
    assert link.is_symlink() and target.read_text() == "new"
    dangling = tmp_path / "dangling.csv"
    dangling.symlink_to(tmp_path / "data" / "new.csv")
    with atomic_write(dangling, "w") as f:
        f.write("created")
    assert dangling.is_symlink() and (tmp_path / "data" / "new.csv").read_text() == "created"


def test_a_fifo_is_written_in_place(tmp_path):
    fifo = tmp_path / "out.fifo"
    os.mkfifo(fifo)
    got = []
    reader = threading.Thread(target=lambda: got.append(open(fifo, "rb").read()), daemon=True)
    reader.start()
    with atomic_write(fifo, "wb") as f:
        f.write(b"streamed")
    reader.join(timeout=60)
    assert got == [b"streamed"] and stat.S_ISFIFO(fifo.stat().st_mode)


@pytest.mark.skipif(not os.path.exists("/dev/stdout"), reason="no /dev/stdout here")
def test_dev_stdout_redirected_to_a_file_is_written_in_place(tmp_path):
    """`--dump-logprobs /dev/stdout >> out`: the shell's file gets the data, and what the process
    prints afterwards follows it; renaming would have detached the file from the redirection."""
    out = tmp_path / "out.txt"
    was = os.lstat("/dev/stdout")
    code = ("from ds4.atomic import atomic_write\n"
            "with atomic_write('/dev/stdout', 'w') as f: f.write('via stdout, ')\n"
            "print('then print')")
    with open(out, "a") as f:
        subprocess.run([sys.executable, "-c", code], stdout=f, check=True, timeout=60)
    assert out.read_text() == "via stdout, then print\n" and os.lstat("/dev/stdout").st_mode == was.st_mode


def test_stale_partials_of_dead_writers_are_removed(tmp_path):
    out = tmp_path / "model.gguf"
    dead = tmp_path / f"model.gguf.{dead_pid()}.partial"
    alive = tmp_path / f"model.gguf.{os.getppid()}.partial"
    held = tmp_path / f"model.gguf.{dead_pid()}.partial"
    other = tmp_path / "other.gguf.1.partial"
    for p in (dead, alive, held, other):
        p.write_bytes(b"stale")
    with open(held, "rb") as lock:  # a writer on another machine: pid unknown here, file locked
        fcntl.flock(lock, fcntl.LOCK_EX)
        with atomic_write(out) as f:
            f.write(b"GGUF")
    assert out.read_bytes() == b"GGUF"
    assert not dead.exists() and alive.exists() and held.exists() and other.exists()


@pytest.mark.parametrize("where, reason", [
    ("missing/out.json", "No such file or directory"),
    ("file/out.json", "Not a directory"),
])
def test_errors_name_the_output(tmp_path, where, reason):
    (tmp_path / "file").write_text("a regular file")
    path = str(tmp_path / where)
    with pytest.raises(Ds4Error) as e:
        with atomic_write(path, "w") as f:
            f.write("x")
    assert str(e.value) == f"{path}: cannot write: {reason}"


def test_a_full_device_is_an_error_naming_it(full_device):
    if full_device is None:
        pytest.skip("no full device here")
    with pytest.raises(Ds4Error) as e:
        with atomic_write(full_device, "w") as f:
            f.write("x" * 100000)
    assert str(e.value) == f"{full_device}: cannot write: No space left on device"
    assert stat.S_ISCHR(os.stat(full_device).st_mode)


def test_other_errors_inside_the_block_pass_through(tmp_path):
    with pytest.raises(FileNotFoundError):
        with atomic_write(tmp_path / "out", "w"):
            open(tmp_path / "missing-input")
    assert list(tmp_path.iterdir()) == []
