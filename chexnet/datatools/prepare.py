"""Prepare a dataset for fast training: the label file and a uint8 image cache.

    python prepare_data.py nih --data /data/nih                          # reference split
    python prepare_data.py nih --data /data/nih --split official         # NIH's own test list
    python prepare_data.py nih --data data/demo/nih --labels data/demo/nih/Data_Entry_2017.csv \
        --split random
    python prepare_data.py chexphoto --data /data/CheXphoto-v1.1

NIH writes ROOT/nih_labels.csv (what retrain.py reads by default; --labels-out FILE elsewhere):
  --split reference  reproduce-chexnet's folds (arnoweng/CheXNet's lists): the committed
                     nih_labels.csv, unchanged, or the labels of --labels FILE with those folds.
                     The default, except that a --labels file with a fold column keeps its own.
  --split random     a seeded patient-level 70/10/20 split of the labelled images.
  --split official   test = ROOT/test_list.txt; the images of ROOT/train_val_list.txt are split
                     by patient into train (87.5%) and val (12.5%).

Both write the cache ROOT/cache/<S>/ (images.u8, index.csv, done.npy, manifest.json,
skip.txt; see chexnet/cache.py), every core decoding in parallel. --image-size 224 (default) stores
exactly what the reference recipe (Resize 224 + CenterCrop 224, flips only) feeds the network,
the same --image-size as retrain.py's.

A read-only dataset folder (Kaggle's /kaggle/input, a shared drive): write the labels file and
the cache elsewhere, and give retrain.py the same places:
    python prepare_data.py nih --data /kaggle/input/nih --labels-out nih_labels.csv \
        --cache-dir cache
    python retrain.py --dataset nih --data /kaggle/input/nih --labels nih_labels.csv \
        --cache-dir cache

An interrupted run (Ctrl-C, a killed session) resumes where it stopped when rerun. A cache
built from another labels file is rebuilt, with a message. Missing or undecodable images stop
the run (exit 2) and are named; --skip-bad leaves them out and lists them in skip.txt.
"""
from __future__ import annotations

import argparse
import errno
import filecmp
import os
import shutil
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
from PIL import Image

from chexnet.cli import at_least, command, integer
from chexnet.files import atomic_write, check_outputs, sha256_file
from chexnet.cache import DEFAULT_SIZE, DONE, cache_dir
from chexnet.datatools.cache_build import BuildResult, build_cache, default_workers, peak_rss_mb
from chexnet.data import (
    DEFAULT_NIH_LABELS, DataError, chexphoto_table, find_chexphoto_root,
    index_images, nih_labels_table,
)
from chexnet.labels import NIH_IMAGE_COL

SPLIT_CHOICES = ("reference", "random", "official")

# --------------------------------------------------------------------------------------------
# NIH labels
# --------------------------------------------------------------------------------------------
def write_nih_labels(root: Path, labels: str | os.PathLike | None = None,
                     split: str | None = None, seed: int = 0,
                     out: str | os.PathLike | None = None) -> Path:
    """Write ROOT/nih_labels.csv (or `out`) for the chosen labels and split; returns its path.

    `split` None: the committed file as it is (the reference split), or with `labels` that
    file's own folds when it has a fold column, else the reference split. A different file
    already there is kept as nih_labels.csv.bak (`out`.bak).
    """
    if split is not None and split not in SPLIT_CHOICES:
        raise ValueError(f"split {split!r}: expected one of {SPLIT_CHOICES}")
    out = Path(out) if out is not None else root / "nih_labels.csv"
    source = Path(labels) if labels else DEFAULT_NIH_LABELS

    def write(tmp: Path) -> None:
        if split in (None, "reference") and labels is None:
            shutil.copyfile(source, tmp)
        else:  # either schema -> nih_labels.csv columns, folds by the split
            table = nih_labels_table(source, split, seed, root if split == "official" else None)
            table.frame.to_csv(tmp, index=False)
        if out.is_file() and not filecmp.cmp(out, tmp, shallow=False):
            shutil.copyfile(out, out.with_name(out.name + ".bak"))
            print(f"{out}: replaced (the previous file is kept as {out.name}.bak)")

    atomic_write(out, write)
    return out


def _layout(root: Path, paths: Sequence[str | Path], limit: int = 20) -> list[str]:
    """The folders (relative to root) the images were found in, for the manifest."""
    parents = sorted({str(Path(p).parent.relative_to(root)) for p in paths})
    return parents[:limit] + ([f"... {len(parents) - limit} more"] if len(parents) > limit else [])


# --------------------------------------------------------------------------------------------
# The two datasets
# --------------------------------------------------------------------------------------------
def prepare_nih(root: str | os.PathLike, size: int = DEFAULT_SIZE, labels: str | None = None,
                split: str | None = None, workers: int | None = None, skip_bad: bool = False,
                seed: int = 0, labels_out: str | os.PathLike | None = None,
                cache_base: str | os.PathLike | None = None, **build_kw) -> BuildResult:
    """Write ROOT/nih_labels.csv, then cache every image it lists (see the module docstring).

    `labels_out`: the labels file to write instead of ROOT/nih_labels.csv; `cache_base`: the
    folder of the cache instead of ROOT/cache (--labels-out and --cache-dir, for a read-only
    dataset folder). `build_kw` goes to `cache.build_cache` (chunk_size, max_chunks,
    on_chunk, progress).

    Raises:
        DataError: also when the labels file or the cache cannot be written (a read-only or
            full folder), naming it and the option that moves it.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: folder not found. Pass --data with the NIH dataset folder.")
    out = Path(labels_out) if labels_out is not None else root / "nih_labels.csv"
    previous = out.read_bytes() if out.is_file() else None
    backup = out.with_name(out.name + ".bak")  # write_nih_labels keeps a replaced file there
    previous_backup = backup.read_bytes() if backup.is_file() else None
    folder = cache_dir(root, size, cache_base)
    had_cache = folder.exists()
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        labels_file = write_nih_labels(root, labels, split, seed, out)
    except OSError as err:
        raise _labels_unwritable(root, out, err, labels_out is None and cache_base is None) \
            from err
    try:
        return _cache_nih(root, size, labels_file, split, workers, skip_bad, folder, **build_kw)
    except BaseException:  # restores the labels file, then re-raises
        # Failed or interrupted (Ctrl-C, a dead worker, a full disk): the labels file is the
        # previous one again, so the next retrain.py does not use folds this command did not
        # finish. The cache keeps what it decoded (the same command resumes it) unless it
        # was new and holds nothing.
        if not had_cache and not _has_cached_rows(folder):
            shutil.rmtree(folder, ignore_errors=True)
        for path, content in ((labels_file, previous), (backup, previous_backup)):
            if content is None:
                path.unlink(missing_ok=True)
            else:
                atomic_write(path, lambda tmp, content=content: tmp.write_bytes(content))
        raise


def _why(err: OSError) -> str:
    """What went wrong, in words: `Permission denied`, `No space left on device`."""
    return (err.strerror or os.strerror(err.errno)) if err.errno else str(err)


def _labels_unwritable(root: Path, out: Path, err: OSError, both_default: bool) -> DataError:
    """The labels file cannot be written: say where, and --labels-out (with --cache-dir too
    when the cache would go to the same unwritable dataset folder)."""
    if err.errno == errno.ENOSPC:
        return DataError(f"cannot write the labels file {out}: {_why(err)}. Free some space, "
                         "or pass --labels-out FILE on another disk.")
    if both_default and err.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        fix = (f"The dataset folder {root} is not writable (read-only, as Kaggle's input "
               "folder is?): pass --labels-out FILE and --cache-dir DIR to write the labels "
               "file and the image cache to a writable place, e.g. --labels-out "
               "nih_labels.csv --cache-dir cache, then train with retrain.py --labels FILE "
               "--cache-dir DIR.")
    else:
        fix = ("Choose a writable place with --labels-out FILE (then train with retrain.py "
               "--labels FILE).")
    return DataError(f"cannot write the labels file {out}: {_why(err)}. {fix}")


def _build(folder: Path, ids: Sequence[str], paths: Sequence[str], size: int, sha: str,
           **kwargs) -> BuildResult:
    """`build_cache` into `folder`; a folder that cannot be written (read-only, as Kaggle's
    input is, or full) becomes a DataError that names it and --cache-dir."""
    try:
        return build_cache(folder, ids, paths, size, sha, **kwargs)
    except OSError as err:
        where = f" ({err.filename})" if err.filename and Path(err.filename) != folder else ""
        if err.errno == errno.ENOSPC:
            need = len(ids) * size * size
            amount = (f"{need / 1e9:,.1f} GB" if need >= 1e9 else f"{need / 1e6:,.1f} MB"
                      if need >= 1e6 else f"{need / 1e3:,.0f} kB")
            fix = (f"The cache needs {amount}: free some space, or pass --cache-dir DIR on a "
                   "disk with room")
        else:
            fix = "Pass --cache-dir DIR to put it in a writable folder"
        raise DataError(
            f"cannot write the image cache in {folder}: {_why(err)}{where}. {fix} (the cache "
            "goes to DIR/<image size>/), and give retrain.py the same --cache-dir DIR.") from err


def _has_cached_rows(folder: Path) -> bool:
    done = folder / "done.npy"
    return done.is_file() and bool((np.load(done) == DONE).any())


def _cache_nih(root: Path, size: int, labels_file: Path, split: str | None,
               workers: int | None, skip_bad: bool, folder: Path, **build_kw) -> BuildResult:
    """Cache every image the labels file lists (prepare_nih, once the labels are written)."""
    ids = pd.read_csv(labels_file, usecols=[NIH_IMAGE_COL], dtype=str)[NIH_IMAGE_COL].tolist()
    found = index_images(root)
    present = [i for i in ids if i in found]
    absent = {i: "not found under the data folder" for i in ids if i not in found}
    paths = [str(found[i]) for i in present]
    print(f"{labels_file}: {len(ids)} images listed, {len(present)} found under {root}")
    meta = {"dataset": "nih", "source_root": str(root.resolve()),
            "labels_files": [labels_file.name], "split": split,
            "layout": _layout(root, paths), "source_image_size": _source_size(paths, size)}
    return _build(folder, present, paths, size, sha256_file(labels_file),
                  absent=absent, skip_bad=skip_bad, workers=workers, meta=meta, **build_kw)


NIH_ORIGINAL = (1024, 1024)


def _source_size(paths: Sequence[str], size: int, sample: int = 8) -> str | None:
    """The pixel size of the images (from the headers of a few, evenly spaced), with a note
    when they are not NIH's 1024x1024 originals: a pre-resized copy (e.g. the 224 px one) is
    cached as it is, which is fast, but not bit-exact with the reference's resize of the
    originals. Returns "WxH", "mixed", or None when none could be read (the build names it)."""
    picks = [paths[i] for i in np.unique(np.linspace(0, len(paths) - 1, sample).astype(int))
             ] if paths else []
    sizes = set()
    for path in picks:
        try:
            with Image.open(path) as img:
                sizes.add(img.size)
        except (OSError, ValueError):
            continue  # the build reports undecodable images by name
    if not sizes:
        return None
    if sizes == {NIH_ORIGINAL}:
        return "1024x1024"
    shown = "mixed" if len(sizes) > 1 else "{}x{}".format(*next(iter(sizes)))
    if sizes == {(size, size)}:
        print(f"the images are {shown} px, the cache's size: a pre-resized copy (NIH's "
              "originals are 1024x1024). They are cached as they are, without resizing: fast, "
              "but not bit-exact with reproduce-chexnet, which resizes the 1024 px originals "
              "(README, 'A pre-resized NIH copy').")
    else:
        print(f"the images are {shown} px, not NIH's 1024x1024 originals: they are resized "
              f"to {size} px as usual, but the result is not bit-exact with reproduce-chexnet's "
              "resize of the originals (README, 'A pre-resized NIH copy').")
    return shown


def prepare_chexphoto(root: str | os.PathLike, size: int = DEFAULT_SIZE,
                      workers: int | None = None, skip_bad: bool = False,
                      cache_base: str | os.PathLike | None = None, **build_kw) -> BuildResult:
    """Cache every row of CheXphoto's train.csv/valid.csv (all views, all renditions).

    Row ids are the CSV's `Path` column; the cache goes under the folder holding the CSVs, or
    under `cache_base` (--cache-dir).
    """
    root = find_chexphoto_root(root)
    table = chexphoto_table(root, source="all", view="all").frame
    label_files = [p for p in (root / "train.csv", root / "valid.csv") if p.is_file()]
    present = np.array([os.path.isfile(p) for p in table["path"]], dtype=bool)
    ids = table["image_id"].tolist()
    absent = {i: "file not found" for i, ok in zip(ids, present) if not ok}
    kept = table.loc[present]
    print(f"{root}: {len(table)} images listed in {', '.join(p.name for p in label_files)}, "
          f"{int(present.sum())} found")
    meta = {"dataset": "chexphoto", "source_root": str(root.resolve()),
            "labels_files": [p.name for p in label_files],
            "layout": sorted(set(kept["rendition"]))}
    return _build(cache_dir(root, size, cache_base), kept["image_id"].tolist(),
                  kept["path"].tolist(), size, sha256_file(label_files), absent=absent,
                  skip_bad=skip_bad, workers=workers, meta=meta, **build_kw)


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------
def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="dataset", required=True)
    for name in ("nih", "chexphoto"):
        s = sub.add_parser(name, help=f"prepare {name}")
        s.add_argument("--data", help="dataset folder (required; as retrain.py --data)")
        s.add_argument("--image-size", type=at_least(1), default=DEFAULT_SIZE,
                       help="cached image side in pixels: retrain.py's --image-size (224, the "
                       "default: the reference recipe)")
        s.add_argument("--cache-dir", metavar="DIR",
                       help="put the cache in DIR/<image size>/ instead of ROOT/cache/ (a "
                       "read-only dataset folder); give retrain.py the same --cache-dir")
        s.add_argument("--workers", type=at_least(1), default=default_workers(),
                       help="decoding processes (default: every core)")
        s.add_argument("--skip-bad", action="store_true",
                       help="leave out missing or undecodable images (listed in skip.txt) "
                       "instead of stopping")
        if name == "nih":
            s.add_argument("--labels", help="labels file instead of the committed "
                           "nih_labels.csv (nih_labels.csv or Data_Entry_2017*.csv style)")
            s.add_argument("--labels-out", metavar="FILE",
                           help="write the labels file here instead of ROOT/nih_labels.csv (a "
                           "read-only dataset folder); give it to retrain.py as --labels FILE")
            s.add_argument("--split", choices=SPLIT_CHOICES, default=None,
                           help="reference: reproduce-chexnet's folds (the committed "
                           "nih_labels.csv); random: seeded patient-level 70/10/20; official: "
                           "ROOT/test_list.txt and ROOT/train_val_list.txt. Default: the "
                           "--labels file's own folds when it has a fold column, else reference")
            s.add_argument("--seed", type=integer(0), default=0,
                           help="patient shuffle of --split random and of the official "
                           "train/val cut")
    args = p.parse_args(argv)
    if args.data is None:
        p.error("the following arguments are required: --data")
    return args


@command
def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    labels_out = getattr(args, "labels_out", None)
    check_outputs({"--labels-out": labels_out or (Path(args.data or ".") / "nih_labels.csv")
                   if args.dataset == "nih" else None, "--cache-dir": args.cache_dir},
                  {"--labels": getattr(args, "labels", None)}, folders=("--cache-dir",))
    if args.dataset == "nih":
        result = prepare_nih(args.data, args.image_size, args.labels, args.split,
                             args.workers, args.skip_bad, args.seed,
                             labels_out=args.labels_out, cache_base=args.cache_dir)
    else:
        result = prepare_chexphoto(args.data, args.image_size, args.workers, args.skip_bad,
                                   cache_base=args.cache_dir)
    rss = peak_rss_mb()
    size = args.image_size
    print(f"cache: {result.dir} ({result.count} images, {size}x{size} uint8; "
          f"{result.decoded} decoded now, {result.count - result.decoded} already done)")
    if result.skipped:
        print(f"skipped {len(result.skipped)} listed images (ids and reasons in "
              f"{result.dir / 'skip.txt'})")
    if result.decoded:
        memory = (f"; peak RSS {rss['self']:.0f} MiB (main), {rss['children']:.0f} MiB "
                  "(largest worker)" if rss else "")
        print(f"{result.wall_seconds:.1f} s with {result.workers} workers; "
              f"{1000 * result.worker_cpu_seconds / result.decoded:.1f} ms CPU per image{memory}")
    moved = ([f"--labels {args.labels_out}"] if getattr(args, "labels_out", None) else []) + \
        ([f"--cache-dir {args.cache_dir}"] if args.cache_dir else [])
    if moved:
        print(f"train from it with: python retrain.py --dataset {args.dataset} --data "
              f"{args.data} --image-size {size} " + " ".join(moved))
    return 0
