"""What the unit tests of each piece cannot see: that fit() and the command lines wire the pieces
together as documented. Each test here was written against a named deliberate bug (a mutation)
that the rest of the suite let through; the bug is named in the test's docstring.
"""
from __future__ import annotations

import errno
import math

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.metrics import roc_auc_score

import eval_model
from chexnet import train as training
from chexnet.loaders import load_tables
from chexnet.model import build_model
from chexnet.runs import SaveError, atomic_torch_save, save_text
import retrain
from conftest import nih_demo
from chexnet.data import build_transform, load_xray
from chexnet.labels import CHEXPHOTO_FINDINGS, NIH_FINDINGS

# Trains networks or runs subprocesses: `pytest -m "not slow"` leaves these out.
# One torch thread in this process (conftest.py one_thread: 2 shared cores).
pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]

FAST = ["--image-size", "32", "--batch-size", "8", "--eval-batch-size", "16", "--weights",
        "none", "--workers", "0"]


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory):
    return nih_demo(tmp_path_factory, n_images=64, size=48, seed=0)


def scripted_val_losses(monkeypatch, losses):
    """fit() sees these per-epoch validation losses; the real evaluation still runs."""
    real = training.evaluate

    def evaluate(model, loader, device, desc="eval", *args, **kw):
        out = real(model, loader, device, desc, *args, **kw)
        if desc.startswith("epoch ") and desc.endswith(" val"):
            return (losses[int(desc.split()[1]) - 1], *out[1:])
        return out

    monkeypatch.setattr(training, "evaluate", evaluate)


def train(root, out, name, *extra):
    args = ["--dataset", "demo", "--data", str(root), "--out", str(out), "--name", name, *FAST,
            *extra]
    assert retrain.main(args) == 0
    return out / name


def probabilities_of(weights: dict, root, ids, size=32) -> np.ndarray:
    """Our own forward pass: each image through the evaluation transform, unflipped, one at a
    time, outside every loader of retrain.py. (N, 14)."""
    net = build_model(len(NIH_FINDINGS), "none")
    net.load_state_dict(weights)
    net.eval()
    transform = build_transform(size)
    with torch.no_grad():
        batch = torch.stack([transform(load_xray(root / "images" / i)) for i in ids])
        return torch.sigmoid(net(batch)).numpy()


# --------------------------------------------------------------------------------------------
# Where the outputs come from
# --------------------------------------------------------------------------------------------
def test_preds_come_from_the_best_epoch_unflipped(demo_root, tmp_path, monkeypatch):
    """Mutations: preds.csv made by the last epoch's weights instead of checkpoint.pt's; the
    evaluation batches flipped; checkpoint.pt written every epoch. Here the best epoch (1)
    comes before the last (2)."""
    scripted_val_losses(monkeypatch, [1.0, 2.0])
    run = train(demo_root, tmp_path, "best", "--epochs", "2")
    best = torch.load(run / "checkpoint.pt", weights_only=True)
    last = torch.load(run / "last.pt", weights_only=True)
    assert best["epoch"] == 1 and last["epoch"] == 2
    preds = pd.read_csv(run / "preds.csv")
    ids = preds["Image Index"].tolist()
    got = preds[[f"prob_{f}" for f in NIH_FINDINGS]].to_numpy()
    want = probabilities_of(best["model"], demo_root, ids)
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-5)
    # Not vacuous: the last epoch's weights and the mirrored images predict differently.
    assert np.abs(probabilities_of(last["model"], demo_root, ids) - want).max() > 1e-3
    val = pd.read_csv(run / "val_preds.csv")
    np.testing.assert_allclose(val[[f"prob_{f}" for f in NIH_FINDINGS]].to_numpy(),
                               probabilities_of(best["model"], demo_root,
                                                val["Image Index"].tolist()), rtol=0, atol=2e-5)


def test_mirrored_inputs_would_change_the_predictions(demo_root):
    """The check above can see a flip: on this demo a mirrored image gets other probabilities."""
    net = build_model(len(NIH_FINDINGS), "none")
    torch.manual_seed(0)
    net.eval()
    image = build_transform(32)(load_xray(sorted((demo_root / "images").iterdir())[0]))
    with torch.no_grad():
        a, b = torch.sigmoid(net(torch.stack([image, image.flip(-1)])))
    assert (a - b).abs().max() > 1e-4


# --------------------------------------------------------------------------------------------
# Resume restores the schedule
# --------------------------------------------------------------------------------------------
def test_resume_across_epochs_without_improvement_restores_the_schedule(demo_root, tmp_path,
                                                                        monkeypatch):
    """Mutation: the schedule state (best loss, best epoch, epochs seen) not restored from
    last.pt. The resumed part is two epochs worse than the best: a fresh schedule would call
    the first of them an improvement, skip the decay and overwrite checkpoint.pt."""
    scripted_val_losses(monkeypatch, [1.0, 2.0, 3.0])
    whole = train(demo_root, tmp_path, "whole", "--epochs", "3")
    part = train(demo_root, tmp_path, "part", "--epochs", "1")
    train(demo_root, tmp_path, "part", "--epochs", "3", "--resume")
    a = torch.load(whole / "last.pt", weights_only=True)
    b = torch.load(part / "last.pt", weights_only=True)
    assert [h["lr"] for h in b["history"]] == pytest.approx([0.01, 0.01, 0.001])
    assert b["optimizer"]["param_groups"][0]["lr"] == pytest.approx(1e-4)
    assert b["schedule"] == {"best_loss": 1.0, "best_epoch": 1, "epoch": 3}
    assert torch.load(part / "checkpoint.pt", weights_only=True)["epoch"] == 1
    assert a["schedule"] == b["schedule"]
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key


# --------------------------------------------------------------------------------------------
# Atomic writes, interrupted inside the real writer
# --------------------------------------------------------------------------------------------
def test_a_write_that_fails_half_way_leaves_the_previous_file(tmp_path, monkeypatch):
    """Mutation: atomic_torch_save / atomic_write_text writing straight to the final path.
    The archive's write is made to write half a file and then fail, as a full disk does."""
    path = tmp_path / "last.pt"
    atomic_torch_save({"epoch": 1}, path)
    before = path.read_bytes()
    real_write = type(path).write_bytes

    def half_then_full_disk(self, data):
        real_write(self, bytes(data)[: len(data) // 2])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(type(path), "write_bytes", half_then_full_disk)
    with pytest.raises(SaveError, match="previous last.pt is intact"):
        atomic_torch_save({"epoch": 2, "pad": torch.zeros(10_000)}, path)
    assert path.read_bytes() == before
    assert torch.load(path, weights_only=True) == {"epoch": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]  # no temp file left


def test_a_text_write_that_fails_half_way_leaves_the_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "log_train.csv"
    save_text("epoch,loss\n1,0.5\n", path)
    real_write = type(path).write_text

    def half_then_fail(self, text, *a, **kw):
        real_write(self, text[: len(text) // 2], *a, **kw)
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(type(path), "write_text", half_then_fail)
    with pytest.raises(SaveError):
        save_text("epoch,loss\n1,0.5\n2,0.4\n", path)
    assert path.read_text() == "epoch,loss\n1,0.5\n"
    assert [p.name for p in tmp_path.iterdir()] == ["log_train.csv"]


# --------------------------------------------------------------------------------------------
# Command-line wiring
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def chexphoto_root(tmp_path_factory):
    from chexnet.datatools.demo import make_chexphoto_demo

    root = tmp_path_factory.mktemp("photo")
    make_chexphoto_demo(root, n_train=60, n_valid=20, size=16, seed=0)
    return next(root.rglob("train.csv")).parent


@pytest.mark.parametrize("policy,expected", [("zeros", 0.0), ("ones", 1.0), ("ignore", None)])
def test_uncertainty_flag_reaches_the_targets(chexphoto_root, policy, expected):
    """Mutation: retrain.py --uncertainty ignored (the zeros policy always used)."""
    csv = pd.read_csv(chexphoto_root / "train.csv")
    cfg = retrain.parse_args(["--dataset", "chexphoto", "--data", str(chexphoto_root),
                              "--uncertainty", policy, "--view", "all", "--missing", "skip"])
    labels, _ = load_tables(cfg)
    table = labels.frame.set_index("image_id")
    checked = 0
    for f in CHEXPHOTO_FINDINGS:
        for path in csv.loc[csv[f] == -1, "Path"]:
            if path in table.index:
                value = table.loc[path, f]
                assert math.isnan(value) if expected is None else value == expected, (f, path)
                checked += 1
    assert checked > 5  # the demo has uncertain labels to check


def write_preds(path, ids, scores, labels):
    frame = pd.DataFrame({"Image Index": ids})
    for k, f in enumerate(NIH_FINDINGS):
        frame[f"prob_{f}"] = scores[:, k]
    for k, f in enumerate(NIH_FINDINGS):
        frame[f] = labels[:, k]
    frame.to_csv(path, index=False)


def test_mean_auc_is_over_all_14_findings(tmp_path):
    """Mutation: the mean AUC dropping the last finding. Thirteen findings score 0.5 (tied
    scores), Hernia 1.0: the mean is 7.5 / 14."""
    y = np.tile(np.array([[0], [1], [0], [1]]), (1, 14)).astype(float)
    s = np.full((4, 14), 0.5)
    s[:, -1] = [0.1, 0.9, 0.2, 0.8]
    write_preds(tmp_path / "preds.csv", [f"0000000{i}_000.png" for i in range(1, 5)], s, y)
    assert eval_model.main(["--preds", str(tmp_path / "preds.csv"), "--no-published"]) == 0
    table = pd.read_csv(tmp_path / "aucs.csv").set_index("label")
    assert table.loc["Hernia", "auc"] == 1.0 and table.loc["Atelectasis", "auc"] == 0.5
    assert table.loc["mean", "auc"] == pytest.approx(7.5 / 14, abs=1e-9)


def test_ci_resamples_patients_named_by_the_ids(tmp_path):
    """Mutation: eval_model.py --ci finding the patient ids but resampling images. Each of 40
    patients has 8 identical images, so the patient-level interval must be about sqrt(8) times
    wider than a naive image-level bootstrap (computed here with sklearn)."""
    rng = np.random.default_rng(0)
    n_pat, per = 40, 8
    y_pat = (rng.random((n_pat, 14)) < 0.4).astype(float)
    y_pat[:2], y_pat[2:4] = 1.0, 0.0                 # both classes in every finding
    s_pat = np.clip(0.3 * y_pat + rng.random((n_pat, 14)) * 0.7, 0, 1)
    ids = [f"{p + 1:08d}_{k:03d}.png" for p in range(n_pat) for k in range(per)]
    y, s = np.repeat(y_pat, per, axis=0), np.repeat(s_pat, per, axis=0)
    write_preds(tmp_path / "preds.csv", ids, s, y)
    assert eval_model.main(["--preds", str(tmp_path / "preds.csv"), "--ci", "--n-boot", "400",
                            "--no-published"]) == 0
    ci = pd.read_csv(tmp_path / "aucs_ci.csv").set_index("label")
    k = 0  # Atelectasis
    naive = []
    for _ in range(400):
        idx = rng.integers(0, len(ids), len(ids))
        if 0 < y[idx, k].sum() < len(idx):
            naive.append(roc_auc_score(y[idx, k], s[idx, k]))
    naive_width = np.percentile(naive, 97.5) - np.percentile(naive, 2.5)
    width = ci.loc["Atelectasis", "ci_high"] - ci.loc["Atelectasis", "ci_low"]
    assert width > 1.8 * naive_width, (width, naive_width)


# --------------------------------------------------------------------------------------------
# A non-finite validation loss stops the run, as a non-finite training loss does
# --------------------------------------------------------------------------------------------
def test_evaluate_names_the_batch_whose_loss_is_not_finite():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 14))
    batches = []
    for b in range(3):
        images = torch.randint(0, 256, (4, 1, 2, 2), dtype=torch.uint8)
        targets = torch.zeros(4, 14)
        if b == 1:
            targets[2, 0] = float("inf")
        batches.append((images, targets, [f"b{b}_{i}.png" for i in range(4)]))
    with pytest.raises(training.NonFiniteLoss, match=r"epoch 3 val.*batch 2; images: b1_0.png, "
                       r"b1_1.png, b1_2.png, b1_3.png\. "):
        training.evaluate(model, batches, torch.device("cpu"), "epoch 3 val")


def test_nan_validation_loss_stops_with_exit_3(demo_root, tmp_path, monkeypatch, capsys):
    """Before: NaN < best is False, so the run decayed the lr, never saved checkpoint.pt and
    ended with '[Errno 2] ... checkpoint.pt'."""
    real = build_model

    class NanInEval(torch.nn.Module):
        def __init__(self, net):
            super().__init__()
            self.net = net

        def forward(self, x):
            out = self.net(x)
            return out if self.training else out * float("nan")

    monkeypatch.setattr(training, "build_model", lambda *a, **k: NanInEval(real(*a, **k)))
    args = ["--dataset", "demo", "--data", str(demo_root), "--out", str(tmp_path), "--name",
            "nan", *FAST, "--epochs", "2"]
    assert retrain.main(args) == 3
    err = capsys.readouterr().err
    assert "epoch 1 val: the loss is not finite in batch 1; images: " in err
    assert "Traceback" not in err and "Errno" not in err
    assert not (tmp_path / "nan" / "checkpoint.pt").exists()


# --------------------------------------------------------------------------------------------
# One run per run folder
# --------------------------------------------------------------------------------------------
def test_a_second_run_in_the_same_folder_is_refused_while_the_first_runs(demo_root, tmp_path,
                                                                          capsys):
    """The first run is paused (SIGSTOP from tests/faults.py) after its first step, so it
    holds the folder; the second must leave every file of the first alone."""
    import os
    import subprocess
    import sys

    from conftest import ROOT

    args = ["--dataset", "demo", "--data", str(demo_root), "--out", str(tmp_path), "--name",
            "shared", *FAST, "--epochs", "1"]
    first = subprocess.Popen([sys.executable, str(ROOT / "tests" / "faults.py"), *args,
                              "--lr", "0.02"], env={**os.environ,
                                                    "CHEXNET_TEST_KILL_AT_STEP": "1:SIGSTOP"},
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _, status = os.waitpid(first.pid, os.WUNTRACED)  # returns once it has stopped
        assert os.WIFSTOPPED(status)
        config = (tmp_path / "shared" / "config.json").read_text()
        assert '"lr": 0.02' in config
        assert retrain.main(args) == 2
        err = capsys.readouterr().err
        assert f"{tmp_path / 'shared'} is in use by another retrain.py (pid {first.pid}" in err
        assert (tmp_path / "shared" / "config.json").read_text() == config
    finally:
        first.kill()
        first.wait()
    # Killed (SIGKILL) while holding it: the lock does not outlive the process. Its
    # config.json makes the folder a run (files.is_run_folder), never trained over.
    assert retrain.main(args) == 2
    err = capsys.readouterr().err
    assert "in use" not in err and "already holds a run (config.json" in err


def test_a_run_that_fails_before_training_leaves_no_folder(tmp_path, capsys):
    args = ["--dataset", "demo", "--data", str(tmp_path / "absent"), "--out", str(tmp_path),
            "--name", "never", *FAST]
    assert retrain.main(args) == 2
    assert "data folder not found" in capsys.readouterr().err
    assert not (tmp_path / "never").exists()
