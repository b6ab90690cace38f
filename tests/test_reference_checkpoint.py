"""Acceptance: a reproduce-chexnet checkpoint, converted, gives reproduce-chexnet's probabilities.

reproduce-chexnet pickles its whole model: torchvision DenseNet-121 whose classifier is
`Sequential(Linear(1024, 14), Sigmoid())`, saved as `{'model', 'best_loss', 'epoch',
'rng_state', 'LR'}`. Its weights are not available, so the model here has random weights and
random BatchNorm running statistics (so that eval mode matters). The checkpoint goes through
`convert_checkpoint.py --trust-pickle` and `predict.py --out`, and every probability of the CSV
is compared with reproduce-chexnet's own inference pipeline, written out independently below:
`Image.open(path).convert('RGB')` -> torchvision v1 `Resize(224)`, `CenterCrop(224)`,
`ToTensor()`, `Normalize(ImageNet)` -> the pickled model in eval mode, Sigmoid head included.
"""
from __future__ import annotations

import csv
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn
from torchvision import transforms

from chexnet.datatools import convert_checkpoint
from chexnet.analysis import predict
from conftest import reference_densenet, shared

# reproduce-chexnet's finding order and preds.csv columns (its pretrained/preds.csv header).
FINDINGS = ["Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule",
            "Pneumonia", "Pneumothorax", "Consolidation", "Edema", "Emphysema", "Fibrosis",
            "Pleural_Thickening", "Hernia"]
HEADER = ["Image Index"] + [f"prob_{f}" for f in FINDINGS]
RGBA_NIH = ["00000100_000.png", "00001369_000.png"]   # the two RGBA files of the sample
TOLERANCE = 1e-5


def reference_probs(model: nn.Module, paths) -> np.ndarray:
    """reproduce-chexnet's inference on image files: (N, 14) probabilities."""
    tf = transforms.Compose([
        transforms.Resize(224), transforms.CenterCrop(224), transforms.ToTensor(),
        transforms.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])])
    x = torch.stack([tf(Image.open(p).convert("RGB")) for p in paths])
    with torch.no_grad():
        return model(x).numpy().astype(np.float64)


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> tuple:
    """(the reference model, its reproduce-chexnet checkpoint converted by the CLI)."""
    model = reference_densenet()
    folder = tmp_path_factory.mktemp("reference")
    src, out = folder / "checkpoint", folder / "converted.pt"
    torch.save({"model": model, "best_loss": 0.1623, "epoch": 7,
                "rng_state": torch.get_rng_state(), "LR": 0.001}, src)
    assert convert_checkpoint.main([str(src), str(out), "--trust-pickle"]) == 0
    return model, out


def read_csv(path) -> tuple[list[str], list[str], np.ndarray]:
    """(header, first column, the other columns as floats) of a CSV, read with the csv module."""
    with open(path, newline="") as f:
        header, *rows = list(csv.reader(f))
    return header, [r[0] for r in rows], np.array([[float(v) for v in r[1:]] for r in rows])


def run_predict(checkpoint, inputs, out, capsys) -> tuple[int, str]:
    """predict.py --out in batches of 5 (so that the last batch is partial); (exit, stderr)."""
    code = predict.main([*map(str, inputs), "--checkpoint", str(checkpoint), "--out", str(out),
                         "--batch-size", "5"])
    return code, capsys.readouterr().err


def check_against_reference(model, out, files) -> float:
    """The CSV at `out` has exactly HEADER, one row per file in `files`' order, and the
    reference's probabilities. Returns the largest absolute difference."""
    header, ids, probs = read_csv(out)
    assert header == HEADER
    assert ids == [p.name for p in files]
    expected = reference_probs(model, files)
    # The comparison has power: the outputs are not saturated, and every image's row differs
    # from every other's by far more than the tolerance (a row mix-up would be seen).
    assert 0.02 < expected.min() and expected.max() < 0.98
    apart = np.abs(expected[:, None] - expected[None]).max(-1) + np.eye(len(files))
    assert apart.min() > 1e-3
    diff = float(np.abs(probs - expected).max())
    assert probs.shape == expected.shape and diff < TOLERANCE, diff
    return diff


@pytest.mark.slow
def test_real_nih_pngs_match_reproduce_chexnet(tmp_path, converted, capsys):
    """12 real NIH PNGs (both RGBA files among them), given as a folder."""
    source = shared("nih", "images")
    names = sorted(p.name for p in source.glob("*.png"))
    chosen = sorted(set(RGBA_NIH) | set([n for n in names if n not in RGBA_NIH][:10]))
    assert len(chosen) == 12 and set(RGBA_NIH) <= set(chosen)
    folder = tmp_path / "images"
    folder.mkdir()
    for name in chosen:
        shutil.copy(source / name, folder / name)
    assert {n: Image.open(folder / n).mode for n in RGBA_NIH} == dict.fromkeys(RGBA_NIH, "RGBA")
    model, checkpoint = converted

    code, err = run_predict(checkpoint, [folder], tmp_path / "preds.csv", capsys)
    assert code == 0, err
    diff = check_against_reference(model, tmp_path / "preds.csv", [folder / n for n in chosen])
    print(f"max |predict.py - reproduce-chexnet| over {len(chosen)} NIH images x 14: {diff:.2e}")
    # Same columns as reproduce-chexnet's published pretrained/preds.csv.
    with open(shared("reference", "reproduce_chexnet_pretrained_preds.csv"), newline="") as f:
        assert next(csv.reader(f)) == HEADER


def test_generated_images_match_reproduce_chexnet(tmp_path, converted, capsys):
    """Runs everywhere: grey PNG and JPEG, an opaque RGBA PNG, a palette PNG, not square (so
    that Resize and CenterCrop both act), plus a corrupt file that is reported and left out."""
    rng = np.random.default_rng(5)
    def gray(h, w):
        coarse = rng.integers(0, 256, (5, 4)).astype(np.uint8)
        smooth = np.asarray(Image.fromarray(coarse).resize((w, h), Image.BILINEAR), np.int64)
        return np.clip(smooth + rng.integers(-25, 26, (h, w)), 0, 255).astype(np.uint8)
    folder = tmp_path / "in"
    (folder / "sub").mkdir(parents=True)
    files = [folder / "a_grey.png", folder / "b_rgba.png", folder / "sub" / "c_grey.jpg",
             folder / "sub" / "d_palette.png"]
    Image.fromarray(gray(300, 250), "L").save(files[0])
    g = gray(240, 320)
    Image.fromarray(np.dstack([g, g, g, np.full_like(g, 255)]), "RGBA").save(files[1])
    Image.fromarray(gray(260, 236), "L").save(files[2], quality=95)
    Image.fromarray(gray(250, 280), "L").convert("P").save(files[3])
    assert [Image.open(f).mode for f in files] == ["L", "RGBA", "L", "P"]
    (folder / "sub" / "broken.png").write_bytes(files[0].read_bytes()[:100])
    model, checkpoint = converted

    code, err = run_predict(checkpoint, [folder], tmp_path / "preds.csv", capsys)
    assert code == 2
    assert f"{folder / 'sub' / 'broken.png'}: not a readable" in err
    check_against_reference(model, tmp_path / "preds.csv", files)
