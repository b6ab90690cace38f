"""The rules every command keeps, each enforced in one place (README, "Bad inputs"):

1. No command destroys what it did not make (`files.check_outputs`, `files.is_run_folder`).
2. A failure leaves the state as it was (prepare_data.py restores its labels file).
3. Expected failures are one-line messages with exit 2, never tracebacks (`cli.run`, the
   boundary every command's `main` goes through; numbers checked while parsing, `cli.number`).

Each command case hashes every input before and after: "refused" means nothing changed.
"""
from __future__ import annotations

import argparse
import ast
import errno
import importlib
import shutil
import subprocess
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

import pytest
import torch
from PIL import Image

from conftest import ROOT, hashes, tiny_run
from chexnet import cli
from chexnet.files import check_outputs, is_run_folder, same_path

SCRIPTS = sorted(p for p in ROOT.glob("*.py") if '__name__ == "__main__"' in p.read_text())


@pytest.fixture
def run(tmp_path_factory, tmp_path):
    """A copy of a finished run folder (config.json, checkpoint.pt, preds.csv, aucs.csv, ...)."""
    copy = tmp_path / "run"
    shutil.copytree(tiny_run(tmp_path_factory), copy)
    return copy


def refused(capsys, code: int, *needles: str) -> str:
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in err, err
    return err


# ---------------------------------------------------------------------------------------------
# Rule 3: the boundary
# ---------------------------------------------------------------------------------------------
def failing(exc: BaseException):
    def main(argv=None):
        raise exc
    return main


@pytest.mark.parametrize(("exc", "code", "needles"), [
    (cli.CommandError("x.csv: wrong columns."), 2, ["error: x.csv: wrong columns."]),
    (OSError(errno.ENOSPC, "No space left on device", "/runs/a/last.pt"), 2,
     ["/runs/a/last.pt: No space left on device", "disk is full"]),
    (PermissionError(errno.EACCES, "Permission denied", "/ro/out.csv"), 2,
     ["/ro/out.csv: Permission denied", "permissions"]),
    (FileNotFoundError(errno.ENOENT, "No such file or directory", "preds.csv"), 2,
     ["preds.csv: No such file or directory", "Check the path"]),
    (Image.DecompressionBombError("Image size (2000000000 pixels) exceeds limit"), 2,
     ["exceeds limit", "decompression bomb"]),
    (BrokenProcessPool("A child process terminated abruptly"), 2,
     ["worker process died", "fewer --workers"]),
    (MemoryError(), 2, ["out of memory"]),
    (FileNotFoundError("run/log_train.csv: no training log"), 2,  # a message of its own
     ["error: run/log_train.csv: no training log"]),
    (RuntimeError("DataLoader worker (pid 42) is killed by signal: Killed."), 2,
     ["DataLoader worker (pid 42)", "--workers 0"]),
    (KeyboardInterrupt(), 130, ["interrupted (Ctrl-C)", "run the same command again"]),
])
def test_the_boundary_turns_each_expected_failure_into_one_message(exc, code, needles, capsys):
    assert cli.run(failing(exc)) == code
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    for needle in needles:
        assert needle in err


def test_the_boundary_keeps_the_exit_code_of_an_error_class():
    from chexnet.runs import Interrupted
    from chexnet.train import NonFiniteLoss

    assert cli.run(failing(NonFiniteLoss("val: the loss is not finite"))) == 3
    assert cli.run(failing(Interrupted(15, "in epoch 1 after batch 2"))) == 128 + 15


@pytest.mark.parametrize("bug", [ZeroDivisionError("division by zero"), KeyError("model"),
                                 RuntimeError("shape mismatch"), TypeError("bad operand")])
def test_a_bug_keeps_its_traceback(bug):
    with pytest.raises(type(bug)):
        cli.run(failing(bug))


def test_every_command_goes_through_the_boundary():
    """Every script's main is decorated with cli.command (one boundary, not one per script)."""
    assert len(SCRIPTS) >= 15
    for path in SCRIPTS:
        module = importlib.import_module(path.stem)
        assert getattr(module.main, "error_boundary", False), path.name


# ---------------------------------------------------------------------------------------------
# Rule 3: every number is checked while the arguments are parsed
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("kind", "text"), [
    (cli.POSITIVE, "0"), (cli.POSITIVE, "-1"), (cli.POSITIVE, "nan"), (cli.POSITIVE, "inf"),
    (cli.POSITIVE, "abc"), (cli.NON_NEGATIVE, "-0.001"), (cli.MOMENTUM, "1"),
    (cli.MOMENTUM, "-0.1"), (cli.DECAY_FACTOR, "1"), (cli.DECAY_FACTOR, "0"),
    (cli.FRACTION, "0"), (cli.FRACTION, "1"), (cli.integer(0), "-1"), (cli.integer(0), "1.5"),
    (cli.integer(1, 5), "6"),
])
def test_out_of_range_numbers_are_refused(kind, text):
    with pytest.raises(argparse.ArgumentTypeError):
        kind(text)


@pytest.mark.parametrize(("kind", "text", "value"), [
    (cli.POSITIVE, "0.01", 0.01), (cli.POSITIVE, "1e-6", 1e-6), (cli.NON_NEGATIVE, "0", 0.0),
    (cli.MOMENTUM, "0", 0.0), (cli.MOMENTUM, "0.999", 0.999), (cli.DECAY_FACTOR, "10", 10.0),
    (cli.FRACTION, "0.5", 0.5), (cli.integer(1, 5), "5", 5), (cli.integer(-1), "-1", -1),
])
def test_in_range_numbers_pass(kind, text, value):
    assert kind(text) == value


class Parsed(Exception):
    """Raised instead of parsing: carries the parser a command built."""


def parsers_of_every_command(monkeypatch) -> dict[str, argparse.ArgumentParser]:
    found = {}

    def capture(self, *args, **kwargs):
        raise Parsed(self)
    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", capture)
    for path in SCRIPTS:
        module = importlib.import_module(path.stem)
        with pytest.raises(Parsed) as got:
            module.main([])
        found[path.name] = got.value.args[0]
    return found


def actions(parser: argparse.ArgumentParser):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                yield from actions(sub)
        else:
            yield action


def test_no_command_takes_an_unchecked_number(monkeypatch):
    """A raw int or float option has no range: every number uses a type of chexnet.cli."""
    raw = [f"{name} {'/'.join(a.option_strings)}"
           for name, parser in parsers_of_every_command(monkeypatch).items()
           for a in actions(parser) if a.type in (int, float)]
    assert raw == []


@pytest.mark.parametrize(("flag", "value", "needle"), [
    ("--lr", "-1", "--lr: -1 is out of range: it must be > 0"),
    ("--lr", "nan", "--lr: 'nan' is not a finite number"),
    ("--lr-decay", "0", "--lr-decay: 0 is out of range: it must be > 1"),
    ("--momentum", "1", "--momentum: 1 is out of range"),
    ("--weight-decay", "-1", "--weight-decay: -1 is out of range: it must be >= 0"),
    ("--device", "gpu0", "--device: 'gpu0' is not a device"),
    ("--workers", "-2", "--workers: -2 is out of range"),
])
def test_retrain_refuses_a_bad_number_before_reading_anything(flag, value, needle, capsys):
    import retrain

    with pytest.raises(SystemExit) as stop:
        retrain.main(["--dataset", "demo", "--data", "/nonexistent", flag, value])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert needle in err and "/nonexistent" not in err and "Traceback" not in err


def test_a_device_that_does_not_exist_is_a_message(monkeypatch):
    from chexnet.runs import DeviceError, pick_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(DeviceError, match=r"--device cuda:3: this machine has 1 CUDA GPU"):
        pick_device("cuda:3")


# ---------------------------------------------------------------------------------------------
# Rule 1: the output policy
# ---------------------------------------------------------------------------------------------
def test_any_run_file_makes_a_run_folder(tmp_path):
    assert not is_run_folder(tmp_path)
    for name in ("config.json", "checkpoint.pt", "preds.csv", "log_train.csv", "last.pt"):
        folder = tmp_path / name.replace(".", "_")
        folder.mkdir()
        (folder / name).write_text("x")
        assert is_run_folder(folder), name
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "aucs.csv").write_text("x")
    assert not is_run_folder(tmp_path / "other")


def test_same_path_sees_links_and_relative_names(tmp_path, monkeypatch):
    (tmp_path / "a.csv").write_text("x")
    (tmp_path / "link.csv").symlink_to(tmp_path / "a.csv")
    monkeypatch.chdir(tmp_path)
    assert same_path("a.csv", tmp_path / "a.csv")
    assert same_path(tmp_path / "sub" / ".." / "a.csv", "a.csv")
    assert same_path("link.csv", "a.csv")
    assert not same_path("a.csv", "b.csv")


def test_check_outputs_refuses_an_input_and_a_run_record(tmp_path):
    (tmp_path / "preds.csv").write_text("x")
    with pytest.raises(cli.CommandError, match=r"--out .* is also this command's input \(--preds"):
        check_outputs({"--out": tmp_path / "preds.csv"}, {"--preds": tmp_path / "preds.csv"})
    with pytest.raises(cli.CommandError, match=r"as a run folder, and checkpoint.pt is part"):
        check_outputs({"--out": tmp_path / "checkpoint.pt"}, {})
    check_outputs({"--out": tmp_path / "report.html"}, {})           # a run's derived output
    check_outputs({"--out": tmp_path / "checkpoint.pt"}, {}, overwrite=True)
    with pytest.raises(cli.CommandError, match="also this command's input"):  # never an input
        check_outputs({"--out": tmp_path / "preds.csv"}, {"--preds": tmp_path / "preds.csv"},
                      overwrite=True)


def test_eval_model_does_not_write_its_table_over_the_predictions(run, capsys):
    import eval_model

    before = hashes(run)
    code = eval_model.main(["--preds", str(run / "preds.csv"), "--out", str(run / "preds.csv")])
    refused(capsys, code, f"--out {run / 'preds.csv'} is also this command's input (--preds)")
    assert hashes(run) == before


def test_report_does_not_replace_a_checkpoint(run, capsys):
    import report

    before = hashes(run)
    code = report.main([str(run), "--out", str(run / "checkpoint.pt")])
    refused(capsys, code, f"--out {run / 'checkpoint.pt'}")
    assert hashes(run) == before


def test_predict_does_not_replace_a_runs_predictions(run, tmp_path, capsys):
    import predict

    images = tmp_path / "images"
    images.mkdir()
    Image.new("L", (40, 40), 100).save(images / "a.png")
    before = hashes(run, images)
    code = predict.main([str(images), "--checkpoint", str(run / "checkpoint.pt"), "--out",
                         str(run / "preds.csv")])
    refused(capsys, code, "treated as a run folder, and preds.csv is part of a run's record",
            "--overwrite")
    assert hashes(run, images) == before


def test_predict_does_not_write_over_an_image_of_its_input_folder(run, tmp_path, capsys):
    """Found by tests/test_fuzz.py: --out naming an image inside the folder being predicted."""
    import predict

    images = tmp_path / "images"
    images.mkdir()
    for name in ("a.png", "b.png"):
        Image.new("L", (40, 40), 100).save(images / name)
    before = hashes(images)
    code = predict.main([str(images), "--checkpoint", str(run / "checkpoint.pt"), "--out",
                         str(images / "b.png")])
    refused(capsys, code, f"--out {images / 'b.png'} is also this command's input (input "
            f"image {images / 'b.png'})")
    assert hashes(images) == before


def test_a_figure_is_not_written_beside_a_folder_given_as_out(run, tmp_path, capsys):
    """Found by tests/test_fuzz.py: matplotlib writes FOLDER.png for a folder given as --out."""
    import visualize_prediction

    image = tmp_path / "a.png"
    Image.new("L", (40, 40), 100).save(image)
    (tmp_path / "figs").mkdir()
    code = visualize_prediction.main(["--checkpoint", str(run / "checkpoint.pt"), "--image",
                                      str(image), "--out", str(tmp_path / "figs")])
    refused(capsys, code, f"--out {tmp_path / 'figs'} is a folder: give the path of a file")
    assert not (tmp_path / "figs.png").exists()


def test_a_run_folder_without_last_pt_is_not_trained_over(run, capsys):
    """The run has config.json, checkpoint.pt and preds.csv but no last.pt."""
    import json

    import retrain

    assert not (run / "last.pt").exists()
    before = hashes(run)
    config = json.loads((run / "config.json").read_text())
    code = retrain.main(["--dataset", "demo", "--data", config["data"], "--out", str(run.parent),
                         "--name", run.name, "--image-size", "32", "--weights", "none",
                         "--workers", "0", "--epochs", "1"])
    refused(capsys, code, f"{run} already holds a run (config.json, checkpoint.pt, preds.csv",
            "no last.pt to resume from", "another --name")
    assert hashes(run) == before


def test_make_demo_keeps_an_earlier_demo_run(tmp_path):
    """make demo writes the next free name; the earlier run is untouched (PY=echo: the
    commands are printed, not run)."""
    earlier = tmp_path / "demo"
    earlier.mkdir()
    (earlier / "checkpoint.pt").write_text("earlier")
    (tmp_path / "demo-2").mkdir()
    done = subprocess.run(["make", "-s", "demo", "PY=echo", f"DEMO_OUT={tmp_path}",
                           f"DEMO_DATA={tmp_path / 'data'}"], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert f"--name demo-3 --out {tmp_path}" in done.stdout
    assert f"{tmp_path}/demo holds an earlier demo run (kept)" in done.stdout
    assert (earlier / "checkpoint.pt").read_text() == "earlier"


# ---------------------------------------------------------------------------------------------
# Rule 3 on damaged checkpoints: every reader names the file
# ---------------------------------------------------------------------------------------------
@pytest.fixture
def truncated(run):
    path = run / "checkpoint.pt"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def test_a_truncated_checkpoint_is_a_message_for_visualize(truncated, tmp_path, capsys):
    import visualize_prediction

    image = tmp_path / "a.png"
    Image.new("L", (40, 40), 100).save(image)
    code = visualize_prediction.main(["--checkpoint", str(truncated), "--image", str(image),
                                      "--out", str(tmp_path / "h.png")])
    refused(capsys, code, f"{truncated}: cannot read this checkpoint; it is truncated")
    assert not (tmp_path / "h.png").exists()


def test_a_truncated_checkpoint_is_a_message_for_predict(truncated, tmp_path, capsys):
    import predict

    image = tmp_path / "a.png"
    Image.new("L", (40, 40), 100).save(image)
    code = predict.main([str(image), "--checkpoint", str(truncated), "--out",
                         str(tmp_path / "p.csv")])
    refused(capsys, code, f"{truncated}: cannot read this checkpoint; it is truncated")


def test_a_truncated_last_pt_is_a_message_for_resume(run, tmp_path):
    """retrain.py --resume on a damaged last.pt: the reader says what to do instead."""
    from chexnet.model import CheckpointError
    from chexnet.runs import load_run_checkpoint

    last = run / "last.pt"
    last.write_bytes((run / "checkpoint.pt").read_bytes()[:5000])
    with pytest.raises(CheckpointError, match=r"last.pt: cannot read this checkpoint; it is "
                       r"truncated or damaged .*start a new run with another --name"):
        load_run_checkpoint(last)


@pytest.mark.parametrize(("content", "needle"), [
    (b"not a checkpoint at all", "not a PyTorch checkpoint"),
    (None, "checkpoint not found"),
])
def test_other_bad_checkpoints_are_named(tmp_path, content, needle):
    from chexnet.model import CheckpointError, read_checkpoint

    path = tmp_path / "c.pt"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(CheckpointError, match=needle):
        read_checkpoint(path)
    torch.save({"weights": torch.zeros(1)}, path)  # a torch file, but not ours
    with pytest.raises(CheckpointError, match="not a checkpoint of this project .no model"):
        read_checkpoint(path)


# ---------------------------------------------------------------------------------------------
# Rule 2: a failed or interrupted prepare_data.py restores the labels file
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("had_cache", [False, True])
@pytest.mark.parametrize("failure", [KeyboardInterrupt(), BrokenProcessPool("worker died"),
                                     OSError(errno.ENOSPC, "No space left on device")])
def test_a_failed_prepare_restores_the_previous_labels(tmp_path_factory, tmp_path, monkeypatch,
                                                      had_cache, failure):
    from chexnet.datatools import prepare

    root = tmp_path / "nih"
    shutil.copytree(tiny_run(tmp_path_factory).parents[1] / "nih", root)
    labels = root / "nih_labels.csv"
    labels.write_text("the previous labels file\n")
    cache = prepare.cache_dir(root, 32, None)
    if had_cache:
        cache.mkdir(parents=True)
        (cache / "kept.txt").write_text("an earlier cache")

    def fail(*args, **kwargs):
        assert labels.read_text() != "the previous labels file\n"  # the new one was written
        raise failure
    monkeypatch.setattr(prepare, "_cache_nih", fail)
    with pytest.raises(type(failure)):
        prepare.prepare_nih(root, 32, str(root / "Data_Entry_2017.csv"), "random")
    assert labels.read_text() == "the previous labels file\n"
    assert cache.exists() == had_cache
    assert not list(root.glob("*.tmp"))


# ---------------------------------------------------------------------------------------------
# Every command's own file: one boundary, no try/except printing errors itself
# ---------------------------------------------------------------------------------------------
def test_scripts_do_not_print_their_own_errors():
    """`print(f"error: ...")` followed by `return 2` in a main (a script's or the library
    module's it calls) is the boundary's job."""
    offenders = []
    for path in [*SCRIPTS, *sorted((ROOT / "chexnet").rglob("*.py"))]:
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef) and node.name == "main":
                for handler in ast.walk(node):
                    if isinstance(handler, ast.ExceptHandler) and any(
                            isinstance(n, ast.Return) for n in ast.walk(handler)):
                        offenders.append(f"{path.name}:{handler.lineno}")
    assert offenders == [], offenders



def test_a_header_only_data_entry_is_a_message_and_writes_nothing(tmp_path, capsys):
    """Found by tests/test_fuzz.py (a KeyError after the file was written)."""
    import make_nih_labels

    entry = tmp_path / "Data_Entry_2017.csv"
    entry.write_text("Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,"
                     "Patient Gender,View Position\n")
    out = tmp_path / "nih_labels.csv"
    code = make_nih_labels.main(["--data-entry", str(entry), "--out", str(out), "--split",
                                 "random"])
    refused(capsys, code, f"{entry}: no images")
    assert not out.exists()


def test_eval_model_writes_only_the_files_it_checked(run, tmp_path, capsys):
    """With every option that writes, the files that appear or change are exactly those that
    `output_paths` declares (and check_outputs saw): a new output cannot skip the check."""
    import json

    import eval_model

    entry = Path(json.loads((run / "config.json").read_text())["data"]) / "Data_Entry_2017.csv"
    shutil.copy(run / "preds.csv", run / "val_preds.csv")
    shutil.copy(run / "preds.csv", tmp_path / "other.csv")
    (run / "aucs.csv").unlink()  # rewritten with the same bytes: it would not show as written
    argv = ["--preds", str(run / "preds.csv"), "--labels", str(entry), "--ci", "--n-boot", "5",
            "--roc", str(run / "roc.png"), "--thresholds", "--by", "sex", "--calibration",
            "--compare", str(tmp_path / "other.csv"), "--no-published"]
    before = hashes(run, tmp_path)
    assert eval_model.main(argv) == 0, capsys.readouterr().err
    after = hashes(run, tmp_path)
    written = {path for path, sha in after.items() if before.get(path) != sha}
    declared = {str(p) for p in eval_model.output_paths(eval_model_args(argv)).values()}
    assert written == declared
    assert len(written) == 10  # aucs, _ci, roc, thresholds, compare, 3 calibration, 2 --by


def eval_model_args(argv):
    """The Namespace eval_model.main parses from argv."""
    import argparse

    import eval_model

    seen = {}
    real = argparse.ArgumentParser.parse_args

    def keep(self, args=None, namespace=None):
        seen["args"] = real(self, args, namespace)
        raise Parsed(self)
    argparse.ArgumentParser.parse_args = keep
    try:
        with pytest.raises(Parsed):
            eval_model.main(argv)
    finally:
        argparse.ArgumentParser.parse_args = real
    return seen["args"]


def test_prepare_does_not_write_its_labels_over_the_file_it_reads(tmp_path_factory, tmp_path,
                                                                  capsys):
    """Found by tests/test_fuzz.py: --labels-out naming the --labels file replaced NIH's
    Data_Entry with the derived labels file."""
    import prepare_data

    root = tmp_path / "nih"
    shutil.copytree(tiny_run(tmp_path_factory).parents[1] / "nih", root)
    entry = root / "Data_Entry_2017.csv"
    before = hashes(root)
    code = prepare_data.main(["nih", "--data", str(root), "--labels", str(entry), "--split",
                              "random", "--image-size", "16", "--workers", "1",
                              "--labels-out", str(entry)])
    refused(capsys, code, f"--labels-out {entry} is also this command's input (--labels)")
    assert hashes(root) == before


@pytest.mark.parametrize("command", ["explore_data", "nih_batch_download_zips", "demo_data"])
def test_a_folder_output_that_is_a_file_is_refused(tmp_path_factory, tmp_path, capsys,
                                                   command):
    """Found by tests/test_fuzz.py: "FILE: File exists." from a mkdir, naming no option."""
    module = importlib.import_module(command)
    existing = tmp_path / "notes.txt"
    existing.write_text("mine")
    (tmp_path / "urls.txt").write_text("images_001.tar.gz http://127.0.0.1:9/x\n")
    nih = tiny_run(tmp_path_factory).parents[1] / "nih"
    argv = {"explore_data": ["nih", "--data", str(nih), "--out", str(existing)],
            "nih_batch_download_zips": ["--out", str(existing), "--url-list",
                                        str(tmp_path / "urls.txt")],
            "demo_data": ["--out", str(existing), "--kind", "nih", "--n-images", "2"]}[command]
    code = module.main(argv)
    refused(capsys, code, f"--out {existing} is a file: give the path of a folder")
    assert existing.read_text() == "mine"


def test_demo_data_does_not_write_into_a_folder_that_holds_files(tmp_path, capsys):
    """demo_data.py --out /data would have written its phantoms over a real NIH folder."""
    import demo_data

    real = tmp_path / "nih"
    real.mkdir()
    (real / "Data_Entry_2017.csv").write_text("the real metadata\n")
    code = demo_data.main(["--out", str(tmp_path), "--kind", "nih", "--n-images", "2"])
    refused(capsys, code, f"{real} already holds files", "Choose another --out")
    assert list(real.iterdir()) == [real / "Data_Entry_2017.csv"]
    assert (real / "Data_Entry_2017.csv").read_text() == "the real metadata\n"
