"""Rule 4 (issue 19): every output of a run can be re-derived from `checkpoint.pt`, the data and
the run's `config.json` alone.

One tiny run is trained (retrain.py), then scored by eval_model.py (--calibration --by sex) and
drawn by visualize_prediction.py (a CAM gallery). Each file they write is recomputed here
outside the training code path: the folds from the documented patient split, the images with
PIL and numpy as reproduce-chexnet preprocesses them, the network as a plain torchvision
DenseNet-121 holding checkpoint.pt's weights, the AUCs with sklearn, the temperatures, the
F1 threshold and the CAMs by hand. Nothing here calls train.evaluate, fit or the functions
that write these files; expected values never come from the code under test.
"""
from __future__ import annotations

import contextlib
import io
import json
import math
from fractions import Fraction
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torchvision
from matplotlib.figure import Figure
from PIL import Image
from sklearn.metrics import roc_auc_score
from torch import nn
from torch.nn import functional as F

import eval_model
import retrain
import visualize_prediction
from conftest import nih_demo

# Trains a network and runs three command lines: `pytest -m "not slow"` leaves this out.
pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]

# Written out here rather than imported, so that a changed constant in the library shows.
FINDINGS = ["Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule",
            "Pneumonia", "Pneumothorax", "Consolidation", "Edema", "Emphysema", "Fibrosis",
            "Pleural_Thickening", "Hernia"]
PROBS = [f"prob_{f}" for f in FINDINGS]
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)   # ImageNet, as torchvision's weights
FOLD_SHARES = (("train", 0.7), ("val", 0.1), ("test", 0.2))  # README: 70/10/20 by patient
# 64 px, so that the last feature map is 2 x 2 and the upsampling of a CAM is not a constant.
# lr 0.05: epoch 2 overshoots (val loss ~1.2 against ~0.35), so the best epoch (1) is not the
# last, and "the last weights" and "the best checkpoint" predict differently.
RUN_FLAGS = ["--image-size", "64", "--batch-size", "8", "--eval-batch-size", "16", "--weights",
             "none", "--workers", "0", "--epochs", "2", "--lr", "0.05"]
GALLERY_TOP = 4
N_BOOT = 20  # eval_model's bootstrap: its intervals are not checked here, only point values


# --------------------------------------------------------------------------------------------
# The run, and everything that is re-derived from checkpoint.pt + data + config.json
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """retrain.py on a 96-image demo, then eval_model.py --calibration --by sex on its preds.csv
    (the AUC table of that goes to eval/, so that retrain.py's aucs.csv is kept)."""
    data = nih_demo(tmp_path_factory, n_images=96, size=48, seed=0)
    out = tmp_path_factory.mktemp("runs")
    assert retrain.main(["--dataset", "demo", "--data", str(data), "--out", str(out), "--name",
                         "tiny", *RUN_FLAGS]) == 0
    run_dir = out / "tiny"
    (run_dir / "eval").mkdir()
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert eval_model.main(["--preds", str(run_dir / "preds.csv"), "--out",
                                str(run_dir / "eval" / "aucs.csv"), "--no-published",
                                "--calibration", "--by", "sex", "--n-boot", str(N_BOOT)]) == 0
    (run_dir / "eval" / "stdout.txt").write_text(printed.getvalue())
    return run_dir


def naive_folds(entries: pd.DataFrame, seed: int) -> pd.Series:
    """The demo's folds from chexnet.data.patient_split's documented rule, by hand: patients (ids
    as text, sorted) shuffled by numpy's default_rng(seed).permutation, then taken in that order;
    a patient goes to the fold in which the middle of its images falls on the cumulative share
    of images (70/10/20). Image id -> fold."""
    patients = entries["Patient ID"].astype(str)
    counts = patients.value_counts().to_dict()
    names = sorted(counts)
    order = np.random.default_rng(seed).permutation(len(names))
    total, done, fold_of = len(patients), 0, {}
    for i in order:
        p = names[i]
        middle = (done + counts[p] / 2) / total
        done += counts[p]
        edge, fold_of[p] = 0.0, FOLD_SHARES[-1][0]
        for fold, share in FOLD_SHARES:
            edge += share
            if middle < edge:
                fold_of[p] = fold
                break
    return pd.Series(patients.map(fold_of).to_numpy(), index=entries["Image Index"].to_numpy())


def naive_input(path: Path, size: int) -> torch.Tensor:
    """reproduce-chexnet's preprocessing by hand: the PNG read as RGB, the shorter side resized
    to `size` (PIL bilinear, which antialiases), centre-cropped, / 255, minus the ImageNet mean,
    divided by its std, all in float32. (3, S, S). The demo's images are square, so the crop
    is the whole image."""
    img = Image.open(path).convert("RGB")
    assert img.size[0] == img.size[1], "the demo's images are square"
    img = img.resize((size, size), Image.BILINEAR)
    x = np.asarray(img, dtype=np.float32) / np.float32(255)
    x = (x - np.asarray(MEAN, np.float32)) / np.asarray(STD, np.float32)
    return torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)))


def naive_gray(path: Path, size: int) -> np.ndarray:
    """The image as the model saw it, one grey channel: (S, S) uint8."""
    return np.asarray(Image.open(path).convert("L").resize((size, size), Image.BILINEAR))


class Derived:
    """What checkpoint.pt, the data and config.json say each output must hold."""

    def __init__(self, run_dir: Path):
        self.run_dir = run_dir
        self.config = json.loads((run_dir / "config.json").read_text())
        cfg = self.config
        # The assumptions under which the labels file and the folds are found as below.
        assert cfg["dataset"] == "demo" and cfg["labels"] is None and cfg["split"] == "random"
        assert cfg["findings"] == FINDINGS and cfg["amp"] == "off"
        self.data = Path(cfg["data"])
        assert not (self.data / "nih_labels.csv").exists()
        entries = pd.read_csv(self.data / "Data_Entry_2017.csv")
        self.entries = entries.set_index("Image Index")
        self.labels = pd.DataFrame(
            [[float(f in str(s).split("|")) for f in FINDINGS] for s in entries["Finding Labels"]],
            index=entries["Image Index"], columns=FINDINGS)
        folds = naive_folds(entries, cfg["seed"])
        # In the labels file's row order, as the label table keeps it.
        self.ids = {f: [i for i in entries["Image Index"] if folds[i] == f]
                    for f, _ in FOLD_SHARES}
        self.checkpoint = torch.load(run_dir / "checkpoint.pt", map_location="cpu",
                                     weights_only=True)
        self.net = self.network(self.checkpoint["model"])
        self.size, self.batch = cfg["image_size"], cfg["eval_batch_size"]

    def network(self, state: dict) -> nn.Module:
        net = torchvision.models.densenet121(weights=None)
        net.classifier = nn.Linear(1024, len(FINDINGS))
        net.load_state_dict(state)
        return net.eval()

    def inputs(self, ids: list[str]) -> torch.Tensor:
        return torch.stack([naive_input(self.data / "images" / i, self.size) for i in ids])

    def logits(self, fold: str, net: nn.Module | None = None) -> list[torch.Tensor]:
        """Logits of the fold's images, per batch of config.json's eval_batch_size in fold
        order. In evaluation mode BatchNorm makes each image's output independent of its
        batch-mates, but convolution kernels block their sums by batch size, so the last bit
        can depend on it: the same batches as the run's give bit-equal outputs."""
        ids, net = self.ids[fold], net or self.net
        with torch.no_grad():
            return [net(self.inputs(ids[i:i + self.batch]))
                    for i in range(0, len(ids), self.batch)]

    def probs(self, fold: str, net: nn.Module | None = None) -> np.ndarray:
        return torch.sigmoid(torch.cat(self.logits(fold, net))).numpy()


@pytest.fixture(scope="module")
def derived(run) -> Derived:
    return Derived(run)


def text_table(path: Path) -> pd.DataFrame:
    """A CSV's cells exactly as written."""
    return pd.read_csv(path, dtype=str, keep_default_na=False)


def assert_preds_file(path: Path, derived: Derived, fold: str, probs: np.ndarray) -> None:
    """`path` holds the fold's images sorted by name (reproduce-chexnet's order), our float32
    probabilities (`probs`: in label-file order) written in float32's shortest round-trip
    form (as pandas writes a float32 column), and the labels."""
    got = text_table(path)
    assert list(got.columns) == ["Image Index", *PROBS, *FINDINGS]
    assert got["Image Index"].tolist() == sorted(derived.ids[fold])
    want_probs = dict(zip(derived.ids[fold], probs.astype(np.float32).astype(str)))
    for r, image in enumerate(sorted(derived.ids[fold])):
        assert got.loc[r, PROBS].tolist() == want_probs[image].tolist(), (path.name, image)
        assert got.loc[r, FINDINGS].tolist() == [str(v) for v in derived.labels.loc[image]], image


# --------------------------------------------------------------------------------------------
# retrain.py: preds.csv, val_preds.csv, log_train.csv, aucs.csv
# --------------------------------------------------------------------------------------------
def test_the_naive_preprocessing_is_the_documented_one(derived):
    """Our reimplementation of the input equals chexnet.data.build_transform bit for bit (the
    library's documented claim), on every test image: so any mismatch below is the run's."""
    from chexnet.data import build_transform, load_xray

    transform = build_transform(derived.size)
    for i in derived.ids["test"]:
        path = derived.data / "images" / i
        assert torch.equal(transform(load_xray(path)), naive_input(path, derived.size)), i


def test_preds_csv_is_the_best_checkpoint_on_the_test_fold(derived):
    """preds.csv, row by row and digit for digit: checkpoint.pt's probabilities of the test fold
    (the documented split of the recorded seed) on unflipped images, then the ground truth."""
    assert_preds_file(derived.run_dir / "preds.csv", derived, "test", derived.probs("test"))


def test_val_preds_csv_is_the_best_checkpoint_on_the_validation_fold(derived):
    """val_preds.csv (written by retrain.py; eval_model.py's thresholds and temperatures read
    it), row by row: checkpoint.pt on the validation fold, never the test fold's images."""
    assert set(derived.ids["val"]).isdisjoint(derived.ids["test"])
    assert_preds_file(derived.run_dir / "val_preds.csv", derived, "val", derived.probs("val"))


def test_the_best_and_the_last_weights_predict_differently(derived):
    """Not vacuous: the best epoch is not the last, and last.pt's weights give other
    probabilities, so predictions from the last epoch would fail the two tests above."""
    last = torch.load(derived.run_dir / "last.pt", map_location="cpu", weights_only=True)
    assert derived.checkpoint["epoch"] < last["epoch"]
    other = derived.probs("test", derived.network(last["model"]))
    assert np.abs(other - derived.probs("test")).max() > 1e-3


def test_log_val_loss_of_the_best_epoch_is_the_checkpoints(derived):
    """log_train.csv: the best epoch is the one of lowest val_loss, checkpoint.pt is that epoch,
    and its val_loss is the masked BCE of checkpoint.pt over the validation fold, recomputed:
    per batch the float32 sum of torch's elementwise BCE-with-logits over the labelled entries,
    summed in float64 and divided by the number of labelled entries (the same arithmetic as the
    run's, hence exact)."""
    log = pd.read_csv(derived.run_dir / "log_train.csv")
    assert list(log.columns) == ["epoch", "train_loss", "val_loss", "lr", "seconds"]
    assert log["epoch"].tolist() == list(range(1, len(log) + 1))
    best = int(log.loc[log["val_loss"].idxmin(), "epoch"])
    assert derived.checkpoint["epoch"] == best
    # Row-major, as the run's collated batches are: pandas hands out a column-major array, and
    # torch then lays the elementwise loss out column-major too and sums it in another order
    # (one float32 ulp of the batch sum apart, measured).
    targets = torch.from_numpy(np.ascontiguousarray(
        derived.labels.loc[derived.ids["val"]].to_numpy(np.float32)))
    total, count, start = 0.0, 0, 0
    for logits in derived.logits("val"):
        t = targets[start:start + len(logits)]
        start += len(logits)
        labelled = ~torch.isnan(t)
        loss = F.binary_cross_entropy_with_logits(logits, torch.where(labelled, t, 0.0),
                                                  reduction="none")
        total += float((loss * labelled).sum())
        count += int(labelled.sum())
    want = total / count
    assert float(log.loc[log["epoch"] == best, "val_loss"].iloc[0]) == want
    assert derived.checkpoint["val_loss"] == want
    # Not vacuous: another epoch's logged loss is far from it.
    assert (log.loc[log["epoch"] != best, "val_loss"] - want).abs().min() > 0.1


def naive_auc_table(y_true: np.ndarray, y_score: np.ndarray) -> list[tuple[str, float]]:
    """(label, AUC) per finding with sklearn (NaN when one class), then the mean over those
    defined."""
    rows = []
    for k, f in enumerate(FINDINGS):
        t = y_true[:, k]
        auc = float(roc_auc_score(t, y_score[:, k])) if 0 < t.sum() < len(t) else math.nan
        rows.append((f, auc))
    defined = [a for _, a in rows if not math.isnan(a)]
    return rows + [("mean", sum(defined) / len(defined))]


@pytest.mark.parametrize("where", ["aucs.csv", "eval/aucs.csv"])
def test_aucs_csv_is_sklearn_on_preds_csv_and_the_labels(derived, where):
    """aucs.csv (retrain.py's, and eval_model.py's re-scoring of preds.csv): sklearn's AUC of
    preds.csv's probabilities against the labels file, per finding, and their mean.

    The per-finding AUCs are exact: an AUC depends only on the order of the scores, which
    the CSV's shortest round-trip digits keep. The mean may be summed in another order
    (numpy's nanmean sums 14 values with NaN as 0, pairwise): 14 values in [0, 1] summed in any
    order differ by at most 13 * 14 * 2**-53 < 2.1e-14, and by 1.5e-15 after dividing by 8 or
    more; 1e-14 is allowed."""
    preds = pd.read_csv(derived.run_dir / "preds.csv")
    y_true = derived.labels.loc[preds["Image Index"]].to_numpy()
    want = naive_auc_table(y_true, preds[PROBS].to_numpy(np.float64))
    got = pd.read_csv(derived.run_dir / where)
    assert list(got.columns) == ["label", "auc"]  # the demo: no published columns
    assert got["label"].tolist() == [label for label, _ in want]
    for (label, auc), value in zip(want[:-1], got["auc"].iloc[:-1]):
        assert (math.isnan(auc) and math.isnan(value)) or value == auc, label
    assert got["auc"].iloc[-1] == pytest.approx(want[-1][1], abs=1e-14, rel=0)
    assert sum(not math.isnan(a) for _, a in want) >= 5  # not vacuous: most AUCs are defined


# --------------------------------------------------------------------------------------------
# eval_model.py --calibration: temperatures fitted on val_preds.csv, applied to preds.csv
# --------------------------------------------------------------------------------------------
def naive_temperature(t: np.ndarray, p: np.ndarray) -> float:
    """The T in [0.01, 100] minimising the mean log loss of sigmoid(logit(p) / T), found our
    own way: that loss is convex in b = 1 / T, with derivative mean(z (sigmoid(b z) - t)),
    z = logit(p), increasing in b; bisection on it to float64 precision. NaN for one class."""
    if not 0 < t.sum() < len(t):
        return math.nan
    z = np.log(p) - np.log1p(-p)

    def slope(b: float) -> float:
        return float(np.mean(z * (1 / (1 + np.exp(-b * z)) - t)))

    lo, hi = 0.01, 100.0
    if slope(lo) >= 0:
        return 1 / lo
    if slope(hi) <= 0:
        return 1 / hi
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if slope(mid) < 0 else (lo, mid)
    return 2 / (lo + hi)


def test_preds_calibrated_is_the_validation_temperature_on_the_test_rows(derived):
    """preds_calibrated.csv (eval_model.py --calibration): preds.csv's test rows, ids and labels
    unchanged, each probability column sigmoid(logit(p) / T) with T fitted on val_preds.csv's
    column (never the test fold's), and left as it is where validation has one class.

    Tolerance: eval_model finds T with scipy's bounded Brent, which stops once its bracket on
    log T is within 4 * (sqrt(eps) * |log T| + 1e-6 / 3) ~ 1.6e-6 of the minimum; we find it by
    bisection to float64 precision. A change d of log T moves q = sigmoid(z / T) by
    q (1 - q) |z / T| d <= |z / T| d / 4, so each value is allowed |z / T| * 4e-6 / 4 (2.5x the
    bracket) plus 1e-15 for float64 rounding."""
    test = pd.read_csv(derived.run_dir / "preds.csv")
    val = pd.read_csv(derived.run_dir / "val_preds.csv")
    got = pd.read_csv(derived.run_dir / "preds_calibrated.csv")
    assert list(got.columns) == list(test.columns)
    assert got["Image Index"].tolist() == test["Image Index"].tolist() == derived.ids["test"]
    assert (got[FINDINGS].to_numpy() == test[FINDINGS].to_numpy()).all()
    v_true = derived.labels.loc[val["Image Index"]].to_numpy()
    t_true = derived.labels.loc[test["Image Index"]].to_numpy()
    fitted, distinct = 0, 0
    for k, f in enumerate(FINDINGS):
        p, q = test[PROBS[k]].to_numpy(), got[PROBS[k]].to_numpy()
        temp = naive_temperature(v_true[:, k], val[PROBS[k]].to_numpy())
        if math.isnan(temp):
            assert (q == p).all(), f
            continue
        fitted += 1
        z = np.log(p) - np.log1p(-p)
        want = 1 / (1 + np.exp(-z / temp))
        tol = np.abs(z / temp) * 1e-6 + 1e-15
        np.testing.assert_array_less(np.abs(q - want), tol, err_msg=f)
        # A temperature fitted on the test fold instead would be seen.
        on_test = naive_temperature(t_true[:, k], p)
        if not math.isnan(on_test):
            distinct += bool((np.abs(1 / (1 + np.exp(-z / on_test)) - want) > 10 * tol).any())
    assert fitted >= 3 and distinct >= 1


# --------------------------------------------------------------------------------------------
# eval_model.py --by sex: subgroup AUCs of the test fold, the under-diagnosis threshold from val
# --------------------------------------------------------------------------------------------
def no_finding_score(preds: pd.DataFrame) -> np.ndarray:
    """1 - the highest finding probability (the model has no No Finding output)."""
    return 1.0 - preds[PROBS].to_numpy(np.float64).max(axis=1)


def naive_f1_threshold(normal: np.ndarray, score: np.ndarray) -> float:
    """The score threshold (call normal when score >= it) of highest F1 for No Finding, the
    lowest on ties, over every distinct score; F1 = 2 TP / (2 TP + FP + FN) in exact fractions."""
    best, best_f1 = math.nan, Fraction(-1)
    for c in np.unique(score):
        called = score >= c
        tp = int((called & normal).sum())
        fp, fn = int((called & ~normal).sum()), int((~called & normal).sum())
        f1 = Fraction(2 * tp, 2 * tp + fp + fn)
        if f1 > best_f1:
            best, best_f1 = float(c), f1
    return best


def test_underdiagnosis_uses_the_validation_threshold_on_the_test_fold(derived, run):
    """underdiagnosis.csv (--by): among the TEST images with a finding, those whose No Finding
    score reaches the F1-maximising threshold chosen on the VALIDATION predictions, counted per
    sex and overall; the threshold printed is that one (4 decimals, as printed)."""
    val = pd.read_csv(run / "val_preds.csv")
    test = pd.read_csv(run / "preds.csv")
    v_normal = derived.labels.loc[val["Image Index"]].to_numpy().sum(axis=1) == 0
    t_abnormal = derived.labels.loc[test["Image Index"]].to_numpy().sum(axis=1) > 0
    assert 0 < v_normal.sum() < len(v_normal)
    threshold = naive_f1_threshold(v_normal, no_finding_score(val))
    called = no_finding_score(test) >= threshold
    sex = derived.entries.loc[test["Image Index"], "Patient Gender"].to_numpy()
    got = pd.read_csv(run / "eval" / "underdiagnosis.csv")
    rows = [("all", "all", np.ones(len(test), bool))]
    rows += [("sex", s, sex == s) for s in sorted(set(sex))]
    assert list(zip(got["attribute"], got["group"])) == [(a, g) for a, g, _ in rows]
    for (attr, group, member), (_, row) in zip(rows, got.iterrows()):
        n = int((member & t_abnormal).sum())
        k = int((member & t_abnormal & called).sum())
        assert (row["with_finding"], row["underdiagnosed"]) == (n, k), (attr, group)
        assert row["rate"] == pytest.approx(k / n, abs=1e-15, rel=0), (attr, group)
    printed = (run / "eval" / "stdout.txt").read_text()
    assert f"(score >= {threshold:.4f}, the F1-maximising threshold on val_preds.csv" in printed
    # Not vacuous: the test fold's own F1 threshold is another number.
    on_test = naive_f1_threshold(~t_abnormal, no_finding_score(test))
    assert f"{on_test:.4f}" != f"{threshold:.4f}"


def test_subgroup_aucs_are_sklearn_on_the_test_rows_of_each_group(derived, run):
    """subgroups.csv (--by sex): per sex and finding, the number of test images and positives,
    and sklearn's AUC of the group and of the rest of the test fold (NaN for one class).

    eval_model counts Mann-Whitney pairs by weighted cumulative sums, sklearn integrates the
    ROC curve: the same rational number (denominator <= 20 * 20 here), reached by different
    sequences of fewer than a thousand float64 operations on values <= 1: 1e-12 is allowed."""
    test = pd.read_csv(run / "preds.csv")
    y_true = derived.labels.loc[test["Image Index"]].to_numpy()
    y_score = test[PROBS].to_numpy(np.float64)
    sex = derived.entries.loc[test["Image Index"], "Patient Gender"].to_numpy()
    got = pd.read_csv(run / "eval" / "subgroups.csv")
    got = got[got["finding"] != "mean"].set_index(["group", "finding"])

    def auc(rows, k):
        t = y_true[rows, k]
        return roc_auc_score(t, y_score[rows, k]) if 0 < t.sum() < len(t) else math.nan

    checked = 0
    for s in sorted(set(sex)):
        member = sex == s
        for k, f in enumerate(FINDINGS):
            row = got.loc[(s, f)]
            assert (row["n"], row["positives"]) == (member.sum(), y_true[member, k].sum())
            for column, want in (("auc", auc(member, k)), ("rest_auc", auc(~member, k))):
                if math.isnan(want):
                    assert math.isnan(row[column]), (s, f, column)
                else:
                    assert row[column] == pytest.approx(want, abs=1e-12, rel=0), (s, f, column)
                    checked += 1
    assert checked >= 5


# --------------------------------------------------------------------------------------------
# visualize_prediction.py --run: the CAM gallery
# --------------------------------------------------------------------------------------------
def bilinear_matrix(n_out: int, n_in: int) -> np.ndarray:
    """(n_out, n_in) weights of 1-D bilinear upsampling with half-pixel centres (PyTorch's
    align_corners=False): output i samples input x = (i + 0.5) n_in / n_out - 0.5, clamped."""
    u = np.zeros((n_out, n_in))
    for i in range(n_out):
        x = max((i + 0.5) * n_in / n_out - 0.5, 0.0)
        i0 = min(int(math.floor(x)), n_in - 1)
        i1 = min(i0 + 1, n_in - 1)
        u[i, i0] += 1 - (x - i0)
        u[i, i1] += x - i0
    return u


def test_gallery_heatmaps_are_the_cams_of_the_checkpoint(derived, tmp_path, monkeypatch):
    """visualize_prediction.py --run --label L (the gallery report.py embeds too): its tiles are
    preds.csv's top true-or-predicted positives of L by probability, each drawn as the image the
    model saw and, over it, the CAM of L documented in chexnet/analysis/cam.py: the last dense
    block's
    maps after the final norm and ReLU, weighted by L's classifier row, bilinearly upsampled.

    The figure's arrays are taken as savefig writes it. Our CAM is in float64; the drawn one
    was contracted over C = 1024 channels in float32, whose error is at most 1024 * 2**-24 *
    sum_c |w_c F_c| per cell (recursive summation bound), kept by the upsampling (a convex
    combination), plus a few float32 roundings of the result: that much is allowed."""
    preds = pd.read_csv(derived.run_dir / "preds.csv")
    truth = derived.labels.loc[preds["Image Index"]]
    label = max(FINDINGS, key=lambda f: (truth[f].sum(), -FINDINGS.index(f)))
    k = FINDINGS.index(label)
    prob = preds[PROBS[k]].to_numpy()
    candidate = (truth[label].to_numpy() == 1) | (prob >= 0.5)
    order = sorted(np.flatnonzero(candidate), key=lambda r: (-prob[r], r))[:GALLERY_TOP]
    ids = preds["Image Index"].iloc[order].tolist()
    assert len(ids) >= 2

    drawn = []
    real_savefig = Figure.savefig

    def spy(fig, *args, **kw):
        drawn.append([(ax.get_title(), [np.asarray(im.get_array()) for im in ax.get_images()])
                      for ax in fig.axes])
        return real_savefig(fig, *args, **kw)

    monkeypatch.setattr(Figure, "savefig", spy)
    out = tmp_path / "gallery.png"
    assert visualize_prediction.main(["--run", str(derived.run_dir), "--label", label, "--top",
                                      str(GALLERY_TOP), "--out", str(out)]) == 0
    assert out.is_file() and len(drawn) == 1
    tiles = drawn[0]
    assert len(tiles) == len(ids)

    x = derived.inputs(ids)
    with torch.no_grad():
        maps = F.relu(derived.net.features(x)).double()                      # (B, C, h, w)
    w = derived.net.classifier.weight.detach().double()[k]                  # (C,)
    terms = w[None, :, None, None] * maps
    cams, bound = terms.sum(1).numpy(), terms.abs().sum(1).numpy()         # (B, h, w)
    size = derived.size
    up = bilinear_matrix(size, cams.shape[-1])
    assert cams.shape[-1] >= 2  # a 1 x 1 map would make the upsampling untestable
    for (title, images), image_id, cam, b, r in zip(tiles, ids, cams, bound, order):
        assert title.split("\n")[0] == f"{image_id}: p = {prob[r]:.3f}"
        gray, heat = images
        assert np.array_equal(gray, naive_gray(derived.data / "images" / image_id, size))
        want = up @ cam @ up.T
        tol = 1024 * 2.0 ** -24 * b.max() + 8 * 2.0 ** -24 * np.abs(cam).max()
        assert heat.shape == (size, size)
        assert np.abs(heat - want).max() <= tol, image_id
        assert np.ptp(want) > 100 * tol  # not vacuous: the map varies across the image
