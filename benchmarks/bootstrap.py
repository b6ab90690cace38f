"""Bootstrap AUC benchmark: `metrics.bootstrap_auc` against a naive resample-and-score loop.

    python benchmarks/bootstrap.py    # pretrained/preds.csv (fetch_reference.py), nih_labels.csv
    python benchmarks/bootstrap.py --n-boot 1000 --naive-boot 20

On the reference predictions (22,433 test images x 14 findings), labels from this
repository's nih_labels.csv (the 2020 labels) with `scoring.read_truth`, patient groups from
its `Patient ID`:
  vectorised: `metrics.bootstrap_auc`, --n-boot resamples, images and patients as the unit.
  naive: per resample, index the arrays and call sklearn's `roc_auc_score` per label. It is
      timed on --naive-boot resamples (the same resamples as the first rows of the vectorised
      run) and extrapolated linearly to --n-boot; the output says so. Its AUCs are compared
      with the vectorised replicates (largest absolute difference).
Prints a markdown table; the last line is `bootstrap NxKxB: N.N s` (image-level, vectorised).
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
from sklearn.metrics import roc_auc_score

from chexnet.analysis import metrics
from chexnet.reference import PRETRAINED_DIR
from chexnet.scoring import PROB_PREFIX, read_preds, read_truth

# The project is installed (make / pip install -e .); ROOT is only for default paths.
ROOT = Path(__file__).resolve().parents[1]

DEFAULT_PREDS = PRETRAINED_DIR / "preds.csv"  # reproduce-chexnet's, from fetch_reference.py
DEFAULT_LABELS = ROOT / "nih_labels.csv"


def load(preds_path: Path, labels_path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray,
                                                       list[str]]:
    """(y_true (N, K), y_score (N, K), patient ids (N,), findings) of a preds file."""
    preds, id_col, findings = read_preds(preds_path)
    truth = read_truth(labels_path, findings)
    ids = preds[id_col].astype(str)
    y_true = truth.loc[ids, findings].to_numpy(np.float64)
    patients = truth.loc[ids, "patient"].to_numpy()
    y_score = preds[[PROB_PREFIX + f for f in findings]].to_numpy(np.float64)
    return y_true, y_score, patients, findings


def naive_replicates(y_true: np.ndarray, y_score: np.ndarray, groups: np.ndarray | None,
                     n_boot: int, seed: int) -> np.ndarray:
    """(n_boot, K) AUCs by explicit resampling + sklearn, on `metrics.bootstrap_counts`'s draws.

    The draws themselves are not timed apart: materialising the index is part of the naive cost.
    """
    unit, n_units = metrics.resampling_units(groups, len(y_true))
    counts = np.concatenate(list(metrics.bootstrap_counts(n_units, n_boot, seed)))
    out = np.empty((n_boot, y_true.shape[1]))
    for b in range(n_boot):
        idx = np.repeat(np.arange(len(y_true)), counts[b][unit])   # the resampled rows
        t, s = y_true[idx], y_score[idx]
        for k in range(t.shape[1]):
            out[b, k] = roc_auc_score(t[:, k], s[:, k])
    return out


def timed(fn, *args, **kwargs) -> tuple[object, float]:
    t0 = time.perf_counter()
    result = fn(*args, **kwargs)
    return result, time.perf_counter() - t0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preds", type=Path, default=DEFAULT_PREDS)
    parser.add_argument("--labels", type=Path, default=DEFAULT_LABELS)
    parser.add_argument("--n-boot", type=int, default=1000)
    parser.add_argument("--naive-boot", type=int, default=20,
                        help="resamples the naive loop really runs (then extrapolated)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    y_true, y_score, patients, findings = load(args.preds, args.labels)
    n, k = y_true.shape
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    print(f"machine: {platform.machine()}, {cores} usable cores ({os.cpu_count()} in total), "
          f"{platform.processor() or platform.platform()}; numpy {np.__version__}")
    print(f"data: {n} images x {k} findings, {len(np.unique(patients))} patients "
          f"({args.preds.name})\n")

    rows = []
    image_seconds = None
    for unit, groups in (("image", None), ("patient", patients)):
        table, seconds = timed(metrics.bootstrap_auc, y_true, y_score, n_boot=args.n_boot,
                               seed=args.seed, groups=groups, findings=findings)
        rows.append((f"vectorised `bootstrap_auc`, {unit} resampling", f"{args.n_boot}",
                     seconds, 1000 * seconds / args.n_boot))
        if unit == "image":
            image_seconds = seconds
        naive, naive_s = timed(naive_replicates, y_true, y_score, groups, args.naive_boot,
                               args.seed)
        fast = metrics.bootstrap_replicates(y_true, y_score, args.naive_boot, args.seed, groups)
        per = naive_s / args.naive_boot
        rows.append((f"naive sklearn loop, {unit} resampling (timed on {args.naive_boot}, "
                     f"extrapolated)", f"{args.n_boot} (est.)", per * args.n_boot, 1000 * per))
        print(f"{unit} resampling: largest |naive - vectorised| AUC over {args.naive_boot} "
              f"shared resamples: {np.nanmax(np.abs(naive - fast)):.1e}")
        print(metrics.format_ci_table(table) + "\n")

    print("| method | resamples | seconds | per-resample ms |")
    print("| --- | --- | --- | --- |")
    for method, boots, seconds, ms in rows:
        print(f"| {method} | {boots} | {seconds:.1f} | {ms:.1f} |")
    print(f"\nnaive rows: {args.naive_boot} resamples timed, scaled linearly to {args.n_boot}.")
    print(f"bootstrap {n}x{k}x{args.n_boot}: {image_seconds:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
