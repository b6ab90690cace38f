"""Every bad input of the README's table gets a message naming the file/row and what to do.

Cases covered elsewhere: missing image (test_train), zero-byte / truncated PNG / 16-bit PNG
(test_images), CSV missing columns and unknown label values (test_labels), a label without
positives (test_eval), kills and torn checkpoint writes (test_crash_safety).
"""
from __future__ import annotations

import errno
import shutil

import numpy as np
import pandas as pd
import pytest
import torch
from pathlib import Path
from PIL import Image

from chexnet.labels import findings_for
from chexnet.loaders import load_tables
from chexnet.runs import SaveError, save_text
import retrain
from conftest import nih_demo
from chexnet.data import ImageReadError, load_xray

FAST = ["--image-size", "32", "--batch-size", "8", "--eval-batch-size", "16", "--weights", "none",
        "--workers", "0", "--epochs", "1"]


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory):
    return nih_demo(tmp_path_factory, n_images=40, size=40, seed=2)


@pytest.fixture
def data(demo_root, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(demo_root, root)
    return root


def train(root, out, *extra):
    return retrain.main(["--dataset", "demo", "--data", str(root), "--out", str(out),
                         "--name", "run", *FAST, *extra])


def train_ids(root):
    labels, _ = load_tables(retrain.parse_args(["--dataset", "demo", "--data",
                                                          str(root)]))
    table = labels.frame
    return table.query("fold == 'train'")["image_id"].tolist()


def test_truncated_png_in_training_names_the_file(data, tmp_path, capsys):
    victim = data / "images" / train_ids(data)[0]
    victim.write_bytes(victim.read_bytes()[:100])
    assert train(data, tmp_path) == 2
    err = capsys.readouterr().err
    assert victim.name in err and "corrupt or truncated" in err


def test_truncated_jpeg_is_named(tmp_path):
    path = tmp_path / "photo.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(
        path, quality=90)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ImageReadError, match="photo.jpg"):
        load_xray(path)


def test_labels_without_required_column(data, tmp_path, capsys):
    entry = data / "Data_Entry_2017.csv"
    pd.read_csv(entry).drop(columns=["Finding Labels"]).to_csv(entry, index=False)
    assert train(data, tmp_path) == 2
    err = capsys.readouterr().err
    assert "Data_Entry_2017.csv" in err and "Finding Labels" in err


def test_image_folder_without_images(data, tmp_path, capsys):
    shutil.rmtree(data / "images")
    assert train(data, tmp_path) == 2
    assert "no PNG/JPEG images found" in capsys.readouterr().err


def test_empty_fold(data, tmp_path, capsys):
    labels = pd.read_csv(data / "Data_Entry_2017.csv")
    table = pd.DataFrame({"Image Index": labels["Image Index"],
                          "Patient ID": labels["Patient ID"], "fold": "train"})
    for f in findings_for("nih"):
        table[f] = labels["Finding Labels"].str.contains(f).astype(int)
    table.loc[: len(table) // 2, "fold"] = "test"
    table.to_csv(tmp_path / "labels.csv", index=False)
    assert train(data, tmp_path, "--labels", str(tmp_path / "labels.csv")) == 2
    assert "the val fold is empty" in capsys.readouterr().err


def test_non_finite_loss_stops_with_image_ids_and_keeps_checkpoint(data, tmp_path, capsys):
    assert train(data, tmp_path, "--lr", "1e30") == 3
    err = capsys.readouterr().err
    assert "loss is" in err and "epoch 1, batch" in err and ".png" in err
    assert "lower --lr" in err
    assert not (tmp_path / "run" / "checkpoint.pt").exists()  # nothing bad was saved


def test_disk_full_while_saving_keeps_previous_checkpoint(data, tmp_path, capsys, monkeypatch):
    """The write of the file's bytes fails as a full disk makes it fail (ENOSPC). A real full
    disk (a small tmpfs) is tests/test_processes.py's; this one runs without root."""
    real_write = Path.write_bytes
    calls = {"n": 0}

    def write_bytes(self, data):
        if self.name == "last.pt.tmp":
            calls["n"] += 1
            if calls["n"] >= 3:  # last.pt after steps 1 and 2 is written, then the disk is full
                raise OSError(errno.ENOSPC, "No space left on device", str(self))
        return real_write(self, data)

    monkeypatch.setattr(Path, "write_bytes", write_bytes)
    assert train(data, tmp_path, "--save-every", "1") == 2
    err = capsys.readouterr().err
    assert "No space left on device" in err and "previous last.pt is intact" in err
    assert "--resume" in err
    state = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    assert state["in_epoch"]["batches"] == 2
    assert not list((tmp_path / "run").glob("*.tmp"))


@pytest.mark.slow
def test_resume_refuses_changed_data(data, tmp_path, capsys):
    assert train(data, tmp_path) == 0
    entry = data / "Data_Entry_2017.csv"
    labels = pd.read_csv(entry)
    labels.loc[0, "Finding Labels"] = "Hernia"
    labels.to_csv(entry, index=False)
    assert train(data, tmp_path, "--resume") == 2
    err = capsys.readouterr().err
    assert "other settings or data" in err
    assert f"labels file {entry}: its contents changed" in err
    assert "fold assignment" not in err and "sha256" not in err and "{" not in err
    assert train(data, tmp_path, "--resume", "--force") == 0


def test_no_swallowed_exceptions_in_the_code():
    """No `except:` / `except Exception:` that hides an error (CI runs this grep): each one
    re-raises (said in its line) or prints the traceback (its next line)."""
    from conftest import ROOT

    offenders = []
    for path in ROOT.rglob("*.py"):
        if ".venv" in path.parts:
            continue
        for no, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#")[0].strip()
            if code in ("except:", "except Exception:", "except BaseException:") or \
                    code.startswith(("except Exception as", "except BaseException as")):
                following = path.read_text().splitlines()[no].strip()  # the handler's first line
                reported = following.startswith("traceback.print_exc(")
                if "re-raise" not in line and "re-raises" not in line and not reported:
                    offenders.append(f"{path.relative_to(ROOT)}:{no}: {line.strip()}")
    assert not offenders, "\n".join(offenders)


def test_unwritable_folder_message_does_not_blame_the_disk(tmp_path):
    with pytest.raises(SaveError) as err:
        save_text("x", tmp_path / "absent" / "f.txt")
    assert "exists and is writable" in str(err.value) and "Free some space" not in str(err.value)


@pytest.mark.parametrize("flag,value,message", [
    ("--image-size", "0", "--image-size: 0 is too small: it must be at least 32"),
    ("--image-size", "-4", "--image-size: -4 is too small: it must be at least 32"),
    ("--image-size", "16", "--image-size: 16 is too small: it must be at least 32"),
    ("--epochs", "0", "--epochs: 0 is too small: it must be at least 1"),
    ("--epochs", "-3", "--epochs: -3 is too small: it must be at least 1"),
    ("--patience", "0", "--patience: 0 is too small: it must be at least 1"),
])
def test_bad_numbers_are_refused_before_any_work(tmp_path, capsys, flag, value, message):
    """Checked while parsing: no data is read (the data folder here does not even exist)."""
    with pytest.raises(SystemExit) as stop:
        retrain.main(["--dataset", "demo", "--data", str(tmp_path / "absent"), flag, value])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and "data folder" not in err


@pytest.mark.parametrize("value,shown", [(2, "holds 2;"), (0.5, "holds 0.5;")])
def test_a_bad_label_value_is_shown_as_a_plain_number(tmp_path, capsys, value, shown):
    """numpy 2 scalars repr as np.int64(2): a message shows the number as the file has it."""
    from chexnet.datatools import prepare
    from conftest import make_nih

    make_nih(tmp_path, n=4, shapes=[("L", 40, 40)], folds=True)
    labels = pd.read_csv(tmp_path / "labels.csv")
    labels["Mass"] = labels["Mass"].astype(type(value))
    labels.loc[1, "Mass"] = value
    labels.to_csv(tmp_path / "labels.csv", index=False)
    assert prepare.main(["nih", "--data", str(tmp_path), "--labels", str(tmp_path / "labels.csv"),
                         "--image-size", "16", "--workers", "1"]) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path / 'labels.csv'}: row 3, column 'Mass' {shown}" in err
    assert "np.int64" not in err and "np.float64" not in err
