"""Does a trained model's heatmap beat a centre-of-image guess on the demo boxes?

    python benchmarks/localization_demo.py          # ~90 min on 2 CPU cores, minutes on a GPU
    python benchmarks/localization_demo.py --quick          # smoke run (numbers mean nothing)

One run, end to end, with the project's own entry points:
  1. `demo_data.py`: the NIH-format demo (3,000 images at 128 px by default) with its
     `BBox_List_2017.csv`; skipped when WORK/data/nih already holds it.
  2. `retrain.py`: DenseNet-121 from scratch at --image-size (default 224, as CheXNet: the last
     feature map is 7 x 7, one cell per 32 input pixels). It resumes if interrupted. Why 224
     and not the 64 px of `make demo`: at 96 px the map is 3 x 3 and 81% of the demo boxes are
     smaller than one cell, so even a perfect 3 x 3 heatmap hits only 25% of them.
  3. `localization.py` on the run's test fold, CAM and Grad-CAM, each next to the centre
     baseline (a centred Gaussian that ignores the image).
Prints one table per finding (pointing-game hit rate and heatmap mass inside the box, model and
centre side by side), writes WORK/localization_demo.csv, and ends with the verdict line
`CAM pointing X vs centre Y; mass X vs Y` for the mean over findings.
"""
from __future__ import annotations

import chexnet.idle_threads  # noqa: F401  (first, before torch loads: idle threads sleep)

import argparse
import os
import platform
import sys
import time
from pathlib import Path
from typing import Sequence

import pandas as pd
import torch

from chexnet.datatools import demo
from chexnet.analysis import localization
from chexnet.data import DataError
from chexnet.config import TrainConfig
from chexnet.train import fit

# The project is installed (make / pip install -e .); ROOT is only for default paths.
ROOT = Path(__file__).resolve().parents[1]

METHODS = ("cam", "gradcam")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", default="results/localization_demo",
                   help="folder for the data, the run and the tables (reused when re-run)")
    p.add_argument("--n-images", type=int, default=3000)
    p.add_argument("--data-size", type=int, default=128, help="side of the generated images")
    p.add_argument("--image-size", type=int, default=224, help="network input side")
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--quick", action="store_true",
                   help="tiny smoke run: 150 images at 64 px, one epoch")
    args = p.parse_args(argv)
    if args.quick:
        args.n_images, args.data_size, args.image_size, args.epochs = 150, 64, 64, 1
    return args


def side_by_side(tables: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """One row per finding: each method's hit rate and mass next to the centre baseline's."""
    first = next(iter(tables.values())).set_index("finding")
    out = pd.DataFrame({"boxes": first["n_boxes"]})
    for method, table in tables.items():
        t = table.set_index("finding")
        out[f"{method}_hit"] = t["hit_rate"]
        out[f"{method}_mass"] = t["mass_inside"]
    out["centre_hit"] = first["centre_hit_rate"]
    out["centre_mass"] = first["centre_mass_inside"]
    return out


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    work = Path(args.work)
    data = work / "data"
    started = time.perf_counter()
    if not (data / "nih" / "Data_Entry_2017.csv").is_file():
        demo.main(["--out", str(data), "--kind", "nih", "--n-images", str(args.n_images),
                        "--png-size", str(args.data_size), "--workers", str(max(1, args.workers))])
    run = work / "runs" / f"loc{args.image_size}"
    if not (run / "preds.csv").is_file():
        fit(TrainConfig(dataset="demo", data=str(data / "nih"), name=run.name,
                        out=str(run.parent), image_size=args.image_size,
                        batch_size=args.batch_size, lr=args.lr, epochs=args.epochs,
                        weights="none", workers=args.workers,
                        resume=(run / "last.pt").is_file()))
    aucs = pd.read_csv(run / "aucs.csv").set_index("label")["auc"]
    tables = {}
    for method in METHODS:
        try:
            summary, _ = localization.run_localization(
                run, data / "nih" / "BBox_List_2017.csv", method)
        except DataError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        summary.to_csv(work / f"localization_{method}.csv", index=False)
        tables[method] = summary
    table = side_by_side(tables)
    table.to_csv(work / "localization_demo.csv")
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else \
        f"CPU ({os.cpu_count()} logical cores, {platform.machine()})"
    print(f"\nDemo localisation: {args.n_images} images at {args.data_size} px, DenseNet-121 "
          f"from scratch at {args.image_size} px, {args.epochs} epochs; test-fold mean AUC "
          f"{aucs['mean']:.4f}; {int(table.loc['all', 'boxes'])} boxes on "
          f"{int(tables['cam'].set_index('finding').loc['all', 'n_images'])} test images.")
    print(f"{device}, torch {torch.__version__}, {time.perf_counter() - started:.0f} s in all "
          "(data and training skipped when already present).")
    print("hit = pointing game (heatmap maximum inside the box); mass = share of the heatmap's "
          "positive part inside the box; centre = a centred Gaussian that ignores the image.\n")
    print(table.to_string(float_format=lambda v: f"{v:.3f}", na_rep="n/a"))
    m = table.loc["mean"]
    print(f"\nmean over findings: CAM pointing {m['cam_hit']:.3f} vs centre {m['centre_hit']:.3f}; "
          f"mass {m['cam_mass']:.3f} vs {m['centre_mass']:.3f} | Grad-CAM pointing "
          f"{m['gradcam_hit']:.3f}; mass {m['gradcam_mass']:.3f}")
    print(f"wrote {work / 'localization_demo.csv'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
