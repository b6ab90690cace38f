"""The Colab notebook (notebooks/Retrain_colab.ipynb), run top to bottom: outside Colab on
the demo data, and as a Colab session (a stand-in google.colab, its /content and Drive in
temporary folders) through a disconnect and a VM reset.

Apart from tests/test_notebooks.py (the other notebooks) so that a parallel `make test`
(pytest-xdist, one file per worker) runs the two halves at once."""
from __future__ import annotations

import json
import os
import shutil

import pandas as pd
import pytest

from conftest import ROOT
from test_notebooks import NOTEBOOKS, execute, nbclient, nbformat, run_cells, text_of

# Trains networks or runs subprocesses: `pytest -m "not slow"` leaves these out.
# One torch thread in this process (conftest.py one_thread: 2 shared cores).
pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    from chexnet.datatools.demo import make_nih_demo

    root = tmp_path_factory.mktemp("colabdemo")
    make_nih_demo(root / "nih", n_images=60, size=40, seed=5)
    return root


def test_retrain_colab_trains_then_resumes_on_rerun(demo, tmp_path, monkeypatch):
    """Outside Colab, run twice, as after a disconnect: the images are copied to the local disk
    once (the second run copies nothing), training output streams into the notebook (progress
    bars included, not only the last lines at the end), and the second run resumes."""
    data = tmp_path / "local_disk"
    source = demo / "nih"
    n = sum(1 for p in source.rglob("*") if p.is_file())
    env = {"CHEXNET_DATA": data, "CHEXNET_COPY_FROM": source,
           "CHEXNET_OUT": tmp_path, "CHEXNET_NAME": "colab"}
    nb = execute("Retrain_colab.ipynb", monkeypatch, **env)
    out = text_of(nb)
    assert (tmp_path / "colab" / "aucs.csv").is_file()
    assert f"images: {n} files copied from {source} to {data}, 0 already there" in out
    assert "continuing" not in out and "Drive" not in out.split("precision fp32")[1]
    assert "epoch 1 train" in out and "epoch 1: train loss" in out  # streamed, stderr too
    nb = execute("Retrain_colab.ipynb", monkeypatch, **env, CHEXNET_EPOCHS=2)
    out = text_of(nb)
    assert f"images: 0 files copied from {source} to {data}, {n} already there" in out
    assert "continuing" in out and "resuming" in out
    assert list(pd.read_csv(tmp_path / "colab" / "log_train.csv")["epoch"]) == [1, 2]


# ------------------------------------------------------------------------ as a Colab session
STAND_IN_DRIVE = """\"\"\"google.colab.drive stand-in: mount() checks, records the mount.\"\"\"
import os
from pathlib import Path


def mount(mountpoint, force_remount=False, **kwargs):
    want = Path(os.environ["CHEXNET_COLAB_CONTENT"]) / "drive"
    assert Path(mountpoint) == want, (mountpoint, want)
    (want / "MyDrive").mkdir(parents=True, exist_ok=True)
    with open(os.environ["CHEXNET_TEST_MOUNTS"], "a") as fh:
        fh.write(f"{mountpoint}\\n")
"""
# In retrain.py processes only (the notebook starts them), the faults of tests/faults.py.
SITECUSTOMIZE = """\
import os
import sys

if sys.argv and sys.argv[0].endswith("retrain.py") and os.environ.get("CHEXNET_TEST_KILL_AT_STEP"):
    import faults
    faults._signal_at_step()
"""


@pytest.fixture
def colab_vm(tmp_path, monkeypatch):
    """A Colab VM in temporary folders: CONTENT (the VM's disk, where the notebook's root
    /content points), its Drive, a stand-in google.colab imported at kernel start (as Colab
    preloads it) whose drive.mount is the only Colab API the notebook may use."""
    content, stand_in = tmp_path / "content", tmp_path / "stand_in"
    (stand_in / "google" / "colab").mkdir(parents=True)  # a namespace package: google.* others
    (stand_in / "google" / "colab" / "__init__.py").write_text("")
    (stand_in / "google" / "colab" / "drive.py").write_text(STAND_IN_DRIVE)
    (stand_in / "sitecustomize.py").write_text(SITECUSTOMIZE)
    startup = tmp_path / "ipython" / "profile_default" / "startup"
    startup.mkdir(parents=True)
    (startup / "00-colab.py").write_text("import google.colab  # noqa: F401\n")
    content.mkdir()
    (content / "chexnet").symlink_to(ROOT)  # the clone (a reset clones again; this stands in)
    for key, value in {
            "PYTHONPATH": os.pathsep.join([str(stand_in), str(ROOT / "tests")]),
            "IPYTHONDIR": tmp_path / "ipython", "CHEXNET_COLAB_CONTENT": content,
            "CHEXNET_TEST_MOUNTS": tmp_path / "mounts.txt", "CHEXNET_ALLOW_CPU": "1",
            "CHEXNET_DATASET": "demo", "CHEXNET_IMAGE_SIZE": "32", "CHEXNET_EPOCHS": "2",
            "CHEXNET_SAVE_EVERY": "1", "CHEXNET_NAME": "colab",
            "CHEXNET_EXTRA": "--weights none --batch-size 8 --eval-batch-size 16 --workers 0"
            }.items():
        monkeypatch.setenv(key, str(value))
    return content


def run_colab(monkeypatch, **env):
    """Run all, as on Colab; returns (the notebook's text, the error that stopped it)."""
    for key, value in env.items():
        monkeypatch.setenv(key, str(value))
    nb = nbformat.read(NOTEBOOKS / "Retrain_colab.ipynb", as_version=4)
    try:
        run_cells(nb)
        return text_of(nb), None
    except nbclient.exceptions.CellExecutionError as err:
        return text_of(nb), err


def test_colab_reset_copies_only_the_cache_and_resumes_at_the_next_step(demo, colab_vm,
                                                                      tmp_path, monkeypatch):
    """Session 1 copies the images from Drive, prepares the cache, saves it to Drive, and is
    killed after training step 5 (last.pt written after every step). The VM is reset (its
    local folder deleted) and the images on Drive are made undecodable. Session 2 copies
    exactly the saved cache's bytes, decodes no image, resumes after step 4, and ends with the
    weights of an uninterrupted run."""
    content, mydrive = colab_vm, colab_vm / "drive" / "MyDrive"
    shutil.copytree(demo / "nih", mydrive / "nih")  # the user's NIH folder on Drive
    out, err = run_colab(monkeypatch, CHEXNET_TEST_KILL_AT_STEP="5:SIGKILL")
    assert err is not None and "retrain.py stopped" in str(err)
    assert "not restoring the cache from Drive: no cache saved on Drive yet" in out
    saved = mydrive / "chexnet_cache" / "demo-32"
    record = json.loads((saved / "copies.json").read_text())["files"]
    run = mydrive / "chexnet_results" / "colab"
    assert (run / "last.pt").is_file() and not (run / "checkpoint.pt").exists()

    shutil.rmtree(content / "nih")  # the reset: the VM's disk is wiped, Drive is kept
    for png in (mydrive / "nih").rglob("*.png"):
        png.write_bytes(b"not an image: decoding this would fail")
    monkeypatch.delenv("CHEXNET_TEST_KILL_AT_STEP")
    out, err = run_colab(monkeypatch)
    assert err is None, str(err)[-3000:]
    total = sum(r["size"] for r in record.values())
    assert f"{total:,} bytes copied" in out and total == sum(
        (saved / name).stat().st_size for name in record)
    assert "training reads the restored cache: no image is copied or decoded" in out
    assert "images:" not in out.split("restored")[1]  # no image copy on the second session
    assert not list((content / "nih").rglob("*.png"))
    assert "continuing" in out and "resuming" in out and "after batch 4" in out
    assert "are read from the cache" in out
    assert (tmp_path / "mounts.txt").read_text().splitlines() == [str(content / "drive")] * 2

    # The uninterrupted run: the same cache and labels, one session, no kill.
    alone = tmp_path / "alone" / "nih"
    from chexnet.datatools.colab import restore_cache
    assert restore_cache(saved, alone, 32).ok
    args = ["retrain.py", "--dataset", "demo", "--data", str(alone), "--out", str(tmp_path),
            "--name", "alone", "--epochs", "2", "--image-size", "32", "--save-every", "1",
            "--weights", "none", "--batch-size", "8", "--eval-batch-size", "16",
            "--workers", "0"]
    import subprocess
    import sys
    subprocess.run([sys.executable, *args], cwd=ROOT, check=True, capture_output=True)
    import torch
    a, b = (torch.load(p / "last.pt", weights_only=False)["model"]
            for p in (run, tmp_path / "alone"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    config = json.loads((run / "config.json").read_text())
    assert config["amp"] == "off" and config["channels_last"] is False  # fp32, the default
    assert "precision: amp off, channels_last False (config.json)" in out


def test_colab_refuses_a_cpu_runtime_with_the_menu_path(colab_vm, monkeypatch):
    out, err = run_colab(monkeypatch, CHEXNET_ALLOW_CPU="0")
    assert err is not None and "Runtime > Change runtime type > Hardware accelerator: T4 GPU" \
        in str(err) and "ALLOW_CPU = True" in str(err)
    assert not (colab_vm / "drive" / "MyDrive").exists()  # refused before anything else


def test_colab_without_repo_url_says_what_to_set_before_cloning(colab_vm, monkeypatch):
    (colab_vm / "chexnet").unlink()  # a fresh VM: nothing cloned yet
    out, err = run_colab(monkeypatch)
    assert err is not None and "Set REPO_URL in the first code cell" in str(err)


def test_colab_precision_is_one_setting_passed_to_retrain(colab_vm, monkeypatch):
    """PRECISION = "amp" becomes --amp auto --channels-last (config.json records what
    retrain.py was given: the reset test checks the default, fp32). Only the cells up to the
    settings run here."""
    nb = nbformat.read(NOTEBOOKS / "Retrain_colab.ipynb", as_version=4)
    last = next(i for i, c in enumerate(nb.cells) if "PRECISION_FLAGS =" in c.source)
    nb.cells = nb.cells[:last + 1] + [nbformat.v4.new_code_cell("print(PRECISION_FLAGS)")]
    monkeypatch.setenv("CHEXNET_PRECISION", "amp")
    run_cells(nb)
    out = text_of(nb)
    assert "precision amp (--amp auto --channels-last)" in out
    assert "['--amp', 'auto', '--channels-last']" in out
    monkeypatch.setenv("CHEXNET_PRECISION", "fp16")
    with pytest.raises(nbclient.exceptions.CellExecutionError, match='use "fp32"'):
        run_cells(nb)
