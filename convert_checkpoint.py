"""Convert CheXNet checkpoints from other projects into this project's format.

The command line of chexnet/datatools/convert_checkpoint.py, where the code and the full usage live
(`python convert_checkpoint.py --help`).
"""
import chexnet.idle_threads  # noqa: F401  (first, before torch loads: idle threads sleep)

import sys

from chexnet.datatools.convert_checkpoint import main

if __name__ == "__main__":
    sys.exit(main())
