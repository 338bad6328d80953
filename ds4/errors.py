"""Exceptions that carry one-line, user-facing messages.

Library code raises these with the facts in them (file, key or tensor, what was found, what was
expected); only the command-line front ends turn them into `ds4: <message>` and an exit status.
"""

from __future__ import annotations


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
        super().__init__(msg)


class QuantError(Ds4Error):
    """A quant type or block layout the codecs do not support for the requested operation."""
