"""Label parsing for both schemas, every uncertainty policy, and the CheXphoto filters."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from chexnet.data import (
    DataError, chexpert_targets, chexphoto_table, read_chexpert_csv, read_nih_labels,
)
from chexnet.labels import CHEXPERT_OBSERVATIONS, CHEXPHOTO_FINDINGS, NIH_FINDINGS

DATA_ENTRY_HEADER = ("Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,"
                     "Patient Gender,View Position,OriginalImage[Width,Height],"
                     "OriginalImagePixelSpacing[x,y]")


def write_data_entry(path, rows):
    lines = [DATA_ENTRY_HEADER] + [f"{img},{labels},0,{pid},50,M,PA,1024,1024,0.143,0.143"
                                   for img, labels, pid in rows]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_data_entry_parses_pipes_and_no_finding(tmp_path):
    path = write_data_entry(tmp_path / "Data_Entry_2017.csv", [
        ("00000001_000.png", "Cardiomegaly|Emphysema", 1),
        ("00000001_001.png", "No Finding", 1),
        ("00000002_000.png", "Hernia|Atelectasis|Pleural_Thickening", 2),
    ])
    table = read_nih_labels(path).frame
    assert list(table["image_id"]) == ["00000001_000.png", "00000001_001.png", "00000002_000.png"]
    labels = table[list(NIH_FINDINGS)].to_numpy()
    expected = np.zeros((3, 14))
    expected[0, [NIH_FINDINGS.index("Cardiomegaly"), NIH_FINDINGS.index("Emphysema")]] = 1
    row2 = ("Hernia", "Atelectasis", "Pleural_Thickening")
    expected[2, [NIH_FINDINGS.index(f) for f in row2]] = 1
    np.testing.assert_array_equal(labels, expected)
    assert list(table["patient"]) == ["1", "1", "2"]
    # One patient, one fold.
    assert table.loc[0, "fold"] == table.loc[1, "fold"]


def test_data_entry_unknown_finding_names_row(tmp_path):
    path = write_data_entry(tmp_path / "d.csv", [("a.png", "Cardiomegaly", 1),
                                                  ("b.png", "Cardiomegally", 2)])
    with pytest.raises(DataError, match=r"row 3.*'Cardiomegally'"):
        read_nih_labels(path)


def test_nih_labels_style_with_fold(tmp_path):
    df = pd.DataFrame({"Image Index": ["a.png", "b.png"], "Patient ID": [7, 8]})
    for f in NIH_FINDINGS:
        df[f] = [1, 0] if f == "Mass" else [0, 0]
    df["fold"] = ["train", "test"]
    df.to_csv(tmp_path / "nih_labels.csv", index=False)
    table = read_nih_labels(tmp_path / "nih_labels.csv").frame
    assert list(table["fold"]) == ["train", "test"]
    assert list(table["Mass"]) == [1.0, 0.0]
    df.loc[1, "Edema"] = 2
    df.to_csv(tmp_path / "bad.csv", index=False)
    with pytest.raises(DataError, match=r"row 3, column 'Edema'"):
        read_nih_labels(tmp_path / "bad.csv")


def test_nih_labels_missing_columns_named(tmp_path):
    pd.DataFrame({"Image Index": ["a.png"], "Atelectasis": [1]}).to_csv(tmp_path / "x.csv",
                                                                      index=False)
    with pytest.raises(DataError, match="Cardiomegaly"):
        read_nih_labels(tmp_path / "x.csv")


@pytest.mark.parametrize("policy, uncertain, blank", [
    ("zeros", 0.0, 0.0), ("ones", 1.0, 0.0), ("ignore", math.nan, math.nan)])
def test_uncertainty_policies(policy, uncertain, blank):
    values = pd.DataFrame({"A": [1.0, 0.0, -1.0, np.nan]})
    got = chexpert_targets(values, policy)[:, 0]
    np.testing.assert_array_equal(got, np.array([1.0, 0.0, uncertain, blank], dtype=np.float32))


def test_unknown_policy_rejected():
    with pytest.raises(ValueError, match="uncertainty policy"):
        chexpert_targets(pd.DataFrame({"A": [1.0]}), "maybe")


def chexpert_csv(path, rows):
    """rows: (Path, Frontal/Lateral, {finding: value})"""
    records = []
    for p, view, vals in rows:
        rec = {"Path": p, "Sex": "Male", "Age": 60, "Frontal/Lateral": view,
               "AP/PA": "AP" if view == "Frontal" else ""}
        rec.update({o: vals.get(o, np.nan) for o in CHEXPERT_OBSERVATIONS})
        records.append(rec)
    pd.DataFrame(records).to_csv(path, index=False)
    return path


def test_chexpert_csv_filters_and_paths(tmp_path):
    path = chexpert_csv(tmp_path / "valid.csv", [
        ("CheXphoto-v1.1/valid/natural/patient00001/study1/view1_frontal.jpg", "Frontal",
         {"Cardiomegaly": 1.0, "Edema": -1.0}),
        ("CheXphoto-test-v1.0/valid/synthetic/digital/patient00002/study1/view1_frontal.jpg",
         "Frontal", {"Pneumonia": 0.0}),
        ("CheXphoto-v1.1/valid/synthetic/photographic/patient00002/study1/view2_lateral.jpg",
         "Lateral", {"Fracture": 1.0}),
    ])
    table = read_chexpert_csv(path, "ones", view="all")
    assert list(table.columns[4:]) == list(CHEXPHOTO_FINDINGS)
    # The first component (which differs between copies) is dropped.
    assert table["rel_path"][1] == "valid/synthetic/digital/patient00002/study1/view1_frontal.jpg"
    assert list(table["patient"]) == ["patient00001", "patient00002", "patient00002"]
    assert list(table["rendition"]) == ["natural", "synthetic/digital", "synthetic/photographic"]
    assert table["Cardiomegaly"][0] == 1 and table["Edema"][0] == 1  # U-Ones
    assert len(read_chexpert_csv(path, view="frontal")) == 2
    assert len(read_chexpert_csv(path, view="lateral")) == 1
    assert len(read_chexpert_csv(path, source="natural", view="all")) == 1
    assert len(read_chexpert_csv(path, source="synthetic", view="all")) == 2
    assert len(read_chexpert_csv(path, source="digital", view="all")) == 1


def test_chexpert_bad_value_and_missing_column(tmp_path):
    path = chexpert_csv(tmp_path / "valid.csv", [
        ("X/valid/natural/patient00001/study1/view1_frontal.jpg", "Frontal", {"Edema": 2.0})])
    with pytest.raises(DataError, match=r"row 2, column 'Edema'"):
        read_chexpert_csv(path)
    pd.read_csv(path).drop(columns=["Edema"]).to_csv(path, index=False)
    with pytest.raises(DataError, match="Edema"):
        read_chexpert_csv(path)


def test_chexphoto_only_valid_is_split_by_patient(tmp_path):
    root = tmp_path / "CheXphoto-v1.1"
    root.mkdir()
    rows = []
    for p in range(60):
        for rendition in ("natural", "synthetic/digital", "synthetic/photographic"):
            rows.append((f"CheXphoto-v1.1/valid/{rendition}/patient{p:05d}/study1/view1_frontal.jpg",
                         "Frontal", {"Edema": float(p % 2)}))
    chexpert_csv(root / "valid.csv", rows)
    table = chexphoto_table(tmp_path).frame  # the parent folder is accepted too
    assert set(table["fold"]) == {"train", "val", "test"}
    assert table.groupby("patient")["fold"].nunique().max() == 1
    assert table["path"][0].startswith(str(root / "valid"))
    share = table["fold"].value_counts(normalize=True)
    assert abs(share["train"] - 0.7) < 0.1 and abs(share["test"] - 0.2) < 0.1


def test_chexphoto_train_csv_gives_patient_val_and_valid_test(tmp_path):
    rows = [(f"CheXphoto-v1.1/train/natural/patient{p:05d}/study1/view1_frontal.jpg", "Frontal",
             {"Edema": -1.0}) for p in range(50)]
    chexpert_csv(tmp_path / "train.csv", rows)
    chexpert_csv(tmp_path / "valid.csv", [
        ("CheXphoto-v1.1/valid/natural/patient64541/study1/view1_frontal.jpg", "Frontal",
         {"Edema": 1.0})])
    table = chexphoto_table(tmp_path, policy="ignore").frame
    assert (table.loc[table["patient"] == "patient64541", "fold"] == "test").all()
    assert set(table["fold"]) == {"train", "val", "test"}
    assert table.loc[table["fold"] != "test", "Edema"].isna().all()  # uncertain masked


def test_an_empty_labels_file_is_named_not_a_traceback(tmp_path, capsys):
    import retrain

    empty = tmp_path / "labels.csv"
    empty.write_text("")
    with pytest.raises(DataError, match="labels.csv: the file is empty"):
        read_nih_labels(empty)
    (tmp_path / "images").mkdir()
    code = retrain.main(["--dataset", "demo", "--data", str(tmp_path), "--labels", str(empty),
                         "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and f"{empty}: the file is empty" in err and "Traceback" not in err


def test_ids_with_trailing_spaces_are_stripped_and_reported(tmp_path, capsys):
    path = tmp_path / "nih_labels.csv"
    rows = ["Image Index,Patient ID," + ",".join(NIH_FINDINGS) + ",fold",
            "00000001_000.png ,1," + ",".join("0" * 14) + ",train",
            "00000002_000.png,2," + ",".join("0" * 14) + ",test"]
    path.write_text("\n".join(rows) + "\n")
    table = read_nih_labels(path).frame
    assert list(table["image_id"]) == ["00000001_000.png", "00000002_000.png"]
    out = capsys.readouterr().out
    assert "1 image ids had leading or trailing spaces, removed" in out
    assert "'00000001_000.png ' -> '00000001_000.png'" in out


def test_missing_images_are_shown_quoted(tmp_path):
    from chexnet.data import attach_paths

    table = pd.DataFrame({"image_id": ["a.png", "b .png"]})
    with pytest.raises(DataError, match=r"first: 'a.png', 'b .png'"):
        attach_paths(table, {}, "labels.csv")


def test_one_rule_resolves_an_nih_labels_file(tmp_path):
    """retrain.py, the cache, explore_data.py and cross_eval.py all ask resolve_nih_labels."""
    from chexnet.data import DEFAULT_NIH_LABELS, DataError, resolve_nih_labels

    assert resolve_nih_labels(tmp_path) == DEFAULT_NIH_LABELS            # nothing in DATA
    (tmp_path / "Data_Entry_2017_v2020.csv.gz").write_bytes(b"")
    assert resolve_nih_labels(tmp_path) == tmp_path / "Data_Entry_2017_v2020.csv.gz"
    # NIH training wants the reference folds: NIH's own file has none, the committed one has.
    assert resolve_nih_labels(tmp_path, reference_split=True) == DEFAULT_NIH_LABELS
    (tmp_path / "Data_Entry_2017.csv").write_bytes(b"")
    assert resolve_nih_labels(tmp_path) == tmp_path / "Data_Entry_2017.csv"   # .csv first
    (tmp_path / "nih_labels.csv").write_bytes(b"")                  # what prepare_data.py writes
    assert resolve_nih_labels(tmp_path) == tmp_path / "nih_labels.csv"
    assert resolve_nih_labels(tmp_path, reference_split=True) == tmp_path / "nih_labels.csv"
    given = tmp_path / "Data_Entry_2017.csv"
    assert resolve_nih_labels(tmp_path, str(given), reference_split=True) == given
    with pytest.raises(DataError, match="nope.csv: labels file not found"):
        resolve_nih_labels(tmp_path, tmp_path / "nope.csv")
