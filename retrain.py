"""Train DenseNet-121 on NIH ChestX-ray14, CheXphoto or the built-in demo data.

    python retrain.py --dataset nih --data /data/nih --name nih_run
    python retrain.py --dataset chexphoto --data /data/CheXphoto-v1.1 --name photo --uncertainty ones
    python retrain.py --dataset demo --data data/demo/nih --name demo --image-size 64 --weights none
    python retrain.py --dataset nih --data /data/nih --name nih_run --resume     # after a disconnect

Defaults are the CheXNet / reproduce-chexnet recipe: ImageNet-initialised DenseNet-121, SGD
(momentum 0.9, weight decay 1e-4), lr 0.01, batch 16, 224x224, lr divided by 10 after every
epoch whose validation loss does not improve on the best, early stop after 3 epochs without
improvement, best checkpoint (lowest validation loss) used for the test predictions.

Outputs, in `--out/--name/`: config.json, log_train.csv, checkpoint.pt (best), last.pt
(resume point), preds.csv (test fold), aucs.csv; see the README for what each holds.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os
import random
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.utils.data import DataLoader, Sampler
from tqdm import tqdm

from cxr_dataset import (
    CXRDataset, DataError, build_transform, chexphoto_table, nih_table, DEFAULT_NIH_LABELS,
)
from eval_model import PROB_PREFIX, auc_table, format_table, per_label_auc
from labels import CHEXPERT_OBSERVATIONS, CHEXPHOTO_FINDINGS, findings_for
from model import WeightsUnavailable, build_model, masked_bce_with_logits

DATASETS = ("nih", "chexphoto", "demo")
# Settings that may differ when a run is resumed (they do not change what is computed).
RESUMABLE_CHANGES = {"epochs", "device", "workers", "resume", "force", "save_every",
                     "eval_batch_size"}


@dataclass
class TrainConfig:
    """Every setting of a run. Saved as config.json and inside every checkpoint."""
    dataset: str = "nih"
    data: str = "data/nih"
    labels: str | None = None           # NIH: labels file; default data/nih_labels.csv, then repo's
    name: str = "run"
    out: str = "results"
    epochs: int = 100                   # upper bound; early stopping usually ends sooner
    batch_size: int = 16
    eval_batch_size: int = 64
    image_size: int = 224
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 1e-4
    lr_decay: float = 10.0              # lr is divided by this when val loss does not improve
    patience: int = 3                   # stop after this many epochs without improvement
    weights: str = "imagenet"           # imagenet | none | PATH
    device: str = "auto"
    workers: int = -1                   # -1: auto (min(8, cores) on GPU, 1 on CPU)
    seed: int = 0
    save_every: int = 1000              # also write last.pt every N optimizer steps (0: per epoch)
    missing: str = "error"              # error | skip: images listed but absent on disk
    uncertainty: str = "zeros"          # CheXphoto: zeros | ones | ignore
    source: str = "all"                 # CheXphoto: all | natural | synthetic | digital | photographic
    view: str = "frontal"               # CheXphoto: frontal | lateral | all
    no_finding: bool = False            # CheXphoto: also predict "No Finding"
    resume: bool = False
    force: bool = False                 # resume even if the config changed
    findings: list[str] = field(default_factory=list)   # filled in from the dataset

    @property
    def run_dir(self) -> Path:
        return Path(self.out) / self.name


# --------------------------------------------------------------------------------------------
# Learning-rate schedule and early stopping
# --------------------------------------------------------------------------------------------
class PlateauSchedule:
    """reproduce-chexnet's schedule, without its bug of rebuilding the optimizer.

    After each epoch: if the validation loss is below the best so far, it becomes the best;
    if it is not, every param group's lr is divided by `decay` (in place, so SGD momentum
    buffers survive); once `patience` epochs have passed since the best, training stops.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, decay: float = 10.0, patience: int = 3):
        self.optimizer, self.decay, self.patience = optimizer, decay, patience
        self.best_loss, self.best_epoch, self.epoch = math.inf, 0, 0

    def step(self, val_loss: float) -> dict[str, bool]:
        """Record one epoch's validation loss. Returns {'improved', 'decayed', 'stop'}."""
        self.epoch += 1
        improved = val_loss < self.best_loss
        if improved:
            self.best_loss, self.best_epoch = val_loss, self.epoch
        else:
            for group in self.optimizer.param_groups:
                group["lr"] /= self.decay
        stop = self.epoch - self.best_epoch >= self.patience
        return {"improved": improved, "decayed": not improved, "stop": stop}

    def state_dict(self) -> dict:
        return {"best_loss": self.best_loss, "best_epoch": self.best_epoch, "epoch": self.epoch}

    def load_state_dict(self, state: dict) -> None:
        self.best_loss, self.best_epoch, self.epoch = (
            state["best_loss"], state["best_epoch"], state["epoch"])


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------
def load_tables(cfg: TrainConfig) -> tuple[pd.DataFrame, list[str], list[str]]:
    """The run's label table (with `fold` and `path`), its findings and skipped image ids."""
    if cfg.dataset == "chexphoto":
        findings = (["No Finding"] if cfg.no_finding else []) + list(CHEXPHOTO_FINDINGS)
        findings = [f for f in CHEXPERT_OBSERVATIONS if f in findings]
        table = chexphoto_table(cfg.data, cfg.uncertainty, findings, cfg.source, cfg.view,
                                cfg.seed)
        present = np.array([os.path.isfile(p) for p in table["path"]])
        skipped = table.loc[~present, "image_id"].tolist()
        if skipped and cfg.missing != "skip":
            raise DataError(f"{len(skipped)} of {len(table)} CheXphoto images listed in the CSVs "
                            f"are missing under {cfg.data} (first: {skipped[0]}). Pass --data "
                            "with the dataset folder, or --missing skip.")
        kept = table.loc[present].reset_index(drop=True)
        kept.attrs["sources"] = table.attrs["sources"]
        return kept, findings, skipped
    labels = cfg.labels
    if labels is None and cfg.dataset == "nih" and not (Path(cfg.data) / "nih_labels.csv").is_file():
        labels = str(DEFAULT_NIH_LABELS)
    table, skipped = nih_table(cfg.data, labels, cfg.missing, cfg.seed)
    return table, list(findings_for("nih")), skipped


class EpochSampler(Sampler[int]):
    """A shuffled order that depends only on (seed, epoch), and can start part-way through.

    With it, epoch e visits the same images in the same order whether the run was resumed or
    not, and a run resumed mid-epoch continues at exactly the next batch.
    """

    def __init__(self, n: int, seed: int):
        self.n, self.seed, self.epoch, self.start = n, seed, 1, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Epoch `epoch`'s order, skipping its first `start` samples."""
        self.epoch, self.start = epoch, start

    def order(self) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return torch.randperm(self.n, generator=g)

    def __iter__(self) -> Iterator[int]:
        return iter(self.order()[self.start:].tolist())

    def __len__(self) -> int:
        return self.n - self.start


def flip_batch(images: torch.Tensor, seed: int) -> torch.Tensor:
    """Random horizontal flip of each image of a (B, C, H, W) batch, p = 0.5, decided by `seed`.

    Flipping whole batches as tensors (instead of per image in the loader's workers) keeps the
    augmentation a pure function of (seed, epoch, batch), whatever the number of workers.
    """
    g = torch.Generator().manual_seed(seed)
    flip = (torch.rand(images.shape[0], generator=g) < 0.5).to(images.device)
    return torch.where(flip[:, None, None, None], images.flip(-1), images)


def make_loaders(cfg: TrainConfig, table: pd.DataFrame, findings: Sequence[str],
                 device: torch.device) -> dict[str, DataLoader]:
    """train / val / test loaders. The training loader has an `EpochSampler` (`.sampler`);
    its flips are applied per batch by `train_one_epoch`."""
    workers = cfg.workers if cfg.workers >= 0 else (
        min(8, os.cpu_count() or 1) if device.type == "cuda" else 1)
    loaders = {}
    for fold in ("train", "val", "test"):
        ds = CXRDataset.from_table(table, findings, fold, build_transform(cfg.image_size, False))
        if len(ds) == 0:
            raise DataError(f"the {fold} fold is empty ({len(table)} images in all). Check the "
                            "labels file's fold column, or use more images.")
        train = fold == "train"
        loaders[fold] = DataLoader(
            ds, batch_size=cfg.batch_size if train else cfg.eval_batch_size,
            sampler=EpochSampler(len(ds), cfg.seed) if train else None,
            num_workers=workers, pin_memory=device.type == "cuda")
    return loaders


# --------------------------------------------------------------------------------------------
# One epoch of training, one pass of evaluation
# --------------------------------------------------------------------------------------------
class NonFiniteLoss(RuntimeError):
    """The loss became NaN or infinite; the message names the batch's images."""


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


def train_one_epoch(model: nn.Module, loader: DataLoader, optimizer: torch.optim.Optimizer,
                    device: torch.device, progress: EpochProgress, seed: int = 0,
                    on_step: Callable[[EpochProgress], None] | None = None,
                    desc: str = "train") -> float:
    """Train over `loader` from batch `progress.batches` on, updating `progress` in place.

    Args:
        seed: the run's seed; batch b of epoch e is flipped with seed (seed, e, b).
        on_step: called after every optimizer step (checkpointing, stop requests).

    Returns:
        The epoch's mean loss per labelled entry.

    Raises:
        NonFiniteLoss: NaN/inf loss; nothing of that step is applied.
    """
    model.train()
    bar = tqdm(loader, desc=desc, unit="batch", leave=False, dynamic_ncols=True,
               initial=progress.batches, total=progress.batches + len(loader))
    for images, targets, ids in bar:
        images = images.to(device, non_blocking=True)
        targets = targets.to(device, non_blocking=True)
        images = flip_batch(images, (seed * 1_000_003 + progress.epoch) * 100_003
                            + progress.batches)
        loss = masked_bce_with_logits(model(images), targets)
        if not torch.isfinite(loss):
            raise NonFiniteLoss(
                f"loss is {float(loss.detach())} at epoch {progress.epoch}, batch {progress.batches + 1}; "
                f"images: {', '.join(ids)}. Check these images and labels, or lower --lr. "
                "The last good checkpoints are kept.")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        n = int((~torch.isnan(targets)).sum())
        progress.loss_sum += float(loss.detach()) * n
        progress.count += n
        progress.batches += 1
        bar.set_postfix(loss=f"{progress.mean_loss:.4f}")
        if on_step is not None:
            on_step(progress)
    bar.close()
    return progress.mean_loss


@torch.inference_mode()
def evaluate(model: nn.Module, loader: DataLoader, device: torch.device, desc: str = "eval"
             ) -> tuple[float, np.ndarray, np.ndarray, list[str]]:
    """Loss and probabilities over `loader`, in its (unshuffled) order.

    Returns:
        (mean loss, probabilities (N, K), targets (N, K) with NaN = masked, image ids (N,))
    """
    model.eval()
    total, count = 0.0, 0
    probs, targets_all, ids = [], [], []
    for images, targets, image_ids in tqdm(loader, desc=desc, unit="batch", leave=False,
                                           dynamic_ncols=True):
        images = images.to(device, non_blocking=True)
        targets = targets.to(device, non_blocking=True)
        logits = model(images)
        total += float(masked_bce_with_logits(logits, targets, reduction="sum"))
        count += int((~torch.isnan(targets)).sum())
        probs.append(torch.sigmoid(logits.float()).cpu().numpy())
        targets_all.append(targets.cpu().numpy())
        ids.extend(image_ids)
    return total / max(count, 1), np.concatenate(probs), np.concatenate(targets_all), ids


# --------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------
class SaveError(RuntimeError):
    """A result file could not be written (disk full, permissions); the old file is intact."""


def _atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Write to a temp file in the same folder, then rename over `path`: a crash or a full disk
    at any instant leaves the previous file as it was."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        kept = f"the previous {path.name} is intact" if path.exists() else "nothing was written"
        raise SaveError(f"could not write {path}: {err.strerror or err} ({kept}). Free some "
                        "space (a checkpoint needs ~60 MB) and run the same command with "
                        "--resume.") from err


def atomic_torch_save(obj: object, path: Path) -> None:
    _atomic_write(path, lambda tmp: torch.save(obj, tmp))


def atomic_write_text(text: str, path: Path) -> None:
    _atomic_write(path, lambda tmp: tmp.write_text(text))


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


def load_checkpoint(path: str | os.PathLike) -> dict:
    """Load a checkpoint written by this project (state dicts only: weights_only=True)."""
    return torch.load(path, map_location="cpu", weights_only=True)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# --------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------
def pick_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"--device {name}: no CUDA GPU is available here; use --device cpu.")
    return device


def config_diff(old: dict, new: dict) -> dict[str, tuple]:
    keys = (set(old) | set(new)) - RESUMABLE_CHANGES
    return {k: (old.get(k), new.get(k)) for k in sorted(keys) if old.get(k) != new.get(k)}


class Interrupted(Exception):
    """SIGINT/SIGTERM arrived; last.pt was saved first."""

    def __init__(self, signum: int, where: str):
        super().__init__(f"stopped by {signal.Signals(signum).name} {where}")
        self.signum = signum


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


def fingerprint(path: str | os.PathLike) -> str:
    """sha256 of a file's bytes (the labels file a run was trained on)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def data_record(cfg: TrainConfig, table: pd.DataFrame) -> dict:
    """What the run was trained on: label source hashes and a hash of the fold assignment."""
    sources = table.attrs.get("sources", [])
    folds = pd.util.hash_pandas_object(table[["image_id", "fold"]], index=False)
    return {"sources": {str(p): fingerprint(p) for p in sources},
            "images": int(len(table)),
            "folds_sha256": hashlib.sha256(folds.to_numpy().tobytes()).hexdigest()}


def environment_record() -> dict:
    """Package versions, hardware and the git commit, for the run folder."""
    import platform

    import sklearn
    import torchvision

    repo = Path(__file__).resolve().parent
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


# Testing hooks: send this process a signal (SIGKILL unless named, e.g. "5:SIGTERM") right after
# optimizer step N (counted over the run), or SIGKILL it in the middle of the Nth last.pt write.
# They let the tests prove that no kill point loses a run.
_kill_step, _, _kill_sig = os.environ.get("CHEXNET_TEST_KILL_AT_STEP", "0").partition(":")
_KILL_AT_STEP, _KILL_SIGNAL = int(_kill_step), getattr(signal, _kill_sig or "SIGKILL")
_KILL_IN_SAVE = int(os.environ.get("CHEXNET_TEST_KILL_IN_SAVE", "0"))
_saves = 0


def save_last(path: Path, state: dict) -> None:
    global _saves
    _saves += 1
    if _saves == _KILL_IN_SAVE:
        tmp = path.with_name(path.name + ".tmp")
        torch.save(state, tmp)
        with open(tmp, "r+b") as fh:  # a half-written file, as a kill mid-write leaves it
            fh.truncate(tmp.stat().st_size // 2)
        os.kill(os.getpid(), signal.SIGKILL)
    atomic_torch_save(state, path)


def fit(cfg: TrainConfig) -> Path:
    """Train, keep the best checkpoint, predict the test fold, write every output. Returns the
    run folder."""
    device = pick_device(cfg.device)
    table, findings, skipped = load_tables(cfg)
    cfg.findings = list(findings)
    run_dir = cfg.run_dir
    last_path, best_path = run_dir / "last.pt", run_dir / "checkpoint.pt"
    if cfg.resume and not last_path.is_file():
        raise DataError(f"{last_path}: nothing to resume (no last.pt). Drop --resume to start "
                        "a new run.")
    if not cfg.resume and last_path.is_file():
        raise DataError(f"{run_dir} already holds a run. Pass --resume to continue it, or "
                        "choose another --name.")
    run_dir.mkdir(parents=True, exist_ok=True)
    data = data_record(cfg, table)

    counts = table["fold"].value_counts()
    print(f"{cfg.dataset}: {len(table)} images (train {counts.get('train', 0)}, "
          f"val {counts.get('val', 0)}, test {counts.get('test', 0)}), {len(findings)} findings")
    if skipped:
        atomic_write_text("\n".join(skipped) + "\n", run_dir / "skipped.txt")
        print(f"skipped {len(skipped)} listed images not found on disk "
              f"(ids in {run_dir / 'skipped.txt'})")
    if device.type == "cpu":
        print("Training on CPU: fine for the demo and tests. A full NIH epoch at 224 px takes "
              "days on a CPU; use a CUDA GPU (--device cuda) for real runs.")

    seed_everything(cfg.seed)
    model = build_model(len(findings), cfg.weights).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                                weight_decay=cfg.weight_decay)
    schedule = PlateauSchedule(optimizer, cfg.lr_decay, cfg.patience)
    history: list[dict] = []
    start_epoch, partial = 1, None
    if cfg.resume:
        state = load_checkpoint(last_path)
        diff = config_diff(state["config"], dataclasses.asdict(cfg))
        if state.get("data") != data:
            diff["data"] = (state.get("data"), data)
        if diff and not cfg.force:
            raise DataError(f"{last_path} was written with other settings or data: {diff}. "
                            "Resume with the same settings and data, or pass --force.")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        history = state["history"]
        set_rng_state(state["rng"])
        start_epoch = state["epoch"] + 1
        if state.get("in_epoch"):
            partial = EpochProgress(**state["in_epoch"])
            print(f"resuming {run_dir} in epoch {partial.epoch} after batch {partial.batches}")
        else:
            print(f"resuming {run_dir} after epoch {state['epoch']}")
        print(f"  best val loss so far {schedule.best_loss:.4f} (epoch {schedule.best_epoch})")
        if state.get("stopped"):
            print("that run had already stopped early; going straight to the test predictions")
            start_epoch = cfg.epochs + 1
    atomic_write_text(json.dumps(dataclasses.asdict(cfg), indent=2) + "\n",
                      run_dir / "config.json")
    record = {"environment": environment_record(), "data": data, "seed": cfg.seed}
    atomic_write_text(json.dumps(record, indent=2) + "\n", run_dir / "run_record.json")

    loaders = make_loaders(cfg, table, findings, device)
    sampler: EpochSampler = loaders["train"].sampler

    def last_state(epoch_done: int, in_epoch: EpochProgress | None, stopped: bool) -> dict:
        return {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "schedule": schedule.state_dict(), "epoch": epoch_done, "history": history,
                "in_epoch": dataclasses.asdict(in_epoch) if in_epoch else None,
                "rng": rng_state(), "config": dataclasses.asdict(cfg), "data": data,
                "findings": list(findings), "stopped": stopped}

    steps = sum(len(loaders["train"]) for _ in history) + (partial.batches if partial else 0)

    with StopRequest() as stop:
        def on_step(progress: EpochProgress) -> None:
            nonlocal steps
            steps += 1
            if steps == _KILL_AT_STEP:
                os.kill(os.getpid(), _KILL_SIGNAL)
            if stop.signum is not None or (cfg.save_every and steps % cfg.save_every == 0):
                snapshot = dataclasses.replace(
                    progress, seconds=progress.seconds + time.perf_counter() - t0)
                save_last(last_path, last_state(progress.epoch - 1, snapshot, False))
                if stop.signum is not None:
                    raise Interrupted(stop.signum, f"in epoch {progress.epoch} after batch "
                                      f"{progress.batches}; saved {last_path}")

        stopped = False
        for epoch in range(start_epoch, cfg.epochs + 1):
            progress = partial if partial and partial.epoch == epoch else EpochProgress(epoch)
            partial = None
            sampler.set_epoch(epoch, start=progress.batches * cfg.batch_size)
            lr = optimizer.param_groups[0]["lr"]
            t0 = time.perf_counter()
            train_loss = train_one_epoch(model, loaders["train"], optimizer, device, progress,
                                         cfg.seed, on_step, f"epoch {epoch} train")
            val_loss, *_ = evaluate(model, loaders["val"], device, f"epoch {epoch} val")
            seconds = progress.seconds + time.perf_counter() - t0
            step = schedule.step(val_loss)
            history.append({"epoch": epoch, "train_loss": train_loss, "val_loss": val_loss,
                            "lr": lr, "seconds": round(seconds, 2)})
            n_train = len(loaders["train"].dataset)
            note = "best" if step["improved"] else (
                f"no improvement, lr -> {optimizer.param_groups[0]['lr']:.2e}")
            print(f"epoch {epoch}: train loss {train_loss:.4f}, val loss {val_loss:.4f}, "
                  f"lr {lr:.2e}, {seconds:.0f} s ({n_train / seconds:.1f} img/s) [{note}]",
                  flush=True)
            if step["improved"]:
                atomic_torch_save({"model": model.state_dict(), "epoch": epoch,
                                   "val_loss": val_loss, "config": dataclasses.asdict(cfg),
                                   "findings": list(findings)}, best_path)
            stopped = step["stop"]
            save_last(last_path, last_state(epoch, None, stopped))
            atomic_write_text(pd.DataFrame(history).to_csv(index=False),
                              run_dir / "log_train.csv")
            if stop.signum is not None:
                raise Interrupted(stop.signum, f"after epoch {epoch}; saved {last_path}")
            if stopped:
                print(f"no improvement in {cfg.patience} epochs: stopping "
                      f"(best epoch {schedule.best_epoch})")
                break

    best = load_checkpoint(best_path)
    model.load_state_dict(best["model"])
    _, probs, targets, ids = evaluate(model, loaders["test"], device, "test")
    write_predictions(run_dir, cfg, findings, ids, probs, targets)
    return run_dir


def write_predictions(run_dir: Path, cfg: TrainConfig, findings: Sequence[str], ids: list[str],
                      probs: np.ndarray, targets: np.ndarray) -> pd.DataFrame:
    """preds.csv (id, prob_<F>..., ground truth <F>...) and aucs.csv; prints the AUC table."""
    id_col = "Path" if cfg.dataset == "chexphoto" else "Image Index"
    preds = pd.DataFrame({id_col: ids})
    for k, f in enumerate(findings):
        preds[PROB_PREFIX + f] = probs[:, k]
    for k, f in enumerate(findings):
        preds[f] = targets[:, k]
    atomic_write_text(preds.to_csv(index=False), run_dir / "preds.csv")
    table = auc_table(per_label_auc(targets, probs, findings), with_published=cfg.dataset == "nih")
    atomic_write_text(table.to_csv(index=False), run_dir / "aucs.csv")
    print(f"test fold AUC ({len(ids)} images):")
    print(format_table(table))
    defined = int(table["auc"].iloc[:-1].notna().sum())
    print(f"mean AUC on the test fold: {table['auc'].iloc[-1]:.4f} "
          f"(over {defined} of {len(findings)} findings)")
    if cfg.dataset == "nih":
        print("The published columns are on their own test splits (datasets.md); this run's "
              "test fold is a different set of images.")
    return table


def parse_args(argv: Sequence[str] | None = None) -> TrainConfig:
    d = TrainConfig()
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", choices=DATASETS, default=d.dataset)
    p.add_argument("--data", default=d.data, help="dataset root folder")
    p.add_argument("--labels", help="NIH labels file (nih_labels.csv or Data_Entry_2017*.csv); "
                   "default: DATA/nih_labels.csv, else this repo's nih_labels.csv (demo: "
                   "DATA/Data_Entry_2017.csv)")
    p.add_argument("--name", default=d.name, help="run name: outputs go to OUT/NAME/")
    p.add_argument("--out", default=d.out)
    p.add_argument("--epochs", type=int, default=d.epochs)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--eval-batch-size", type=int, default=d.eval_batch_size)
    p.add_argument("--image-size", type=int, default=d.image_size)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--momentum", type=float, default=d.momentum)
    p.add_argument("--weight-decay", type=float, default=d.weight_decay)
    p.add_argument("--lr-decay", type=float, default=d.lr_decay,
                   help="divide the lr by this after an epoch without improvement")
    p.add_argument("--patience", type=int, default=d.patience,
                   help="stop after this many epochs without improvement")
    p.add_argument("--weights", default=d.weights, help="imagenet | none | PATH")
    p.add_argument("--device", default=d.device, help="auto | cpu | cuda | cuda:N")
    p.add_argument("--workers", type=int, default=d.workers, help="data loader processes "
                   "(-1: auto)")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--save-every", type=int, default=d.save_every, help="write last.pt every N "
                   "optimizer steps as well as after every epoch (0: only after epochs)")
    p.add_argument("--missing", choices=("error", "skip"), default=d.missing,
                   help="images listed in the labels but absent on disk: stop, or skip them "
                   "(ids written to the run folder)")
    p.add_argument("--uncertainty", choices=("zeros", "ones", "ignore"), default=d.uncertainty,
                   help="CheXphoto: uncertain (-1) labels become 0, 1, or are masked (ignore "
                   "also masks blanks)")
    p.add_argument("--source", default=d.source,
                   choices=("all", "natural", "synthetic", "digital", "photographic"))
    p.add_argument("--view", default=d.view, choices=("frontal", "lateral", "all"))
    p.add_argument("--no-finding", action="store_true", help="CheXphoto: also predict No Finding")
    p.add_argument("--resume", action="store_true", help="continue the run in OUT/NAME from last.pt")
    p.add_argument("--force", action="store_true", help="resume even if settings changed")
    args = p.parse_args(argv)
    return TrainConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)
                          if f.name != "findings"})


def main(argv: Sequence[str] | None = None) -> int:
    cfg = parse_args(argv)
    try:
        run_dir = fit(cfg)
    except (DataError, WeightsUnavailable, FileNotFoundError, SaveError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except NonFiniteLoss as err:
        print(f"error: {err}", file=sys.stderr)
        return 3
    except Interrupted as err:
        print(f"{err}. Run the same command with --resume to continue.", file=sys.stderr)
        return 128 + err.signum
    print(f"results in {run_dir}/ (config.json, run_record.json, log_train.csv, checkpoint.pt, "
          "last.pt, preds.csv, aucs.csv)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
