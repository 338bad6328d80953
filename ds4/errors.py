"""Exceptions that carry one-line, user-facing messages.

Library code raises these with the facts in them (file, key or tensor, what was found, what was
expected); only the command-line front ends turn them into `ds4: <message>` and an exit status.
"""

from __future__ import annotations

# Control characters (a newline in a token string or a file name) escaped, so a message stays one line.
_ESCAPES = {c: f"\\x{c:02x}" for c in range(32)} | {10: "\\n", 13: "\\r", 9: "\\t", 127: "\\x7f"}


def one_line(text: str) -> str:
    return text.translate(_ESCAPES)


class Ds4Error(Exception):
    """Any error the user can act on; `str(err)` is a complete one-line message."""


class GGUFError(Ds4Error):
    """A GGUF file that cannot be read or does not have the DS4 Flash layout.

    The message reads `<file>: <what>, expected <expected>` (the `expected` part when known).
    """

    def __init__(self, path: str, what: str, expected: str | None = None):
        self.path = str(path)
        self.what = what
        self.expected = expected
        msg = f"{self.path}: {what}" + (f", expected {expected}" if expected is not None else "")
        super().__init__(one_line(msg))


class QuantError(Ds4Error):
    """A quant type or block layout the codecs do not support for the requested operation."""
