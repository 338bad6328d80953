"""Text input from files and the command line, UTF-8 or a one-line error.

ds4's policy for bytes that are not UTF-8 is a clear error, never a silent replacement: a prompt
or vector file names the file and the first bad byte (`<path>: <what> is not UTF-8 text (byte
0xff at offset 3)`, exit 1); a command-line argument is a usage error (exit 2, see
`ds4.frontend.Utf8Text`); a line typed into the chat is reported and skipped.
"""

from __future__ import annotations

import os

from ds4.errors import Ds4Error


def utf8_problem(e: UnicodeDecodeError) -> str:
    """Where a UTF-8 decode failed: `byte 0xff at offset 3`."""
    return f"byte 0x{e.object[e.start]:02x} at offset {e.start}"


def decode_utf8(raw: bytes, what: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise Ds4Error(f"{what} is not UTF-8 text ({utf8_problem(e)})") from None


def undecodable(text: str) -> str | None:
    """For a string decoded with `surrogateescape` (command-line arguments, chat input): where its
    first byte that is not UTF-8 sits, or None when it is all UTF-8."""
    try:
        text.encode("utf-8")
        return None
    except UnicodeEncodeError:
        try:
            text.encode("utf-8", "surrogateescape").decode("utf-8")
        except UnicodeDecodeError as e:
            return utf8_problem(e)
        return "a lone surrogate"  # "\udcxx" written literally: still not text


def read_text(path: str | os.PathLike, what: str = "file") -> str:
    """A file's UTF-8 text, line endings untouched; `Ds4Error` naming the path and what failed."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise Ds4Error(f"{os.fsdecode(path)}: cannot read {what}: {e.strerror or e}") from None
    return decode_utf8(raw, f"{os.fsdecode(path)}: {what}")
