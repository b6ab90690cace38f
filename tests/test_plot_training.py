"""plot_training.py: both log formats, convergence summary, the figure's artists, the CLI."""
from __future__ import annotations

import math
import shutil

import numpy as np
import pandas as pd
import pytest
from matplotlib.colors import to_hex

from chexnet.analysis import training_plots as plot_training
from conftest import shared

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

# Scripted run: LR drops before epochs 4 and 6; best validation loss at epoch 5.
OUR_LOG = """epoch,train_loss,val_loss,lr,seconds
1,0.20,0.18,0.001,10.5
2,0.17,0.16,0.001,10.1
3,0.15,0.165,0.001,10.2
4,0.14,0.15,0.0001,10.0
5,0.13,0.149,0.0001,10.3
6,0.12,0.151,1e-05,10.1
"""


@pytest.fixture
def run_dir(tmp_path):
    run = tmp_path / "runA"
    run.mkdir()
    (run / "log_train.csv").write_text(OUR_LOG)
    return run


def test_reads_reference_log_of_printed_tensors():
    log = plot_training.read_log(shared("reference", "reproduce_chexnet_pretrained_log_train.csv"))
    assert list(log.columns) == ["epoch", "train_loss", "val_loss", "lr"]
    assert len(log) == 9 and log["epoch"].tolist() == list(range(1, 10))
    assert log.loc[0, ["train_loss", "val_loss"]].tolist() == [0.1623, 0.1541]
    assert log.loc[8, ["train_loss", "val_loss"]].tolist() == [0.1241, 0.1459]
    assert log["lr"].isna().all()
    summary = plot_training.convergence_summary(log)
    assert summary == {"best_epoch": 6, "best_val_loss": 0.1452, "lr_steps": [], "epochs": 9}


def test_reads_our_format_from_a_run_folder(run_dir):
    log = plot_training.read_log(run_dir)
    assert log["epoch"].dtype.kind == "i"
    assert log["lr"].tolist() == [1e-3, 1e-3, 1e-3, 1e-4, 1e-4, 1e-5]
    assert log.loc[2, "val_loss"] == 0.165
    summary = plot_training.convergence_summary(log)
    assert summary == {"best_epoch": 5, "best_val_loss": 0.149, "lr_steps": [4, 6], "epochs": 6}


@pytest.mark.parametrize("cell, value", [
    ("tensor(0.1623, device='cuda:0')", 0.1623),
    ("tensor(1.5e-03, device='cuda:0', grad_fn=<MeanBackward0>)", 1.5e-3),
    ("tensor(2)", 2.0), (" 0.25 ", 0.25), ("-3", -3.0), (".5", 0.5), (0.75, 0.75),
])
def test_parse_number(cell, value):
    assert plot_training.parse_number(cell) == value


def test_parse_number_nan_and_rejects_text():
    assert math.isnan(plot_training.parse_number("tensor(nan, device='cuda:0')"))
    for bad in ("loss", "tensor(abc)", "", "0.1 0.2"):
        with pytest.raises(ValueError, match="cannot read a number"):
            plot_training.parse_number(bad)


def test_read_log_errors_name_file_line_and_column(tmp_path):
    bad = tmp_path / "log.csv"
    bad.write_text("epoch,train_loss,val_loss\n1,0.2,0.1\n2,oops,0.1\n")
    with pytest.raises(ValueError, match=r"log.csv: line 3, column 'train_loss'"):
        plot_training.read_log(bad)
    bad.write_text("epoch,loss\n1,0.2\n")
    with pytest.raises(ValueError, match=r"no column\(s\) \['train_loss', 'val_loss'\]"):
        plot_training.read_log(bad)
    with pytest.raises(FileNotFoundError, match="log_train.csv"):
        plot_training.read_log(tmp_path)
    bad.write_text("epoch,train_loss,val_loss\n1,0.2,0.1\nnan,0.2,0.1\n")  # found by test_fuzz
    with pytest.raises(ValueError, match=r"log.csv: line 3, column 'epoch': 'nan' is not a "
                       r"whole number"):
        plot_training.read_log(bad)
    bad.write_text("epoch,train_loss,val_loss\n")
    with pytest.raises(ValueError, match=r"log.csv: no epochs in this log"):
        plot_training.read_log(bad)
    bad.write_text("")
    with pytest.raises(ValueError, match=r"log.csv: not a training log CSV"):
        plot_training.read_log(bad)


def test_summary_earliest_best_on_ties_and_no_steps_for_constant_lr():
    log = pd.DataFrame({"epoch": [1, 2, 3, 4], "train_loss": [4., 3., 2., 1.],
                        "val_loss": [0.5, 0.3, 0.3, 0.4], "lr": [0.1] * 4})
    s = plot_training.convergence_summary(log)
    assert s["best_epoch"] == 2 and s["lr_steps"] == []
    # A resumed run logging epochs 5.. keeps its own epoch numbers.
    s = plot_training.convergence_summary(log.assign(epoch=[5, 6, 7, 8], lr=[.1, .1, .01, .01]))
    assert s["best_epoch"] == 6 and s["lr_steps"] == [7]


def by_gid(ax, gid):
    return [line for line in ax.lines if line.get_gid() == gid]


def test_plot_runs_draws_each_runs_curves_steps_and_best(run_dir):
    ours = plot_training.read_log(run_dir)
    other = ours.assign(val_loss=ours["val_loss"] + 0.01, lr=np.nan).iloc[:4]
    fig = plot_training.plot_runs([ours, other], ["ours", "other"])
    (ax,) = fig.axes
    train, val, best, lr = (by_gid(ax, g) for g in ("train", "val", "best", "lr"))
    assert len(ax.lines) == 2 + 2 + 2 + 2     # 2 runs x (train, val, star) + 2 LR steps of run 1
    assert len(train) == len(val) == len(best) == 2 and len(lr) == 2
    assert {line.get_linestyle() for line in train} == {"--"}
    assert {line.get_linestyle() for line in val} == {"-"}
    assert {line.get_linestyle() for line in lr} == {":"}
    assert [line.get_xdata()[0] for line in lr] == [4, 6]
    colours = [to_hex(line.get_color()) for line in val]
    assert colours[0] != colours[1]
    assert [to_hex(line.get_color()) for line in train] == colours
    assert best[0].get_marker() == "*"
    assert (best[0].get_xdata()[0], best[0].get_ydata()[0]) == (5, 0.149)
    assert best[1].get_xdata()[0] == 4 and best[1].get_ydata()[0] == pytest.approx(0.16)
    np.testing.assert_array_equal(val[0].get_ydata(), ours["val_loss"])
    notes = [t.get_text() for t in ax.texts]
    assert notes == ["lr 1e-04", "lr 1e-05"]
    with pytest.raises(ValueError, match="2 logs but 1 labels"):
        plot_training.plot_runs([ours, other], ["one"])


def test_cli_writes_png_and_prints_summary(run_dir, tmp_path, capsys):
    reference = shared("reference", "reproduce_chexnet_pretrained_log_train.csv")
    out = tmp_path / "curves.png"
    assert plot_training.main([str(run_dir), str(reference), "--names", "ours", "reference",
                               "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == PNG_MAGIC
    printed = capsys.readouterr().out
    assert "ours: 6 epochs, best epoch 5 (val loss 0.1490), LR steps at epochs: 4, 6" in printed
    assert "reference: 9 epochs, best epoch 6 (val loss 0.1452)" in printed
    assert f"wrote {out}" in printed


def test_cli_default_labels_and_errors(run_dir, tmp_path, capsys):
    out = tmp_path / "one.png"
    assert plot_training.main([str(run_dir), "--out", str(out)]) == 0
    assert capsys.readouterr().out.startswith("runA: 6 epochs")
    assert plot_training.main([str(tmp_path / "missing"), "--out", str(out)]) == 2
    assert "no training log" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        plot_training.main([str(run_dir), "--names", "a", "b", "--out", str(out)])
    assert "1 runs but 2 --names" in capsys.readouterr().err


def test_legend_names_are_names_and_labels_is_not_an_option_here(run_dir, tmp_path, capsys):
    """--labels means a labels file in every other script: the legend option is --names, and
    the old --labels is refused."""
    out = tmp_path / "one.png"
    assert plot_training.main([str(run_dir), "--names", "mine", "--out", str(out)]) == 0
    assert capsys.readouterr().out.startswith("mine: 6 epochs")
    with pytest.raises(SystemExit) as stop:
        plot_training.main([str(run_dir), "--labels", "mine", "--out", str(tmp_path / "2.png")])
    assert stop.value.code == 2 and "unrecognized arguments: --labels" in capsys.readouterr().err


def test_no_lr_steps_says_why(tmp_path, capsys):
    """A run that logs its lr but never decays it is not 'none logged'."""
    log = tmp_path / "log_train.csv"
    log.write_text("epoch,train_loss,val_loss,lr,seconds\n1,0.5,0.4,0.01,3\n2,0.4,0.35,0.01,3\n")
    assert plot_training.main([str(log), "--out", str(tmp_path / "a.png")]) == 0
    assert "LR steps at epochs: none (lr constant at 0.01)" in capsys.readouterr().out
    reference = shared("reference", "reproduce_chexnet_pretrained_log_train.csv")
    assert plot_training.main([str(reference), "--out", str(tmp_path / "b.png")]) == 0
    assert "LR steps at epochs: not logged (no lr column)" in capsys.readouterr().out


def test_a_one_epoch_run_is_drawn_with_markers(tmp_path):
    log = tmp_path / "log_train.csv"
    log.write_text("epoch,train_loss,val_loss,lr,seconds\n1,0.5,0.4,0.01,3\n")
    fig = plot_training.plot_runs([plot_training.read_log(log)], ["one"])
    lines = {line.get_gid(): line for line in fig.axes[0].lines}
    assert lines["train"].get_marker() == "o" and lines["val"].get_marker() == "o"


def test_reference_flag_adds_the_published_curve_or_says_how_to_fetch_it(tmp_path, monkeypatch,
                                                                        capsys):
    from chexnet import reference

    monkeypatch.setattr(reference, "PRETRAINED_DIR", tmp_path / "pretrained")
    out = tmp_path / "curves.png"
    assert plot_training.main(["--reference", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "log_train: not found" in err and "python fetch_reference.py" in err
    assert not out.exists()
    (tmp_path / "pretrained").mkdir()
    shutil.copyfile(shared("reference", "reproduce_chexnet_pretrained_log_train.csv"),
                    tmp_path / "pretrained" / "log_train")
    assert plot_training.main(["--reference", "--out", str(out)]) == 0
    assert "reproduce-chexnet (published): 9 epochs, best epoch 6 (val loss 0.1452)" in \
        capsys.readouterr().out
    assert out.stat().st_size > 10_000


def test_no_run_and_no_reference_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as stop:
        plot_training.main([])
    assert stop.value.code == 2 and "or --reference" in capsys.readouterr().err
