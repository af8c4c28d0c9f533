"""``qrpark sim``: a simulated fleet (N lots x M gates) against a running service."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    sys.stderr.write("qrpark sim: not built yet; use `qrpark demo` for one simulated lot\n")
    return 2
