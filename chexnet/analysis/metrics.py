"""Uncertainty and comparison metrics for multi-label predictions: bootstrap CIs, ROC curves,
threshold metrics, and paired comparison of two runs (bootstrap + DeLong).

Conventions shared by every function here:
    y_true   (N, K) float: 1 positive, 0 negative, NaN = masked (left out of that label only)
    y_score  (N, K) float: probabilities or logits (only their order matters for AUC)
    groups   (N,) patient ids, or None: with ids, resampling draws patients, not images

    from chexnet.analysis import metrics
    table = metrics.bootstrap_auc(y_true, y_score, groups=patients, findings=findings)
    print(metrics.format_ci_table(table))          # auc [95% CI]: 0.8383 [0.8300, 0.8460]

Bootstrap AUCs are computed without resampling any array: each replicate is a vector of draw
counts (how often each image, or each patient, was drawn), and a replicate's AUC is the
count-weighted Mann-Whitney statistic, read off cumulative sums over the negatives sorted once
per label. This is exactly sklearn's `roc_auc_score` on the explicitly resampled data (ties
count one half), at the cost of a gather and a cumsum per replicate and label.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Mapping, Sequence

import numpy as np
import pandas as pd
from scipy.stats import rankdata
from sklearn.metrics import roc_curve

if TYPE_CHECKING:
    from matplotlib.figure import Figure

# Replicates per chunk are chosen so that one chunk of draws holds about this many entries:
# bounds memory (a few tens of MB) whatever N is.
_CHUNK_ENTRIES = 2_000_000


# ----------------------------------------------------------------------------- validation

def _as_2d(y_true: np.ndarray, y_score: np.ndarray, findings: Sequence[str] | None = None
           ) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Checked float64 copies of (y_true, y_score), both (N, K), and the K label names."""
    y_true = np.asarray(y_true, dtype=np.float64)
    y_score = np.asarray(y_score, dtype=np.float64)
    if y_true.ndim == 1:
        y_true, y_score = y_true[:, None], y_score.reshape(-1, 1)
    if y_true.ndim != 2 or y_true.shape != y_score.shape:
        raise ValueError(f"y_true {y_true.shape} and y_score {y_score.shape} must both be (N, K)")
    k = y_true.shape[1]
    names = list(findings) if findings is not None else [f"label_{i}" for i in range(k)]
    if len(names) != k:
        raise ValueError(f"{len(names)} finding names for {k} label columns")
    known = np.isnan(y_true) | (y_true == 0) | (y_true == 1)
    if not known.all():
        row, col = np.argwhere(~known)[0]
        raise ValueError(f"y_true[{row}, {col}] = {float(y_true[row, col])!r}; targets must "
                         "be 0, 1 or NaN (masked)")
    bad = ~np.isfinite(y_score) & ~np.isnan(y_true)
    if bad.any():
        row, col = np.argwhere(bad)[0]
        raise ValueError(f"y_score[{row}, {col}] = {float(y_score[row, col])!r}; scores of "
                         "unmasked entries must be finite")
    return y_true, y_score, names


def resampling_units(groups: Sequence | np.ndarray | None, n: int
                     ) -> tuple[np.ndarray, int]:
    """Resampling unit of each of n samples, and the number of units.

    Without groups each image is its own unit; with groups, each distinct id is one unit
    (numbered in sorted id order). Row r of `bootstrap_counts(n_units, ...)` weights sample i
    by counts[r, unit[i]].

    Returns:
        (unit (n,) int, n_units).
    """
    if groups is None:
        return np.arange(n), n
    groups = np.asarray(groups)
    if groups.shape != (n,):
        raise ValueError(f"groups has shape {groups.shape}; expected ({n},), one id per row")
    _, unit = np.unique(groups, return_inverse=True)
    return unit.reshape(-1), int(unit.max()) + 1 if n else 0


# ----------------------------------------------------------------------------- bootstrap core

def bootstrap_counts(n_units: int, n_boot: int, seed: int = 0) -> Iterator[np.ndarray]:
    """Draw counts of a nonparametric bootstrap, in chunks of replicates.

    Replicate b draws `n_units` units uniformly with replacement; its row holds how often each
    unit was drawn (a multinomial(n_units, 1/n_units) vector, summing to n_units). The sequence
    is fully determined by (n_units, n_boot, seed), so two calls give the same resamples.

    Args:
        n_units: number of resampling units (images, or patients for a cluster bootstrap).
        n_boot: number of replicates in total.
        seed: seed of `np.random.default_rng`.

    Yields:
        (c, n_units) int32 arrays of draw counts, c <= chunk size, n_boot rows over all chunks.
    """
    rng = np.random.default_rng(seed)
    chunk = max(1, min(n_boot, _CHUNK_ENTRIES // max(n_units, 1)))
    for start in range(0, n_boot, chunk):
        c = min(chunk, n_boot - start)
        draws = rng.integers(0, n_units, size=(c, n_units))
        # One bincount over the whole chunk: row r's draws are offset into [r*n, (r+1)*n).
        flat = (draws + (np.arange(c) * n_units)[:, None]).ravel()
        yield np.bincount(flat, minlength=c * n_units).reshape(c, n_units).astype(np.int32)


@dataclass(frozen=True)
class _RankIndex:
    """One label's data arranged so a weighted AUC costs a gather and a cumsum.

    With negatives sorted by score, C[j] = total weight of the first j negatives. For a positive
    with score s, lo/hi = number of negatives scored < s / <= s, so
        weight of negatives below s + half the tied ones = (C[lo] + C[hi]) / 2,
    and AUC = sum_pos w_i (C[lo_i] + C[hi_i]) / (2 W_pos W_neg), ties counted one half.
    """

    pos_unit: np.ndarray   # (P,) resampling unit of each positive
    neg_unit: np.ndarray   # (Q,) unit of each negative, negatives in ascending score order
    lo: np.ndarray         # (P,) negatives strictly below each positive
    hi: np.ndarray         # (P,) negatives below or tied with each positive

    @classmethod
    def build(cls, t: np.ndarray, s: np.ndarray, unit: np.ndarray) -> "_RankIndex":
        """t, s, unit: (n,) targets in {0, 1} (masked rows already dropped), scores, units."""
        pos, neg = np.flatnonzero(t == 1), np.flatnonzero(t == 0)
        neg = neg[np.argsort(s[neg], kind="stable")]
        s_neg = s[neg]
        return cls(unit[pos], unit[neg], np.searchsorted(s_neg, s[pos], side="left"),
                   np.searchsorted(s_neg, s[pos], side="right"))

    def auc(self, counts: np.ndarray) -> np.ndarray:
        """AUC under each row of unit weights. counts: (B, n_units) int. Returns (B,) float,
        NaN where a replicate holds no positive or no negative."""
        w_neg = np.take(counts, self.neg_unit, axis=1)                     # (B, Q)
        cum = np.zeros((counts.shape[0], w_neg.shape[1] + 1), dtype=np.int64)
        np.cumsum(w_neg, axis=1, out=cum[:, 1:])                           # (B, Q+1)
        w_pos = np.take(counts, self.pos_unit, axis=1).astype(np.int64)    # (B, P)
        # Integer arithmetic keeps the statistic exact; only the final division rounds.
        twice_u = (w_pos * (np.take(cum, self.lo, axis=1) + np.take(cum, self.hi, axis=1))
                   ).sum(axis=1)
        pairs = w_pos.sum(axis=1) * cum[:, -1]
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(pairs > 0, twice_u / (2.0 * pairs), np.nan)


def weighted_auc(y_true: np.ndarray, y_score: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """ROC AUC of one label under integer sample weights (e.g. bootstrap draw counts).

    Equals `sklearn.metrics.roc_auc_score` on the data with row i repeated weights[b, i] times.

    Args:
        y_true: (N,) 0/1, NaN = masked (ignored).
        y_score: (N,) scores.
        weights: (B, N) or (N,) non-negative integer weights.

    Returns:
        (B,) AUCs (or a float for 1-D weights); NaN where the weighted data has one class.
    """
    y_true, y_score, _ = _as_2d(y_true, y_score)
    weights = np.asarray(weights)
    if not np.issubdtype(weights.dtype, np.integer) or (weights < 0).any():
        raise ValueError("weights must be non-negative integers (draw counts)")
    single = weights.ndim == 1
    weights = np.atleast_2d(weights)
    if weights.shape[1] != y_true.shape[0]:
        raise ValueError(f"weights {weights.shape} do not match {y_true.shape[0]} samples")
    keep = ~np.isnan(y_true[:, 0])
    index = _RankIndex.build(y_true[keep, 0], y_score[keep, 0], np.flatnonzero(keep))
    out = index.auc(weights)
    return float(out[0]) if single else out


def _replicates(y_true: np.ndarray, scores: Sequence[np.ndarray], n_boot: int, seed: int,
                groups: Sequence | np.ndarray | None) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Point AUCs and bootstrap replicate AUCs of several score sets under the SAME resamples.

    Returns:
        (points, replicates): per score set, a (K,) array and a (n_boot, K) array.
    """
    n, k = y_true.shape
    unit, n_units = resampling_units(groups, n)
    indexes = []
    for scores_ in scores:
        per_label = []
        for j in range(k):
            keep = ~np.isnan(y_true[:, j])
            per_label.append(_RankIndex.build(y_true[keep, j], scores_[keep, j], unit[keep]))
        indexes.append(per_label)
    ones = np.ones((1, n_units), dtype=np.int32)
    points = [np.array([ix.auc(ones)[0] for ix in per_label]) for per_label in indexes]
    reps = [np.empty((n_boot, k)) for _ in scores]
    start = 0
    for counts in bootstrap_counts(n_units, n_boot, seed):
        stop = start + counts.shape[0]
        for rep, per_label in zip(reps, indexes):
            for j, ix in enumerate(per_label):
                rep[start:stop, j] = ix.auc(counts)
        start = stop
    return points, reps


def bootstrap_replicates(y_true: np.ndarray, y_score: np.ndarray, n_boot: int = 1000,
                         seed: int = 0, groups: Sequence | np.ndarray | None = None
                         ) -> np.ndarray:
    """Per-label AUC of each bootstrap replicate.

    Replicate b is the data resampled by row b of `bootstrap_counts(n_units, n_boot, seed)`,
    where units are images, or patients when `groups` is given (all of a drawn patient's images
    enter, once per draw). One resample is shared by all K labels.

    Args:
        y_true: (N, K) 0/1, NaN = masked.
        y_score: (N, K) scores.
        n_boot: number of replicates B.
        seed: random seed.
        groups: (N,) patient ids, or None for an image-level bootstrap.

    Returns:
        (B, K) AUCs; NaN where a replicate holds one class only for that label.
    """
    y_true, y_score, _ = _as_2d(y_true, y_score)
    return _replicates(y_true, [y_score], n_boot, seed, groups)[1][0]


def _percentile_ci(reps: np.ndarray, alpha: float) -> tuple[np.ndarray, np.ndarray]:
    """Percentile interval of each column of (B, K) replicates, NaN replicates left out."""
    low = np.full(reps.shape[1], np.nan)
    high = np.full(reps.shape[1], np.nan)
    ok = np.isfinite(reps).any(axis=0)   # an all-NaN column (undefined label) stays NaN
    if ok.any():
        low[ok], high[ok] = np.nanquantile(reps[:, ok], [alpha / 2, 1 - alpha / 2], axis=0)
    return low, high


def _class_counts(y_true: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return (y_true == 1).sum(axis=0), (y_true == 0).sum(axis=0)


def bootstrap_auc(y_true: np.ndarray, y_score: np.ndarray, n_boot: int = 1000, seed: int = 0,
                  groups: Sequence | np.ndarray | None = None, alpha: float = 0.05,
                  findings: Sequence[str] | None = None, with_mean: bool = False
                  ) -> pd.DataFrame:
    """Per-label ROC AUC with a percentile bootstrap confidence interval.

    With `groups` (patient ids) this is a cluster bootstrap: each replicate draws as many
    patients as there are, with replacement, and takes all their images. NIH patients have up
    to hundreds of follow-up images, so image-level intervals are too narrow; use the patient
    bootstrap for anything reported. Replicates in which a label has no positive (or no
    negative) are left out of that label's interval.

    Args:
        y_true: (N, K) 0/1, NaN = masked (left out of that label only).
        y_score: (N, K) scores.
        n_boot: number of bootstrap replicates.
        seed: random seed (same seed, data and groups -> same resamples).
        groups: (N,) patient ids, or None to resample images.
        alpha: 1 - coverage of the interval (0.05 gives a 95% interval).
        findings: K label names (default label_0..).
        with_mean: add a `mean` row: the mean AUC over the labels defined on the full data,
            its interval from the per-replicate means (a replicate in which one of those
            labels is undefined is left out); its n_pos/n_neg are sums over labels.

    Returns:
        DataFrame with columns label, auc, ci_low, ci_high, n_pos, n_neg (one row per label,
        NaN AUC where a label has one class); `format_ci_table(table, alpha)` prints it.
    """
    y_true, y_score, names = _as_2d(y_true, y_score, findings)
    (point,), (reps,) = _replicates(y_true, [y_score], n_boot, seed, groups)
    low, high = _percentile_ci(reps, alpha)
    n_pos, n_neg = _class_counts(y_true)
    table = pd.DataFrame({"label": names, "auc": point, "ci_low": low, "ci_high": high,
                          "n_pos": n_pos, "n_neg": n_neg})
    if with_mean:
        defined = np.isfinite(point)
        # Mean over the labels defined on the full data, per replicate, so every replicate
        # averages the same labels.
        means = reps[:, defined].mean(axis=1) if defined.any() else np.full(n_boot, np.nan)
        m_low, m_high = _percentile_ci(means[:, None], alpha)
        table = pd.concat([table, pd.DataFrame([{
            "label": "mean", "auc": point[defined].mean() if defined.any() else math.nan,
            "ci_low": m_low[0], "ci_high": m_high[0], "n_pos": int(n_pos.sum()),
            "n_neg": int(n_neg.sum())}])], ignore_index=True)
    return table


# ----------------------------------------------------------------------------- DeLong

def _delong_components(pos: np.ndarray, neg: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """AUCs and their DeLong covariance for R score sets on the same cases (Sun & Xu 2014).

    Args:
        pos: (R, m) scores of the m positives under each of R score sets.
        neg: (R, n) scores of the n negatives; m, n >= 2.

    Returns:
        (aucs (R,), covariance (R, R)) = S10/m + S01/n, where S10, S01 are the sample
        covariances (ddof 1) of the structural components V10 (per positive) and V01
        (per negative), obtained from midranks instead of the m x n comparisons.
    """
    m, n = pos.shape[1], neg.shape[1]
    tx = rankdata(pos, axis=1)                                  # (R, m) midranks among pos
    ty = rankdata(neg, axis=1)                                  # (R, n) midranks among neg
    tz = rankdata(np.concatenate([pos, neg], axis=1), axis=1)   # (R, m+n) midranks overall
    v10 = (tz[:, :m] - tx) / n        # fraction of negatives below each positive, ties 1/2
    v01 = 1.0 - (tz[:, m:] - ty) / m  # fraction of positives above each negative, ties 1/2
    aucs = v10.mean(axis=1)
    cov = np.atleast_2d(np.cov(v10)) / m + np.atleast_2d(np.cov(v01)) / n
    return aucs, cov


def _split(y_true: np.ndarray, *scores: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """(pos (R, m), neg (R, n)) of 1-D targets with NaN masked; None when m < 2 or n < 2."""
    keep = ~np.isnan(y_true)
    t = y_true[keep]
    stacked = np.stack([s[keep] for s in scores])
    pos, neg = stacked[:, t == 1], stacked[:, t == 0]
    if pos.shape[1] < 2 or neg.shape[1] < 2:
        return None
    return pos, neg


def delong_auc_variance(y_true: np.ndarray, y_score: np.ndarray) -> tuple[float, float]:
    """AUC of one label and its DeLong (1988) variance.

    Args:
        y_true: (N,) 0/1, NaN = masked.
        y_score: (N,) scores.

    Returns:
        (auc, variance); both NaN unless there are at least 2 positives and 2 negatives.
    """
    y_true, y_score, _ = _as_2d(y_true, y_score)
    parts = _split(y_true[:, 0], y_score[:, 0])
    if parts is None:
        return math.nan, math.nan
    aucs, cov = _delong_components(*parts)
    return float(aucs[0]), float(cov[0, 0])


def delong_test(y_true: np.ndarray, score_a: np.ndarray, score_b: np.ndarray
                ) -> tuple[float, float, float, float]:
    """DeLong's test that two correlated ROC curves (same cases) have equal AUC.

    Args:
        y_true: (N,) 0/1, NaN = masked (left out for both runs).
        score_a, score_b: (N,) scores of the two runs on the same cases.

    Returns:
        (auc_a, auc_b, z, p): z = (auc_a - auc_b) / sd of the difference, p two-sided normal.
        Where the difference has zero variance (e.g. identical scores) z = 0 and p = 1 if the
        AUCs are equal. All NaN with fewer than 2 positives or 2 negatives.
    """
    t, score_a, _ = _as_2d(y_true, score_a)
    _, score_b, _ = _as_2d(y_true, score_b)
    parts = _split(t[:, 0], score_a[:, 0], score_b[:, 0])
    if parts is None:
        return math.nan, math.nan, math.nan, math.nan
    (auc_a, auc_b), cov = _delong_components(*parts)
    diff = auc_a - auc_b
    var = cov[0, 0] + cov[1, 1] - 2 * cov[0, 1]
    # var can come out a rounding error below zero when the runs are (nearly) identical.
    if var <= 1e-15:
        z = 0.0 if abs(diff) < 1e-12 else math.copysign(math.inf, diff)
    else:
        z = diff / math.sqrt(var)
    p = math.erfc(abs(z) / math.sqrt(2))
    return float(auc_a), float(auc_b), float(z), float(p)


REPRODUCED, DIFFERENT, INCONCLUSIVE = "REPRODUCED", "DIFFERENT", "INCONCLUSIVE"
DEFAULT_MARGIN = 0.01  # in AUC: eval_model.py --compare's equivalence margin


def equivalence_verdict(low: float, high: float, margin: float) -> str:
    """The verdict of a difference's confidence interval [low, high] against a margin M:
    equivalence by CI inclusion (TOST at the CI level: a (1 - alpha) interval inside [-M, M]
    is two one-sided tests at level alpha / 2 each).

    REPRODUCED when the interval lies within [-M, M]; else DIFFERENT when it excludes 0 (it
    reaches past a margin, on one side of 0); else INCONCLUSIVE (it holds 0 and reaches past a
    margin: too few images to tell). "n/a" when the interval is undefined.
    """
    if np.isnan(low) or np.isnan(high):
        return "n/a"
    if -margin <= low and high <= margin:
        return REPRODUCED
    if low > 0 or high < 0:
        return DIFFERENT
    return INCONCLUSIVE


def compare_runs(y_true: np.ndarray, score_a: np.ndarray, score_b: np.ndarray,
                 findings: Sequence[str] | None = None, n_boot: int = 1000, seed: int = 0,
                 groups: Sequence | np.ndarray | None = None, alpha: float = 0.05,
                 margin: float | None = None) -> pd.DataFrame:
    """Paired comparison of two runs scored on the same images.

    The bootstrap interval of diff = auc_a - auc_b uses the SAME resample for both runs in
    every replicate, so the correlation between the runs (same hard cases) narrows it as it
    should. DeLong's test (DeLong et al. 1988, midrank algorithm of Sun & Xu 2014) is computed
    per label on that label's unmasked rows; it is NaN with fewer than 2 positives or 2
    negatives, and it treats images as independent, so with `groups` prefer the interval.

    Args:
        y_true: (N, K) 0/1, NaN = masked.
        score_a, score_b: (N, K) scores of run A and run B, rows aligned (see `align_preds`).
        findings: K label names.
        n_boot, seed, groups, alpha: as in `bootstrap_auc`.
        margin: with a margin, a last row `mean` (the mean AUC over the labels defined in both
            runs, its difference's interval from the same resamples; no DeLong test) and a
            column `verdict` (`equivalence_verdict` of each row's interval).

    Returns:
        DataFrame with columns label, auc_a, auc_b, diff, diff_ci_low, diff_ci_high,
        delong_z, delong_p (one row per label), and with a margin the verdict column.
    """
    _, score_b, _ = _as_2d(y_true, score_b, findings)
    y_true, score_a, names = _as_2d(y_true, score_a, findings)
    (point_a, point_b), (rep_a, rep_b) = _replicates(y_true, [score_a, score_b], n_boot, seed,
                                                     groups)
    low, high = _percentile_ci(rep_a - rep_b, alpha)
    z = np.full(len(names), np.nan)
    p = np.full(len(names), np.nan)
    for j in range(len(names)):
        _, _, z[j], p[j] = delong_test(y_true[:, j], score_a[:, j], score_b[:, j])
    table = pd.DataFrame({"label": names, "auc_a": point_a, "auc_b": point_b,
                          "diff": point_a - point_b, "diff_ci_low": low, "diff_ci_high": high,
                          "delong_z": z, "delong_p": p})
    if margin is not None:
        # As bootstrap_auc's mean: the labels defined on the full data (here in both runs),
        # the same ones in every replicate; a replicate where one is undefined is left out.
        both = np.isfinite(point_a) & np.isfinite(point_b)
        mean_a, mean_b = (point_a[both].mean(), point_b[both].mean()) if both.any() else (
            math.nan, math.nan)
        rep_diff = (rep_a[:, both].mean(axis=1) - rep_b[:, both].mean(axis=1) if both.any()
                    else np.full(n_boot, np.nan))
        (m_low,), (m_high,) = _percentile_ci(rep_diff[:, None], alpha)
        table.loc[len(table)] = ["mean", mean_a, mean_b, mean_a - mean_b, m_low, m_high,
                                 np.nan, np.nan]
        table["verdict"] = [equivalence_verdict(lo, hi, margin)
                            for lo, hi in zip(table["diff_ci_low"], table["diff_ci_high"])]
    return table


# ----------------------------------------------------------------------------- ROC curves

def roc_curves(y_true: np.ndarray, y_score: np.ndarray, findings: Sequence[str]
               ) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """ROC curve of each label on its unmasked rows.

    Args:
        y_true: (N, K) 0/1, NaN = masked.
        y_score: (N, K) scores.
        findings: K label names.

    Returns:
        label -> (fpr, tpr, thresholds), as `sklearn.metrics.roc_curve` returns them (a point is
        "predict positive when score >= threshold"); labels with one class are left out.
    """
    y_true, y_score, names = _as_2d(y_true, y_score, findings)
    curves = {}
    for j, name in enumerate(names):
        keep = ~np.isnan(y_true[:, j])
        t = y_true[keep, j]
        if 0 < t.sum() < len(t):
            curves[name] = roc_curve(t, y_score[keep, j], drop_intermediate=False)
    return curves


def _auc_labels(aucs: pd.DataFrame | Mapping[str, float]) -> dict[str, str]:
    """Legend text per label: 'AUC 0.8383 [0.8300, 0.8460]' from a bootstrap_auc table, or
    'AUC 0.8383' from a label -> AUC mapping."""
    if isinstance(aucs, pd.DataFrame):
        return {row.label: "AUC " + format_ci(row.auc, row.ci_low, row.ci_high)
                for row in aucs.itertuples()}
    return {label: f"AUC {auc:.4f}" for label, auc in aucs.items()}


def plot_roc(curves: Mapping[str, tuple[np.ndarray, np.ndarray, np.ndarray]],
             aucs: pd.DataFrame | Mapping[str, float], out_png: str | Path | None = None,
             ncols: int = 4) -> "Figure":
    """One figure, one panel per label: the ROC curve, the chance diagonal, AUC [CI] in the legend.

    Args:
        curves: from `roc_curves`.
        aucs: a `bootstrap_auc` table (shows the interval) or label -> AUC.
        out_png: where to save the figure (PNG), or None to only return it.
        ncols: panels per row.

    Returns:
        The matplotlib Figure (one Axes per label, unused grid cells hidden).
    """
    from matplotlib.figure import Figure  # plotting is optional: keep `import metrics` light

    texts = _auc_labels(aucs)
    nrows = max(1, math.ceil(len(curves) / ncols))
    fig = Figure(figsize=(3.2 * ncols, 3.2 * nrows), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax, (label, (fpr, tpr, _)) in zip(axes, curves.items()):
        ax.plot(fpr, tpr, lw=1.5, label=texts.get(label, ""))
        ax.plot([0, 1], [0, 1], ls=":", color="grey", lw=1)
        ax.set(title=label, xlim=(0, 1), ylim=(0, 1), aspect="equal")
        ax.legend(loc="lower right", fontsize=7, handlelength=1)
    for ax in axes[len(curves):]:
        ax.set_visible(False)
    for ax in axes[::ncols]:
        ax.set_ylabel("sensitivity (TPR)")
    for col in range(ncols):
        # The x label goes under the lowest panel in use of each column.
        used = [ax for ax in axes[col::ncols] if ax.get_visible()]
        if used:
            used[-1].set_xlabel("1 - specificity (FPR)")
    if out_png is not None:
        fig.savefig(out_png, dpi=110)
    return fig


# ----------------------------------------------------------------------------- thresholds

def threshold_metrics(y_true: np.ndarray, y_score: np.ndarray, thresholds: np.ndarray,
                      findings: Sequence[str] | None = None) -> pd.DataFrame:
    """Confusion counts and derived metrics at one threshold per label.

    An image is predicted positive when score >= threshold (sklearn's `roc_curve` convention).
    Masked rows are left out. A ratio with a zero denominator (e.g. precision with no predicted
    positive) is NaN, as is every metric of a label whose threshold is NaN.

    Args:
        y_true: (N, K) 0/1, NaN = masked.
        y_score: (N, K) scores.
        thresholds: (K,) one threshold per label (a scalar applies to all).
        findings: K label names.

    Returns:
        DataFrame with columns label, threshold, f1, precision, recall, specificity,
        tp, fp, tn, fn (one row per label; counts are nullable Int64, <NA> when the
        threshold is NaN).
    """
    y_true, y_score, names = _as_2d(y_true, y_score, findings)
    thresholds = np.broadcast_to(np.asarray(thresholds, dtype=np.float64), (len(names),))
    rows = []
    for j, name in enumerate(names):
        keep = ~np.isnan(y_true[:, j])
        t, s, thr = y_true[keep, j] == 1, y_score[keep, j], thresholds[j]
        if np.isnan(thr):
            rows.append({"label": name, "threshold": thr, **dict.fromkeys(
                ("f1", "precision", "recall", "specificity"), np.nan),
                **dict.fromkeys(("tp", "fp", "tn", "fn"), pd.NA)})
            continue
        pred = s >= thr
        tp, fp = int((pred & t).sum()), int((pred & ~t).sum())
        fn, tn = int((~pred & t).sum()), int((~pred & ~t).sum())
        rows.append({"label": name, "threshold": float(thr),
                     "f1": _ratio(2 * tp, 2 * tp + fp + fn), "precision": _ratio(tp, tp + fp),
                     "recall": _ratio(tp, tp + fn), "specificity": _ratio(tn, tn + fp),
                     "tp": tp, "fp": fp, "tn": tn, "fn": fn})
    # Nullable integers: counts stay integers while an undefined label shows <NA>.
    return pd.DataFrame(rows).astype({c: "Int64" for c in ("tp", "fp", "tn", "fn")})


def _ratio(num: int, den: int) -> float:
    return num / den if den else math.nan


def youden_thresholds(y_true_val: np.ndarray, y_score_val: np.ndarray) -> np.ndarray:
    """Per label, the threshold maximising Youden's J = sensitivity + specificity - 1.

    Choose it on VALIDATION data only: a threshold picked on the test fold makes the test
    metrics at that threshold optimistic. Candidates are the observed scores (predict positive
    when score >= threshold); on ties in J the highest threshold wins.

    Args:
        y_true_val: (N, K) 0/1, NaN = masked.
        y_score_val: (N, K) scores.

    Returns:
        (K,) thresholds; NaN for a label with one class in the validation data.
    """
    y_true, y_score, _ = _as_2d(y_true_val, y_score_val)
    out = np.full(y_true.shape[1], np.nan)
    for j in range(y_true.shape[1]):
        keep = ~np.isnan(y_true[:, j])
        t = y_true[keep, j]
        if 0 < t.sum() < len(t):
            fpr, tpr, thr = roc_curve(t, y_score[keep, j])
            finite = np.isfinite(thr)   # sklearn's first point is threshold +inf (nothing positive)
            out[j] = thr[finite][np.argmax((tpr - fpr)[finite])]
    return out


def threshold_report(val_true: np.ndarray, val_score: np.ndarray, test_true: np.ndarray,
                     test_score: np.ndarray, findings: Sequence[str]) -> pd.DataFrame:
    """Test-fold metrics at a fixed 0.5 threshold and at Youden's threshold chosen on validation.

    The test fold never chooses a threshold: the Youden threshold of each label is fitted on
    (val_true, val_score) and only evaluated on (test_true, test_score), so the test numbers
    are honest estimates of how that operating point generalises.

    Args:
        val_true, val_score: (N_val, K) validation targets (NaN = masked) and scores.
        test_true, test_score: (N_test, K) test targets and scores.
        findings: K label names.

    Returns:
        `threshold_metrics` columns with a leading `rule` column: '0.5' rows then
        'youden(val)' rows, all measured on the test fold.
    """
    k = len(findings)
    fixed = threshold_metrics(test_true, test_score, np.full(k, 0.5), findings)
    youden = threshold_metrics(test_true, test_score, youden_thresholds(val_true, val_score),
                               findings)
    fixed.insert(0, "rule", "0.5")
    youden.insert(0, "rule", "youden(val)")
    return pd.concat([fixed, youden], ignore_index=True)


# ----------------------------------------------------------------------------- files

@dataclass
class AlignedPreds:
    """Two prediction files on the same images, rows in the same order.

    ids: (N,) image ids, in the order of file A; findings: the K labels;
    score_a, score_b: (N, K) probabilities; y_true: (N, K) ground truth when either file
    carries it (NaN = masked), else None.
    """

    id_col: str
    ids: np.ndarray
    findings: list[str]
    score_a: np.ndarray
    score_b: np.ndarray
    y_true: np.ndarray | None


def align_preds(path_a: str | Path, path_b: str | Path) -> AlignedPreds:
    """Read two `preds.csv` files (eval_model format) and align their rows on the image id.

    Raises:
        DataError: different id columns or label sets, duplicate ids, ids present in only one
            file (the message names the first few of each), or ground truth that disagrees.
    """
    # eval_model pulls in torch through cxr_dataset; import it only where files are read.
    from chexnet.scoring import PROB_PREFIX, DataError, read_preds

    frames = []
    for path in (path_a, path_b):
        preds, id_col, findings = read_preds(path)
        ids = preds[id_col].astype(str)
        dup = ids[ids.duplicated()]
        if len(dup):
            raise DataError(f"{path}: {len(dup)} duplicated ids (first: {dup.iloc[0]}).")
        frames.append((preds.set_index(ids), id_col, findings))
    (a, col_a, fa), (b, col_b, fb) = frames
    if col_a != col_b:
        raise DataError(f"{path_a} is keyed by '{col_a}' but {path_b} by '{col_b}': "
                        "are they predictions on the same dataset?")
    if set(fa) != set(fb):
        raise DataError(f"label sets differ: only in {path_a}: {sorted(set(fa) - set(fb))}; "
                        f"only in {path_b}: {sorted(set(fb) - set(fa))}.")
    only_a = a.index.difference(b.index)
    only_b = b.index.difference(a.index)
    if len(only_a) or len(only_b):
        raise DataError(f"the files cover different images: {len(only_a)} ids only in {path_a} "
                        f"(e.g. {list(only_a[:5])}), {len(only_b)} only in {path_b} "
                        f"(e.g. {list(only_b[:5])}).")
    b = b.loc[a.index]
    prob = [PROB_PREFIX + f for f in fa]
    truths = [df[fa].to_numpy(np.float64) for df in (a, b) if set(fa) <= set(df.columns)]
    if len(truths) == 2 and not np.array_equal(truths[0], truths[1], equal_nan=True):
        raise DataError(f"{path_a} and {path_b} carry different ground truth for the same ids.")
    return AlignedPreds(col_a, a.index.to_numpy(), list(fa), a[prob].to_numpy(np.float64),
                        b[prob].to_numpy(np.float64), truths[0] if truths else None)


# ----------------------------------------------------------------------------- printing

def format_ci(value: float, low: float, high: float) -> str:
    """'0.8383 [0.8300, 0.8460]'; 'n/a' for a NaN value."""
    if value is None or np.isnan(value):
        return "n/a"
    if np.isnan(low) or np.isnan(high):
        return f"{value:.4f} [n/a]"
    return f"{value:.4f} [{low:.4f}, {high:.4f}]"


# (value column, interval columns) pairs merged into one "value [CI]" column when present.
_CI_COLUMNS = (("auc", "ci_low", "ci_high"), ("diff", "diff_ci_low", "diff_ci_high"))


def format_ci_table(table: pd.DataFrame, alpha: float | None = 0.05) -> str:
    """Fixed-width text of a `bootstrap_auc` / `compare_runs` / `threshold_metrics` table.

    Value and interval columns are merged (`auc [95% CI]` -> `0.8383 [0.8300, 0.8460]`), other
    floats get 4 decimals, p-values below 1e-4 print as `<1e-4`, NaN prints as `n/a`. `alpha`:
    the level the intervals were computed at (None: the header says only "CI").
    """
    level = f"{100 * (1 - alpha):g}% CI" if alpha is not None else "CI"
    out = pd.DataFrame(index=table.index)
    merged = {c for v, lo, hi in _CI_COLUMNS if {v, lo, hi} <= set(table.columns)
              for c in (lo, hi)}
    for col in table.columns:
        if col in merged:
            continue
        spec = next((s for s in _CI_COLUMNS if s[0] == col and s[1] in merged), None)
        values = table[col]
        if spec is not None:
            out[f"{col} [{level}]"] = [format_ci(v, lo, hi) for v, lo, hi in
                                      zip(values, table[spec[1]], table[spec[2]])]
        elif col.endswith("_p"):
            out[col] = ["n/a" if np.isnan(p) else "<1e-4" if p < 1e-4 else f"{p:.4f}"
                        for p in values]
        elif pd.api.types.is_float_dtype(values):
            out[col] = ["n/a" if np.isnan(v) else f"{v:.4f}" for v in values]
        else:
            out[col] = values.astype(str)
    return out.to_string(index=False)
