"""Re-scoring: the published table from the reference predictions, masks, one-class labels."""
from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from chexnet import scoring
import eval_model
from conftest import shared
from chexnet.labels import NIH_FINDINGS


@pytest.mark.slow
def test_rescoring_reference_predictions_reproduces_published_aucs(tmp_path, capsys):
    preds = shared("reference", "reproduce_chexnet_pretrained_preds.csv")
    labels = shared("nih", "Data_Entry_2017_v2020.csv.gz")
    published = pd.read_csv(shared("reference", "reproduce_chexnet_pretrained_aucs.csv"))
    out = tmp_path / "aucs.csv"
    assert eval_model.main(["--preds", str(preds), "--labels", str(labels), "--out", str(out)]) == 0
    table = pd.read_csv(out).set_index("label")
    for label, auc in zip(published["label"], published["auc"]):
        assert round(table.loc[label, "auc"], 4) == round(auc, 4), label
    assert table.loc["mean", "reproduce-chexnet"] == 0.838
    printed = capsys.readouterr().out
    assert "Hernia" in printed and "0.9175" in printed and "own test splits" in printed


def test_rescoring_against_committed_nih_labels_matches_data_entry(tmp_path):
    """nih_labels.csv-style labels give the same AUCs as Data_Entry-style ones."""
    from conftest import ROOT

    preds = shared("reference", "reproduce_chexnet_pretrained_preds.csv")
    a, n = scoring.score(preds, ROOT / "nih_labels.csv")
    b, _ = scoring.score(preds, shared("nih", "Data_Entry_2017_v2020.csv.gz"))
    assert n == 22_433
    np.testing.assert_allclose(a["auc"], b["auc"], rtol=0, atol=1e-12)


def test_per_label_auc_masks_nan_and_flags_one_class(capsys):
    y_true = np.array([[1, 0, 1], [0, 0, np.nan], [1, 0, 0], [0, 0, np.nan]], dtype=float)
    y_score = np.array([[0.9, 0.1, 0.2], [0.1, 0.2, 0.9], [0.8, 0.3, 0.1], [0.2, 0.4, 0.9]])
    aucs = scoring.per_label_auc(y_true, y_score, ["A", "B", "C"])
    assert aucs["A"] == 1.0
    assert math.isnan(aucs["B"])
    assert aucs["C"] == 1.0  # the two NaN rows (scored 0.9, would make it 0.5) are left out
    assert "AUC undefined for B: no positives among 4" in capsys.readouterr().err


def make_preds(path, n=40, seed=0, with_truth=True, findings=NIH_FINDINGS):
    rng = np.random.default_rng(seed)
    truth = rng.integers(0, 2, (n, len(findings)))
    truth[:, -1] = 0  # last finding: no positives
    df = pd.DataFrame({"Image Index": [f"{i:08d}_000.png" for i in range(n)]})
    for k, f in enumerate(findings):
        df[f"prob_{f}"] = np.clip(truth[:, k] * 0.3 + rng.random(n) * 0.7, 0, 1)
    if with_truth:
        for k, f in enumerate(findings):
            df[f] = truth[:, k]
    df.to_csv(path, index=False)
    return df, truth


def test_cli_scores_preds_alone_and_writes_table(tmp_path, capsys):
    df, truth = make_preds(tmp_path / "preds.csv")
    assert eval_model.main(["--preds", str(tmp_path / "preds.csv")]) == 0
    table = pd.read_csv(tmp_path / "aucs.csv").set_index("label")
    from sklearn.metrics import roc_auc_score
    assert table.loc["Atelectasis", "auc"] == pytest.approx(
        roc_auc_score(truth[:, 0], df["prob_Atelectasis"]))
    assert math.isnan(table.loc["Hernia", "auc"])
    assert "CheXNet paper" in table.columns
    assert table.loc["mean", "auc"] == pytest.approx(table["auc"].iloc[:13].mean())
    captured = capsys.readouterr()
    assert "AUC undefined for Hernia" in captured.err
    assert "n/a" in captured.out


def test_cli_errors_are_clear(tmp_path, capsys):
    make_preds(tmp_path / "preds.csv", with_truth=False)
    assert eval_model.main(["--preds", str(tmp_path / "preds.csv")]) == 2
    assert "pass --labels" in capsys.readouterr().err
    assert eval_model.main(["--preds", str(tmp_path / "nope.csv")]) == 2
    assert "nope.csv: predictions file not found" in capsys.readouterr().err
    labels = pd.DataFrame({"Image Index": ["other.png"], "Patient ID": [1], "fold": ["test"],
                           **{f: [0] for f in NIH_FINDINGS}})
    labels.to_csv(tmp_path / "labels.csv", index=False)
    assert eval_model.main(["--preds", str(tmp_path / "preds.csv"),
                            "--labels", str(tmp_path / "labels.csv")]) == 2
    assert "40 of 40 predicted images have no labels" in capsys.readouterr().err


def test_cli_ci_roc_thresholds_and_compare(tmp_path, capsys):
    """--ci (patients from NIH names), --roc, --thresholds from val_preds.csv, --compare."""
    rng = np.random.default_rng(5)
    findings = NIH_FINDINGS[:3]

    def write(name, n, seed, noise):
        r = np.random.default_rng(seed)
        truth = r.integers(0, 2, (n, 3))
        df = pd.DataFrame({"Image Index": [f"{i // 2:08d}_{i % 2:03d}.png" for i in range(n)]})
        for k, f in enumerate(findings):
            df[f"prob_{f}"] = np.clip(truth[:, k] * 0.5 + r.random(n) * noise, 0, 1)
        for k, f in enumerate(findings):
            df[f] = truth[:, k]
        df.to_csv(tmp_path / name, index=False)
        return df

    a = write("preds.csv", 200, 1, 0.9)
    write("val_preds.csv", 100, 2, 0.9)
    b = a.copy()
    for f in findings:  # run B: the same images, noisier scores
        b[f"prob_{f}"] = np.clip(a[f"prob_{f}"] + rng.normal(0, 0.3, len(a)), 0, 1)
    b.to_csv(tmp_path / "b.csv", index=False)
    assert eval_model.main(["--preds", str(tmp_path / "preds.csv"), "--ci", "--n-boot", "200",
                            "--roc", str(tmp_path / "roc.png"), "--thresholds",
                            "--compare", str(tmp_path / "b.csv")]) == 0
    out = capsys.readouterr().out
    assert "resamples of patients" in out
    ci = pd.read_csv(tmp_path / "aucs_ci.csv").set_index("label")
    assert (ci["ci_low"] <= ci["auc"]).all() and (ci["auc"] <= ci["ci_high"]).all()
    assert (tmp_path / "roc.png").stat().st_size > 10_000
    thresholds = pd.read_csv(tmp_path / "thresholds.csv")
    assert len(thresholds) == 2 * len(findings)
    cmp = pd.read_csv(tmp_path / "compare.csv").set_index("label")
    assert (cmp["diff"] > 0).all()  # diff = A - B, and B is noisier
    per_finding = cmp.drop(index="mean")  # the last row: the mean AUC, with no DeLong test
    assert (cmp["diff_ci_low"] <= cmp["diff"]).all()
    assert per_finding["delong_p"].between(0, 1).all()
    assert "DeLong" in out
    capsys.readouterr()
    (tmp_path / "val_preds.csv").unlink()
    assert eval_model.main(["--preds", str(tmp_path / "preds.csv"), "--thresholds"]) == 2
    assert "never on test" in capsys.readouterr().err


def test_patients_of():
    assert list(scoring.patients_of(["00000001_000.png", "00000001_001.png"])) \
        == ["00000001"] * 2
    assert list(scoring.patients_of(["X/valid/natural/patient00042/study1/view1_frontal.jpg"])) \
        == ["patient00042"]
    assert scoring.patients_of(["a.png"]) is None


def test_no_published_columns_on_request(tmp_path):
    make_preds(tmp_path / "preds.csv")
    assert eval_model.main(["--preds", str(tmp_path / "preds.csv"), "--no-published"]) == 0
    assert "CheXNet paper" not in pd.read_csv(tmp_path / "aucs.csv").columns


# ------------------------------------------------------------------------------ --by, --calibration

SUB_FINDINGS = list(NIH_FINDINGS[:3])


def write_subgroup_run(folder, seed=0):
    """preds.csv (200 test images) and val_preds.csv (100) with ground truth, 3 findings, NIH
    names (2 images per patient), and a Data_Entry-style file covering both folds: women's
    scores are noise, men's follow their labels."""
    rng = np.random.default_rng(seed)
    n = 300
    names = [f"{i // 2:08d}_{i % 2:03d}.png" for i in range(n)]
    sex = np.where((np.arange(n) // 2) % 2 == 0, "F", "M")
    truth = rng.integers(0, 2, (n, 3))
    score = np.where(sex[:, None] == "M", 0.6 * truth + 0.4 * rng.random((n, 3)),
                     rng.random((n, 3)))
    entry = pd.DataFrame({"Image Index": names, "Finding Labels": [
        "|".join(f for f, on in zip(SUB_FINDINGS, row) if on) or "No Finding" for row in truth],
        "Follow-up #": np.arange(n) % 2, "Patient ID": np.arange(n) // 2 + 1,
        "Patient Age": 20 + (np.arange(n) // 2) % 60, "Patient Gender": sex,
        "View Position": np.where(np.arange(n) % 3 == 0, "AP", "PA")})
    entry.to_csv(folder / "Data_Entry_2017.csv", index=False)
    for name, rows in (("preds.csv", slice(0, 200)), ("val_preds.csv", slice(200, n))):
        df = pd.DataFrame({"Image Index": names[rows]})
        for j, f in enumerate(SUB_FINDINGS):
            df[f"prob_{f}"] = score[rows, j]
        for j, f in enumerate(SUB_FINDINGS):
            df[f] = truth[rows, j]
        df.to_csv(folder / name, index=False)
    return truth, score, sex


def _f1_threshold_by_hand(truth, score):
    """Normal = no finding; normal score = 1 - max probability; the F1-best threshold."""
    normal, s = (truth.sum(axis=1) == 0), 1 - score.max(axis=1)
    best, best_f1 = None, -1.0
    for thr in np.unique(s):
        pred = s >= thr
        f1 = 2 * (pred & normal).sum() / (pred.sum() + normal.sum())
        if f1 > best_f1 + 1e-12:
            best, best_f1 = thr, f1
    return best


def test_cli_by_writes_subgroups_and_underdiagnosis(tmp_path, capsys):
    truth, score, sex = write_subgroup_run(tmp_path)
    score[200:] *= 0.5      # validation scores on another scale: its threshold is not test's
    val = pd.read_csv(tmp_path / "val_preds.csv")
    for j, f in enumerate(SUB_FINDINGS):
        val[f"prob_{f}"] = score[200:, j]
    val.to_csv(tmp_path / "val_preds.csv", index=False)
    assert eval_model.main(["--preds", str(tmp_path / "preds.csv"), "--labels",
                            str(tmp_path / "Data_Entry_2017.csv"), "--by", "sex,view",
                            "--n-boot", "100", "--no-published"]) == 0
    out = capsys.readouterr().out
    assert "subgroup attributes from" in out and "sex, age, view, followup" in out
    assert "same 100 resamples of patients" in out
    table = pd.read_csv(tmp_path / "subgroups.csv")
    assert {"attribute", "group", "finding", "n", "positives", "auc", "ci_low", "ci_high", "gap",
            "gap_ci_low", "gap_ci_high"} <= set(table.columns)
    assert len(table) == 4 * 4 and set(table["finding"]) == {*SUB_FINDINGS, "mean"}
    rows = table.set_index(["attribute", "group", "finding"])
    test_sex = sex[:200]
    for j, f in enumerate(SUB_FINDINGS):
        women = test_sex == "F"
        assert rows.loc[("sex", "F", f), "auc"] == pytest.approx(
            roc_auc_score(truth[:200][women, j], score[:200][women, j]))
        assert rows.loc[("sex", "F", f), "positives"] == truth[:200][women, j].sum()
    assert rows.loc[("sex", "F", "mean"), "gap_ci_high"] < 0       # women's scores are noise
    threshold = _f1_threshold_by_hand(truth[200:], score[200:])
    under = pd.read_csv(tmp_path / "underdiagnosis.csv").set_index(["attribute", "group"])
    for g in ("F", "M"):
        with_finding = (truth[:200].sum(axis=1) > 0) & (test_sex == g)
        called = with_finding & (1 - score[:200].max(axis=1) >= threshold)
        assert under.loc[("sex", g), "with_finding"] == with_finding.sum()
        assert under.loc[("sex", g), "underdiagnosed"] == called.sum()
    assert "val_preds.csv (validation fold)" in out and "1 - the highest" in out


def test_cli_by_from_the_run_folder_and_without_validation(tmp_path, capsys):
    write_subgroup_run(tmp_path)
    (tmp_path / "val_preds.csv").unlink()
    (tmp_path / "config.json").write_text(json.dumps({"dataset": "demo", "data": str(tmp_path)}))
    args = ["--preds", str(tmp_path / "preds.csv"), "--by", "all", "--n-boot", "50",
            "--no-published"]
    assert eval_model.main(args) == 0                  # attributes found through config.json
    captured = capsys.readouterr()
    assert "under-diagnosis: skipped" in captured.err and "never on the test fold" in captured.err
    assert not (tmp_path / "underdiagnosis.csv").exists()
    assert set(pd.read_csv(tmp_path / "subgroups.csv")["attribute"]) == {"sex", "age", "view",
                                                                          "followup"}
    assert eval_model.main(args + ["--nofinding-rate", "0.3"]) == 0
    assert "NO VALIDATION PREDICTIONS" in capsys.readouterr().out
    assert (tmp_path / "underdiagnosis.csv").is_file()


def test_cli_by_errors(tmp_path, capsys):
    write_subgroup_run(tmp_path)
    base = ["--preds", str(tmp_path / "preds.csv"), "--labels",
            str(tmp_path / "Data_Entry_2017.csv"), "--n-boot", "20"]
    assert eval_model.main(base + ["--by", "sex,colour"]) == 2
    assert "error: --by sex,colour: unknown attribute(s) ['colour']" in capsys.readouterr().err
    assert eval_model.main(base + ["--by", "age", "--age-bands", "40,20"]) == 2
    assert "--age-bands '40,20'" in capsys.readouterr().err
    entry = pd.read_csv(tmp_path / "Data_Entry_2017.csv")
    plain = pd.DataFrame({"Image Index": entry["Image Index"], "Patient ID": entry["Patient ID"],
                          **{f: 0 for f in NIH_FINDINGS}})
    plain.to_csv(tmp_path / "plain.csv", index=False)
    assert eval_model.main(["--preds", str(tmp_path / "preds.csv"), "--labels",
                            str(tmp_path / "plain.csv"), "--by", "sex"]) == 2
    assert "--by needs subgroup columns" in capsys.readouterr().err


def test_cli_calibration_writes_calibrated_preds(tmp_path, capsys):
    write_subgroup_run(tmp_path)
    args = ["--preds", str(tmp_path / "preds.csv"), "--calibration", "--no-published"]
    assert eval_model.main(args) == 0
    assert "fitted on the validation fold (100 images)" in capsys.readouterr().out
    preds = pd.read_csv(tmp_path / "preds.csv")
    calibrated = pd.read_csv(tmp_path / "preds_calibrated.csv")
    assert list(calibrated.columns) == list(preds.columns)
    cal = pd.read_csv(tmp_path / "calibration.csv").set_index("finding")
    for f in SUB_FINDINGS:
        assert roc_auc_score(preds[f], calibrated[f"prob_{f}"]) == roc_auc_score(
            preds[f], preds[f"prob_{f}"])
        assert not np.allclose(calibrated[f"prob_{f}"], preds[f"prob_{f}"])
        assert cal.loc[f, "temperature"] > 0
    assert (tmp_path / "reliability.png").stat().st_size > 10_000
    (tmp_path / "val_preds.csv").unlink()
    (tmp_path / "preds_calibrated.csv").unlink()
    assert eval_model.main(args) == 0
    assert "none was fitted" in capsys.readouterr().out
    assert not (tmp_path / "preds_calibrated.csv").exists()
