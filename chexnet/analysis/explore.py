"""Explore a dataset before training on it: class balance per fold, co-occurrence, demographics,
sample images, findings per image, images per patient (and, for CheXphoto, the raw uncertain /
blank label counts and the rendition mix).

    python explore_data.py nih --data data/demo/nih --out explore/demo
    python explore_data.py nih --data /data/nih --labels /data/nih/Data_Entry_2017_v2020.csv.gz \\
        --missing skip --out explore/nih_sample
    python explore_data.py chexphoto --data /data/CheXphoto-v1.1 --out explore/photo

Folds are the ones retrain.py would use with the same labels file, --seed (and, for CheXphoto,
--view): a labels file with a `fold` column keeps it (the committed nih_labels.csv carries the
reference split); an NIH `Data_Entry_2017*.csv` gets the reference split when every image is
NIH's, else (the demo) the seeded patient-level 70/10/20 split; summary.json says which;
CheXphoto's train.csv is split 90/10 by patient and
valid.csv is the test fold. With `--missing keep` (default) every row of the labels file is
counted and sample images come from the files present; `--missing skip` counts only the rows
whose image is on disk (e.g. a partial NIH download).

Writes into --out: class_balance.csv/png, cooccurrence_counts.csv, cooccurrence_conditional.csv,
cooccurrence.png, demographics.csv/png (when the labels carry age / sex / view), samples.png,
findings_per_image.csv/png, images_per_patient.csv/png, summary.json; CheXphoto adds
uncertainty.csv/png and renditions.csv/png.
"""
from __future__ import annotations

import argparse
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from PIL import ImageOps

from chexnet.cli import at_least, command, integer
from chexnet.files import check_outputs
from chexnet.data import (
    DataError, chexphoto_table, find_chexphoto_root, index_images, load_xray, plain_value,
    resolve_nih_labels,
    apply_split,
    read_nih_labels,
)
from chexnet.labels import (
    CHEXPERT_OBSERVATIONS, CHEXPHOTO_FINDINGS, FOLDS, NIH_FINDINGS, NIH_IMAGE_COL,
    NIH_NO_FINDING,
)

if TYPE_CHECKING:
    from matplotlib.axes import Axes

# Data_Entry columns holding demographics (NIH) -> this module's column names.
NIH_DEMOGRAPHIC_COLS = {"Patient Age": "age", "Patient Gender": "sex", "View Position": "view"}
# CheXpert schema columns read for demographics.
CHEXPERT_DEMOGRAPHIC_COLS = ("Sex", "Age", "Frontal/Lateral", "AP/PA")
SEX_NAMES = {"M": "M", "Male": "M", "F": "F", "Female": "F"}
# Age bins: decades, with everything from 90 up in one bin (NIH's older release has typos such
# as 412 years; they land in "90+" instead of stretching the axis).
AGE_EDGES = (0, 10, 20, 30, 40, 50, 60, 70, 80, 90, np.inf)
AGE_LABELS = ("0-9", "10-19", "20-29", "30-39", "40-49", "50-59", "60-69", "70-79", "80-89",
              "90+")
# CheXpert raw label values.
POSITIVE, NEGATIVE, UNCERTAIN = 1.0, 0.0, -1.0


# --------------------------------------------------------------------------------------------
# Tables
# --------------------------------------------------------------------------------------------
def _folds_of(table: pd.DataFrame) -> list[str]:
    """Folds present in `table`, in train/val/test order (a table without `fold` is one fold)."""
    if "fold" not in table.columns:
        return []
    present = list(pd.unique(table["fold"].astype(str)))
    return [f for f in FOLDS if f in present] + sorted(f for f in present if f not in FOLDS)


def _groups(table: pd.DataFrame) -> list[tuple[str, pd.DataFrame]]:
    """(name, rows) per fold, then ('all', table)."""
    return [(f, table[table["fold"].astype(str) == f]) for f in _folds_of(table)] + [("all", table)]


@dataclass(frozen=True)
class ExploreTable:
    """A dataset's rows for exploration and where they came from.

    frame: one row per image (`image_id, patient, fold, path` with '' for an image not on
        disk, the finding columns, `age`, `sex`, `view` when known).
    n_listed: rows of the labels file(s); n_present: images found on disk.
    labels, split, demographics: NIH: the labels file, the split of `fold`, the file the
        demographics came from (None: none found).
    root, sources: CheXphoto: the folder holding the CSVs, and the CSVs.
    """
    frame: pd.DataFrame
    n_listed: int
    n_present: int
    labels: str | None = None
    split: str | None = None
    demographics: str | None = None
    root: str | None = None
    sources: tuple[str, ...] = ()


def fold_sizes(table: pd.DataFrame) -> dict[str, int]:
    """Images per fold (train, val, test as present) and in all: what `class_balance`'s
    prevalences are fractions of."""
    return {name: int(len(part)) for name, part in _groups(table)}


def class_balance(table: pd.DataFrame, findings: Sequence[str]) -> pd.DataFrame:
    """Positives and prevalence of each finding per fold, side by side.

    A finding is positive where its column is exactly 1; prevalence is positives over the
    images whose label for that finding is known (not NaN). Unless `findings` already holds
    "No Finding", a derived "No Finding" row counts images with no positive among `findings`
    (NIH's definition).

    Args:
        table: one row per image, a 1/0/NaN column per finding and (optionally) `fold`.
        findings: finding columns, in display order.

    Returns:
        DataFrame indexed by finding (name `finding`) with columns n_<fold>, prev_<fold> for
        each fold in train/val/test order, then n_all, prev_all (`fold_sizes` gives the
        number of images of each).
    """
    rows = list(findings)
    add_no_finding = NIH_NO_FINDING not in rows
    out = pd.DataFrame(index=pd.Index(rows + ([NIH_NO_FINDING] if add_no_finding else []),
                                      name="finding"))
    for name, part in _groups(table):
        values = part[list(findings)].to_numpy(np.float64)              # (n, K)
        positives = (values == 1).sum(axis=0)
        known = (~np.isnan(values)).sum(axis=0)
        counts, prev = list(positives), [p / k if k else math.nan for p, k in zip(positives, known)]
        if add_no_finding:
            none = int((~(values == 1).any(axis=1)).sum()) if len(values) else 0
            counts.append(none)
            prev.append(none / len(values) if len(values) else math.nan)
        out[f"n_{name}"] = np.asarray(counts, dtype=np.int64)
        out[f"prev_{name}"] = np.asarray(prev, dtype=np.float64)
    return out


def cooccurrence(table: pd.DataFrame, findings: Sequence[str]) -> pd.DataFrame:
    """Co-occurrence counts: entry (i, j) is the number of images positive for both i and j.

    Symmetric, with the diagonal equal to each finding's positive count. NaN (masked) labels
    count as not positive.

    Returns:
        (K, K) int DataFrame indexed and columned by `findings`.
    """
    pos = (table[list(findings)].to_numpy(np.float64) == 1).astype(np.int64)   # (n, K)
    return pd.DataFrame(pos.T @ pos, index=list(findings), columns=list(findings))


def conditional_cooccurrence(counts: pd.DataFrame) -> pd.DataFrame:
    """P(column | row) from a `cooccurrence` table: counts[i, j] / counts[i, i].

    Rows of findings with no positive image are NaN (the condition never holds).
    """
    diag = np.diag(counts.to_numpy()).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        probs = counts.to_numpy(np.float64) / diag[:, None]
    probs[diag == 0] = np.nan
    return pd.DataFrame(probs, index=counts.index, columns=counts.columns)


def age_groups(age: pd.Series) -> pd.Series:
    """Ages in years -> decade bins ('0-9' .. '90+'); unknown ages are NaN."""
    return pd.cut(pd.to_numeric(age, errors="coerce"), AGE_EDGES, right=False,
                  labels=AGE_LABELS)


def demographics(table: pd.DataFrame) -> pd.DataFrame:
    """Counts of age group, sex and view per fold, for whichever of `age`, `sex`, `view` the
    table has.

    Returns:
        Long DataFrame with columns variable ('age_group', 'sex', 'view'), value, one count
        column per fold (train/val/test order) and `all`; empty (same columns) when the table
        has none of the three. Unknown values are counted as 'unknown'.
    """
    folds = _folds_of(table)
    columns = ["variable", "value", *folds, "all"]
    parts = []
    for variable in ("age", "sex", "view"):
        if variable not in table.columns:
            continue
        if variable == "age":
            values = age_groups(table["age"]).astype(object)
            order = list(AGE_LABELS)
            name = "age_group"
        else:
            values = table[variable].astype(object)
            order = sorted(pd.unique(values.dropna().astype(str)))
            name = variable
        values = values.where(values.notna(), "unknown").astype(str)
        if (values == "unknown").any():
            order.append("unknown")
        frame = pd.DataFrame({"variable": name, "value": order})
        for fold, part in _groups(table):
            counts = values.loc[part.index].value_counts()
            frame[fold] = [int(counts.get(v, 0)) for v in order]
        parts.append(frame)
    if not parts:
        return pd.DataFrame(columns=columns)
    return pd.concat(parts, ignore_index=True)[columns]


def findings_per_image(table: pd.DataFrame, findings: Sequence[str]) -> pd.DataFrame:
    """How many images have 0, 1, 2, ... positive findings, per fold.

    Returns:
        DataFrame indexed by n_findings (0 .. max) with one count column per fold and `all`.
    """
    n = pd.Series((table[list(findings)].to_numpy(np.float64) == 1).sum(axis=1),
                  index=table.index)
    top = int(n.max()) if len(n) else 0
    out = pd.DataFrame(index=pd.RangeIndex(top + 1, name="n_findings"))
    for fold, part in _groups(table):
        out[fold] = n.loc[part.index].value_counts().reindex(out.index, fill_value=0).astype(int)
    return out


def images_per_patient(table: pd.DataFrame) -> pd.DataFrame:
    """How many patients have 1, 2, 3, ... images, per fold (a patient is in one fold).

    Returns:
        DataFrame indexed by images (1 .. max) with one patient-count column per fold and `all`.
    """
    per = table.groupby("patient", sort=False).size()
    top = int(per.max()) if len(per) else 0
    out = pd.DataFrame(index=pd.RangeIndex(1, top + 1, name="images"))
    for fold, part in _groups(table):
        counts = part.groupby("patient", sort=False).size().value_counts()
        out[fold] = counts.reindex(out.index, fill_value=0).astype(int)
    return out


def uncertainty_counts(csv_path: str | os.PathLike,
                       observations: Sequence[str] | None = None) -> pd.DataFrame:
    """Raw CheXpert label values per observation, before any uncertainty policy.

    Args:
        csv_path: a CheXpert-schema CSV (CheXphoto train.csv or valid.csv).
        observations: columns to count (default: every CheXpert observation in the file).

    Returns:
        DataFrame indexed by observation with columns positive (1), negative (0),
        uncertain (-1), blank (empty cell), rows, frac_uncertain, frac_blank.

    Raises:
        DataError: missing file or columns, or a value other than 1, 0, -1 or blank (the
            message names the file, row and column).
    """
    path = Path(csv_path)
    if not path.is_file():
        raise DataError(f"{path}: CheXpert CSV not found.")
    raw = pd.read_csv(path, dtype=str, keep_default_na=False)
    if observations is None:
        observations = [o for o in CHEXPERT_OBSERVATIONS if o in raw.columns]
    missing = [o for o in observations if o not in raw.columns]
    if missing or not observations:
        raise DataError(f"{path}: missing observation column(s) "
                        f"{missing or list(CHEXPERT_OBSERVATIONS)}; expected the CheXpert schema.")
    cells = raw[list(observations)].apply(lambda c: c.str.strip())
    blank = cells == ""
    values = cells.mask(blank).apply(pd.to_numeric, errors="coerce")
    bad = ~blank & ~values.isin([POSITIVE, NEGATIVE, UNCERTAIN])
    if bad.to_numpy().any():
        row, col = np.argwhere(bad.to_numpy())[0]
        raise DataError(f"{path}: row {row + 2}, column '{observations[col]}' holds "
                        f"{plain_value(cells.iat[row, col])}; CheXpert labels are 1, 0, -1 or "
                        "blank.")
    out = pd.DataFrame({
        "positive": (values == POSITIVE).sum(), "negative": (values == NEGATIVE).sum(),
        "uncertain": (values == UNCERTAIN).sum(), "blank": blank.sum()}).astype(int)
    out["rows"] = len(raw)
    n = max(len(raw), 1)
    out["frac_uncertain"] = out["uncertain"] / n
    out["frac_blank"] = out["blank"] / n
    out.index.name = "observation"
    return out


def rendition_counts(table: pd.DataFrame, by: str = "fold") -> pd.DataFrame:
    """Images per rendition (natural, synthetic/digital, synthetic/photographic, ...) per group.

    Args:
        table: CheXphoto rows with a `rendition` column and the `by` column.
        by: grouping column: `fold` (train/val/test) or `csv` (the source file: train/valid).

    Returns:
        DataFrame indexed by group with one count column per rendition (natural first) and
        `total`.
    """
    counts = pd.crosstab(table[by].astype(str), table["rendition"].astype(str))
    order = sorted(counts.columns, key=lambda r: (r != "natural", r))
    groups = [g for g in FOLDS if g in counts.index] + sorted(
        g for g in counts.index if g not in FOLDS)
    counts = counts.loc[groups, order]
    counts["total"] = counts.sum(axis=1)
    counts.index.name = by
    counts.columns.name = None
    return counts.astype(int)


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------
def _nih_demographics(labels: Path, data: Path) -> tuple[pd.DataFrame | None, str | None]:
    """age / sex / view per image id, from the labels file, else from a Data_Entry file in
    `data` (nih_labels.csv carries no demographics). Returns (frame indexed by image id, source)."""
    sources = [labels, *sorted(data.glob("Data_Entry_2017*.csv")),
               *sorted(data.glob("Data_Entry_2017*.csv.gz"))]
    for source in dict.fromkeys(sources):     # ordered, without repeats
        header = pd.read_csv(source, nrows=0).columns
        wanted = [c for c in NIH_DEMOGRAPHIC_COLS if c in header]
        if NIH_IMAGE_COL in header and wanted:
            frame = pd.read_csv(source, usecols=[NIH_IMAGE_COL, *wanted],
                                dtype={NIH_IMAGE_COL: str})
            frame = frame.rename(columns=NIH_DEMOGRAPHIC_COLS).set_index(NIH_IMAGE_COL)
            if "sex" in frame:
                frame["sex"] = frame["sex"].map(lambda s: SEX_NAMES.get(s, s))
            return frame[~frame.index.duplicated()], str(source)
    return None, None


def nih_explore_table(data: str | os.PathLike, labels: str | os.PathLike | None = None,
                      missing: str = "keep", seed: int = 0) -> ExploreTable:
    """NIH (or demo) label table for exploration.

    Args:
        data: dataset root (images in any layout `index_images` knows).
        labels: labels file (default: `data.resolve_nih_labels`).
        missing: `keep` every row of the labels file (`path` is '' where the image is absent),
            or `skip` the rows whose image is not on disk.
        seed: seed of the patient split for Data_Entry files (retrain.py's --seed).

    Returns:
        ExploreTable: `image_id, patient, fold, path`, the 14 finding columns, and `age`,
        `sex`, `view` when known; the labels file, split, demographics file, counts.
    """
    if missing not in ("keep", "skip"):
        raise ValueError(f"missing {missing!r}: expected 'keep' or 'skip'")
    data = Path(data)
    if not data.is_dir():
        raise DataError(f"{data}: data folder not found. Pass --data with the dataset root.")
    labels = Path(labels) if labels is not None else resolve_nih_labels(data)
    # Folds come from the full labels file before any row is dropped, as in retrain.py, so the
    # folds shown are the ones a run with the same labels and seed trains on.
    labelled = read_nih_labels(labels, seed)
    if labelled.split == "random":
        try:  # NIH images: retrain.py's default, the reference split
            labelled = apply_split(labelled, "reference", seed, source=str(labels))
        except DataError:  # not NIH's images (the demo): retrain.py --dataset demo's split
            pass
    table = labelled.frame
    paths = index_images(data)
    table["path"] = table["image_id"].map(lambda i: str(paths[i]) if i in paths else "")
    n_listed, present = len(table), table["path"] != ""
    if missing == "skip":
        if not present.any():
            raise DataError(f"{data}: none of the {n_listed} images listed in {labels} is "
                            "under this folder; check --data, or drop --missing skip.")
        table = table[present].reset_index(drop=True)
    demo, demo_source = _nih_demographics(labels, data)
    if demo is not None:
        table = table.join(demo, on="image_id")
    return ExploreTable(table, n_listed, int(present.sum()), labels=str(labels),
                        split=labelled.split, demographics=demo_source)


def chexphoto_explore_table(data: str | os.PathLike, missing: str = "keep", view: str = "all",
                            seed: int = 0) -> ExploreTable:
    """CheXphoto rows for exploration: folds as retrain.py makes them (same --view and --seed).

    Finding columns hold the *positive* labels (1 where the CSV says 1.0, else 0): uncertain and
    blank cells are counted separately by `uncertainty_counts`.

    Returns:
        ExploreTable: `image_id, patient, rel_path, rendition, fold, path, csv` (train/valid),
        one column per CheXpert observation, and `age`, `sex`, `view` (AP, PA, Lateral or
        Frontal); the CSVs' folder and paths, counts.
    """
    if missing not in ("keep", "skip"):
        raise ValueError(f"missing {missing!r}: expected 'keep' or 'skip'")
    root = find_chexphoto_root(data)
    labelled = chexphoto_table(root, "zeros", CHEXPERT_OBSERVATIONS, "all", view, seed)
    table = labelled.frame
    raw = []
    for name in ("train", "valid"):
        path = root / f"{name}.csv"
        if path.is_file():
            head = pd.read_csv(path, nrows=0).columns
            cols = ["Path", *(c for c in CHEXPERT_DEMOGRAPHIC_COLS if c in head)]
            frame = pd.read_csv(path, usecols=cols, dtype=str, keep_default_na=False)
            frame["csv"] = name
            raw.append(frame)
    meta = pd.concat(raw, ignore_index=True).drop_duplicates("Path").set_index("Path")
    meta = meta.reindex(table["image_id"])
    table["csv"] = meta["csv"].to_numpy()
    if "Age" in meta:
        table["age"] = pd.to_numeric(meta["Age"], errors="coerce").to_numpy()
    if "Sex" in meta:
        table["sex"] = meta["Sex"].map(lambda s: SEX_NAMES.get(s, s or "unknown")).to_numpy()
    if "Frontal/Lateral" in meta:
        frontal = meta["Frontal/Lateral"].str.lower() == "frontal"
        ap_pa = meta["AP/PA"].str.strip() if "AP/PA" in meta else pd.Series("", meta.index)
        table["view"] = np.where(~frontal, "Lateral",
                                 np.where(ap_pa != "", ap_pa, "Frontal")).astype(str)
    present = np.array([os.path.isfile(p) for p in table["path"]], dtype=bool)
    n_listed = len(table)
    table.loc[~present, "path"] = ""
    if missing == "skip":
        if not present.any():
            raise DataError(f"{root}: none of the {n_listed} images listed in the CSVs is "
                            "on disk; check --data, or drop --missing skip.")
        table = table[present].reset_index(drop=True)
    return ExploreTable(table, n_listed, int(present.sum()), root=str(root),
                        sources=labelled.sources)


# --------------------------------------------------------------------------------------------
# Figures
# --------------------------------------------------------------------------------------------
FOLD_COLOURS = {"train": "C0", "val": "C1", "test": "C2", "all": "C7"}


def _fold_colour(fold: str, i: int) -> str:
    return FOLD_COLOURS.get(fold, f"C{3 + i % 7}")


def plot_class_balance(balance: pd.DataFrame, images: dict[str, int] | None = None) -> Figure:
    """Grouped bars: prevalence of each finding in each fold (from `class_balance`), with the
    positive count printed over each bar."""
    folds = [c[len("prev_"):] for c in balance.columns if c.startswith("prev_")]
    folds = [f for f in folds if f != "all"] or ["all"]
    names = list(balance.index)
    fig = Figure(figsize=(max(8, 0.75 * len(names) + 2), 4.8), layout="constrained")
    ax = fig.add_subplot()
    width = 0.8 / len(folds)
    x = np.arange(len(names))
    images = images or {}
    for i, fold in enumerate(folds):
        prev = balance[f"prev_{fold}"].to_numpy(np.float64)
        bars = ax.bar(x + (i - (len(folds) - 1) / 2) * width, 100 * np.nan_to_num(prev), width,
                      color=_fold_colour(fold, i), gid=f"fold_{fold}",
                      label=f"{fold} ({images.get(fold, '?')} images)")
        ax.bar_label(bars, labels=[str(n) for n in balance[f"n_{fold}"]], fontsize=6,
                     rotation=90, padding=2)
    ax.set_xticks(x, names, rotation=40, ha="right")
    ax.set(ylabel="prevalence (% of labelled images)",
           title="class balance per fold (numbers: positive images)")
    ax.margins(y=0.15)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    return fig


def plot_cooccurrence(counts: pd.DataFrame) -> Figure:
    """Two heatmaps: co-occurrence counts and P(column | row), values written in the cells."""
    cond = conditional_cooccurrence(counts)
    k = len(counts)
    fig = Figure(figsize=(2 * (0.45 * k + 2.2), 0.45 * k + 2), layout="constrained")
    axes = fig.subplots(1, 2)
    raw = counts.to_numpy(np.float64)
    # Counts span orders of magnitude (the diagonal dwarfs the rest): a log colour scale keeps
    # the off-diagonal structure visible.
    panels = ((axes[0], raw, np.log1p(raw), "co-occurrence (images)", "{:.0f}",
               "log(1 + images)", None),
              (axes[1], cond.to_numpy(np.float64), np.ma.masked_invalid(cond.to_numpy()),
               "P(column | row)", "{:.2f}", "probability", 1.0))
    for ax, values, shown, title, fmt, bar_label, vmax in panels:
        image = ax.imshow(shown, cmap="viridis", vmin=0, vmax=vmax)
        ax.set_xticks(range(k), counts.columns, rotation=60, ha="right", fontsize=7)
        ax.set_yticks(range(k), counts.index, fontsize=7)
        ax.set_title(title)
        if k <= 16:  # beyond that the numbers are unreadable anyway
            for (r, c), v in np.ndenumerate(values):
                if np.isfinite(v) and v != 0:   # zeros left blank: the pattern reads faster
                    dark = image.norm(shown[r, c]) < 0.5
                    ax.text(c, r, fmt.format(v), ha="center", va="center", fontsize=5.5,
                            color="white" if dark else "black")
        fig.colorbar(image, ax=ax, shrink=0.7, label=bar_label)
    return fig


def plot_demographics(table: pd.DataFrame) -> Figure:
    """Age histogram per fold (fraction of the fold's images) and sex / view bars per fold."""
    panels = [v for v in ("age", "sex", "view") if v in table.columns]
    if not panels:
        raise ValueError("no age, sex or view column to plot")
    fig = Figure(figsize=(4.2 * len(panels), 3.6), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, len(panels)))
    groups = [(f, part) for f, part in _groups(table) if f != "all"] or [("all", table)]
    for ax, variable in zip(axes, panels):
        if variable == "age":
            bins = np.arange(0, 101, 5)
            for i, (fold, part) in enumerate(groups):
                age = pd.to_numeric(part["age"], errors="coerce").dropna().clip(upper=100)
                if len(age):
                    ax.hist(age, bins=bins, histtype="step", lw=1.5, density=True,
                            color=_fold_colour(fold, i), label=f"{fold} (n={len(age)})")
            ax.set(xlabel="age (years)", ylabel="density", title="age")
            ax.legend(fontsize=7)
            continue
        values = table[variable].astype(object).where(table[variable].notna(), "unknown")
        cats = sorted(pd.unique(values.astype(str)))
        width = 0.8 / len(groups)
        x = np.arange(len(cats))
        for i, (fold, part) in enumerate(groups):
            frac = values.loc[part.index].astype(str).value_counts(normalize=True)
            ax.bar(x + (i - (len(groups) - 1) / 2) * width,
                   [100 * frac.get(c, 0.0) for c in cats], width, color=_fold_colour(fold, i),
                   label=fold)
        ax.set_xticks(x, cats)
        ax.set(ylabel="% of fold's images", title=variable)
        ax.legend(fontsize=7)
    return fig


def _count_bars(ax: "Axes", dist: pd.DataFrame, xlabel: str, ylabel: str, title: str) -> None:
    folds = [c for c in dist.columns if c != "all"] or ["all"]
    width = 0.8 / len(folds)
    x = np.arange(len(dist.index))
    for i, fold in enumerate(folds):
        ax.bar(x + (i - (len(folds) - 1) / 2) * width, dist[fold], width,
               color=_fold_colour(fold, i), label=fold)
    ax.set_xticks(x, [str(v) for v in dist.index], fontsize=8 if len(x) <= 15 else 6)
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)


def plot_findings_per_image(dist: pd.DataFrame) -> Figure:
    """Bars per fold: images with 0, 1, 2, ... findings (from `findings_per_image`)."""
    fig = Figure(figsize=(7, 4), layout="constrained")
    _count_bars(fig.add_subplot(), dist, "positive findings per image", "images",
                "findings per image")
    return fig


def plot_images_per_patient(dist: pd.DataFrame, max_bars: int = 30) -> Figure:
    """Bars per fold: patients with 1, 2, 3, ... images (from `images_per_patient`); the tail
    beyond `max_bars` images is summed into the last bar so that NIH's 100+-image patients do
    not squeeze the plot."""
    if len(dist) > max_bars:
        head = dist.iloc[:max_bars - 1].copy()
        tail = dist.iloc[max_bars - 1:].sum().rename(f"{dist.index[max_bars - 1]}+")
        head.index = head.index.astype(str)
        dist = pd.concat([head, tail.to_frame().T])
    fig = Figure(figsize=(7, 4), layout="constrained")
    _count_bars(fig.add_subplot(), dist, "images per patient", "patients", "images per patient")
    return fig


def plot_samples(table: pd.DataFrame, findings: Sequence[str], k: int = 3, seed: int = 0,
                 thumb: int = 128) -> Figure:
    """A grid of sample images: one row per finding (k positives each, then a No Finding row
    unless `findings` has one), drawn at random (seeded) among the rows whose image file is
    present (`path` != ''). Rows with no image present stay empty and say so.

    The tiles are pasted into one mosaic drawn by a single imshow: one Axes per tile made the
    layout the slowest part of an exploration.

    Raises:
        ImageReadError: a sampled image cannot be decoded (the message names it).
    """
    present = table[table["path"].astype(str) != ""]
    values = present[list(findings)].to_numpy(np.float64) == 1
    rows = [(f, present.index[values[:, j]]) for j, f in enumerate(findings)]
    if NIH_NO_FINDING not in findings:
        rows.append((NIH_NO_FINDING, present.index[~values.any(axis=1)]))
    rng = np.random.default_rng(seed)
    gap = max(2, thumb // 16)
    cell = thumb + gap
    mosaic = np.full((len(rows) * cell, k * cell), 255, dtype=np.uint8)   # (rows*cell, k*cell)
    captions: list[tuple[int, int, str]] = []
    for r, (_name, idx) in enumerate(rows):
        chosen = rng.choice(idx, size=min(k, len(idx)), replace=False) if len(idx) else []
        for c, i in enumerate(chosen):
            row = present.loc[i]
            # Fit into the tile both ways: shrinks 1024 px NIH images (small PNG), enlarges
            # 32 px demo images (visible at all).
            tile = np.asarray(ImageOps.contain(load_xray(row["path"]), (thumb, thumb)))
            y0 = r * cell + (thumb - tile.shape[0]) // 2      # centred in its cell
            x0 = c * cell + (thumb - tile.shape[1]) // 2
            mosaic[y0:y0 + tile.shape[0], x0:x0 + tile.shape[1]] = tile
            # NIH ids are file names; CheXphoto ids are long paths: show patient + rendition.
            captions.append((r, c, f"{row['patient']} {row['rendition']}" if "rendition" in
                             row.index else str(row["image_id"])))
        if not len(chosen):
            captions.append((r, 0, "none present"))
    fig = Figure(figsize=(1.45 * k + 1.6, 1.45 * len(rows) + 0.5), layout="constrained")
    ax = fig.add_subplot()
    ax.imshow(mosaic, cmap="gray", vmin=0, vmax=255, interpolation="antialiased")
    # Long names wrapped onto two lines, so they fit beside a narrow grid.
    names = [n.replace(" ", "\n", 1).replace("_", "_\n", 1) if len(n) > 12 else n
             for n, _ in rows]
    ax.set_yticks([r * cell + thumb / 2 for r in range(len(rows))], names, fontsize=8)
    ax.set_xticks([])
    ax.tick_params(length=0)
    # imshow keeps pixels square, so the Axes is narrower than its layout slot; anchoring it
    # right leaves the spare width on the left, where the (long) finding names are.
    ax.set_anchor("E")
    for spine in ax.spines.values():
        spine.set_visible(False)
    for r, c, text in captions:
        if text == "none present":
            ax.text(c * cell + thumb / 2, r * cell + thumb / 2, text, fontsize=7, ha="center",
                    va="center", color="grey")
        else:
            ax.text(c * cell + 2, r * cell + thumb - 2, text, fontsize=5, va="bottom",
                    color="yellow")
    ax.set_title(f"{k} sample images per finding (files present)", fontsize=9)
    return fig


def plot_uncertainty(counts: pd.DataFrame) -> Figure:
    """Stacked horizontal bars per observation: positive, negative, uncertain (-1), blank.

    Args:
        counts: from `uncertainty_counts` (indexed by observation), or several of them stacked
            with `csv` and `observation` columns: then one panel per CSV.
    """
    if "csv" in counts.columns:
        parts = [(f"{name}: raw label values", part.set_index("observation"))
                 for name, part in counts.groupby("csv", sort=False)]
    else:
        parts = [("raw label values", counts)]
    n_obs = max(len(p) for _, p in parts)
    fig = Figure(figsize=(7 * len(parts), 0.3 * n_obs + 1.8), layout="constrained")
    for ax, (title, part) in zip(np.atleast_1d(fig.subplots(1, len(parts))), parts):
        left = np.zeros(len(part))
        y = np.arange(len(part))
        for kind, colour in (("positive", "C3"), ("negative", "C0"), ("uncertain", "C1"),
                             ("blank", "0.8")):
            ax.barh(y, part[kind], left=left, color=colour, label=kind, gid=kind)
            left += part[kind].to_numpy()
        ax.set_yticks(y, part.index, fontsize=8)
        ax.invert_yaxis()
        ax.set(xlabel="rows", title=title)
        ax.legend(fontsize=7, ncols=4, loc="lower right")
    return fig


def plot_renditions(counts: pd.DataFrame) -> Figure:
    """Stacked bars per group (fold or CSV): images of each rendition (from `rendition_counts`)."""
    fig = Figure(figsize=(6, 3.8), layout="constrained")
    ax = fig.add_subplot()
    bottom = np.zeros(len(counts))
    for i, rendition in enumerate(c for c in counts.columns if c != "total"):
        ax.bar(counts.index.astype(str), counts[rendition], bottom=bottom, label=rendition,
               color=f"C{i}")
        bottom += counts[rendition].to_numpy()
    ax.set(ylabel="images", title=f"renditions per {counts.index.name}")
    ax.legend(fontsize=8)
    return fig


# --------------------------------------------------------------------------------------------
# Whole explorations
# --------------------------------------------------------------------------------------------
def _save(fig: Figure, path: Path, written: list[str], dpi: int = 110) -> None:
    fig.savefig(path, dpi=dpi)
    written.append(path.name)


def _write_common(explored: ExploreTable, findings: Sequence[str],
                  balance_findings: Sequence[str], out: Path, k: int, seed: int
                  ) -> tuple[list[str], dict]:
    """Outputs shared by both datasets. Returns (file names written, summary entries)."""
    written: list[str] = []
    table = explored.frame
    balance = class_balance(table, balance_findings)
    images = fold_sizes(table)
    balance.to_csv(out / "class_balance.csv", float_format="%.4f")
    written.append("class_balance.csv")
    _save(plot_class_balance(balance, images), out / "class_balance.png", written)
    counts = cooccurrence(table, findings)
    counts.to_csv(out / "cooccurrence_counts.csv")
    conditional_cooccurrence(counts).to_csv(out / "cooccurrence_conditional.csv",
                                            float_format="%.4f")
    written += ["cooccurrence_counts.csv", "cooccurrence_conditional.csv"]
    _save(plot_cooccurrence(counts), out / "cooccurrence.png", written)
    demo = demographics(table)
    if len(demo):
        demo.to_csv(out / "demographics.csv", index=False)
        written.append("demographics.csv")
        _save(plot_demographics(table), out / "demographics.png", written)
    per_image = findings_per_image(table, findings)
    per_image.to_csv(out / "findings_per_image.csv")
    written.append("findings_per_image.csv")
    _save(plot_findings_per_image(per_image), out / "findings_per_image.png", written)
    per_patient = images_per_patient(table)
    per_patient.to_csv(out / "images_per_patient.csv")
    written.append("images_per_patient.csv")
    _save(plot_images_per_patient(per_patient), out / "images_per_patient.png", written)
    _save(plot_samples(table, balance_findings, k, seed), out / "samples.png", written, dpi=100)
    patients = table.groupby("patient").size()
    summary = {
        "images": int(len(table)), "patients": int(len(patients)),
        "images_listed": explored.n_listed,
        "images_present": explored.n_present,
        "folds": {f: n for f, n in images.items() if f != "all"},
        "prevalence_all": {f: float(v) for f, v in balance["prev_all"].items()},
        "mean_images_per_patient": float(patients.mean()) if len(patients) else math.nan,
        "max_images_per_patient": int(patients.max()) if len(patients) else 0,
        "mean_findings_per_image": float(
            (table[list(findings)].to_numpy(np.float64) == 1).sum(axis=1).mean())
        if len(table) else math.nan,
    }
    return written, summary


def explore_nih(data: str | os.PathLike, out: str | os.PathLike,
                labels: str | os.PathLike | None = None, missing: str = "keep", seed: int = 0,
                k: int = 3) -> dict:
    """Explore an NIH (or demo) dataset: write PNGs + CSVs into `out`.

    Args:
        data: dataset root.
        out: output folder (created).
        labels: labels file (default: data/nih_labels.csv, Data_Entry_2017*.csv(.gz) in data,
            then this repo's nih_labels.csv).
        missing: `keep` (every labelled row) or `skip` (only images on disk).
        seed: split seed (as retrain.py --seed) and sample-image seed.
        k: sample images per finding.

    Returns:
        Summary dict (also written as summary.json): dataset, labels, images, patients, folds,
        prevalence_all, ..., files (names written into `out`).
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    explored = nih_explore_table(data, labels, missing, seed)
    written, summary = _write_common(explored, NIH_FINDINGS, NIH_FINDINGS, out, k, seed)
    summary = {"dataset": "nih", "data": str(data), "labels": explored.labels,
               "demographics_from": explored.demographics, "missing": missing,
               "split": explored.split, "seed": seed, **summary}
    return _finish(summary, written, out)


def explore_chexphoto(data: str | os.PathLike, out: str | os.PathLike, missing: str = "keep",
                      view: str = "all", seed: int = 0, k: int = 3) -> dict:
    """Explore a CheXphoto (or CheXphoto demo) dataset: write PNGs + CSVs into `out`.

    Besides the common outputs: uncertainty.csv/png (raw 1 / 0 / -1 / blank counts per
    observation of each CSV, before any policy) and renditions.csv/png (natural / synthetic
    digital / synthetic photographic images per fold and per CSV).

    Returns:
        Summary dict (also written as summary.json).
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    explored = chexphoto_explore_table(data, missing, view, seed)
    table = explored.frame
    written, summary = _write_common(explored, CHEXPHOTO_FINDINGS, CHEXPERT_OBSERVATIONS, out,
                                     k, seed)
    parts = []
    for source in explored.sources:
        counts = uncertainty_counts(source)
        counts.insert(0, "csv", Path(source).name)
        parts.append(counts.reset_index())
    uncertainty = pd.concat(parts, ignore_index=True)
    uncertainty.to_csv(out / "uncertainty.csv", index=False, float_format="%.4f")
    written.append("uncertainty.csv")
    _save(plot_uncertainty(uncertainty), out / "uncertainty.png", written)
    by_fold = rendition_counts(table, "fold")
    by_csv = rendition_counts(table, "csv")
    renditions = pd.concat([by_fold.rename(index=lambda g: f"fold {g}"),
                            by_csv.rename(index=lambda g: f"{g}.csv")]).fillna(0).astype(int)
    renditions.index.name = "group"
    renditions.to_csv(out / "renditions.csv")
    written.append("renditions.csv")
    _save(plot_renditions(by_fold), out / "renditions.png", written)
    summary = {"dataset": "chexphoto", "data": str(data), "root": explored.root,
               "sources": list(explored.sources), "missing": missing, "view": view,
               "seed": seed, **summary,
               "uncertain_cells": {name: int(part["uncertain"].sum())
                                   for name, part in uncertainty.groupby("csv")},
               "blank_cells": {name: int(part["blank"].sum())
                               for name, part in uncertainty.groupby("csv")},
               "renditions_by_fold": {g: {c: int(v) for c, v in row.items()}
                                      for g, row in by_fold.iterrows()}}
    return _finish(summary, written, out)


def _json_safe(value: object) -> object:
    """NaN -> None, recursively: strict JSON has no NaN (a finding absent from a table)."""
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _finish(summary: dict, written: list[str], out: Path) -> dict:
    summary = _json_safe(summary)
    summary["out"] = str(out)
    summary["files"] = sorted(written + ["summary.json"])
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    return summary


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------
@command
def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="dataset", required=True)
    for name in ("nih", "chexphoto"):
        s = sub.add_parser(name, help=f"explore a {name} dataset (the demo data too)")
        s.add_argument("--data", required=True, help="dataset root folder")
        s.add_argument("--out", required=True, help="folder for the PNGs and CSVs")
        s.add_argument("--missing", choices=("keep", "skip"), default="keep",
                       help="keep: count every labelled row (samples from the files present); "
                       "skip: count only the images on disk")
        s.add_argument("--seed", type=integer(0), default=0,
                       help="split seed (as retrain.py --seed)")
        s.add_argument("--k", type=at_least(1), default=3, help="sample images per finding")
        if name == "nih":
            s.add_argument("--labels", help="nih_labels.csv or Data_Entry_2017*.csv(.gz); "
                           "default: DATA/nih_labels.csv, DATA/Data_Entry_2017*.csv, then this "
                           "repo's nih_labels.csv")
        else:
            s.add_argument("--view", choices=("all", "frontal", "lateral"), default="all",
                           help="rows to explore (retrain.py trains on frontal by default; "
                           "folds match a run only with the same --view)")
    args = p.parse_args(argv)
    check_outputs({"--out": args.out}, {"--data": args.data,
                                        "--labels": getattr(args, "labels", None)},
                  folders=("--out",))
    if args.dataset == "nih":
        summary = explore_nih(args.data, args.out, args.labels, args.missing, args.seed,
                              args.k)
    else:
        summary = explore_chexphoto(args.data, args.out, args.missing, args.view,
                                    args.seed, args.k)
    folds = ", ".join(f"{f} {n}" for f, n in summary["folds"].items())
    print(f"{summary['dataset']}: {summary['images']} images of {summary['patients']} patients "
          f"({folds}); {summary['images_present']} of {summary['images_listed']} listed images "
          "are on disk")
    print(f"wrote {len(summary['files'])} files to {summary['out']}/: "
          f"{', '.join(summary['files'])}")
    return 0
