"""Explore a dataset before training on it: class balance per fold, co-occurrence, demographics,

The command line of chexnet/analysis/explore.py, where the code and the full usage live
(`python explore_data.py --help`).
"""
import chexnet.idle_threads  # noqa: F401  (first, before torch loads: idle threads sleep)

import sys

from chexnet.analysis.explore import main

if __name__ == "__main__":
    sys.exit(main())
