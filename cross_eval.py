"""Score a checkpoint trained on one label set on another dataset: NIH <-> CheXphoto.

The command line of chexnet/analysis/cross_eval.py, where the code and the full usage live
(`python cross_eval.py --help`).
"""
import chexnet.idle_threads  # noqa: F401  (first, before torch loads: idle threads sleep)

import sys

from chexnet.analysis.cross_eval import main

if __name__ == "__main__":
    sys.exit(main())
