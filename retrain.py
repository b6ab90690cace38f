"""Train DenseNet-121 on NIH ChestX-ray14, CheXphoto or the built-in demo data.

    python retrain.py --dataset nih --data /data/nih --name nih_run
    python retrain.py --dataset chexphoto --data /data/CheXphoto-v1.1 --name photo \
        --uncertainty ones
    python retrain.py --dataset demo --data data/demo/nih --name demo --image-size 64 --weights none
    python retrain.py --dataset nih --data /data/nih --name nih_run --resume  # after a disconnect

Defaults are reproduce-chexnet's experiment (`--recipe reproduce-chexnet`): its train/val/test
split, ImageNet-initialised DenseNet-121, SGD (momentum 0.9, weight decay 1e-4), lr 0.01,
batch 16, 224x224; after an epoch whose validation loss is strictly worse than the best, the lr
is divided by 10 and the momentum buffers are reset (the reference rebuilds its optimizer);
early stop 3 epochs after the best; the best checkpoint (lowest validation loss) makes the test
predictions. `--recipe paper` is the CheXNet paper's: Adam (lr 0.001, betas 0.9/0.999).
The README's recipe table lists every difference.

Outputs, in `--out/--name/`: config.json, log_train.csv, checkpoint.pt (best), last.pt
(resume point), preds.csv (test fold), val_preds.csv (validation fold), run_record.json,
aucs.csv; see the README for what each holds.
"""
from __future__ import annotations

import chexnet.idle_threads  # noqa: F401  (first, before torch loads: idle threads sleep)

import argparse
import dataclasses
import os
import sys
from typing import Sequence

from chexnet.cli import (
    DECAY_FACTOR, MOMENTUM, NON_NEGATIVE, POSITIVE, at_least, command, device_arg, integer,
)
from chexnet.data import SPLITS
from chexnet.runtime import AMP_CHOICES, shutdown_distributed
from chexnet.config import DATASETS, OPTIMIZERS, TrainConfig
from chexnet.train import RECIPES, fit

MIN_IMAGE_SIZE = 32  # DenseNet-121 downsamples by 32: a smaller input has no feature map left


def batch_size_arg(text: str) -> int:
    """argparse type for --batch-size: a positive integer, or 'auto' (stored as -1)."""
    if text == "auto":
        return -1
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("batch size must be positive, or 'auto'")
    return value


def parse_args(argv: Sequence[str] | None = None) -> TrainConfig:
    """The command line -> a TrainConfig: flags override the chosen --recipe's values."""
    d = TrainConfig()
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    _data_args(p, d)
    _recipe_args(p, d)
    _run_args(p, d)
    _selection_args(p, d)
    args = p.parse_args(argv)
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)
             if f.name != "findings"}
    optimizer = args.optimizer or RECIPES[args.recipe]["optimizer"]
    if optimizer == "adam" and args.momentum is not None:
        p.error("--momentum is SGD's; Adam's momentum terms are --betas B1 B2")
    if optimizer == "sgd" and args.betas is not None:
        p.error("--betas are Adam's; SGD's momentum is --momentum")
    for key, value in RECIPES[args.recipe].items():  # the recipe fills what was not given
        if given[key] is None:
            given[key] = value
    given["betas"] = list(given["betas"])
    return TrainConfig(**given)


def _data_args(p: argparse.ArgumentParser, d: TrainConfig) -> None:
    p.add_argument("--dataset", choices=DATASETS, default=d.dataset)
    p.add_argument("--data", default=d.data, help="dataset root folder")
    p.add_argument("--labels", help="NIH labels file (nih_labels.csv or Data_Entry_2017*.csv); "
                   "default: DATA/nih_labels.csv, else this repo's nih_labels.csv (demo: "
                   "DATA/Data_Entry_2017.csv)")
    p.add_argument("--name", default=d.name, help="run name: outputs go to OUT/NAME/")
    p.add_argument("--out", default=d.out)


def _recipe_args(p: argparse.ArgumentParser, d: TrainConfig) -> None:
    """The recipe and the values it sets (None here: filled from the recipe in parse_args)."""
    p.add_argument("--recipe", choices=tuple(RECIPES), default=d.recipe,
                   help="reproduce-chexnet (default): SGD, lr 0.01, momentum reset at each "
                   "decay; paper: the CheXNet paper's Adam, lr 0.001. The flags below override "
                   "single values of the recipe")
    p.add_argument("--split", choices=SPLITS, default=None,
                   help="NIH folds: reference = reproduce-chexnet's (arnoweng/CheXNet's lists, "
                   "as in this repo's nih_labels.csv), random = seeded patient-level 70/10/20, "
                   "official = NIH's train_val_list.txt/test_list.txt in --data, file = the "
                   "labels file's fold column. Default: the labels file's folds when it has "
                   "them, else reference (demo: random)")
    p.add_argument("--epochs", type=at_least(1), default=d.epochs)
    p.add_argument("--batch-size", type=batch_size_arg, default=None,
                   help="global batch (both recipes: 16), or 'auto': the largest that fits the "
                   "GPU, with the lr scaled linearly (lr x batch / 16)")
    p.add_argument("--eval-batch-size", type=at_least(1), default=d.eval_batch_size)
    p.add_argument("--image-size", type=at_least(MIN_IMAGE_SIZE), default=d.image_size,
                   help=f"input side in pixels (at least {MIN_IMAGE_SIZE}: DenseNet-121 "
                   "halves it five times)")
    p.add_argument("--optimizer", choices=OPTIMIZERS, default=None)
    p.add_argument("--lr", type=POSITIVE, default=None)
    p.add_argument("--momentum", type=MOMENTUM, default=None, help="SGD momentum")
    p.add_argument("--betas", type=MOMENTUM, nargs=2, default=None, metavar=("B1", "B2"),
                   help="Adam betas")
    p.add_argument("--weight-decay", type=NON_NEGATIVE, default=None)
    p.add_argument("--lr-decay", type=DECAY_FACTOR, default=None,
                   help="divide the lr by this after an epoch whose val loss is worse than the "
                   "best")
    p.add_argument("--keep-momentum", action=argparse.BooleanOptionalAction, default=None,
                   help="keep the optimizer's momentum (Adam: moments) across an lr decay "
                   "(default: reset, as reproduce-chexnet's rebuilt optimizer; paper recipe: "
                   "kept)")
    p.add_argument("--patience", type=at_least(1), default=None,
                   help="stop this many epochs after the best epoch")


def _run_args(p: argparse.ArgumentParser, d: TrainConfig) -> None:
    """Initial weights, speed (precision, layout, compile, memory), devices and saving."""
    p.add_argument("--weights", default=d.weights, help="imagenet | none | PATH")
    p.add_argument("--amp", choices=AMP_CHOICES, default=d.amp,
                   help="mixed precision: auto = bf16 where supported, fp16 + GradScaler on "
                   "older GPUs, off on CPU; off = the faithful fp32 recipe (default)")
    p.add_argument("--channels-last", action="store_true", help="NHWC memory layout (faster "
                   "convolutions on tensor-core GPUs)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model (falls back "
                   "with a message where unavailable)")
    p.add_argument("--memory-efficient", action="store_true", help="checkpointed DenseNet "
                   "layers: less GPU memory (6 GB cards), ~20%% slower")
    p.add_argument("--device", type=device_arg, default=d.device, help="auto | cpu | cuda | cuda:N")
    p.add_argument("--workers", type=integer(-1), default=d.workers, help="data loader processes "
                   "(-1: auto)")
    p.add_argument("--seed", type=integer(0), default=d.seed)
    p.add_argument("--cache", choices=("auto", "on", "off"), default=d.cache,
                   help="read images from prepare_data.py's uint8 cache: auto = when a valid "
                   "one exists for --image-size (the batches are identical either way)")
    p.add_argument("--cache-dir", metavar="DIR", default=d.cache_dir,
                   help="where prepare_data.py --cache-dir put the cache (it reads DIR/<image "
                   "size>/); default: DATA/cache. For a read-only dataset folder, e.g. Kaggle's")
    p.add_argument("--save-every", type=integer(0), default=d.save_every,
                   help="write last.pt every N "
                   "optimizer steps as well as after every epoch (0: only after epochs)")


def _selection_args(p: argparse.ArgumentParser, d: TrainConfig) -> None:
    """Which images and labels: missing files, CheXphoto's uncertainty, sources and views;
    resuming."""
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
    p.add_argument("--resume", action="store_true",
                   help="continue the run in OUT/NAME from last.pt")
    p.add_argument("--force", action="store_true", help="resume even if settings changed")


@command
def main(argv: Sequence[str] | None = None) -> int:
    """Errors reach the one boundary of every command (`chexnet.cli.run`): a bad input or a
    full disk exits 2, a non-finite loss 3, a stop signal 128 + its number (after last.pt)."""
    cfg = parse_args(argv)
    try:
        run_dir = fit(cfg)
    finally:
        shutdown_distributed()
    if int(os.environ.get("RANK", "0")):
        return 0
    print(f"results in {run_dir}/ (config.json, run_record.json, log_train.csv, checkpoint.pt, "
          "last.pt, preds.csv, val_preds.csv, aucs.csv)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
