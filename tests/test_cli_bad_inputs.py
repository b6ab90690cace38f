"""Every command line, run as a user runs it (a process of its own, tests/warm.py), on the bad
inputs of issue 12:
a non-zero exit, a message naming the file or value, and never a Python traceback.

A read-only folder (Kaggle's /kaggle/input, a shared drive) cannot be made with chmod when the
tests run as root: those cases refuse every write under one folder with PermissionError
(tests/read_only.py), as a read-only mount does.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from conftest import reference_densenet
from warm import Warm
from chexnet.labels import NIH_FINDINGS

pytestmark = pytest.mark.slow  # one process per case


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """The bad inputs, and a small good dataset to point them at."""
    from chexnet.datatools.demo import make_nih_demo

    root = tmp_path_factory.mktemp("bad")
    make_nih_demo(root / "demo", n_images=12, size=16, seed=0)
    (root / "empty.csv").write_text("")
    torch.save({"model": reference_densenet()}, root / "pickled_model.pt")
    preds = pd.DataFrame({"Image Index": ["00000001_000.png", "00000002_000.png"]})
    for f in NIH_FINDINGS:
        preds[f"prob_{f}"] = [-2.19, 0.4]        # a logit in the first row
    preds.to_csv(root / "logits.csv", index=False)
    pd.concat([preds.assign(**{f"prob_{f}": 0.5 for f in NIH_FINDINGS})] * 2).to_csv(
        root / "duplicates.csv", index=False)
    (root / "not_an_image.png").write_bytes(b"this is text")
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(root / "ok.png")
    # A finished run as report.py reads it (only preds.csv), a project checkpoint for
    # predict.py, and the folder READ_ONLY locks.
    (root / "run").mkdir()
    preds.assign(**{f: [0, 1] for f in NIH_FINDINGS},
                 **{f"prob_{f}": [0.2, 0.7] for f in NIH_FINDINGS}).to_csv(
        root / "run" / "preds.csv", index=False)
    from chexnet.model import build_model

    torch.manual_seed(0)
    torch.save({"model": build_model(len(NIH_FINDINGS), "none").state_dict(),
                "config": {"image_size": 32, "dataset": "nih"}, "findings": list(NIH_FINDINGS)},
               root / "checkpoint.pt")
    (root / "locked").mkdir()
    return root


def cases(root):
    """(name, argv after the script, text(s) the message must contain, folder READ_ONLY locks
    or None)."""
    demo, locked = root / "demo", root / "locked"
    entries = str(demo / "Data_Entry_2017.csv")
    prepare = ["prepare_data.py", "nih", "--data", str(demo), "--labels", entries, "--split",
               "random", "--image-size", "16", "--workers", "1"]
    read_only = [
        ("report read-only out", ["report.py", str(root / "run"), "--out",
                                  str(locked / "r.html"), "--n-boot", "5"],
         (f"cannot write the report {locked / 'r.html'}: Permission denied",
          "Choose a writable place with --out"), locked),
        ("predict read-only out", ["predict.py", str(root / "ok.png"), "--checkpoint",
                                   str(root / "checkpoint.pt"), "--out",
                                   str(locked / "preds.csv")],
         (f"{locked / 'preds.csv'}: cannot write in the folder {locked} (Permission denied)",
          "Choose a writable place with --out"), locked),
        ("prepare read-only dataset", prepare,
         (f"cannot write the labels file {demo / 'nih_labels.csv'}: Permission denied",
          f"The dataset folder {demo} is not writable", "--labels-out FILE and --cache-dir DIR"),
         demo),
        ("prepare read-only dataset, --cache-dir", [*prepare, "--cache-dir", str(root / "c")],
         (f"cannot write the labels file {demo / 'nih_labels.csv'}",
          "Choose a writable place with --labels-out FILE"), demo),
        ("prepare read-only dataset, --labels-out",
         [*prepare, "--labels-out", str(root / "l.csv")],
         (f"cannot write the image cache in {demo / 'cache' / '16'}: Permission denied",
          "Pass --cache-dir DIR"), demo),
    ]
    return [(name, argv, expected, None) for name, argv, expected in [
        ("retrain image size 0", ["retrain.py", "--dataset", "demo", "--data", str(demo),
                                  "--image-size", "0"], "--image-size: 0 is too small"),
        ("retrain epochs 0", ["retrain.py", "--dataset", "demo", "--data", str(demo),
                              "--epochs", "0"], "--epochs: 0 is too small"),
        ("retrain pickled weights", ["retrain.py", "--dataset", "demo", "--data", str(demo),
                                     "--out", str(root / "out"), "--weights",
                                     str(root / "pickled_model.pt"), "--image-size", "32"],
         "convert_checkpoint.py"),
        ("retrain empty labels", ["retrain.py", "--dataset", "demo", "--data", str(demo),
                                  "--labels", str(root / "empty.csv"), "--out",
                                  str(root / "out2")], f"{root / 'empty.csv'}: the file is empty"),
        ("eval logits", ["eval_model.py", "--preds", str(root / "logits.csv")],
         "outside [0, 1]: these look like logits"),
        ("eval duplicates", ["eval_model.py", "--preds", str(root / "duplicates.csv")],
         "is listed more than once"),
        ("eval empty", ["eval_model.py", "--preds", str(root / "empty.csv")],
         f"{root / 'empty.csv'}: the file is empty"),
        ("predict unreadable", ["predict.py", str(root / "not_an_image.png"), "--checkpoint",
                                str(root / "pickled_model.pt")], "pickled_model.pt"),
        ("prepare image size 0", ["prepare_data.py", "nih", "--data", str(demo),
                                  "--image-size", "0"], "--image-size: 0 is too small"),
        ("prepare nothing found", ["prepare_data.py", "nih", "--data", str(root / "out"),
                                   "--labels", str(demo / "Data_Entry_2017.csv"), "--split",
                                   "random", "--image-size", "16", "--workers", "1"],
         "not under the data folder"),
        ("visualize missing checkpoint", ["visualize_prediction.py", "--checkpoint",
                                          str(root / "absent.pt"), "--image",
                                          str(root / "ok.png")], "absent.pt"),
        ("plot missing run", ["plot_training.py", str(root / "absent_run"), "--out",
                              str(root / "curves.png")], "absent_run"),
    ]] + read_only


@pytest.fixture(scope="module")
def warm():
    with Warm() as server:
        yield server


def run_cli(warm: Warm, argv: list[str], read_only: Path | None = None):
    """A script of the repository with its arguments, in a process of its own
    (tests/warm.py), with every write under `read_only` refused."""
    return warm.run(argv, read_only=read_only)


@pytest.mark.parametrize("name", [case[0] for case in cases(Path("/files"))])
def test_cli_bad_input_is_a_message_not_a_traceback(warm, files, name):
    _, argv, expected, read_only = next(c for c in cases(files) if c[0] == name)
    (files / "out").mkdir(exist_ok=True)
    done = run_cli(warm, argv, read_only)
    output = done.stdout + done.stderr
    assert done.returncode != 0, f"{name}: exit 0\n{output[-2000:]}"
    for text in [expected] if isinstance(expected, str) else expected:
        assert text in output, f"{name}: {text!r} not in\n{output[-2000:]}"
    assert "Traceback" not in output, f"{name}:\n{output[-3000:]}"


def test_prepare_read_only_dataset_with_labels_out_and_cache_dir(warm, files):
    """Both options: the run succeeds, and the dataset folder is left exactly as it was."""
    demo = files / "demo"
    before = {p: p.read_bytes() for p in sorted(demo.rglob("*")) if p.is_file()}
    done = run_cli(warm, ["prepare_data.py", "nih", "--data", str(demo), "--labels",
                    str(demo / "Data_Entry_2017.csv"), "--split", "random", "--image-size",
                    "16", "--workers", "1", "--labels-out", str(files / "ok" / "labels.csv"),
                    "--cache-dir", str(files / "ok" / "cache")], read_only=demo)
    output = done.stdout + done.stderr
    assert done.returncode == 0 and "Traceback" not in output, output[-3000:]
    assert f"cache: {files / 'ok' / 'cache' / '16'} (12 images" in output
    assert {p: p.read_bytes() for p in sorted(demo.rglob("*")) if p.is_file()} == before
