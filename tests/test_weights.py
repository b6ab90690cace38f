"""--weights: ImageNet download failing offline with a useful message, placed files, PATH."""
from __future__ import annotations

import urllib.error

import pytest
import torch
import torchvision

from chexnet import model as model_mod
from chexnet.model import WeightsUnavailable, build_model, imagenet_weights_path


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
    state = {"backbone." + k: v for k, v in state.items()}  # some other model's names
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


# --------------------------------------------------------------------------------------------
# Foreign checkpoints given to --weights: a message that points to convert_checkpoint.py
# --------------------------------------------------------------------------------------------
def reproduce_chexnet_pickle(path):
    """reproduce-chexnet's checkpoint: the whole model object pickled, Sigmoid head."""
    model = torchvision.models.densenet121(weights=None)
    model.classifier = torch.nn.Sequential(torch.nn.Linear(1024, 14), torch.nn.Sigmoid())
    torch.save({"model": model, "best_loss": 0.15, "epoch": 6, "LR": 0.001}, path)


def arnoweng_state_dict(path):
    """arnoweng/CheXNet's model.pth.tar: DataParallel prefix and old DenseNet key names."""
    state = torchvision.models.densenet121(weights=None).state_dict()
    old = {"module.densenet121." + k.replace("norm1", "norm.1").replace("conv1", "conv.1"): v
           for k, v in state.items()}
    torch.save({"epoch": 1, "state_dict": old}, path)


def test_a_reproduce_chexnet_pickle_is_refused_with_the_conversion_command(tmp_path):
    path = tmp_path / "reference_checkpoint"
    reproduce_chexnet_pickle(path)
    with pytest.raises(WeightsUnavailable) as err:
        build_model(14, str(path))
    message = str(err.value)
    assert f"python convert_checkpoint.py {path} converted.pt --trust-pickle" in message
    assert "weights_only=False" not in message and "pickled model" in message


def test_an_arnoweng_checkpoint_is_refused_with_the_conversion_command(tmp_path):
    path = tmp_path / "model.pth.tar"
    arnoweng_state_dict(path)
    with pytest.raises(WeightsUnavailable, match="arnoweng/CheXNet-style") as err:
        build_model(14, str(path))
    assert f"python convert_checkpoint.py {path} converted.pt" in str(err.value)


@pytest.mark.parametrize("make", ["pickle", "arnoweng", "text", "mismatch"])
def test_retrain_weights_foreign_files_exit_2_without_a_traceback(tmp_path, capsys, make):
    import retrain
    from chexnet.datatools.demo import make_nih_demo

    path = tmp_path / "weights.pt"
    if make == "pickle":
        reproduce_chexnet_pickle(path)
    elif make == "arnoweng":
        arnoweng_state_dict(path)
    elif make == "text":
        path.write_text("not a checkpoint")
    else:
        torch.save({"features.conv0.weight": torch.zeros(1)}, path)
    data = tmp_path / "data"
    make_nih_demo(data, n_images=12, size=16, seed=0)
    code = retrain.main(["--dataset", "demo", "--data", str(data), "--out", str(tmp_path / "o"),
                         "--weights", str(path), "--image-size", "32", "--epochs", "1"])
    err = capsys.readouterr().err
    assert code == 2 and str(path) in err and "Traceback" not in err
    assert "weights_only=False" not in err
    assert "convert_checkpoint.py" in err or "not a PyTorch checkpoint" in err
