"""subgroups.py: attributes from labels files, subgroup AUCs and gaps with patient-bootstrap
CIs, under-diagnosis, calibration, the injected demo effect, and the reference model's table.

Expected values are literals or naive re-implementations (explicit resampling + sklearn, loops),
never the function under test."""
from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from chexnet.datatools import demo as demo_data
from chexnet.analysis import metrics
from chexnet.analysis import subgroups
from conftest import ROOT, load_benchmark, shared
from chexnet.data import DataError
from chexnet.labels import NIH_FINDINGS

FINDINGS = list(NIH_FINDINGS)


# ------------------------------------------------------------------------------ attributes

def test_bands_and_edges():
    assert subgroups.band_names((0, 20, 40, 60, 80)) == ["0-19", "20-39", "40-59", "60-79", "80+"]
    assert subgroups.band_names((0, 1, 5, 10, 20)) == ["0", "1-4", "5-9", "10-19", "20+"]
    got = subgroups.to_bands([0, 19, 20, 59, 79, 80, 95, np.nan, "x", "42"], (0, 20, 40, 60, 80))
    assert list(got) == ["0-19", "0-19", "20-39", "40-59", "60-79", "80+", "80+", "unknown",
                         "unknown", "40-59"]
    assert list(subgroups.to_bands([5, 30], (10, 50))) == ["<10", "10-49"]
    assert subgroups.parse_edges("0,18,65", "--age-bands") == (0, 18, 65)
    for bad in ("0,20,20", "a,b", "-5,10"):
        with pytest.raises(DataError, match="--age-bands"):
            subgroups.parse_edges(bad, "--age-bands")


def _data_entry(rows):
    """A Data_Entry-style frame from (image, patient, age, sex, view, follow-up) tuples."""
    return pd.DataFrame(rows, columns=["Image Index", "Patient ID", "Patient Age",
                                       "Patient Gender", "View Position", "Follow-up #"]
                        ).assign(**{"Finding Labels": "No Finding"})


def test_attributes_from_nih_chexpert_and_nih_labels_frames():
    nih = _data_entry([("00000001_000.png", 1, 19, "M", "PA", 0),
                       ("00000001_001.png", 1, 20, "M", "AP", 1),
                       ("00000002_000.png", 2, 85, "F", None, 12)])
    a = subgroups.attributes_from_frame(nih, "entry.csv")
    assert a.available == ["sex", "age", "view", "followup"] and not a.missing
    assert a.table.to_dict("list") == {"sex": ["M", "M", "F"], "age": ["0-19", "20-39", "80+"],
                                       "view": ["PA", "AP", "unknown"],
                                       "followup": ["0", "1-4", "10-19"]}
    assert list(a.patients) == ["1", "1", "2"]
    photo = pd.DataFrame({
        "Path": ["CheXphoto-v1.1/valid/natural/patient64541/study1/view1_frontal.jpg",
                 "CheXphoto-v1.1/valid/natural/patient64542/study1/view2_lateral.jpg"],
        "Sex": ["Female", "Male"], "Age": [63, 17], "Frontal/Lateral": ["Frontal", "Lateral"],
        "AP/PA": ["AP", None]})
    b = subgroups.attributes_from_frame(photo, "valid.csv", age_edges=(0, 18, 65))
    assert b.available == ["sex", "age", "view"] and list(b.missing) == ["followup"]
    assert b.table.to_dict("list") == {"sex": ["Female", "Male"], "age": ["18-64", "0-17"],
                                       "view": ["AP", "Lateral"]}
    assert list(b.patients) == ["patient64541", "patient64542"]
    plain = pd.DataFrame({"Image Index": ["00000001_000.png"], "Patient ID": [1], "fold": ["test"]})
    c = subgroups.attributes_from_frame(plain, "nih_labels.csv")
    assert c.available == [] and c.missing["sex"] == "no 'Patient Gender' column"
    assert "not available: sex (no 'Patient Gender' column)" in c.describe()


def test_attributes_of_the_chexphoto_demo(tmp_path):
    demo_data.make_chexphoto_demo(tmp_path, n_train=30, n_valid=60, size=16, seed=1)
    root = tmp_path / "CheXphoto-v1.1"
    valid = pd.read_csv(root / "valid.csv")
    attrs = subgroups.read_attributes([root / "train.csv", root / "valid.csv"], valid["Path"])
    assert attrs.available == ["sex", "age", "view"] and "followup" in attrs.missing
    assert list(attrs.table["sex"]) == list(valid["Sex"])
    lateral = (valid["Frontal/Lateral"] == "Lateral").to_numpy()
    assert (attrs.table["view"][lateral] == "Lateral").all()
    assert list(attrs.table["view"][~lateral]) == list(valid["AP/PA"][~lateral])
    assert list(attrs.patients) == list(valid["Path"].str.extract(r"(patient\d+)")[0])


def test_read_attributes_follows_the_ids_and_names_missing_ones(tmp_path):
    path = tmp_path / "Data_Entry_2017.csv"
    _data_entry([("00000001_000.png", 1, 30, "M", "PA", 0),
                 ("00000002_000.png", 2, 70, "F", "AP", 0)]).to_csv(path, index=False)
    a = subgroups.read_attributes(path, ["00000002_000.png", "00000001_000.png"])
    assert list(a.table["sex"]) == ["F", "M"] and list(a.patients) == ["2", "1"]
    with pytest.raises(DataError, match=r"1 of 2 predicted images have no row \(first: x.png\)"):
        subgroups.read_attributes(path, ["00000001_000.png", "x.png"])


def test_metadata_files_prefer_a_file_with_the_columns(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    ids = ["00000001_000.png", "00000002_000.png"]
    pd.DataFrame({"Image Index": ids, "Patient ID": [1, 2], "fold": ["test", "test"],
                  **{f: [0, 0] for f in FINDINGS}}).to_csv(data / "nih_labels.csv", index=False)
    _data_entry([(ids[0], 1, 30, "M", "PA", 0), (ids[1], 2, 70, "F", "AP", 3)]).to_csv(
        data / "Data_Entry_2017.csv", index=False)
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"dataset": "demo", "data": str(data),
                                                 "labels": None}))
    candidates = subgroups.metadata_files(run)
    assert candidates == [[data / "nih_labels.csv"], [data / "Data_Entry_2017.csv"]]
    attrs, notes = subgroups.find_attributes(ids, candidates)
    assert attrs.source == str(data / "Data_Entry_2017.csv")
    assert list(attrs.table["followup"]) == ["0", "1-4"]
    assert "nih_labels.csv: no subgroup column" in notes[0]


def test_predictions_without_a_run_folder_find_the_committed_metadata(tmp_path):
    """reproduce-chexnet's columns in nih_labels.csv: `eval_model.py --by` needs no --labels
    for NIH predictions. Counts of the reference test fold: literals from Data_Entry v2020."""
    committed = pd.read_csv(ROOT / "nih_labels.csv")
    assert list(committed.columns[:6]) == ["Image Index", "Follow-up #", "Patient ID",
                                           "Patient Age", "Patient Gender", "View Position"]
    test = committed[committed["fold"] == "test"]
    assert test["Patient Gender"].value_counts().to_dict() == {"M": 12631, "F": 9802}
    assert test["View Position"].value_counts().to_dict() == {"PA": 13586, "AP": 8847}
    candidates = subgroups.metadata_files(tmp_path)  # a folder with only a predictions file
    assert candidates == [[ROOT / "nih_labels.csv"]]
    ids = test["Image Index"].iloc[::500].tolist()
    attrs, _ = subgroups.find_attributes(ids, candidates)
    assert list(attrs.table["sex"]) == test["Patient Gender"].iloc[::500].tolist()
    assert attrs.available == ["sex", "age", "view", "followup"]


def test_a_demo_run_never_takes_the_real_nih_metadata(tmp_path):
    """The demo's phantom images reuse NIH's ids (00000001_000.png, ...): the repository's
    nih_labels.csv would give them real patients' ages."""
    (tmp_path / "config.json").write_text(json.dumps({"dataset": "demo",
                                                      "data": str(tmp_path / "none")}))
    assert subgroups.metadata_files(tmp_path) == []


# ------------------------------------------------------------------------------ subgroup AUC

def _random_data(seed, n=240, k=3, n_patients=60):
    rng = np.random.default_rng(seed)
    patients = rng.integers(0, n_patients, n)
    y = rng.integers(0, 2, (n, k)).astype(float)
    y[rng.random((n, k)) < 0.1] = np.nan
    s = np.round(rng.random((n, k)), 2) + 0.3 * np.nan_to_num(y)   # rounded: ties
    code = rng.integers(0, 3, n)        # a patient's images fall in several groups
    return y, s, patients, code


def _naive_auc(t, s):
    keep = ~np.isnan(t)
    t, s = t[keep], s[keep]
    return roc_auc_score(t, s) if 0 < t.sum() < len(t) else np.nan


def test_replicates_equal_explicit_patient_resampling_for_group_and_rest():
    """Each replicate = sklearn on the rows of the drawn patients (all their images), split by
    group; group and rest under the SAME draw."""
    y, s, patients, code = _random_data(1)
    ((points, reps),) = subgroups.subgroup_replicates(y, s, [code], patients, n_boot=6, seed=3)
    unit, n_units = metrics.resampling_units(patients, len(y))
    draws = np.concatenate(list(metrics.bootstrap_counts(n_units, 6, 3)))
    for b in range(6):
        rows = np.repeat(np.arange(len(y)), draws[b][unit])
        for g in range(3):
            for side, mask in ((0, code[rows] == g), (1, code[rows] != g)):
                for j in range(y.shape[1]):
                    want = _naive_auc(y[rows][mask, j], s[rows][mask, j])
                    assert reps[b, side, g, j] == pytest.approx(want, abs=1e-12)
    for g in range(3):
        for j in range(y.shape[1]):
            assert points[0, g, j] == pytest.approx(_naive_auc(y[code == g, j], s[code == g, j]))
            assert points[1, g, j] == pytest.approx(_naive_auc(y[code != g, j], s[code != g, j]))
    # The table's gap interval: quantiles of the per-draw differences (same draw both sides).
    table = subgroups.subgroup_auc(y, s, pd.DataFrame({"a": code}), patients, ["x", "y", "z"],
                                   n_boot=6, seed=3).set_index(["group", "finding"])
    for j, name in enumerate(["x", "y", "z"]):
        gaps = []
        for b in range(6):
            rows = np.repeat(np.arange(len(y)), draws[b][unit])
            inside = code[rows] == 1
            gaps.append(_naive_auc(y[rows][inside, j], s[rows][inside, j])
                        - _naive_auc(y[rows][~inside, j], s[rows][~inside, j]))
        low, high = np.quantile(gaps, [0.025, 0.975])
        assert table.loc[("1", name), "gap_ci_low"] == pytest.approx(low)
        assert table.loc[("1", name), "gap_ci_high"] == pytest.approx(high)


def test_patients_never_straddle_resamples():
    """Every patient's images are two identical copies: a patient bootstrap weights both copies
    alike, so each replicate equals that of one copy per patient with the same draws. Resampling
    the copies apart (images as units) would not."""
    y, s, _, code = _random_data(2, n=120, n_patients=120)
    ids = np.arange(120)
    one = subgroups.subgroup_replicates(y, s, [code], ids, n_boot=40, seed=5)[0][1]
    two = subgroups.subgroup_replicates(np.vstack([y, y]), np.vstack([s, s]),
                                        [np.r_[code, code]], np.r_[ids, ids], n_boot=40,
                                        seed=5)[0][1]
    np.testing.assert_allclose(two, one, rtol=0, atol=1e-12)
    images = subgroups.subgroup_replicates(np.vstack([y, y]), np.vstack([s, s]),
                                           [np.r_[code, code]], None, n_boot=40, seed=5)[0][1]
    assert np.nanmax(np.abs(images - one)) > 0.01


def test_perfect_in_one_group_random_in_the_other_shows_the_gap():
    rng = np.random.default_rng(0)
    n = 600
    sex = np.where(np.arange(n) < 300, "F", "M")
    y = rng.integers(0, 2, (n, 2)).astype(float)
    s = np.where(sex[:, None] == "F", y * 0.5 + 0.25, rng.random((n, 2)))  # F perfect
    patients = np.arange(n) // 2                      # 2 images each, same sex
    table = subgroups.subgroup_auc(y, s, pd.DataFrame({"sex": sex}), patients,
                                   ["A", "B"], n_boot=300, seed=0)
    assert list(table.columns[:11]) == ["attribute", "group", "n", "patients", "finding",
                                        "positives", "auc", "ci_low", "ci_high", "rest_auc",
                                        "gap"]
    rows = table.set_index(["group", "finding"])
    m = rows.loc[("M", "A")]
    assert rows.loc[("F", "A"), "auc"] == 1.0 and rows.loc[("F", "A"), "ci_low"] == 1.0
    assert m["auc"] == pytest.approx(roc_auc_score(y[300:, 0], s[300:, 0]))
    assert m["rest_auc"] == 1.0 and m["n"] == 300 and m["patients"] == 150
    assert m["positives"] == int(y[300:, 0].sum())
    for finding in ("A", "B", "mean"):
        f, mm = rows.loc[("F", finding)], rows.loc[("M", finding)]
        assert f["gap_ci_low"] > 0.3 and mm["gap_ci_high"] < -0.3
        assert f["gap"] == pytest.approx(-mm["gap"])
    want = np.mean([roc_auc_score(y[300:, j], s[300:, j]) for j in range(2)])
    assert rows.loc[("M", "mean"), "auc"] == pytest.approx(want)
    assert rows.loc[("M", "mean"), "gap"] == pytest.approx(want - 1.0)


def test_mean_row_leaves_out_findings_undefined_in_the_group():
    y = np.array([[1, 0], [0, 0], [1, 1], [0, 1], [1, 0], [0, 1]], float)
    s = np.array([[.9, .1], [.2, .3], [.8, .7], [.1, .2], [.3, .6], [.4, .5]])
    group = pd.DataFrame({"view": ["AP", "AP", "PA", "PA", "PA", "PA"]})
    table = subgroups.subgroup_auc(y, s, group, None, ["A", "B"], n_boot=50)
    ap = table[table["group"] == "AP"].set_index("finding")
    assert math.isnan(ap.loc["B", "auc"])            # no positive of B in AP
    assert ap.loc["mean", "auc"] == 1.0 == ap.loc["A", "auc"]
    assert ap.loc["mean", "positives"] == 1
    pa = table[table["group"] == "PA"].set_index("finding")
    assert pa.loc["A", "auc"] == pytest.approx(roc_auc_score([1, 0, 1, 0], [.8, .1, .3, .4]))
    # B is defined in PA but not in its rest (AP): PA's mean and gap are over A only.
    assert pa.loc["mean", "auc"] == pa.loc["A", "auc"]
    assert pa.loc["mean", "gap"] == pytest.approx(pa.loc["A", "auc"] - 1.0)


# ------------------------------------------------------------------------------ under-diagnosis

def test_no_finding_score_and_truth():
    y = np.array([[1, 0], [0, 0], [np.nan, 0], [0, 1]])
    s = np.array([[.9, .2], [.1, .3], [.4, .1], [.2, .6]])
    truth, score, how = subgroups.no_finding(y, s, ["A", "B"])
    np.testing.assert_allclose(score, [0.1, 0.7, 0.6, 0.4])
    np.testing.assert_array_equal(truth, [0, 1, np.nan, 0])
    assert "1 - the highest of the 2 finding probabilities" in how
    truth, score, how = subgroups.no_finding(y, s, ["No Finding", "B"])
    np.testing.assert_array_equal(score, s[:, 0])
    np.testing.assert_array_equal(truth, y[:, 0])
    assert "own 'No Finding' output" in how


def test_f1_threshold_matches_a_brute_force_search():
    rng = np.random.default_rng(4)
    truth = rng.integers(0, 2, 300).astype(float)
    score = np.round(0.4 * truth + rng.random(300), 2)
    best, best_f1 = None, -1.0
    for thr in np.unique(score):                 # ascending: the lowest wins ties
        pred = score >= thr
        tp = (pred & (truth == 1)).sum()
        f1 = 2 * tp / (pred.sum() + (truth == 1).sum())
        if f1 > best_f1 + 1e-12:
            best, best_f1 = thr, f1
    assert subgroups.f1_threshold(truth, score) == best
    assert math.isnan(subgroups.f1_threshold(np.ones(5), np.arange(5.0)))


def test_rate_threshold_calls_that_fraction_normal():
    score = np.random.default_rng(0).random(1000)
    assert (score >= subgroups.rate_threshold(score, 0.54)).mean() == pytest.approx(0.54, abs=1e-3)


def test_underdiagnosis_counts_and_bootstrap_against_a_loop():
    rng = np.random.default_rng(6)
    n = 200
    sex = np.array(["F", "M"])[rng.integers(0, 2, n)]
    truth = rng.integers(0, 2, n).astype(float)
    truth[:10] = np.nan
    score = rng.random(n) + 0.3 * (sex == "F")     # F called normal more often
    patients = rng.integers(0, 70, n)
    table = subgroups.underdiagnosis(truth, score, 0.6, pd.DataFrame({"sex": sex}), patients,
                                     n_boot=30, seed=2)
    rows = table.set_index(["attribute", "group"])
    for g in ("F", "M"):
        with_finding = (truth == 0) & (sex == g)
        called = with_finding & (score >= 0.6)
        assert rows.loc[("sex", g), "with_finding"] == with_finding.sum()
        assert rows.loc[("sex", g), "underdiagnosed"] == called.sum()
        assert rows.loc[("sex", g), "rate"] == called.sum() / with_finding.sum()
    assert rows.loc[("all", "all"), "with_finding"] == (truth == 0).sum()
    unit, n_units = metrics.resampling_units(patients, n)
    draws = np.concatenate(list(metrics.bootstrap_counts(n_units, 30, 2)))
    gaps = []
    for b in range(30):
        rows_b = np.repeat(np.arange(n), draws[b][unit])
        t, s, x = truth[rows_b], score[rows_b], sex[rows_b]
        rate = {g: ((t == 0) & (x == g) & (s >= 0.6)).sum() / ((t == 0) & (x == g)).sum()
                for g in ("F", "M")}
        gaps.append(rate["F"] - rate["M"])
    low, high = np.quantile(gaps, [0.025, 0.975])
    assert rows.loc[("sex", "F"), "gap_ci_low"] == pytest.approx(low)
    assert rows.loc[("sex", "F"), "gap_ci_high"] == pytest.approx(high)


# ------------------------------------------------------------------------------ calibration

def test_ece_with_equal_mass_bins_and_brier_by_hand():
    t = np.array([0, 1, 0, 1, 1, np.nan])
    p = np.array([0.1, 0.3, 0.2, 0.9, 0.6, 0.5])
    # sorted by p: (0.1,0) (0.2,0) | (0.3,1) (0.6,1) | (0.9,1): 3 bins of 2, 2, 1
    want = (2 * abs(0.15 - 0) + 2 * abs(0.45 - 1) + 1 * abs(0.9 - 1)) / 5
    assert subgroups.ece(t, p, n_bins=3) == pytest.approx(want)
    assert subgroups.brier(t, p) == pytest.approx(np.mean([.01, .49, .04, .01, .16]))
    table = subgroups.calibration_table(np.c_[t, 1 - t], np.c_[p, p], ["A", "B"], n_bins=3)
    assert list(table["finding"]) == ["A", "B", "pooled"]
    assert table["n"].tolist() == [5, 5, 10] and table["positives"].tolist() == [3, 2, 5]


def test_perfectly_calibrated_predictor_has_ece_near_zero_and_temperature_one():
    rng = np.random.default_rng(0)
    p = rng.beta(0.5, 3, 200_000)
    t = (rng.random(p.size) < p).astype(float)
    assert subgroups.ece(t, p) < 0.005
    assert subgroups.fit_temperature(t, p) == pytest.approx(1.0, abs=0.02)


def test_overconfident_predictor_gets_temperature_two_and_a_lower_ece():
    rng = np.random.default_rng(1)
    z = rng.normal(-1.5, 1.5, (40_000, 2))
    t = (rng.random(z.shape) < 1 / (1 + np.exp(-z))).astype(float)
    p = 1 / (1 + np.exp(-2 * z))                       # logits twice too large
    val, test = slice(0, 20_000), slice(20_000, None)
    cal = subgroups.calibrate(t[test], p[test], ["A", "B"], t[val], p[val])
    np.testing.assert_allclose(cal.temperatures, 2.0, atol=0.1)
    table = cal.table.set_index("finding")
    assert (table["ece_calibrated"] < 0.5 * table["ece"]).all()
    assert table.loc["pooled", "ece_calibrated"] < 0.01


def test_temperature_scaling_leaves_auc_unchanged():
    rng = np.random.default_rng(2)
    t = rng.integers(0, 2, (500, 3)).astype(float)
    p = np.clip(0.3 * t + rng.random((500, 3)) * 0.8, 0, 1)
    p[:5] = 0.0
    p[5:10] = 1.0                                      # exact 0 and 1 stay the extremes
    for temps in ([0.5, 2.0, 7.0], [1.3, np.nan, 0.2]):
        scaled = subgroups.apply_temperature(p, np.array(temps))
        for j in range(3):
            assert roc_auc_score(t[:, j], scaled[:, j]) == roc_auc_score(t[:, j], p[:, j])
    np.testing.assert_array_equal(subgroups.apply_temperature(p, [1.3, np.nan, 0.2])[:, 1],
                                  p[:, 1])


def test_calibrate_fits_nothing_without_validation():
    t = np.array([[0.0], [1.0], [0.0], [1.0]])
    p = np.array([[0.2], [0.7], [0.4], [0.9]])
    cal = subgroups.calibrate(t, p, ["A"])
    assert cal.temperatures is None and cal.calibrated is None
    assert "never on test" in cal.note and "ece_calibrated" not in cal.table


def test_reliability_diagram_plots_the_equal_mass_bins(tmp_path):
    rng = np.random.default_rng(3)
    t = rng.integers(0, 2, (90, 2)).astype(float)
    p = rng.random((90, 2))
    fig = subgroups.plot_reliability(t, p, ["A", "B"], calibrated=p ** 2, n_bins=3, ncols=2,
                                     out_png=tmp_path / "r.png")
    axes = [ax for ax in fig.axes if ax.get_visible()]
    assert [ax.get_title() for ax in axes] == ["A", "B", "pooled"]
    x, y = axes[0].lines[1].get_data()                 # lines[0] is the diagonal
    order = np.argsort(p[:, 0], kind="stable")
    for b, rows in enumerate(np.array_split(order, 3)):  # 30 images per bin, by hand
        assert x[b] == pytest.approx(p[rows, 0].mean()) and y[b] == pytest.approx(t[rows, 0].mean())
    assert len(axes[2].lines) == 3                      # diagonal, before, after
    assert (tmp_path / "r.png").stat().st_size > 5_000


# ------------------------------------------------------------------------------ the demo

def _labels(path) -> np.ndarray:
    entry = pd.read_csv(path)
    return np.array([[f in s.split("|") for f in FINDINGS] for s in entry["Finding Labels"]],
                    float)


@pytest.fixture(scope="module")
def demo_pair(tmp_path_factory):
    """The same seed twice: without and with under-diagnosis of women in the labels."""
    root = tmp_path_factory.mktemp("subgroup_demo")
    demo_data.make_nih_demo(root / "clean", n_images=1500, size=16, seed=0)
    demo_data.make_nih_demo(root / "injected", n_images=1500, size=16, seed=0,
                            underdiagnose=("F", 0.7))
    return root


@pytest.mark.slow
def test_injected_demo_gap_is_found_and_its_absence_is_not(demo_pair):
    shown = _labels(demo_pair / "clean" / "Data_Entry_2017.csv")
    labelled = _labels(demo_pair / "injected" / "Data_Entry_2017.csv")
    entry = pd.read_csv(demo_pair / "injected" / "Data_Entry_2017.csv")
    attrs = subgroups.read_attributes(demo_pair / "injected" / "Data_Entry_2017.csv",
                                      entry["Image Index"])
    scores = demo_data.stand_in_scores(shown, seed=0)    # a model that sees the findings
    found = {}
    for name, truth in (("injected", labelled), ("clean", shown)):
        table = subgroups.subgroup_auc(truth, scores, attrs.table[["sex", "view"]],
                                       attrs.patients, FINDINGS, n_boot=500, seed=0)
        found[name] = table.set_index(["attribute", "group", "finding"])
    women = found["injected"].loc[("sex", "F", "mean")]
    assert women["gap_ci_high"] < 0 and women["gap"] < -0.02
    clean = found["clean"].loc[("sex", "F", "mean")]
    assert clean["gap_ci_low"] <= 0 <= clean["gap_ci_high"]
    for view in ("AP", "PA"):                          # not injected: no gap either way
        row = found["injected"].loc[("view", view, "mean")]
        assert row["gap_ci_low"] <= 0 <= row["gap_ci_high"]
    f = (entry["Patient Gender"] == "F").to_numpy()
    want = np.mean([roc_auc_score(labelled[f, j], scores[f, j]) for j in range(14)])
    assert women["auc"] == pytest.approx(want)


def test_stand_in_scores_are_calibrated_unless_overconfident():
    shown = (np.random.default_rng(0).random((20_000, 3)) < 0.1).astype(float)
    calibrated = demo_data.stand_in_scores(shown, seed=1)
    assert subgroups.ece(shown.ravel(), calibrated.ravel()) < 0.01
    assert roc_auc_score(shown[:, 0], calibrated[:, 0]) == pytest.approx(0.961, abs=0.01)
    over = demo_data.stand_in_scores(shown, seed=1, overconfidence=2.0)
    assert subgroups.fit_temperature(shown[:, 0], over[:, 0]) == pytest.approx(2.0, abs=0.15)


# ------------------------------------------------------------------------------ real data

def test_reference_predictions_by_subgroup():
    preds = pd.read_csv(shared("reference", "reproduce_chexnet_pretrained_preds.csv"))
    entry_path = shared("nih", "Data_Entry_2017_v2020.csv.gz")
    entry = pd.read_csv(entry_path).set_index("Image Index").loc[preds["Image Index"]]
    attrs = subgroups.read_attributes(entry_path, preds["Image Index"])
    assert attrs.available == ["sex", "age", "view", "followup"]
    y = np.array([[f in s.split("|") for f in FINDINGS] for s in entry["Finding Labels"]], float)
    s = preds[[f"prob_{f}" for f in FINDINGS]].to_numpy()
    table = subgroups.subgroup_auc(y, s, attrs.table[["sex", "view", "age"]], attrs.patients,
                                   FINDINGS, n_boot=20)
    mean = table[table["finding"] == "mean"].set_index("group")
    assert mean["n"].to_dict() == {"F": 9802, "M": 12631, "AP": 8847, "PA": 13586,
                                   "0-19": 1184, "20-39": 5625, "40-59": 10440, "60-79": 4992,
                                   "80+": 192}
    assert mean.loc[["F", "M"], "patients"].sum() == 6187
    ap = (entry["View Position"] == "AP").to_numpy()
    rows = table.set_index(["group", "finding"])
    for j, f in enumerate(FINDINGS[:3]):
        assert rows.loc[("AP", f), "auc"] == pytest.approx(roc_auc_score(y[ap, j], s[ap, j]))
        assert rows.loc[("AP", f), "rest_auc"] == pytest.approx(roc_auc_score(y[~ap, j],
                                                                              s[~ap, j]))


@pytest.mark.slow
def test_benchmark_script_on_generated_files(demo_pair, tmp_path, capsys):
    entry = pd.read_csv(demo_pair / "injected" / "Data_Entry_2017.csv")
    shown = _labels(demo_pair / "clean" / "Data_Entry_2017.csv")
    preds = pd.DataFrame({"Image Index": entry["Image Index"]})
    for j, f in enumerate(FINDINGS):
        preds[f"prob_{f}"] = demo_data.stand_in_scores(shown, seed=0)[:, j]
    preds.to_csv(tmp_path / "preds.csv", index=False)
    folds = pd.DataFrame({"Image Index": entry["Image Index"], "fold": ["train"] * 1000
                          + ["test"] * 500, **{f: shown[:, j].astype(int)
                                               for j, f in enumerate(FINDINGS)}})
    folds.to_csv(tmp_path / "folds.csv", index=False)
    benchmark = load_benchmark("subgroups_reference")
    code = benchmark.main(["--preds", str(tmp_path / "preds.csv"), "--labels",
                           str(demo_pair / "injected" / "Data_Entry_2017.csv"),
                           "--split-labels", str(tmp_path / "folds.csv"), "--n-boot", "50",
                           "--out", str(tmp_path / "out")])
    assert code == 0
    out = capsys.readouterr().out
    rate = (shown[:1000].sum(axis=1) == 0).mean()
    assert f"calling {rate:.1%} of the images normal" in out
    assert "NO VALIDATION PREDICTIONS" in out and "No temperature scaling" in out
    # 2 sexes, 5 age bands (ages 18-87), 2 views, follow-ups 0 and 1-4 (at most 5 images each)
    assert out.strip().splitlines()[-1].startswith("subgroups 1500x14x50 (11 subgroups): ")
    table = pd.read_csv(tmp_path / "out" / "subgroups.csv")
    assert len(table) == 11 * 15 and (tmp_path / "out" / "reliability.png").is_file()
    code = benchmark.main(["--preds", str(tmp_path / "nope.csv")])
    assert code == 2 and "nope.csv: predictions file not found" in capsys.readouterr().err
