"""CAM: one tensor contraction equal to the reference's loop formulation; the CLI writes a PNG."""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image

import visualize_prediction as vp
from model import build_model


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


def test_cli_writes_heatmap(tmp_path, capsys):
    model = build_model(14, "none")
    torch.save({"model": model.state_dict(), "findings": list(__import__("labels").NIH_FINDINGS),
                "config": {"image_size": 64}}, tmp_path / "c.pt")
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (80, 96), dtype=np.uint8)).save(
        tmp_path / "x.png")
    out = tmp_path / "h.png"
    assert vp.main(["--checkpoint", str(tmp_path / "c.pt"), "--image", str(tmp_path / "x.png"),
                    "--label", "Cardiomegaly", "--out", str(out)]) == 0
    assert Image.open(out).size[0] > 400
    assert "Cardiomegaly" in capsys.readouterr().out
    assert vp.main(["--checkpoint", str(tmp_path / "c.pt"), "--image", str(tmp_path / "x.png"),
                    "--label", "Cardio", "--out", str(out)]) == 2
    assert "not a finding of this model" in capsys.readouterr().err
