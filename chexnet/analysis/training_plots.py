"""Training curves of one or more runs: loss per epoch, LR steps, best epoch.

    python plot_training.py results/A results/B --labels baseline amp --out curves.png
    python plot_training.py results/demo --reference --out curves.png
    python plot_training.py pretrained/log_train --out reference.png

--reference adds reproduce-chexnet's published curve (pretrained/log_train, fetched once by
`python fetch_reference.py`).

Each argument is a run folder (its `log_train.csv` is read) or a CSV file. Two formats:
  - this project's `log_train.csv`: `epoch,train_loss,val_loss,lr,seconds`;
  - reproduce-chexnet's log: `epoch,train_loss,val_loss` whose cells are printed tensors such as
    `tensor(0.1623, device='cuda:0')`; it has no lr column, so no LR steps are shown.
Train loss is dashed, validation loss solid, one colour per run; dotted vertical lines mark the
epochs that started at a new learning rate, a star the best (lowest validation loss) epoch.
"""
from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from chexnet.files import check_outputs, run_files
from chexnet.cli import CommandError, command
from chexnet.reference import hint, reference_path

LOG_NAME = "log_train.csv"
COLUMNS = ("epoch", "train_loss", "val_loss", "lr")

# A plain number or a printed tensor: "0.1623", "1e-3", "nan", "tensor(0.1623, device='cuda:0')",
# "tensor(0.1623, grad_fn=<...>)". The number is the first thing after an optional "tensor(".
_NUMBER = re.compile(r"^\s*(?:tensor\(\s*)?([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?|[-+]?nan"
                     r"|[-+]?inf)\s*(?:[,)].*)?$", re.IGNORECASE)


class LogError(CommandError, ValueError):
    """A training log that cannot be read as one: the message names the file."""


class LogNotFound(CommandError, FileNotFoundError):
    """No training log where one was named."""


def log_path(path: str | Path) -> Path:
    """The log CSV of a run folder (its log_train.csv) or the CSV path itself."""
    path = Path(path)
    if path.is_dir():
        path = path / LOG_NAME
    if not path.is_file():
        raise LogNotFound(f"{path}: no training log (expected a run folder with "
                          f"{LOG_NAME}, or a CSV file).{hint(path)}")
    return path


def parse_number(cell: object) -> float:
    """A log cell as a float: plain numbers and printed tensors ('tensor(0.1623, ...)').

    Raises:
        ValueError: the cell is neither.
    """
    if isinstance(cell, (int, float, np.number)):
        return float(cell)
    match = _NUMBER.match(str(cell))
    if match is None:
        raise ValueError(f"cannot read a number from {cell!r}")
    return float(match.group(1))


def read_log(path: str | Path) -> pd.DataFrame:
    """Read a training log in this project's or reproduce-chexnet's format.

    Args:
        path: a run folder (reads its log_train.csv) or a CSV file.

    Returns:
        DataFrame with columns epoch (int), train_loss, val_loss, lr (float; lr is NaN when
        the log has no lr column), one row per epoch in file order.

    Raises:
        LogNotFound (a FileNotFoundError): no log at `path`.
        LogError (a ValueError): not a CSV, no epoch yet, a required column missing or a
            cell that is not a number (names file, row and column).
    """
    path = log_path(path)
    # Read as text: printed tensors contain commas inside quotes, and parsing them ourselves
    # keeps one code path for both formats.
    try:
        raw = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        raise LogError(f"{path}: not a training log CSV ({str(err).strip() or 'empty'}); "
                       f"expected the columns {', '.join(COLUMNS)}") from None
    missing = [c for c in COLUMNS[:3] if c not in raw.columns]
    if missing:
        raise LogError(f"{path}: no column(s) {missing} (columns: {list(raw.columns)}); "
                       f"expected {', '.join(COLUMNS)}")
    if raw.empty:
        raise LogError(f"{path}: no epochs in this log (it has only its header): the run has "
                       "not finished its first epoch yet.")
    out = {}
    for col in COLUMNS:
        if col not in raw.columns:
            out[col] = np.full(len(raw), np.nan)
            continue
        values = []
        for row, cell in enumerate(raw[col]):
            try:
                values.append(parse_number(cell))
            except ValueError as err:
                raise LogError(f"{path}: line {row + 2}, column '{col}': {err}") from None
        out[col] = np.array(values, dtype=np.float64)
    epochs = out["epoch"]
    bad = ~np.isfinite(epochs) | (np.round(epochs) != epochs)
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        raise LogError(f"{path}: line {row + 2}, column 'epoch': {raw['epoch'].iloc[row]!r} is "
                       "not a whole number of epochs")
    log = pd.DataFrame(out)
    log["epoch"] = log["epoch"].astype(int)
    return log


def convergence_summary(log: pd.DataFrame) -> dict:
    """Where a run converged.

    Args:
        log: from `read_log`.

    Returns:
        dict with best_epoch (lowest val_loss; the earliest on ties), best_val_loss,
        lr_steps (epochs whose lr differs from the previous epoch's: the first epoch run at
        each new rate; empty when lr is unknown), epochs (number of epochs logged).
    """
    if log.empty:
        raise ValueError("empty training log: no epoch finished")
    val = log["val_loss"].to_numpy()
    if np.isnan(val).all():
        best_epoch, best_val = None, float("nan")
    else:
        best = int(np.nanargmin(val))   # first minimum
        best_epoch, best_val = int(log["epoch"].iloc[best]), float(val[best])
    lr = log["lr"].to_numpy()
    changed = (lr[1:] != lr[:-1]) & ~np.isnan(lr[1:]) & ~np.isnan(lr[:-1])
    steps = [int(e) for e in log["epoch"].to_numpy()[1:][changed]]
    return {"best_epoch": best_epoch, "best_val_loss": best_val, "lr_steps": steps,
            "epochs": len(log)}


def plot_runs(logs: Sequence[pd.DataFrame], labels: Sequence[str]) -> Figure:
    """Loss curves of several runs on one Axes.

    Per run, in one colour: train loss dashed (gid 'train'), validation loss solid ('val'),
    the best epoch a star on the validation curve ('best'), and per LR step a dotted vertical
    line ('lr') annotated with the new rate. Artists carry those gids so callers and tests can
    find them.

    Args:
        logs: DataFrames from `read_log`.
        labels: one legend name per log.

    Returns:
        The Figure (one Axes).
    """
    if len(logs) != len(labels):
        raise ValueError(f"{len(logs)} logs but {len(labels)} labels")
    fig = Figure(figsize=(8, 5), layout="constrained")
    ax = fig.add_subplot()
    colours = [f"C{i % 10}" for i in range(len(logs))]
    for log, label, colour in zip(logs, labels, colours):
        summary = convergence_summary(log)
        # A one-epoch run is a single point per curve: a line alone would not show it.
        marker = "o" if len(log) == 1 else None
        ax.plot(log["epoch"], log["train_loss"], ls="--", color=colour, gid="train",
                marker=marker, label=f"{label} train")
        ax.plot(log["epoch"], log["val_loss"], ls="-", color=colour, gid="val",
                marker=marker, label=f"{label} val")
        if summary["best_epoch"] is not None:
            ax.plot([summary["best_epoch"]], [summary["best_val_loss"]], ls="none", marker="*",
                    ms=14, color=colour, markeredgecolor="black", gid="best",
                    label=f"{label} best: epoch {summary['best_epoch']}, "
                          f"val {summary['best_val_loss']:.4f}")
        lr_of = dict(zip(log["epoch"], log["lr"]))
        for epoch in summary["lr_steps"]:
            ax.axvline(epoch, ls=":", color=colour, lw=1.2, gid="lr")
            # x in data units, y in axes units: the note sits at the top whatever the losses.
            ax.annotate(f"lr {lr_of[epoch]:.0e}", xy=(epoch, 0.98),
                        xycoords=("data", "axes fraction"), rotation=90, va="top", ha="right",
                        fontsize=8, color=colour)
    ax.set(xlabel="epoch", ylabel="BCE loss", title="training (dashed) and validation (solid) loss")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return fig


def lr_note(log: pd.DataFrame) -> str:
    """Why a run shows no LR step: its log has no lr, or the lr never changed."""
    lr = log["lr"].dropna()
    if lr.empty:
        return "not logged (no lr column)"
    return f"none (lr constant at {lr.iloc[0]:g})"


def run_label(path: str | Path) -> str:
    """Default legend name: the run folder's name, or the CSV's stem."""
    path = Path(path)
    return path.name if path.is_dir() else path.stem


@command
def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="*", help="run folders or log CSV files")
    parser.add_argument("--reference", action="store_true", help="add reproduce-chexnet's "
                        "published curve (pretrained/log_train, from fetch_reference.py)")
    parser.add_argument("--names", nargs="+", help="legend names, one per run "
                        "(default: folder names / file stems)")
    parser.add_argument("--out", default="training_curves.png", help="figure path (PNG)")
    args = parser.parse_args(argv)
    if not args.runs and not args.reference:
        parser.error("give run folders or log CSV files, or --reference")
    check_outputs({"--out": args.out}, {f"run {r}": r for r in args.runs}
                  | {k: v for r in args.runs for k, v in run_files(r).items()})
    labels = args.names or [run_label(r) for r in args.runs]
    if len(labels) != len(args.runs):
        parser.error(f"{len(args.runs)} runs but {len(labels)} --names")
    runs = list(args.runs)
    if args.reference:
        runs.append(reference_path("log_train"))
        labels.append("reproduce-chexnet (published)")
    logs = [read_log(r) for r in runs]
    for label, log in zip(labels, logs):
        s = convergence_summary(log)
        steps = ", ".join(map(str, s["lr_steps"])) or lr_note(log)
        print(f"{label}: {s['epochs']} epochs, best epoch {s['best_epoch']} "
              f"(val loss {s['best_val_loss']:.4f}), LR steps at epochs: {steps}")
    plot_runs(logs, labels).savefig(args.out, dpi=120)
    print(f"wrote {args.out}")
    return 0
