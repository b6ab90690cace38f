"""End-to-end training on tiny data: outputs, checkpoint round trip, resume, refusals."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from chexnet import train as training
from chexnet.loaders import load_tables, make_loaders
from chexnet.model import build_model
import retrain
from conftest import nih_demo, shared
from chexnet.labels import NIH_FINDINGS

# Trains networks or runs subprocesses: `pytest -m "not slow"` leaves these out.
# One torch thread in this process (conftest.py one_thread: 2 shared cores).
pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]

FAST = ["--image-size", "32", "--batch-size", "8", "--eval-batch-size", "16", "--weights", "none",
        "--workers", "0"]


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory):
    return nih_demo(tmp_path_factory, n_images=64, size=48, seed=0)


def train(root, out, name, *extra):
    args = ["--dataset", "demo", "--data", str(root), "--out", str(out), "--name", name, *FAST,
            *extra]
    assert retrain.main(args) == 0
    return out / name


def test_run_writes_every_output(demo_root, tmp_path):
    run = train(demo_root, tmp_path, "a", "--epochs", "2")
    config = json.loads((run / "config.json").read_text())
    assert config["dataset"] == "demo" and config["image_size"] == 32
    assert config["findings"] == list(NIH_FINDINGS) and config["lr"] == 0.01
    log = pd.read_csv(run / "log_train.csv")
    assert list(log.columns) == ["epoch", "train_loss", "val_loss", "lr", "seconds"]
    assert list(log["epoch"]) == [1, 2]
    assert all(pd.api.types.is_float_dtype(log[c]) for c in ("train_loss", "val_loss", "lr"))
    preds = pd.read_csv(run / "preds.csv")
    assert list(preds.columns) == (["Image Index"] + [f"prob_{f}" for f in NIH_FINDINGS]
                                   + list(NIH_FINDINGS))
    entries = pd.read_csv(demo_root / "Data_Entry_2017.csv")
    test_ids = set(load_tables(retrain.parse_args(
        ["--dataset", "demo", "--data", str(demo_root)]))[0].frame.query("fold == 'test'")[
            "image_id"])
    assert set(preds["Image Index"]) == test_ids and test_ids <= set(entries["Image Index"])
    probs = preds[[f"prob_{f}" for f in NIH_FINDINGS]].to_numpy()
    assert ((probs > 0) & (probs < 1)).all()
    aucs = pd.read_csv(run / "aucs.csv")
    assert list(aucs["label"]) == [*NIH_FINDINGS, "mean"]
    assert "CheXNet paper" not in aucs.columns  # synthetic data: no published comparison


def test_checkpoint_round_trip_reproduces_predictions(demo_root, tmp_path):
    run = train(demo_root, tmp_path, "rt", "--epochs", "1")
    ckpt = torch.load(run / "checkpoint.pt", weights_only=True)  # state dicts only
    assert set(ckpt) >= {"model", "epoch", "val_loss", "config", "findings"}
    cfg = retrain.parse_args(["--dataset", "demo", "--data", str(demo_root), *FAST])
    labels, _ = load_tables(cfg)
    net = build_model(len(labels.findings), str(run / "checkpoint.pt"))
    loaders = make_loaders(cfg, labels, torch.device("cpu"))
    _, probs, _, ids = training.evaluate(net, loaders["test"], torch.device("cpu"))
    preds = pd.read_csv(run / "preds.csv")
    assert list(preds["Image Index"]) == ids
    np.testing.assert_allclose(preds[[f"prob_{f}" for f in labels.findings]].to_numpy(), probs,
                               rtol=0, atol=1e-6)


def test_resumed_run_ends_with_identical_weights(demo_root, tmp_path):
    whole = train(demo_root, tmp_path, "whole", "--epochs", "3", "--patience", "5")
    part = train(demo_root, tmp_path, "part", "--epochs", "1", "--patience", "5")
    first = torch.load(part / "last.pt", weights_only=True)
    assert first["epoch"] == 1
    train(demo_root, tmp_path, "part", "--epochs", "3", "--patience", "5", "--resume")
    a = torch.load(whole / "last.pt", weights_only=True)
    b = torch.load(part / "last.pt", weights_only=True)
    assert a["epoch"] == b["epoch"] == 3
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    for key in ("train_loss", "val_loss", "lr"):
        assert [h[key] for h in a["history"]] == [h[key] for h in b["history"]]
    assert a["optimizer"]["param_groups"][0]["lr"] == b["optimizer"]["param_groups"][0]["lr"]
    # The weights really moved between epoch 1 and 3 (the comparison is not vacuous).
    assert not torch.equal(first["model"]["classifier.weight"], b["model"]["classifier.weight"])


def test_existing_run_and_changed_config_are_refused(demo_root, tmp_path, capsys):
    train(demo_root, tmp_path, "r", "--epochs", "1")
    base = ["--dataset", "demo", "--data", str(demo_root), "--out", str(tmp_path), "--name", "r",
            *FAST, "--epochs", "2"]
    assert retrain.main(base) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert retrain.main(base + ["--resume", "--lr", "0.1"]) == 2
    assert "--lr: 0.01 -> 0.1" in capsys.readouterr().err
    assert retrain.main(base + ["--name", "absent", "--resume"]) == 2
    assert "nothing to resume" in capsys.readouterr().err


def test_missing_images_stop_unless_skip(demo_root, tmp_path, capsys):
    import shutil

    root = tmp_path / "partial"
    shutil.copytree(demo_root, root)
    victim = sorted((root / "images").iterdir())[0]
    victim.unlink()
    args = ["--dataset", "demo", "--data", str(root), "--out", str(tmp_path), *FAST,
            "--epochs", "1"]
    assert retrain.main(args + ["--name", "m1"]) == 2
    err = capsys.readouterr().err
    assert "1 of 64 images" in err and victim.name in err and "--missing skip" in err
    assert retrain.main(args + ["--name", "m2", "--missing", "skip"]) == 0
    assert (tmp_path / "m2" / "skipped.txt").read_text().split() == [victim.name]


def test_real_nih_sample_trains_end_to_end(tmp_path, capsys):
    """The 120 real NIH PNGs (two RGBA) with Data_Entry labels, tiny images, one epoch."""
    images = shared("nih", "images")
    entry = shared("nih", "Data_Entry_2017_v2020.csv.gz")
    args = ["--dataset", "nih", "--data", str(images.parent), "--labels", str(entry),
            "--missing", "skip", "--out", str(tmp_path), "--name", "nih", *FAST, "--epochs", "1"]
    # The sample is reproduce-chexnet's starter images, all from its test fold: under the
    # default (reference) split there is nothing to train on, and the run says so.
    assert retrain.main(args) == 2
    assert "the train fold is empty" in capsys.readouterr().err
    args += ["--split", "random"]
    assert retrain.main(args) == 0
    run = tmp_path / "nih"
    assert len((run / "skipped.txt").read_text().split()) == 112_120 - 120
    cfg = retrain.parse_args(args)
    labels, _ = load_tables(cfg)
    table = labels.frame
    assert len(table) == 120
    assert {"00000100_000.png", "00001369_000.png"} <= set(table["image_id"])
    preds = pd.read_csv(run / "preds.csv")
    assert set(preds["Image Index"]) == set(table.query("fold == 'test'")["image_id"])
    aucs = pd.read_csv(run / "aucs.csv")
    assert {"CheXNet paper", "reproduce-chexnet"} <= set(aucs.columns)
    assert "own test splits" in capsys.readouterr().out


def test_demo_run_through_the_cache_equals_the_png_run(demo_root, tmp_path, capsys):
    """prepare_data.py once, then retrain reads the uint8 cache: bitwise the same run."""
    import shutil

    from chexnet.datatools import prepare as prepare_data

    root = tmp_path / "demo"
    shutil.copytree(demo_root, root)
    png = train(root, tmp_path, "png", "--epochs", "2", "--cache", "off")
    assert prepare_data.main(["nih", "--data", str(root), "--image-size", "32", "--labels",
                              str(root / "Data_Entry_2017.csv"), "--workers", "1",
                              "--split", "random"]) == 0
    capsys.readouterr()
    cached = train(root, tmp_path, "cached", "--epochs", "2", "--cache", "on")
    assert "reading images from the uint8 cache" in capsys.readouterr().out
    a = torch.load(png / "last.pt", weights_only=True)["model"]
    b = torch.load(cached / "last.pt", weights_only=True)["model"]
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert (png / "preds.csv").read_text() == (cached / "preds.csv").read_text()


def test_cache_on_without_a_cache_says_how_to_build_it(demo_root, tmp_path, capsys):
    args = ["--dataset", "demo", "--data", str(demo_root), "--out", str(tmp_path), "--name", "x",
            *FAST, "--epochs", "1", "--cache", "on"]
    assert retrain.main(args) == 2
    assert "python prepare_data.py nih --data" in capsys.readouterr().err


def test_real_nih_sample_trains_through_the_cache(tmp_path, capsys):
    from chexnet.datatools import prepare as prepare_data

    images = shared("nih", "images")
    entry = shared("nih", "Data_Entry_2017_v2020.csv.gz")
    root = tmp_path / "nih"
    root.mkdir()
    (root / "images").symlink_to(images)  # the shared folder is read-only; the cache is not
    assert prepare_data.main(["nih", "--data", str(root), "--image-size", "32", "--labels",
                              str(entry), "--skip-bad", "--workers", "1", "--split", "random"]) == 0
    capsys.readouterr()
    args = ["--dataset", "nih", "--data", str(root), "--missing", "skip", "--out", str(tmp_path),
            "--name", "run", *FAST, "--epochs", "1", "--cache", "on"]
    assert retrain.main(args) == 0
    out = capsys.readouterr().out
    assert "reading images from the uint8 cache" in out
    assert "nih: 120 images" in out
    assert len(pd.read_csv(tmp_path / "run" / "preds.csv")) == len(
        load_tables(retrain.parse_args(args))[0].frame.query("fold == 'test'"))


@pytest.mark.parametrize("size", [32, 33, 40, 63, 64, 95, 96, 224, 255])
def test_final_map_side_is_densenets(size):
    """The side of the last feature map, against torchvision's DenseNet-121 itself."""
    import torchvision
    from chexnet.data import final_map_side

    features = torchvision.models.densenet121(weights=None).features.eval()
    with torch.no_grad():
        side = features(torch.zeros(1, 3, size, size)).shape[-1]
    assert final_map_side(size) == side


def test_a_final_batch_too_small_for_batchnorm_is_dropped():
    """One image, or fewer than 8 values per channel in the last block (image side / 32)²."""
    from chexnet.data import drops_last_batch

    assert drops_last_batch(33, 16, 224) and not drops_last_batch(34, 16, 224)  # one image
    assert not drops_last_batch(5, 1, 32) and not drops_last_batch(32, 8, 32)   # no tail
    assert drops_last_batch(34, 8, 32) and drops_last_batch(39, 8, 32)          # 2, 7 at 1x1
    assert not drops_last_batch(34, 8, 64)    # 2 images x 2x2 = 8 values: kept
    assert drops_last_batch(35, 16, 64) is False and drops_last_batch(33, 16, 64)
    assert drops_last_batch(41, 10, 32) and drops_last_batch(47, 10, 32)  # 1 and 7 at 1x1
    assert not drops_last_batch(48, 10, 32)   # 8 images at 1x1: 8 values, kept
    assert not drops_last_batch(78_468, 16, 224)  # the reference split: every image trains


@pytest.mark.parametrize(("tail", "size", "batches"), [(1, 32, 1), (2, 32, 1), (2, 64, 2)])
def test_a_dropped_final_batch_trains_and_is_not_in_the_loader(demo_root, tmp_path, tail,
                                                                size, batches):
    """At 32 px a final batch of 2 images (1x1 maps) is dropped; at 64 px (2x2) it is kept."""
    labels, _ = load_tables(retrain.parse_args(["--dataset", "demo", "--data",
                                                str(demo_root)]))
    table = labels.frame
    batch = int((table["fold"] == "train").sum()) - tail  # the epoch ends on `tail` images
    args = ["--dataset", "demo", "--data", str(demo_root), "--out", str(tmp_path), "--name",
            "one", *FAST, "--epochs", "1", "--batch-size", str(batch), "--image-size", str(size)]
    cfg = retrain.parse_args(args)
    loaders = make_loaders(cfg, load_tables(cfg)[0], torch.device("cpu"))
    assert len(loaders["train"]) == batches
    if tail == 1:
        assert retrain.main(args) == 0


# --------------------------------------------------------------------------------------------
# The recipe inside fit(): optimizer, lr decay, momentum at a decay
# --------------------------------------------------------------------------------------------
def scripted_val_losses(monkeypatch, losses):
    """Make fit() see these per-epoch validation losses (the real evaluation still runs, so
    the rest of the run is untouched)."""
    real = training.evaluate

    def evaluate(model, loader, device, desc="eval", *args, **kw):
        out = real(model, loader, device, desc, *args, **kw)
        if desc.startswith("epoch ") and desc.endswith(" val"):
            epoch = int(desc.split()[1])
            return (losses[epoch - 1], *out[1:])
        return out

    monkeypatch.setattr(training, "evaluate", evaluate)


def test_default_recipe_builds_reproduce_chexnets_sgd(demo_root, tmp_path):
    run = train(demo_root, tmp_path, "sgd", "--epochs", "1")
    groups = torch.load(run / "last.pt", weights_only=True)["optimizer"]["param_groups"]
    assert {(g["lr"], g["momentum"], g["weight_decay"], g["nesterov"], g["dampening"])
            for g in groups} == {(0.01, 0.9, 1e-4, False, 0)}
    assert "betas" not in groups[0]  # SGD, not Adam
    config = json.loads((run / "config.json").read_text())
    assert config["recipe"] == "reproduce-chexnet" and config["optimizer"] == "sgd"
    assert config["keep_momentum"] is False and config["split"] == "random"  # demo: random


def test_fit_decays_and_resets_momentum_when_val_loss_gets_worse(demo_root, tmp_path,
                                                                 monkeypatch):
    scripted_val_losses(monkeypatch, [1.0, 2.0])
    run = train(demo_root, tmp_path, "reset", "--epochs", "2", "--lr-decay", "4")
    last = torch.load(run / "last.pt", weights_only=True)
    assert [h["lr"] for h in last["history"]] == [0.01, 0.01]
    assert last["optimizer"]["param_groups"][0]["lr"] == pytest.approx(0.0025)
    assert last["optimizer"]["state"] == {}  # as reproduce-chexnet's rebuilt SGD
    assert torch.load(run / "checkpoint.pt", weights_only=True)["epoch"] == 1


def test_fit_keeps_momentum_with_keep_momentum(demo_root, tmp_path, monkeypatch):
    scripted_val_losses(monkeypatch, [1.0, 2.0])
    run = train(demo_root, tmp_path, "keep", "--epochs", "2", "--keep-momentum")
    last = torch.load(run / "last.pt", weights_only=True)
    assert last["optimizer"]["param_groups"][0]["lr"] == pytest.approx(0.001)
    buffers = [s["momentum_buffer"] for s in last["optimizer"]["state"].values()]
    assert len(buffers) == len(last["model"]) - sum(  # one per trainable tensor
        k.endswith(("running_mean", "running_var", "num_batches_tracked")) for k in last["model"])
    assert any(b.abs().sum() > 0 for b in buffers)


def test_fit_patience_stops_the_run(demo_root, tmp_path, monkeypatch, capsys):
    scripted_val_losses(monkeypatch, [1.0, 0.5, 0.6, 0.7, 0.4])
    run = train(demo_root, tmp_path, "pat", "--epochs", "5", "--patience", "2")
    log = pd.read_csv(run / "log_train.csv")
    assert list(log["epoch"]) == [1, 2, 3, 4]  # best at 2, stopped 2 epochs later
    assert list(log["lr"]) == pytest.approx([0.01, 0.01, 0.01, 0.001])
    assert "no improvement in 2 epochs" in capsys.readouterr().out


def test_paper_recipe_is_adam_and_keeps_its_moments(demo_root, tmp_path, monkeypatch):
    scripted_val_losses(monkeypatch, [1.0, 2.0])
    run = train(demo_root, tmp_path, "paper", "--epochs", "2", "--recipe", "paper")
    last = torch.load(run / "last.pt", weights_only=True)
    group = last["optimizer"]["param_groups"][0]
    assert tuple(group["betas"]) == (0.9, 0.999) and group["weight_decay"] == 0.0
    assert [h["lr"] for h in last["history"]] == [0.001, 0.001]
    assert group["lr"] == pytest.approx(1e-4)
    assert all("exp_avg" in s for s in last["optimizer"]["state"].values())
    assert last["optimizer"]["state"]
    config = json.loads((run / "config.json").read_text())
    assert (config["recipe"], config["optimizer"], config["lr"], config["keep_momentum"]) == (
        "paper", "adam", 0.001, True)


def test_recipe_values_can_be_overridden_one_by_one(capsys):
    cfg = retrain.parse_args(["--recipe", "paper"])
    assert (cfg.optimizer, cfg.lr, cfg.betas, cfg.weight_decay, cfg.batch_size) == (
        "adam", 0.001, [0.9, 0.999], 0.0, 16)
    cfg = retrain.parse_args(["--recipe", "paper", "--lr", "0.005", "--no-keep-momentum"])
    assert (cfg.optimizer, cfg.lr, cfg.keep_momentum, cfg.betas) == (
        "adam", 0.005, False, [0.9, 0.999])
    cfg = retrain.parse_args(["--optimizer", "adam", "--betas", "0.8", "0.99"])
    assert (cfg.recipe, cfg.optimizer, cfg.lr, cfg.betas) == (
        "reproduce-chexnet", "adam", 0.01, [0.8, 0.99])
    with pytest.raises(SystemExit):
        retrain.parse_args(["--recipe", "paper", "--momentum", "0.5"])
    assert "--betas" in capsys.readouterr().err
