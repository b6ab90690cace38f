"""Training a DenseNet-121 the way reproduce-chexnet did, and resuming it: what retrain.py runs.

Reading order: `TrainConfig` and `RECIPES` (every setting; defaults = reproduce-chexnet's
experiment), `PlateauSchedule` (lr decay and early stopping), `make_optimizer`, the loaders
(`load_tables`, `EpochSampler`, `make_loaders`; the cache's are chexnet/cache.py's),
`train_one_epoch` and `evaluate`, then `fit`: `start_run` (set-up and resume) ->
`train_epochs` (the epoch loop, checkpoint.pt on improvement, last.pt every epoch) ->
`final_predictions` (val_preds.csv, preds.csv and aucs.csv from the best checkpoint).
The command line, its flags and the outputs it lists are in retrain.py.
"""
from __future__ import annotations

import contextlib
import dataclasses
import errno
import io
import json
import math
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
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.utils.data import DataLoader, Subset
from torch.utils.data.distributed import DistributedSampler
from tqdm import tqdm

from chexnet.cli import CommandError
from chexnet.cache import IMAGES_FILE, cache_loaders, cache_root_and_labels, open_cache
from chexnet.files import RUN_MARKERS, atomic_write, is_run_folder, sha256_bytes, sha256_file
from chexnet.data import (
    CXRDataset, DataError, chexphoto_table, drops_last_batch, flip_batch,
    model_input, nih_table, reference_geometry,
)
from chexnet.scoring import PROB_PREFIX, auc_table, format_table, per_label_auc
from chexnet.labels import CHEXPERT_OBSERVATIONS, CHEXPHOTO_FINDINGS, findings_for
from chexnet.model import build_model, masked_bce_with_logits, read_checkpoint
from chexnet.runtime import (
    Dist, all_sum, any_process, autocast, gather_in_order, grad_scaler,
    init_distributed, maybe_compile, probe_batch_size, resolve_amp, same_buffers_as_rank_zero,
    scaled_lr, shard,
)

DATASETS = ("nih", "chexphoto", "demo")
OPTIMIZERS = ("sgd", "adam")
REFERENCE_TEST_IMAGES = 22_433  # reproduce-chexnet's test fold, the reference split's
# The settings each --recipe chooses; any of them can still be set by its own flag.
RECIPES: dict[str, dict] = {
    # reproduce-chexnet's train_model(): SGD rebuilt (momentum reset) at every lr decay.
    "reproduce-chexnet": {"optimizer": "sgd", "lr": 0.01, "momentum": 0.9, "weight_decay": 1e-4,
                          "betas": [0.9, 0.999], "batch_size": 16, "lr_decay": 10.0,
                          "patience": 3, "keep_momentum": False},
    # The CheXNet paper (Rajpurkar et al. 2017, section 3): Adam with standard parameters,
    # lr 0.001, batch 16, lr / 10 when the validation loss plateaus, lowest-val-loss model.
    # Not stated there, and taken as PyTorch's ReduceLROnPlateau does: no weight decay, Adam's
    # moment estimates kept across a decay; early stopping as reproduce-chexnet (3 epochs).
    "paper": {"optimizer": "adam", "lr": 0.001, "momentum": 0.9, "weight_decay": 0.0,
              "betas": [0.9, 0.999], "batch_size": 16, "lr_decay": 10.0, "patience": 3,
              "keep_momentum": True},
}
# Settings that may differ when a run is resumed (they do not change what is computed).
RESUMABLE_CHANGES = {"epochs", "device", "workers", "resume", "force", "save_every",
                     "eval_batch_size", "cache", "cache_dir"}


@dataclass
class TrainConfig:
    """Every setting of a run. Saved as config.json and inside every checkpoint."""
    dataset: str = "nih"
    data: str = "data/nih"
    labels: str | None = None           # NIH: labels file; default data/nih_labels.csv, then repo's
    name: str = "run"
    out: str = "results"
    recipe: str = "reproduce-chexnet"   # reproduce-chexnet | paper: the defaults below
    split: str | None = None            # reference | random | official | file (None: see --split)
    epochs: int = 100                   # upper bound; early stopping usually ends sooner
    batch_size: int = 16                # global batch (split over torchrun processes); -1: auto
    eval_batch_size: int = 64
    image_size: int = 224
    optimizer: str = "sgd"              # sgd | adam
    lr: float = 0.01
    momentum: float = 0.9               # SGD
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])   # Adam
    weight_decay: float = 1e-4
    lr_decay: float = 10.0              # lr is divided by this when val loss gets worse
    keep_momentum: bool = False         # False: optimizer state reset at each decay (reference)
    patience: int = 3                   # stop this many epochs after the best epoch
    weights: str = "imagenet"           # imagenet | none | PATH
    amp: str = "off"                    # auto | bf16 | fp16 | off (off = the faithful fp32 recipe)
    channels_last: bool = False
    compile: bool = False
    memory_efficient: bool = False      # torchvision's checkpointed DenseNet, for 6 GB cards
    device: str = "auto"
    workers: int = -1                   # -1: auto (min(8, cores) on GPU, 1 on CPU)
    seed: int = 0
    cache: str = "auto"                 # auto | on | off: read prepare_data.py's uint8 cache
    cache_dir: str | None = None        # where that cache is (None: DATA/cache, its default)
    save_every: int = 1000              # also write last.pt every N optimizer steps (0: per epoch)
    missing: str = "error"              # error | skip: images listed but absent on disk
    uncertainty: str = "zeros"          # CheXphoto: zeros | ones | ignore
    source: str = "all"                 # CheXphoto: all|natural|synthetic|digital|photographic
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
    """reproduce-chexnet's learning-rate schedule and early stopping, rule for rule.

    After each epoch's validation loss:
    - strictly below the best so far: it becomes the best (and the caller saves checkpoint.pt);
    - strictly above the best: every param group's lr is divided by `decay`, and unless
      `keep_state`, the optimizer's state (SGD's momentum buffers, Adam's moments) is cleared:
      reproduce-chexnet builds a new optimizer at each decay, which starts with no state;
    - equal to the best: neither (the reference tests `>` for the decay and `<` for the best);
    - `patience` epochs after the best epoch, training stops.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, decay: float = 10.0, patience: int = 3,
                 keep_state: bool = False):
        self.optimizer, self.decay, self.patience = optimizer, decay, patience
        self.keep_state = keep_state
        self.best_loss, self.best_epoch, self.epoch = math.inf, 0, 0

    def step(self, val_loss: float) -> dict[str, bool]:
        """Record one epoch's validation loss. Returns {'improved', 'decayed', 'stop'}."""
        self.epoch += 1
        improved, worse = val_loss < self.best_loss, val_loss > self.best_loss
        if improved:
            self.best_loss, self.best_epoch = val_loss, self.epoch
        if worse:
            for group in self.optimizer.param_groups:
                group["lr"] /= self.decay
            if not self.keep_state:
                self.optimizer.state.clear()  # as a freshly built optimizer has it
        stop = self.epoch - self.best_epoch >= self.patience
        return {"improved": improved, "decayed": worse, "stop": stop}

    def state_dict(self) -> dict:
        return {"best_loss": self.best_loss, "best_epoch": self.best_epoch, "epoch": self.epoch}

    def load_state_dict(self, state: dict) -> None:
        self.best_loss, self.best_epoch, self.epoch = (
            state["best_loss"], state["best_epoch"], state["epoch"])


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------
def make_optimizer(params: Iterable[nn.Parameter], cfg: TrainConfig) -> torch.optim.Optimizer:
    """The recipe's optimizer: SGD (reproduce-chexnet) or Adam (the CheXNet paper)."""
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, betas=tuple(cfg.betas),
                                weight_decay=cfg.weight_decay)
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum,
                           weight_decay=cfg.weight_decay)


def load_tables(cfg: TrainConfig, from_cache: bool = False
                ) -> tuple[pd.DataFrame, list[str], list[str]]:
    """The run's label table (with `fold` and `path`), its findings and skipped image ids.

    With `from_cache` (retrain.py, NIH and demo, --cache auto/on), the images of a valid
    cache need not be on disk: their `path` is the cache's images.u8, and the loaders read them
    from the cache (a Colab VM after a reset holds only the cache; chexnet/colab.py)."""
    if cfg.dataset == "chexphoto":
        if cfg.split not in (None, "random"):
            raise DataError(f"--split {cfg.split}: CheXphoto has its own split (train.csv by "
                            "patient into train/val, valid.csv as test); --split is for NIH.")
        cfg.split = "random"
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
    cached = cached_images(cfg) if from_cache and cfg.cache != "off" else None
    table, skipped = nih_table(cfg.data, cfg.labels, cfg.missing, cfg.seed, cfg.split,
                               cfg.dataset, cached)
    if cached:
        where = next(iter(cached.values()))
        elsewhere = int((table["path"] == str(where)).sum())
        if elsewhere:
            print(f"{elsewhere:,} of the {len(table):,} images are not on disk under "
                  f"{cfg.data}: they are read from the cache {where.parent}, decoded when it "
                  "was built")
    cfg.split = table.attrs["split"]  # recorded in config.json as the split actually used
    return table, list(findings_for("nih")), skipped


def cached_images(cfg: TrainConfig) -> dict[str, Path] | None:
    """Image id -> images.u8 for every usable row of the run's valid cache (None: none)."""
    root, label_files = cache_root_and_labels(cfg)
    cache = open_cache(root, cfg.image_size, label_files, cfg.cache_dir, quiet=True)
    if cache is None:
        return None
    where = cache.dir / IMAGES_FILE
    return {image_id: where for image_id in cache.row_of()}


class EpochSampler(DistributedSampler):
    """torch's DistributedSampler (seed + epoch -> one shuffled order, rank r takes every
    world-th item), plus a start offset: `set_epoch(e, start)` skips the first `start` items of
    epoch e's global order, so a run resumed mid-epoch continues at exactly the next batch, on
    any number of processes.
    """

    def __init__(self, n: int, seed: int, rank: int = 0, world: int = 1):
        super().__init__(range(n), num_replicas=world, rank=rank, shuffle=True, seed=seed)
        self.n, self.start = n, 0
        self.set_epoch(1)

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        super().set_epoch(epoch)
        self.start = start

    def order(self) -> torch.Tensor:
        """The epoch's global order, (n,)."""
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        return torch.randperm(self.n, generator=g)

    def __iter__(self) -> Iterator[int]:
        rest = self.order()[self.start:]
        pad = (-len(rest)) % self.num_replicas  # as DistributedSampler: repeat to fill ranks
        rest = torch.cat([rest, rest[:pad]])
        return iter(rest[self.rank::self.num_replicas].tolist())

    def __len__(self) -> int:
        return -(-(self.n - self.start) // self.num_replicas)


def _ignore_stop_signals(worker_id: int) -> None:
    """Loader workers leave SIGINT/SIGTERM to the main process, which saves last.pt before
    stopping; a Ctrl-C reaches the whole process group, and a worker dying of it first would
    end the run without that save."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def make_loaders(cfg: TrainConfig, table: pd.DataFrame, findings: Sequence[str],
                 device: torch.device, ctx: Dist = Dist()) -> dict[str, DataLoader]:
    """train / val / test loaders for this process.

    The training loader has an `EpochSampler` (`.sampler`) and this process's share of the
    global batch; its flips are applied per batch by `train_one_epoch`. Evaluation loaders hold
    a contiguous shard each, so that gathered predictions cover every image exactly once.
    """
    workers = cfg.workers if cfg.workers >= 0 else (
        min(8, (os.cpu_count() or 1) // ctx.world) if device.type == "cuda" else 1)
    if cfg.batch_size % ctx.world:
        raise DataError(f"--batch-size {cfg.batch_size} is not divisible by the {ctx.world} "
                        "processes; it is the global batch, split evenly over them.")
    loaders = {}
    for fold in ("train", "val", "test"):
        ds = CXRDataset.from_table(table, findings, fold,
                                   reference_geometry(cfg.image_size))
        if len(ds) == 0:
            raise DataError(f"the {fold} fold is empty ({len(table)} images in all). Check the "
                            "labels file's fold column, or use more images.")
        train = fold == "train"
        if train:
            sampler = EpochSampler(len(ds), cfg.seed, ctx.rank, ctx.world)
            loaders[fold] = DataLoader(
                ds, batch_size=cfg.batch_size // ctx.world, sampler=sampler,
                drop_last=drops_last_batch(len(sampler), cfg.batch_size // ctx.world,
                                           cfg.image_size),
                num_workers=workers, pin_memory=device.type == "cuda",
                worker_init_fn=_ignore_stop_signals)
        else:
            part = Subset(ds, shard(len(ds), ctx).tolist()) if ctx.enabled else ds
            loaders[fold] = DataLoader(part, batch_size=cfg.eval_batch_size,
                                       num_workers=workers, pin_memory=device.type == "cuda",
                                       worker_init_fn=_ignore_stop_signals)
    return loaders


# --------------------------------------------------------------------------------------------
# One epoch of training, one pass of evaluation
# --------------------------------------------------------------------------------------------
class NonFiniteLoss(CommandError, RuntimeError):
    """The loss became NaN or infinite; the message names the batch's images (exit 3)."""

    exit_code = 3


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
class Precision:
    """How tensors are laid out and computed: autocast dtype (None = fp32), channels_last."""
    amp: torch.dtype | None = None
    channels_last: bool = False

    def prepare(self, images: torch.Tensor) -> torch.Tensor:
        if self.channels_last:
            return images.contiguous(memory_format=torch.channels_last)
        return images


def train_one_epoch(model: nn.Module, loader: DataLoader, optimizer: torch.optim.Optimizer,
                    device: torch.device, progress: EpochProgress, seed: int = 0,
                    on_step: Callable[[EpochProgress], None] | None = None,
                    desc: str = "train", precision: Precision = Precision(),
                    scaler: torch.amp.GradScaler | None = None, ctx: Dist = Dist()) -> float:
    """Train over `loader` from batch `progress.batches` on, updating `progress` in place.

    Args:
        seed: the run's seed; batch b of epoch e is flipped with seed (seed, e, b).
        on_step: called after every optimizer step (checkpointing, stop requests).
        precision: autocast dtype and memory layout.
        scaler: GradScaler (enabled for fp16 only).
        ctx: torchrun process group; the logged loss is summed over all processes.

    Returns:
        The epoch's mean loss per labelled entry (over all processes).

    Raises:
        NonFiniteLoss: NaN/inf loss; nothing of that step is applied.
    """
    model.train()
    scaler = scaler or torch.amp.GradScaler(device.type, enabled=False)
    bar = tqdm(loader, desc=desc, unit="batch", leave=False, dynamic_ncols=True,
               initial=progress.batches, total=progress.batches + len(loader),
               disable=not ctx.main)
    for images, targets, ids in bar:
        images = images.to(device, non_blocking=True)   # uint8: flipped before normalising
        targets = targets.to(device, non_blocking=True)
        images = model_input(flip_batch(images, (seed * 1_000_003 + progress.epoch) * 100_003
                                        + progress.batches, ctx.rank, ctx.world), device)
        with autocast(device, precision.amp):
            logits = model(precision.prepare(images))
        loss = masked_bce_with_logits(logits, targets)  # in fp32 whatever the autocast
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        # One read-back per step, after the backward is queued: the GPU runs the forward and
        # backward while Python is still launching them (reading the loss right after the
        # forward would leave the GPU idle while the backward is launched). The update is
        # applied only after the check, so a non-finite step changes no weight.
        n = (~torch.isnan(targets)).sum().to(torch.float64)
        stats = torch.stack([loss.detach().double() * n, n,
                             (~torch.isfinite(loss.detach())).double()])
        loss_sum, count, bad = all_sum(stats, ctx, device)
        if bad:
            optimizer.zero_grad(set_to_none=True)
            raise NonFiniteLoss(
                f"loss is {float(loss.detach())} at epoch {progress.epoch}, batch "
                f"{progress.batches + 1}; images: {', '.join(ids)}. Check these images and "
                "labels, or lower --lr. The last good checkpoints are kept.")
        scaler.step(optimizer)
        scaler.update()
        progress.loss_sum += loss_sum
        progress.count += int(count)
        progress.batches += 1
        bar.set_postfix(loss=f"{progress.mean_loss:.4f}")
        if on_step is not None:
            on_step(progress)
    bar.close()
    return progress.mean_loss


@torch.inference_mode()
def evaluate(model: nn.Module, loader: DataLoader, device: torch.device, desc: str = "eval",
             precision: Precision = Precision(), ctx: Dist = Dist()
             ) -> tuple[float, np.ndarray, np.ndarray, list[str]]:
    """Loss and probabilities over `loader`, in its (unshuffled) order; under torchrun, over
    every process's shard, gathered in order, so each image counts exactly once.

    Returns:
        (mean loss per labelled entry, probabilities (N, K), targets (N, K) with NaN = masked,
         image ids (N,))

    Raises:
        NonFiniteLoss: the loss of some batch is NaN or infinite (named: its batch and images);
            a NaN would otherwise look like "no improvement" to the schedule, and never like
            a best epoch, so the run would decay and stop without a checkpoint.
    """
    model.eval()
    same_buffers_as_rank_zero(model, ctx)  # every shard scored by process 0's model
    # Sums and outputs stay on the device until the end: no host-device wait per batch.
    sums = torch.zeros(2, dtype=torch.float64, device=device)  # loss sum, labelled entries
    probs, targets_all, ids, finite = [], [], [], []
    for images, targets, image_ids in tqdm(loader, desc=desc, unit="batch", leave=False,
                                           dynamic_ncols=True, disable=not ctx.main):
        images = model_input(images, device)
        targets = targets.to(device, non_blocking=True)
        with autocast(device, precision.amp):
            logits = model(precision.prepare(images)).float()
        batch_loss = masked_bce_with_logits(logits, targets, reduction="sum").double()
        finite.append((torch.isfinite(batch_loss), len(image_ids)))
        sums[0] += batch_loss
        sums[1] += (~torch.isnan(targets)).sum()
        probs.append(torch.sigmoid(logits))
        targets_all.append(targets)
        ids.extend(image_ids)
    total, count = all_sum(sums, ctx, device)
    if not math.isfinite(total):
        raise NonFiniteLoss(_non_finite_message(desc, finite, ids))
    k = len(loader.dataset.dataset.findings) if isinstance(loader.dataset, Subset) else \
        len(loader.dataset.findings)
    local = (torch.cat(probs).cpu().numpy() if probs else np.zeros((0, k), np.float32),
             torch.cat(targets_all).float().cpu().numpy() if targets_all
             else np.zeros((0, k), np.float32), ids)
    parts = gather_in_order(local, ctx)
    return (total / max(count, 1), np.concatenate([p[0] for p in parts]),
            np.concatenate([p[1] for p in parts]), [i for p in parts for i in p[2]])


def _non_finite_message(desc: str, finite: list[tuple[torch.Tensor, int]], ids: list[str]) -> str:
    """Where a non-finite evaluation loss came from: the first such batch of this process.
    `finite` holds (is the batch's loss finite, images in the batch) per batch."""
    flags = torch.stack([f for f, _ in finite]).cpu().tolist() if finite else []
    where = "on another process's share of the images"
    if False in flags:
        b = flags.index(False)
        start = sum(n for _, n in finite[:b])
        where = f"in batch {b + 1}; images: {', '.join(ids[start:start + finite[b][1]])}"
    return (f"{desc}: the loss is not finite {where}. The model outputs NaN or infinity on "
            "them in evaluation mode: check these images and labels, or lower --lr (a model "
            "trained from scratch for a few steps can overflow here, its BatchNorm running "
            "statistics being far from its batches'). The last good checkpoints are kept.")


# --------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------
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


# --------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------
def pick_device(name: str, ctx: Dist = Dist()) -> torch.device:
    """`auto`: this process's CUDA GPU when there is one, else the CPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and ctx.enabled:
        name = f"cuda:{ctx.local_rank}"
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DataError(f"--device {name}: no CUDA GPU is available here; use --device cpu.")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise DataError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA "
                        f"GPU(s), numbered from 0; use --device cuda (the first) or cpu.")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise DataError(f"--device {name}: Apple's MPS is not available here; use --device cpu.")
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


def data_record(cfg: TrainConfig, table: pd.DataFrame) -> dict:
    """What the run was trained on: label source hashes and a hash of the fold assignment."""
    sources = table.attrs.get("sources", [])
    folds = pd.util.hash_pandas_object(table[["image_id", "fold"]], index=False)
    return {"sources": {str(p): sha256_file(p) for p in sources},
            "images": int(len(table)),
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
class Run:
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
    schedule: PlateauSchedule
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
                "rng": rng_state(), "config": dataclasses.asdict(self.cfg), "data": self.data,
                "findings": list(self.findings), "stopped": stopped}


def fit(cfg: TrainConfig) -> Path:
    """Train, keep the best checkpoint, predict the test fold, write every output. Returns the
    run folder. Under torchrun, every process trains and only rank 0 prints and writes."""
    with run_folder_lock(cfg.run_dir):
        run = start_run(cfg)
        with StopRequest() as stop:
            train_epochs(run, stop)
        final_predictions(run)
    return cfg.run_dir


LOCK_FILE = ".lock"


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
        raise DataError(f"cannot create the run folder {run_dir}: {err.strerror or err}. Check "
                        "that --out is writable, or choose another --out.") from err
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as err:
        fh.seek(0)
        owner = fh.read().strip() or "another process"
        fh.close()
        raise DataError(f"{run_dir} is in use by another retrain.py ({owner}). Wait for it to "
                        "finish (or stop it), or choose another --name.") from err
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


def start_run(cfg: TrainConfig) -> Run:
    """Data, model, optimizer, schedule and loaders of a new or resumed run; the run folder's
    config.json and run_record.json are written (rank 0)."""
    ctx = init_distributed(cfg.device)
    device = pick_device(cfg.device, ctx)
    table, findings, skipped = load_tables(cfg, from_cache=True)
    cfg.findings = list(findings)
    check_run_folder(cfg, ctx)
    data = data_record(cfg, table)
    announce(cfg, ctx, device, table, findings, skipped)

    precision = Precision(resolve_amp(cfg.amp, device), cfg.channels_last)
    seed_everything(cfg.seed)
    net = build_model(len(findings), cfg.weights, cfg.memory_efficient).to(device)
    if cfg.channels_last:
        net = net.to(memory_format=torch.channels_last)
    state = load_checkpoint(cfg.run_dir / "last.pt") if cfg.resume else None
    if cfg.batch_size == -1:
        choose_batch_size(cfg, state, net, precision, device, ctx)
    # The recipe: optimizer, lr schedule with early stopping, loss scaling (fp16 only).
    optimizer = make_optimizer(net.parameters(), cfg)
    schedule = PlateauSchedule(optimizer, cfg.lr_decay, cfg.patience, cfg.keep_momentum)
    scaler = grad_scaler(device, precision.amp)
    run = Run(cfg, ctx, device, list(findings), data, net, net, optimizer, schedule, scaler,
              precision, loaders={})
    if state is not None:
        restore(run, state)
    write_run_record(run)
    if ctx.enabled:
        run.model = nn.parallel.DistributedDataParallel(
            net, device_ids=[device.index] if device.type == "cuda" else None)
    run.model = maybe_compile(run.model, cfg.compile, run.say)
    run.loaders = build_loaders(cfg, table, findings, device, ctx)
    return run


def check_run_folder(cfg: TrainConfig, ctx: Dist) -> None:
    """A new run needs a folder without a run (any of its files: files.RUN_MARKERS);
    --resume needs its last.pt."""
    last_path = cfg.run_dir / "last.pt"
    if cfg.resume and not last_path.is_file():
        raise DataError(f"{last_path}: nothing to resume (no last.pt). Drop --resume to start "
                        "a new run.")
    if not cfg.resume and is_run_folder(cfg.run_dir):
        held = ", ".join(n for n in RUN_MARKERS if (cfg.run_dir / n).exists())
        resume = ("Pass --resume to continue it, or choose" if last_path.is_file() else
                  "It has no last.pt to resume from; choose")
        raise DataError(f"{cfg.run_dir} already holds a run ({held}). {resume} another --name "
                        "(a run folder is never trained over).")
    if ctx.main:
        cfg.run_dir.mkdir(parents=True, exist_ok=True)


def announce(cfg: TrainConfig, ctx: Dist, device: torch.device, table: pd.DataFrame,
             findings: Sequence[str], skipped: list[str]) -> None:
    """Print what will be trained on; write skipped.txt."""
    say = print if ctx.main else (lambda *a, **k: None)
    counts = table["fold"].value_counts()
    say(f"{cfg.dataset}: {len(table)} images (train {counts.get('train', 0)}, "
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
                      precision: Precision, device: torch.device, ctx: Dist) -> None:
    """--batch-size auto: the resumed run's batch and lr, or the largest batch that fits with
    the lr scaled linearly."""
    if state is not None:
        cfg.batch_size, cfg.lr = state["config"]["batch_size"], state["config"]["lr"]
        return
    batch = probe_batch_size(net, cfg.image_size, len(cfg.findings), device, precision.amp,
                             cfg.channels_last)
    batch -= batch % ctx.world
    cfg.batch_size, cfg.lr = batch, scaled_lr(cfg.lr, batch)
    if ctx.main:
        print(f"--batch-size auto: {batch} (the largest that fits, with a 20% margin); lr "
              f"scaled linearly to {cfg.lr:g}")


def restore(run: Run, state: dict) -> None:
    """Continue from last.pt: refuse changed settings or data (unless --force), then load the
    model, optimizer, schedule, scaler, history and RNG states."""
    cfg, say = run.cfg, run.say
    diff = config_diff(state["config"], dataclasses.asdict(cfg))
    if state.get("data") != run.data:
        diff["data"] = (state.get("data"), run.data)
    if diff and not cfg.force:
        raise DataError(f"{run.last_path} was written with other settings or data:\n  "
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


def write_run_record(run: Run) -> None:
    """config.json (every setting) and run_record.json (versions, data hashes), rank 0."""
    if not run.ctx.main:
        return
    cfg = run.cfg
    save_text(json.dumps(dataclasses.asdict(cfg), indent=2) + "\n",
                      cfg.run_dir / "config.json")
    record = {"environment": environment_record(), "data": run.data, "seed": cfg.seed,
              "processes": run.ctx.world}
    save_text(json.dumps(record, indent=2) + "\n", cfg.run_dir / "run_record.json")


def build_loaders(cfg: TrainConfig, table: pd.DataFrame, findings: Sequence[str],
                  device: torch.device, ctx: Dist) -> dict:
    """train / val / test loaders: from prepare_data.py's uint8 cache when there is a valid one
    (--cache auto/on), else from the image files; the batches are identical either way."""
    loaders = None
    if cfg.cache != "off":
        loaders = cache_loaders(
            cfg, table, findings, rank=ctx.rank, world=ctx.world,
            train_sampler=lambda n: EpochSampler(n, cfg.seed, ctx.rank, ctx.world),
            pin_memory=device.type == "cuda")
        if loaders is None and cfg.cache == "on":
            where = cfg.cache_dir or cfg.data
            raise DataError(f"--cache on: no valid {cfg.image_size} px cache under {where}. "
                            f"Build it with: python prepare_data.py "
                            f"{'chexphoto' if cfg.dataset == 'chexphoto' else 'nih'} --data "
                            f"{cfg.data} --image-size {cfg.image_size}"
                            + (f" --cache-dir {cfg.cache_dir}" if cfg.cache_dir else ""))
    return loaders if loaders is not None else make_loaders(cfg, table, findings, device, ctx)


def train_epochs(run: Run, stop: StopRequest) -> None:
    """The epoch loop: train, validate, step the schedule, save checkpoint.pt on improvement
    and last.pt every epoch (and every --save-every steps), stop early or on a signal."""
    cfg, ctx, say = run.cfg, run.ctx, run.say
    sampler: EpochSampler = run.loaders["train"].sampler
    steps = len(run.loaders["train"]) * len(run.history) + (
        run.partial.batches if run.partial else 0)
    clock = {"t0": time.perf_counter()}

    def on_step(progress: EpochProgress) -> None:
        """After every optimizer step: periodic last.pt, and a clean stop on SIGINT/SIGTERM."""
        nonlocal steps
        steps += 1
        halt = any_process(stop.signum is not None, ctx)  # torchrun forwards signals to all
        if halt or (cfg.save_every and steps % cfg.save_every == 0):
            if ctx.main:
                snapshot = dataclasses.replace(
                    progress, seconds=progress.seconds + time.perf_counter() - clock["t0"])
                atomic_torch_save(run.last_state(progress.epoch - 1, snapshot, False),
                                  run.last_path)
            if halt:
                raise Interrupted(stop.signum or signal.SIGTERM, f"in epoch {progress.epoch} "
                                  f"after batch {progress.batches}; saved {run.last_path}")

    for epoch in range(run.start_epoch, cfg.epochs + 1):
        progress = (run.partial if run.partial and run.partial.epoch == epoch
                    else EpochProgress(epoch))
        run.partial = None
        sampler.set_epoch(epoch, start=progress.batches * cfg.batch_size)
        lr = run.optimizer.param_groups[0]["lr"]
        clock["t0"] = time.perf_counter()
        train_loss = train_one_epoch(run.model, run.loaders["train"], run.optimizer, run.device,
                                     progress, cfg.seed, on_step, f"epoch {epoch} train",
                                     run.precision, run.scaler, ctx)
        val_loss, *_ = evaluate(run.model, run.loaders["val"], run.device, f"epoch {epoch} val",
                                run.precision, ctx)
        seconds = progress.seconds + time.perf_counter() - clock["t0"]
        step = run.schedule.step(val_loss)
        run.history.append({"epoch": epoch, "train_loss": train_loss, "val_loss": val_loss,
                            "lr": lr, "seconds": round(seconds, 2)})
        report_epoch(run, epoch, train_loss, val_loss, lr, seconds, step)
        save_epoch(run, epoch, val_loss, step)
        if any_process(stop.signum is not None, ctx):
            raise Interrupted(stop.signum or signal.SIGTERM,
                              f"after epoch {epoch}; saved {run.last_path}")
        if step["stop"]:
            say(f"no improvement in {cfg.patience} epochs: stopping "
                f"(best epoch {run.schedule.best_epoch})")
            break


def report_epoch(run: Run, epoch: int, train_loss: float, val_loss: float, lr: float,
                 seconds: float, step: dict) -> None:
    n_train = len(run.loaders["train"].dataset)
    note = "best" if step["improved"] else (
        f"no improvement, lr -> {run.optimizer.param_groups[0]['lr']:.2e}")
    run.say(f"epoch {epoch}: train loss {train_loss:.4f}, val loss {val_loss:.4f}, "
            f"lr {lr:.2e}, {seconds:.0f} s ({n_train / seconds:.1f} img/s) [{note}]",
            flush=True)


def save_epoch(run: Run, epoch: int, val_loss: float, step: dict) -> None:
    """checkpoint.pt when the validation loss improved; last.pt and log_train.csv always."""
    if not run.ctx.main:
        return
    cfg = run.cfg
    if step["improved"]:
        atomic_torch_save({"model": run.net.state_dict(), "epoch": epoch, "val_loss": val_loss,
                           "config": dataclasses.asdict(cfg), "findings": list(run.findings)},
                          run.best_path)
    atomic_torch_save(run.last_state(epoch, None, step["stop"]), run.last_path)
    save_text(pd.DataFrame(run.history).to_csv(index=False),
                      cfg.run_dir / "log_train.csv")


def final_predictions(run: Run) -> None:
    """The best checkpoint's predictions: val_preds.csv (thresholds are chosen there, never on
    test), then preds.csv and aucs.csv of the test fold."""
    barrier(run.ctx)  # rank 0 has written checkpoint.pt
    run.net.load_state_dict(load_checkpoint(run.best_path)["model"])
    _, probs, targets, ids = evaluate(run.model, run.loaders["val"], run.device, "val",
                                      run.precision, run.ctx)
    if run.ctx.main:
        write_preds_csv(run.cfg.run_dir / "val_preds.csv", run.cfg, run.findings, ids, probs,
                        targets)
    _, probs, targets, ids = evaluate(run.model, run.loaders["test"], run.device, "test",
                                      run.precision, run.ctx)
    if run.ctx.main:
        write_predictions(run.cfg.run_dir, run.cfg, run.findings, ids, probs, targets)


def barrier(ctx: Dist) -> None:
    if ctx.enabled:
        torch.distributed.barrier()


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
    print(format_table(table))
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


def load_run_config(run_dir: str | os.PathLike, data: str | None = None) -> TrainConfig:
    """The TrainConfig of a run folder, from its config.json (keys it does not know ignored).

    Args:
        run_dir: folder written by retrain.py.
        data: dataset folder to use instead of the recorded one (moved data, or a run trained
            from another working directory: the recorded path may be relative).

    Raises:
        DataError: no config.json, not JSON, or not a retrain.py config.
    """
    path = Path(run_dir) / "config.json"
    if not path.is_file():
        raise DataError(f"{path}: not found; expected a run folder written by retrain.py.")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise DataError(f"{path}: not valid JSON ({err}).") from err
    if not isinstance(config, dict) or "dataset" not in config:
        raise DataError(f"{path}: no 'dataset' entry; not a retrain.py config.")
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    cfg = TrainConfig(**{k: v for k, v in config.items() if k in names})
    if data is not None:
        cfg.data = data
    return cfg


def run_tables(run_dir: str | Path, data: str | None = None
               ) -> tuple[TrainConfig, pd.DataFrame]:
    """The run's config and its whole label table as retrain.py built it: every fold, columns
    `image_id, patient, fold, path` and one per finding."""
    cfg = load_run_config(run_dir, data)
    table, _, _ = load_tables(cfg)
    return cfg, table


def run_test_table(run_dir: str | Path, data: str | None = None
                   ) -> tuple[TrainConfig, pd.DataFrame]:
    """The run's config and its label table restricted to the test fold, indexed by image id
    (columns `patient, fold, path` and one per finding)."""
    cfg, table = run_tables(run_dir, data)
    return cfg, table[table["fold"] == "test"].set_index("image_id")
