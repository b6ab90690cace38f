"""Predict the findings of chest X-rays (PNG, JPEG or DICOM) with a trained model.

    python predict.py scan1.png scan2.dcm --checkpoint results/nih_run/checkpoint.pt
    python predict.py scan.dcm --heatmap heatmaps/ --top 5
    python predict.py images/ more/scan.dcm --out preds.csv [--batch-size 32]

Inputs are files or folders; a folder is searched recursively for .png, .jpg, .jpeg, .dcm and
.dicom files (hidden files and folders skipped), in sorted order. A file named explicitly is
read whatever its suffix (DICOM is also recognised by content).

For each image, prints the findings sorted by probability. With --out FILE.csv, writes them
instead in reproduce-chexnet's `preds.csv` layout: `Image Index` (the file name) then
`prob_<Finding>` per finding, in the checkpoint's order, one row per readable image; a file
name found in two folders gets its path relative to their common folder instead (reported on
stderr), so that every row is unambiguous. With --heatmap DIR, also writes a class activation
map (CAM) of the most probable finding per image, `DIR/<image>_<finding>.png`.

Preprocessing is exactly the dataset's: the file becomes an 8-bit greyscale image, then
`data.build_transform(S)` with the checkpoint's image size S. DICOM files
are turned into 8-bit greyscale the way a viewer shows them (see `load_dicom`).

Unreadable files (missing, corrupt, not an image, multi-frame or colour DICOM) are reported on
stderr with their name; the other images are still predicted (and written), and the exit
status is 2. Checkpoints from reproduce-chexnet or arnoweng/CheXNet must first be converted with
convert_checkpoint.py.
"""
from __future__ import annotations

import argparse
import os
import re
import sys
from collections import Counter
from pathlib import Path
from typing import Iterator, NamedTuple, Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torchvision.transforms import v2 as T
from tqdm import tqdm

from chexnet.cli import command
from chexnet.data import DataError, ImageReadError, build_transform
from chexnet.scoring import PROB_PREFIX
from chexnet.labels import NIH_IMAGE_COL
from chexnet.xray_io import (  # noqa: F401 (is_dicom, load_dicom, window_to_uint8: part of this script's API)
    DICOM_SUFFIXES, is_dicom, load_any, load_dicom, minmax_to_uint8, window_to_uint8,
)
from chexnet.analysis.cam import class_activation_maps, load_trained_model
from chexnet.files import atomic_write, check_outputs, probe_writable
from chexnet.analysis.heatmaps import render
from chexnet.data import REPO_DIR

DEFAULT_CHECKPOINT = REPO_DIR / "pretrained" / "checkpoint.pt"
# What a folder given as input is searched for (case-insensitive).
FOLDER_SUFFIXES = (".png", ".jpg", ".jpeg") + DICOM_SUFFIXES
DEFAULT_BATCH_SIZE = 32


# --------------------------------------------------------------------------------------------
def images_in_folder(folder: Path) -> list[Path]:
    """The PNG, JPEG and DICOM files under `folder`, recursively, sorted by their path inside
    it, so that the CSV's row order does not depend on the file system's listing order.

    Hidden files and folders (`.name`, e.g. the `._scan.png` resource forks macOS leaves on
    shared drives, which are not images) are skipped; a file named explicitly is always read.
    """
    found = []
    for path in folder.rglob("*"):
        inner = path.relative_to(folder).parts
        if (path.suffix.lower() in FOLDER_SUFFIXES
                and not any(part.startswith(".") for part in inner) and path.is_file()):
            found.append((inner, path))
    return [path for _, path in sorted(found)]


def collect_inputs(names: Sequence[str]) -> tuple[list[Path], list[str]]:
    """The images to predict, in command-line order, each folder expanded by
    `images_in_folder`. A file reached twice (named, and inside a named folder) is predicted
    once, so that it does not get two rows.

    Returns:
        (image paths; the folders that gave no image, each already reported on stderr)
    """
    images, seen, empty = [], set(), []
    for name in names:
        path = Path(name)
        found = [path]
        if path.is_dir():
            try:
                found = images_in_folder(path)
            except OSError as err:
                found, why = [], f"cannot list it ({err.strerror or err})"
            else:
                why = ("no .png, .jpg, .jpeg, .dcm or .dicom file in it (searched "
                       "recursively); check the path")
            if not found:
                print(f"error: {path}: {why}.", file=sys.stderr)
                empty.append(name)
        for image in found:
            if image.resolve() not in seen:
                seen.add(image.resolve())
                images.append(image)
    return images, empty


def image_ids(paths: Sequence[Path]) -> tuple[list[str], list[str]]:
    """The `Image Index` of each image: its file name, as in NIH's metadata and
    reproduce-chexnet's preds.csv, so that the CSV joins with the labels on it.

    A name shared by files in different folders would make those rows ambiguous; they get
    their path relative to the folder they have in common instead (`a/x.png`, `b/x.png`),
    while every other row keeps its plain file name.

    Returns:
        (one id per path, all distinct; `path -> id` for each renamed row, to report)
    """
    counts = Counter(path.name for path in paths)
    shared = [Path(os.path.abspath(p)) for p in paths if counts[p.name] > 1]
    if not shared:
        return [path.name for path in paths], []
    root = Path(os.path.commonpath(shared))
    ids, renamed = [], []
    for path in paths:
        if counts[path.name] == 1:
            ids.append(path.name)
        else:
            ids.append(Path(os.path.abspath(path)).relative_to(root).as_posix())
            renamed.append(f"{path} -> {ids[-1]}")
    return ids, renamed


# --------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------
def load_model(checkpoint: str | Path) -> tuple[nn.Module, list[str], int]:
    """Model (eval mode, CPU), findings and image size S of a project checkpoint.

    Raises:
        CheckpointError: missing file, or not a checkpoint of this project (with what to do).
    """
    model, findings, size, _ = load_trained_model(checkpoint)
    return model, findings, size


def preprocess(gray: Image.Image, image_size: int) -> torch.Tensor:
    """The evaluation transform of the dataset. Returns a (1, 3, S, S) normalised batch."""
    return build_transform(image_size)(gray)[None]


def predict_probs(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Probabilities sigmoid(model(images)): (B, 3, S, S) -> (B, K) in [0, 1]."""
    with torch.inference_mode():
        return torch.sigmoid(model(images))


class Prediction(NamedTuple):
    """One readable image and the model's outputs for it."""
    path: Path
    gray: Image.Image           # the 8-bit image before the transform (heatmaps draw on it)
    images: torch.Tensor        # (1, 3, S, S): what the model saw
    probs: np.ndarray           # (K,) float32, in the checkpoint's finding order


def predict_batches(model: nn.Module, paths: Sequence[Path], image_size: int, batch_size: int,
                    failed: list[str], progress: bool = False) -> Iterator[Prediction]:
    """Predict `paths` `batch_size` images per forward pass; yields one Prediction per readable
    image, in input order.

    Batching only amortises the forward pass: in eval mode an image's outputs do not depend on
    its batch mates. An unreadable file is reported on stderr (by name) and appended to
    `failed`; it does not stop the others.

    Args:
        progress: show a tqdm bar (images done) on stderr.
    """
    batch: list[tuple[Path, Image.Image, torch.Tensor]] = []
    with tqdm(total=len(paths), desc="predict", unit="img", file=sys.stderr,
              disable=not progress, dynamic_ncols=True) as bar:
        for i, path in enumerate(paths):
            try:
                gray = load_any(path)
            except ImageReadError as err:
                tqdm.write(f"error: {err}", file=sys.stderr)   # above the bar, not through it
                failed.append(str(path))
            else:
                batch.append((path, gray, preprocess(gray, image_size)))
            if batch and (len(batch) == batch_size or i == len(paths) - 1):
                probs = predict_probs(model, torch.cat([x for _, _, x in batch])).numpy()
                yield from (Prediction(p, g, x, pr) for (p, g, x), pr in zip(batch, probs))
                batch = []
            if not batch:       # counts images once predicted, so that the rate is true
                bar.update(i + 1 - bar.n)


def write_heatmap(model: nn.Module, images: torch.Tensor, gray: Image.Image, image_size: int,
                  finding: int, title: str, out: Path) -> None:
    """CAM of output `finding` over the image as the model saw it, rendered to `out` (PNG).

    Args:
        images: (1, 3, S, S), from `preprocess(gray, image_size)`.
        gray: the 8-bit image before the transform.
    """
    with torch.inference_mode():
        cams, _ = class_activation_maps(model, images)                   # (1, K, h, w)
    cam = F.interpolate(cams[:, finding:finding + 1], size=(image_size, image_size),
                        mode="bilinear", align_corners=False)[0, 0].numpy()
    shown = np.asarray(T.CenterCrop(image_size)(T.Resize(image_size)(gray)))
    render(shown, cam, title, out)


def format_findings(findings: Sequence[str], probs: Sequence[float], top: int | None = None
                    ) -> str:
    """Findings sorted by probability, highest first, one per line (the first `top` only)."""
    ranked = sorted(zip(findings, probs), key=lambda t: -t[1])[:top]
    width = max(len(name) for name in findings)
    return "\n".join(f"  {name:<{width}}  {prob:.3f}" for name, prob in ranked)


def heatmap_path(folder: Path, image: Path, finding: str, used: set[Path]) -> Path:
    """`folder/<image stem>_<finding>.png`, numbered when two inputs share a stem."""
    base = re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{image.stem}_{finding}")
    out, n = folder / f"{base}.png", 1
    while out in used:
        n += 1
        out = folder / f"{base}_{n}.png"
    used.add(out)
    return out


def save_heatmap(model: nn.Module, pred: Prediction, findings: Sequence[str], image_size: int,
                 folder: Path, used: set[Path]) -> tuple[str, Path] | None:
    """CAM of the image's most probable finding, written into `folder` (see `heatmap_path`).

    Returns:
        (the finding, the file written), or None when it could not be written (reported).
    """
    k = int(np.argmax(pred.probs))
    out = heatmap_path(folder, pred.path, findings[k], used)
    try:
        write_heatmap(model, pred.images, pred.gray, image_size, k,
                      f"{findings[k]}: p = {pred.probs[k]:.3f}", out)
    except OSError as err:
        print(f"error: {out}: cannot write the heatmap ({err.strerror or err}).",
              file=sys.stderr)
        return None
    return findings[k], out


# --------------------------------------------------------------------------------------------
# The CSV
# --------------------------------------------------------------------------------------------
def check_out_path(path: Path) -> str | None:
    """Why the CSV cannot be written at `path`, or None. Checked before predicting, so that a
    typo in --out is reported at once, not after a whole folder has been predicted."""
    folder = path.parent
    if path.is_dir():
        return f"{path} is a folder; give the CSV's file name, e.g. --out {path / 'preds.csv'}."
    if not folder.is_dir():
        what = "is not a folder" if folder.exists() else "does not exist"
        return f"{path}: {folder} {what}. Create the folder first, or choose another --out."
    if not os.access(folder, os.W_OK | os.X_OK):
        return f"{path}: the folder {folder} is not writable. Choose another --out."
    try:  # a scratch file: what os.access misses (a read-only mount seen as root, a full disk)
        probe_writable(folder)
    except OSError as err:
        return (f"{path}: cannot write in the folder {folder} ({err.strerror or err}). Choose "
                "a writable place with --out.")
    return None


def write_image_preds(path: Path, ids: Sequence[str], findings: Sequence[str],
                    probs: np.ndarray) -> None:
    """`Image Index`, then `prob_<F>` per finding in the given order: reproduce-chexnet's
    preds.csv, as runs.write_preds_csv writes it minus the ground truth (there is none here),
    so that eval_model.py and the notebooks read it unchanged.

    Written to a temp file in the same folder and renamed over `path` (atomic on one file
    system): an interrupted run or a full disk never leaves a half-written CSV behind, and an
    older CSV at `path` stays intact until the new one is complete.

    Args:
        probs: (N, K), row n for ids[n].

    Raises:
        OSError: the file could not be written; no temp file is left behind.
    """
    columns = {NIH_IMAGE_COL: list(ids)}
    columns.update({PROB_PREFIX + f: probs[:, k] for k, f in enumerate(findings)})
    atomic_write(path, lambda tmp: pd.DataFrame(columns).to_csv(tmp, index=False))


def save_csv(out: Path, paths: Sequence[Path], probs: Sequence[np.ndarray],
             findings: Sequence[str]) -> bool:
    """Write the rows of the readable images (see `write_image_preds`); renamed ids and errors
    are reported on stderr. Returns whether the file was written."""
    if not paths:
        print(f"error: no image could be read, so {out} was not written.", file=sys.stderr)
        return False
    ids, renamed = image_ids(paths)
    if renamed:
        more = f"; ... ({len(renamed) - 10} more)" if len(renamed) > 10 else ""
        print(f"note: {len(renamed)} images share their file name with another input; their "
              f"{NIH_IMAGE_COL} is their path relative to the folder they have in common: "
              f"{'; '.join(renamed[:10])}{more}", file=sys.stderr)
    try:
        write_image_preds(out, ids, findings, np.stack(probs))
    except OSError as err:
        print(f"error: could not write {out}: {err.strerror or err}. Check that {out.parent} "
              "is writable and has space, or choose another --out.", file=sys.stderr)
        return False
    print(f"wrote {out}: {len(ids)} images x {len(findings)} findings")
    return True


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------
def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text}: expected a positive integer")
    return value


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("images", nargs="+", metavar="IMAGE",
                   help="PNG, JPEG or DICOM files, or folders (searched recursively)")
    p.add_argument("--checkpoint", help="checkpoint.pt written by retrain.py or "
                   "convert_checkpoint.py (default: pretrained/checkpoint.pt)")
    p.add_argument("--out", metavar="FILE.csv", help="write the probabilities to this CSV "
                   "(reproduce-chexnet's preds.csv layout) instead of printing them")
    p.add_argument("--batch-size", type=_positive_int, default=DEFAULT_BATCH_SIZE,
                   help=f"images per forward pass (default {DEFAULT_BATCH_SIZE}); lower it "
                        "if memory runs out")
    p.add_argument("--heatmap", metavar="DIR", help="write a CAM of the top finding per image")
    p.add_argument("--overwrite", action="store_true", help="allow --out to replace a run "
                   "folder's preds.csv (an earlier predict.py output beside other run files)")
    p.add_argument("--top", type=_positive_int, help="print only the K most probable findings")
    args = p.parse_args(argv)
    if args.top is not None and args.out is not None:
        p.error("--top shortens the printed table; the CSV of --out always has every finding. "
                "Drop one of them.")
    return args


def open_checkpoint(name: str | None) -> tuple[nn.Module, list[str], int]:
    """`load_model` of --checkpoint or the default.

    Raises:
        DataError: no checkpoint there, or one that cannot be read (names it).
    """
    if name is None and not DEFAULT_CHECKPOINT.is_file():
        raise DataError(f"no model at {DEFAULT_CHECKPOINT}. Train one (python retrain.py ...; "
                        "copy results/<name>/checkpoint.pt there) or pass --checkpoint PATH. "
                        "Checkpoints from reproduce-chexnet or arnoweng/CheXNet: convert them "
                        "first with convert_checkpoint.py.")
    return load_model(name or DEFAULT_CHECKPOINT)


def prepare_outputs(out: Path | None, heat_dir: Path | None) -> None:
    """Check --out and create --heatmap's folder before any image is read.

    Raises:
        DataError: naming the output that cannot be written.
    """
    problem = check_out_path(out) if out is not None else None
    if problem is None and heat_dir is not None:
        try:
            heat_dir.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            problem = (f"{heat_dir}: cannot create the heatmap folder ({err.strerror or err}). "
                       "Choose another --heatmap.")
    if problem is not None:
        raise DataError(problem)


@command
def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    paths, failed = collect_inputs(args.images)  # listed only: nothing is read yet
    check_outputs({"--out": args.out, "--heatmap": args.heatmap},
                  {"--checkpoint": args.checkpoint or DEFAULT_CHECKPOINT}
                  | {f"input {name}": name for name in args.images}
                  | {f"input image {p}": p for p in paths}, overwrite=args.overwrite,
                  folders=("--heatmap",))
    model, findings, size = open_checkpoint(args.checkpoint)
    out = Path(args.out) if args.out else None
    heat_dir = Path(args.heatmap) if args.heatmap else None
    prepare_outputs(out, heat_dir)

    n_inputs = len(paths) + len(failed)     # the empty folders count as failed inputs
    rows, row_probs, used = [], [], set()
    for pred in predict_batches(model, paths, size, args.batch_size, failed,
                                progress=out is not None):
        if out is None:
            print(f"{pred.path}\n{format_findings(findings, pred.probs.tolist(), args.top)}")
        else:
            rows.append(pred.path)
            row_probs.append(pred.probs)
        if heat_dir is not None:
            written = save_heatmap(model, pred, findings, size, heat_dir, used)
            if written is None:
                failed.append(str(pred.path))
            elif out is None:
                print(f"  heatmap ({written[0]}): {written[1]}")
    if out is not None and not save_csv(out, rows, row_probs, findings):
        return 2
    if failed:
        shown = ", ".join(failed[:20]) + (f", ... ({len(failed) - 20} more)"
                                          if len(failed) > 20 else "")
        print(f"{len(failed)} of {n_inputs} images failed: {shown}", file=sys.stderr)
        return 2
    return 0
