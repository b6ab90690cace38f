"""Write nih_labels.csv from NIH's `Data_Entry_2017_v2020.csv`: one row per image, `Image Index`,
`Patient ID`, the 14 finding columns (0/1) and a `fold` column (train / val / test).

    python make_nih_labels.py --data-entry Data_Entry_2017_v2020.csv.gz --lists chexnet_labels/
    python make_nih_labels.py --data-entry Data_Entry_2017_v2020.csv.gz --split random --seed 0
    python make_nih_labels.py --data-entry Data_Entry_2017_v2020.csv.gz --split official \\
        --lists /data/nih          # NIH's train_val_list.txt and test_list.txt

Splits (--split):
  reference  reproduce-chexnet's folds (default): arnoweng/CheXNet's published
             ChestX-ray14/labels/{train,val,test}_list.txt (78,468 / 11,219 / 22,433 images;
             its test list is exactly the image set of reproduce-chexnet's test predictions).
             Give the folder holding them with --lists (.txt or .txt.gz); without --lists the
             folds are taken from this repository's nih_labels.csv, which was made from them.
  random     a seeded patient-level 70/10/20 split (--seed).
  official   NIH's test_list.txt, and its train_val_list.txt split by patient 87.5/12.5.
No patient is ever in two folds (checked).

The committed nih_labels.csv was made from the v2020 file (2020 labels) with the reference split.
"""
from __future__ import annotations

import chexnet.idle_threads  # noqa: F401  (first, before torch loads: idle threads sleep)

import argparse
import sys
from typing import Sequence

from chexnet.files import atomic_write, check_outputs
from chexnet.cli import command, integer
from chexnet.data import DataError, nih_labels_table
from chexnet.labels import NIH_PATIENT_COL

SPLIT_CHOICES = ("reference", "random", "official")


@command
def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-entry", required=True, help="Data_Entry_2017*.csv (or .csv.gz)")
    p.add_argument("--out", default="nih_labels.csv")
    p.add_argument("--split", choices=SPLIT_CHOICES, default="reference")
    p.add_argument("--lists", help="folder of the split's lists (see above)")
    p.add_argument("--seed", type=integer(0), default=0,
                   help="patient shuffle of --split random, and "
                   "of the train/val cut of --split official")
    args = p.parse_args(argv)
    check_outputs({"--out": args.out}, {"--data-entry": args.data_entry})
    if args.split == "official" and not args.lists:
        p.error("--split official needs --lists: the folder with NIH's train_val_list.txt and "
                "test_list.txt")
    table = nih_labels_table(args.data_entry, args.split, args.seed, args.lists).frame
    if table.empty:
        raise DataError(f"{args.data_entry}: no images (a header and no rows?). Give the NIH "
                        "Data_Entry_2017*.csv.")
    atomic_write(args.out, lambda tmp: table.to_csv(tmp, index=False))
    counts = table["fold"].value_counts()
    patients = table.groupby("fold")[NIH_PATIENT_COL].nunique()
    print(f"wrote {args.out} ({args.split} split): {len(table)} images; " + ", ".join(
        f"{f} {counts[f]} images / {patients[f]} patients" for f in ("train", "val", "test")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
