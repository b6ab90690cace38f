"""retrain.py with a fault injected from outside: the crash-safety tests run this instead of
retrain.py, so that production code carries no test hooks.

    python tests/faults.py RETRAIN_ARGS...        (or under torchrun, as retrain.py)

Faults, from the environment:
  CHEXNET_TEST_KILL_AT_STEP=N[:SIGNAL[:group]]  send SIGNAL (default SIGKILL) to this process, or
      with `group` to its whole process group (as a terminal's Ctrl-C, reaching the loader
      workers too), right after optimizer step N of the run (counted from the run's first step,
      across resumes: epoch e, batch b is step (e - 1) * steps_per_epoch + b).
  CHEXNET_TEST_KILL_RANK=R   under torchrun, only process R is signalled (default: all).
  CHEXNET_TEST_KILL_IN_SAVE=N  SIGKILL in the middle of the Nth write of last.pt: half a file
      is left at the temporary name, as a kill mid-write leaves it.

Observation, also from the environment:
  CHEXNET_TEST_STATE_AT_EVAL=DIR  after every evaluation pass, each process writes the model it
      evaluated with (parameters and buffers) to DIR/rank{R}_eval{N}.pt.
"""
from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import torch

from chexnet import runs
from chexnet import train as training
from chexnet.runs import EpochProgress
import retrain


def _signal_at_step() -> None:
    spec = os.environ.get("CHEXNET_TEST_KILL_AT_STEP")
    rank = int(os.environ.get("CHEXNET_TEST_KILL_RANK", "-1"))
    if not spec or rank not in (-1, int(os.environ.get("RANK", "0"))):
        return
    step, _, rest = spec.partition(":")
    name, _, group = rest.partition(":")
    at, signum = int(step), getattr(signal, name or "SIGKILL")
    real = training.train_one_epoch

    def train_one_epoch(model, loader, optimizer, device, progress, seed=0, on_step=None,
                        *args, **kwargs):
        per_epoch = progress.batches + len(loader)  # the whole epoch, resumed mid-way or not

        def hooked(p: EpochProgress) -> None:
            if (p.epoch - 1) * per_epoch + p.batches == at:
                if group:
                    os.killpg(os.getpgid(0), signum)
                else:
                    os.kill(os.getpid(), signum)
            if on_step is not None:
                on_step(p)

        return real(model, loader, optimizer, device, progress, seed, hooked, *args, **kwargs)

    training.train_one_epoch = train_one_epoch


def _kill_in_save() -> None:
    nth = int(os.environ.get("CHEXNET_TEST_KILL_IN_SAVE", "0"))
    if not nth:
        return
    real = runs.atomic_torch_save
    saves = 0

    def atomic_torch_save(obj: object, path: Path) -> None:
        nonlocal saves
        if Path(path).name == "last.pt":
            saves += 1
            if saves == nth:
                tmp = Path(path).with_name(Path(path).name + ".tmp")
                torch.save(obj, tmp)
                with open(tmp, "r+b") as fh:
                    fh.truncate(tmp.stat().st_size // 2)
                os.kill(os.getpid(), signal.SIGKILL)
        real(obj, path)

    runs.atomic_torch_save = atomic_torch_save  # every checkpoint is written through it


def _state_at_eval() -> None:
    folder = os.environ.get("CHEXNET_TEST_STATE_AT_EVAL")
    if not folder:
        return
    real, passes = training.evaluate, 0

    def evaluate(model, *args, **kwargs):
        nonlocal passes
        out = real(model, *args, **kwargs)
        passes += 1
        net = getattr(model, "module", model)  # inside DistributedDataParallel
        torch.save(net.state_dict(), Path(folder) / f"rank{os.environ.get('RANK', '0')}"
                   f"_eval{passes}.pt")
        return out

    training.evaluate = evaluate


if __name__ == "__main__":
    _signal_at_step()
    _kill_in_save()
    _state_at_eval()
    sys.exit(retrain.main(sys.argv[1:]))
