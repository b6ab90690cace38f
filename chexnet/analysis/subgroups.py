"""Who does the model fail? Subgroup AUCs, under-diagnosis and calibration of multi-label
predictions, each with patient-bootstrap confidence intervals.

Conventions (as in metrics.py):
    y_true      (N, K) float: 1 positive, 0 negative, NaN = masked (left out of that label only)
    y_score     (N, K) probabilities
    groups      (N,) patient ids, or None: with ids, resampling draws patients, not images
    attributes  DataFrame of N rows, one string column per attribute (`sex`, `age`, `view`,
                `followup`): each image's subgroup, as `read_attributes` builds it

    from chexnet.analysis import subgroups
    attrs = subgroups.read_attributes("Data_Entry_2017_v2020.csv.gz", ids)
    table = subgroups.subgroup_auc(y_true, y_score, attrs.table, attrs.patients, findings)

Every interval is a percentile bootstrap over the draws of
`metrics.bootstrap_counts(n_patients, n_boot, seed)`, and the same draws serve every subgroup,
a subgroup and the rest of the fold (so a gap's interval is that of a paired difference), and
`underdiagnosis` with the same seed. A patient is one resampling unit: all of their images enter
a resample together, whichever subgroups those images fall in (an age band can change between
follow-ups).

Subgroup AUCs are not computed by resampling arrays: for one label and one attribute with G
groups, a resample's G x G matrix of Mann-Whitney counts (positives of group h against negatives
of group g) is read off per-group cumulative sums of the negatives' draw counts, the scheme of
`metrics.weighted_auc` split by group. A group's AUC is its diagonal entry; the rest of the fold
is every entry with neither index g. One pass over the negatives per attribute and label then
serves all of its groups and their complements, where G calls of `metrics.weighted_auc` per side
would cost 2G passes (measured on the reference predictions: 30 s for the age bands alone).
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np
import pandas as pd
from scipy.optimize import minimize_scalar
from sklearn.metrics import precision_recall_curve

from chexnet.analysis import metrics
from chexnet.data import DEFAULT_NIH_LABELS, DataError, find_chexphoto_root
from chexnet.labels import NIH_IMAGE_COL, NIH_NO_FINDING, NIH_PATIENT_COL

if TYPE_CHECKING:
    from matplotlib.figure import Figure

ATTRIBUTES = ("sex", "age", "view", "followup")
AGE_EDGES = (0, 20, 40, 60, 80)          # bands 0-19, 20-39, 40-59, 60-79, 80+
FOLLOWUP_EDGES = (0, 1, 5, 10, 20)       # bands 0, 1-4, 5-9, 10-19, 20+
UNKNOWN = "unknown"                      # the group of an image whose cell is blank
# The column of each attribute in each labels schema. CheXpert's view also reads
# `Frontal/Lateral`: a lateral image has a blank AP/PA.
NIH_COLUMNS = {"sex": "Patient Gender", "age": "Patient Age", "view": "View Position",
               "followup": "Follow-up #"}
CHEXPERT_COLUMNS = {"sex": "Sex", "age": "Age", "view": "AP/PA"}
CHEXPERT_FRONTAL = "Frontal/Lateral"
N_BINS = 15                              # equal-mass bins of the calibration error
_PATIENT = re.compile(r"(patient\d+)")


# ----------------------------------------------------------------------------- attributes

def parse_edges(text: str, what: str) -> tuple[int, ...]:
    """'0,20,40,60,80' -> (0, 20, 40, 60, 80). Raises DataError unless strictly increasing
    non-negative integers; `what` names the option in the message."""
    try:
        edges = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise DataError(f"{what} {text!r}: expected comma-separated integers such as "
                        "0,20,40,60,80.") from None
    if any(e < 0 for e in edges) or any(b <= a for a, b in zip(edges, edges[1:])):
        raise DataError(f"{what} {text!r}: the band edges must be increasing and >= 0.")
    return edges


def band_names(edges: Sequence[int]) -> list[str]:
    """Names of the bands [e_i, e_{i+1}) of integer values: (0, 20, 80) -> 0-19, 20-79, 80+;
    a band one value wide is that value (followup 0)."""
    names = [str(a) if b - a == 1 else f"{a}-{b - 1}" for a, b in zip(edges, edges[1:])]
    return names + [f"{edges[-1]}+"]


def to_bands(values: Sequence, edges: Sequence[int]) -> np.ndarray:
    """The band name of each value (N,) -> (N,) str: `band_names(edges)`, `<e0` below the first
    edge, UNKNOWN for a blank or non-numeric cell."""
    v = pd.to_numeric(pd.Series(values), errors="coerce").to_numpy(np.float64)
    names = np.array([f"<{edges[0]}"] + band_names(edges) + [UNKNOWN], dtype=object)
    idx = np.searchsorted(np.asarray(edges, np.float64), v, side="right")  # 0: below e0
    idx[np.isnan(v)] = len(names) - 1
    return names[idx].astype(str)


def _as_text(values: pd.Series) -> np.ndarray:
    """Cells as written (stripped); blank -> UNKNOWN."""
    text = values.astype(object).where(values.notna(), "").map(str).str.strip()
    return np.where(text == "", UNKNOWN, text).astype(str)


@dataclass
class Attributes:
    """Subgroup attributes of N images, rows in the order asked for.

    table: index = image ids, one str column per available attribute (values as written in the
    labels file, or age / follow-up bands); available: those attributes, in ATTRIBUTES order;
    missing: attribute -> why it is absent; patients: (N,) patient ids from the file, or None;
    source: the file read.
    """

    table: pd.DataFrame
    available: list[str]
    missing: dict[str, str]
    patients: np.ndarray | None
    source: str

    def describe(self) -> str:
        """One sentence: which attributes came from where, and why the others did not."""
        have = ", ".join(self.available) or "none"
        text = f"subgroup attributes from {self.source}: {have}"
        if self.missing:
            text += "; not available: " + "; ".join(f"{a} ({why})"
                                                     for a, why in self.missing.items())
        return text + "."


def attributes_from_frame(df: pd.DataFrame, source: str, age_edges: Sequence[int] = AGE_EDGES,
                          followup_edges: Sequence[int] = FOLLOWUP_EDGES) -> Attributes:
    """Attributes of every row of a labels table (NIH Data_Entry or CheXpert schema).

    NIH: sex `Patient Gender`, age `Patient Age` (banded), view `View Position`, followup
    `Follow-up #` (banded). CheXpert/CheXphoto: sex `Sex`, age `Age`, view `AP/PA`, or `Lateral`
    where `Frontal/Lateral` says so; it has no follow-up number. nih_labels.csv has none of them.

    Raises:
        DataError: neither an `Image Index` nor a `Path` column.
    """
    if NIH_IMAGE_COL in df.columns:
        id_col, columns = NIH_IMAGE_COL, NIH_COLUMNS
    elif "Path" in df.columns:
        id_col, columns = "Path", CHEXPERT_COLUMNS
    else:
        raise DataError(f"{source}: no '{NIH_IMAGE_COL}' or 'Path' column; expected an NIH "
                        "Data_Entry_2017*.csv or a CheXpert-schema CSV.")
    out = pd.DataFrame(index=pd.Index(df[id_col].astype(str), name="image_id"))
    missing = {}
    for attr in ATTRIBUTES:
        col = columns.get(attr)
        if col is None or col not in df.columns:
            missing[attr] = (f"no '{col}' column" if col else "not in this schema")
            continue
        if attr in ("age", "followup"):
            out[attr] = to_bands(df[col], age_edges if attr == "age" else followup_edges)
        else:
            out[attr] = _as_text(df[col])
    if id_col == "Path" and CHEXPERT_FRONTAL in df.columns:
        lateral = df[CHEXPERT_FRONTAL].astype(str).str.strip().str.lower().eq("lateral")
        if "view" not in out:
            missing.pop("view", None)
            out["view"] = UNKNOWN
        out.loc[lateral.to_numpy(), "view"] = "Lateral"
        out = out[[a for a in ATTRIBUTES if a in out]]
    if id_col == NIH_IMAGE_COL:
        patients = (df[NIH_PATIENT_COL].astype(str).to_numpy()
                    if NIH_PATIENT_COL in df.columns else None)
    else:
        found = df["Path"].astype(str).str.extract(_PATIENT, expand=False)
        patients = found.to_numpy() if found.notna().all() else None
    available = [a for a in ATTRIBUTES if a in out.columns]
    return Attributes(out, available, missing, patients, source)


def _read_table(path: Path) -> pd.DataFrame:
    if not path.is_file():
        raise DataError(f"{path}: labels file not found (for subgroup attributes pass --labels "
                        "with a Data_Entry_2017*.csv or a CheXpert-schema CSV).")
    return pd.read_csv(path)


def read_attributes(path: str | Path | Sequence[str | Path], ids: Sequence[str],
                    age_edges: Sequence[int] = AGE_EDGES,
                    followup_edges: Sequence[int] = FOLLOWUP_EDGES) -> Attributes:
    """Attributes of the images `ids` (in that order) from a labels file, or several files of
    one schema read as one table (CheXphoto's train.csv and valid.csv).

    Raises:
        DataError: file absent or of no known schema, an image listed twice, or an id of `ids`
            without a row (the message names the file and the first such id).
    """
    paths = [Path(path)] if isinstance(path, (str, Path)) else [Path(p) for p in path]
    source = " + ".join(str(p) for p in paths)
    frame = pd.concat([_read_table(p) for p in paths], ignore_index=True)
    attrs = attributes_from_frame(frame, source, age_edges, followup_edges)
    index = attrs.table.index
    if index.duplicated().any():
        raise DataError(f"{source}: image {index[index.duplicated()][0]!r} is listed twice.")
    ids = pd.Index([str(i) for i in ids])
    absent = ids.difference(index)
    if len(absent):
        raise DataError(f"{source}: {len(absent)} of {len(ids)} predicted images have no row "
                        f"(first: {absent[0]}). Is it the labels file of these predictions?")
    rows = index.get_indexer(ids)
    patients = attrs.patients[rows] if attrs.patients is not None else None
    return Attributes(attrs.table.iloc[rows], attrs.available, attrs.missing, patients, source)


def metadata_files(run_dir: str | Path, data: str | None = None) -> list[list[Path]]:
    """Candidate labels files with subgroup columns for a run folder written by retrain.py,
    from its config.json: the `labels` file, then the dataset folder's nih_labels.csv and
    Data_Entry_2017*.csv (NIH, demo), then, for NIH runs and predictions without a run
    folder, this repository's nih_labels.csv (every NIH image, with reproduce-chexnet's
    metadata columns); for CheXphoto its train.csv + valid.csv. Each candidate is a list of
    files read as one table. `data` replaces the recorded dataset folder."""
    path = Path(run_dir) / "config.json"
    try:
        config = json.loads(path.read_text()) if path.is_file() else {}
    except json.JSONDecodeError:
        config = {}
    folder = Path(data or config.get("data") or ".")
    if config.get("dataset") == "chexphoto":
        try:
            root = find_chexphoto_root(folder)
        except DataError:
            return []
        return [[p for p in (root / "train.csv", root / "valid.csv") if p.is_file()]]
    found = [Path(config["labels"])] if config.get("labels") else []
    found += [folder / "nih_labels.csv", *sorted(folder.glob("Data_Entry_2017*.csv*"))]
    if config.get("dataset", "nih") == "nih":  # not the demo's: its phantoms reuse NIH's ids
        found.append(DEFAULT_NIH_LABELS)  # this repository's: every NIH image, with metadata
    unique = list(dict.fromkeys(p.resolve() for p in found if p.is_file()))
    return [[p] for p in unique]


def find_attributes(ids: Sequence[str], candidates: Sequence[Sequence[Path]],
                    age_edges: Sequence[int] = AGE_EDGES,
                    followup_edges: Sequence[int] = FOLLOWUP_EDGES
                    ) -> tuple[Attributes | None, list[str]]:
    """The first candidate (from `metadata_files`) that covers `ids` and has at least one
    attribute. Returns (attributes or None, one note per candidate passed over, saying why)."""
    notes = []
    for files in candidates:
        try:
            attrs = read_attributes(files, ids, age_edges, followup_edges)
        except DataError as err:
            notes.append(str(err))
            continue
        if attrs.available:
            return attrs, notes
        notes.append(f"{attrs.source}: no subgroup column (" + "; ".join(
            f"{a}: {why}" for a, why in attrs.missing.items()) + ")")
    return None, notes


def _codes(values: pd.Series) -> tuple[np.ndarray, list[str]]:
    """(N,) int group index and the G group names: bands in numeric order, other values
    alphabetically, UNKNOWN last."""
    def key(name: str) -> tuple:
        m = re.match(r"(<)?(\d+)", name)
        if name == UNKNOWN:
            return (2, 0.0, name)
        return (0, int(m[2]) - (0.5 if m[1] else 0.0), name) if m else (1, 0.0, name)
    names = sorted(set(values.astype(str)), key=key)
    return pd.Categorical(values.astype(str), categories=names).codes.astype(np.int64), names


# ----------------------------------------------------------------------------- subgroup AUC

@dataclass(frozen=True)
class _CrossIndex:
    """One label under one attribute, arranged so that a resample's G x G Mann-Whitney counts
    cost one cumsum over the negatives and 2G gathers over the positives.

    With group g's negatives sorted by score, C_g[j] = draw weight of its first j. For a
    positive with score s, lo[g] / hi[g] = group g's negatives scored < s / <= s, so its pairs
    with them count (C_g[lo] + C_g[hi]) / 2, ties one half (metrics' `_RankIndex`, per group).
    """

    cum_dtype: type                # int32 unless a resample's weight could exceed it
    pos_unit: np.ndarray           # (P,) resampling unit of each positive
    pos_group: np.ndarray          # (P, G) float one-hot: the group of each positive
    neg_unit: list[np.ndarray]     # G arrays (Q_g,): units of group g's negatives, by score
    lo: list[np.ndarray]           # G arrays (P,)
    hi: list[np.ndarray]           # G arrays (P,)

    @classmethod
    def build(cls, t: np.ndarray, s: np.ndarray, unit: np.ndarray, code: np.ndarray,
              n_groups: int) -> "_CrossIndex":
        """t, s, unit, code: (n,) targets (NaN = masked), scores, units, group indexes."""
        # A resample's total weight is at most n_units draws x the largest unit's images;
        # twice it must fit the cumulative sums (int32 halves their memory traffic).
        sizes = np.bincount(unit) if len(unit) else np.zeros(1, np.int64)
        cum_dtype = np.int32 if 2 * len(sizes) * int(sizes.max()) < 2**31 else np.int64
        pos = np.flatnonzero(t == 1)
        neg_unit, lo, hi = [], [], []
        for g in range(n_groups):
            neg = np.flatnonzero((t == 0) & (code == g))
            neg = neg[np.argsort(s[neg], kind="stable")]
            neg_unit.append(unit[neg])
            lo.append(np.searchsorted(s[neg], s[pos], side="left"))
            hi.append(np.searchsorted(s[neg], s[pos], side="right"))
        onehot = np.zeros((len(pos), n_groups))
        onehot[np.arange(len(pos)), code[pos]] = 1.0
        return cls(cum_dtype, unit[pos], onehot, neg_unit, lo, hi)

    def pairs(self, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Under each row of unit draw counts (B, n_units): (twice_u (B, G, G), where [b, h, g]
        is twice the Mann-Whitney count of group h's positives against group g's negatives;
        positive weight (B, G); negative weight (B, G)). Integers held exactly in float64."""
        n_groups = self.pos_group.shape[1]
        w_pos = np.take(counts, self.pos_unit, axis=1).astype(np.float64)       # (B, P)
        twice_u = np.empty((counts.shape[0], n_groups, n_groups))
        w_neg = np.empty((counts.shape[0], n_groups))
        for g in range(n_groups):
            cum = np.zeros((counts.shape[0], len(self.neg_unit[g]) + 1), dtype=self.cum_dtype)
            np.cumsum(np.take(counts, self.neg_unit[g], axis=1), axis=1, out=cum[:, 1:])
            below = np.take(cum, self.lo[g], axis=1) + np.take(cum, self.hi[g], axis=1)
            twice_u[:, :, g] = (w_pos * below) @ self.pos_group                    # (B, G)
            w_neg[:, g] = cum[:, -1]
        return twice_u, w_pos @ self.pos_group, w_neg


def _group_and_rest(twice_u: np.ndarray, w_pos: np.ndarray, w_neg: np.ndarray) -> np.ndarray:
    """(B, 2, G) AUCs from `_CrossIndex.pairs`: [:, 0] each group, [:, 1] the rest of the fold
    (pairs with neither side in the group). NaN where one side has no positive or negative."""
    diag = np.diagonal(twice_u, axis1=1, axis2=2)                                   # (B, G)
    rest_u = (twice_u.sum(axis=(1, 2))[:, None] - twice_u.sum(axis=2) - twice_u.sum(axis=1)
              + diag)
    group_pairs = w_pos * w_neg
    rest_pairs = ((w_pos.sum(1, keepdims=True) - w_pos) * (w_neg.sum(1, keepdims=True) - w_neg))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.stack([np.where(group_pairs > 0, diag / (2 * group_pairs), np.nan),
                         np.where(rest_pairs > 0, rest_u / (2 * rest_pairs), np.nan)], axis=1)


def subgroup_replicates(y_true: np.ndarray, y_score: np.ndarray, codes: Sequence[np.ndarray],
                        groups: Sequence | np.ndarray | None = None, n_boot: int = 1000,
                        seed: int = 0, progress: bool = False
                        ) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per attribute, the AUC of each group and of the rest of the fold, on the data and under
    each bootstrap resample (the same resamples for every attribute, group and side).

    Args:
        y_true, y_score: (N, K).
        codes: one (N,) int array per attribute: each image's group, 0..G_a-1.
        groups: (N,) patient ids, or None to resample images.
        n_boot, seed: resamples are `metrics.bootstrap_counts(n_units, n_boot, seed)`.
        progress: show a tqdm bar over the resamples.

    Returns:
        Per attribute (points (2, G, K), replicates (n_boot, 2, G, K)); [.., 0, ..] the group,
        [.., 1, ..] the rest.
    """
    from tqdm import tqdm

    y_true, y_score, _ = metrics._as_2d(y_true, y_score)
    n, k = y_true.shape
    unit, n_units = metrics.resampling_units(groups, n)
    sizes = [int(c.max()) + 1 if len(c) else 0 for c in codes]
    indexes = [[_CrossIndex.build(y_true[:, j], y_score[:, j], unit, c, g) for j in range(k)]
               for c, g in zip(codes, sizes)]

    def aucs(counts: np.ndarray) -> list[np.ndarray]:   # per attribute (B, 2, G, K)
        return [np.stack([_group_and_rest(*ix.pairs(counts)) for ix in per_label], axis=-1)
                for per_label in indexes]

    points = [a[0] for a in aucs(np.ones((1, n_units), dtype=np.int32))]
    reps = [np.empty((n_boot, 2, g, k)) for g in sizes]
    start = 0
    with tqdm(total=n_boot, unit="resample", desc="subgroup bootstrap",
              disable=not progress) as bar:
        for counts in metrics.bootstrap_counts(n_units, n_boot, seed):
            stop = start + counts.shape[0]
            for rep, a in zip(reps, aucs(counts)):
                rep[start:stop] = a
            start = stop
            bar.update(counts.shape[0])
    return list(zip(points, reps))


def subgroup_auc(y_true: np.ndarray, y_score: np.ndarray, attributes: pd.DataFrame,
                 groups: Sequence | np.ndarray | None = None,
                 findings: Sequence[str] | None = None, n_boot: int = 1000, seed: int = 0,
                 alpha: float = 0.05, progress: bool = False) -> pd.DataFrame:
    """AUC per (attribute, group, finding) with its bootstrap CI, and the gap to the rest of
    the fold (group AUC - rest AUC) with the CI of the paired difference under the same
    resamples. Each (attribute, group) also gets a `mean` row: the mean over the findings
    defined (both classes) in the group and in the rest, its CI from per-resample means
    (a resample in which one of them is undefined is left out, as `metrics.bootstrap_auc`).

    Args:
        y_true, y_score: (N, K).
        attributes: N rows, one column per attribute (e.g. `read_attributes(...).table`).
        groups: (N,) patient ids, or None to resample images.
        findings: K names (default label_0..).
        n_boot, seed, alpha: resamples, seed, 1 - coverage of the intervals.
        progress: show a tqdm bar.

    Returns:
        DataFrame: attribute, group, finding, n (images), patients, positives, auc, ci_low,
        ci_high, rest_auc, gap, gap_ci_low, gap_ci_high.
    """
    y_true, y_score, names = metrics._as_2d(y_true, y_score, findings)
    if len(attributes) != len(y_true):
        raise ValueError(f"attributes has {len(attributes)} rows for {len(y_true)} images")
    coded = [_codes(attributes[a].reset_index(drop=True)) for a in attributes.columns]
    results = subgroup_replicates(y_true, y_score, [c for c, _ in coded], groups, n_boot, seed,
                                  progress)
    patients = np.asarray(groups) if groups is not None else np.arange(len(y_true))
    rows = []
    for attr, (code, group_names), (points, reps) in zip(attributes.columns, coded, results):
        for g, name in enumerate(group_names):
            mask = code == g
            head = {"attribute": attr, "group": name, "n": int(mask.sum()),
                    "patients": len(np.unique(patients[mask]))}
            rows += _group_rows(head, y_true[mask], points[:, g], reps[:, :, g], names, alpha)
    table = pd.DataFrame(rows)
    return table


def _group_rows(head: dict, y_true: np.ndarray, points: np.ndarray, reps: np.ndarray,
                names: Sequence[str], alpha: float) -> list[dict]:
    """Rows of one group: one per finding, then `mean`. points (2, K), reps (B, 2, K)."""
    low, high = metrics._percentile_ci(reps[:, 0], alpha)
    gap_low, gap_high = metrics._percentile_ci(reps[:, 0] - reps[:, 1], alpha)
    positives = (y_true == 1).sum(axis=0)
    rows = [{**head, "finding": name, "positives": int(positives[j]), "auc": points[0, j],
             "ci_low": low[j], "ci_high": high[j], "rest_auc": points[1, j],
             "gap": points[0, j] - points[1, j], "gap_ci_low": gap_low[j],
             "gap_ci_high": gap_high[j]} for j, name in enumerate(names)]
    defined = np.isfinite(points).all(axis=0)
    if defined.any():
        means = reps[:, :, defined].mean(axis=2)                           # (B, 2)
        (m_low,), (m_high,) = metrics._percentile_ci(means[:, :1], alpha)
        (g_low,), (g_high,) = metrics._percentile_ci(means[:, :1] - means[:, 1:], alpha)
        mean, rest = points[0, defined].mean(), points[1, defined].mean()
    else:
        m_low = m_high = g_low = g_high = mean = rest = math.nan
    rows.append({**head, "finding": "mean", "positives": int(positives.sum()), "auc": mean,
                 "ci_low": m_low, "ci_high": m_high, "rest_auc": rest, "gap": mean - rest,
                 "gap_ci_low": g_low, "gap_ci_high": g_high})
    return rows


# ----------------------------------------------------------------------------- under-diagnosis

def no_finding(y_true: np.ndarray, y_score: np.ndarray, findings: Sequence[str]
               ) -> tuple[np.ndarray, np.ndarray, str]:
    """The "No Finding" truth and score of each image.

    With a `No Finding` output (CheXphoto's --no-finding) both are that column. Otherwise the
    score is 1 - the highest finding probability (an image is called normal when no finding is
    likely), and the truth is 1 when every finding is 0, 0 when any is 1, NaN when it has no
    positive but a masked label (unknown).

    Returns:
        (truth (N,) 1/0/NaN, score (N,), a sentence saying which of the two it is).
    """
    y_true, y_score, names = metrics._as_2d(y_true, y_score, findings)
    if NIH_NO_FINDING in names:
        j = names.index(NIH_NO_FINDING)
        return y_true[:, j], y_score[:, j], "the model's own 'No Finding' output"
    truth = np.where((y_true == 1).any(axis=1), 0.0,
                     np.where((y_true == 0).all(axis=1), 1.0, np.nan))
    return truth, 1.0 - y_score.max(axis=1), (
        f"the model has no 'No Finding' output: its score is 1 - the highest of the "
        f"{len(names)} finding probabilities")


def f1_threshold(truth: np.ndarray, score: np.ndarray) -> float:
    """The threshold maximising F1 of "No Finding" (predict normal when score >= it), as
    Seyyed-Kalantari et al. (Nature Medicine 2021) choose it on the VALIDATION fold; the lowest
    such threshold on ties. NaN when the truth has one class. truth (N,) 1/0/NaN, score (N,)."""
    keep = ~np.isnan(truth)
    t, s = truth[keep], score[keep]
    if not 0 < t.sum() < len(t):
        return math.nan
    precision, recall, thresholds = precision_recall_curve(t, s)
    with np.errstate(invalid="ignore", divide="ignore"):
        f1 = 2 * precision * recall / (precision + recall)
    f1 = np.nan_to_num(f1[:-1])          # the last point (recall 0) has no threshold
    return float(thresholds[np.argmax(f1)])


def rate_threshold(score: np.ndarray, rate: float) -> float:
    """The threshold at which a fraction `rate` of these scores is called normal (score >= it).

    A fallback for predictions without a validation fold: it uses the scores it is given (no
    labels), so on the test fold it is a test-derived threshold and must be reported as such."""
    if not 0 < rate < 1:
        raise ValueError(f"rate {rate}: expected a fraction in (0, 1)")
    return float(np.quantile(np.asarray(score, np.float64), 1.0 - rate, method="higher"))


def _rate_and_rest(w: np.ndarray, called: np.ndarray, onehot: np.ndarray) -> np.ndarray:
    """(B, 2, G) rates: [:, 0] the weighted fraction called normal in each group, [:, 1] in
    the rest. w (B, A) draw weights of the A images with a finding, called (A,) 0/1,
    onehot (A, G) their groups. NaN where a side holds no image with a finding."""
    den, num = w @ onehot, (w * called) @ onehot
    rest_den, rest_num = den.sum(1, keepdims=True) - den, num.sum(1, keepdims=True) - num
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.stack([num / den, rest_num / rest_den], axis=1)


def underdiagnosis(truth: np.ndarray, score: np.ndarray, threshold: float,
                   attributes: pd.DataFrame, groups: Sequence | np.ndarray | None = None,
                   n_boot: int = 1000, seed: int = 0, alpha: float = 0.05) -> pd.DataFrame:
    """Under-diagnosis rate per subgroup: among images WITH a finding (No Finding truth 0), the
    fraction the model calls normal (score >= threshold), i.e. the false-positive rate of
    "No Finding" (Seyyed-Kalantari et al. 2021), with bootstrap CIs and the gap to the rest of
    the fold under the same resamples as `subgroup_auc` with the same seed.

    Args:
        truth, score: (N,) from `no_finding`.
        threshold: from `f1_threshold` on validation predictions (or a labelled fallback).
        attributes, groups, n_boot, seed, alpha: as `subgroup_auc` (all N images are resampled
            as there, so the draws are the same).

    Returns:
        DataFrame: attribute, group, with_finding (images with a finding), underdiagnosed,
        rate, ci_low, ci_high, gap, gap_ci_low, gap_ci_high; first row attribute `all` (no gap).
    """
    unit, n_units = metrics.resampling_units(groups, len(truth))
    abnormal = np.flatnonzero(np.asarray(truth) == 0)
    called = (np.asarray(score, np.float64)[abnormal] >= threshold).astype(np.float64)
    parts = [("all", np.zeros(len(truth), np.int64), ["all"])]
    parts += [(a, *_codes(attributes[a].reset_index(drop=True))) for a in attributes.columns]
    onehots = [np.eye(len(names))[code[abnormal]] for _, code, names in parts]   # (A, G) each
    weights = (np.take(c, unit[abnormal], axis=1).astype(np.float64)
               for c in metrics.bootstrap_counts(n_units, n_boot, seed))
    chunks = [[_rate_and_rest(w, called, onehot) for onehot in onehots] for w in weights]
    rows = []
    for i, ((attr, _, names), onehot) in enumerate(zip(parts, onehots)):
        point = _rate_and_rest(np.ones((1, len(abnormal))), called, onehot)[0]       # (2, G)
        rep = np.concatenate([chunk[i] for chunk in chunks])                         # (B, 2, G)
        low, high = metrics._percentile_ci(rep[:, 0], alpha)
        gap_low, gap_high = metrics._percentile_ci(rep[:, 0] - rep[:, 1], alpha)
        if attr == "all":      # no rest to compare with
            gap_low = gap_high = np.full(1, math.nan)
        for g, name in enumerate(names):
            rows.append({"attribute": attr, "group": name,
                         "with_finding": int(onehot[:, g].sum()),
                         "underdiagnosed": int(onehot[:, g] @ called),
                         "rate": point[0, g], "ci_low": low[g], "ci_high": high[g],
                         "gap": point[0, g] - point[1, g], "gap_ci_low": gap_low[g],
                         "gap_ci_high": gap_high[g]})
    table = pd.DataFrame(rows)
    return table


# ----------------------------------------------------------------------------- calibration

def _pairs(t: np.ndarray, p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    keep = ~np.isnan(t)
    return np.asarray(t, np.float64)[keep], np.asarray(p, np.float64)[keep]


def reliability(t: np.ndarray, p: np.ndarray, n_bins: int = N_BINS) -> pd.DataFrame:
    """Equal-mass bins of one label: images sorted by probability and cut into min(n_bins, n)
    bins of (nearly) equal count. t (N,) 1/0/NaN (NaN left out), p (N,) probabilities.

    Returns:
        DataFrame: n, mean_prob, frac_pos (the observed frequency), one row per bin.
    """
    t, p = _pairs(t, p)
    order = np.argsort(p, kind="stable")
    bins = np.array_split(order, min(n_bins, len(p))) if len(p) else []
    return pd.DataFrame({"n": [len(b) for b in bins], "mean_prob": [p[b].mean() for b in bins],
                         "frac_pos": [t[b].mean() for b in bins]})


def ece(t: np.ndarray, p: np.ndarray, n_bins: int = N_BINS) -> float:
    """Expected calibration error with equal-mass bins: sum_b (n_b / n) |mean p_b - mean t_b|.
    NaN without labelled images. t (N,) 1/0/NaN, p (N,)."""
    bins = reliability(t, p, n_bins)
    if bins.empty:
        return math.nan
    return float((bins["n"] * (bins["mean_prob"] - bins["frac_pos"]).abs()).sum()
                 / bins["n"].sum())


def brier(t: np.ndarray, p: np.ndarray) -> float:
    """Mean squared difference between probability and outcome (NaN targets left out)."""
    t, p = _pairs(t, p)
    return float(np.mean((p - t) ** 2)) if len(t) else math.nan


def calibration_table(y_true: np.ndarray, y_prob: np.ndarray, findings: Sequence[str],
                      n_bins: int = N_BINS) -> pd.DataFrame:
    """ECE (equal-mass bins) and Brier score per finding, then a `pooled` row over every
    labelled (image, finding) pair. y_true (N, K) 1/0/NaN, y_prob (N, K).

    Returns:
        DataFrame: finding, n, positives, ece, brier.
    """
    y_true, y_prob, names = metrics._as_2d(y_true, y_prob, findings)
    rows = [{"finding": name, "n": int((~np.isnan(y_true[:, j])).sum()),
             "positives": int((y_true[:, j] == 1).sum()), "ece": ece(y_true[:, j], y_prob[:, j],
                                                                     n_bins),
             "brier": brier(y_true[:, j], y_prob[:, j])} for j, name in enumerate(names)]
    flat_t, flat_p = y_true.ravel(), y_prob.ravel()
    rows.append({"finding": "pooled", "n": int((~np.isnan(flat_t)).sum()),
                 "positives": int((flat_t == 1).sum()), "ece": ece(flat_t, flat_p, n_bins),
                 "brier": brier(flat_t, flat_p)})
    return pd.DataFrame(rows)


def _logit(p: np.ndarray) -> np.ndarray:
    """log(p / (1 - p)); 0 and 1 map to -inf and +inf, so the map stays strictly increasing."""
    with np.errstate(divide="ignore"):
        return np.log(p) - np.log1p(-p)


def apply_temperature(y_prob: np.ndarray, temperatures: np.ndarray) -> np.ndarray:
    """sigmoid(logit(p) / T) per column: (N, K) probabilities, (K,) temperatures -> (N, K).
    Strictly increasing in p for T > 0, so each finding's AUC is unchanged; a NaN temperature
    leaves its column as it is."""
    y_prob = np.asarray(y_prob, np.float64)
    temps = np.asarray(temperatures, np.float64).reshape(-1)
    out = y_prob.copy()
    for j, temp in enumerate(temps):
        if np.isfinite(temp):
            out[:, j] = 1.0 / (1.0 + np.exp(-_logit(y_prob[:, j]) / temp))
    return out


def fit_temperature(t: np.ndarray, p: np.ndarray) -> float:
    """The temperature T minimising the log loss of sigmoid(logit(p) / T) on (t, p): fit it on
    VALIDATION predictions. T > 1 softens over-confident probabilities, T < 1 sharpens.
    NaN when t has one class. Searched over log T in [log 0.01, log 100]."""
    t, p = _pairs(t, p)
    if not 0 < t.sum() < len(t):
        return math.nan
    z = np.clip(_logit(p), -50.0, 50.0)

    def nll(log_temp: float) -> float:
        s = z / math.exp(log_temp)
        # log(1 + e^s) - t s, the log loss of sigmoid(s), without overflow
        return float(np.mean(np.logaddexp(0.0, s) - t * s))

    best = minimize_scalar(nll, bounds=(math.log(0.01), math.log(100.0)), method="bounded",
                           options={"xatol": 1e-6})
    return float(math.exp(best.x))


def fit_temperatures(y_true: np.ndarray, y_prob: np.ndarray) -> np.ndarray:
    """`fit_temperature` per column: (N, K) validation targets and probabilities -> (K,)."""
    y_true, y_prob, _ = metrics._as_2d(y_true, y_prob)
    return np.array([fit_temperature(y_true[:, j], y_prob[:, j])
                     for j in range(y_true.shape[1])])


@dataclass
class Calibration:
    """Calibration of the test fold, before and (when fitted on validation) after temperature
    scaling. table: finding, n, positives, ece, brier, and with temperatures also temperature,
    ece_calibrated, brier_calibrated (a `pooled` row last); calibrated: (N, K) test
    probabilities after scaling, or None; note: how the temperatures were (not) chosen."""

    table: pd.DataFrame
    temperatures: np.ndarray | None
    calibrated: np.ndarray | None
    note: str = ""


def calibrate(test_true: np.ndarray, test_prob: np.ndarray, findings: Sequence[str],
              val_true: np.ndarray | None = None, val_prob: np.ndarray | None = None,
              n_bins: int = N_BINS) -> Calibration:
    """ECE and Brier of the test fold; with validation predictions, one temperature per
    finding fitted on them and the test fold's ECE and Brier after scaling. The test fold never
    fits a temperature: without validation predictions, none is fitted."""
    before = calibration_table(test_true, test_prob, findings, n_bins)
    if val_true is None or val_prob is None:
        return Calibration(before, None, None, "no validation predictions: temperatures are "
                           "fitted on the validation fold only, never on test, so none was "
                           "fitted.")
    temps = fit_temperatures(val_true, val_prob)
    scaled = apply_temperature(test_prob, temps)
    after = calibration_table(test_true, scaled, findings, n_bins)
    table = before.assign(temperature=list(temps) + [math.nan], ece_calibrated=after["ece"],
                          brier_calibrated=after["brier"])
    unfitted = [f for f, t in zip(findings, temps) if not np.isfinite(t)]
    note = (f"one temperature per finding fitted on the validation fold ({len(val_true)} "
            "images) and applied to the test fold.")
    if unfitted:
        note += f" Not fitted (one class in validation), left as they were: {unfitted}."
    return Calibration(table, temps, scaled, note)


def plot_reliability(y_true: np.ndarray, y_prob: np.ndarray, findings: Sequence[str],
                     calibrated: np.ndarray | None = None, n_bins: int = N_BINS,
                     ncols: int = 5, out_png: str | Path | None = None) -> "Figure":
    """Reliability diagrams: one panel per finding and a `pooled` panel; observed frequency
    against mean probability per equal-mass bin, the diagonal (perfect calibration), and the
    temperature-scaled curve when `calibrated` (N, K) is given. Returns the Figure (saved as
    PNG to out_png when given)."""
    from matplotlib.figure import Figure

    y_true, y_prob, names = metrics._as_2d(y_true, y_prob, findings)
    panels = [(name, y_true[:, j], y_prob[:, j], None if calibrated is None
               else calibrated[:, j]) for j, name in enumerate(names)]
    panels.append(("pooled", y_true.ravel(), y_prob.ravel(),
                   None if calibrated is None else np.asarray(calibrated).ravel()))
    nrows = math.ceil(len(panels) / ncols)
    fig = Figure(figsize=(2.6 * ncols, 2.6 * nrows), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax, (name, t, p, c) in zip(axes, panels):
        ax.plot([0, 1], [0, 1], ls=":", color="grey", lw=1)
        extent = []
        for probs, label, style in ((p, "as predicted", "o-"), (c, "temperature-scaled", "s--")):
            if probs is None:
                continue
            bins = reliability(t, probs, n_bins)
            extent += [*bins["mean_prob"], *bins["frac_pos"]]
            ax.plot(bins["mean_prob"], bins["frac_pos"], style, ms=3, lw=1,
                    label=f"{label} (ECE {ece(t, probs, n_bins):.3f})")
        # Zoomed on the bins: most findings' probabilities stay far below 1.
        top = min(1.0, 1.15 * max([0.05, *extent]) + 0.01)
        ax.set(title=name, xlim=(0, top), ylim=(0, top), aspect="equal")
        ax.tick_params(labelsize=7)
        ax.legend(fontsize=6, loc="upper left")
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    for ax in axes[::ncols]:
        ax.set_ylabel("observed frequency", fontsize=8)
    for ax in axes[len(panels) - ncols:len(panels)]:
        ax.set_xlabel("mean probability", fontsize=8)
    if out_png is not None:
        fig.savefig(out_png, dpi=100)
    return fig


# ----------------------------------------------------------------------------- printing

def format_subgroups(table: pd.DataFrame, finding: str = "mean") -> str:
    """Fixed-width text of the rows of one finding (default the mean) of `subgroup_auc`:
    `auc [95% CI]` and `gap [95% CI]` merged as `metrics.format_ci` writes them."""
    rows = table[table["finding"] == finding]
    shown = pd.DataFrame({
        "attribute": rows["attribute"], "group": rows["group"], "n": rows["n"],
        "patients": rows["patients"], "positives": rows["positives"],
        "auc [95% CI]": _ci_column(rows, "auc", metrics.format_ci),
        "gap to rest [95% CI]": _ci_column(rows, "gap", _signed_ci)})
    return shown.to_string(index=False)


def _ci_column(table: pd.DataFrame, value: str, fmt) -> list[str]:
    """`fmt(value, low, high)` per row; the interval columns are `ci_low`/`ci_high` for the
    estimate and `<value>_ci_low`/`<value>_ci_high` otherwise (the gap)."""
    prefix = "" if value in ("auc", "rate") else f"{value}_"
    return [fmt(v, lo, hi) for v, lo, hi in
            zip(table[value], table[f"{prefix}ci_low"], table[f"{prefix}ci_high"])]


def _signed_ci(value: float, low: float, high: float) -> str:
    if not np.isfinite(value):
        return "n/a"
    if not (np.isfinite(low) and np.isfinite(high)):
        return f"{value:+.4f} [n/a]"
    return f"{value:+.4f} [{low:+.4f}, {high:+.4f}]"


def format_underdiagnosis(table: pd.DataFrame) -> str:
    """Fixed-width text of `underdiagnosis`: rate and gap with their intervals."""
    shown = pd.DataFrame({
        "attribute": table["attribute"], "group": table["group"],
        "with finding": table["with_finding"], "called normal": table["underdiagnosed"],
        "rate [95% CI]": _ci_column(table, "rate", metrics.format_ci),
        "gap to rest [95% CI]": _ci_column(table, "gap", _signed_ci)})
    return shown.to_string(index=False)
