"""``python -m mgpu.train`` and ``accelerate launch -m mgpu.train``."""

from __future__ import annotations

import sys

from mgpu.train.launch import main

if __name__ == "__main__":
    sys.exit(main())
