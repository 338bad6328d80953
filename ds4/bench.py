"""`ds4-bench`: context-frontier sweeps writing ds4-compatible CSV.

Not implemented yet: the command says so in one line instead of failing with an import error.
"""

from __future__ import annotations

import sys


def main() -> None:
    print("ds4-bench: context sweeps are not implemented yet", file=sys.stderr)
    sys.exit(1)
