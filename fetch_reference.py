"""Download reproduce-chexnet's published results (its pretrained/ preds.csv, aucs.csv and
log_train) into pretrained/, checked by sha256. The code and the full usage are in
chexnet/datatools/fetch_reference.py (`python fetch_reference.py --help`).
"""
import chexnet.idle_threads  # noqa: F401  (first, before torch loads: idle threads sleep)

import sys

from chexnet.datatools.fetch_reference import main

if __name__ == "__main__":
    sys.exit(main())
