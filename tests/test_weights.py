"""--weights: ImageNet download failing offline with a useful message, placed files, PATH."""
from __future__ import annotations

import urllib.error

import pytest
import torch
import torchvision

import model as model_mod
from model import WeightsUnavailable, build_model, imagenet_weights_path


@pytest.fixture
def torch_home(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    return tmp_path / "torch"


def test_imagenet_offline_says_where_to_put_the_file(torch_home, monkeypatch):
    def offline(url, *args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    # The network boundary: torch.hub's downloader.
    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(WeightsUnavailable) as err:
        build_model(14, "imagenet")
    message = str(err.value)
    assert str(imagenet_weights_path()) in message
    assert str(torch_home) in message
    assert "--weights none" in message and "densenet121-a639ec97.pth" in message


def test_imagenet_uses_a_placed_file(torch_home):
    reference = torchvision.models.densenet121(weights=None)
    path = imagenet_weights_path()
    path.parent.mkdir(parents=True)
    torch.save(reference.state_dict(), path)
    net = build_model(14, "imagenet")
    torch.testing.assert_close(net.features.conv0.weight, reference.features.conv0.weight)
    assert net.classifier.out_features == 14


def test_weights_path_round_trip(tmp_path):
    torch.manual_seed(0)
    a = build_model(14, "none")
    torch.save({"model": a.state_dict(), "epoch": 3}, tmp_path / "ckpt.pt")
    b = build_model(14, str(tmp_path / "ckpt.pt"))
    x = torch.randn(2, 3, 32, 32)
    a.eval(), b.eval()
    torch.testing.assert_close(a(x), b(x))


def test_weights_path_with_wrong_keys_is_an_error(tmp_path):
    state = build_model(14, "none").state_dict()
    state = {"module.densenet121." + k: v for k, v in state.items()}
    torch.save(state, tmp_path / "foreign.pt")
    with pytest.raises(RuntimeError, match="Missing keys"):
        build_model(14, str(tmp_path / "foreign.pt"))
    with pytest.raises(FileNotFoundError, match="not found"):
        build_model(14, str(tmp_path / "absent.pt"))


def test_masked_loss_equals_bce_without_mask_and_ignores_nan():
    logits = torch.randn(4, 3)
    target = torch.randint(0, 2, (4, 3)).float()
    torch.testing.assert_close(model_mod.masked_bce_with_logits(logits, target),
                               torch.nn.BCEWithLogitsLoss()(logits, target))
    masked = target.clone()
    masked[0, 0] = float("nan")
    keep = ~torch.isnan(masked)
    expected = torch.nn.functional.binary_cross_entropy_with_logits(logits[keep], target[keep])
    torch.testing.assert_close(model_mod.masked_bce_with_logits(logits, masked), expected)
