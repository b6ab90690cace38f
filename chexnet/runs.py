"""The run folder and the machinery of a run: everything retrain.py does besides training.

    run_folder_lock      one retrain.py per run folder (flock), no trace left by a failed start
    check_run_folder     a new run never trains over an old one; --resume needs last.pt
    write_run_record     config.json and run_record.json (versions, data hashes)
    atomic_torch_save    checkpoints written atomically (a crash leaves the previous file)
    resume_from          continue from last.pt, refusing changed settings or data
    StopRequest          SIGINT/SIGTERM -> last.pt saved, then exit 128 + signal
    write_predictions    preds.csv and aucs.csv of a finished run
    run_tables           a finished run's label table, as it was trained on

chexnet/train.py (the recipe and the loop) calls these; the analysis tools read finished runs
through `run_tables`, `run_test_table` and `config.load_run_config`, never through train.py.
"""
from __future__ import annotations

import contextlib
import dataclasses
import errno
import io
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import pandas as pd
import torch
from torch import nn

from chexnet.cli import CommandError
from chexnet.config import TrainConfig, load_run_config
from chexnet.data import LabelTable
from chexnet.files import RUN_MARKERS, atomic_write, is_run_folder, sha256_bytes, sha256_file
from chexnet.loaders import load_tables
from chexnet.model import read_checkpoint
from chexnet.runtime import Dist, Precision, probe_batch_size, scaled_lr
from chexnet.scoring import PROB_PREFIX, auc_table, format_auc_table, per_label_auc

REFERENCE_TEST_IMAGES = 22_433  # reproduce-chexnet's test fold, the reference split's
# Settings that may differ when a run is resumed (they do not change what is computed).
RESUMABLE_CHANGES = {"epochs", "device", "workers", "resume", "force", "save_every",
                     "eval_batch_size", "cache", "cache_dir"}
LOCK_FILE = ".lock"


class RunFolderError(CommandError):
    """The run folder cannot be used: in use by another retrain.py, already a run, nothing to
    resume, or not creatable."""


class ResumeError(CommandError):
    """last.pt was written with other settings or data (resume with the same, or --force)."""


class DeviceError(CommandError):
    """The --device asked for is not on this machine."""


class SaveError(CommandError, RuntimeError):
    """A result file could not be written (disk full, permissions); the old file is intact."""


def _atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """`files.atomic_write`, with a SaveError that says what survived and what to do: a crash
    or a full disk at any instant leaves the previous file as it was."""
    try:
        atomic_write(path, write)
    except OSError as err:
        kept = f"the previous {path.name} is intact" if path.exists() else "nothing was written"
        if err.errno == errno.ENOSPC:
            # --resume only where a last.pt exists: a run that stops before its first last.pt
            # is removed (run_folder_lock), and the same command starts it again.
            again = " with --resume" if (path.parent / "last.pt").exists() else ""
            fix = f"Free some space (a checkpoint needs ~60 MB) and run the same command{again}."
        else:
            fix = f"Check that {path.parent} exists and is writable."
        raise SaveError(f"could not write {path}: {err.strerror or err} ({kept}). {fix}") from err


def atomic_torch_save(obj: object, path: Path) -> None:
    """`torch.save` of `obj` to `path`, atomically. The archive is built in memory and written
    by Python: torch's own file writer reports a full disk as a RuntimeError ("unexpected
    pos"), Python's write as the OSError (ENOSPC) it is."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    _atomic_write(path, lambda tmp: tmp.write_bytes(buffer.getbuffer()))


def save_text(text: str, path: Path) -> None:
    """`text` to `path` atomically; a failure is a SaveError saying what survived."""
    _atomic_write(path, lambda tmp: tmp.write_text(text))


# --------------------------------------------------------------------------------------------
# Checkpoints and random states
# --------------------------------------------------------------------------------------------
def rng_state() -> dict:
    np_state = np.random.get_state()
    return {"torch": torch.get_rng_state(), "python": random.getstate(),
            "numpy": (np_state[0], np_state[1].tolist(), *np_state[2:]),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), *rest))
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def load_run_checkpoint(path: str | os.PathLike) -> dict:
    """Load a checkpoint written by this project (state dicts only: weights_only=True).

    Raises:
        CheckpointError: missing, not a checkpoint, or damaged (named, with what to do).
    """
    hint = ("it cannot be resumed from: start a new run with another --name (its checkpoint.pt "
            "still holds the best epoch)" if Path(path).name == "last.pt" else "retrain")
    return read_checkpoint(path, ("model",), hint)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def pick_device(name: str, ctx: Dist = Dist()) -> torch.device:
    """`auto`: this process's CUDA GPU when there is one, else the CPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and ctx.enabled:
        name = f"cuda:{ctx.local_rank}"
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DeviceError(f"--device {name}: no CUDA GPU is available here; use --device cpu.")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise DeviceError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA "
                        f"GPU(s), numbered from 0; use --device cuda (the first) or cpu.")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise DeviceError(f"--device {name}: Apple's MPS is not available here; use --device cpu.")
    return device


def config_diff(old: dict, new: dict) -> dict[str, tuple]:
    keys = (set(old) | set(new)) - RESUMABLE_CHANGES
    return {k: (old.get(k), new.get(k)) for k in sorted(keys) if old.get(k) != new.get(k)}


def describe_changes(diff: dict[str, tuple]) -> str:
    """A config_diff (plus 'data': old and new data_record) as lines a person reads:
    `--lr: 0.01 -> 0.1`, `labels file X: contents changed`, `fold assignment changed`."""
    def plain(value: object) -> object:
        return value.item() if isinstance(value, np.generic) else value

    lines = []
    for key, (old, new) in diff.items():
        if key == "data":
            continue
        lines.append(f"--{key.replace('_', '-')}: {plain(old)!r} -> {plain(new)!r}")
    if "data" in diff:
        old, new = (d or {} for d in diff["data"])
        old_src, new_src = old.get("sources", {}), new.get("sources", {})
        for path in sorted(set(old_src) | set(new_src)):
            if path not in new_src:
                lines.append(f"labels file {path}: no longer used")
            elif path not in old_src:
                lines.append(f"labels file {path}: not used before")
            elif old_src[path] != new_src[path]:
                lines.append(f"labels file {path}: its contents changed")
        if plain(old.get("images")) != plain(new.get("images")):
            lines.append(f"images: {plain(old.get('images'))} -> {plain(new.get('images'))}")
        if old.get("folds_sha256") != new.get("folds_sha256"):
            lines.append("the fold assignment changed")
    return "\n  ".join(lines)


# --------------------------------------------------------------------------------------------
# Signals
# --------------------------------------------------------------------------------------------
class Interrupted(CommandError):
    """SIGINT/SIGTERM arrived; last.pt was saved first (exit 128 + the signal's number, as a
    shell reports a process the signal ended)."""

    def __init__(self, signum: int, where: str):
        super().__init__(f"stopped by {signal.Signals(signum).name} {where}. Run the same "
                         "command with --resume to continue.")
        self.signum = signum
        self.exit_code = 128 + signum


class StopRequest:
    """Turns SIGINT/SIGTERM into a flag the training loop checks after each step, so that
    last.pt is written from a consistent state before the process exits."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict = {}

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: object) -> None:
        if self.signum is not None:  # a second Ctrl-C: stop at once
            raise KeyboardInterrupt
        self.signum = signum
        print(f"\n{signal.Signals(signum).name}: saving last.pt, then stopping "
              "(press Ctrl-C again to stop without saving)", file=sys.stderr, flush=True)

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


# --------------------------------------------------------------------------------------------
# The run folder and the run's state
# --------------------------------------------------------------------------------------------
def data_record(cfg: TrainConfig, labels: LabelTable) -> dict:
    """What the run was trained on: label source hashes and a hash of the fold assignment."""
    folds = pd.util.hash_pandas_object(labels.frame[["image_id", "fold"]], index=False)
    return {"sources": {str(p): sha256_file(p) for p in labels.sources},
            "images": int(len(labels.frame)),
            "folds_sha256": sha256_bytes(folds.to_numpy().tobytes())}


def environment_record() -> dict:
    """Package versions, hardware and the git commit, for the run folder."""
    import platform

    import sklearn
    import torchvision

    repo = Path(__file__).resolve().parents[1]
    commit, dirty = None, None
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True,
                                text=True, timeout=10).stdout.strip() or None
        if commit:
            status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                                    cwd=repo, capture_output=True, text=True, timeout=10).stdout
            dirty = bool(status.strip())
    except (OSError, subprocess.SubprocessError) as err:  # no git: record why
        commit = f"unavailable ({err.__class__.__name__})"
    return {
        "python": platform.python_version(), "platform": platform.platform(),
        "torch": torch.__version__, "torchvision": torchvision.__version__,
        "numpy": np.__version__, "pandas": pd.__version__, "scikit-learn": sklearn.__version__,
        "cuda": torch.version.cuda, "gpu": (torch.cuda.get_device_name(0)
                                            if torch.cuda.is_available() else None),
        "git_commit": commit, "git_dirty": dirty,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


@dataclass
class EpochProgress:
    """Where an epoch stands: saved in last.pt so a run resumes at the exact next batch."""
    epoch: int
    batches: int = 0          # batches done in this epoch
    loss_sum: float = 0.0     # sum of per-entry losses so far
    count: int = 0            # labelled entries so far
    seconds: float = 0.0      # training time spent on this epoch before the current process

    @property
    def mean_loss(self) -> float:
        return self.loss_sum / max(self.count, 1)


@dataclass
class RunState:
    """What a training run holds while it trains: set up by `start_run`, advanced by
    `train_epochs`, read by `final_predictions`."""
    cfg: TrainConfig
    ctx: Dist
    device: torch.device
    findings: list[str]
    data: dict                                  # data_record: what it is trained on
    net: nn.Module                              # the bare model (state dicts, checkpoints)
    model: nn.Module                            # what is called: DDP and/or compiled net
    optimizer: torch.optim.Optimizer
    schedule: Any                               # train.PlateauSchedule
    scaler: torch.amp.GradScaler
    precision: Precision
    loaders: dict
    history: list[dict] = field(default_factory=list)
    start_epoch: int = 1
    partial: EpochProgress | None = None        # resume inside this epoch

    @property
    def say(self) -> Callable[..., None]:
        return print if self.ctx.main else (lambda *a, **k: None)

    @property
    def last_path(self) -> Path:
        return self.cfg.run_dir / "last.pt"

    @property
    def best_path(self) -> Path:
        return self.cfg.run_dir / "checkpoint.pt"

    def last_state(self, epoch_done: int, in_epoch: EpochProgress | None, stopped: bool) -> dict:
        """Everything `--resume` needs, as state dicts (last.pt)."""
        return {"model": self.net.state_dict(), "optimizer": self.optimizer.state_dict(),
                "schedule": self.schedule.state_dict(), "scaler": self.scaler.state_dict(),
                "epoch": epoch_done, "history": self.history,
                "in_epoch": dataclasses.asdict(in_epoch) if in_epoch else None,
                "rng": rng_state(), "config": self.cfg.record(), "data": self.data,
                "findings": list(self.findings), "stopped": stopped}


@contextlib.contextmanager
def run_folder_lock(run_dir: Path) -> Iterator[None]:
    """Own the run folder for the whole run: a second retrain.py with the same --out/--name
    is refused instead of overwriting this run's files under its config.json.

    The lock is an flock on RUN/.lock, which the operating system releases when the process
    ends in any way, SIGKILL included, so a crashed run never leaves it stuck (--resume just
    works). Only torchrun's rank 0 (the process that writes) takes it. Where flock does not
    exist (Windows) there is no lock.
    """
    try:
        import fcntl
    except ImportError:  # Windows
        yield
        return
    if int(os.environ.get("RANK", "0")):
        yield
        return
    created = not run_dir.exists()
    new_lock = not (run_dir / LOCK_FILE).exists()
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        fh = open(run_dir / LOCK_FILE, "a+")
    except OSError as err:
        raise RunFolderError(f"cannot create the run folder {run_dir}: {err.strerror or err}. "
                             "Check that --out is writable, or choose another --out.") from err
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as err:
        fh.seek(0)
        owner = fh.read().strip() or "another process"
        fh.close()
        raise RunFolderError(f"{run_dir} is in use by another retrain.py ({owner}). Wait for it "
                             "to finish (or stop it), or choose another --name.") from err
    finished = False
    fh.seek(0)
    previous_owner = fh.read()  # put back if this run stops: a refused run changes no file
    try:
        fh.seek(0)
        fh.truncate()
        fh.write(f"pid {os.getpid()}, started {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        fh.flush()
        yield
        finished = True
    finally:
        if not finished and created and not (run_dir / "last.pt").exists():
            # Failed before its first save (bad data, an empty fold): nothing to resume, so
            # leave no trace; a config.json left behind would make the folder a run.
            shutil.rmtree(run_dir, ignore_errors=True)
        elif not finished and new_lock:
            (run_dir / LOCK_FILE).unlink(missing_ok=True)  # a refused run adds no file
        elif not finished:
            fh.seek(0)
            fh.truncate()
            fh.write(previous_owner)
        fh.close()  # releases the lock


def check_run_folder(cfg: TrainConfig, ctx: Dist) -> None:
    """A new run needs a folder without a run (any of its files: files.RUN_MARKERS);
    --resume needs its last.pt."""
    last_path = cfg.run_dir / "last.pt"
    if cfg.resume and not last_path.is_file():
        raise RunFolderError(f"{last_path}: nothing to resume (no last.pt). Drop --resume to start "
                        "a new run.")
    if not cfg.resume and is_run_folder(cfg.run_dir):
        held = ", ".join(n for n in RUN_MARKERS if (cfg.run_dir / n).exists())
        resume = ("Pass --resume to continue it, or choose" if last_path.is_file() else
                  "It has no last.pt to resume from; choose")
        raise RunFolderError(f"{cfg.run_dir} already holds a run ({held}). {resume} another --name "
                        "(a run folder is never trained over).")
    if ctx.main:
        cfg.run_dir.mkdir(parents=True, exist_ok=True)


def announce(cfg: TrainConfig, ctx: Dist, device: torch.device, labels: LabelTable,
             skipped: list[str]) -> None:
    """Print what will be trained on; write skipped.txt."""
    say = print if ctx.main else (lambda *a, **k: None)
    counts = labels.frame["fold"].value_counts()
    findings = labels.findings
    say(f"{cfg.dataset}: {len(labels.frame)} images (train {counts.get('train', 0)}, "
        f"val {counts.get('val', 0)}, test {counts.get('test', 0)}), {len(findings)} findings")
    if skipped and ctx.main:
        save_text("\n".join(skipped) + "\n", cfg.run_dir / "skipped.txt")
        say(f"skipped {len(skipped)} listed images not found on disk "
            f"(ids in {cfg.run_dir / 'skipped.txt'})")
    if device.type == "cpu":
        say("Training on CPU: fine for the demo and tests. A full NIH epoch at 224 px takes "
            "days on a CPU; use a CUDA GPU (--device cuda) for real runs.")
    if ctx.enabled:
        say(f"torchrun: {ctx.world} processes, {cfg.batch_size // max(ctx.world, 1)} images "
            "each per step")


def choose_batch_size(cfg: TrainConfig, state: dict | None, net: nn.Module,
                      precision: Precision, device: torch.device, ctx: Dist) -> TrainConfig:
    """--batch-size auto: the resumed run's batch and lr, or the largest batch that fits with
    the lr scaled linearly. Returns the config with both set."""
    if state is not None:
        return dataclasses.replace(cfg, batch_size=state["config"]["batch_size"],
                                   lr=state["config"]["lr"])
    batch = probe_batch_size(net, cfg.image_size, len(cfg.findings), device, precision.amp,
                             cfg.channels_last)
    batch -= batch % ctx.world
    cfg = dataclasses.replace(cfg, batch_size=batch, lr=scaled_lr(cfg.lr, batch))
    if ctx.main:
        print(f"--batch-size auto: {batch} (the largest that fits, with a 20% margin); lr "
              f"scaled linearly to {cfg.lr:g}")
    return cfg


def resume_from(run: RunState, state: dict) -> None:
    """Continue from last.pt: refuse changed settings or data (unless --force), then load the
    model, optimizer, schedule, scaler, history and RNG states."""
    cfg, say = run.cfg, run.say
    diff = config_diff(state["config"], cfg.record())
    if state.get("data") != run.data:
        diff["data"] = (state.get("data"), run.data)
    if diff and not cfg.force:
        raise ResumeError(f"{run.last_path} was written with other settings or data:\n  "
                        f"{describe_changes(diff)}\nResume with the same settings and data, or "
                        "pass --force.")
    run.net.load_state_dict(state["model"])
    run.optimizer.load_state_dict(state["optimizer"])
    run.schedule.load_state_dict(state["schedule"])
    if state.get("scaler"):
        run.scaler.load_state_dict(state["scaler"])
    run.history = state["history"]
    set_rng_state(state["rng"])
    run.start_epoch = state["epoch"] + 1
    if state.get("in_epoch"):
        run.partial = EpochProgress(**state["in_epoch"])
        say(f"resuming {cfg.run_dir} in epoch {run.partial.epoch} after batch "
            f"{run.partial.batches}")
    else:
        say(f"resuming {cfg.run_dir} after epoch {state['epoch']}")
    if run.schedule.best_epoch:  # none before the first epoch has ended
        say(f"  best val loss so far {run.schedule.best_loss:.4f} (epoch "
            f"{run.schedule.best_epoch})")
    if state.get("stopped"):
        say("that run had already stopped early; going straight to the test predictions")
        run.start_epoch = cfg.epochs + 1


def write_run_record(run: RunState) -> None:
    """config.json (every setting) and run_record.json (versions, data hashes), rank 0."""
    if not run.ctx.main:
        return
    cfg = run.cfg
    save_text(json.dumps(cfg.record(), indent=2) + "\n",
                      cfg.run_dir / "config.json")
    record = {"environment": environment_record(), "data": run.data, "seed": cfg.seed,
              "processes": run.ctx.world}
    save_text(json.dumps(record, indent=2) + "\n", cfg.run_dir / "run_record.json")


def save_in_epoch(run: RunState, progress: EpochProgress) -> None:
    """last.pt in the middle of an epoch (every --save-every steps, and on a stop signal), so
    that --resume continues at the next batch (rank 0 writes)."""
    if run.ctx.main:
        atomic_torch_save(run.last_state(progress.epoch - 1, progress, False), run.last_path)


def save_epoch(run: RunState, epoch: int, val_loss: float, step: dict) -> None:
    """checkpoint.pt when the validation loss improved; last.pt and log_train.csv always."""
    if not run.ctx.main:
        return
    cfg = run.cfg
    if step["improved"]:
        atomic_torch_save({"model": run.net.state_dict(), "epoch": epoch, "val_loss": val_loss,
                           "config": cfg.record(), "findings": list(run.findings)},
                          run.best_path)
    atomic_torch_save(run.last_state(epoch, None, step["stop"]), run.last_path)
    save_text(pd.DataFrame(run.history).to_csv(index=False),
                      cfg.run_dir / "log_train.csv")


# --------------------------------------------------------------------------------------------
# Outputs, and readers of finished runs
# --------------------------------------------------------------------------------------------
def write_preds_csv(path: Path, cfg: TrainConfig, findings: Sequence[str], ids: list[str],
                    probs: np.ndarray, targets: np.ndarray) -> None:
    """id column, prob_<F> per finding (reproduce-chexnet's format), then the ground truth.

    NIH rows are sorted by `Image Index`, as reproduce-chexnet's preds.csv is (its labels file
    is sorted; Data_Entry v2020, and so the folds here, are not quite: 4,911 of the 22,433
    reference test rows would sit elsewhere). CheXphoto rows keep the order of its CSV."""
    id_col = "Path" if cfg.dataset == "chexphoto" else "Image Index"
    preds = pd.DataFrame({id_col: ids})
    for k, f in enumerate(findings):
        preds[PROB_PREFIX + f] = probs[:, k]
    for k, f in enumerate(findings):
        preds[f] = targets[:, k]
    if id_col == "Image Index":
        preds = preds.sort_values(id_col, kind="stable")
    save_text(preds.to_csv(index=False), path)


def write_predictions(run_dir: Path, cfg: TrainConfig, findings: Sequence[str], ids: list[str],
                      probs: np.ndarray, targets: np.ndarray) -> pd.DataFrame:
    """preds.csv and aucs.csv of the test fold; prints the AUC table."""
    write_preds_csv(run_dir / "preds.csv", cfg, findings, ids, probs, targets)
    table = auc_table(per_label_auc(targets, probs, findings), with_published=cfg.dataset == "nih")
    save_text(table.to_csv(index=False), run_dir / "aucs.csv")
    print(f"test fold AUC ({len(ids)} images):")
    print(format_auc_table(table))
    defined = int(table["auc"].iloc[:-1].notna().sum())
    print(f"mean AUC on the test fold: {table['auc'].iloc[-1]:.4f} "
          f"(over {defined} of {len(findings)} findings)")
    if cfg.dataset == "nih" and cfg.split == "reference" and len(ids) == REFERENCE_TEST_IMAGES:
        print("The reproduce-chexnet column is on this same test fold (the reference split); "
              "the other published columns are on their own test splits (docs/datasets.md).")
    elif cfg.dataset == "nih":
        print("The published columns are on their own test splits (docs/datasets.md); this run's "
              "test fold is a different set of images.")
    return table


def run_tables(run_dir: str | Path, data: str | None = None
               ) -> tuple[TrainConfig, pd.DataFrame]:
    """The run's config and its whole label table as retrain.py built it: every fold, columns
    `image_id, patient, fold, path` and one per finding."""
    cfg = load_run_config(run_dir, data)
    return cfg, load_tables(cfg)[0].frame


def run_test_table(run_dir: str | Path, data: str | None = None
                   ) -> tuple[TrainConfig, pd.DataFrame]:
    """The run's config and its label table restricted to the test fold, indexed by image id
    (columns `patient, fold, path` and one per finding)."""
    cfg, table = run_tables(run_dir, data)
    return cfg, table[table["fold"] == "test"].set_index("image_id")
