"""The uint8 image cache: every X-ray decoded and resized once, read back from a memory map.

Decoding a 1024x1024 NIH PNG costs about 10-13 ms of CPU; the reference pipeline about
15-19 ms (BENCHMARKS.md, benchmarks/data_pipeline.py). Reading a 224x224 image back from a
page-cached memory map costs about 0.01 ms, and flips and normalisation are a few vectorised
tensor operations per batch (about 0.3 ms per image on one CPU core; a GPU does them for free).

On disk, under `<root>/cache/<S>/` (or `<DIR>/<S>/` with --cache-dir DIR):
    images.u8      raw uint8, shape (N, S, S), row r is the grey image of index.csv's row r:
                   the reference Resize(S) (shorter side, antialiased bilinear) + CenterCrop(S)
                   of `data.load_xray(path)`, byte for byte what the reference feeds
                   ToTensor. Rows of undecodable images (skipped with --skip-bad) stay zero.
    index.csv      `row, image_id`
    done.npy       (N,) uint8 progress record: 0 to do, 1 done, 2 undecodable (skipped).
                   A worker sets its rows' flags only after their pixels are flushed, so a
                   killed build resumes exactly where it stopped.
    manifest.json  version, size, count, sha256 of the label file(s), source root, layout,
                   created/completed times, complete flag, skipped ids.
    skip.txt       `image_id<TAB>reason` for every listed image not in the usable rows.

This module reads it: `open_cache` validates a cache, `CachedImages` is a torch Dataset over
its rows (chexnet/loaders.py feeds it to torch's DataLoader, as it does the image files). It
is written by prepare_data.py through chexnet/datatools/cache_build.py (`build_cache`).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset

from chexnet.data import DataError, LabelTable, find_chexphoto_root, resolve_nih_labels
from chexnet.files import sha256_file

CACHE_VERSION = 2  # 2: EXIF orientation applied (version 1 caches may hold sideways photos)
DEFAULT_SIZE = 224          # the reference recipe's Resize 224 + CenterCrop 224
TODO, DONE, BAD = 0, 1, 2   # done.npy flags

IMAGES_FILE, INDEX_FILE, DONE_FILE = "images.u8", "index.csv", "done.npy"
MANIFEST_FILE, SKIP_FILE = "manifest.json", "skip.txt"

# --------------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------------
def cache_dir(root: str | os.PathLike, size: int, base: str | os.PathLike | None = None
              ) -> Path:
    """`<root>/cache/<size>`: where the cache of a dataset root at one image size lives; with
    `base` (prepare_data.py's and retrain.py's --cache-dir, for a read-only dataset folder),
    `<base>/<size>` instead."""
    return (Path(base) if base else Path(root) / "cache") / str(int(size))


def read_manifest(folder: Path) -> dict | None:
    try:
        return json.loads((folder / MANIFEST_FILE).read_text())
    except FileNotFoundError:
        return None
    except json.JSONDecodeError:
        return {}


# --------------------------------------------------------------------------------------------
# Opening
# --------------------------------------------------------------------------------------------
@dataclass
class Cache:
    """A complete, validated cache. `images()` maps images.u8 read-only as (N, S, S) uint8."""
    dir: Path
    manifest: dict
    ids: list[str]                  # row -> image id
    skipped: frozenset[str]         # listed ids with no usable row (absent or undecodable)

    @property
    def size(self) -> int:
        return int(self.manifest["size"])

    def __len__(self) -> int:
        return len(self.ids)

    def row_of(self) -> dict[str, int]:
        """image id -> row, for the usable rows only."""
        return {i: r for r, i in enumerate(self.ids) if i not in self.skipped}

    def images(self) -> np.memmap:
        return np.memmap(self.dir / IMAGES_FILE, dtype=np.uint8, mode="r",
                         shape=(len(self.ids), self.size, self.size))


def open_cache(data_dir: str | os.PathLike, size: int,
               labels_path: str | os.PathLike | Sequence[str | os.PathLike],
               base: str | os.PathLike | None = None, quiet: bool = False) -> Cache | None:
    """The cache of `data_dir` at `size` (in `cache_dir(data_dir, size, base)`), if present,
    complete and built from `labels_path`.

    Returns None when there is no cache; also None, with the reason printed (unless
    `quiet`), when one is present but incomplete or stale (other labels file, other size,
    damaged files).
    """
    folder = cache_dir(data_dir, size, base)
    manifest = read_manifest(folder) if folder.is_dir() else None
    if manifest is None:
        return None

    def stale(why: str) -> None:
        if quiet:
            return None
        print(f"{folder}: not using the image cache: {why}. Rerun prepare_data.py to "
              "(re)build it.")
        return None

    if manifest.get("version") != CACHE_VERSION:
        return stale(f"cache version {manifest.get('version')}, expected {CACHE_VERSION}")
    if manifest.get("size") != size:
        return stale(f"its manifest says size {manifest.get('size')}, not {size}")
    files = [labels_path] if isinstance(labels_path, (str, os.PathLike)) else list(labels_path)
    if manifest.get("labels_sha256") != sha256_file(files):
        return stale("built from another labels file (sha256 differs from that of "
                     f"{', '.join(map(str, files))})")
    try:
        index = pd.read_csv(folder / INDEX_FILE, dtype={"image_id": str}, keep_default_na=False)
        flags = np.load(folder / DONE_FILE, mmap_mode="r")
        nbytes = (folder / IMAGES_FILE).stat().st_size
    except (FileNotFoundError, ValueError, OSError) as err:
        return stale(f"files missing or unreadable ({err})")
    n = len(index)
    if len(flags) != n or nbytes != n * size * size or manifest.get("count") != n:
        return stale("its files do not match its index")
    todo = int((np.asarray(flags) == TODO).sum())
    if todo or not manifest.get("complete"):
        return stale(f"incomplete ({n - todo} of {n} images done)")
    ids = index["image_id"].tolist()
    skipped = set(manifest.get("skipped", []))
    skipped.update(ids[r] for r in np.flatnonzero(np.asarray(flags) == BAD))
    return Cache(folder, manifest, ids, frozenset(skipped))


# --------------------------------------------------------------------------------------------
# Reading: a Dataset over the cache's rows
# --------------------------------------------------------------------------------------------
class CachedImages(Dataset):
    """Cached images as a torch Dataset: item i is `(uint8 (1, S, S), targets (K,), image id)`,
    what `data.ImageFileDataset` gives for the same image from its file, byte for byte.

    torch's DataLoader asks for a whole batch at once through `__getitems__`, which reads it
    with one fancy-index of the memory map in sorted row order (sequential reads, no per-image
    Python work) and returns it already collated: `(uint8 (B, 1, S, S), float32 (B, K), ids)`,
    which `collate_batch` passes through. The memory map is opened on first use in each
    process, so the dataset pickles small (loader workers get the paths, not the pixels).

    Args:
        cache: an open Cache.
        rows: (N,) cache rows of the images to serve.
        targets: (N, K) float32, NaN = masked.
        image_ids: N image ids.
        findings: the K target names.
    """

    def __init__(self, cache: Cache, rows: np.ndarray, targets: np.ndarray,
                 image_ids: Sequence[str], findings: Sequence[str]):
        rows = np.asarray(rows, dtype=np.int64)
        targets = np.asarray(targets, dtype=np.float32)
        if targets.ndim != 2 or len(targets) != len(rows) or len(image_ids) != len(rows):
            raise ValueError("rows (N,), targets (N, K) and image_ids (N) must have the same "
                             "length")
        if len(rows) and (rows.min() < 0 or rows.max() >= len(cache)):
            raise ValueError(f"rows must be in 0..{len(cache) - 1}")
        self.cache, self.rows, self.targets = cache, rows, targets
        self.image_ids, self.findings = list(image_ids), tuple(findings)
        self._pixels: np.memmap | None = None

    def __len__(self) -> int:
        return len(self.rows)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_pixels": None}

    def pixels(self) -> np.memmap:
        if self._pixels is None:
            self._pixels = self.cache.images()
        return self._pixels

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, str]:
        image = torch.from_numpy(np.array(self.pixels()[self.rows[i]]))[None]
        return image, torch.from_numpy(self.targets[i]), self.image_ids[i]

    def __getitems__(self, positions: Sequence[int]
                     ) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
        positions = np.asarray(positions, dtype=np.int64)
        rows = self.rows[positions]
        order = np.argsort(rows, kind="stable")
        pixels = self.pixels()[rows[order]]                 # (B, S, S) uint8, one sorted read
        if not np.array_equal(order, np.arange(len(order))):
            pixels = pixels[np.argsort(order)]              # back to the sampler's order
        return (torch.from_numpy(pixels).unsqueeze(1), torch.from_numpy(self.targets[positions]),
                [self.image_ids[p] for p in positions])


def collate_batch(batch: tuple) -> tuple:
    """The DataLoader `collate_fn` for `CachedImages`: its `__getitems__` collates already."""
    return batch


def cache_root_and_labels(cfg, labels: LabelTable | None = None) -> tuple[Path, list[Path]]:
    """Where a run's cache lives, and the label file(s) its table was read from.

    The label files are `labels.sources` (set by `nih_table` / `chexphoto_table`); without a
    table, the same choice `loaders.load_tables` makes (`data.resolve_nih_labels`); CheXphoto
    train.csv and valid.csv. CheXphoto's cache is under `find_chexphoto_root(DATA)`.
    """
    data = Path(cfg.data)
    root = find_chexphoto_root(data) if cfg.dataset == "chexphoto" else data
    if labels is not None and labels.sources:
        return root, [Path(p) for p in labels.sources]
    if cfg.dataset == "chexphoto":
        return root, [p for p in (root / "train.csv", root / "valid.csv") if p.is_file()]
    return data, [resolve_nih_labels(data, cfg.labels, reference_split=cfg.dataset == "nih")]


def cache_datasets(cfg, labels: LabelTable) -> dict[str, CachedImages] | None:
    """train/val/test `CachedImages` of a run's table, or None when no valid cache exists.

    Args:
        cfg: a config.TrainConfig (uses data, dataset, labels, image_size, cache_dir, missing).
        labels: `loaders.load_tables(cfg)[0]`: image_id, fold and the finding columns.

    Raises:
        DataError: images of the table with no usable cache row (absent when the cache was
            built, or undecodable), unless cfg.missing == 'skip', which drops them.
    """
    root, label_files = cache_root_and_labels(cfg, labels)
    table, findings = labels.frame, labels.findings
    cache = open_cache(root, cfg.image_size, label_files, cfg.cache_dir)
    if cache is None:
        return None
    rows = table["image_id"].map(cache.row_of())
    absent = rows.isna().to_numpy()
    if absent.any():
        names = table.loc[absent, "image_id"].tolist()
        if cfg.missing != "skip":
            raise DataError(
                f"{len(names)} of {len(table)} images have no usable row in the cache "
                f"{cache.dir} (first: {', '.join(names[:5])}; see skip.txt there). Rebuild the "
                "cache with the images present, or pass --missing skip to train without them.")
        print(f"cache: leaving out {len(names)} images with no usable cached row "
              f"(first: {', '.join(names[:3])})")
    table = table.loc[~absent]
    rows = rows[~absent].astype(np.int64).to_numpy()
    targets = table[list(findings)].to_numpy(np.float32)
    ids = table["image_id"].to_numpy()
    datasets = {}
    for fold in ("train", "val", "test"):
        pos = np.flatnonzero((table["fold"] == fold).to_numpy())
        datasets[fold] = CachedImages(cache, rows[pos], targets[pos], ids[pos].tolist(), findings)
    print(f"reading images from the uint8 cache {cache.dir} ({len(cache)} images, "
          f"{cfg.image_size} px)")
    return datasets
