"""The LR decay / early-stopping schedule on scripted loss sequences."""
from __future__ import annotations

import re

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import shared
from chexnet.train import PlateauSchedule


def run(losses, decay=10.0, patience=3):
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([param], lr=0.01, momentum=0.9)
    sched = PlateauSchedule(opt, decay, patience)
    lrs, stop_at = [], None
    for epoch, loss in enumerate(losses, start=1):
        lrs.append(opt.param_groups[0]["lr"])
        if sched.step(loss)["stop"]:
            stop_at = epoch
            break
    return lrs, stop_at, sched


def test_decay_after_each_epoch_without_improvement_and_stop_after_patience():
    # best at 2; 3, 4, 5 do not improve -> lr /10 after each, stop at 5 (5 - 2 >= 3)
    lrs, stop_at, sched = run([0.5, 0.4, 0.45, 0.41, 0.42, 0.1])
    assert lrs == pytest.approx([0.01, 0.01, 0.01, 1e-3, 1e-4])
    assert stop_at == 5
    assert sched.best_epoch == 2 and sched.best_loss == 0.4


def test_improvement_resets_patience():
    lrs, stop_at, _ = run([0.5, 0.6, 0.7, 0.3, 0.35, 0.36, 0.2, 0.21, 0.22, 0.23])
    assert lrs == pytest.approx([0.01, 0.01, 1e-3, 1e-4, 1e-4, 1e-5, 1e-6, 1e-6, 1e-7, 1e-8])
    assert stop_at == 10


def test_equal_loss_is_not_an_improvement():
    _, stop_at, sched = run([0.5, 0.5, 0.5, 0.5])
    assert stop_at == 4 and sched.best_epoch == 1


def test_custom_decay_and_patience():
    lrs, stop_at, _ = run([1.0, 2.0, 3.0], decay=2.0, patience=1)
    assert lrs == pytest.approx([0.01, 0.01]) and stop_at == 2


def reference_train_model(val_losses, lr=0.01):
    """reproduce-chexnet's train_model() bookkeeping, written as it is there: decay on
    `epoch_loss > best_loss` (building a new optimizer), checkpoint on `epoch_loss < best_loss`,
    break when `epoch - best_epoch >= 3`. Returns (lr of each epoch, best epoch, stop epoch,
    epochs after which a new optimizer was built)."""
    best_loss, best_epoch, lrs, rebuilt, stop = 999999, -1, [], [], None
    for epoch, epoch_loss in enumerate(val_losses, start=1):
        lrs.append(lr)
        if epoch_loss > best_loss:
            lr = lr / 10
            rebuilt.append(epoch)
        if epoch_loss < best_loss:
            best_loss, best_epoch = epoch_loss, epoch
        if (epoch - best_epoch) >= 3:
            stop = epoch
            break
    return lrs, best_epoch, stop, rebuilt


def ours(val_losses, keep_state=False):
    """The same sequence through PlateauSchedule, on an SGD optimizer with momentum."""
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([param], lr=0.01, momentum=0.9)
    sched = PlateauSchedule(opt, 10.0, 3, keep_state)
    lrs, stop, decayed = [], None, []
    for epoch, loss in enumerate(val_losses, start=1):
        lrs.append(opt.param_groups[0]["lr"])
        step = sched.step(loss)
        if step["decayed"]:
            decayed.append(epoch)
        if step["stop"]:
            stop = epoch
            break
    return lrs, sched.best_epoch, stop, decayed


def test_tie_with_the_best_neither_decays_nor_improves():
    # Epoch 3 ties epoch 2's best: the reference (`>`) does not decay; `>=` would.
    lrs, stop_at, sched = run([0.5, 0.4, 0.4, 0.45, 0.3])
    assert lrs == pytest.approx([0.01, 0.01, 0.01, 0.01, 1e-3])
    assert sched.best_epoch == 5 and stop_at is None
    assert ours([0.5, 0.4, 0.4, 0.45, 0.3])[3] == [4]


def test_schedule_equals_the_reference_loop_on_sequences_with_ties():
    rng = np.random.default_rng(0)
    for _ in range(300):
        # Few distinct values, so ties with the best are common.
        losses = list(rng.choice([0.30, 0.31, 0.32, 0.33], size=int(rng.integers(1, 12))))
        ref_lrs, ref_best, ref_stop, rebuilt = reference_train_model(losses)
        lrs, best, stop, decayed = ours(losses)
        assert lrs == ref_lrs and stop == ref_stop and decayed == rebuilt, losses
        assert best == (ref_best if ref_best > 0 else 0)


def test_the_reference_training_log_is_reproduced():
    """reproduce-chexnet's published log_train: best epoch 6, stopped after epoch 9."""
    path = shared("reference", "reproduce_chexnet_pretrained_log_train.csv")
    log = pd.read_csv(path)
    val = [float(re.search(r"tensor\(([0-9.]+)", v).group(1)) for v in log["val_loss"]]
    assert len(val) == 9 and val[5] == 0.1452  # parsed, not assumed
    lrs, best, stop, decayed = ours(val)
    assert (best, stop) == (6, 9) == reference_train_model(val)[1:3]
    assert stop == len(log)  # the log ends where the run stopped
    assert decayed == [5, 7, 8, 9]
    assert lrs == pytest.approx([0.01] * 5 + [1e-3, 1e-3, 1e-4, 1e-5])


def sgd_with_momentum():
    param = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.SGD([param], lr=0.1, momentum=0.9)
    param.grad = torch.ones(3)
    opt.step()
    assert opt.state[param]["momentum_buffer"].abs().sum() > 0
    return param, opt


def test_decay_resets_momentum_as_a_rebuilt_optimizer_does():
    param, opt = sgd_with_momentum()
    sched = PlateauSchedule(opt)
    sched.step(1.0)
    assert "momentum_buffer" in opt.state[param]      # an improvement keeps it
    sched.step(2.0)                                    # worse: decay
    assert opt.param_groups[0]["lr"] == pytest.approx(0.01)
    assert opt.state[param].get("momentum_buffer") is None
    # The next step is the one a freshly built SGD(lr=0.01, momentum=0.9) takes.
    fresh_param = torch.nn.Parameter(param.detach().clone())
    fresh = torch.optim.SGD([fresh_param], lr=0.01, momentum=0.9)
    param.grad = fresh_param.grad = torch.full((3,), 0.5)
    opt.step()
    fresh.step()
    torch.testing.assert_close(param, fresh_param, rtol=0, atol=0)
    torch.testing.assert_close(opt.state[param]["momentum_buffer"],
                               fresh.state[fresh_param]["momentum_buffer"], rtol=0, atol=0)


def test_keep_state_keeps_momentum_across_a_decay():
    param, opt = sgd_with_momentum()
    buf = opt.state[param]["momentum_buffer"].clone()
    sched = PlateauSchedule(opt, keep_state=True)
    sched.step(1.0)
    sched.step(2.0)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.01)
    torch.testing.assert_close(opt.state[param]["momentum_buffer"], buf)


def test_a_tie_leaves_momentum_alone():
    param, opt = sgd_with_momentum()
    sched = PlateauSchedule(opt)
    sched.step(1.0)
    sched.step(1.0)
    assert "momentum_buffer" in opt.state[param] and opt.param_groups[0]["lr"] == 0.1


def test_state_dict_round_trip():
    _, _, sched = run([0.5, 0.4, 0.45])
    param = torch.nn.Parameter(torch.zeros(1))
    other = PlateauSchedule(torch.optim.SGD([param], lr=0.01))
    other.load_state_dict(sched.state_dict())
    assert other.state_dict() == sched.state_dict()
    # Continues counting from epoch 3: best at 2, so epoch 4 goes on and epoch 5 stops.
    assert not other.step(0.5)["stop"]
    assert other.step(0.5)["stop"]
