"""One self-contained HTML report of a training run: settings, convergence, AUCs with bootstrap

The command line of chexnet/analysis/report.py, where the code and the full usage live
(`python report.py --help`).
"""
import chexnet.idle_threads  # noqa: F401  (first, before torch loads: idle threads sleep)

import sys

from chexnet.analysis.report import main

if __name__ == "__main__":
    sys.exit(main())
