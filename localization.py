"""Does the heatmap point at the lesion? Pointing game and heatmap mass inside NIH boxes.

The command line of chexnet/analysis/localization.py, where the code and the full usage live
(`python localization.py --help`).
"""
import chexnet.idle_threads  # noqa: F401  (first, before torch loads: idle threads sleep)

import sys

from chexnet.analysis.localization import main

if __name__ == "__main__":
    sys.exit(main())
