"""``python -m shiftfs.devtable``: kept for the documented command; the code is :mod:`shiftfs.offline.devtable`."""

import sys

from .offline.devtable import main

if __name__ == "__main__":
    sys.exit(main())
