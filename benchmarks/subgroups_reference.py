"""Subgroup AUCs, under-diagnosis and calibration of the reference model's real predictions.

    python benchmarks/subgroups_reference.py   # pretrained/preds.csv (fetch_reference.py)
    python benchmarks/subgroups_reference.py --out results/subgroups_reference

On reproduce-chexnet's 22,433 test predictions (`--preds`, default pretrained/preds.csv),
scored against `--labels` (default this repository's nih_labels.csv: the 2020 labels, and the
subgroup columns `Patient Gender`, `Patient Age`, `View Position`, `Follow-up #`; a
Data_Entry_2017_v2020.csv gives the same), with `Patient ID` as the bootstrap unit:
  1. `subgroups.subgroup_auc`: AUC per (attribute, group, finding) and the mean, 95% CIs from
     --n-boot patient resamples, and each group's gap to the rest of the fold under the same
     resamples. Timed: this is the benchmark figure (last line).
  2. `subgroups.underdiagnosis`: the false-positive rate of "No Finding" per subgroup. The
     reference model has no "No Finding" output (score: 1 - its highest probability) and
     published NO validation predictions, so its threshold cannot be chosen on validation.
     Fallback, printed as such: the threshold that calls normal the same fraction of the test
     images as the training fold of nih_labels.csv has No Finding images (--split-labels): it
     is set on the test fold's SCORES (never its labels). Compare subgroups at it; its absolute
     rates depend on that choice.
  3. `subgroups.calibration_table`: ECE (equal-mass bins) and Brier per finding and pooled.
     No temperature is fitted: that needs validation predictions, and the test fold never fits.
Prints markdown tables; --out also writes subgroups.csv, underdiagnosis.csv, calibration.csv
and reliability.png. The last line is `subgroups NxKxB (G subgroups): N.N s`.
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

import numpy as np
import pandas as pd

from chexnet.analysis import metrics
from chexnet.analysis import subgroups
from chexnet.data import DataError, read_nih_labels
from chexnet.labels import FOLDS, NIH_FINDINGS, NIH_IMAGE_COL
from chexnet.reference import PRETRAINED_DIR, hint

# The project is installed (make / pip install -e .); ROOT is only for default paths.
ROOT = Path(__file__).resolve().parents[1]
DEFAULT_PREDS = PRETRAINED_DIR / "preds.csv"  # reproduce-chexnet's, from fetch_reference.py
DEFAULT_LABELS = ROOT / "nih_labels.csv"
PROB = "prob_"


def load(preds_path: Path, labels_path: Path, age_edges: Sequence[int],
         followup_edges: Sequence[int]
         ) -> tuple[np.ndarray, np.ndarray, list[str], subgroups.Attributes]:
    """(y_true (N, K), y_score (N, K), findings, attributes with patient ids) of the preds."""
    if not preds_path.is_file():
        raise DataError(f"{preds_path}: predictions file not found (--preds).{hint(preds_path)}")
    preds = pd.read_csv(preds_path)
    findings = [c[len(PROB):] for c in preds.columns if c.startswith(PROB)]
    if NIH_IMAGE_COL not in preds.columns or set(findings) != set(NIH_FINDINGS):
        raise DataError(f"{preds_path}: expected '{NIH_IMAGE_COL}' and prob_<Finding> columns "
                        "of the 14 NIH findings (reproduce-chexnet's preds.csv).")
    ids = preds[NIH_IMAGE_COL].astype(str).tolist()
    truth = read_nih_labels(labels_path).frame.set_index("image_id")
    attrs = subgroups.read_attributes(labels_path, ids, age_edges, followup_edges)
    y_true = truth.loc[ids, findings].to_numpy(np.float64)
    return y_true, preds[[PROB + f for f in findings]].to_numpy(np.float64), findings, attrs


def train_no_finding_rate(split_labels: Path) -> float:
    """Fraction of No Finding images (all 14 findings 0) in the `train` fold of a labels file
    with a `fold` column (nih_labels.csv: the reference split)."""
    table = pd.read_csv(split_labels)
    if "fold" not in table.columns or not set(NIH_FINDINGS) <= set(table.columns):
        raise DataError(f"{split_labels}: expected nih_labels.csv's columns (the 14 findings "
                        f"and 'fold' with {list(FOLDS)}) for --split-labels.")
    train = table[table["fold"] == "train"]
    return float((train[list(NIH_FINDINGS)].sum(axis=1) == 0).mean())


def markdown(table: pd.DataFrame) -> str:
    """A table as a markdown pipe table, cells as strings."""
    head = "| " + " | ".join(table.columns) + " |"
    rule = "| " + " | ".join("---" for _ in table.columns) + " |"
    rows = ["| " + " | ".join(str(v) for v in row) + " |" for row in table.itertuples(index=False)]
    return "\n".join([head, rule, *rows])


def _ci(value: float, low: float, high: float, signed: bool = False) -> str:
    if not np.isfinite(value):
        return "n/a"
    spec = "+.4f" if signed else ".4f"
    return f"{value:{spec}} [{low:{spec}}, {high:{spec}}]"


def auc_markdown(table: pd.DataFrame) -> str:
    """The mean rows of `subgroup_auc` as markdown: AUC and gap with their CIs."""
    mean = table[table["finding"] == "mean"]
    return markdown(pd.DataFrame({
        "attribute": mean["attribute"], "group": mean["group"], "images": mean["n"],
        "patients": mean["patients"],
        "mean AUC [95% CI]": [_ci(*v) for v in zip(mean["auc"], mean["ci_low"],
                                                    mean["ci_high"])],
        "gap to rest [95% CI]": [_ci(*v, signed=True) for v in zip(
            mean["gap"], mean["gap_ci_low"], mean["gap_ci_high"])]}))


def under_markdown(table: pd.DataFrame) -> str:
    return markdown(pd.DataFrame({
        "attribute": table["attribute"], "group": table["group"],
        "images with a finding": table["with_finding"], "called normal": table["underdiagnosed"],
        "under-diagnosis [95% CI]": [_ci(*v) for v in zip(table["rate"], table["ci_low"],
                                                           table["ci_high"])],
        "gap to rest [95% CI]": [_ci(*v, signed=True) for v in zip(
            table["gap"], table["gap_ci_low"], table["gap_ci_high"])]}))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preds", type=Path, default=DEFAULT_PREDS)
    parser.add_argument("--labels", type=Path, default=DEFAULT_LABELS)
    parser.add_argument("--split-labels", type=Path, default=ROOT / "nih_labels.csv",
                        help="labels file with folds: its train fold's No Finding rate sets the "
                        "fallback under-diagnosis threshold")
    parser.add_argument("--n-boot", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--age-bands", default="0,20,40,60,80")
    parser.add_argument("--followup-bands", default="0,1,5,10,20")
    parser.add_argument("--out", type=Path, help="folder for the CSVs and reliability.png")
    args = parser.parse_args(argv)
    try:
        return run(args)
    except DataError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


def run(args: argparse.Namespace) -> int:
    import torch

    edges = (subgroups.parse_edges(args.age_bands, "--age-bands"),
             subgroups.parse_edges(args.followup_bands, "--followup-bands"))
    y_true, y_score, findings, attrs = load(args.preds, args.labels, *edges)
    n, k = y_true.shape
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    print(f"machine: {platform.machine()}, {cores} usable cores ({os.cpu_count()} in total), "
          f"{platform.processor() or platform.platform()}; numpy {np.__version__}, "
          f"torch {torch.__version__}")
    print(f"data: {n} images x {k} findings, {len(np.unique(attrs.patients))} patients "
          f"({args.preds.name}, labels {args.labels.name}); {attrs.describe()}\n")

    t0 = time.perf_counter()
    table = subgroups.subgroup_auc(y_true, y_score, attrs.table, attrs.patients, findings,
                                   args.n_boot, args.seed, progress=True)
    seconds = time.perf_counter() - t0
    n_groups = int(table[["attribute", "group"]].drop_duplicates().shape[0])
    print(f"## Subgroup AUC (mean over findings), {args.n_boot} patient resamples, seed "
          f"{args.seed}; gap = subgroup - rest of the test fold, same resamples\n")
    print(auc_markdown(table) + "\n")

    rate = train_no_finding_rate(args.split_labels)
    truth, score, how = subgroups.no_finding(y_true, y_score, findings)
    threshold = subgroups.rate_threshold(score, rate)
    under = subgroups.underdiagnosis(truth, score, threshold, attrs.table, attrs.patients,
                                     args.n_boot, args.seed)
    print("## Under-diagnosis (false-positive rate of No Finding)\n")
    print(f"Score: {how}. NO VALIDATION PREDICTIONS exist for this model, so the threshold "
          f"cannot be chosen on validation. Fallback: threshold {threshold:.4f} on the TEST "
          f"fold's scores (not its labels), calling {rate:.1%} of the images normal, the No "
          f"Finding rate of the train fold of {args.split_labels.name}. Compare subgroups at "
          "this threshold; the absolute rates depend on it.\n")
    print(under_markdown(under) + "\n")

    cal = subgroups.calibration_table(y_true, y_score, findings)
    print(f"## Calibration ({subgroups.N_BINS} equal-mass bins)\n")
    print("No temperature scaling: temperatures are fitted on validation predictions only, "
          "and this model has none.\n")
    print(markdown(cal.assign(ece=cal["ece"].map("{:.4f}".format),
                              brier=cal["brier"].map("{:.4f}".format))) + "\n")
    ci = metrics.bootstrap_auc(y_true, y_score, args.n_boot, args.seed, attrs.patients,
                               findings=findings, with_mean=True)
    whole = ci.iloc[-1]
    print(f"whole test fold: mean AUC {metrics.format_ci(whole.auc, whole.ci_low, whole.ci_high)}")
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        table.to_csv(args.out / "subgroups.csv", index=False)
        under.to_csv(args.out / "underdiagnosis.csv", index=False)
        cal.to_csv(args.out / "calibration.csv", index=False)
        subgroups.plot_reliability(y_true, y_score, findings, out_png=args.out / "reliability.png")
        print(f"wrote subgroups.csv, underdiagnosis.csv, calibration.csv, reliability.png in "
              f"{args.out}")
    print(f"subgroups {n}x{k}x{args.n_boot} ({n_groups} subgroups): {seconds:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
