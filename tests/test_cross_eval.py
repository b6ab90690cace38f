"""Cross-dataset evaluation: outputs are scored against the right columns of the other label
set, the seven shared findings are used and the rest reported, errors are clear."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.metrics import roc_auc_score
from torch import nn

from chexnet.analysis import cross_eval as ce
from chexnet.data import build_transform, load_xray
from chexnet.labels import CHEXPHOTO_FINDINGS, NIH_FINDINGS, NIH_TO_CHEXPERT
from chexnet.model import build_model


pytestmark = pytest.mark.usefixtures("one_thread")

SIZE = 32


class RowMeans(nn.Module):
    """A fake model whose logit k is the mean of input row k (channel 0): a known, different
    function of the image for every output, so a column mix-up changes the AUCs."""

    def __init__(self, k: int):
        super().__init__()
        self.k = k

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, 0, :self.k, :].mean(dim=2)                 # (B, K)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from chexnet.datatools.demo import make_chexphoto_demo, make_nih_demo

    root = tmp_path_factory.mktemp("cross")
    make_nih_demo(root / "nih", n_images=30, size=SIZE, seed=4)
    make_chexphoto_demo(root / "photo", n_train=12, n_valid=45, size=SIZE, seed=1)
    return root


def test_pairs_are_the_seven_shared_findings():
    pairs, left = ce.finding_pairs(NIH_FINDINGS, CHEXPHOTO_FINDINGS)
    assert sorted(pairs) == sorted(NIH_TO_CHEXPERT.items())
    assert ("Effusion", "Pleural Effusion") in pairs
    reasons = {name: reason for name, _, reason in left}
    assert set(reasons) == (set(NIH_FINDINGS) - set(NIH_TO_CHEXPERT)) | (
        set(CHEXPHOTO_FINDINGS) - set(NIH_TO_CHEXPERT.values()))
    assert "Lung Lesion" in reasons["Mass"] and "not merged" in reasons["Nodule"]
    assert "not merged" in reasons["Lung Lesion"]
    back, back_left = ce.finding_pairs(CHEXPHOTO_FINDINGS, NIH_FINDINGS)
    assert sorted(back) == sorted((v, k) for k, v in NIH_TO_CHEXPERT.items())
    assert len(back_left) == len(left)
    same, none_left = ce.finding_pairs(NIH_FINDINGS, NIH_FINDINGS)
    assert same == [(f, f) for f in NIH_FINDINGS] and none_left == []


def test_nih_outputs_are_scored_against_chexpert_columns(data):
    table, findings = ce.load_target("chexphoto", str(data / "photo"))
    assert findings == list(CHEXPHOTO_FINDINGS)
    result, left = ce.cross_evaluate(RowMeans(len(NIH_FINDINGS)), NIH_FINDINGS, SIZE, table,
                                     findings, "test", n_boot=50)
    test = table[table["fold"] == "test"]
    # Expected AUCs from the CSV and the images directly, not through the module.
    valid = pd.read_csv(data / "photo" / "CheXphoto-v1.1" / "valid.csv")
    valid = valid[valid["Frontal/Lateral"] == "Frontal"]
    assert len(valid) == len(test)
    transform = build_transform(SIZE)
    images = torch.stack([transform(load_xray(data / "photo" / p)) for p in valid["Path"]])
    rows = images[:, 0].mean(dim=2).numpy()                   # (N, S): the fake logits
    body = result.set_index("model_finding")
    assert len(body) == 8 and body.index[-1] == "mean"        # 7 findings + mean
    assert body.loc["Effusion", "dataset_finding"] == "Pleural Effusion"
    checked = 0
    for nih, chexpert in NIH_TO_CHEXPERT.items():
        truth = valid[chexpert].to_numpy()
        if 0 < truth.sum() < len(truth):
            expected = roc_auc_score(truth, rows[:, NIH_FINDINGS.index(nih)])
            assert body.loc[nih, "auc"] == pytest.approx(expected)
            assert body.loc[nih, "n_pos"] == truth.sum()
            checked += 1
        else:
            assert np.isnan(body.loc[nih, "auc"])
    assert checked >= 3 and 0 < valid["Pleural Effusion"].sum() < len(valid)
    assert body.loc["mean", "auc"] == pytest.approx(body["auc"].iloc[:-1].mean())
    assert ("Mass", "model") in {(n, s) for n, s, _ in left}


def test_reverse_direction_and_the_cli(data, tmp_path, capsys):
    torch.manual_seed(0)
    photo_ckpt = tmp_path / "photo.pt"
    torch.save({"model": build_model(len(CHEXPHOTO_FINDINGS), "none").state_dict(),
                "findings": list(CHEXPHOTO_FINDINGS),
                "config": {"image_size": SIZE, "dataset": "chexphoto"}}, photo_ckpt)
    out = tmp_path / "cross.csv"
    assert ce.main(["--checkpoint", str(photo_ckpt), "--dataset", "demo", "--data",
                    str(data / "nih"), "--fold", "all", "--out", str(out), "--n-boot", "20"]) == 0
    printed = capsys.readouterr().out
    result = pd.read_csv(out)
    assert list(result.columns) == ["model_finding", "dataset_finding", "auc", "ci_low",
                                    "ci_high", "n_pos", "n_neg"]
    assert sorted(zip(result["model_finding"][:-1], result["dataset_finding"][:-1])) == sorted(
        (v, k) for k, v in NIH_TO_CHEXPERT.items())
    assert (result["n_pos"][:-1] + result["n_neg"][:-1] == 30).all()   # every image, fold all
    assert "used 7 findings" in printed and "Pleural Effusion -> Effusion" in printed
    assert "Lung Lesion (model output): no NIH counterpart" in printed
    assert "Mass (dataset label)" in printed


def test_cli_errors(data, tmp_path, capsys):
    assert ce.main(["--checkpoint", str(tmp_path / "none.pt"), "--dataset", "chexphoto",
                    "--data", str(data / "photo")]) == 2
    assert "none.pt" in capsys.readouterr().err
    ckpt = tmp_path / "c.pt"
    torch.save({"model": build_model(14, "none").state_dict(), "findings": list(NIH_FINDINGS),
                "config": {"image_size": SIZE}}, ckpt)
    assert ce.main(["--checkpoint", str(ckpt), "--dataset", "chexphoto", "--data",
                    str(tmp_path / "nowhere")]) == 2
    assert "nowhere" in capsys.readouterr().err
    table, findings = ce.load_target("chexphoto", str(data / "photo"))
    with pytest.raises(ce.DataError, match="share none"):
        ce.cross_evaluate(RowMeans(2), ["Hernia", "Mass"], SIZE, table, findings)
    with pytest.raises(ce.DataError, match="val fold .* is empty"):
        ce.cross_evaluate(RowMeans(14), NIH_FINDINGS, SIZE, table.assign(fold="test"),
                          findings, "val")
