"""torchrun + DistributedDataParallel on CPU (gloo, 2 processes) against one process."""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import ROOT, nih_demo

# Trains networks or runs subprocesses: `pytest -m "not slow"` leaves these out.
pytestmark = pytest.mark.slow

ARGS = ["--dataset", "demo", "--image-size", "64", "--batch-size", "16", "--eval-batch-size", "16",
        "--weights", "none", "--workers", "0", "--epochs", "2", "--patience", "5",
        "--save-every", "1"]
# One process against two is not a rounding question. Without SyncBatchNorm (CUDA only), each
# process normalises its half-batch of 8 with that half's statistics, where one process uses all
# 16: the two runs compute different (equally valid) steps. Measured on this fixture (2026-12-04,
# Xeon with AVX-512, torch 2.14.1), the same on all three kernel settings of tests/portable.py:
# losses differ by at most 0.88 % (AVX-512 0.80, AVX2 0.88, SSE4.1 0.83), and the test
# probabilities by 0.0060 on average (0.00600-0.00602; their own spread is 0.042). The bounds
# are about twice those. The largest single difference (0.026-0.029 here, 0.030 on an AMD EPYC)
# is an extreme of 182 and moves with the kernels, so it is not bounded. What is exact is
# checked exactly: every process holds the same model at every evaluation (bitwise), and every
# test image is scored once, in order, with the same ground truth.
LOSS_RTOL, PROB_MEAN_ATOL = 0.02, 0.012


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory):
    return nih_demo(tmp_path_factory, n_images=64, size=64, seed=3)


def launch(root, out, name, procs, *extra, env=None, port=29500):
    program = ROOT / ("tests/faults.py" if env else "retrain.py")  # faults.py: retrain + a fault
    script = [str(program), "--data", str(root), "--out", str(out), "--name", name,
              *ARGS, *extra]
    cmd = [sys.executable, *(["-m", "torch.distributed.run", "--nproc_per_node", str(procs),
                              "--master_port", str(port)] if procs > 1 else []), *script]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=full_env,
                          timeout=900)


@pytest.fixture(scope="module")
def runs(demo_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    single = launch(demo_root, out, "single", 1)
    assert single.returncode == 0, single.stderr[-3000:]
    (out / "states").mkdir()
    ddp = launch(demo_root, out, "ddp", 2, port=29531,
                 env={"CHEXNET_TEST_STATE_AT_EVAL": str(out / "states")})
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    return out


def test_every_process_evaluates_the_same_model(runs):
    """Averaged gradients keep the parameters equal, and process 0's BatchNorm statistics
    are copied before each evaluation: bitwise, whatever the kernels."""
    passes = sorted((runs / "states").glob("rank0_eval*.pt"))
    assert len(passes) == 4  # val after each of 2 epochs, then the final val and test
    for path in passes:
        a = torch.load(path, weights_only=True)
        b = torch.load(path.with_name(path.name.replace("rank0", "rank1")), weights_only=True)
        assert a.keys() == b.keys()
        assert [k for k in a if not torch.equal(a[k], b[k])] == [], path.name


def test_two_processes_match_one(runs):
    a = pd.read_csv(runs / "single" / "log_train.csv")
    b = pd.read_csv(runs / "ddp" / "log_train.csv")
    np.testing.assert_allclose(b["train_loss"], a["train_loss"], rtol=LOSS_RTOL)
    np.testing.assert_allclose(b["val_loss"], a["val_loss"], rtol=LOSS_RTOL)
    pa = pd.read_csv(runs / "single" / "preds.csv")
    pb = pd.read_csv(runs / "ddp" / "preds.csv")
    # Every test image exactly once, in the same order: nothing dropped or duplicated.
    assert list(pb["Image Index"]) == list(pa["Image Index"])
    probs = [c for c in pa.columns if c.startswith("prob_")]
    assert np.abs(pb[probs].to_numpy() - pa[probs].to_numpy()).mean() < PROB_MEAN_ATOL
    truth = [c[5:] for c in probs]
    pd.testing.assert_frame_equal(pb[truth], pa[truth])


def test_only_rank_zero_writes(runs):
    files = sorted(p.name for p in (runs / "ddp").iterdir())
    assert files == sorted(p.name for p in (runs / "single").iterdir())
    assert not list((runs / "ddp").glob("*.tmp"))
    import json
    assert json.loads((runs / "ddp" / "run_record.json").read_text())["processes"] == 2


def test_resume_after_kill_mid_epoch_under_ddp(demo_root, runs, tmp_path):
    died = launch(demo_root, tmp_path, "k", 2, env={"CHEXNET_TEST_KILL_AT_STEP": "3"}, port=29532)
    assert died.returncode != 0
    state = torch.load(tmp_path / "k" / "last.pt", weights_only=True)
    assert state["in_epoch"] == {**state["in_epoch"], "epoch": 1, "batches": 2}
    done = launch(demo_root, tmp_path, "k", 2, "--resume", port=29533)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "in epoch 1 after batch 2" in done.stdout
    a = torch.load(runs / "ddp" / "last.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "k" / "last.pt", weights_only=True)["model"]
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-5, atol=1e-6)


def test_sigterm_to_one_process_stops_all_at_the_same_step(demo_root, runs, tmp_path):
    """A stop request reaching only process 1 is agreed on (over the host-side gloo group) at
    the same step, process 0 saves, and the resumed run ends where the uninterrupted one does."""
    # No periodic saves: a last.pt at batch 2 can only come from process 0 obeying the stop.
    stopped = launch(demo_root, tmp_path, "t", 2, "--save-every", "0", port=29535,
                     env={"CHEXNET_TEST_KILL_AT_STEP": "2:SIGTERM", "CHEXNET_TEST_KILL_RANK": "1"})
    assert stopped.returncode != 0
    assert "stopped by SIGTERM in epoch 1 after batch 2" in stopped.stderr, stopped.stderr[-3000:]
    state = torch.load(tmp_path / "t" / "last.pt", weights_only=True)
    assert state["in_epoch"]["batches"] == 2 and state["epoch"] == 0
    done = launch(demo_root, tmp_path, "t", 2, "--resume", port=29536)
    assert done.returncode == 0, done.stderr[-3000:]
    a = torch.load(runs / "ddp" / "last.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "t" / "last.pt", weights_only=True)["model"]
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-5, atol=1e-6)


def test_resume_across_world_sizes(demo_root, tmp_path):
    died = launch(demo_root, tmp_path, "w", 2, env={"CHEXNET_TEST_KILL_AT_STEP": "2"}, port=29534)
    assert died.returncode != 0
    done = launch(demo_root, tmp_path, "w", 1, "--resume")  # two processes -> one
    assert done.returncode == 0, done.stderr[-3000:]
    assert "in epoch 1 after batch 1" in done.stdout
    log = pd.read_csv(tmp_path / "w" / "log_train.csv")
    assert list(log["epoch"]) == [1, 2]
