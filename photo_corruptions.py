"""Photo-like corruptions of X-rays, and how much a trained model's test AUC suffers from them.

The command line of chexnet/analysis/robustness.py, where the code and the full usage live
(`python photo_corruptions.py --help`).
"""
import chexnet.idle_threads  # noqa: F401  (first, before torch loads: idle threads sleep)

import sys

from chexnet.analysis.robustness import main

if __name__ == "__main__":
    sys.exit(main())
