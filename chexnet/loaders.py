"""The data loader: a run's label table, its datasets, and torch DataLoaders over them.

    load_tables(cfg)            the label table (image_id, patient, fold, path, findings), as a
                                data.LabelTable (with its findings, split and label files)
    make_loaders(cfg, labels)   train / val / test DataLoaders for this process

One data path. The images come from prepare_data.py's uint8 cache (`cache.CachedImages`) when
a valid one exists (--cache auto/on), else from the image files (`data.ImageFileDataset`); either
dataset feeds torch's own DataLoader with the same sampler and batch sizes, and the batches are
byte for byte the same: `(uint8 (B, 1, S, S), float32 (B, K) with NaN = masked, ids)`. Flips
and normalisation are applied per batch, on the device, by the training loop
(`data.flip_batch`, `data.model_input`), for both.
"""
from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset
from torch.utils.data.distributed import DistributedSampler

from chexnet.cache import IMAGES_FILE, cache_datasets, cache_root_and_labels, collate_batch, \
    open_cache
from chexnet.data import (
    DataError, ImageFileDataset, LabelTable, chexphoto_table, drops_last_batch, nih_table,
    reference_geometry,
)
from chexnet.labels import CHEXPERT_OBSERVATIONS, CHEXPHOTO_FINDINGS
from chexnet.runtime import Dist, shard


def load_tables(cfg, from_cache: bool = False) -> tuple[LabelTable, list[str]]:
    """The run's label table (frame with `fold` and `path`, findings, split, label files) and
    the ids of the listed images that are not on disk (skipped, with --missing skip).

    With `from_cache` (retrain.py, NIH and demo, --cache auto/on), the images of a valid
    cache need not be on disk: their `path` is the cache's images.u8, and the loaders read them
    from the cache (a Colab VM after a reset holds only the cache; chexnet/datatools/colab.py).
    """
    if cfg.dataset == "chexphoto":
        if cfg.split not in (None, "random"):
            raise DataError(f"--split {cfg.split}: CheXphoto has its own split (train.csv by "
                            "patient into train/val, valid.csv as test); --split is for NIH.")
        findings = (["No Finding"] if cfg.no_finding else []) + list(CHEXPHOTO_FINDINGS)
        findings = [f for f in CHEXPERT_OBSERVATIONS if f in findings]
        labels = chexphoto_table(cfg.data, cfg.uncertainty, findings, cfg.source, cfg.view,
                                 cfg.seed)
        table = labels.frame
        present = np.array([os.path.isfile(p) for p in table["path"]])
        skipped = table.loc[~present, "image_id"].tolist()
        if skipped and cfg.missing != "skip":
            raise DataError(f"{len(skipped)} of {len(table)} CheXphoto images listed in the CSVs "
                            f"are missing under {cfg.data} (first: {skipped[0]}). Pass --data "
                            "with the dataset folder, or --missing skip.")
        return labels.replace(frame=table.loc[present].reset_index(drop=True)), skipped
    cached = cached_images(cfg) if from_cache and cfg.cache != "off" else None
    labels, skipped = nih_table(cfg.data, cfg.labels, cfg.missing, cfg.seed, cfg.split,
                                cfg.dataset, cached)
    table = labels.frame
    if cached:
        where = next(iter(cached.values()))
        elsewhere = int((table["path"] == str(where)).sum())
        if elsewhere:
            print(f"{elsewhere:,} of the {len(table):,} images are not on disk under "
                  f"{cfg.data}: they are read from the cache {where.parent}, decoded when it "
                  "was built")
    return labels, skipped


def cached_images(cfg) -> dict[str, Path] | None:
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


def make_datasets(cfg, labels: LabelTable) -> tuple[dict[str, Dataset], bool]:
    """train / val / test datasets, and whether they read the uint8 cache.

    From the cache when there is a valid one (--cache auto/on), else from the image files."""
    datasets = cache_datasets(cfg, labels) if cfg.cache != "off" else None
    if datasets is None and cfg.cache == "on":
        where = cfg.cache_dir or cfg.data
        raise DataError(f"--cache on: no valid {cfg.image_size} px cache under {where}. "
                        f"Build it with: python prepare_data.py "
                        f"{'chexphoto' if cfg.dataset == 'chexphoto' else 'nih'} --data "
                        f"{cfg.data} --image-size {cfg.image_size}"
                        + (f" --cache-dir {cfg.cache_dir}" if cfg.cache_dir else ""))
    cached = datasets is not None
    if not cached:
        datasets = {fold: ImageFileDataset.from_table(labels.frame, labels.findings, fold,
                                                reference_geometry(cfg.image_size))
                    for fold in ("train", "val", "test")}
    for fold, ds in datasets.items():
        if len(ds) == 0:
            raise DataError(f"the {fold} fold is empty ({len(labels.frame)} images in all). "
                            "Check the "
                            "labels file's fold column, or use more images.")
    return datasets, cached


def make_loaders(cfg, labels: LabelTable, device: torch.device, ctx: Dist = Dist()
                 ) -> dict[str, DataLoader]:
    """train / val / test DataLoaders for this process, over the cache or the image files.

    The training loader has an `EpochSampler` (`.sampler`) and this process's share of the
    global batch; its flips are applied per batch by `train.train_one_epoch`. Evaluation
    loaders hold a contiguous shard each, so that gathered predictions cover every image
    exactly once.

    Workers (--workers, -1: auto): the image files are decoded by min(8, cores) processes on a
    GPU, 1 on a CPU. The cache needs no decoding: on a CPU its batches are read in the main
    process; on a GPU, one worker reads the next batches while the GPU trains on this one.
    """
    if cfg.batch_size % ctx.world:
        raise DataError(f"--batch-size {cfg.batch_size} is not divisible by the {ctx.world} "
                        "processes; it is the global batch, split evenly over them.")
    datasets, cached = make_datasets(cfg, labels)
    cuda = device.type == "cuda"
    if cfg.workers >= 0:
        workers = cfg.workers
    elif cached:
        workers = 1 if cuda else 0
    else:
        workers = min(8, (os.cpu_count() or 1) // ctx.world) if cuda else 1
    common = {"num_workers": workers, "pin_memory": cuda, "worker_init_fn": _ignore_stop_signals,
              "collate_fn": collate_batch if cached else None}
    batch = cfg.batch_size // ctx.world
    sampler = EpochSampler(len(datasets["train"]), cfg.seed, ctx.rank, ctx.world)
    loaders = {"train": DataLoader(
        datasets["train"], batch_size=batch, sampler=sampler,
        drop_last=drops_last_batch(len(sampler), batch, cfg.image_size), **common)}
    for fold in ("val", "test"):
        ds = datasets[fold]
        part = Subset(ds, shard(len(ds), ctx).tolist()) if ctx.enabled else ds
        loaders[fold] = DataLoader(part, batch_size=cfg.eval_batch_size, **common)
    return loaders
