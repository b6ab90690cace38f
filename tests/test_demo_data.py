"""Tests for demo_data.py: real file schemas, determinism, signatures, label model, learnability."""
from __future__ import annotations

import csv
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from chexnet.datatools import corruptions
from chexnet.datatools import demo as dd
from chexnet.labels import (
    CHEXPERT_META_COLS, CHEXPERT_OBSERVATIONS, NIH_BBOX_ALIASES, NIH_FINDINGS, NIH_NO_FINDING,
)

SIZE = 64
N_NIH = 60


def _nih_labels(df: pd.DataFrame) -> np.ndarray:
    """(N, 14) bool matrix from the Finding Labels column."""
    return np.array([[f in s.split("|") for f in NIH_FINDINGS] for s in df["Finding Labels"]])


@pytest.fixture(scope="module")
def nih(tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("nih")
    return root, dd.make_nih_demo(root, n_images=N_NIH, size=SIZE, seed=0)


@pytest.fixture(scope="module")
def chexphoto(tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("chexphoto")
    return root, dd.make_chexphoto_demo(root, n_train=60, n_valid=30, size=SIZE, seed=0)


# ------------------------------------------------------------------------------------ NIH schema
def test_nih_data_entry_schema(nih):
    root, summary = nih
    text = (root / "Data_Entry_2017.csv").read_text().splitlines()
    assert text[0] == ("Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,"
                       "Patient Gender,View Position,OriginalImage[Width,Height],"
                       "OriginalImagePixelSpacing[x,y]")
    rows = list(csv.reader(text[1:]))
    assert len(rows) == N_NIH == summary["n_images"]
    assert all(len(r) == 11 for r in rows)
    df = pd.read_csv(root / "Data_Entry_2017.csv")
    assert df.shape == (N_NIH, 11)
    for _, r in df.iterrows():
        m = re.fullmatch(r"(\d{8})_(\d{3})\.png", r["Image Index"])
        assert m and int(m.group(1)) == r["Patient ID"] and int(m.group(2)) == r["Follow-up #"]
        labels = r["Finding Labels"].split("|")
        if labels != [NIH_NO_FINDING]:
            # |-joined in NIH_FINDINGS order, no duplicates, no "No Finding" mixed in
            assert labels == [f for f in NIH_FINDINGS if f in labels]
        assert r["Patient Gender"] in ("M", "F") and r["View Position"] in ("PA", "AP")
    assert df["Image Index"].is_unique


def test_nih_images_exist_and_are_grey(nih):
    root, _ = nih
    df = pd.read_csv(root / "Data_Entry_2017.csv")
    for name in df["Image Index"]:
        with Image.open(root / "images" / name) as im:
            assert im.mode == "L" and im.size == (SIZE, SIZE)


def test_nih_bbox_schema_and_bounds(nih):
    root, summary = nih
    text = (root / "BBox_List_2017.csv").read_text().splitlines()
    assert text[0] == "Image Index,Finding Label,Bbox [x,y,w,h],,,"
    rows = list(csv.reader(text[1:]))
    assert len(rows) == summary["n_boxes"] > 0
    assert all(len(r) == 9 and r[6:] == ["", "", ""] for r in rows)  # 6 values + 3 empty fields
    bb = pd.read_csv(root / "BBox_List_2017.csv")
    assert bb.shape[1] == 9 and bb.iloc[:, 6:].isna().all().all()
    assert "Infiltration" not in set(bb["Finding Label"])  # the real file spells it Infiltrate
    names = bb["Finding Label"].replace(NIH_BBOX_ALIASES)
    assert set(names) <= set(NIH_FINDINGS)
    x, y, w, h = (bb.iloc[:, k].to_numpy(float) for k in range(2, 6))
    assert (x >= 0).all() and (y >= 0).all() and (w >= 1).all() and (h >= 1).all()
    assert (x + w <= SIZE).all() and (y + h <= SIZE).all()
    # Every box belongs to a finding of its image, and every finding of an image has a box.
    df = pd.read_csv(root / "Data_Entry_2017.csv").set_index("Image Index")
    boxed = set(zip(bb["Image Index"], names))
    for img, f in boxed:
        assert f in df.loc[img, "Finding Labels"].split("|")
    for img, labels in df["Finding Labels"].items():
        for f in labels.split("|"):
            if f != NIH_NO_FINDING:
                assert (img, f) in boxed


def test_nih_patients_have_follow_ups_sharing_anatomy(nih):
    root, summary = nih
    df = pd.read_csv(root / "Data_Entry_2017.csv")
    per_patient = df.groupby("Patient ID").size()
    assert summary["n_patients"] == len(per_patient)
    assert per_patient.max() >= 2 and per_patient.max() <= 5
    assert N_NIH / 4 <= len(per_patient) <= N_NIH / 1.6  # about n / 2.5 patients
    for _, g in df.groupby("Patient ID"):  # follow-ups numbered 0..k-1
        assert sorted(g["Follow-up #"]) == list(range(len(g)))
    # Follow-ups of one patient look more alike (shared anatomy) than images of different patients.
    imgs = np.stack([np.asarray(Image.open(root / "images" / n), np.float32).ravel()
                     for n in df["Image Index"]])
    corr = np.corrcoef(imgs)
    same = df["Patient ID"].to_numpy()[:, None] == df["Patient ID"].to_numpy()[None, :]
    off_diag = ~np.eye(len(df), dtype=bool)
    assert corr[same & off_diag].mean() > corr[~same].mean() + 0.01


def test_nih_deterministic_and_worker_independent(tmp_path):
    def files(root: Path) -> dict[str, bytes]:
        return {str(p.relative_to(root)): p.read_bytes()
                for p in sorted(root.rglob("*")) if p.is_file()}

    a = files(Path(dd.make_nih_demo(tmp_path / "a", 12, SIZE, seed=5)["paths"]["root"]))
    b = files(Path(dd.make_nih_demo(tmp_path / "b", 12, SIZE, seed=5, workers=2)["paths"]["root"]))
    c = files(Path(dd.make_nih_demo(tmp_path / "c", 12, SIZE, seed=6)["paths"]["root"]))
    assert a == b
    assert a.keys() != c.keys() or any(a[k] != c[k] for k in a)
    shared_images = [k for k in a if k.endswith(".png") and k in c]
    assert any(a[k] != c[k] for k in shared_images)


# ------------------------------------------------------------------------- phantom and signatures
@pytest.mark.parametrize("finding", dd.ALL_SIGNATURES)
def test_signature_changes_its_box(finding):
    # Same seed with and without the finding: same phantom, so the difference is the signature.
    for seed in (0, 1):
        plain, none = dd.render_phantom(np.random.default_rng(seed), [], size=SIZE)
        img, boxes = dd.render_phantom(np.random.default_rng(seed), [finding], size=SIZE)
        assert none == [] and plain.shape == img.shape == (SIZE, SIZE) and img.dtype == np.uint8
        assert boxes and all(b[0] == finding for b in boxes)
        diff = np.abs(img.astype(np.float32) - plain)
        inside = np.zeros(diff.shape, bool)
        for _, x, y, w, h in boxes:
            assert 0 <= x and 0 <= y and w >= 1 and h >= 1 and x + w <= SIZE and y + h <= SIZE
            inside[y:y + h, x:x + w] = True
            assert diff[y:y + h, x:x + w].mean() > 5.0  # each box covers a visible change
        assert diff[inside].mean() > 4 * diff[~inside].mean()  # and the change is in the boxes


def test_render_phantom_is_pure_and_sized():
    a = dd.render_phantom(np.random.default_rng(3), ["Mass", "Effusion"], size=48)
    b = dd.render_phantom(np.random.default_rng(3), ["Effusion", "Mass"], size=48)
    assert np.array_equal(a[0], b[0]) and a[1] == b[1] and a[0].shape == (48, 48)
    with pytest.raises(ValueError, match="unknown findings"):
        dd.render_phantom(np.random.default_rng(0), ["Covid"])


def test_cardiomegaly_raises_the_cardiothoracic_ratio():
    # Measure heart width / thoracic width on an unposed canvas, before and after the pre-hook.
    for seed in range(5):
        anat = dd.sample_anatomy(np.random.default_rng(seed))
        ratios = []
        for enlarged in (False, True):
            cv = dd._Canvas(256, (0.0, 0.0), 1.0, 0.0)
            g = dd._layout(anat)
            if enlarged:
                dd._pre_cardiomegaly(g, np.random.default_rng(seed))
            g["heart"]["y"] = 0.6
            _, _, w, _ = cv.bbox(dd._heart_mask(cv, g["heart"]))
            ratios.append(w / 256 / g["thorax"])
        assert 0.36 < ratios[0] < 0.48 and ratios[1] > 0.55, ratios


# ------------------------------------------------------------------------------------ label model
def test_label_model_prevalence_and_cooccurrence():
    rng = np.random.default_rng(0)
    counts = dd._follow_up_counts(rng, 20000)
    assert sum(counts) == 20000 and set(counts) <= {1, 2, 3, 4, 5}
    patient = np.repeat(np.arange(len(counts)), counts)
    y = dd.sample_findings(rng, patient)
    prev = y.mean(0)
    assert ((prev > 0.05) & (prev < 0.2)).all()
    assert prev.argmin() == NIH_FINDINGS.index("Hernia")
    assert 0.3 < (~y.any(1)).mean() < 0.5  # about 40% No Finding
    corr = np.corrcoef(y.T.astype(float))
    i = NIH_FINDINGS.index
    for a, b in [("Effusion", "Cardiomegaly"), ("Pneumonia", "Consolidation"), ("Mass", "Nodule"),
                 ("Emphysema", "Pneumothorax"), ("Effusion", "Edema")]:
        assert corr[i(a), i(b)] > 0.1, (a, b)
    # Chronic findings persist across follow-ups far above their base rate.
    same = patient[1:] == patient[:-1]
    for f in ("Cardiomegaly", "Emphysema", "Fibrosis"):
        k = i(f)
        assert y[1:, k][same][y[:-1, k][same]].mean() > 4 * prev[k]


# ------------------------------------------------------------------------------ CheXphoto schema
def test_chexphoto_schema_and_values(chexphoto):
    root, summary = chexphoto
    header = ",".join(CHEXPERT_META_COLS + CHEXPERT_OBSERVATIONS)
    for split, allowed in (("train", {"1.0", "0.0", "-1.0", ""}), ("valid", {"1.0", "0.0"})):
        path = root / "CheXphoto-v1.1" / f"{split}.csv"
        lines = path.read_text().splitlines()
        assert lines[0] == header
        rows = list(csv.reader(lines[1:]))
        assert len(rows) == summary[f"n_{split}"] and all(len(r) == 19 for r in rows)
        values = {v for r in rows for v in r[5:]}
        assert values <= allowed
        if split == "train":
            assert {"1.0", "-1.0", ""} <= values  # uncertain and not-mentioned both occur
        df = pd.read_csv(path)
        assert list(df.columns) == list(CHEXPERT_META_COLS + CHEXPERT_OBSERVATIONS)
        for p, fl, appa in zip(df["Path"], df["Frontal/Lateral"], df["AP/PA"]):
            m = re.fullmatch(rf"CheXphoto-v1\.1/{split}/(natural|synthetic/digital|"
                             r"synthetic/photographic)/patient(\d{5})/study(\d+)/"
                             r"view(1_frontal|2_lateral)\.jpg", p)
            assert m, p
            pid = int(m.group(2))
            assert (pid >= 64541) == (split == "valid")
            assert (fl == "Lateral") == (m.group(4) == "2_lateral")
            assert (appa in ("AP", "PA")) if fl == "Frontal" else pd.isna(appa)
            with Image.open(root / p) as im:
                assert im.format == "JPEG" and im.size == (SIZE, SIZE)
        assert (df["Frontal/Lateral"] == "Frontal").mean() > 0.6


def test_chexphoto_valid_renditions_share_patient_and_labels(chexphoto):
    root, summary = chexphoto
    df = pd.read_csv(root / "CheXphoto-v1.1" / "valid.csv")
    parts = df["Path"].str.extract(r"valid/(natural|synthetic/\w+)/(patient\d+/study\d+/\w+\.jpg)")
    df["rendition"], df["xray"] = parts[0], parts[1]
    groups = df.groupby("xray")
    assert len(groups) == summary["n_valid_xrays"] == 10
    for _, g in groups:
        assert set(g["rendition"]) == set(dd.RENDITIONS)
        cols = ["Sex", "Age", "Frontal/Lateral"] + list(CHEXPERT_OBSERVATIONS)
        assert (g[cols].nunique(dropna=False) == 1).all()
    # ...and the renditions really look different from each other.
    g = next(iter(groups))[1]
    ims = [np.asarray(Image.open(root / p).convert("L"), np.float32) for p in g["Path"]]
    assert np.abs(ims[0] - ims[1]).mean() > 5 and np.abs(ims[1] - ims[2]).mean() > 3


# Which photo primitives of chexnet/datatools/corruptions.py each rendition chains (named in its
# docstring).
RENDITION_PRIMITIVES = {
    "natural": {"brightness_contrast", "perspective", "glare", "blur", "noise", "colour_cast"},
    "synthetic/digital": {"moire", "pixel_grid", "noise", "colour_cast"},
    "synthetic/photographic": {"gamma", "brightness_contrast", "blur", "noise", "colour_cast"},
}


def _record_primitive_calls(monkeypatch) -> list[str]:
    """Wrap every photo primitive of chexnet.datatools.corruptions so that calls are recorded
    by name."""
    calls: list[str] = []
    names = set().union(*RENDITION_PRIMITIVES.values())
    for name in names:
        original = getattr(corruptions, name)

        def recorder(*args, _name=name, _original=original, **kwargs):
            calls.append(_name)
            return _original(*args, **kwargs)

        monkeypatch.setattr(corruptions, name, recorder)
    return calls


def test_renditions_are_drawn_with_the_shared_corruption_primitives(monkeypatch, tmp_path):
    # The photo effects are written once, in chexnet/datatools/corruptions.py: a rendition drawn
    # with a private copy of one would not call it.
    calls = _record_primitive_calls(monkeypatch)
    xray, _ = dd.render_phantom(np.random.default_rng(0), ["Mass"], size=SIZE)
    for rendition, expected in RENDITION_PRIMITIVES.items():
        calls.clear()
        out = dd.render_rendition(xray, rendition, np.random.default_rng(1))
        assert out.shape == (SIZE, SIZE, 3) and out.dtype == np.uint8
        assert set(calls) == expected, rendition
    # ... and the demo writer goes through render_rendition: 1 valid X-ray in all 3 renditions.
    calls.clear()
    dd.make_chexphoto_demo(tmp_path, n_train=0, n_valid=3, size=SIZE, seed=0)
    assert set(calls) == set().union(*RENDITION_PRIMITIVES.values())
    assert calls.count("moire") == calls.count("gamma") == calls.count("perspective") // 2 == 1


def test_chexphoto_deterministic_and_worker_independent(tmp_path):
    def files(root: Path) -> dict[str, bytes]:
        return {str(p.relative_to(root)): p.read_bytes()
                for p in sorted(root.rglob("*")) if p.is_file()}

    # A torch op in this process first: forked workers must still run the (torch) primitives.
    corruptions.blur(np.zeros((SIZE, SIZE)), 2.0)
    a, b, c = (files(Path(dd.make_chexphoto_demo(tmp_path / name, 12, 6, SIZE, seed=seed,
                                                 workers=workers)["paths"]["root"]))
               for name, seed, workers in (("a", 5, 1), ("b", 5, 2), ("c", 6, 1)))
    assert len(a) == 2 + 12 + 6 and a == b
    shared_images = [k for k in a if k.endswith(".jpg") and k in c]
    assert shared_images and any(a[k] != c[k] for k in shared_images)


def test_chexpert_observation_mapping():
    obs = dd.chexpert_observations(["Mass", "Infiltration", "Effusion", "Support_Device"])
    assert obs["Lung Lesion"] and obs["Lung Opacity"] and obs["Pleural Effusion"]
    assert obs["Support Devices"] and not obs["No Finding"] and not obs["Cardiomegaly"]
    assert dd.chexpert_observations(["Widened_Mediastinum"])["Enlarged Cardiomediastinum"]
    assert dd.chexpert_observations(["Rib_Fracture"])["Fracture"]
    assert dd.chexpert_observations(["Pleural_Thickening"])["Pleural Other"]
    assert dd.chexpert_observations([])["No Finding"]
    # CheXpert's labeler: devices alone are still "No Finding".
    assert dd.chexpert_observations(["Support_Device"])["No Finding"]


def test_cli_writes_both(tmp_path, capsys):
    out = dd.generate(["--out", str(tmp_path), "--kind", "both", "--n-images", "8",
                       "--n-train", "6", "--n-valid", "6", "--png-size", "32", "--seed", "1"])
    assert (tmp_path / "nih" / "Data_Entry_2017.csv").exists()
    assert (tmp_path / "chexphoto" / "CheXphoto-v1.1" / "valid.csv").exists()
    assert out["nih"]["n_images"] == 8 and out["chexphoto"]["n_valid"] == 6
    assert "prevalence" in capsys.readouterr().out


# --------------------------------------------------------------------------- learnability proxy
def _features(x: np.ndarray) -> np.ndarray:
    """(N, 64, 64) images -> 16x16 mean-pooled pixels plus std/max/min of 8x8 blocks."""
    n = len(x)
    pooled = x.reshape(n, 16, 4, 16, 4).mean((2, 4)).reshape(n, -1)
    blocks = x.reshape(n, 8, 8, 8, 8)
    stats = [blocks.std((2, 4)), blocks.max((2, 4)), blocks.min((2, 4))]
    return np.concatenate([pooled] + [s.reshape(n, -1) for s in stats], 1)


@pytest.mark.slow
def test_each_finding_is_learnable_by_a_linear_proxy(tmp_path):
    # A cheap stand-in for "a CNN can learn it": logistic regression on coarse pixels + block
    # statistics, 600 train / ~200 held-out images split by patient. Every finding passes.
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.preprocessing import StandardScaler

    summary = dd.make_nih_demo(tmp_path, n_images=800, size=SIZE, seed=11)
    df = pd.read_csv(summary["paths"]["data_entry"])
    y = _nih_labels(df)
    assert y.any(0).all()  # every finding appears
    x = np.stack([np.asarray(Image.open(tmp_path / "images" / n), np.float32)
                  for n in df["Image Index"]])
    feats = _features(x)
    train = np.arange(len(df)) < 600
    # Keep the split patient-level: drop held-out images of the patient straddling the cut.
    train_patients = set(df["Patient ID"][train])
    test = ~train & ~df["Patient ID"].isin(train_patients).to_numpy()
    scaler = StandardScaler().fit(feats[train])
    ftr, fte = scaler.transform(feats[train]), scaler.transform(feats[test])
    aucs = {}
    for k, f in enumerate(NIH_FINDINGS):
        model = LogisticRegression(C=0.05, max_iter=1000).fit(ftr, y[train, k])
        aucs[f] = roc_auc_score(y[test, k], model.decision_function(fte))
    assert all(a > 0.6 for a in aucs.values()), aucs
    assert np.mean(list(aucs.values())) > 0.8, aucs


# ------------------------------------------------------------------------------ injected effect
def test_underdiagnosis_injection_is_off_by_default_and_touches_only_one_sexs_labels(tmp_path):
    clean = dd.make_nih_demo(tmp_path / "a", n_images=300, size=16, seed=3)
    default = dd.make_nih_demo(tmp_path / "b", n_images=300, size=16, seed=3, underdiagnose=None)
    injected = dd.make_nih_demo(tmp_path / "c", n_images=300, size=16, seed=3,
                                underdiagnose=("F", 0.6))
    entry = {k: (tmp_path / k / "Data_Entry_2017.csv").read_text() for k in "abc"}
    assert entry["a"] == entry["b"] and clean["removed_labels"] == default["removed_labels"] == 0
    a, c = (pd.read_csv(tmp_path / k / "Data_Entry_2017.csv") for k in "ac")
    assert a.drop(columns="Finding Labels").equals(c.drop(columns="Finding Labels"))
    shown, written = _nih_labels(a), _nih_labels(c)
    women = (a["Patient Gender"] == "F").to_numpy()
    assert (written[~women] == shown[~women]).all()          # men's labels untouched
    assert not (written & ~shown).any()                     # only removals
    removed = (shown & ~written).sum()
    assert removed == injected["removed_labels"]
    assert removed / shown[women].sum() == pytest.approx(0.6, abs=0.08)
    for name in a["Image Index"][:20]:                      # the images still show them
        assert (tmp_path / "a" / "images" / name).read_bytes() == \
            (tmp_path / "c" / "images" / name).read_bytes()
    assert (tmp_path / "a" / "BBox_List_2017.csv").read_text() == \
        (tmp_path / "c" / "BBox_List_2017.csv").read_text()
    with pytest.raises(ValueError, match="expected sex 'M' or 'F'"):
        dd.make_nih_demo(tmp_path / "d", n_images=10, size=16, underdiagnose=("X", 0.5))


def test_underdiagnose_cli_flag(tmp_path, capsys):
    dd.main(["--out", str(tmp_path), "--kind", "nih", "--n-images", "40", "--png-size", "16",
             "--underdiagnose", "F:1"])
    out = capsys.readouterr().out
    entry = pd.read_csv(tmp_path / "nih" / "Data_Entry_2017.csv")
    women = entry[entry["Patient Gender"] == "F"]
    # every positive label of a woman's image removed
    assert len(women) and (women["Finding Labels"] == NIH_NO_FINDING).all()
    assert "injected under-diagnosis" in out
    with pytest.raises(SystemExit):
        dd.main(["--out", str(tmp_path), "--underdiagnose", "F:2"])
