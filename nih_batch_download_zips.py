"""Download (and optionally extract) the NIH ChestX-ray14 image archives.

The command line of chexnet/datatools/download.py, where the code and the full usage live
(`python nih_batch_download_zips.py --help`).
"""
import chexnet.idle_threads  # noqa: F401  (first, before torch loads: idle threads sleep)

import sys

from chexnet.datatools.download import main

if __name__ == "__main__":
    sys.exit(main())
