"""`ds4-bench`: context-frontier sweeps writing ds4-compatible CSV.

The sweep needs the forward pass and the session, which are not in this release; until then the
command says so in one line instead of failing with an import error.
"""

from __future__ import annotations

import sys


def main() -> None:
    print("ds4-bench: context sweeps need the forward pass, which is not in this release yet", file=sys.stderr)
    sys.exit(1)
