"""Training curves of one or more runs: loss per epoch, LR steps, best epoch.

The command line of chexnet/analysis/training_plots.py, where the code and the full usage live
(`python plot_training.py --help`).
"""
import chexnet.idle_threads  # noqa: F401  (first, before torch loads: idle threads sleep)

import sys

from chexnet.analysis.training_plots import main

if __name__ == "__main__":
    sys.exit(main())
