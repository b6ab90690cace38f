"""Training a DenseNet-121 the way reproduce-chexnet did: the recipe and the loop.

Reading order, top to bottom:
    RECIPES              what each --recipe sets (every setting: chexnet/config.py TrainConfig)
    PlateauSchedule      lr / 10 when the validation loss gets worse; early stopping
    make_optimizer       SGD (reproduce-chexnet) or Adam (the CheXNet paper)
    train_one_epoch      flips, normalisation, forward, masked BCE loss, backward, step
    evaluate             loss and probabilities over a fold
    fit                  start_run -> train_epochs (checkpoint.pt on improvement, last.pt every
                         epoch) -> final_predictions (val_preds.csv, preds.csv, aucs.csv)
The data loader is chexnet/loaders.py (`make_loaders`), the model and loss chexnet/model.py;
the run folder (lock, records, resume, atomic checkpoints, signals) is chexnet/runs.py. The
command line, its flags and the outputs it lists are in retrain.py.
"""
from __future__ import annotations

import dataclasses
import math
import signal
import time
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

from chexnet.cli import CommandError
from chexnet.config import TrainConfig
from chexnet.data import flip_batch, model_input
from chexnet.loaders import EpochSampler, load_tables, make_loaders
from chexnet.model import build_model, masked_bce_with_logits
from chexnet.runs import (
    EpochProgress, Interrupted, RunState, StopRequest, announce, check_run_folder,
    choose_batch_size, data_record, load_run_checkpoint, pick_device, resume_from,
    run_folder_lock, save_epoch, save_in_epoch, seed_everything, write_predictions,
    write_preds_csv, write_run_record,
)
from chexnet.runtime import (
    Dist, Precision, all_sum, any_process, autocast, gather_in_order, grad_scaler,
    init_distributed, maybe_compile, resolve_amp, same_buffers_as_rank_zero,
)

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


# --------------------------------------------------------------------------------------------
# Learning-rate schedule, early stopping, optimizer
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


def make_optimizer(params: Iterable[nn.Parameter], cfg: TrainConfig) -> torch.optim.Optimizer:
    """The recipe's optimizer: SGD (reproduce-chexnet) or Adam (the CheXNet paper)."""
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, betas=tuple(cfg.betas),
                                weight_decay=cfg.weight_decay)
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum,
                           weight_decay=cfg.weight_decay)


# --------------------------------------------------------------------------------------------
# One epoch of training, one pass of evaluation
# --------------------------------------------------------------------------------------------
class NonFiniteLoss(CommandError, RuntimeError):
    """The loss became NaN or infinite; the message names the batch's images (exit 3)."""

    exit_code = 3


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
# The run: set up, train epoch after epoch, predict with the best checkpoint
# --------------------------------------------------------------------------------------------
def fit(cfg: TrainConfig) -> Path:
    """Train, keep the best checkpoint, predict the test fold, write every output. Returns the
    run folder. Under torchrun, every process trains and only rank 0 prints and writes."""
    with run_folder_lock(cfg.run_dir):
        run = start_run(cfg)
        with StopRequest() as stop:
            train_epochs(run, stop)
        final_predictions(run)
    return cfg.run_dir


def start_run(cfg: TrainConfig) -> RunState:
    """Data, model, optimizer, schedule and loaders of a new or resumed run; the run folder's
    config.json and run_record.json are written (rank 0). The run trains with `cfg` resolved:
    the split actually used, the findings, an automatic batch size (a new, frozen config)."""
    ctx = init_distributed(cfg.device)
    device = pick_device(cfg.device, ctx)
    labels, skipped = load_tables(cfg, from_cache=True)
    findings = list(labels.findings)
    cfg = dataclasses.replace(cfg, split=labels.split, findings=findings)
    check_run_folder(cfg, ctx)
    data = data_record(cfg, labels)
    announce(cfg, ctx, device, labels, skipped)

    precision = Precision(resolve_amp(cfg.amp, device), cfg.channels_last)
    seed_everything(cfg.seed)
    net = build_model(len(findings), cfg.weights, cfg.memory_efficient).to(device)
    if cfg.channels_last:
        net = net.to(memory_format=torch.channels_last)
    state = load_run_checkpoint(cfg.run_dir / "last.pt") if cfg.resume else None
    if cfg.batch_size == -1:
        cfg = choose_batch_size(cfg, state, net, precision, device, ctx)
    # The recipe: optimizer, lr schedule with early stopping, loss scaling (fp16 only).
    optimizer = make_optimizer(net.parameters(), cfg)
    schedule = PlateauSchedule(optimizer, cfg.lr_decay, cfg.patience, cfg.keep_momentum)
    scaler = grad_scaler(device, precision.amp)
    run = RunState(cfg, ctx, device, findings, data, net, net, optimizer, schedule,
                   scaler, precision, loaders={})
    if state is not None:
        resume_from(run, state)
    write_run_record(run)
    if ctx.enabled:
        run.model = nn.parallel.DistributedDataParallel(
            net, device_ids=[device.index] if device.type == "cuda" else None)
    run.model = maybe_compile(run.model, cfg.compile, run.say)
    run.loaders = make_loaders(cfg, labels, device, ctx)
    return run


def train_epochs(run: RunState, stop: StopRequest) -> None:
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
            save_in_epoch(run, dataclasses.replace(
                progress, seconds=progress.seconds + time.perf_counter() - clock["t0"]))
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


def report_epoch(run: RunState, epoch: int, train_loss: float, val_loss: float, lr: float,
                 seconds: float, step: dict) -> None:
    n_train = len(run.loaders["train"].dataset)
    note = "best" if step["improved"] else (
        f"no improvement, lr -> {run.optimizer.param_groups[0]['lr']:.2e}")
    run.say(f"epoch {epoch}: train loss {train_loss:.4f}, val loss {val_loss:.4f}, "
            f"lr {lr:.2e}, {seconds:.0f} s ({n_train / seconds:.1f} img/s) [{note}]",
            flush=True)


def final_predictions(run: RunState) -> None:
    """The best checkpoint's predictions: val_preds.csv (thresholds are chosen there, never on
    test), then preds.csv and aucs.csv of the test fold."""
    barrier(run.ctx)  # rank 0 has written checkpoint.pt
    run.net.load_state_dict(load_run_checkpoint(run.best_path)["model"])
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
