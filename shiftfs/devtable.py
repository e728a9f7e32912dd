"""``python -m shiftfs.devtable``: kept for the documented command; the code is :mod:`shiftfs.offline.devtable`.

The parser lives here, at the top with :mod:`shiftfs.cli`, whose one-line usage
errors it shares: :mod:`shiftfs.offline` never imports the command line.
"""

from __future__ import annotations

import argparse
import sys

from .cli import OneLineParser
from .offline.devtable import DESCRIPTION, EPILOG, add_arguments, run


def main(argv: list[str] | None = None) -> int:
    """``python -m shiftfs.devtable``: the same as ``shiftfs devtable``."""
    p = OneLineParser(
        prog="shiftfs devtable",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_arguments(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
