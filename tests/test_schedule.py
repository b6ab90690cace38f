"""The LR decay / early-stopping schedule on scripted loss sequences."""
from __future__ import annotations

import pytest
import torch

from retrain import PlateauSchedule


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


def test_decay_keeps_optimizer_momentum():
    """The reference rebuilt SGD at each decay, dropping momentum; we change lr in place."""
    param = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.SGD([param], lr=0.1, momentum=0.9)
    param.grad = torch.ones(3)
    opt.step()
    buf = opt.state[param]["momentum_buffer"].clone()
    sched = PlateauSchedule(opt)
    sched.step(1.0)
    sched.step(2.0)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.01)
    torch.testing.assert_close(opt.state[param]["momentum_buffer"], buf)


def test_state_dict_round_trip():
    _, _, sched = run([0.5, 0.4, 0.45])
    param = torch.nn.Parameter(torch.zeros(1))
    other = PlateauSchedule(torch.optim.SGD([param], lr=0.01))
    other.load_state_dict(sched.state_dict())
    assert other.state_dict() == sched.state_dict()
    # Continues counting from epoch 3: best at 2, so epoch 4 goes on and epoch 5 stops.
    assert not other.step(0.5)["stop"]
    assert other.step(0.5)["stop"]
