"""``python -m mgpu``: the same as the ``mgpu`` command."""

from __future__ import annotations

import sys

from mgpu.cli import main

if __name__ == "__main__":
    sys.exit(main())
