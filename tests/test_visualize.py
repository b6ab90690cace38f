"""Heatmaps: CAM equals the reference loop, Grad-CAM equals its textbook autograd formulation;
the one-image CLI and the gallery write PNGs; bad input ends with a message.

`tiny_run` (also used by test_localization, test_corruptions) writes a run folder in the exact
retrain.py format with the project's own writers, from a random-init model: the same files a
training run leaves, without the minutes a DenseNet epoch takes on a shared CPU.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from torch import nn

import retrain
import visualize_prediction as vp
from labels import NIH_FINDINGS
from model import build_model

_RUNS: dict[str, Path] = {}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Run torch on one thread in these tests. The 2 cores are shared with other processes,
    and OpenMP threads spin-wait for each other at every op: once descheduled, a 2-thread
    DenseNet forward is ~10x slower than a 1-thread one (measured here: 90 s -> 11 s for the
    robustness test). Restored afterwards, so other test modules are unaffected."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_run(tmp_path_factory, n_images: int = 40, size: int = 48, image_size: int = 32) -> Path:
    """A demo NIH dataset and a run folder on it (config.json, checkpoint.pt, preds.csv,
    aucs.csv) whose model is a random-init DenseNet; built once per test session."""
    key = f"{n_images}-{size}-{image_size}"
    if key in _RUNS:
        return _RUNS[key]
    from demo_data import make_nih_demo

    root = tmp_path_factory.mktemp("tiny_demo")
    make_nih_demo(root / "nih", n_images=n_images, size=size, seed=0)
    cfg = retrain.parse_args(["--dataset", "demo", "--data", str(root / "nih"), "--out",
                              str(root / "results"), "--name", "tiny", "--image-size",
                              str(image_size), "--weights", "none", "--workers", "0"])
    table, findings, _ = retrain.load_tables(cfg)
    cfg.findings = list(findings)
    torch.manual_seed(0)
    model = build_model(len(findings), "none").eval()
    run_dir = cfg.run_dir
    run_dir.mkdir(parents=True)
    (run_dir / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2))
    torch.save({"model": model.state_dict(), "epoch": 0, "val_loss": 0.0,
                "config": dataclasses.asdict(cfg), "findings": list(findings)},
               run_dir / "checkpoint.pt")
    test_loader = retrain.make_loaders(cfg, table, findings, torch.device("cpu"))["test"]
    _, probs, targets, ids = retrain.evaluate(model, test_loader, torch.device("cpu"))
    retrain.write_predictions(run_dir, cfg, findings, ids, probs, targets)
    _RUNS[key] = run_dir
    return run_dir


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    return tiny_run(tmp_path_factory)


class TinyNet(nn.Module):
    """DenseNet's layout in miniature: features ending in a norm, ReLU, average pool, linear."""

    def __init__(self, k: int = 4):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(),
                                      nn.Conv2d(6, 5, 3, stride=2, padding=1), nn.BatchNorm2d(5))
        self.classifier = nn.Linear(5, k)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.relu(self.features(x)).mean(dim=(2, 3)))


def _tiny_net() -> TinyNet:
    torch.manual_seed(1)
    net = TinyNet()
    with torch.no_grad():  # non-trivial running statistics, so eval-mode BN is not identity
        net.features[3].running_mean.uniform_(-0.5, 0.5)
        net.features[3].running_var.uniform_(0.5, 2.0)
    return net.eval()


def test_cam_equals_reference_loop_and_forward():
    torch.manual_seed(0)
    model = build_model(14, "none").eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        cams, probs = vp.class_activation_maps(model, x)
        torch.testing.assert_close(probs, torch.sigmoid(model(x)))
        feats = torch.relu(model.features(x))
        w = model.classifier.weight
        b, k = 1, 5
        loop = torch.zeros(feats.shape[2:])
        for c in range(feats.shape[1]):          # the reference's triple loop, over c, i, j
            for i in range(feats.shape[2]):
                for j in range(feats.shape[3]):
                    loop[i, j] += w[k, c] * feats[b, c, i, j]
    torch.testing.assert_close(cams[b, k], loop, rtol=1e-4, atol=1e-4)
    assert cams.shape == (2, 14, 2, 2)


def test_gradcam_equals_brute_force_autograd():
    net = _tiny_net()
    x = torch.randn(3, 3, 12, 12)
    ks = [2, 0, 3]
    maps, probs = vp.grad_cams(net, x, ks)
    torch.testing.assert_close(probs, torch.sigmoid(net(x)))
    for b, k in enumerate(ks):
        # Textbook Grad-CAM through the whole model: keep the activation's gradient, backprop
        # this image's logit, average the gradient per channel, weight, sum, ReLU.
        net.zero_grad()
        acts = torch.relu(net.features(x[b:b + 1]))
        acts.retain_grad()
        logit = net.classifier(acts.mean(dim=(2, 3)))[0, k]
        torch.testing.assert_close(logit, net(x[b:b + 1])[0, k])
        logit.backward()
        c_n, h, w = acts.shape[1:]
        expected = torch.zeros(h, w)
        for c in range(c_n):
            alpha = acts.grad[0, c].sum() / (h * w)
            for i in range(h):
                for j in range(w):
                    expected[i, j] += alpha * acts[0, c, i, j].detach()
        torch.testing.assert_close(maps[b], torch.relu(expected), rtol=1e-5, atol=1e-6)
    assert (maps >= 0).all() and maps.max() > 0
    # For a GAP + linear head Grad-CAM is ReLU(CAM) / (h w).
    with torch.no_grad():
        cams, _ = vp.class_activation_maps(net, x)
    for b, k in enumerate(ks):
        torch.testing.assert_close(maps[b], torch.relu(cams[b, k]) / (6 * 6))


def test_gradcam_leaves_no_state_behind():
    net = _tiny_net()
    net.zero_grad(set_to_none=True)
    vp.heatmaps(net, torch.randn(2, 3, 12, 12), [1, 1], "gradcam")
    assert all(p.grad is None and p.requires_grad for p in net.parameters())
    assert not net._forward_hooks and not net.features._forward_hooks
    assert not torch.is_inference_mode_enabled() and torch.is_grad_enabled()


def test_heatmap_is_upsampled_to_the_input():
    net = _tiny_net()
    x = torch.randn(3, 12, 12)
    for method in vp.METHODS:
        heat = vp.heatmap(net, x, 2, method)
        assert heat.shape == (12, 12) and heat.dtype == np.float32
    assert (vp.heatmap(net, x, 2, "gradcam") >= 0).all()
    with torch.no_grad():
        cams, _ = vp.class_activation_maps(net, x[None])
    cam = vp.heatmap(net, x, 2, "cam")
    # Bilinear upsampling (align_corners=False) keeps values within the coarse map's range.
    low, high = float(cams[0, 2].min()), float(cams[0, 2].max())
    assert low - 1e-5 <= cam.min() and cam.max() <= high + 1e-5
    with pytest.raises(ValueError, match="method"):
        vp.heatmap(net, x, 2, "lime")


def test_cli_writes_heatmap(tmp_path, capsys):
    model = build_model(14, "none")
    torch.save({"model": model.state_dict(), "findings": list(NIH_FINDINGS),
                "config": {"image_size": 64}}, tmp_path / "c.pt")
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (80, 96), dtype=np.uint8)).save(
        tmp_path / "x.png")
    out = tmp_path / "h.png"
    assert vp.main(["--checkpoint", str(tmp_path / "c.pt"), "--image", str(tmp_path / "x.png"),
                    "--label", "Cardiomegaly", "--out", str(out)]) == 0
    assert Image.open(out).size[0] > 400
    assert "Cardiomegaly" in capsys.readouterr().out
    out.unlink()
    assert vp.main(["--checkpoint", str(tmp_path / "c.pt"), "--image", str(tmp_path / "x.png"),
                    "--method", "gradcam", "--out", str(out)]) == 0
    assert out.is_file()
    capsys.readouterr()
    assert vp.main(["--checkpoint", str(tmp_path / "c.pt"), "--image", str(tmp_path / "x.png"),
                    "--label", "Cardio", "--out", str(out)]) == 2
    assert "not a finding of this model" in capsys.readouterr().err
    assert vp.main(["--checkpoint", str(tmp_path / "c.pt"), "--out", str(out)]) == 2
    assert "--image" in capsys.readouterr().err


def test_select_positives_takes_true_or_predicted_by_probability():
    preds = pd.DataFrame({"Image Index": list("abcde"),
                          "prob_Edema": [0.9, 0.2, 0.6, 0.1, 0.4],
                          "Edema": [0.0, 1.0, 0.0, 0.0, 1.0]})
    chosen = vp.select_positives(preds, "Edema", top=3)
    assert list(chosen["Image Index"]) == ["a", "c", "e"]   # d is neither; b ranks last
    assert list(vp.select_positives(preds, "Edema", top=10)["Image Index"]) == list("aceb")


def test_gallery_tiles_and_png(run_dir, tmp_path):
    import matplotlib.pyplot as plt

    preds = pd.read_csv(run_dir / "preds.csv")
    label = max(NIH_FINDINGS, key=lambda f: (preds[f] == 1).sum())
    n_candidates = len(vp.select_positives(preds, label, top=10_000))
    assert n_candidates >= 2
    fig = vp.gallery_figure(run_dir, label, top=2, method="gradcam")
    assert len(fig.axes) == 2
    for title in (ax.get_title() for ax in fig.axes):
        head, truth = title.split("\ntruth: ")
        prob = float(head.split("p = ")[1])
        assert prob >= 0.5 or label in truth.split(", ")   # true or predicted positive
    plt.close(fig)
    box_file = Path(json.loads((run_dir / "config.json").read_text())["data"]) / "BBox_List_2017.csv"
    fig = vp.gallery_figure(run_dir, label, top=10_000, boxes=box_file)
    assert len(fig.axes) == n_candidates
    # One rectangle per box of the label on a shown image.
    shown = set(vp.select_positives(preds, label, top=10_000)["Image Index"])
    boxes = pd.read_csv(box_file).iloc[:, :2].set_axis(["image", "finding"], axis=1)
    boxes["finding"] = boxes["finding"].replace({"Infiltrate": "Infiltration"})
    n_boxes = int((boxes["image"].isin(shown) & (boxes["finding"] == label)).sum())
    assert n_boxes > 0 and sum(len(ax.patches) for ax in fig.axes) == n_boxes
    plt.close(fig)
    out = vp.gallery(run_dir, label, top=3, out=tmp_path / "g.png")
    assert out == tmp_path / "g.png" and Image.open(out).format == "PNG"


def test_gallery_cli(run_dir, tmp_path, capsys):
    out = tmp_path / "gallery.png"
    preds = pd.read_csv(run_dir / "preds.csv")
    label = max(NIH_FINDINGS, key=lambda f: (preds[f] == 1).sum())
    boxes = Path(json.loads((run_dir / "config.json").read_text())["data"]) / "BBox_List_2017.csv"
    assert vp.main(["--run", str(run_dir), "--label", label, "--top", "2", "--out", str(out),
                    "--boxes", str(boxes)]) == 0
    assert out.is_file() and str(out) in capsys.readouterr().out
    assert vp.main(["--run", str(run_dir), "--out", str(out)]) == 2
    assert "needs --label" in capsys.readouterr().err
    assert vp.main(["--run", str(run_dir), "--label", "Lung Lesion", "--out", str(out)]) == 2
    assert "not a finding of" in capsys.readouterr().err
    assert vp.main(["--run", str(tmp_path / "nope"), "--label", label, "--out", str(out)]) == 2
    assert str(tmp_path / "nope" / "checkpoint.pt") in capsys.readouterr().err


def test_run_config_rebuilds_the_table_and_reports_bad_folders(run_dir, tmp_path):
    cfg, test = vp.run_test_table(run_dir)
    preds = pd.read_csv(run_dir / "preds.csv")
    assert cfg.dataset == "demo" and set(test.index) == set(preds["Image Index"])
    assert all(Path(p).is_file() for p in test["path"])
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(vp.DataError, match="config.json"):
        vp.run_config(tmp_path)
