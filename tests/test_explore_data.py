"""explore_data: counts on hand-built tables, raw CheXpert label counts, and the CLI's outputs on
tiny generated demo data (and on the shared real NIH images when present)."""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from chexnet.analysis import explore as ed
from conftest import shared
from chexnet.data import DataError
from chexnet.labels import CHEXPERT_META_COLS, CHEXPERT_OBSERVATIONS, NIH_FINDINGS

COMMON_FILES = {
    "class_balance.csv", "class_balance.png", "cooccurrence_counts.csv",
    "cooccurrence_conditional.csv", "cooccurrence.png", "demographics.csv", "demographics.png",
    "findings_per_image.csv", "findings_per_image.png", "images_per_patient.csv",
    "images_per_patient.png", "samples.png", "summary.json",
}
CHEXPHOTO_FILES = COMMON_FILES | {"uncertainty.csv", "uncertainty.png", "renditions.csv",
                                  "renditions.png"}


def hand_table() -> pd.DataFrame:
    """Six images of four patients, two findings; one masked (NaN) label."""
    return pd.DataFrame({
        "image_id": ["1", "2", "3", "4", "5", "6"],
        "patient": ["p1", "p1", "p2", "p3", "p4", "p4"],
        "fold": ["train", "train", "train", "val", "test", "test"],
        "A": [1, 1, 0, 0, 1, 0],
        "B": [0, 1, 0, 1, np.nan, 0],
        "age": [34, 35, 71, 8, 95, np.nan],
        "sex": ["M", "M", "F", "F", "M", "M"],
        "view": ["PA", "AP", "PA", "PA", "AP", "AP"],
        "path": [""] * 6,
    })


# ------------------------------------------------------------------------------ tables

def test_class_balance_counts_and_prevalence():
    bal = ed.class_balance(hand_table(), ["A", "B"])
    assert list(bal.index) == ["A", "B", "No Finding"]
    assert list(bal.columns) == ["n_train", "prev_train", "n_val", "prev_val", "n_test",
                                 "prev_test", "n_all", "prev_all"]
    assert bal.loc["A", ["n_train", "n_val", "n_test", "n_all"]].tolist() == [2, 0, 1, 3]
    assert bal.loc["B", ["n_train", "n_val", "n_test", "n_all"]].tolist() == [1, 1, 0, 2]
    assert bal.loc["A", "prev_train"] == pytest.approx(2 / 3)
    assert bal.loc["A", "prev_all"] == pytest.approx(3 / 6)
    # B is masked on image 5: prevalence is over the labelled images only.
    assert bal.loc["B", "prev_test"] == 0.0
    assert bal.loc["B", "prev_all"] == pytest.approx(2 / 5)
    # No Finding: images 3 (train) and 6 (test).
    assert bal.loc["No Finding", ["n_train", "n_val", "n_test", "n_all"]].tolist() == [1, 0, 1, 2]
    assert bal.loc["No Finding", "prev_test"] == pytest.approx(1 / 2)
    assert ed.fold_sizes(hand_table()) == {"train": 3, "val": 1, "test": 2, "all": 6}


def test_class_balance_keeps_an_explicit_no_finding_column():
    table = hand_table().assign(**{"No Finding": [0, 0, 1, 0, 0, 1]})
    bal = ed.class_balance(table, ["No Finding", "A", "B"])
    assert list(bal.index) == ["No Finding", "A", "B"]
    assert bal.loc["No Finding", "n_all"] == 2


def test_cooccurrence_is_symmetric_with_counts_on_the_diagonal():
    rng = np.random.default_rng(0)
    values = (rng.random((200, 5)) < 0.3).astype(float)
    values[rng.random((200, 5)) < 0.1] = np.nan          # masked labels are not positives
    values[:, 4] = 0                                     # a finding never positive
    names = list("VWXYZ")
    table = pd.DataFrame(values, columns=names)
    co = ed.cooccurrence(table, names)
    assert co.shape == (5, 5) and list(co.index) == names and list(co.columns) == names
    np.testing.assert_array_equal(co.to_numpy(), co.to_numpy().T)
    np.testing.assert_array_equal(np.diag(co), (values == 1).sum(axis=0))
    assert co.loc["V", "X"] == int(((values[:, 0] == 1) & (values[:, 2] == 1)).sum())
    cond = ed.conditional_cooccurrence(co)
    assert cond.loc["V", "X"] == pytest.approx(co.loc["V", "X"] / co.loc["V", "V"])
    assert cond.loc["X", "V"] == pytest.approx(co.loc["V", "X"] / co.loc["X", "X"])
    np.testing.assert_allclose(np.diag(cond)[:4], 1.0)
    assert cond.loc["Z"].isna().all()          # P(. | Z) undefined: Z is never positive


def test_demographics_and_distributions():
    table = hand_table()
    demo = ed.demographics(table).set_index(["variable", "value"])
    assert demo.loc[("age_group", "30-39"), "train"] == 2
    assert demo.loc[("age_group", "0-9"), "val"] == 1
    assert demo.loc[("age_group", "90+"), "test"] == 1
    assert demo.loc[("age_group", "unknown"), "test"] == 1
    assert demo.loc[("sex", "M"), "all"] == 4 and demo.loc[("sex", "F"), "all"] == 2
    assert demo.loc[("view", "AP"), "test"] == 2
    per_image = ed.findings_per_image(table, ["A", "B"])
    assert per_image["all"].tolist() == [2, 3, 1]          # 0, 1 and 2 findings
    assert per_image["train"].tolist() == [1, 1, 1]
    per_patient = ed.images_per_patient(table)
    assert list(per_patient.index) == [1, 2]
    assert per_patient["all"].tolist() == [2, 2]           # p2, p3 once; p1, p4 twice
    assert per_patient["test"].tolist() == [0, 1]
    assert ed.demographics(table.drop(columns=["age", "sex", "view"])).empty


def write_chexpert_csv(path: Path, rows: list[dict[str, str]]) -> None:
    header = list(CHEXPERT_META_COLS) + list(CHEXPERT_OBSERVATIONS)
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, header, restval="")
        writer.writeheader()
        writer.writerows(rows)


def test_uncertainty_counts_are_raw_values(tmp_path):
    p = "CheXphoto-v1.1/train/natural/patient{:05d}/study1/view1_frontal.jpg"
    rows = [
        {"Path": p.format(1), "Edema": "1.0", "Cardiomegaly": "-1.0", "Fracture": "0.0"},
        {"Path": p.format(2), "Edema": "-1.0", "Cardiomegaly": "-1.0"},
        {"Path": p.format(3), "Edema": "0.0", "Cardiomegaly": "1.0", "Fracture": "0.0"},
        {"Path": p.format(4), "Edema": "", "Cardiomegaly": "0.0"},
    ]
    write_chexpert_csv(tmp_path / "train.csv", rows)
    counts = ed.uncertainty_counts(tmp_path / "train.csv")
    assert list(counts.index) == list(CHEXPERT_OBSERVATIONS)
    kinds = ["positive", "negative", "uncertain", "blank"]
    assert counts.loc["Edema", kinds].tolist() == [1, 1, 1, 1]
    assert counts.loc["Cardiomegaly", kinds].tolist() == [1, 1, 2, 0]
    assert counts.loc["Fracture", ["negative", "blank"]].tolist() == [2, 2]
    assert counts.loc["Pneumonia", "blank"] == 4
    assert (counts[kinds].sum(axis=1) == 4).all()
    assert counts.loc["Cardiomegaly", "frac_uncertain"] == pytest.approx(0.5)

    rows[2]["Edema"] = "maybe"
    write_chexpert_csv(tmp_path / "bad.csv", rows)
    with pytest.raises(DataError, match=r"bad\.csv: row 4, column 'Edema'"):
        ed.uncertainty_counts(tmp_path / "bad.csv")


def test_rendition_counts_per_group():
    table = pd.DataFrame({
        "fold": ["train", "train", "val", "test", "test", "test"],
        "csv": ["train", "train", "train", "valid", "valid", "valid"],
        "rendition": ["natural", "synthetic/digital", "natural", "natural",
                      "synthetic/digital", "synthetic/photographic"],
    })
    by_fold = ed.rendition_counts(table, "fold")
    assert list(by_fold.index) == ["train", "val", "test"]
    assert list(by_fold.columns) == ["natural", "synthetic/digital", "synthetic/photographic",
                                     "total"]
    assert by_fold.loc["test"].tolist() == [1, 1, 1, 3]
    assert by_fold.loc["train", "synthetic/photographic"] == 0
    assert ed.rendition_counts(table, "csv")["total"].to_dict() == {"train": 3, "valid": 3}


# ------------------------------------------------------------------------------ CLI on demo data

@pytest.fixture(scope="module")
def demo_root(tmp_path_factory) -> Path:
    from chexnet.datatools.demo import make_chexphoto_demo, make_nih_demo

    root = tmp_path_factory.mktemp("explore_demo")
    make_nih_demo(root / "nih", n_images=40, size=32, seed=0)
    make_chexphoto_demo(root / "photo", n_train=30, n_valid=15, size=32, seed=0)
    return root


def assert_pngs_valid(folder: Path) -> None:
    for png in folder.glob("*.png"):
        with Image.open(png) as img:
            img.verify()


@pytest.mark.slow
def test_cli_nih_demo_writes_expected_files(demo_root, tmp_path, capsys):
    out = tmp_path / "out"
    assert ed.main(["nih", "--data", str(demo_root / "nih"), "--out", str(out)]) == 0
    assert COMMON_FILES <= {p.name for p in out.iterdir()}
    assert f"wrote {len(COMMON_FILES)} files" in capsys.readouterr().out
    assert_pngs_valid(out)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["images"] == 40 and summary["images_present"] == 40
    assert summary["labels"].endswith("Data_Entry_2017.csv")
    assert sum(summary["folds"].values()) == 40
    # Counts agree with the Data_Entry file read independently.
    entry = pd.read_csv(demo_root / "nih" / "Data_Entry_2017.csv")
    labels = entry["Finding Labels"].str.split("|")
    bal = pd.read_csv(out / "class_balance.csv", index_col="finding")
    for f in NIH_FINDINGS:
        assert bal.loc[f, "n_all"] == sum(f in ls for ls in labels)
    assert bal.loc["No Finding", "n_all"] == (entry["Finding Labels"] == "No Finding").sum()
    assert bal[["n_train", "n_val", "n_test"]].sum(axis=1).equals(bal["n_all"])
    co = pd.read_csv(out / "cooccurrence_counts.csv", index_col=0)
    np.testing.assert_array_equal(np.diag(co), bal.loc[list(NIH_FINDINGS), "n_all"])
    demo = pd.read_csv(out / "demographics.csv")
    assert demo.loc[demo["variable"] == "sex", "all"].sum() == 40
    assert set(demo.loc[demo["variable"] == "view", "value"]) <= {"AP", "PA"}
    per_patient = pd.read_csv(out / "images_per_patient.csv", index_col=0)
    assert (per_patient.index * per_patient["all"]).sum() == 40


def test_cli_nih_missing_skip_counts_only_present_images(demo_root, tmp_path):
    data = tmp_path / "nih"
    (data / "images").mkdir(parents=True)
    (data / "Data_Entry_2017.csv").write_bytes((demo_root / "nih" / "Data_Entry_2017.csv")
                                               .read_bytes())
    images = sorted((demo_root / "nih" / "images").iterdir())[:25]
    for img in images:
        (data / "images" / img.name).write_bytes(img.read_bytes())
    explored = ed.nih_explore_table(data)
    kept = explored.frame
    assert len(kept) == explored.n_listed == 40 and explored.n_present == 25
    assert (kept["path"] != "").sum() == 25
    skipped = ed.nih_explore_table(data, missing="skip").frame
    assert sorted(skipped["image_id"]) == [p.name for p in images]
    # Folds are decided on the whole labels file first (as retrain.py does), then rows dropped.
    assert skipped.set_index("image_id")["fold"].equals(
        kept.set_index("image_id").loc[skipped["image_id"], "fold"])


@pytest.mark.slow
def test_cli_chexphoto_demo_writes_expected_files(demo_root, tmp_path):
    out = tmp_path / "out"
    assert ed.main(["chexphoto", "--data", str(demo_root / "photo"), "--out", str(out)]) == 0
    assert CHEXPHOTO_FILES <= {p.name for p in out.iterdir()}
    assert_pngs_valid(out)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["images"] == 45
    # Raw uncertain / blank cells, counted independently from the CSV text.
    raw = pd.read_csv(demo_root / "photo" / "CheXphoto-v1.1" / "train.csv", dtype=str,
                      keep_default_na=False)
    unc = pd.read_csv(out / "uncertainty.csv").set_index(["csv", "observation"])
    for obs in CHEXPERT_OBSERVATIONS:
        assert unc.loc[("train.csv", obs), "uncertain"] == (raw[obs] == "-1.0").sum()
        assert unc.loc[("train.csv", obs), "blank"] == (raw[obs] == "").sum()
    assert summary["uncertain_cells"]["train.csv"] == sum((raw[o] == "-1.0").sum()
                                                          for o in CHEXPERT_OBSERVATIONS)
    assert unc.xs("valid.csv")[["uncertain", "blank"]].to_numpy().sum() == 0
    rend = pd.read_csv(out / "renditions.csv", index_col="group")
    assert rend.loc["valid.csv", "total"] == 15
    assert rend.loc["valid.csv", ["natural", "synthetic/digital",
                                  "synthetic/photographic"]].tolist() == [5, 5, 5]
    assert rend.loc[["fold train", "fold val", "fold test"], "total"].sum() == 45
    bal = pd.read_csv(out / "class_balance.csv", index_col="finding")
    assert list(bal.index) == list(CHEXPERT_OBSERVATIONS)   # its own No Finding column
    assert bal.loc["Support Devices", "n_all"] == (
        (raw["Support Devices"] == "1.0").sum()
        + (pd.read_csv(demo_root / "photo" / "CheXphoto-v1.1" / "valid.csv")["Support Devices"]
           == 1).sum())


def test_cli_bad_input_exits_2_naming_the_file(tmp_path, capsys):
    missing = tmp_path / "nowhere"
    assert ed.main(["nih", "--data", str(missing), "--out", str(tmp_path / "o")]) == 2
    assert str(missing) in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert ed.main(["chexphoto", "--data", str(empty), "--out", str(tmp_path / "o")]) == 2
    assert str(empty) in capsys.readouterr().err
    (empty / "Data_Entry_2017.csv").write_text("Image Index,Finding Labels,Patient ID\n"
                                               "a.png,Flu,1\n")
    assert ed.main(["nih", "--data", str(empty), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "Data_Entry_2017.csv" in err and "Flu" in err


# ------------------------------------------------------------------------------ real NIH sample

@pytest.mark.slow
def test_real_nih_sample(tmp_path):
    images = shared("nih", "images")
    labels = shared("nih", "Data_Entry_2017_v2020.csv.gz")
    out = tmp_path / "out"
    assert ed.main(["nih", "--data", str(images.parent), "--labels", str(labels),
                    "--missing", "skip", "--out", str(out)]) == 0
    assert COMMON_FILES <= {p.name for p in out.iterdir()}
    summary = json.loads((out / "summary.json").read_text())
    assert summary["images"] == 120 and summary["images_listed"] == 112_120
    assert summary["images_present"] == 120 and summary["patients"] == 120
    entry = pd.read_csv(labels, usecols=["Image Index", "Finding Labels", "Patient Gender"],
                        index_col="Image Index")
    present = entry.loc[sorted(p.name for p in images.glob("*.png"))]
    bal = pd.read_csv(out / "class_balance.csv", index_col="finding")
    for f in ("Effusion", "Infiltration", "Atelectasis"):
        assert bal.loc[f, "n_all"] == present["Finding Labels"].str.split("|").map(
            lambda ls, f=f: f in ls).sum()
    demo = pd.read_csv(out / "demographics.csv")
    sex = demo[demo["variable"] == "sex"].set_index("value")["all"]
    assert sex.to_dict() == present["Patient Gender"].value_counts().to_dict()
    with Image.open(out / "samples.png") as img:
        assert math.prod(img.size) > 100_000
