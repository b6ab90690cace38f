"""Every command line, run as a user runs it (a subprocess), on the bad inputs of issue 12:
a non-zero exit, a message naming the file or value, and never a Python traceback."""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from conftest import ROOT, reference_densenet
from chexnet.labels import NIH_FINDINGS

pytestmark = pytest.mark.slow  # one Python process (and a torch import) per case


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """The bad inputs, and a small good dataset to point them at."""
    from chexnet.demo import make_nih_demo

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
    return root


def cases(root):
    """(name, argv after the script, text the message must contain)."""
    demo = root / "demo"
    return [
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
        ("prepare size 0", ["prepare_data.py", "nih", "--root", str(demo), "--size", "0"],
         "--size: 0 is too small"),
        ("prepare nothing found", ["prepare_data.py", "nih", "--root", str(root / "out"),
                                   "--labels", str(demo / "Data_Entry_2017.csv"), "--split",
                                   "random", "--size", "16", "--workers", "1"],
         "not under the data folder"),
        ("visualize missing checkpoint", ["visualize_prediction.py", "--checkpoint",
                                          str(root / "absent.pt"), "--image",
                                          str(root / "ok.png")], "absent.pt"),
        ("plot missing run", ["plot_training.py", str(root / "absent_run"), "--out",
                              str(root / "curves.png")], "absent_run"),
    ]


@pytest.mark.parametrize("index", range(12))
def test_cli_bad_input_is_a_message_not_a_traceback(files, index):
    name, argv, expected = cases(files)[index]
    (files / "out").mkdir(exist_ok=True)
    done = subprocess.run([sys.executable, str(ROOT / argv[0]), *argv[1:]], cwd=ROOT,
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"})
    output = done.stdout + done.stderr
    assert done.returncode != 0, f"{name}: exit 0\n{output[-2000:]}"
    assert expected in output, f"{name}: {expected!r} not in\n{output[-2000:]}"
    assert "Traceback" not in output, f"{name}:\n{output[-3000:]}"
