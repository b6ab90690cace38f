"""Predict the findings of chest X-rays (PNG, JPEG or DICOM) with a trained model.

The command line of chexnet/analysis/predict.py, where the code and the full usage live
(`python predict.py --help`).
"""
import chexnet.idle_threads  # noqa: F401  (first, before torch loads: idle threads sleep)

import sys

from chexnet.analysis.predict import main

if __name__ == "__main__":
    sys.exit(main())
