"""Folds are patient-disjoint, seeded, and the committed nih_labels.csv is what the script makes."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from conftest import ROOT, shared
from cxr_dataset import patient_split
from labels import NIH_FINDINGS


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


def test_committed_nih_labels_is_complete_and_patient_disjoint():
    table = pd.read_csv(ROOT / "nih_labels.csv")
    assert len(table) == 112_120
    assert table["Image Index"].is_unique
    assert list(table.columns) == ["Image Index", "Patient ID", *NIH_FINDINGS, "fold"]
    assert set(table["fold"]) == {"train", "val", "test"}
    assert table.groupby("Patient ID")["fold"].nunique().max() == 1
    assert table[list(NIH_FINDINGS)].isin([0, 1]).all().all()
    share = table["fold"].value_counts(normalize=True)
    assert share["train"] == pytest.approx(0.7, abs=0.005)
    assert share["test"] == pytest.approx(0.2, abs=0.005)


def test_committed_nih_labels_regenerates_from_data_entry():
    from make_nih_labels import make_nih_labels

    made = make_nih_labels(shared("nih", "Data_Entry_2017_v2020.csv.gz"), seed=0)
    committed = pd.read_csv(ROOT / "nih_labels.csv")
    made["Patient ID"] = made["Patient ID"].astype(int)
    pd.testing.assert_frame_equal(made.reset_index(drop=True), committed)
