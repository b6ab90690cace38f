"""Prepare a dataset for fast training: the label file and a uint8 image cache.

The command line of chexnet/datatools/prepare.py, where the code and the full usage live
(`python prepare_data.py --help`).
"""
import chexnet.idle_threads  # noqa: F401  (first, before torch loads: idle threads sleep)

import sys

from chexnet.datatools.prepare import main

if __name__ == "__main__":
    sys.exit(main())
