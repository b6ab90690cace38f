"""Kill training anywhere (SIGKILL, SIGTERM, mid-write) and the resumed run ends bitwise equal.

Every run is a process of its own with real signals; all but the Ctrl-C case are forked from a
warm interpreter (tests/warm.py: the same child for every run, without paying the torch import
per run). The Ctrl-C case starts retrain cold, as a terminal does."""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import ROOT, nih_demo
from warm import one_thread_warm

# Trains networks or runs subprocesses: `pytest -m "not slow"` leaves these out.
pytestmark = pytest.mark.slow

ARGS = ["--dataset", "demo", "--image-size", "32", "--batch-size", "8", "--eval-batch-size", "32",
        "--weights", "none", "--workers", "0", "--epochs", "2", "--patience", "5",
        "--save-every", "1"]
# The reference's lr (0.01). The 34 training images end on a batch of 2, which at 32 px (1x1 maps
# in the last dense block) gave BatchNorm 2 values per channel: its gradient blew up, and the
# next evaluation was NaN or not depending on the CPU's kernels. Training drops such a batch
# (data.drops_last_batch), so each epoch is 4 full batches of 8.
STEPS_PER_EPOCH = 34 // 8


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory):
    return nih_demo(tmp_path_factory, n_images=48, size=40, seed=1)


def script(env) -> str:
    """retrain.py itself, or with a fault to inject, tests/faults.py (retrain.py wrapped)."""
    return str(ROOT / "tests" / "faults.py") if env else str(ROOT / "retrain.py")


@pytest.fixture(scope="module")
def warm():
    with one_thread_warm() as server:
        yield server


@pytest.fixture
def run(warm):
    """run(root, out, name, *extra, env=None): retrain (or with `env`'s faults, faults.py) in a
    process of its own, forked from the warm server; returns its Done (returncode: negative
    for a signal that killed it, as subprocess reports it)."""
    def run(root, out, name, *extra, env=None):
        argv = [script(env), "--data", root, "--out", out, "--name", name, *ARGS, *extra]
        return warm.run(argv, env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})
    return run


def weights(path):
    return torch.load(path, weights_only=True)["model"]


def assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.fixture(scope="module")
def reference(demo_root, tmp_path_factory, warm):
    out = tmp_path_factory.mktemp("ref")
    done = warm.run([script(None), "--data", demo_root, "--out", out, "--name", "whole", *ARGS])
    assert done.returncode == 0, done.stderr
    return out / "whole"


def test_sigkill_at_random_points_then_resume_is_bitwise_identical(demo_root, reference, tmp_path,
                                                                   run):
    from chexnet.loaders import load_tables
    import retrain

    labels, _ = load_tables(retrain.parse_args(["--dataset", "demo", "--data",
                                                          str(demo_root)]))
    table = labels.frame
    assert (table["fold"] == "train").sum() == 34  # what STEPS_PER_EPOCH was worked out from
    rng = np.random.default_rng(2026)
    kills = sorted(rng.choice(np.arange(1, 2 * STEPS_PER_EPOCH - 1), size=2, replace=False))
    for i, step in enumerate(kills):
        extra = ["--resume"] if i else []
        died = run(demo_root, tmp_path, "killed", *extra,
                   env={"CHEXNET_TEST_KILL_AT_STEP": str(step)})
        assert died.returncode == -9, (step, died.stderr[-2000:])
        assert torch.load(tmp_path / "killed" / "last.pt", weights_only=True)  # loadable
    finished = run(demo_root, tmp_path, "killed", "--resume")
    assert finished.returncode == 0, finished.stderr[-2000:]
    assert "resuming" in finished.stdout
    assert_same_weights(weights(reference / "last.pt"), weights(tmp_path / "killed" / "last.pt"))
    assert (reference / "preds.csv").read_text() == (tmp_path / "killed" / "preds.csv").read_text()


def test_sigterm_saves_mid_epoch_and_says_how_to_resume(demo_root, reference, tmp_path, run):
    stopped = run(demo_root, tmp_path, "term", env={"CHEXNET_TEST_KILL_AT_STEP": "2:SIGTERM"})
    assert stopped.returncode == 128 + 15, stopped.stderr[-2000:]
    assert "stopped by SIGTERM in epoch 1 after batch 2" in stopped.stderr
    assert "--resume" in stopped.stderr
    state = torch.load(tmp_path / "term" / "last.pt", weights_only=True)
    assert state["in_epoch"]["batches"] == 2 and state["epoch"] == 0
    finished = run(demo_root, tmp_path, "term", "--resume")
    assert finished.returncode == 0, finished.stderr[-2000:]
    assert "resuming" in finished.stdout and "after batch 2" in finished.stdout
    # No epoch had ended: there is no best loss to report (it used to say "inf (epoch 0)").
    assert "best val loss so far" not in finished.stdout and " inf " not in finished.stdout
    assert_same_weights(weights(reference / "last.pt"), weights(tmp_path / "term" / "last.pt"))


def test_kill_during_checkpoint_write_keeps_previous_checkpoint(demo_root, reference, tmp_path,
                                                                run):
    died = run(demo_root, tmp_path, "midwrite", env={"CHEXNET_TEST_KILL_IN_SAVE": "3"})
    assert died.returncode == -9
    run_dir = tmp_path / "midwrite"
    assert (run_dir / "last.pt.tmp").is_file()  # the torn write...
    with pytest.raises(RuntimeError):
        torch.load(run_dir / "last.pt.tmp", weights_only=True)
    state = torch.load(run_dir / "last.pt", weights_only=True)  # ...left the previous one intact
    assert state["in_epoch"]["batches"] == 2
    finished = run(demo_root, tmp_path, "midwrite", "--resume")
    assert finished.returncode == 0, finished.stderr[-2000:]
    assert_same_weights(weights(reference / "last.pt"), weights(run_dir / "last.pt"))


@pytest.mark.parametrize("name", ["SIGINT", "SIGTERM"])
def test_signal_to_the_whole_process_group_with_loader_workers(demo_root, tmp_path, name, warm):
    """Ctrl-C in a terminal signals the loader workers too; the run must still save last.pt and
    stop cleanly. (Workers also ignore SIGINT/SIGTERM from other senders, e.g. pkill, which
    would otherwise kill them before the save; this test cannot tell those senders apart.)
    SIGINT starts the interpreter cold, as a terminal does; SIGTERM is forked warm (a process
    group of its own too)."""
    import signal as sig

    args = [a if a != "0" else "2" for a in ARGS]  # --workers 2 (the only "0" in ARGS)
    argv = [script(True), "--data", str(demo_root), "--out", str(tmp_path), "--name", "ctrlc",
            *args]
    env = {**os.environ, "PYTHONUNBUFFERED": "1",
           "CHEXNET_TEST_KILL_AT_STEP": f"2:{name}:group"}
    if name == "SIGINT":
        # A session of its own, so the signal to the group reaches only training and its workers.
        proc = subprocess.run([sys.executable, *argv], capture_output=True, text=True, env=env,
                              cwd=ROOT, start_new_session=True, timeout=600)
    else:
        proc = warm.run(argv, env=env)
    assert proc.returncode == 128 + getattr(sig, name), proc.stderr[-2000:]
    assert f"stopped by {name} in epoch 1 after batch 2" in proc.stderr
    state = torch.load(tmp_path / "ctrlc" / "last.pt", weights_only=True)
    assert state["in_epoch"]["batches"] == 2
