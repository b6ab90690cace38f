"""Folds are patient-disjoint; the committed nih_labels.csv carries reproduce-chexnet's split
(arnoweng/CheXNet's lists) and is what make_nih_labels.py makes; every --split is checked."""
from __future__ import annotations

import gzip

import numpy as np
import pandas as pd
import pytest

import make_nih_labels
from conftest import ROOT, shared
from chexnet.data import DataError, apply_split, nih_table, patient_split, read_nih_labels
from chexnet.labels import NIH_FINDINGS


def test_patient_split_is_disjoint_and_proportional():
    rng = np.random.default_rng(1)
    patients = rng.integers(0, 3000, size=12000)
    folds = patient_split(patients, seed=0)
    frame = pd.DataFrame({"p": patients, "f": folds})
    assert frame.groupby("p")["f"].nunique().max() == 1
    share = frame["f"].value_counts(normalize=True)
    assert share["train"] == pytest.approx(0.7, abs=0.02)
    assert share["val"] == pytest.approx(0.1, abs=0.02)
    assert share["test"] == pytest.approx(0.2, abs=0.02)


def test_patient_split_is_seeded_and_order_free():
    patients = np.repeat(np.arange(500), 3)
    a = patient_split(patients, seed=3)
    np.testing.assert_array_equal(a, patient_split(patients, seed=3))
    assert (a != patient_split(patients, seed=4)).any()
    order = np.random.default_rng(0).permutation(len(patients))
    np.testing.assert_array_equal(a[order], patient_split(patients[order], seed=3))


# --------------------------------------------------------------------------------------------
# The committed file: the reference split
# --------------------------------------------------------------------------------------------
def committed() -> pd.DataFrame:
    return pd.read_csv(ROOT / "nih_labels.csv")


def test_committed_nih_labels_is_complete_and_patient_disjoint():
    table = committed()
    assert len(table) == 112_120
    assert table["Image Index"].is_unique
    assert list(table.columns) == ["Image Index", "Follow-up #", "Patient ID", "Patient Age",
                                   "Patient Gender", "View Position", *NIH_FINDINGS, "fold"]
    assert table.groupby("Patient ID")["fold"].nunique().max() == 1
    assert table[list(NIH_FINDINGS)].isin([0, 1]).all().all()
    # reproduce-chexnet's fold sizes (datasets.md): 78,468 / 11,219 / 22,433.
    assert table["fold"].value_counts().to_dict() == {"train": 78_468, "val": 11_219,
                                                      "test": 22_433}


def test_committed_test_fold_is_the_reference_predictions_image_set():
    preds = pd.read_csv(shared("reference", "reproduce_chexnet_pretrained_preds.csv"),
                        usecols=["Image Index"])
    table = committed()
    assert set(table.loc[table["fold"] == "test", "Image Index"]) == set(preds["Image Index"])
    assert len(preds) == 22_433 and preds["Image Index"].is_unique


def _preds_written_for_the_test_fold(tmp_path) -> pd.DataFrame:
    """preds.csv as retrain.py writes it for the reference test fold, given in the order a
    run evaluates it (the labels file's)."""
    from chexnet.config import TrainConfig
    from chexnet.runs import write_preds_csv

    ids = committed().query("fold == 'test'")["Image Index"].tolist()
    rng = np.random.default_rng(0)
    probs, targets = rng.random((len(ids), 14)), rng.integers(0, 2, (len(ids), 14))
    cfg = TrainConfig(dataset="nih")
    write_preds_csv(tmp_path / "preds.csv", cfg, NIH_FINDINGS, ids, probs, targets)
    written = pd.read_csv(tmp_path / "preds.csv")
    row = ids.index("00000020_000.png")  # after 00000020_001.png in the labels file
    assert written.set_index("Image Index").loc["00000020_000.png", "prob_Hernia"] == \
        pytest.approx(probs[row, 13], abs=1e-15)
    return written


def test_preds_csv_lists_the_test_fold_sorted_by_name(tmp_path):
    ids = _preds_written_for_the_test_fold(tmp_path)["Image Index"].tolist()
    assert ids[:3] == ["00000010_000.png", "00000015_000.png", "00000020_000.png"]
    assert all(a < b for a, b in zip(ids, ids[1:]))  # strictly increasing: sorted, no repeats


def test_preds_csv_rows_are_in_the_reference_preds_order(tmp_path):
    reference = pd.read_csv(shared("reference", "reproduce_chexnet_pretrained_preds.csv"),
                            usecols=["Image Index"])
    written = _preds_written_for_the_test_fold(tmp_path)
    assert written["Image Index"].tolist() == reference["Image Index"].tolist()


@pytest.mark.parametrize("fold", ["train", "val", "test"])
def test_committed_folds_are_arnowengs_lists(fold):
    path = shared("reference", f"arnoweng_chexnet_{fold}_list.txt.gz")
    with gzip.open(path, "rt") as fh:
        listed = {line.split()[0] for line in fh if line.strip()}
    table = committed()
    assert set(table.loc[table["fold"] == fold, "Image Index"]) == listed


@pytest.mark.slow
def test_committed_nih_labels_regenerates_from_data_entry_and_lists(tmp_path, capsys):
    out = tmp_path / "nih_labels.csv"
    assert make_nih_labels.main(["--data-entry", str(shared("nih", "Data_Entry_2017_v2020.csv.gz")),
                                 "--lists", str(shared("reference")), "--out", str(out)]) == 0
    assert out.read_bytes() == (ROOT / "nih_labels.csv").read_bytes()
    assert "train 78468 images" in capsys.readouterr().out


def test_labels_are_the_2020_labels():
    entry = pd.read_csv(shared("nih", "Data_Entry_2017_v2020.csv.gz"),
                        usecols=["Image Index", "Finding Labels"]).set_index("Image Index")
    table = committed().set_index("Image Index")
    for f in NIH_FINDINGS:  # a second, naive parse of Finding Labels
        expected = entry["Finding Labels"].map(lambda s, f=f: int(f in s.split("|")))
        assert (table[f] == expected.loc[table.index]).all(), f


def test_random_split_still_available_and_patient_disjoint(tmp_path):
    out = tmp_path / "random.csv"
    assert make_nih_labels.main(["--data-entry", str(ROOT / "nih_labels.csv"), "--split",
                                 "random", "--seed", "0", "--out", str(out)]) == 0
    table = pd.read_csv(out)
    assert table.groupby("Patient ID")["fold"].nunique().max() == 1
    share = table["fold"].value_counts(normalize=True)
    assert share["train"] == pytest.approx(0.7, abs=0.005)
    # Not the reference: a fresh patient split puts most reference test images in training.
    ref = committed()
    moved = (table["fold"] == "train") & (ref["fold"] == "test")
    assert moved.sum() > 10_000


# --------------------------------------------------------------------------------------------
# apply_split on generated tables: every split patient-disjoint, refusals named
# --------------------------------------------------------------------------------------------
def generated_labels(tmp_path, n_patients=300, fold=False):
    """A nih_labels-style file of NIH-style names (several images per patient)."""
    rng = np.random.default_rng(5)
    rows = []
    for p in range(1, n_patients + 1):
        for k in range(int(rng.integers(1, 5))):
            rows.append({"Image Index": f"{p:08d}_{k:03d}.png", "Patient ID": p})
    table = pd.DataFrame(rows)
    for f in NIH_FINDINGS:
        table[f] = rng.integers(0, 2, len(table))
    if fold:
        table["fold"] = np.where(table["Patient ID"] % 5 == 0, "test", "train")
    path = tmp_path / "labels.csv"
    table.to_csv(path, index=False)
    return path, table


def test_official_split_follows_the_lists_and_is_patient_disjoint(tmp_path, capsys):
    path, table = generated_labels(tmp_path)
    test_patients = table["Patient ID"] > 250
    (tmp_path / "test_list.txt").write_text("\n".join(table.loc[test_patients, "Image Index"]))
    train_val = table.loc[~test_patients, "Image Index"].tolist()
    (tmp_path / "train_val_list.txt").write_text("\n".join(train_val[:-3]))  # 3 unlisted
    out = apply_split(read_nih_labels(path), "official", lists=tmp_path).frame
    assert len(out) == len(table) - 3 and "leaving out 3" in capsys.readouterr().out
    assert set(out.loc[out["fold"] == "test", "image_id"]) == set(
        table.loc[test_patients, "Image Index"])
    assert out.groupby("patient")["fold"].nunique().max() == 1
    assert (out.loc[out["fold"] != "test", "fold"] == "val").mean() == pytest.approx(0.125,
                                                                                     abs=0.04)
    (tmp_path / "test_list.txt").write_text("\n".join(train_val[:1]))
    with pytest.raises(DataError, match="both"):
        apply_split(read_nih_labels(path), "official", lists=tmp_path)


def test_reference_split_from_lists_and_its_refusals(tmp_path):
    path, table = generated_labels(tmp_path)
    lists = tmp_path / "lists"
    lists.mkdir()
    fold_of = {p: ("train", "val", "test")[p % 3] for p in table["Patient ID"]}
    for fold in ("train", "val", "test"):
        ids = table.loc[table["Patient ID"].map(fold_of) == fold, "Image Index"]
        with gzip.open(lists / f"x_{fold}_list.txt.gz", "wt") as fh:
            fh.write("".join(f"{i} 0 1 0 0 0 0 0 0 0 0 0 0 0 0\n" for i in ids))
    out = apply_split(read_nih_labels(path), "reference", lists=lists).frame
    assert list(out["fold"]) == [fold_of[p] for p in table["Patient ID"]]
    with pytest.raises(DataError, match="not in the reference split"):
        labelled = read_nih_labels(path)
        renamed = labelled.frame.assign(image_id=lambda t: t["image_id"] + "x")
        apply_split(labelled.replace(frame=renamed), "reference", lists=lists)


def test_a_patient_in_two_folds_of_a_labels_file_is_refused(tmp_path):
    path, table = generated_labels(tmp_path, fold=True)
    counts = table["Patient ID"].value_counts()
    patient = int(counts[counts >= 2].index[0])
    rows = table.index[table["Patient ID"] == patient]
    table.loc[rows[0], "fold"], table.loc[rows[1], "fold"] = "train", "test"
    table.to_csv(path, index=False)
    with pytest.raises(DataError, match=f"patient {patient} has images in folds"):
        apply_split(read_nih_labels(path), "file")


def test_file_split_needs_a_fold_column(tmp_path):
    path, _ = generated_labels(tmp_path)
    with pytest.raises(DataError, match="no 'fold' column"):
        apply_split(read_nih_labels(path), "file")


def test_nih_table_default_split_is_recorded(tmp_path):
    """No fold column: NIH gets the reference split, the demo a random one; a file whose folds
    are the reference's is recorded as 'reference', other folds as 'file'."""
    from PIL import Image

    ref = committed().set_index("Image Index")["fold"]
    path, table = generated_labels(tmp_path, n_patients=40)
    table = table[table["Image Index"].isin(ref.index)]  # NIH names only
    table.to_csv(path, index=False)
    (tmp_path / "images").mkdir()
    for name in table["Image Index"]:
        Image.new("L", (8, 8)).save(tmp_path / "images" / name)
    nih, _ = nih_table(tmp_path, path, missing="skip")
    assert nih.split == "reference"
    assert (nih.frame["fold"] == nih.frame["image_id"].map(ref)).all()
    assert nih.sources == (str(path),)
    demo, _ = nih_table(tmp_path, path, missing="skip", dataset="demo")
    assert demo.split == "random"
    with pytest.raises(DataError, match="demo"):
        nih_table(tmp_path, path, split="reference", dataset="demo")
    # A labels file carrying the reference folds is recognised as such...
    table["fold"] = table["Image Index"].map(ref)
    table.to_csv(path, index=False)
    assert nih_table(tmp_path, path, missing="skip")[0].split == "reference"
    # ...and one with other folds is its own.
    table["fold"] = np.where(table["Patient ID"] % 2 == 0, "train", "test")
    table.to_csv(path, index=False)
    own, _ = nih_table(tmp_path, path, missing="skip")
    assert own.split == "file" and set(own.frame["fold"]) == {"train", "test"}
