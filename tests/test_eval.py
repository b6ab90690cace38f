"""Re-scoring: the published table from the reference predictions, masks, one-class labels."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

import eval_model
from conftest import shared
from labels import NIH_FINDINGS


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
    a, n = eval_model.score(preds, ROOT / "nih_labels.csv")
    b, _ = eval_model.score(preds, shared("nih", "Data_Entry_2017_v2020.csv.gz"))
    assert n == 22_433
    np.testing.assert_allclose(a["auc"], b["auc"], rtol=0, atol=1e-12)


def test_per_label_auc_masks_nan_and_flags_one_class(capsys):
    y_true = np.array([[1, 0, 1], [0, 0, np.nan], [1, 0, 0], [0, 0, np.nan]], dtype=float)
    y_score = np.array([[0.9, 0.1, 0.2], [0.1, 0.2, 0.9], [0.8, 0.3, 0.1], [0.2, 0.4, 0.9]])
    aucs = eval_model.per_label_auc(y_true, y_score, ["A", "B", "C"])
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
    assert (cmp["diff_ci_low"] <= cmp["diff"]).all() and cmp["delong_p"].between(0, 1).all()
    assert "DeLong" in out
    capsys.readouterr()
    (tmp_path / "val_preds.csv").unlink()
    assert eval_model.main(["--preds", str(tmp_path / "preds.csv"), "--thresholds"]) == 2
    assert "never on test" in capsys.readouterr().err


def test_patients_of():
    assert list(eval_model.patients_of(["00000001_000.png", "00000001_001.png"])) == ["00000001"] * 2
    assert list(eval_model.patients_of(["X/valid/natural/patient00042/study1/view1_frontal.jpg"])) \
        == ["patient00042"]
    assert eval_model.patients_of(["a.png"]) is None


def test_no_published_columns_on_request(tmp_path):
    make_preds(tmp_path / "preds.csv")
    assert eval_model.main(["--preds", str(tmp_path / "preds.csv"), "--no-published"]) == 0
    assert "CheXNet paper" not in pd.read_csv(tmp_path / "aucs.csv").columns
