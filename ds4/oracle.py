"""`ds4-test` (also `ds4_test`): oracle checks against a loaded model.

The checks (logprob vectors, MTP verify-depth replay, continuous argmax gap) are not implemented
yet; until then the command says so in one line.
"""

from __future__ import annotations

import sys


def main() -> None:
    print("ds4-test: the oracle checks are not implemented yet", file=sys.stderr)
    sys.exit(1)
