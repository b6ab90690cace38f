"""The reproduction verdict of `eval_model.py --compare`: the mean-AUC difference's paired
bootstrap interval against a margin (equivalence by CI inclusion, TOST at the CI level).

Known answers come from how the copies are made, not from the code: an identical copy is
REPRODUCED; a copy blended with noise loses a known amount of AUC on many images (DIFFERENT); two
copies degraded alike, on few images, have an interval too wide to tell (INCONCLUSIVE)."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

import eval_model
from conftest import ROOT, shared
from chexnet.analysis import metrics
from chexnet.labels import NIH_FINDINGS


@pytest.mark.parametrize("low,high,margin,expected", [
    (-0.004, 0.003, 0.01, "REPRODUCED"),
    (-0.01, 0.01, 0.01, "REPRODUCED"),        # the margin itself is inside
    (0.002, 0.008, 0.01, "REPRODUCED"),       # excludes 0, but a difference that small is fine
    (0.004, 0.02, 0.01, "DIFFERENT"),         # excludes 0, reaches past +M
    (-0.05, -0.03, 0.01, "DIFFERENT"),        # wholly beyond -M
    (-0.005, 0.02, 0.01, "INCONCLUSIVE"),     # holds 0, reaches past +M
    (-0.02, 0.02, 0.05, "REPRODUCED"),        # a wider margin
    (float("nan"), 0.1, 0.01, "n/a"),
])
def test_verdict_of_an_interval(low, high, margin, expected):
    assert metrics.equivalence_verdict(low, high, margin) == expected


def _synthetic(n=600, k=4, seed=0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, (n, k)).astype(float)
    score = np.clip(0.35 * y + rng.random((n, k)) * 0.65, 0, 1)
    return y, score, rng


def test_mean_row_is_the_mean_of_the_per_label_aucs_and_its_replicates():
    """Against sklearn and a second computation of the replicates (bootstrap_replicates of
    each run, then the per-replicate mean difference)."""
    y, a, rng = _synthetic()
    b = np.clip(a + rng.normal(0, 0.2, a.shape), 0, 1)
    y[0, 3] = np.nan  # a masked label
    table = metrics.compare_runs(y, a, b, list("ABCD"), n_boot=200, seed=3, margin=0.01)
    mean = table.set_index("label").loc["mean"]
    want_a = np.mean([roc_auc_score(y[~np.isnan(y[:, j]), j], a[~np.isnan(y[:, j]), j])
                      for j in range(4)])
    want_b = np.mean([roc_auc_score(y[~np.isnan(y[:, j]), j], b[~np.isnan(y[:, j]), j])
                      for j in range(4)])
    assert mean["auc_a"] == pytest.approx(want_a, abs=1e-12)
    assert mean["auc_b"] == pytest.approx(want_b, abs=1e-12)
    diffs = (metrics.bootstrap_replicates(y, a, 200, 3).mean(axis=1)
             - metrics.bootstrap_replicates(y, b, 200, 3).mean(axis=1))
    assert [mean["diff_ci_low"], mean["diff_ci_high"]] == pytest.approx(
        list(np.quantile(diffs, [0.025, 0.975])), abs=1e-12)
    assert list(table["label"]) == ["A", "B", "C", "D", "mean"]
    assert np.isnan(mean["delong_p"])


def test_synthetic_copies_get_their_known_verdicts():
    y, a, rng = _synthetic(n=3000)
    same = metrics.compare_runs(y, a, a.copy(), n_boot=100, margin=0.01)
    assert set(same["verdict"]) == {"REPRODUCED"}
    blended = 0.5 * a + 0.5 * rng.random(a.shape)  # much of the signal replaced by noise
    worse = metrics.compare_runs(y, a, blended, n_boot=100, margin=0.01)
    assert set(worse["verdict"]) == {"DIFFERENT"}
    assert (worse["diff_ci_low"] > 0.01).all()  # A better than B by more than the margin
    few = slice(0, 120)
    noisy = metrics.compare_runs(y[few], a[few], np.clip(a[few] + rng.normal(0, 0.05, (120, 4)),
                                                         0, 1), n_boot=300, margin=0.01)
    assert noisy.set_index("label").loc["mean", "verdict"] == "INCONCLUSIVE"


# -------------------------------------------- the reference model's test predictions (22,433)
@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    path = shared("reference", "reproduce_chexnet_pretrained_preds.csv")
    folder = tmp_path_factory.mktemp("verdict")
    preds = pd.read_csv(path)
    prob = [f"prob_{f}" for f in NIH_FINDINGS]
    rng = np.random.default_rng(0)

    def copy(name, scores, rows=slice(None)):
        out = preds.iloc[rows].copy()
        out[prob] = np.clip(scores[rows], 0, 1)
        out.to_csv(folder / name, index=False)
        return folder / name

    s = preds[prob].to_numpy()
    files = {"a": copy("a.csv", s), "same": copy("same.csv", s.copy()),
             "blurred": copy("blurred.csv", s + rng.normal(0, 1e-4, s.shape)),
             "blended": copy("blended.csv", 0.6 * s + 0.4 * rng.random(s.shape)),
             # Two copies degraded alike (no difference in expectation), on 400 images: the
             # interval holds 0 but is far wider than the margin.
             "few_a": copy("few_a.csv", s * np.exp(rng.normal(0, 0.6, s.shape)), slice(0, 400)),
             "few_noisy": copy("few_noisy.csv", s * np.exp(rng.normal(0, 0.6, s.shape)),
                               slice(0, 400))}
    return files


@pytest.mark.slow
@pytest.mark.parametrize("a,b,margin,expected", [("a", "same", "0.01", "REPRODUCED"),
                                                 ("a", "blurred", "0.01", "REPRODUCED"),
                                                 ("a", "blended", "0.01", "DIFFERENT"),
                                                 ("a", "blended", "0.3", "REPRODUCED"),
                                                 ("few_a", "few_noisy", "0.01", "INCONCLUSIVE")])
def test_reference_predictions_against_perturbed_copies(reference, tmp_path, capsys, a, b,
                                                        margin, expected):
    out = tmp_path / "aucs.csv"
    assert eval_model.main(["--preds", str(reference[a]), "--compare", str(reference[b]),
                            "--labels", str(ROOT / "nih_labels.csv"), "--n-boot", "200",
                            "--margin", margin, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"\n{expected}: mean AUC" in printed
    assert "TOST at the CI level" in printed
    cmp = pd.read_csv(reference[a].parent / "compare.csv").set_index("label")  # beside A
    assert cmp.loc["mean", "verdict"] == expected
    if expected == "REPRODUCED" and b == "same":
        assert set(cmp["verdict"]) == {"REPRODUCED"} and (cmp["diff"] == 0).all()
    if expected == "DIFFERENT":  # every finding loses more than the margin (~0.1 AUC)
        assert set(cmp["verdict"]) == {"DIFFERENT"}


def test_margin_is_checked_while_parsing(capsys):
    with pytest.raises(SystemExit) as stop:
        eval_model.main(["--preds", "x.csv", "--margin", "0"])
    assert stop.value.code == 2 and "--margin: 0 is out of range" in capsys.readouterr().err
