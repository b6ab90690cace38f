"""convert_checkpoint.py on synthetic reproduce-chexnet and arnoweng/CheXNet checkpoints.

The original files are not available, so each test builds one with the same structure and key
names: a torchvision DenseNet-121 whose head is Sequential(Linear(1024, 14), Sigmoid()), with
BatchNorm statistics perturbed so that a conversion that dropped or misplaced any weight would
change the outputs.
"""
from __future__ import annotations

import copy
import re
from collections import OrderedDict

import pytest
import torch
from torch import nn

from chexnet.datatools import convert_checkpoint as cc
from chexnet.analysis import cam
from conftest import reference_densenet
from chexnet.labels import NIH_FINDINGS
from chexnet.model import build_model


def old_torchvision_keys(state: dict) -> dict:
    """Rename to pre-0.4 torchvision (`norm.1`, `conv.2`), add arnoweng's prefixes, and drop
    `num_batches_tracked` (absent before PyTorch 0.4.1)."""
    out = {}
    for key, value in state.items():
        if key.endswith("num_batches_tracked"):
            continue
        key = re.sub(r"(denselayer\d+\.(?:norm|relu|conv))([12])\.", r"\1.\2.", key)
        out["module.densenet121." + key] = value
    return out


def as_2018_pickle(net: nn.Module) -> nn.Module:
    """A copy laid out like a model pickled by PyTorch 0.4.0 / torchvision 0.2 (what
    reproduce-chexnet ran on): dense-layer children named `norm.1` ... `conv.2`, and BatchNorm
    without the `num_batches_tracked` buffer. It can no longer run forward; only its weights
    matter to the converter."""
    old = copy.deepcopy(net)
    for module in old.modules():
        if type(module).__name__ == "_DenseLayer":
            module._modules = OrderedDict(
                (re.sub(r"^(norm|relu|conv)([12])$", r"\1.\2", name), child)
                for name, child in module._modules.items())
        if isinstance(module, nn.BatchNorm2d):
            del module._buffers["num_batches_tracked"]
    return old


@pytest.fixture(scope="module")
def ref() -> nn.Module:
    return reference_densenet()


@pytest.fixture(scope="module")
def x() -> torch.Tensor:
    return torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))


def converted_model(path) -> nn.Module:
    return build_model(len(NIH_FINDINGS), str(path)).eval()


@pytest.mark.parametrize("layout", ["current", "2018"])
def test_reproduce_chexnet_pickle_needs_trust_then_matches(tmp_path, ref, x, capsys, layout):
    src = tmp_path / "checkpoint"
    pickled = ref if layout == "current" else as_2018_pickle(ref)
    if layout == "2018":
        assert "features.denseblock1.denselayer1.conv.2.weight" in pickled.state_dict()
    torch.save({"model": pickled, "best_loss": 0.15, "epoch": 7,
                "rng_state": torch.get_rng_state(), "LR": 0.001}, src)
    out = tmp_path / "converted.pt"

    assert cc.main([str(src), str(out)]) == 2
    err = capsys.readouterr().err
    assert str(src) in err and "--trust-pickle" in err and "trust" in err
    assert not out.exists()

    assert cc.main([str(src), str(out), "--trust-pickle"]) == 0
    assert "reproduce-chexnet" in capsys.readouterr().out
    state = torch.load(out, map_location="cpu", weights_only=True)
    assert state["findings"] == list(NIH_FINDINGS)
    assert state["epoch"] is None and state["val_loss"] is None
    assert state["config"]["image_size"] == 224 and state["config"]["dataset"] == "nih"
    assert state["config"]["source_format"] == "reproduce-chexnet"
    assert state["config"]["converted_from"] == str(src)
    assert state["config"]["source_epoch"] == 7
    with torch.inference_mode():
        # The reference outputs probabilities; ours are logits with the sigmoid applied later.
        torch.testing.assert_close(torch.sigmoid(converted_model(out)(x)), ref(x))


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_arnoweng_state_dict_with_old_names_matches(tmp_path, ref, x, zip_format):
    renamed = old_torchvision_keys(ref.state_dict())
    assert "module.densenet121.features.denseblock1.denselayer1.norm.1.weight" in renamed
    assert "module.densenet121.classifier.0.weight" in renamed
    src = tmp_path / "model.pth.tar"
    torch.save({"epoch": 3, "arch": "densenet121", "state_dict": renamed, "best_loss": 0.2},
               src, _use_new_zipfile_serialization=zip_format)
    out = tmp_path / "sub" / "converted.pt"
    checkpoint, source = cc.convert(src, out, image_size=256)
    assert source.source_format == "arnoweng-chexnet"
    assert any("num_batches_tracked" in note for note in source.notes)
    assert checkpoint["config"]["image_size"] == 256
    with torch.inference_mode():
        torch.testing.assert_close(torch.sigmoid(converted_model(out)(x)), ref(x))
    # Converted files load as retrain.py checkpoints everywhere in the project.
    model, findings, size, _ = cam.load_trained_model(out)
    assert findings == list(NIH_FINDINGS) and size == 256
    assert not list(out.parent.glob("*.tmp")), "temp file left behind"


@pytest.mark.parametrize("prefix", ["", "module."])
def test_bare_state_dict(tmp_path, x, prefix):
    torch.manual_seed(3)
    net = build_model(len(NIH_FINDINGS), "none").eval()
    src = tmp_path / "bare.pt"
    torch.save({prefix + k: v for k, v in net.state_dict().items()}, src)
    out = tmp_path / "out.pt"
    assert cc.main([str(src), str(out)]) == 0
    with torch.inference_mode():
        torch.testing.assert_close(converted_model(out)(x), net(x))
    state = torch.load(out, map_location="cpu", weights_only=True)
    assert state["config"]["source_format"] == "state-dict"


@pytest.mark.parametrize("change, listed", [
    ("drop", "features.denseblock2.denselayer3.conv1.weight"),
    ("extra", "features.extra_layer.weight"),
    ("shape", "classifier.bias"),
])
def test_key_mismatch_is_an_error_listing_the_key(tmp_path, capsys, change, listed):
    state = old_torchvision_keys(build_model(len(NIH_FINDINGS), "none").state_dict())
    if change == "drop":
        del state["module.densenet121.features.denseblock2.denselayer3.conv.1.weight"]
    elif change == "extra":
        state["module.densenet121.features.extra_layer.weight"] = torch.zeros(3)
    else:
        state["module.densenet121.classifier.bias"] = torch.zeros(5)
    src = tmp_path / "broken.pt"
    torch.save({"state_dict": state}, src)
    out = tmp_path / "out.pt"
    assert cc.main([str(src), str(out)]) == 2
    err = capsys.readouterr().err
    assert str(src) in err and listed in err
    assert {"drop": "1 missing", "extra": "1 unexpected", "shape": "wrong shape"}[change] in err
    assert not out.exists()


def test_unreadable_inputs_exit_2_naming_the_file(tmp_path, capsys):
    text = tmp_path / "notes.txt"
    text.write_text("not a checkpoint\n")
    truncated = tmp_path / "truncated.pt"
    torch.save({"a": torch.zeros(1000)}, tmp_path / "whole.pt")
    truncated.write_bytes((tmp_path / "whole.pt").read_bytes()[:500])
    torch.save({"epoch": 3, "notes": ["no weights here"]}, tmp_path / "no_weights.pt")
    for path, words in [(tmp_path / "absent.pt", "not found"),
                        (text, "not a PyTorch checkpoint"),
                        (truncated, "truncated or corrupt"),
                        (tmp_path / "no_weights.pt", "no model weights"),
                        (tmp_path / "whole.pt", "1 unexpected: a")]:
        assert cc.main([str(path), str(tmp_path / "out.pt")]) == 2
        err = capsys.readouterr().err
        assert str(path) in err and words in err, err
    assert not (tmp_path / "out.pt").exists()


def test_convert_key_examples():
    assert cc.convert_key("module.densenet121.features.denseblock4.denselayer16.conv.2.weight") \
        == "features.denseblock4.denselayer16.conv2.weight"
    assert cc.convert_key("module.densenet121.classifier.0.bias") == "classifier.bias"
    assert cc.convert_key("features.transition1.norm.weight") == "features.transition1.norm.weight"
    assert cc.convert_key("module.features.norm5.running_var") == "features.norm5.running_var"
