"""Heatmaps: CAM equals the reference loop, Grad-CAM equals its textbook autograd formulation;
the one-image CLI and the gallery write PNGs; bad input ends with a message.

`tiny_run` (conftest.py; also used by test_localization, test_corruptions) writes a run folder
in the exact retrain.py format with the project's own writers, from a random-init model: the
same files a training run leaves, without the minutes a DenseNet epoch takes on a shared CPU.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from torch import nn

from chexnet.analysis import cam
from chexnet.config import load_run_config
from chexnet.loaders import load_tables
from chexnet.runs import run_test_table
from chexnet.analysis import heatmaps as vp
import visualize_prediction as visualize
from conftest import tiny_run
from chexnet.labels import NIH_FINDINGS
from chexnet.model import build_model



pytestmark = pytest.mark.usefixtures("one_thread")


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
        cams, probs = cam.class_activation_maps(model, x)
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
    maps, probs = cam.grad_cams(net, x, ks)
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
        cams, _ = cam.class_activation_maps(net, x)
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
        heat = cam.heatmap(net, x, 2, method)
        assert heat.shape == (12, 12) and heat.dtype == np.float32
    assert (cam.heatmap(net, x, 2, "gradcam") >= 0).all()
    with torch.no_grad():
        cams, _ = cam.class_activation_maps(net, x[None])
    one = cam.heatmap(net, x, 2, "cam")
    # Bilinear upsampling (align_corners=False) keeps values within the coarse map's range.
    low, high = float(cams[0, 2].min()), float(cams[0, 2].max())
    assert low - 1e-5 <= one.min() and one.max() <= high + 1e-5
    with pytest.raises(ValueError, match="method"):
        cam.heatmap(net, x, 2, "lime")


def test_cli_writes_heatmap(tmp_path, capsys):
    model = build_model(14, "none")
    torch.save({"model": model.state_dict(), "findings": list(NIH_FINDINGS),
                "config": {"image_size": 64}}, tmp_path / "c.pt")
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (80, 96), dtype=np.uint8)).save(
        tmp_path / "x.png")
    out = tmp_path / "h.png"
    assert visualize.main(["--checkpoint", str(tmp_path / "c.pt"),
                           "--image", str(tmp_path / "x.png"),
                           "--label", "Cardiomegaly", "--out", str(out)]) == 0
    assert Image.open(out).size[0] > 400
    assert "Cardiomegaly" in capsys.readouterr().out
    out.unlink()
    assert visualize.main(["--checkpoint", str(tmp_path / "c.pt"),
                           "--image", str(tmp_path / "x.png"),
                           "--method", "gradcam", "--out", str(out)]) == 0
    assert out.is_file()
    capsys.readouterr()
    assert visualize.main(["--checkpoint", str(tmp_path / "c.pt"),
                           "--image", str(tmp_path / "x.png"),
                           "--label", "Cardio", "--out", str(out)]) == 2
    assert "not a finding of this model" in capsys.readouterr().err
    assert visualize.main(["--checkpoint", str(tmp_path / "c.pt"), "--out", str(out)]) == 2
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
    data = Path(json.loads((run_dir / "config.json").read_text())["data"])
    box_file = data / "BBox_List_2017.csv"
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
    assert visualize.main(["--run", str(run_dir), "--label", label, "--top", "2", "--out", str(out),
                    "--boxes", str(boxes)]) == 0
    assert out.is_file() and str(out) in capsys.readouterr().out
    assert visualize.main(["--run", str(run_dir), "--out", str(out)]) == 2
    assert "needs --label" in capsys.readouterr().err
    assert visualize.main(["--run", str(run_dir), "--label", "Lung Lesion", "--out", str(out)]) == 2
    assert "not a finding of" in capsys.readouterr().err
    assert visualize.main(["--run", str(tmp_path / "nope"), "--label", label,
                           "--out", str(out)]) == 2
    assert str(tmp_path / "nope" / "checkpoint.pt") in capsys.readouterr().err


def test_run_config_rebuilds_the_table_and_reports_bad_folders(run_dir, tmp_path):
    cfg, test = run_test_table(run_dir)
    preds = pd.read_csv(run_dir / "preds.csv")
    assert cfg.dataset == "demo" and set(test.index) == set(preds["Image Index"])
    assert all(Path(p).is_file() for p in test["path"])
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(vp.DataError, match="config.json"):
        load_run_config(tmp_path)


# --------------------------------------------------------------------------------------------
# --style reference: reproduce-chexnet's calc_cam / show_next
# --------------------------------------------------------------------------------------------
class FeatureHead(nn.Module):
    """A 'model' whose input IS its last feature map (features = identity): the CAM code then
    runs on random (B, 1024, 7, 7) maps and a random head, exactly the reference's shapes."""

    def __init__(self, channels: int = 1024, k: int = 14):
        super().__init__()
        self.features = nn.Identity()
        self.classifier = nn.Linear(channels, k)


def _reference_calc_cam(y: np.ndarray, weights: np.ndarray, bias: np.ndarray, k: int,
                        prevalence: float) -> np.ndarray:
    """reproduce-chexnet's calc_cam after its feature extractor (features + ReLU), literally."""
    y = np.maximum(y, 0)                      # densenet_last_layer: F.relu(features(x))
    h, w = y.shape[1:]
    cam = np.zeros((h, w, 1))
    for i in range(h):
        for j in range(w):
            for c in range(y.shape[0]):
                cam[i, j] += y[c, i, j] * weights[k, c]
    cam += bias[k]
    cam = 1 / (1 + np.exp(-cam))              # local region probabilities
    cam = cam / prevalence                    # normalise by the baseline probability
    return np.log(cam)[:, :, 0]


def test_reference_map_equals_the_reference_triple_loop():
    torch.manual_seed(0)
    head = FeatureHead().eval()
    with torch.no_grad():   # logits of order 1, so that neither the sigmoid nor the bias is flat
        head.classifier.weight.normal_(0, 0.05)
        head.classifier.bias.uniform_(-2, 2)
    feats = torch.randn(2, 1024, 7, 7)        # negative entries too: the final ReLU matters
    k, prevalence = 9, 0.0925
    maps, probs = cam.reference_log_odds_maps(head, feats, k, prevalence)
    assert maps.shape == (2, 7, 7)
    w = head.classifier.weight.detach().double().numpy()
    b = head.classifier.bias.detach().double().numpy()
    for img in range(2):
        expected = _reference_calc_cam(feats[img].double().numpy(), w, b, k, prevalence)
        assert np.abs(maps[img] - expected).max() < 1e-5
    assert maps.std() > 0.3 and -5 < np.median(maps) < 5          # a non-degenerate map
    with torch.no_grad():
        logits = head.classifier(torch.relu(feats).mean(dim=(2, 3)))
    np.testing.assert_allclose(probs, torch.sigmoid(logits).numpy(), rtol=1e-5, atol=1e-6)


def test_reference_map_of_a_one_cell_densenet_is_the_output_over_prevalence():
    # At 32 px DenseNet's last feature map is 1x1, so CAM + bias is the model's own logit and
    # the map is log(P(finding) / prevalence), from the forward pass, independently.
    torch.manual_seed(0)
    model = build_model(14, "none").eval()
    x = torch.randn(3, 3, 32, 32)
    maps, _ = cam.reference_log_odds_maps(model, x, 4, 0.2)
    with torch.no_grad():
        expected = torch.log(torch.sigmoid(model(x))[:, 4].double() / 0.2).numpy()
    assert maps.shape == (3, 1, 1)
    np.testing.assert_allclose(maps[:, 0, 0], expected, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="prevalence"):
        cam.reference_log_odds_maps(model, x, 4, 0.0)


def test_training_prevalence_counts_only_the_training_fold():
    table = pd.DataFrame({
        "fold": ["train"] * 4 + ["val"] + ["test"] * 3,
        "Edema": [1, 0, 0, 0, 1, 1, 1, 1],
        "Mass": [1, 1, np.nan, 0, 0, 0, 0, 0],       # a masked label is left out
    })
    prev = vp.training_prevalence(table, ["Edema", "Mass"])
    assert prev.to_dict() == pytest.approx({"Edema": 0.25, "Mass": 2 / 3})
    assert vp.finding_prevalence(prev, "Edema", "t.csv") == 0.25
    with pytest.raises(vp.DataError, match="t.csv.*Hernia"):
        vp.finding_prevalence(prev, "Hernia", "t.csv")
    zero = pd.Series({"Edema": 0.0})
    with pytest.raises(vp.DataError, match="t.csv: no training image.*--prevalence"):
        vp.finding_prevalence(zero, "Edema", "t.csv")
    with pytest.raises(vp.DataError, match="no 'train' fold"):
        vp.training_prevalence(table[table["fold"] != "train"], ["Edema"])


def _fold_rates(run_dir: Path) -> pd.DataFrame:
    """Per fold and finding, the fraction of positives: computed here with pandas from the
    run's label table, not with the code under test."""
    labels, _ = load_tables(load_run_config(run_dir))
    table, findings = labels.frame, list(labels.findings)
    return table.groupby("fold")[list(findings)].mean().T          # (findings, folds)


def _train_vs_test_label(run_dir: Path) -> str:
    """A finding with test positives whose training and test rates differ clearly."""
    rates = _fold_rates(run_dir)
    rates = rates[(rates["test"] > 0) & (rates["train"] > 0)]
    gap = (np.log(rates["test"]) - np.log(rates["train"])).abs()
    assert gap.max() > 0.5
    return str(gap.idxmax())


def test_reference_examples_step_through_test_positives_with_training_prevalence(run_dir):
    import matplotlib.pyplot as plt

    preds = pd.read_csv(run_dir / "preds.csv").set_index("Image Index")
    label = _train_vs_test_label(run_dir)
    train_rate = _fold_rates(run_dir).at[label, "train"]
    expected_ids = list(preds.index[preds[label] == 1])     # preds.csv keeps the test order
    findings = [c[len("prob_"):] for c in preds.columns if c.startswith("prob_")]
    seen = []
    for ex in vp.reference_examples(run_dir, label):
        seen.append(ex.image_id)
        row = preds.loc[ex.image_id]
        assert ex.prevalence == pytest.approx(train_rate)
        # 32 px: a 1x1 grid, whose value is log(P(label) / training prevalence).
        assert ex.log_odds.shape == (1, 1)
        assert ex.log_odds[0, 0] == pytest.approx(np.log(row["prob_" + label] / train_rate),
                                                  abs=1e-5)
        assert ex.prob == pytest.approx(row["prob_" + label], abs=1e-6)
        table = ex.table
        assert list(table.columns) == ["Predicted Probability", "Ground Truth"]
        assert table.index.name == "Finding" and sorted(table.index) == sorted(findings)
        assert list(table["Predicted Probability"]) == sorted(table["Predicted Probability"],
                                                              reverse=True)
        for f in findings:
            assert abs(table.at[f, "Predicted Probability"] - row["prob_" + f]) <= 5e-4 + 1e-6
            assert table.at[f, "Ground Truth"] == (row[f] == 1)
        assert ex.figure.axes[1].get_title() == f"P({label})={row['prob_' + label]:.3f}"
        plt.close(ex.figure)
    assert seen == expected_ids and len(seen) >= 1
    with pytest.raises(vp.DataError, match="not a finding"):
        vp.reference_examples(run_dir, "Lung Lesion")
    # --prevalence overrides the training fold.
    assert next(vp.reference_examples(run_dir, label, prevalence="0.5")).prevalence == 0.5
    plt.close("all")


def test_reference_figure_has_the_fixed_scale_and_every_cell_value():
    import matplotlib.pyplot as plt

    grid = np.array([[-7.5, -5.0, -1.234, 0.0],
                     [0.05, 1.26, 4.99, 9.1],
                     [-0.333, 2.5, -2.5, 3.14159]])
    image = torch.randn(3, 24, 24)
    fig = vp.reference_figure(image, grid, "Effusion", 0.12345, "00000001_000.png")
    plain, heat, bar = fig.axes                               # image, grid, colour bar
    assert plain.get_title() == "00000001_000.png" and heat.get_title() == "P(Effusion)=0.123"
    (mesh,) = heat.collections
    assert mesh.get_clim() == (-5.0, 5.0)                     # fixed, not the grid's range
    assert mesh.cmap.name == "viridis" and mesh.get_alpha() == 0.3
    assert mesh.colorbar is not None and mesh.colorbar.ax is bar
    assert bar.get_ylim() == (-5.0, 5.0)
    # Seaborn's layout: unit cells, row 0 at the top; one text per cell, in .2g.
    assert heat.get_xlim() == (0, 4) and heat.get_ylim() == (3, 0)
    shown = {(t.get_position()[1] - 0.5, t.get_position()[0] - 0.5): t.get_text()
             for t in heat.texts}
    assert len(heat.texts) == grid.size
    expected = ["-7.5", "-5", "-1.2", "0", "0.05", "1.3", "5", "9.1", "-0.33", "2.5", "-2.5",
                "3.1"]
    assert [shown[(i, j)] for i in range(3) for j in range(4)] == expected
    # The de-normalised input, under the cells and stretched over the grid.
    mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
    rgb = np.clip(image.numpy().transpose(1, 2, 0) * std + mean, 0, 1)
    (under,) = heat.images
    assert list(under.get_extent()) == [0, 4, 3, 0] and under.get_zorder() < mesh.get_zorder()
    np.testing.assert_allclose(np.asarray(under.get_array()), rgb, atol=1e-6)
    np.testing.assert_allclose(np.asarray(plain.images[0].get_array()), rgb, atol=1e-6)
    plt.close(fig)


def test_probability_table_sorts_by_probability_with_truth():
    table = vp.probability_table([0.1, 0.9, 0.35, 0.3504, 0.0004], [1, 0, np.nan, 1, 0],
                                 ["A", "B", "C", "D", "E"])
    assert table.index.name == "Finding"
    assert list(table.index) == ["B", "D", "C", "A", "E"]   # by the unrounded value
    assert list(table["Predicted Probability"]) == [0.9, 0.35, 0.35, 0.1, 0.0]
    assert list(table["Ground Truth"]) == [False, True, False, True, False]
    assert table["Ground Truth"].dtype == bool


def test_positive_test_images_keep_the_table_order():
    table = pd.DataFrame({"image_id": ["a", "b", "c", "d", "e"],
                          "fold": ["test", "train", "test", "test", "val"],
                          "Edema": [1.0, 1.0, 0.0, 1.0, 1.0]})
    assert vp.positive_test_images(table, "Edema") == ["a", "d"]
    with pytest.raises(vp.DataError, match="'Mass' is not a finding"):
        vp.positive_test_images(table, "Mass")


def test_reference_gallery_cells_use_the_training_prevalence(run_dir):
    import matplotlib.pyplot as plt

    preds = pd.read_csv(run_dir / "preds.csv").set_index("Image Index")
    label = _train_vs_test_label(run_dir)
    train_rate = _fold_rates(run_dir).at[label, "train"]
    data = Path(json.loads((run_dir / "config.json").read_text())["data"])
    fig = vp.gallery_figure(run_dir, label, top=3, style="reference",
                            boxes=data / "BBox_List_2017.csv")
    n = min(3, len(vp.select_positives(preds.reset_index(), label, top=3)))
    tiles, bar = fig.axes[:-1], fig.axes[-1]
    assert len(tiles) == n and bar.get_ylim() == (-5.0, 5.0)
    for ax in tiles:
        image_id, p_line = ax.get_title().split("\n")[:2]
        prob = preds.at[image_id, "prob_" + label]
        assert p_line == f"P({label})={prob:.3f}"
        assert ax.collections[0].get_clim() == (-5.0, 5.0)
        (text,) = ax.texts                                    # 32 px: one cell
        expected = np.log(prob / train_rate)
        assert abs(float(text.get_text()) - expected) <= 0.05 * abs(expected) + 1e-6
    # The label's boxes on the shown images, scaled from input pixels to the 1x1 grid.
    shown = {ax.get_title().split("\n")[0] for ax in tiles}
    boxes = pd.read_csv(data / "BBox_List_2017.csv").iloc[:, :2].set_axis(["image", "finding"],
                                                                         axis=1)
    boxes["finding"] = boxes["finding"].replace({"Infiltrate": "Infiltration"})
    n_boxes = int((boxes["image"].isin(shown) & (boxes["finding"] == label)).sum())
    patches = [r for ax in tiles for r in ax.patches]
    assert len(patches) == n_boxes
    assert all(0 <= r.get_x() and r.get_x() + r.get_width() <= 1 + 1e-9 for r in patches)
    plt.close(fig)
    with pytest.raises(vp.DataError, match="--method gradcam"):
        vp.gallery_figure(run_dir, label, top=3, style="reference", method="gradcam")


@pytest.mark.slow
def test_reference_cli_prevalence_sources(run_dir, tmp_path, capsys):
    model = build_model(14, "none")
    torch.save({"model": model.state_dict(), "findings": list(NIH_FINDINGS),
                "config": {"image_size": 32, "dataset": "nih"}}, tmp_path / "c.pt")
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 48), dtype=np.uint8)).save(
        tmp_path / "x.png")
    one = ["--style", "reference", "--image", str(tmp_path / "x.png"), "--label", "Effusion",
           "--out", str(tmp_path / "r.png")]
    # A checkpoint that records no training data (e.g. converted): no silent default.
    assert visualize.main([*one, "--checkpoint", str(tmp_path / "c.pt")]) == 2
    err = capsys.readouterr().err
    assert "c.pt: records no training data" in err and "--prevalence" in err
    assert "Traceback" not in err
    assert visualize.main([*one, "--checkpoint", str(tmp_path / "c.pt"),
                           "--prevalence", "0.05"]) == 0
    assert "prevalence of Effusion: 0.0500" in capsys.readouterr().out
    assert Image.open(tmp_path / "r.png").format == "PNG"
    for bad, message in [("1.5", "(0, 1]"), (str(tmp_path / "nope"), "neither a fraction")]:
        assert visualize.main([*one, "--checkpoint", str(tmp_path / "c.pt"),
                               "--prevalence", bad]) == 2
        assert message in capsys.readouterr().err
    # A retrain.py checkpoint records its data: its training fold is the default, and a run
    # folder given to --prevalence means the same.
    label = _train_vs_test_label(run_dir)
    train_rate = _fold_rates(run_dir).at[label, "train"]
    one[one.index("Effusion")] = label
    for extra in ([], ["--prevalence", str(run_dir)]):
        assert visualize.main([*one, "--checkpoint", str(run_dir / "checkpoint.pt"), *extra]) == 0
        assert f"prevalence of {label}: {train_rate:.4f} (training fold of" in \
            capsys.readouterr().out
    assert visualize.main([*one, "--checkpoint", str(run_dir / "checkpoint.pt"), "--method",
                    "gradcam"]) == 2
    assert "--method gradcam" in capsys.readouterr().err
    assert visualize.main(["--checkpoint", str(run_dir / "checkpoint.pt"), "--image",
                    str(tmp_path / "x.png"), "--prevalence", "0.1"]) == 2
    assert "only applies to --style reference" in capsys.readouterr().err
    out = tmp_path / "g.png"
    assert visualize.main(["--run", str(run_dir), "--label", label, "--style", "reference", "--top",
                    "2", "--out", str(out)]) == 0
    assert Image.open(out).format == "PNG"


# --------------------------------------------------------------------------------------------
# Gallery captions: every word readable, nothing over a neighbour or off the figure
# --------------------------------------------------------------------------------------------
LONG_TRUTH = ["Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule",
              "Pneumothorax", "Pleural_Thickening"]


def _run_with_long_truths(run_dir: Path, folder: Path) -> tuple[Path, str]:
    """A copy of the tiny run whose preds.csv gives every test image the 8 findings of
    LONG_TRUTH (so every image is a true positive of Mass); returns (run folder, label)."""
    import shutil

    copy = folder / run_dir.name
    shutil.copytree(run_dir, copy)
    preds = pd.read_csv(copy / "preds.csv")
    preds[list(NIH_FINDINGS)] = 0
    preds[LONG_TRUTH] = 1
    preds.to_csv(copy / "preds.csv", index=False)
    return copy, "Mass"


def _assert_captions_fit(fig) -> None:
    """Each caption (tile title) and the suptitle lie inside the figure and overlap no other
    tile's image or caption; each caption names all 8 findings."""
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    page = fig.bbox
    tiles = [ax for ax in fig.axes if ax.get_title()]
    assert len(tiles) >= 5
    captions = {ax: ax.title.get_window_extent(renderer) for ax in tiles}
    frames = {ax: ax.get_window_extent(renderer) for ax in tiles}
    texts = list(captions.values()) + [fig._suptitle.get_window_extent(renderer)]
    for box in texts:
        assert (box.x0 >= page.x0 - 1 and box.x1 <= page.x1 + 1 and box.y0 >= page.y0 - 1
                and box.y1 <= page.y1 + 1), f"{box} outside the figure {page}"
    for ax, box in captions.items():
        caption = " ".join(ax.get_title().split())
        assert all(f in caption for f in LONG_TRUTH), caption
        for other in tiles:
            if other is not ax:
                assert not box.overlaps(frames[other]), (ax.get_title(), other.get_title())
                assert not box.overlaps(captions[other]), (ax.get_title(), other.get_title())
        suptitle = fig._suptitle.get_window_extent(renderer)
        assert not box.overlaps(suptitle), ax.get_title()


@pytest.mark.parametrize("style", ["heatmap", "reference"])
def test_gallery_captions_with_long_truths_fit_their_tiles(run_dir, tmp_path, style):
    import matplotlib.pyplot as plt

    copy, label = _run_with_long_truths(run_dir, tmp_path)
    extra = {"prevalence": "0.1"} if style == "reference" else {}
    fig = vp.gallery_figure(copy, label, top=6, style=style, **extra)
    try:
        _assert_captions_fit(fig)
    finally:
        plt.close(fig)
