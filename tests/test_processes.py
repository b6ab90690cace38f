"""The cases of the README's "Bad inputs" rules, each run as a user runs it: a command in a
process of its own (tests/warm.py forks it from a warm interpreter, so a case costs a fraction
of a second instead of a torch import), with real signals, a real full disk and real files.

Every case asserts the exit code, the message (it names the file or the option and says what
to do), no traceback, and that every input file is byte-identical afterwards (sha256 before
and after). Where the rule is "the same command resumes", the case runs it again and compares
the result with an uninterrupted run's.

A full disk is a real one: a small tmpfs mounted for the test, which needs root (CI and the
project's machines run the suite as root); elsewhere those cases are skipped with that reason.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import hashes, tiny_run
from warm import one_thread_warm

pytestmark = pytest.mark.slow  # real trainings and cache builds, a few seconds in all


@pytest.fixture(scope="module")
def warm():
    with one_thread_warm() as server:
        yield server


@pytest.fixture
def run(tmp_path_factory, tmp_path) -> Path:
    """A copy of a finished run folder (config.json, checkpoint.pt, preds.csv, aucs.csv)."""
    copy = tmp_path / "run"
    shutil.copytree(tiny_run(tmp_path_factory), copy)
    return copy


@pytest.fixture
def nih(tmp_path_factory, tmp_path) -> Path:
    """A copy of the 40-image demo NIH dataset (images and Data_Entry_2017.csv)."""
    copy = tmp_path / "nih"
    shutil.copytree(tiny_run(tmp_path_factory).parents[1] / "nih", copy)
    return copy


@pytest.fixture
def images(tmp_path) -> Path:
    folder = tmp_path / "images"
    folder.mkdir()
    for name, value in (("a.png", 90), ("b.png", 160)):
        Image.new("L", (40, 40), value).save(folder / name)
    return folder


def refused(done, *needles: str, code: int = 2) -> None:
    """Exit `code`, one message naming what it must, no traceback."""
    assert done.returncode == code, done.output[-3000:]
    assert "Traceback" not in done.output, done.output[-3000:]
    for needle in needles:
        assert needle in done.stderr, f"{needle!r} not in:\n{done.stderr[-3000:]}"


def prepare_argv(nih: Path, *more: str) -> list[str]:
    return ["prepare_data.py", "nih", "--data", str(nih), "--labels",
            str(nih / "Data_Entry_2017.csv"), "--split", "random", "--image-size", "32", *more]


def retrain_argv(data: Path, out: Path, *more: str, name: str = "r") -> list[str]:
    return ["retrain.py", "--dataset", "demo", "--data", str(data), "--out", str(out),
            "--name", name, "--image-size", "32", "--weights", "none", "--workers", "0",
            "--batch-size", "8", *more]


def unchanged(before: dict[str, str], after: dict[str, str]) -> bool:
    """Every file of `before` is still there, byte-identical (new files aside: a cache the
    same command resumes)."""
    return {path: after.get(path) for path in before} == before


# ---------------------------------------------------------------------------------------------
# Rule 1: no command destroys what it did not make
# ---------------------------------------------------------------------------------------------
def test_eval_model_does_not_write_its_table_over_the_predictions(warm, run):
    before = hashes(run)
    done = warm.run(["eval_model.py", "--preds", run / "preds.csv", "--out", run / "preds.csv"])
    refused(done, f"--out {run / 'preds.csv'} is also this command's input (--preds)")
    assert hashes(run) == before


def test_report_does_not_replace_a_checkpoint(warm, run):
    before = hashes(run)
    done = warm.run(["report.py", run, "--out", run / "checkpoint.pt"])
    refused(done, f"--out {run / 'checkpoint.pt'} is also this command's input")
    assert hashes(run) == before


def test_predict_does_not_replace_a_runs_predictions(warm, run, images):
    before = hashes(run, images)
    done = warm.run(["predict.py", images, "--checkpoint", run / "checkpoint.pt", "--out",
                     run / "preds.csv"])
    refused(done, "so it is treated as a run folder, and preds.csv is part of a run's record",
            "--overwrite")
    assert hashes(run, images) == before


def test_a_run_folder_without_last_pt_is_not_trained_over(warm, run):
    data = json.loads((run / "config.json").read_text())["data"]
    before = hashes(run)
    done = warm.run(retrain_argv(Path(data), run.parent, "--epochs", "1", name=run.name))
    refused(done, f"{run} already holds a run", "no last.pt to resume from", "another --name")
    assert hashes(run) == before


# ---------------------------------------------------------------------------------------------
# Rule 3: bad numbers and devices are refused while parsing, before anything is read
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("flag", "value", "needle"), [
    ("--lr", "-1", "--lr: -1 is out of range: it must be > 0"),
    ("--lr-decay", "0", "--lr-decay: 0 is out of range: it must be > 1"),
    ("--device", "gpu0", "--device: 'gpu0' is not a device"),
])
def test_retrain_refuses_a_bad_number_or_device(warm, nih, tmp_path, flag, value, needle):
    before = hashes(nih)
    done = warm.run(retrain_argv(nih, tmp_path / "out", flag, value))
    refused(done, needle)
    assert hashes(nih) == before and not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------
# Rule 3: damaged files are named
# ---------------------------------------------------------------------------------------------
def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize("command", ["visualize_prediction.py", "report.py", "predict.py"])
def test_a_truncated_checkpoint_is_named(warm, run, images, tmp_path, command):
    truncate(run / "checkpoint.pt")
    argv = {
        "visualize_prediction.py": ["--checkpoint", run / "checkpoint.pt", "--image",
                                    images / "a.png", "--out", tmp_path / "h.png"],
        "report.py": [run, "--out", tmp_path / "report.html", "--n-boot", "5"],
        "predict.py": [images, "--checkpoint", run / "checkpoint.pt", "--out",
                       tmp_path / "p.csv"],
    }[command]
    before = hashes(run, images)
    done = warm.run([command, *argv])
    refused(done, f"{run / 'checkpoint.pt'}: cannot read this checkpoint; it is truncated")
    assert hashes(run, images) == before
    assert not [p for p in tmp_path.iterdir() if p.is_file()]  # no partial output


def test_resume_from_a_truncated_last_pt_is_named(warm, nih, tmp_path):
    out = tmp_path / "out"
    assert warm.run(retrain_argv(nih, out, "--epochs", "1")).returncode == 0
    truncate(out / "r" / "last.pt")
    before = hashes(out, nih)
    done = warm.run(retrain_argv(nih, out, "--epochs", "2", "--resume"))
    refused(done, f"{out / 'r' / 'last.pt'}: cannot read this checkpoint; it is truncated",
            "another --name")
    assert hashes(out, nih) == before


def bomb(path: Path) -> None:
    """A PNG of 14,000 x 14,000 black pixels (1-bit: a few kB on disk), over twice PIL's
    MAX_IMAGE_PIXELS: PIL raises DecompressionBombError when it is opened."""
    Image.new("1", (14_000, 14_000)).save(path)


def test_a_decompression_bomb_is_named_and_the_others_predicted(warm, run, images, tmp_path):
    bomb(images / "c.png")
    before = hashes(run, images)
    done = warm.run(["predict.py", images, "--checkpoint", run / "checkpoint.pt", "--out",
                     tmp_path / "p.csv"])
    # predict's contract: the readable images are predicted and written, the others named,
    # and the exit code says that some failed.
    refused(done, f"{images / 'c.png'}: not a readable PNG, JPEG or DICOM image",
            "could be decompression bomb", f"1 of 3 images failed: {images / 'c.png'}")
    preds = (tmp_path / "p.csv").read_text()
    assert "a.png" in preds and "b.png" in preds
    assert hashes(run, images) == before


def test_a_decompression_bomb_in_a_dataset_stops_prepare_and_is_named(warm, nih):
    victim = sorted((nih / "images").glob("*.png"))[3]
    bomb(victim)
    before = hashes(nih)
    done = warm.run(prepare_argv(nih, "--workers", "1"))
    refused(done, f"{victim}: PIL refuses to decode this image", "--skip-bad")
    assert unchanged(before, hashes(nih))
    assert not (nih / "nih_labels.csv").exists()  # the new labels file is not left behind


def test_a_header_only_log_is_named_by_the_plotting_command(warm, tmp_path):
    log = tmp_path / "log_train.csv"
    log.write_text("epoch,train_loss,val_loss,lr,seconds\n")
    done = warm.run(["plot_training.py", log, "--out", tmp_path / "curves.png"])
    refused(done, f"{log}: no epochs in this log (it has only its header)")
    assert not (tmp_path / "curves.png").exists()


# ---------------------------------------------------------------------------------------------
# Rule 2: a failed or interrupted prepare_data.py leaves the state as it was, and resumes
# ---------------------------------------------------------------------------------------------
def test_a_failed_prepare_with_a_cache_keeps_the_previous_labels(warm, nih):
    """The case seen: prepare --split random failed (exit 2) and left its new labels file in
    place when a cache existed; the next retrain.py used those folds."""
    assert warm.run(prepare_argv(nih, "--workers", "1")).returncode == 0
    entry = nih / "Data_Entry_2017.csv"
    lines = entry.read_text().splitlines()
    entry.write_text("\n".join([*lines, "00099999_000.png" + lines[1][lines[1].index(","):]])
                     + "\n")  # one more listed image, not on disk
    before = hashes(nih)
    done = warm.run(prepare_argv(nih, "--workers", "1", "--seed", "7"))
    refused(done, "00099999_000.png", "--skip-bad")
    assert hashes(nih) == before


@pytest.mark.parametrize("workers", ["1", "2"])
def test_ctrl_c_during_prepare_restores_the_labels_and_the_same_command_resumes(
        warm, nih, tmp_path, workers):
    """SIGINT to the whole process group (a terminal's Ctrl-C, the workers too) right after the
    second chunk of images is written; then the same command finishes the cache, which is
    byte for byte the cache of an uninterrupted build."""
    labels = nih / "nih_labels.csv"
    labels.write_text("the previous labels file\n")
    argv = prepare_argv(nih, "--workers", workers)
    before = hashes(nih)
    done = warm.run(argv, fault={"target": "chexnet.datatools.cache_build:_build_chunk",
                                 "call": 2,
                                 "when": "after", "signal": "SIGINT", "group": True})
    refused(done, "run the same command again", code=130)
    assert done.stderr.strip().splitlines()[-1].startswith("interrupted (Ctrl-C)")
    after = hashes(nih)
    cache = nih / "cache" / "32"
    assert unchanged(before, after)  # the labels file is the previous one again
    assert all(path.startswith(str(cache)) for path in set(after) - set(before))
    assert (np.load(cache / "done.npy") == 1).sum() > 0  # what was decoded is kept

    resumed = warm.run(argv)
    assert resumed.returncode == 0, resumed.output[-3000:]
    assert "resuming" in resumed.output
    fresh = tmp_path / "fresh"
    shutil.copytree(nih, fresh, ignore=shutil.ignore_patterns("cache", "nih_labels.csv*"))
    assert warm.run(prepare_argv(fresh, "--workers", "1")).returncode == 0
    for name in ("images.u8", "index.csv", "done.npy"):
        assert (cache / name).read_bytes() == (fresh / "cache" / "32" / name).read_bytes()
    assert labels.read_bytes() == (fresh / "nih_labels.csv").read_bytes()


def sigint_disposition(task) -> str:
    """Stands in for cache_build._build_chunk in a pool worker: what SIGINT does there."""
    import signal

    return str(signal.getsignal(signal.SIGINT))


def test_pool_workers_leave_ctrl_c_to_the_main_process(monkeypatch):
    """A terminal's Ctrl-C reaches the whole group: a worker that took it would print its own
    KeyboardInterrupt traceback (seen, by chance, in the test above). Each ignores it."""
    import signal

    from chexnet.datatools import cache_build

    monkeypatch.setattr(cache_build, "_build_chunk", sigint_disposition)
    seen = set(cache_build._run_chunks(list(range(4)), workers=2))
    assert seen == {str(signal.SIG_IGN)}


def test_a_dead_worker_is_a_message_and_the_labels_are_restored(warm, nih):
    before = hashes(nih)
    done = warm.run(prepare_argv(nih, "--workers", "2"),
                    fault={"target": "chexnet.datatools.cache_build:_build_chunk", "call": 1,
                           "when": "before", "signal": "SIGKILL", "group": False})
    refused(done, "a worker process died", "fewer --workers")
    assert unchanged(before, hashes(nih))
    assert not (nih / "nih_labels.csv").exists()


# ---------------------------------------------------------------------------------------------
# A disk that fills (a real one: a small tmpfs)
# ---------------------------------------------------------------------------------------------
@pytest.fixture
def small_disk(tmp_path):
    """mount(size) -> a folder on a fresh tmpfs of that size; `.resize(size)` grows it (the
    user frees space). Needs root; unmounted at the end."""
    mounted = []

    def mount(size: str) -> Path:
        where = tmp_path / f"disk-{uuid.uuid4().hex[:6]}"
        where.mkdir()
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs",
                               str(where)], capture_output=True, text=True)
        if done.returncode != 0:
            pytest.skip(f"a full disk needs a small filesystem: mount -t tmpfs failed here "
                        f"({done.stderr.strip() or 'not root'})")
        mounted.append(where)
        return where

    def resize(where: Path, size: str) -> None:
        subprocess.run(["mount", "-o", f"remount,size={size}", str(where)], check=True)

    mount.resize = resize
    yield mount
    for where in mounted:
        subprocess.run(["umount", "-l", str(where)], check=False)


@pytest.mark.parametrize("workers", ["1", "2"])
def test_a_full_disk_during_prepare_is_a_message(warm, nih, small_disk, workers):
    """The cache (40 images of 32 x 32: 40 kB) does not fit in 16 kB. Before: a bus error
    (SIGBUS on a memory-mapped page) with one worker, 'a worker process died' with two."""
    disk = small_disk("16k")
    before = hashes(nih)
    done = warm.run(prepare_argv(nih, "--workers", workers, "--cache-dir", disk))
    refused(done, f"cannot write the image cache in {disk / '32'}: No space left on device",
            "The cache needs 41 kB: free some space, or pass --cache-dir DIR")
    assert hashes(nih) == before
    assert not list(disk.rglob("*.tmp"))


def test_a_full_disk_while_saving_last_pt_keeps_the_previous_one_and_resume_finishes(
        warm, nih, small_disk, tmp_path):
    """Epoch 1 fits (checkpoint.pt 28 MB + last.pt 56 MB); epoch 2's last.pt does not (its
    temporary copy beside the old one). The message says so and what to do; after space is
    freed, --resume finishes with the weights of an uninterrupted run."""
    disk = small_disk("120m")
    argv = retrain_argv(nih, disk, "--epochs", "2")
    done = warm.run(argv)
    refused(done, f"could not write {disk / 'r' / 'last.pt'}: No space left on device (the "
            "previous last.pt is intact)", "Free some space", "with --resume")
    assert not list((disk / "r").glob("*.tmp"))
    assert torch.load(disk / "r" / "last.pt", weights_only=False)["epoch"] == 1
    input_hashes = hashes(nih)

    small_disk.resize(disk, "300m")
    resumed = warm.run([*argv, "--resume"])
    assert resumed.returncode == 0, resumed.output[-3000:]
    reference = warm.run(retrain_argv(nih, tmp_path / "uninterrupted", "--epochs", "2"))
    assert reference.returncode == 0, reference.output[-3000:]
    got = torch.load(disk / "r" / "checkpoint.pt", weights_only=False)["model"]
    want = torch.load(tmp_path / "uninterrupted" / "r" / "checkpoint.pt",
                      weights_only=False)["model"]
    assert all(torch.equal(got[k], want[k]) for k in want)
    assert hashes(nih) == input_hashes


def test_a_full_disk_at_the_first_save_leaves_no_run_folder(warm, nih, small_disk):
    """Nothing to resume: the folder is removed and the message says to run it again."""
    disk = small_disk("1m")
    done = warm.run(retrain_argv(nih, disk, "--epochs", "1"))
    refused(done, f"could not write {disk / 'r'}", "No space left on device",
            "run the same command.")
    assert "--resume" not in done.stderr
    assert not (disk / "r").exists()


def test_the_warm_server_children_are_processes_of_their_own(warm, tmp_path):
    """What the cases rely on: a child's exit code, stderr, working folder and environment
    are its own, and a Python error in it shows a traceback (so 'no Traceback' means
    something)."""
    script = tmp_path / "s.py"
    script.write_text("import os, sys\nprint(os.getcwd(), os.environ['X'], os.getpid())\n"
                      "sys.stderr.write('to stderr')\nraise SystemExit(int(sys.argv[1]))\n")
    one = warm.run([script, "7"], cwd=tmp_path, env={**os.environ, "X": "x1"})
    two = warm.run([script, "0"], cwd=tmp_path, env={**os.environ, "X": "x2"})
    assert (one.returncode, two.returncode) == (7, 0)
    assert one.stdout.split()[:2] == [str(tmp_path), "x1"] and one.stderr == "to stderr"
    script.write_text("import os\nprint(os.environ.get('HOME'))\n")  # the server has HOME
    assert warm.run([script], env={"X": "x3"}).stdout == "None\n"
    assert one.stdout.split()[2] != two.stdout.split()[2] != str(os.getpid())
    script.write_text("1 / 0\n")
    crash = warm.run([script])
    assert crash.returncode == 1 and "Traceback" in crash.stderr
    assert "ZeroDivisionError" in crash.stderr
