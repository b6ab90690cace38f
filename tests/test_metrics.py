"""metrics.py: bootstrap AUC against explicit resamples, DeLong against brute force, thresholds,
ROC plots, file alignment, table printing, and the reference predictions."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from chexnet.analysis import metrics
from conftest import shared
from chexnet.data import DataError
from chexnet.scoring import per_label_auc
from chexnet.labels import NIH_FINDINGS, PUBLISHED_AUCS


def tied_data(n: int = 240, k: int = 3, seed: int = 0, masked: int = 15
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(y_true (n, k) with NaN masks, y_score (n, k) rounded so many scores tie, patients (n,))."""
    rng = np.random.default_rng(seed)
    y = (rng.random((n, k)) < 0.25).astype(float)
    s = np.round(rng.random((n, k)) + 0.4 * y, 1)          # 0.1 steps: plenty of ties
    y[rng.choice(n, masked, replace=False), k - 1] = np.nan
    patients = rng.integers(0, n // 4, n)                   # about 4 images per patient
    return y, s, patients


def explicit_resample_aucs(y, s, groups, n_boot, seed):
    """(n_boot, K) sklearn AUCs on the data materialised from bootstrap_counts' draws."""
    unit, n_units = metrics.resampling_units(groups, len(y))
    counts = np.concatenate(list(metrics.bootstrap_counts(n_units, n_boot, seed)))
    out = np.full((n_boot, y.shape[1]), np.nan)
    for b in range(n_boot):
        idx = np.repeat(np.arange(len(y)), counts[b][unit])
        for k in range(y.shape[1]):
            rows = idx[~np.isnan(y[idx, k])]
            if 0 < y[rows, k].sum() < len(rows):
                out[b, k] = roc_auc_score(y[rows, k], s[rows, k])
    return out


# ----------------------------------------------------------------------------- bootstrap

@pytest.mark.parametrize("grouped", [False, True], ids=["images", "patients"])
def test_replicates_equal_sklearn_on_explicit_resamples(grouped):
    y, s, patients = tied_data()
    groups = patients if grouped else None
    fast = metrics.bootstrap_replicates(y, s, n_boot=6, seed=7, groups=groups)
    slow = explicit_resample_aucs(y, s, groups, n_boot=6, seed=7)
    assert np.isfinite(slow).all()
    np.testing.assert_allclose(fast, slow, rtol=0, atol=1e-10)


def test_weighted_auc_counts_ties_one_half_like_sklearn():
    y = np.array([1, 0, 1, 0, 1, 0, np.nan])
    s = np.array([0.5, 0.5, 0.7, 0.2, 0.2, 0.2, 0.9])      # ties across classes, masked row last
    w = np.array([[1, 1, 1, 1, 1, 1, 5], [3, 0, 1, 2, 2, 1, 0], [0, 4, 0, 1, 0, 2, 1]])
    got = metrics.weighted_auc(y, s, w)
    for b in range(len(w)):
        idx = np.repeat(np.arange(6), w[b, :6])
        want = (roc_auc_score(y[idx], s[idx]) if 0 < y[idx].sum() < len(idx) else math.nan)
        assert got[b] == pytest.approx(want, abs=1e-12) or (math.isnan(want) and
                                                             math.isnan(got[b]))
    assert math.isnan(got[2])  # no positive drawn: undefined, not 0 or 0.5


def test_resamples_are_reproducible_and_seeded():
    y, s, _ = tied_data()
    a = metrics.bootstrap_replicates(y, s, n_boot=20, seed=3)
    np.testing.assert_array_equal(a, metrics.bootstrap_replicates(y, s, n_boot=20, seed=3))
    assert not np.array_equal(a, metrics.bootstrap_replicates(y, s, n_boot=20, seed=4))
    counts = np.concatenate(list(metrics.bootstrap_counts(50, 30, seed=0)))
    assert counts.shape == (30, 50) and (counts.sum(axis=1) == 50).all()


def test_resampling_units_number_patients_in_sorted_order():
    unit, n = metrics.resampling_units(["b", "a", "b", "c", "a"], 5)
    assert n == 3 and unit.tolist() == [1, 0, 1, 2, 0]
    unit, n = metrics.resampling_units(None, 4)
    assert n == 4 and unit.tolist() == [0, 1, 2, 3]


def test_bootstrap_counts_are_multinomial_draws():
    """Each row is a multinomial(n, 1/n) vector: mean 1, variance (n-1)/n, P(0) = (1-1/n)^n."""
    counts = np.concatenate(list(metrics.bootstrap_counts(5, 4000, seed=0)))
    assert counts.shape == (4000, 5) and (counts.sum(axis=1) == 5).all() and (counts >= 0).all()
    assert counts.mean(axis=0) == pytest.approx(np.ones(5), abs=0.06)
    assert counts.var(axis=0) == pytest.approx(np.full(5, 0.8), abs=0.08)
    assert (counts == 0).mean() == pytest.approx(0.8 ** 5, abs=0.02)


def test_patient_bootstrap_resamples_whole_patients():
    """Each patient holding 3 copies of one image: drawing patients is drawing the original
    images (AUC is invariant to scaling all weights), while drawing the copies one by one
    treats them as independent and gives a too-narrow interval."""
    y, s, _ = tied_data(masked=0)
    dup_y, dup_s = np.repeat(y, 3, axis=0), np.repeat(s, 3, axis=0)
    patient = np.repeat(np.arange(len(y)), 3)
    original = metrics.bootstrap_replicates(y, s, n_boot=200, seed=1)
    by_patient = metrics.bootstrap_replicates(dup_y, dup_s, n_boot=200, seed=1, groups=patient)
    np.testing.assert_allclose(by_patient, original, rtol=0, atol=1e-12)
    by_image = metrics.bootstrap_replicates(dup_y, dup_s, n_boot=200, seed=1)
    assert (by_image.std(axis=0) < 0.75 * by_patient.std(axis=0)).all()


def test_bootstrap_auc_table_point_estimates_counts_and_intervals():
    y, s, patients = tied_data(n=400)
    names = ["A", "B", "C"]
    table = metrics.bootstrap_auc(y, s, n_boot=300, seed=0, groups=patients, findings=names,
                                  with_mean=True)
    assert list(table.columns) == ["label", "auc", "ci_low", "ci_high", "n_pos", "n_neg"]
    assert list(table["label"]) == names + ["mean"]
    want = per_label_auc(y, s, names, warn=False)
    np.testing.assert_allclose(table["auc"][:3], list(want.values()), rtol=0, atol=1e-12)
    assert table["n_pos"][:3].tolist() == [int(np.nansum(y[:, k])) for k in range(3)]
    assert table["n_neg"][2] == int((y[:, 2] == 0).sum())      # masked rows not counted
    assert (table["ci_low"] < table["auc"]).all() and (table["auc"] < table["ci_high"]).all()
    assert table["auc"].iloc[-1] == pytest.approx(np.mean(list(want.values())))
    wide = metrics.bootstrap_auc(y, s, n_boot=300, seed=0, groups=patients, alpha=0.01)
    assert (wide["ci_high"] - wide["ci_low"] > table["ci_high"][:3] - table["ci_low"][:3]).all()


def test_bootstrap_auc_one_class_label_is_nan_and_rare_label_skips_empty_replicates():
    rng = np.random.default_rng(0)
    y = np.zeros((60, 2))
    y[:2, 1] = 1                                            # 2 positives: often none drawn
    s = rng.random((60, 2))
    table = metrics.bootstrap_auc(y, s, n_boot=200, seed=0)
    assert table.loc[0, ["auc", "ci_low", "ci_high"]].isna().all()
    reps = metrics.bootstrap_replicates(y, s, n_boot=200, seed=0)
    assert np.isnan(reps[:, 1]).any() and np.isfinite(reps[:, 1]).any()
    assert np.isfinite(table.loc[1, ["ci_low", "ci_high"]].astype(float)).all()


def test_invalid_inputs_are_named():
    with pytest.raises(ValueError, match=r"y_true\[1, 0\] = 2.0"):
        metrics.bootstrap_auc(np.array([[0.0], [2.0]]), np.array([[0.1], [0.2]]), n_boot=2)
    with pytest.raises(ValueError, match="groups has shape"):
        metrics.bootstrap_auc(np.array([[0.0], [1.0]]), np.array([[0.1], [0.2]]), n_boot=2,
                              groups=[1, 2, 3])
    with pytest.raises(ValueError, match="finite"):
        metrics.bootstrap_auc(np.array([[0.0], [1.0]]), np.array([[np.nan], [0.2]]), n_boot=2)


# ----------------------------------------------------------------------------- DeLong

def brute_force_delong(y, scores):
    """AUCs and covariance from structural components by explicit double loops (DeLong 1988)."""
    pos, neg = np.flatnonzero(y == 1), np.flatnonzero(y == 0)
    m, n = len(pos), len(neg)

    def psi(a, b):
        return 1.0 if a > b else 0.5 if a == b else 0.0

    v10 = np.zeros((len(scores), m))
    v01 = np.zeros((len(scores), n))
    for r, s in enumerate(scores):
        for i, p in enumerate(pos):
            for j, q in enumerate(neg):
                v10[r, i] += psi(s[p], s[q]) / n
                v01[r, j] += psi(s[p], s[q]) / m
    aucs = v10.mean(axis=1)
    s10 = (v10 - aucs[:, None]) @ (v10 - aucs[:, None]).T / (m - 1)
    s01 = (v01 - aucs[:, None]) @ (v01 - aucs[:, None]).T / (n - 1)
    return aucs, s10 / m + s01 / n


def test_delong_variance_hand_example():
    # X (positives) = .9 .8 .4, Y (negatives) = .7 .4 .2: V10 = 1, 1, 1/2; V01 = 2/3, 5/6, 1.
    # AUC = 5/6; var = var(V10)/m + var(V01)/n = (1/12)/3 + (1/36)/3 = 1/27.
    auc, var = metrics.delong_auc_variance(np.array([1, 1, 1, 0, 0, 0.]),
                                           np.array([.9, .8, .4, .7, .4, .2]))
    assert auc == pytest.approx(5 / 6, abs=1e-15)
    assert var == pytest.approx(1 / 27, abs=1e-15)


def test_delong_matches_structural_components_by_double_loop():
    rng = np.random.default_rng(5)
    y = (rng.random(70) < 0.35).astype(float)
    a = np.round(rng.random(70) + 0.5 * y, 1)                   # with ties
    b = np.round(a + rng.normal(0, 0.3, 70), 1)
    aucs, cov = brute_force_delong(y, [a, b])
    auc_a, var_a = metrics.delong_auc_variance(y, a)
    assert auc_a == pytest.approx(aucs[0], abs=1e-12)
    assert var_a == pytest.approx(cov[0, 0], abs=1e-12)
    got_a, got_b, z, p = metrics.delong_test(y, a, b)
    z_want = (aucs[0] - aucs[1]) / math.sqrt(cov[0, 0] + cov[1, 1] - 2 * cov[0, 1])
    assert (got_a, got_b) == pytest.approx(tuple(aucs), abs=1e-12)
    assert z == pytest.approx(z_want, abs=1e-9)
    assert p == pytest.approx(math.erfc(abs(z_want) / math.sqrt(2)), abs=1e-9)
    # Swapping the runs flips z, keeps p.
    _, _, z_ba, p_ba = metrics.delong_test(y, b, a)
    assert z_ba == pytest.approx(-z) and p_ba == pytest.approx(p)


def test_delong_needs_two_of_each_class_and_masks_nan():
    assert all(math.isnan(v) for v in metrics.delong_test(np.array([1, 0, 0, 0.]),
                                                          np.arange(4.), np.arange(4.)))
    y = np.array([1, 1, 0, 0, np.nan, 1, 0])
    s = np.array([.9, .3, .2, .4, 100., .8, .1])
    auc, var = metrics.delong_auc_variance(y, s)
    assert auc == pytest.approx(roc_auc_score(y[~np.isnan(y)], s[~np.isnan(y)]))


# ----------------------------------------------------------------------------- compare_runs

def test_compare_runs_identical_scores_diff_zero_p_one():
    y, s, patients = tied_data()
    table = metrics.compare_runs(y, s, s.copy(), ["A", "B", "C"], n_boot=100, groups=patients)
    assert list(table.columns) == ["label", "auc_a", "auc_b", "diff", "diff_ci_low",
                                   "diff_ci_high", "delong_z", "delong_p"]
    assert (table["diff"] == 0).all() and (table["delong_p"] == 1).all()
    assert (table["diff_ci_low"] == 0).all() and (table["diff_ci_high"] == 0).all()


def test_compare_runs_uses_the_same_resamples_for_both_runs():
    """A monotone transform keeps every AUC, so with shared resamples every replicate's
    difference is exactly 0; independent resamples would give a non-zero interval."""
    y, s, _ = tied_data()
    table = metrics.compare_runs(y, s, 3 * s - 1, n_boot=200, seed=2)
    assert (table["diff_ci_low"].abs() < 1e-12).all() and (table["diff_ci_high"].abs()
                                                             < 1e-12).all()


def test_compare_runs_detects_a_better_run_and_intervals_agree_with_delong():
    rng = np.random.default_rng(11)
    n = 1500
    y = (rng.random((n, 1)) < 0.3).astype(float)
    common = rng.normal(size=(n, 1))
    good = y + common + 0.6 * rng.normal(size=(n, 1))
    bad = y + common + 1.6 * rng.normal(size=(n, 1))
    table = metrics.compare_runs(y, good, bad, ["X"], n_boot=400, seed=0)
    row = table.iloc[0]
    assert row["diff"] > 0 and row["diff_ci_low"] > 0 and row["delong_p"] < 1e-4
    # Bootstrap SD of the difference ~ DeLong SD (both estimate the same quantity).
    reps_a = metrics.bootstrap_replicates(y, good, 400, 0)[:, 0]
    reps_b = metrics.bootstrap_replicates(y, bad, 400, 0)[:, 0]
    delong_sd = row["diff"] / row["delong_z"]
    assert np.std(reps_a - reps_b) == pytest.approx(delong_sd, rel=0.2)


# ----------------------------------------------------------------------------- thresholds

def test_threshold_metrics_counts_and_ratios():
    y = np.array([[1, 1], [1, 0], [0, 0], [0, 1], [1, np.nan], [0, 0]])
    s = np.array([[.9, .2], [.5, .1], [.5, .3], [.1, .8], [.3, .9], [.2, .05]])
    table = metrics.threshold_metrics(y, s, np.array([0.5, np.nan]), ["A", "B"])
    a = table.iloc[0]
    # A at 0.5 (score >= 0.5 is positive): tp = rows 0, 1; fp = row 2; fn = row 4; tn = rows 3, 5.
    assert (a.tp, a.fp, a.tn, a.fn) == (2, 1, 2, 1)
    assert a.precision == pytest.approx(2 / 3) and a.recall == pytest.approx(2 / 3)
    assert a.specificity == pytest.approx(2 / 3) and a.f1 == pytest.approx(2 / 3)
    assert table.iloc[1][["f1", "precision", "recall", "specificity"]].isna().all()
    assert table["tp"].isna().tolist() == [False, True]
    none_predicted = metrics.threshold_metrics(y, s, np.array([2.0, 2.0]), ["A", "B"])
    assert math.isnan(none_predicted.precision[0]) and none_predicted.recall[0] == 0
    assert none_predicted.tp[1] + none_predicted.fn[1] == 2      # the masked row is left out


def test_youden_threshold_maximises_j_on_the_data_given():
    y = np.array([[0], [0], [0], [1], [0], [1], [1], [1.]])
    s = np.array([[.1], [.2], [.3], [.35], [.4], [.6], [.7], [.8]])
    # Candidates: >= .6 gives sens 3/4, spec 1 (J .75); >= .35 gives 1, 3/4 (J .75); the
    # highest threshold wins the tie.
    assert metrics.youden_thresholds(y, s)[0] == pytest.approx(0.6)
    assert math.isnan(metrics.youden_thresholds(np.zeros((4, 1)), s[:4])[0])


def test_threshold_report_chooses_on_val_and_evaluates_on_test():
    val_y = np.array([[0], [0], [1], [1.]])
    val_s = np.array([[.1], [.2], [.3], [.4]])                  # Youden on val: 0.3
    test_y = np.array([[0], [0], [0], [1], [1.]])
    test_s = np.array([[.1], [.35], [.6], [.7], [.8]])          # on test 0.7 would be best
    report = metrics.threshold_report(val_y, val_s, test_y, test_s, ["A"])
    assert report["rule"].tolist() == ["0.5", "youden(val)"]
    assert report["threshold"].tolist() == [0.5, pytest.approx(0.3)]
    youden = report.iloc[1]
    assert (youden.tp, youden.fp, youden.tn, youden.fn) == (2, 2, 1, 0)  # measured on test


# ----------------------------------------------------------------------------- ROC curves

def test_roc_curves_and_plot(tmp_path):
    y, s, _ = tied_data()
    y[:, 1] = 0                                                  # one class: no curve
    curves = metrics.roc_curves(y, s, ["A", "B", "C"])
    assert list(curves) == ["A", "C"]
    fpr, tpr, thr = curves["A"]
    assert fpr[0] == 0 and tpr[-1] == 1 and len(fpr) == len(tpr) == len(thr)
    assert np.trapezoid(tpr, fpr) == pytest.approx(roc_auc_score(y[:, 0], s[:, 0]))
    table = metrics.bootstrap_auc(y, s, n_boot=50, findings=["A", "B", "C"])
    out = tmp_path / "roc.png"
    fig = metrics.plot_roc(curves, table, out, ncols=2)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    visible = [ax for ax in fig.axes if ax.get_visible()]
    assert [ax.get_title() for ax in visible] == ["A", "C"]
    legend = visible[0].get_legend().get_texts()[0].get_text()
    assert legend == "AUC " + metrics.format_ci(*table.loc[0, ["auc", "ci_low", "ci_high"]])
    fig = metrics.plot_roc(curves, {"A": 0.75, "C": 0.5})
    assert fig.axes[1].get_legend().get_texts()[0].get_text() == "AUC 0.5000"


# ----------------------------------------------------------------------------- files, printing

def write_preds(path, ids, scores, truth=None):
    df = pd.DataFrame({"Image Index": ids})
    for k, f in enumerate(["Mass", "Nodule"]):
        df[f"prob_{f}"] = scores[:, k]
    if truth is not None:
        for k, f in enumerate(["Mass", "Nodule"]):
            df[f] = truth[:, k]
    df.to_csv(path, index=False)


def test_align_preds_reorders_rows_and_names_missing_ids(tmp_path):
    ids = [f"{i:08d}_000.png" for i in range(5)]
    sa = np.arange(10.).reshape(5, 2) / 10
    truth = np.array([[1, 0], [0, 1], [0, 0], [1, 1], [0, np.nan]])
    write_preds(tmp_path / "a.csv", ids, sa)                    # no ground truth in A
    order = [3, 0, 4, 1, 2]
    write_preds(tmp_path / "b.csv", [ids[i] for i in order], sa[order] / 2 + 0.5, truth[order])
    aligned = metrics.align_preds(tmp_path / "a.csv", tmp_path / "b.csv")
    assert aligned.ids.tolist() == ids and aligned.findings == ["Mass", "Nodule"]
    np.testing.assert_array_equal(aligned.score_b, sa / 2 + 0.5)
    np.testing.assert_array_equal(aligned.y_true, truth)
    write_preds(tmp_path / "c.csv", ids[:4] + ["99999999_000.png"], sa)
    with pytest.raises(DataError, match=r"1 ids only in .*a.csv.*00000004_000.png.*"
                                        r"99999999_000.png"):
        metrics.align_preds(tmp_path / "a.csv", tmp_path / "c.csv")


def test_format_ci_and_table():
    assert metrics.format_ci(0.83834, 0.83, 0.846) == "0.8383 [0.8300, 0.8460]"
    assert metrics.format_ci(math.nan, 0.1, 0.2) == "n/a"
    table = pd.DataFrame({"label": ["A", "B"], "auc": [0.83834, math.nan],
                          "ci_low": [0.83, math.nan], "ci_high": [0.846, math.nan],
                          "n_pos": [3, 0], "n_neg": [5, 8]})
    text = metrics.format_ci_table(table)
    assert "auc [95% CI]" in text and "0.8383 [0.8300, 0.8460]" in text
    assert "auc [90% CI]" in metrics.format_ci_table(table, alpha=0.1)
    assert "ci_low" not in text and "n/a" in text
    cmp = pd.DataFrame({"label": ["A"], "diff": [0.01], "diff_ci_low": [-0.002],
                        "diff_ci_high": [0.02], "delong_p": [1e-6]})
    assert "0.0100 [-0.0020, 0.0200]" in metrics.format_ci_table(cmp)
    assert "<1e-4" in metrics.format_ci_table(cmp)


# ----------------------------------------------------------------------------- reference data

def test_reference_predictions_with_patient_bootstrap():
    """The 22,433 reference test predictions: point AUCs reproduce the published column, and
    patient resampling (NIH patients have many follow-ups) widens every interval."""
    from chexnet.scoring import PROB_PREFIX, read_preds, read_truth

    preds, id_col, findings = read_preds(shared("reference",
                                                "reproduce_chexnet_pretrained_preds.csv"))
    truth = read_truth(shared("nih", "Data_Entry_2017_v2020.csv.gz"), findings)
    ids = preds[id_col].astype(str)
    y = truth.loc[ids, findings].to_numpy(np.float64)
    s = preds[[PROB_PREFIX + f for f in findings]].to_numpy(np.float64)
    patients = truth.loc[ids, "patient"].to_numpy()
    assert findings == list(NIH_FINDINGS) and y.shape == (22_433, 14)
    by_patient = metrics.bootstrap_auc(y, s, n_boot=60, groups=patients, findings=findings)
    by_image = metrics.bootstrap_auc(y, s, n_boot=60, findings=findings)
    published = PUBLISHED_AUCS["reproduce-chexnet"]
    assert by_patient["auc"].round(4).tolist() == [published[f] for f in findings]
    assert (by_patient["ci_low"] < by_patient["auc"]).all()
    assert (by_patient["auc"] < by_patient["ci_high"]).all()
    width = lambda t: (t["ci_high"] - t["ci_low"]).mean()  # noqa: E731
    assert width(by_patient) > width(by_image)
