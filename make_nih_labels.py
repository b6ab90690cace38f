"""Write nih_labels.csv from the NIH `Data_Entry_2017_v2020.csv`: one row per image, the 14
finding columns (0/1), `Patient ID`, and a seeded patient-level 70/10/20 `fold` column
(reproduce-chexnet's scheme; no patient is in two folds).

    python make_nih_labels.py --data-entry Data_Entry_2017_v2020.csv.gz --out nih_labels.csv

The committed nih_labels.csv was made with the defaults (seed 0) from the v2020 file.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

import pandas as pd

from cxr_dataset import DataError, read_nih_labels
from labels import NIH_FINDINGS, NIH_IMAGE_COL, NIH_PATIENT_COL


def make_nih_labels(data_entry: str | Path, seed: int = 0) -> pd.DataFrame:
    """Data_Entry file -> the nih_labels.csv table (ints, in Data_Entry row order)."""
    table = read_nih_labels(data_entry, seed)
    out = pd.DataFrame({NIH_IMAGE_COL: table["image_id"], NIH_PATIENT_COL: table["patient"]})
    for f in NIH_FINDINGS:
        out[f] = table[f].astype(int)
    out["fold"] = table["fold"]
    return out


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-entry", required=True, help="Data_Entry_2017*.csv (or .csv.gz)")
    p.add_argument("--out", default="nih_labels.csv")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    try:
        table = make_nih_labels(args.data_entry, args.seed)
    except DataError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    table.to_csv(args.out, index=False)
    counts = table["fold"].value_counts()
    patients = table.groupby("fold")[NIH_PATIENT_COL].nunique()
    print(f"wrote {args.out}: {len(table)} images; " + ", ".join(
        f"{f} {counts[f]} images / {patients[f]} patients" for f in ("train", "val", "test")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
