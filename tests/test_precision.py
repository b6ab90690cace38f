"""AMP, channels_last, compile fallback and batch-size search: the CPU-testable code paths."""
from __future__ import annotations

import pandas as pd
import pytest
import torch

from chexnet import train as training
from chexnet.model import build_model, masked_bce_with_logits
from chexnet.runs import EpochProgress
from chexnet.runtime import Precision
import retrain
from conftest import nih_demo
from chexnet import runtime

FAST = ["--image-size", "32", "--batch-size", "8", "--eval-batch-size", "16", "--weights", "none",
        "--workers", "0", "--epochs", "1"]


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory):
    return nih_demo(tmp_path_factory, n_images=40, size=40, seed=4)


def train(root, out, name, *extra):
    code = retrain.main(["--dataset", "demo", "--data", str(root), "--out", str(out), "--name",
                         name, *FAST, *extra])
    return code, out / name


def test_resolve_amp():
    cpu = torch.device("cpu")
    assert runtime.resolve_amp("auto", cpu) is None
    assert runtime.resolve_amp("off", cpu) is None
    assert runtime.resolve_amp("bf16", cpu) is torch.bfloat16
    with pytest.raises(ValueError, match="needs a CUDA GPU"):
        runtime.resolve_amp("fp16", cpu)
    assert not runtime.grad_scaler(cpu, torch.bfloat16).is_enabled()


@pytest.mark.slow  # trains twice
def test_bf16_autocast_and_channels_last_train_close_to_fp32(demo_root, tmp_path):
    code, ref = train(demo_root, tmp_path, "fp32")
    assert code == 0
    code, amp = train(demo_root, tmp_path, "bf16", "--amp", "bf16")
    assert code == 0
    code, nhwc = train(demo_root, tmp_path, "nhwc", "--channels-last")
    assert code == 0
    a, b, c = (pd.read_csv(r / "log_train.csv") for r in (ref, amp, nhwc))
    # bf16 keeps 8 bits of mantissa: same trajectory to within a few percent after one epoch.
    assert b["val_loss"][0] == pytest.approx(a["val_loss"][0], rel=0.05)
    assert b["val_loss"][0] != a["val_loss"][0]  # autocast really ran
    # Layout only: other conv kernels, so float rounding differs and compounds over an epoch.
    assert c["val_loss"][0] == pytest.approx(a["val_loss"][0], rel=0.05)
    state = torch.load(nhwc / "checkpoint.pt", weights_only=True)
    assert state["config"]["channels_last"] is True


def test_channels_last_forward_equals_nchw():
    torch.manual_seed(0)
    net = build_model(14, "none").eval()
    x = torch.randn(4, 3, 64, 64)
    ref = net(x)
    nhwc = Precision(channels_last=True)
    out = net.to(memory_format=torch.channels_last)(nhwc.prepare(x))
    assert nhwc.prepare(x).is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)


def test_fp16_on_cpu_is_refused_clearly(demo_root, tmp_path, capsys):
    with pytest.raises(ValueError, match="needs a CUDA GPU"):
        train(demo_root, tmp_path, "fp16", "--amp", "fp16")


def test_compile_falls_back_with_a_message(demo_root, tmp_path, capsys, monkeypatch):
    def broken(model):
        raise RuntimeError("no C++ compiler")

    monkeypatch.setattr(torch, "compile", broken)
    code, _ = train(demo_root, tmp_path, "c", "--compile")
    assert code == 0
    assert "torch.compile is unavailable here (no C++ compiler); running uncompiled" in \
        capsys.readouterr().out


def test_largest_fitting_batch_and_lr_rule():
    assert runtime.largest_fitting_batch(lambda b: b <= 200) == 128
    assert runtime.largest_fitting_batch(lambda b: False) == 16
    assert runtime.largest_fitting_batch(lambda b: True, limit=512) == 512
    assert runtime.scaled_lr(0.01, 64) == pytest.approx(0.04)


def test_batch_size_auto_on_cpu_keeps_the_reference_batch(demo_root, tmp_path, capsys):
    code, run = train(demo_root, tmp_path, "auto", "--batch-size", "auto")
    assert code == 0
    state = torch.load(run / "checkpoint.pt", weights_only=True)
    assert state["config"]["batch_size"] == 16 and state["config"]["lr"] == 0.01
    assert "--batch-size auto: 16" in capsys.readouterr().out


def test_memory_efficient_densenet_matches_standard():
    torch.manual_seed(0)
    a = build_model(14, "none")
    b = build_model(14, "none", memory_efficient=True)
    b.load_state_dict(a.state_dict())
    x = torch.randn(2, 3, 64, 64)
    a.eval(), b.eval()
    torch.testing.assert_close(a(x), b(x))


class _Linear(torch.nn.Module):
    """A tiny 14-output model on 3 x 4 x 4 images, to drive train_one_epoch / evaluate."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc = torch.nn.Linear(48, 14)

    def forward(self, x):
        return self.fc(x.flatten(1))


def naive_flips(images: torch.Tensor, seed: int) -> torch.Tensor:
    """The documented augmentation, written out image by image: one uniform draw per image from
    a generator seeded with `seed`; below 0.5 the image is mirrored left-right."""
    draws = torch.rand(len(images), generator=torch.Generator().manual_seed(seed))
    out = images.clone()
    for i in range(len(images)):
        if draws[i] < 0.5:
            out[i] = torch.stack([images[i][:, :, w] for w in reversed(range(images.shape[-1]))],
                                 dim=-1)
    return out


def naive_normalize(images: torch.Tensor) -> torch.Tensor:
    """uint8 (B, 1, H, W) -> what ToTensor + Normalize give, with ImageNet's numbers as
    literals, pixel by pixel in float64 (then float32): an independent model_input."""
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    x = images.double() / 255
    return torch.cat([(x - m) / s for m, s in zip(mean, std)], dim=1).float()


def _batches(n_batches: int, poison: int | None = None):
    """uint8 grey batches, as the project's loaders give; `poison`: an infinite target in that
    batch, so its loss is not finite."""
    g = torch.Generator().manual_seed(1)
    out = []
    for b in range(n_batches):
        images = torch.randint(0, 256, (4, 1, 4, 4), generator=g, dtype=torch.uint8)
        targets = (torch.rand(4, 14, generator=g) > 0.7).float()
        if b == poison:
            targets[0, 0] = float("inf")
        targets[0, 3] = float("nan")  # a masked label: not counted
        out.append((images, targets, [f"img{b}_{i}.png" for i in range(4)]))
    return out


def test_train_step_bookkeeping_and_a_non_finite_step_changes_no_weight():
    """One read-back per step (after the backward): the logged loss is still the mean per
    labelled entry, and a non-finite loss stops before the optimizer touches the weights."""
    model = _Linear()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)  # weights fixed: the loss can be replayed
    progress = EpochProgress(1)
    batches = _batches(3)
    training.train_one_epoch(model, batches, opt, torch.device("cpu"), progress)
    assert progress.batches == 3 and progress.count == 3 * (4 * 14 - 1)
    with torch.no_grad():  # replay: the documented per-batch flips, the loss summed per entry
        want = sum(float(masked_bce_with_logits(
            model(naive_normalize(naive_flips(x, (0 * 1_000_003 + 1) * 100_003 + b))), y,
            reduction="sum")) for b, (x, y, _) in enumerate(batches))
        unflipped = sum(float(masked_bce_with_logits(model(naive_normalize(x)), y,
                                                              reduction="sum"))
                        for x, y, _ in batches)
    assert progress.loss_sum == pytest.approx(want, rel=1e-5)
    assert abs(unflipped - want) > 1e-3 * abs(want)  # the flips are really applied

    model = _Linear()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    progress = EpochProgress(1)
    good = _batches(1)
    training.train_one_epoch(model, good, opt, torch.device("cpu"), progress)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    momentum = opt.state[model.fc.weight]["momentum_buffer"].clone()
    with pytest.raises(training.NonFiniteLoss, match="img0_0.png"):
        training.train_one_epoch(model, _batches(1, poison=0), opt, torch.device("cpu"), progress)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert torch.equal(opt.state[model.fc.weight]["momentum_buffer"], momentum)
    assert progress.batches == 1  # the bad step is not counted either
