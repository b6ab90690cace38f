"""Score predictions: per-label ROC AUC, alone or against a labels file.

    python eval_model.py --preds results/demo/preds.csv
    python eval_model.py --preds results/demo/preds.csv --ci --roc roc.png --thresholds
    python eval_model.py --preds results/nih/preds.csv --compare results/photo_on_nih/preds.csv
    python eval_model.py --preds ../shared/data/reference/reproduce_chexnet_pretrained_preds.csv \\
        --labels ../shared/data/nih/Data_Entry_2017_v2020.csv.gz --out aucs.csv

A predictions file has an id column (`Image Index` for NIH, `Path` for CheXphoto) and one
`prob_<Finding>` column per finding, as reproduce-chexnet writes; this project's `preds.csv`
also carries the ground truth (a `<Finding>` column each), so it can be re-scored alone.

--ci adds 95% bootstrap confidence intervals (1,000 resamples of patients where the image
ids name them: NIH `NNNNNNNN_NNN.png`, CheXphoto `.../patientNNNNN/...`; else of images).
--thresholds reports F1, precision, recall and specificity at 0.5 and at Youden's threshold
chosen on the validation predictions (`val_preds.csv` next to --preds, written by
retrain.py): the test fold never chooses a threshold. --compare B.csv is a paired comparison
of two runs on the same images: AUC difference with its bootstrap CI and DeLong's test.
"""
from __future__ import annotations

import argparse
import math
import re
import sys
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
from sklearn.metrics import roc_auc_score

from cxr_dataset import DataError, read_chexpert_csv, read_nih_labels
from labels import NIH_FINDINGS, NIH_IMAGE_COL, PUBLISHED_AUCS, PUBLISHED_MEAN_AUC

PROB_PREFIX = "prob_"
ID_COLUMNS = (NIH_IMAGE_COL, "Path", "image_id")


def per_label_auc(y_true: np.ndarray, y_score: np.ndarray, findings: Sequence[str],
                  warn: bool = True) -> dict[str, float]:
    """ROC AUC of each label.

    Args:
        y_true: (N, K) targets in {0, 1}; NaN entries (masked labels) are left out of that
            label's AUC.
        y_score: (N, K) scores (probabilities or logits).
        findings: the K label names.
        warn: print a message for each label whose AUC is undefined.

    Returns:
        finding -> AUC; NaN where the label has only one class among its unmasked entries.
    """
    y_true = np.asarray(y_true, dtype=np.float64)
    y_score = np.asarray(y_score, dtype=np.float64)
    if y_true.shape != y_score.shape or y_true.shape[1] != len(findings):
        raise ValueError(f"shapes differ: y_true {y_true.shape}, y_score {y_score.shape}, "
                         f"{len(findings)} findings")
    aucs = {}
    for k, name in enumerate(findings):
        keep = ~np.isnan(y_true[:, k])
        t, s = y_true[keep, k], y_score[keep, k]
        n_pos = int(t.sum())
        if n_pos == 0 or n_pos == len(t):
            if warn:
                kind = "no positives" if n_pos == 0 else "no negatives"
                print(f"AUC undefined for {name}: {kind} among {len(t)} labelled images "
                      "(reported as NaN).", file=sys.stderr)
            aucs[name] = math.nan
        else:
            aucs[name] = float(roc_auc_score(t, s))
    return aucs


def auc_table(aucs: dict[str, float], with_published: bool) -> pd.DataFrame:
    """AUCs as a table with a `mean` row; for NIH also the published columns of docs/datasets.md.

    The mean is over the labels with a defined AUC, as the published means are.
    """
    table = pd.DataFrame({"label": list(aucs), "auc": list(aucs.values())})
    if with_published:
        for source, values in PUBLISHED_AUCS.items():
            if source == "arnoweng/CheXNet":
                continue
            table[source] = [values.get(label, math.nan) for label in table["label"]]
    mean = {"label": "mean", "auc": float(np.nanmean(table["auc"])) if table["auc"].notna().any()
            else math.nan}
    if with_published:
        mean.update({s: PUBLISHED_MEAN_AUC[s] for s in table.columns[2:]})
    return pd.concat([table, pd.DataFrame([mean])], ignore_index=True)


def format_table(table: pd.DataFrame) -> str:
    """Readable fixed-width rendering of an AUC table (4 decimals, NaN shown as 'n/a')."""
    return table.to_string(index=False, na_rep="n/a",
                           float_format=lambda v: f"{v:.4f}")


def id_column(df: pd.DataFrame, source: str) -> str:
    for col in ID_COLUMNS:
        if col in df.columns:
            return col
    raise DataError(f"{source}: no image id column (one of {list(ID_COLUMNS)}).")


def read_preds(path: str | Path) -> tuple[pd.DataFrame, str, list[str]]:
    """Read a predictions CSV. Returns (frame, id column, findings in column order)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: predictions file not found.")
    preds = pd.read_csv(path)
    findings = [c[len(PROB_PREFIX):] for c in preds.columns if c.startswith(PROB_PREFIX)]
    if not findings:
        raise DataError(f"{path}: no '{PROB_PREFIX}<Finding>' columns; expected the "
                        "reproduce-chexnet preds.csv format.")
    return preds, id_column(preds, str(path)), findings


def read_truth(path: str | Path, findings: Sequence[str]) -> pd.DataFrame:
    """Ground truth indexed by image id, from an NIH (either schema) or CheXpert labels file."""
    path = Path(path)
    head = pd.read_csv(path, nrows=0).columns
    if "Path" in head and NIH_IMAGE_COL not in head:
        table = read_chexpert_csv(path, "zeros", findings, view="all")
    else:
        table = read_nih_labels(path)
    return table.set_index("image_id")


def score(preds_path: str | Path, labels_path: str | Path | None = None,
          published: bool = True) -> tuple[pd.DataFrame, int]:
    """Score a predictions file. Returns (AUC table, number of images scored).

    With `published`, a file of the 14 NIH findings also gets the published AUC columns."""
    y_true, y_score, findings, ids = truth_and_scores(preds_path, labels_path)
    aucs = per_label_auc(y_true, y_score, findings)
    with_published = published and list(findings) == list(NIH_FINDINGS)
    return auc_table(aucs, with_published), len(ids)


_NIH_ID = re.compile(r"^(\d{8})_\d{3}\.png$")
_PATIENT = re.compile(r"(patient\d+)")


def patients_of(ids: Sequence[str]) -> np.ndarray | None:
    """Patient of each image id when the ids encode it (NIH names, CheXphoto paths), else None."""
    ids = pd.Series([str(i) for i in ids])
    nih = ids.str.extract(_NIH_ID, expand=False)
    if nih.notna().all():
        return nih.to_numpy()
    photo = ids.str.extract(_PATIENT, expand=False)
    if photo.notna().all():
        return photo.to_numpy()
    return None


def truth_and_scores(preds_path: str | Path, labels_path: str | Path | None
                     ) -> tuple[np.ndarray, np.ndarray, list[str], list[str]]:
    """(y_true (N, K), y_score (N, K), findings, ids) of a predictions file."""
    preds, id_col, findings = read_preds(preds_path)
    if labels_path is None:
        missing = [f for f in findings if f not in preds.columns]
        if missing:
            raise DataError(f"{preds_path}: no ground-truth columns for {missing[:3]}...; pass "
                            "--labels with nih_labels.csv, Data_Entry_2017*.csv or a CheXpert CSV.")
        y_true = preds[findings].to_numpy(np.float64)
    else:
        truth = read_truth(labels_path, findings)
        ids = preds[id_col].astype(str)
        absent = ~ids.isin(truth.index)
        if absent.any():
            raise DataError(f"{labels_path}: {int(absent.sum())} of {len(ids)} predicted images "
                            f"have no labels (first: {ids[absent].iloc[0]}). Is it the right "
                            "labels file?")
        y_true = truth.loc[ids, findings].to_numpy(np.float64)
    y_score = preds[[PROB_PREFIX + f for f in findings]].to_numpy(np.float64)
    return y_true, y_score, findings, preds[id_col].astype(str).tolist()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preds", required=True, help="predictions CSV (prob_<Finding> columns)")
    parser.add_argument("--labels", help="labels file: nih_labels.csv, Data_Entry_2017*.csv(.gz) "
                        "or a CheXpert-schema CSV; default: the ground truth inside --preds")
    parser.add_argument("--out", help="where to write the AUC table (default: aucs.csv next to "
                        "--preds; --ci adds <name>_ci.csv beside it)")
    parser.add_argument("--no-published", action="store_true", help="leave out the published "
                        "NIH columns (e.g. for the synthetic demo, where they mean nothing)")
    parser.add_argument("--ci", action="store_true", help="95%% bootstrap confidence intervals")
    parser.add_argument("--n-boot", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--roc", metavar="PNG", help="write ROC curves per finding to PNG")
    parser.add_argument("--thresholds", action="store_true", help="F1/precision/recall/"
                        "specificity at 0.5 and at Youden's threshold chosen on --val-preds")
    parser.add_argument("--val-preds", help="validation predictions for --thresholds (default: "
                        "val_preds.csv next to --preds)")
    parser.add_argument("--compare", metavar="PREDS_B", help="paired comparison with another "
                        "run's predictions on the same images (diff = A - B)")
    args = parser.parse_args(argv)
    try:
        return _run(args)
    except DataError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    import metrics

    preds_path = Path(args.preds)
    folder = preds_path.parent
    y_true, y_score, findings, ids = truth_and_scores(preds_path, args.labels)
    groups = patients_of(ids)
    table, n = score(preds_path, args.labels, published=not args.no_published)
    print(f"AUC on {n} images ({args.preds}):")
    print(format_table(table))
    if "CheXNet paper" in table.columns:
        print("Published columns are on their own test splits; differences of 0.01 are within "
              "split-to-split variation.")
    out = Path(args.out) if args.out else folder / "aucs.csv"
    table.to_csv(out, index=False)
    print(f"wrote {out}")
    if args.ci:
        unit = "patients" if groups is not None else "images (ids name no patients)"
        ci = metrics.bootstrap_auc(y_true, y_score, args.n_boot, args.seed, groups,
                                   findings=findings, with_mean=True)
        print(f"\n95% bootstrap CIs ({args.n_boot} resamples of {unit}, seed {args.seed}):")
        print(metrics.format_ci_table(ci))
        ci_out = out.with_name(out.stem + "_ci.csv")
        ci.to_csv(ci_out, index=False)
        print(f"wrote {ci_out}")
    if args.roc:
        curves = metrics.roc_curves(y_true, y_score, findings)
        aucs = table.set_index("label")["auc"].to_dict()
        metrics.plot_roc(curves, aucs, args.roc)
        print(f"wrote {args.roc}")
    if args.thresholds:
        val_path = Path(args.val_preds) if args.val_preds else folder / "val_preds.csv"
        if not val_path.is_file():
            raise DataError(f"{val_path}: validation predictions not found. Thresholds are "
                            "chosen on the validation fold, never on test: pass --val-preds.")
        v_true, v_score, v_findings, _ = truth_and_scores(val_path, args.labels)
        if v_findings != findings:
            raise DataError(f"{val_path}: findings differ from {preds_path}.")
        report = metrics.threshold_report(v_true, v_score, y_true, y_score, findings)
        print("\nThreshold metrics on the test predictions (Youden threshold chosen on "
              f"{val_path.name}):")
        print(metrics.format_ci_table(report))
        report.to_csv(folder / "thresholds.csv", index=False)
        print(f"wrote {folder / 'thresholds.csv'}")
    if args.compare:
        pair = metrics.align_preds(preds_path, args.compare)
        truth = pair.y_true if pair.y_true is not None else y_true
        cmp = metrics.compare_runs(truth, pair.score_a, pair.score_b, pair.findings,
                                   args.n_boot, args.seed, patients_of(pair.ids))
        print(f"\nPaired comparison on {len(pair.ids)} images, diff = AUC of A ({args.preds}) "
              f"minus AUC of B ({args.compare}); DeLong's test for correlated ROC curves:")
        print(metrics.format_ci_table(cmp))
        cmp.to_csv(folder / "compare.csv", index=False)
        print(f"wrote {folder / 'compare.csv'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
