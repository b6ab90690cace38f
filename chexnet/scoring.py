"""Reading predictions and labels, and the per-label ROC AUC: what eval_model.py scores with.

A predictions file has an id column (`Image Index` for NIH, `Path` for CheXphoto) and one
`prob_<Finding>` column per finding, as reproduce-chexnet writes; this project's `preds.csv`
also carries the ground truth (a `<Finding>` column each). `read_preds` checks it (values in
[0, 1], no repeated image, every finding present) and names the file, column and row of any
problem. Bootstrap CIs, ROC curves, thresholds and DeLong's test are in chexnet/analysis/metrics.py.
"""
from __future__ import annotations

import math
import re
import sys
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
from sklearn.metrics import roc_auc_score

from chexnet.data import DataError, read_chexpert_csv, read_csv_or_explain, read_nih_labels
from chexnet.reference import hint
from chexnet.labels import (
    CHEXPHOTO_FINDINGS, NIH_FINDINGS, NIH_IMAGE_COL, PUBLISHED_AUCS, PUBLISHED_MEAN_AUC,
)

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


def format_auc_table(table: pd.DataFrame) -> str:
    """Readable fixed-width rendering of an AUC table (4 decimals, NaN shown as 'n/a')."""
    return table.to_string(index=False, na_rep="n/a",
                           float_format=lambda v: f"{v:.4f}")


def id_column(df: pd.DataFrame, source: str) -> str:
    for col in ID_COLUMNS:
        if col in df.columns:
            return col
    raise DataError(f"{source}: no image id column (one of {list(ID_COLUMNS)}).")


def read_preds(path: str | Path) -> tuple[pd.DataFrame, str, list[str]]:
    """Read a predictions CSV. Returns (frame, id column, findings in column order).

    Raises:
        DataError: the file is missing or empty; an image is listed twice; a probability is
            missing, not a number or outside [0, 1] (logits, say); or the columns cover only
            part of a known label set (a missing finding would silently change the mean).
            Each names the file, and the column and row where it applies.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: predictions file not found.{hint(path)}")
    preds = read_csv_or_explain(path, "reproduce-chexnet's preds.csv format (an id column, "
                                "then prob_<Finding> columns)")
    findings = [c[len(PROB_PREFIX):] for c in preds.columns if c.startswith(PROB_PREFIX)]
    if not findings:
        raise DataError(f"{path}: no '{PROB_PREFIX}<Finding>' columns; expected the "
                        "reproduce-chexnet preds.csv format.")
    id_col = id_column(preds, str(path))
    _check_preds(preds, path, id_col, findings)
    return preds, id_col, findings


def _check_preds(preds: pd.DataFrame, path: Path, id_col: str, findings: list[str]) -> None:
    """The checks of `read_preds`: rows are scored once, probabilities are probabilities, and a
    known label set is complete."""
    twice = preds[id_col].duplicated(keep=False)
    if twice.any():
        rows = (np.flatnonzero(twice.to_numpy()) + 2).tolist()
        raise DataError(f"{path}: image {preds[id_col][twice].iloc[0]!r} is listed more than "
                        f"once ({int(twice.sum())} rows with repeated ids, CSV rows "
                        f"{rows[:6]}); each image must be scored once.")
    for f in findings:
        col = PROB_PREFIX + f
        values = pd.to_numeric(preds[col], errors="coerce")
        bad = values.isna() | ~values.between(0, 1)
        if bad.any():
            row = int(np.flatnonzero(bad.to_numpy())[0])
            raw = preds[col].iloc[row]
            raw = raw.item() if isinstance(raw, np.generic) else raw  # 1.6, not np.float64(1.6)
            why = ("is not a number" if pd.isna(values.iloc[row]) else
                   "is outside [0, 1]: these look like logits, apply a sigmoid first")
            raise DataError(f"{path}: column '{col}', CSV row {row + 2} ({id_col} "
                            f"{preds[id_col].iloc[row]!r}): {raw!r} {why}. Probabilities must "
                            "be numbers in [0, 1].")
        preds[col] = values
    for known in (NIH_FINDINGS, CHEXPHOTO_FINDINGS):
        # Most, but not all, of a known label set: a lost column rather than a chosen subset
        # (cross_eval.py's 7 shared findings, or a model of a few findings, are subsets).
        missing = [f for f in known if f not in findings]
        present = len(known) - len(missing)
        if set(findings) <= set(known) | {"No Finding"} and len(known) // 2 < present < len(known):
            raise DataError(f"{path}: no column for {', '.join(PROB_PREFIX + m for m in missing)}"
                            f" ({len(findings)} of the {len(known)} findings): the mean AUC "
                            "would be over a different set of findings. Add the column(s).")


def read_truth(path: str | Path, findings: Sequence[str]) -> pd.DataFrame:
    """Ground truth indexed by image id, from an NIH (either schema) or CheXpert labels file."""
    path = Path(path)
    head = pd.read_csv(path, nrows=0).columns
    if "Path" in head and NIH_IMAGE_COL not in head:
        table = read_chexpert_csv(path, "zeros", findings, view="all")
    else:
        table = read_nih_labels(path).frame
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
