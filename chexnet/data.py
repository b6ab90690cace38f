"""Chest X-ray datasets: NIH ChestX-ray14, CheXphoto, and the built-in demo (NIH format).

Every dataset returns `(image, target, image_id)`:
    image     float tensor (3, S, S), ImageNet-normalised (what the reference code feeds DenseNet)
    target    float32 tensor (K,): 1 positive, 0 negative, NaN = masked out of the loss
    image_id  str: the NIH `Image Index` or the CheXphoto `Path`

Label tables are parsed once, vectorised, into a DataFrame with the columns
`image_id, patient, fold, path` and one column per finding (float, NaN = masked). The
dataset classes only hold arrays; they never loop over pandas rows.
"""
from __future__ import annotations

import dataclasses

import gzip
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
import pandas as pd
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torch.utils.data import Dataset

from chexnet.cli import CommandError
from chexnet.labels import (
    CHEXPERT_META_COLS, CHEXPERT_OBSERVATIONS, CHEXPHOTO_FINDINGS, FOLD_FRACTIONS, FOLDS,
    IMAGENET_MEAN, IMAGENET_STD, NIH_FINDINGS, NIH_FINDINGS_COL,
    NIH_IMAGE_COL, NIH_METADATA_COLS, NIH_NO_FINDING, NIH_PATIENT_COL, UNCERTAINTY_POLICIES,
)

REPO_DIR = Path(__file__).resolve().parents[1]  # the repository (this file is in chexnet/)
DEFAULT_NIH_LABELS = REPO_DIR / "nih_labels.csv"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


class DataError(CommandError, ValueError):
    """A problem with the user's data files; the message names the file and what to do."""


class ImageReadError(DataError):
    """An image file that cannot be decoded."""


# --------------------------------------------------------------------------------------------
# Images
# --------------------------------------------------------------------------------------------
def load_xray(path: str | os.PathLike) -> Image.Image:
    """Open an X-ray as an 8-bit grayscale (mode L) PIL image, whatever its stored mode.

    NIH is mostly mode L but ships some RGBA files; JPEG photos are RGB; some exports are
    16-bit. Each is converted explicitly rather than trusting `convert('L')` to guess:
    16-bit and float images are rescaled from their own min-max range to 0-255, because a
    plain conversion would clip everything above 255 to white.

    An EXIF orientation tag is applied first: a phone stores a portrait photo as landscape
    pixels plus "rotate 90", and feeding the pixels as stored shows the network a sideways
    chest (CheXphoto is smartphone photos). Every image the project reads comes through here
    (datasets, the cache build, predict.py, heatmaps).

    Raises:
        ImageReadError: the file is missing, empty, truncated or not an image.
    """
    path = Path(path)
    try:
        with Image.open(path) as img:
            img.load()  # force the decode here, so a truncated file fails with its name
            return _to_gray8(ImageOps.exif_transpose(img))
    except FileNotFoundError as err:
        raise ImageReadError(f"{path}: image file not found. Check --data points at the "
                             "dataset root, or pass --missing skip to train without it.") from err
    except Image.DecompressionBombError as err:  # PIL refuses it before decoding
        raise ImageReadError(
            f"{path}: PIL refuses to decode this image ({err}): a chest X-ray has a few million "
            "pixels, this file claims far more. Check the file, or delete it and pass "
            "--missing skip.") from err
    except (UnidentifiedImageError, OSError, SyntaxError) as err:
        size = path.stat().st_size if path.exists() else 0
        raise ImageReadError(
            f"{path}: cannot decode image ({size} bytes: {err}). The file is corrupt or "
            "truncated: download it again, or delete it and pass --missing skip.") from err


def _to_gray8(img: Image.Image) -> Image.Image:
    if img.mode == "L":
        return img.copy()
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        lo, hi = float(arr.min()), float(arr.max())
        scaled = (arr - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(arr)
        return Image.fromarray(np.round(scaled).astype(np.uint8), mode="L")
    if img.mode in ("RGBA", "LA", "PA"):
        # NIH's RGBA files are opaque grey; drop alpha instead of blending onto a background.
        img = img.convert("RGB")
    return img.convert("L")


def reference_geometry(image_size: int) -> Callable[[Image.Image], torch.Tensor]:
    """The reference's geometry on a grey PIL image: Resize(S) of the shorter side (antialiased
    bilinear) + CenterCrop(S) -> uint8 tensor (1, S, S). The prepared cache stores exactly
    these bytes, so a batch is the same whether it was read from PNGs or from the cache."""
    # Imported here: torchvision takes about 1.2 s to import (it loads torch._dynamo), which
    # every command that only reads tables (eval_model.py, plot_training.py, ...) would pay.
    from torchvision.transforms import v2 as T

    return T.Compose([T.Resize(image_size, antialias=True), T.CenterCrop(image_size),
                      T.PILToTensor()])


def build_transform(image_size: int) -> Callable[[Image.Image], torch.Tensor]:
    """One image -> the network's input (3, S, S) float32: `reference_geometry` then
    `normalize_uint8`. Equal bit for bit to reproduce-chexnet's `Resize -> CenterCrop ->
    ToTensor -> Normalize` on the same image converted to RGB. Training batches take the same
    two steps, the normalisation on the device (`model_input`), with `flip_batch` between."""
    from torchvision.transforms import v2 as T

    return T.Compose([reference_geometry(image_size), normalize_uint8])


# Images normalised at a time on a CPU: a few keep the float temporaries in the CPU cache (one
# pass over a 38 MB output for a 64 x 224 px batch instead of several); a GPU takes the batch.
CPU_NORMALIZE_STEP = 4


def normalize_uint8(x: torch.Tensor) -> torch.Tensor:
    """uint8 grey levels (..., 1, H, W) -> float32 (..., 3, H, W), ImageNet-normalised, on
    x's device.

    The same float32 operations, in the same order, as the reference's `ToTensor()` (convert,
    then *divide* by 255) and `Normalize` (subtract the mean, then divide by the std). Dividing
    matters: `ToDtype(scale=True)` multiplies by 1/255, which rounds 126 of the 256 grey levels
    differently (up to 7.2e-7 after normalisation). The one grey channel is expanded to the
    three channels the reference gets from `convert('RGB')` (R = G = B). Elementwise, so a batch
    gives bit for bit what its images give one by one, on a CPU or a GPU.
    """
    mean = torch.as_tensor(IMAGENET_MEAN, dtype=torch.float32, device=x.device).view(3, 1, 1)
    std = torch.as_tensor(IMAGENET_STD, dtype=torch.float32, device=x.device).view(3, 1, 1)
    shape = (*x.shape[:-3], 3, *x.shape[-2:])
    if x.dim() != 4 or x.device.type != "cpu" or len(x) <= CPU_NORMALIZE_STEP:
        return x.to(torch.float32).div(255).expand(shape).sub(mean).div(std)
    # numpy asks the kernel for huge pages for a large array, so first touching a fresh output
    # costs about a third of what torch.empty's 4 KB pages cost.
    out = torch.from_numpy(np.empty(shape, np.float32))
    for i in range(0, len(x), CPU_NORMALIZE_STEP):
        xi = x[i:i + CPU_NORMALIZE_STEP].to(torch.float32).div_(255)
        torch.sub(xi.expand(-1, 3, -1, -1), mean, out=out[i:i + CPU_NORMALIZE_STEP]).div_(std)
    return out


def flip_batch(images: torch.Tensor, seed: int, rank: int = 0, world: int = 1) -> torch.Tensor:
    """Random horizontal flip of each image of a (B, C, H, W) batch, p = 0.5, decided by `seed`:
    the project's only flip (the training augmentation).

    Flipping whole batches as tensors (instead of per image in the loader's workers) keeps the
    augmentation a pure function of (seed, epoch, batch), whatever the number of workers. Under
    torchrun, rank r holds items r, r + world, ... of the global batch, so it takes those
    decisions: every process count flips the same images.
    """
    g = torch.Generator().manual_seed(seed)
    flip = torch.rand(images.shape[0] * world, generator=g)[rank::world] < 0.5
    flip = flip.to(images.device)
    return torch.where(flip[:, None, None, None], images.flip(-1), images)


def model_input(images: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """A loader's batch, uint8 (B, 1, S, S) from PNGs or from the cache, -> the network's input
    (B, 3, S, S) float32 on `device`: copied as uint8 (a quarter of the bytes), normalised there.

    Raises:
        TypeError: a batch that is not uint8 (already normalised, or from another pipeline):
            normalising it again would silently feed the network wrong numbers.
    """
    if images.dtype != torch.uint8:
        raise TypeError(f"expected a uint8 (B, 1, S, S) batch of grey levels, got {images.dtype} "
                        f"{tuple(images.shape)}: build loaders with loaders.make_loaders, "
                        "whose batches are uint8.")
    return normalize_uint8(images.to(device, non_blocking=True))


# The fewest values per channel that BatchNorm may normalise in a training batch. Its gradient
# is scaled by 1 / (the batch's standard deviation), and the spread of m values can come
# arbitrarily close to zero: for m independent values, P(sample variance < r * variance) grows
# like r ** ((m - 1) / 2). Over DenseNet-121's ~100k channels per step, m = 2 puts some channel
# near 1e-5 of its variance in practice; measured: a final batch of 2 images at 32 px (1x1 maps)
# gave a gradient norm of 4.9e6 against 4 on full batches, the weights blew up and the next
# evaluation was NaN (how close is a matter of rounding, so it differed between CPU kinds).
# With m >= 8 the smallest spread over 1e5 channels stays near a tenth of the typical one.
MIN_BATCHNORM_VALUES = 8


def final_map_side(image_size: int) -> int:
    """Side of DenseNet-121's last feature map for a square input: conv0 (7x7, stride 2,
    padding 3), pool0 (3x3, stride 2, padding 1), then three 2x2 average-pool transitions."""
    side = (image_size - 1) // 2 + 1
    side = (side - 1) // 2 + 1
    for _ in range(3):
        side //= 2
    return side


def drops_last_batch(n: int, batch: int, image_size: int) -> bool:
    """Whether an epoch of n training images in batches of `batch` ends on a batch too small
    for BatchNorm, which is then dropped.

    Too small: one image (one image's gradient step is noise, and at 1x1 maps BatchNorm cannot
    normalise it at all), or fewer than `MIN_BATCHNORM_VALUES` values per channel in the last
    dense block. The second happens only at a small --image-size: at 224 px the last maps are
    7x7, so a final batch of 2 images already gives 98 values, and a reproduce-chexnet run
    drops nothing it would not. The order is reshuffled every epoch, so no image is left out
    systematically.
    """
    tail = n % batch
    if batch <= 1 or tail == 0:
        return False
    cells = final_map_side(image_size) ** 2
    return tail == 1 or tail * cells < MIN_BATCHNORM_VALUES


# --------------------------------------------------------------------------------------------
# Splits
# --------------------------------------------------------------------------------------------
def patient_split(patients: Sequence, seed: int = 0,
                  fractions: dict[str, float] = FOLD_FRACTIONS) -> np.ndarray:
    """Assign every image to a fold so that no patient is in two folds.

    Patients are shuffled with `seed`, then taken in that order until each fold holds its
    fraction of the *images* (reproduce-chexnet's 70/10/20 is a fraction of images: 78,468 /
    11,219 / 22,433).

    Args:
        patients: patient id of each image, length N.
        seed: seed of the patient shuffle; the same ids and seed give the same folds.
        fractions: fold name -> fraction of images, in fold order; must sum to 1.

    Returns:
        (N,) array of fold names.
    """
    patients = pd.Series(np.asarray(patients)).astype(str)
    counts = patients.value_counts(sort=False).sort_index()  # sort: independent of row order
    order = np.random.default_rng(seed).permutation(len(counts))
    shuffled = counts.iloc[order]
    # A patient's fold is decided by where the middle of its images falls on the cumulative scale.
    mid = (shuffled.cumsum() - shuffled / 2) / shuffled.sum()
    edges = np.cumsum(list(fractions.values()))
    fold_idx = np.minimum(np.searchsorted(edges, mid.to_numpy(), side="right"), len(edges) - 1)
    fold_of_patient = pd.Series(np.array(list(fractions))[fold_idx], index=shuffled.index)
    return fold_of_patient.loc[patients].to_numpy()


# The ways to put NIH images into folds (--split). See `apply_split`.
SPLITS: tuple[str, ...] = ("reference", "random", "official", "file")
# --split official: NIH's train_val_list.txt is split by patient into train and val in
# reproduce-chexnet's 70:10 proportion.
OFFICIAL_VAL_FRACTIONS = {"train": 0.875, "val": 0.125}
# arnoweng/CheXNet's published lists (ChestX-ray14/labels/{train,val,test}_list.txt): the
# split reproduce-chexnet's test predictions were made on.
REFERENCE_LIST_NAMES = {"train": "train_list.txt", "val": "val_list.txt", "test": "test_list.txt"}
OFFICIAL_LIST_NAMES = {"train_val": "train_val_list.txt", "test": "test_list.txt"}


def read_image_list(path: str | os.PathLike) -> list[str]:
    """Image names from a split list: one image per line, the name first (arnoweng's lists
    follow it with 14 labels, which are ignored). `.gz` files are read too."""
    path = Path(path)
    try:
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rt") as fh:
            return [line.split()[0] for line in fh if line.strip()]
    except FileNotFoundError as err:
        raise DataError(f"{path}: split list not found.") from err
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"{path}: cannot read this split list ({err}).") from err


def find_list(folder: str | os.PathLike, name: str, what: str) -> Path:
    """`folder/name`, `folder/name.gz`, or one file in `folder` whose name ends that way
    (e.g. arnoweng_chexnet_test_list.txt.gz)."""
    folder = Path(folder)
    for cand in (folder / name, folder / f"{name}.gz"):
        if cand.is_file():
            return cand
    found = sorted(folder.glob(f"*{name}")) + sorted(folder.glob(f"*{name}.gz"))
    if len(found) == 1:
        return found[0]
    raise DataError(f"{folder}: no {name} ({what}). "
                    + ("Several files end that way: " + ", ".join(p.name for p in found)
                       if found else "Put the list there, or choose another --split."))


def reference_folds(lists: str | os.PathLike | None = None) -> pd.Series:
    """The reference split: image name -> 'train' | 'val' | 'test'.

    From arnoweng/CheXNet's three lists in `lists` when given; otherwise from the `fold` column
    of this repository's nih_labels.csv, which `make_nih_labels.py` made from those lists.
    """
    if lists is None:
        table = pd.read_csv(DEFAULT_NIH_LABELS, usecols=[NIH_IMAGE_COL, "fold"], dtype=str)
        return pd.Series(table["fold"].to_numpy(), index=table[NIH_IMAGE_COL].to_numpy())
    parts = []
    for fold, name in REFERENCE_LIST_NAMES.items():
        ids = read_image_list(find_list(lists, name, f"arnoweng/CheXNet's {fold} list"))
        parts.append(pd.Series(fold, index=ids))
    folds = pd.concat(parts)
    twice = folds.index[folds.index.duplicated()]
    if len(twice):
        raise DataError(f"{lists}: {len(twice)} image(s) are in two of the reference lists "
                        f"(first: {twice[0]}); the lists must be disjoint.")
    return folds


def official_folds(image_ids: Sequence[str], patients: Sequence, lists: str | os.PathLike,
                   seed: int = 0) -> np.ndarray:
    """NIH's official split: test = `lists/test_list.txt`; the images of
    `lists/train_val_list.txt` are split by patient into train (87.5%) and val (12.5%).

    Returns:
        (N,) fold names; '' for images in neither list.
    """
    test = set(read_image_list(find_list(lists, OFFICIAL_LIST_NAMES["test"], "NIH's test list")))
    train_val = set(read_image_list(find_list(lists, OFFICIAL_LIST_NAMES["train_val"],
                                              "NIH's train_val list")))
    both = sorted(test & train_val)
    if both:
        raise DataError(f"{len(both)} image(s) are in both train_val_list.txt and test_list.txt "
                        f"(first: {both[0]}); the official lists are disjoint.")
    ids = pd.Series(np.asarray(image_ids, dtype=str))
    in_test, in_tv = ids.isin(test).to_numpy(), ids.isin(train_val).to_numpy()
    folds = np.where(in_test, "test", "").astype(object)
    folds[in_tv] = patient_split(np.asarray(patients)[in_tv], seed, OFFICIAL_VAL_FRACTIONS)
    return folds


@dataclass(frozen=True)
class LabelTable:
    """A label table and what it is: the findings it holds, how its folds were made and the
    label files it was read from.

    frame: one row per image: `image_id`, `patient`, `fold` (train/val/test), one column per
        finding (float 0/1, NaN = masked), and `path` once joined with the image files.
    findings: the target columns, in model output order.
    split: how `fold` was made: `reference`, `random`, `official`, or `file` (the labels file's
        own fold column).
    sources: the label files read (retrain.py hashes them into run_record.json; they key the
        uint8 cache).
    """
    frame: pd.DataFrame
    findings: tuple[str, ...]
    split: str
    sources: tuple[str, ...] = ()

    def replace(self, **changes) -> "LabelTable":
        return dataclasses.replace(self, **changes)


def apply_split(labels: LabelTable, split: str, seed: int = 0,
                lists: str | os.PathLike | None = None, source: str = "the labels file"
                ) -> LabelTable:
    """The `read_nih_labels` table with its `fold` column set by the chosen split.

    - `reference`: reproduce-chexnet's folds (see `reference_folds`); every image must be in it.
    - `random`: a seeded patient-level 70/10/20 split of the table's rows (`patient_split`).
    - `official`: NIH's lists in `lists` (see `official_folds`); rows in neither are dropped.
    - `file`: the labels file's own `fold` column.

    Raises:
        DataError: an image the split does not know, a missing list or fold column, or a patient
            whose images would fall in two folds (the validation and test scores would leak).
    """
    table = labels.frame.copy()
    if split == "file":
        if labels.split != "file":
            raise DataError(f"{source}: no 'fold' column, so --split file has nothing to use. "
                            "Choose --split reference, random or official.")
    elif split == "random":
        table["fold"] = patient_split(table["patient"], seed)
    elif split == "reference":
        folds = reference_folds(lists)
        table["fold"] = table["image_id"].map(folds)
        unknown = table.loc[table["fold"].isna(), "image_id"].tolist()
        if unknown:
            raise DataError(
                f"{len(unknown)} of {len(table)} images of {source} are not in the reference "
                f"split (first: {unknown[0]!r}). It covers NIH ChestX-ray14's 112,120 images; "
                "for other images use --split random.")
    elif split == "official":
        if lists is None:
            raise DataError("--split official needs NIH's train_val_list.txt and test_list.txt "
                            "(they come with the NIH download) in the data folder.")
        table["fold"] = official_folds(table["image_id"], table["patient"], lists, seed)
        listed = table["fold"] != ""
        if not listed.all():
            print(f"official split: leaving out {int((~listed).sum())} labelled images that are "
                  f"in neither list (first: {table.loc[~listed, 'image_id'].iloc[0]})")
            table = table.loc[listed].reset_index(drop=True)
    else:
        raise ValueError(f"split {split!r}: expected one of {SPLITS}")
    straddling = table.groupby("patient")["fold"].nunique()
    straddling = straddling[straddling > 1]
    if len(straddling):
        patient = straddling.index[0]
        folds = sorted(table.loc[table["patient"] == patient, "fold"].unique())
        raise DataError(f"{source}: patient {patient} has images in folds {folds} "
                        f"({len(straddling)} patients straddle folds); a split must keep each "
                        "patient's images in one fold, or the scores leak.")
    return labels.replace(frame=table, split=split)


# --------------------------------------------------------------------------------------------
# NIH labels
# --------------------------------------------------------------------------------------------
def read_nih_labels(path: str | os.PathLike, seed: int = 0) -> LabelTable:
    """Read an NIH label file in either schema.

    - `Data_Entry_2017*.csv`: `Finding Labels` is parsed (`|`-separated, or `No Finding`);
      folds are a seeded patient-level 70/10/20 split of the rows in the file.
    - `nih_labels.csv`-style: `Image Index`, one 0/1 column per finding, and usually `fold`
      and `Patient ID` (without `Patient ID`, the patient is the `NNNNNNNN` image-name prefix).

    Returns:
        LabelTable: `image_id, patient, fold` and the 14 finding columns (float 0/1); its split
        is `file` when the file has a fold column, else `random`.

    Raises:
        DataError: missing columns, unknown finding names or values, unknown fold names.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: labels file not found. Pass --labels with the path to "
                        "nih_labels.csv or Data_Entry_2017_v2020.csv.")
    df = read_csv_or_explain(path)
    if NIH_IMAGE_COL not in df.columns:
        raise DataError(f"{path}: no '{NIH_IMAGE_COL}' column (columns: {list(df.columns)[:8]}). "
                        "Expected nih_labels.csv or Data_Entry_2017*.csv.")
    if NIH_FINDINGS_COL in df.columns:
        labels = _parse_finding_labels(df[NIH_FINDINGS_COL], path)
    else:
        missing = [f for f in NIH_FINDINGS if f not in df.columns]
        if missing:
            raise DataError(f"{path}: neither a '{NIH_FINDINGS_COL}' column nor the finding "
                            f"columns {missing}. Expected nih_labels.csv or Data_Entry_2017*.csv.")
        labels = df[list(NIH_FINDINGS)]
        bad = ~labels.isin([0, 1])
        if bad.to_numpy().any():
            row, col = np.argwhere(bad.to_numpy())[0]
            raise DataError(f"{path}: row {row + 2}, column '{NIH_FINDINGS[col]}' holds "
                            f"{plain_value(labels.iat[row, col])}; finding columns must be 0 or 1.")
    out = pd.DataFrame({"image_id": stripped_ids(df[NIH_IMAGE_COL], path)})
    if NIH_PATIENT_COL in df.columns:
        out["patient"] = df[NIH_PATIENT_COL].astype(str)
    else:
        out["patient"] = out["image_id"].str.split("_").str[0]
    if "fold" in df.columns:
        unknown = sorted(set(df["fold"].astype(str)) - set(FOLDS))
        if unknown:
            raise DataError(f"{path}: column 'fold' holds {unknown}; expected {list(FOLDS)}.")
        out["fold"] = df["fold"].astype(str)
    else:
        out["fold"] = patient_split(out["patient"], seed)
    for col in NIH_METADATA_COLS:  # kept as the file has them (nih_labels.csv writes them back)
        if col in df.columns:
            out[col] = df[col].to_numpy()
    dup = out["image_id"].duplicated()
    if dup.any():
        raise DataError(f"{path}: image {out['image_id'][dup].iloc[0]!r} is listed twice.")
    for f in NIH_FINDINGS:
        out[f] = labels[f].to_numpy(dtype=np.float32)
    return LabelTable(out, tuple(NIH_FINDINGS), "file" if "fold" in df.columns else "random",
                      (str(path),))


def nih_labels_table(labels: str | os.PathLike, split: str | None = "reference", seed: int = 0,
                     lists: str | os.PathLike | None = None) -> LabelTable:
    """A labels file (Data_Entry_2017*.csv or nih_labels.csv style) -> the nih_labels.csv table:
    `Image Index`, `Follow-up #`, `Patient ID`, `Patient Age`, `Patient Gender`, `View
    Position` (reproduce-chexnet's columns, those the file has), the 14 findings (0/1 ints),
    `fold`, in the file's row order.

    `split` and `lists` are as in `apply_split` (`lists`: arnoweng's lists for `reference`,
    optional; NIH's lists for `official`, required); None: the file's own folds when it has a
    fold column, else `reference`. The returned table's `split` names the split used.
    """
    labelled = read_nih_labels(labels, seed)
    if split is None:
        split = "file" if labelled.split == "file" else "reference"
    labelled = apply_split(labelled, split, seed, lists, str(labels))
    table = labelled.frame
    out = pd.DataFrame({NIH_IMAGE_COL: table["image_id"]})
    for col in (NIH_METADATA_COLS[0], NIH_PATIENT_COL, *NIH_METADATA_COLS[1:]):
        if col == NIH_PATIENT_COL:
            out[col] = table["patient"]
        elif col in table.columns:
            out[col] = table[col]
    for f in NIH_FINDINGS:
        out[f] = table[f].astype(int)
    out["fold"] = table["fold"]
    return labelled.replace(frame=out.reset_index(drop=True))


def plain_value(value: object) -> str:
    """A cell's value as a user should read it in a message: `2`, `0.5`, `'yes'`, never
    numpy 2's `np.int64(2)`."""
    return repr(value.item() if isinstance(value, np.generic) else value)


def read_csv_or_explain(path: Path, expected: str = "a labels CSV with a header row "
                        "(nih_labels.csv, Data_Entry_2017*.csv or the CheXpert schema)"
                        ) -> pd.DataFrame:
    """pd.read_csv, with an empty or unparsable file reported by name instead of a traceback;
    `expected` says what the file should have been."""
    try:
        return pd.read_csv(path)
    except pd.errors.EmptyDataError:
        raise DataError(f"{path}: the file is empty. Expected {expected}.") from None
    except (pd.errors.ParserError, UnicodeDecodeError) as err:
        raise DataError(f"{path}: not a readable CSV ({str(err)[:200]}).") from None


def stripped_ids(ids: pd.Series, path: Path) -> pd.Series:
    """Image ids without surrounding spaces, which no file name on disk has; says so when it
    strips any (an invisible trailing space otherwise makes every image 'missing')."""
    ids = ids.astype(str)
    clean = ids.str.strip()
    changed = clean != ids
    if changed.any():
        print(f"{path}: {int(changed.sum())} image ids had leading or trailing spaces, removed "
              f"(first: {ids[changed].iloc[0]!r} -> {clean[changed].iloc[0]!r})")
    return clean


def _parse_finding_labels(col: pd.Series, path: Path) -> pd.DataFrame:
    """`Finding Labels` strings -> (N, 14) 0/1 DataFrame, in one vectorised pass."""
    if col.isna().any():
        row = int(np.flatnonzero(col.isna().to_numpy())[0])
        raise DataError(f"{path}: row {row + 2} has an empty '{NIH_FINDINGS_COL}'; "
                        f"use '{NIH_NO_FINDING}' for normal images.")
    dummies = col.astype(str).str.get_dummies(sep="|")
    unknown = sorted(set(dummies.columns) - set(NIH_FINDINGS) - {NIH_NO_FINDING})
    if unknown:
        row = int(np.flatnonzero(dummies[unknown[0]].to_numpy())[0])
        raise DataError(f"{path}: row {row + 2}: unknown finding {unknown[0]!r} in "
                        f"'{NIH_FINDINGS_COL}'. Known findings: {', '.join(NIH_FINDINGS)}.")
    return dummies.reindex(columns=list(NIH_FINDINGS), fill_value=0)


def index_images(root: str | os.PathLike, suffixes: Iterable[str] = IMAGE_SUFFIXES
                 ) -> dict[str, Path]:
    """Map image file name -> path for every image under `root`, in any common NIH layout.

    Looked up in this order (the first file of a name wins): `root/images/`, Kaggle's
    `root/images_NNN/images/`, other `root/images_*` folders, `root/` itself, then any
    deeper folder (three levels at most). A pre-resized copy in its own folder is found too.
    """
    root = Path(root)
    suffixes = tuple(s.lower() for s in suffixes)
    found: dict[str, Path] = {}

    def add(folder: Path) -> None:
        try:
            entries = list(os.scandir(folder))
        except (FileNotFoundError, NotADirectoryError):
            return
        for entry in sorted(entries, key=lambda e: e.name):
            if entry.name.lower().endswith(suffixes) and entry.is_file():
                found.setdefault(entry.name, Path(entry.path))

    first = [root / "images", *sorted(root.glob("images_*/images")),
             *sorted(p for p in root.glob("images*") if p.is_dir()), root]
    for folder in first:
        add(folder)
    if not found:
        for dirpath, dirnames, _ in os.walk(root):
            depth = len(Path(dirpath).relative_to(root).parts)
            if depth >= 3:
                dirnames.clear()
            add(Path(dirpath))
    return found


def attach_paths(table: pd.DataFrame, paths: dict[str, Path], source: str,
                 missing: str = "error") -> tuple[pd.DataFrame, list[str]]:
    """Add a `path` column; rows whose image is not on disk raise, or are dropped on request.

    Returns:
        (table with paths, list of image ids that were skipped).
    """
    table = table.copy()
    table["path"] = table["image_id"].map(lambda i: str(paths[i]) if i in paths else "")
    absent = table["path"] == ""
    if absent.any():
        ids = table.loc[absent, "image_id"].tolist()
        if missing != "skip":
            raise DataError(
                f"{len(ids)} of {len(table)} images listed in {source} are not under the data "
                f"folder (first: {', '.join(repr(i) for i in ids[:3])}). Point --data at the "
                "folder holding them, or pass --missing skip to train on the images present "
                "(the skipped ids are written to the run folder).")
        table = table.loc[~absent].reset_index(drop=True)
        return table, ids
    return table, []


# --------------------------------------------------------------------------------------------
# CheXphoto / CheXpert schema
# --------------------------------------------------------------------------------------------
_PATIENT_RE = re.compile(r"(patient\d+)")


def chexpert_targets(values: pd.DataFrame, policy: str) -> np.ndarray:
    """CheXpert label values -> float32 targets under an uncertainty policy.

    Values: 1 positive, 0 negative, -1 uncertain, NaN (blank) not mentioned.
    - `zeros`: uncertain -> 0, blank -> 0   (CheXpert's U-Zeros)
    - `ones`:  uncertain -> 1, blank -> 0   (U-Ones)
    - `ignore`: uncertain and blank -> NaN, masked out of the loss (U-Ignore; docs/datasets.md:
      blank is negative in every common policy except this one)
    """
    if policy not in UNCERTAINTY_POLICIES:
        raise ValueError(f"uncertainty policy {policy!r}: expected one of {UNCERTAINTY_POLICIES}")
    v = values.to_numpy(dtype=np.float32)
    out = v.copy()
    uncertain, blank = v == -1, np.isnan(v)
    out[uncertain] = {"zeros": 0.0, "ones": 1.0, "ignore": np.nan}[policy]
    out[blank] = np.nan if policy == "ignore" else 0.0
    return out


def read_chexpert_csv(path: str | os.PathLike, policy: str = "zeros",
                      findings: Sequence[str] = CHEXPHOTO_FINDINGS,
                      source: str = "all", view: str = "frontal") -> pd.DataFrame:
    """Read a CheXphoto/CheXpert `train.csv` or `valid.csv`.

    Args:
        path: the CSV.
        policy: uncertainty policy, see `chexpert_targets`.
        findings: observation columns to return, in model output order.
        source: `all`, `natural`, `synthetic` (both kinds), `digital` or `photographic`.
        view: `all`, `frontal` or `lateral`.

    Returns:
        DataFrame `image_id` (the Path column), `patient`, `rel_path` (relative to the dataset
        root), `rendition`, and one float column per finding (NaN = masked).
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: CheXphoto CSV not found. Pass --data with the folder that "
                        "holds train.csv/valid.csv (e.g. .../CheXphoto-v1.1).")
    df = read_csv_or_explain(path)
    missing = [c for c in ("Path", *findings) if c not in df.columns]
    if missing:
        raise DataError(f"{path}: missing column(s) {missing}; expected the CheXpert schema "
                        f"{list(CHEXPERT_META_COLS) + list(CHEXPERT_OBSERVATIONS)}.")
    values = df[list(findings)].apply(pd.to_numeric, errors="coerce")
    bad = ~(values.isin([1, 0, -1]) | values.isna()) | (values.isna() & df[list(findings)].notna())
    if bad.to_numpy().any():
        row, col = np.argwhere(bad.to_numpy())[0]
        raise DataError(f"{path}: row {row + 2}, column '{findings[col]}' holds "
                        f"{plain_value(df[findings[col]].iat[row])}; CheXpert labels are 1, 0, "
                        "-1 or blank.")
    parts = df["Path"].astype(str).str.split("/")
    patient = df["Path"].astype(str).str.extract(_PATIENT_RE, expand=False)
    if patient.isna().any():
        row = int(np.flatnonzero(patient.isna().to_numpy())[0])
        raise DataError(f"{path}: row {row + 2}: no patientNNNNN folder in Path "
                        f"{df['Path'].iat[row]!r}.")
    # Path starts with the dataset's own folder name, which differs between copies
    # (CheXphoto-v1.1/, CheXphoto-test-v1.0/...): drop it and resolve under the root.
    rel = parts.str[1:].str.join("/")
    kind = parts.str[2].fillna("")
    sub = parts.str[3].fillna("")
    rendition = np.where(kind == "synthetic", "synthetic/" + sub, kind)
    out = pd.DataFrame({"image_id": df["Path"].astype(str), "patient": patient,
                        "rel_path": rel, "rendition": rendition})
    frontal = (df["Frontal/Lateral"].astype(str).str.lower() == "frontal"
               if "Frontal/Lateral" in df.columns else rel.str.contains("frontal"))
    targets = chexpert_targets(values, policy)
    for i, f in enumerate(findings):
        out[f] = targets[:, i]
    keep = np.ones(len(out), bool)
    if source in ("natural", "synthetic"):
        keep &= kind.to_numpy() == source
    elif source in ("digital", "photographic"):
        keep &= rendition == f"synthetic/{source}"
    elif source != "all":
        raise ValueError(f"source {source!r}: expected all, natural, synthetic, digital or "
                         "photographic")
    if view == "frontal":
        keep &= frontal.to_numpy()
    elif view == "lateral":
        keep &= ~frontal.to_numpy()
    elif view != "all":
        raise ValueError(f"view {view!r}: expected all, frontal or lateral")
    return out.loc[keep].reset_index(drop=True)


def find_chexphoto_root(data: str | os.PathLike) -> Path:
    """The folder holding train.csv/valid.csv: `data` itself or one folder below it."""
    data = Path(data)
    for cand in (data, *sorted(p.parent for p in data.glob("*/valid.csv")),
                 *sorted(p.parent for p in data.glob("*/train.csv"))):
        if (cand / "valid.csv").is_file() or (cand / "train.csv").is_file():
            return cand
    raise DataError(f"{data}: no train.csv or valid.csv here or one folder below. Pass --data "
                    "with the CheXphoto folder (e.g. .../CheXphoto-v1.1).")


def chexphoto_table(data: str | os.PathLike, policy: str = "zeros",
                    findings: Sequence[str] = CHEXPHOTO_FINDINGS, source: str = "all",
                    view: str = "frontal", seed: int = 0) -> LabelTable:
    """All CheXphoto rows with `fold` and absolute `path` (split `random`: by patient).

    With `train.csv`: it is split by patient into train (90%) and val (10%), and `valid.csv`
    is the test fold (CheXphoto's own test set is hidden). With only `valid.csv` (the fork's
    situation): a patient-level 70/10/20 split of it. Renditions of one X-ray share a patient,
    so they always land in the same fold.
    """
    root = find_chexphoto_root(data)
    train_csv, valid_csv = root / "train.csv", root / "valid.csv"
    if train_csv.is_file():
        train = read_chexpert_csv(train_csv, policy, findings, source, view)
        train["fold"] = patient_split(train["patient"], seed, {"train": 0.9, "val": 0.1})
        parts = [train]
        if valid_csv.is_file():
            # The validation CSV has no uncertain or blank labels, so the policy is moot there.
            test = read_chexpert_csv(valid_csv, policy, findings, source, view)
            test["fold"] = "test"
            parts.append(test)
        table = pd.concat(parts, ignore_index=True)
    else:
        table = read_chexpert_csv(valid_csv, policy, findings, source, view)
        table["fold"] = patient_split(table["patient"], seed)
    table["path"] = [str(root / r) for r in table["rel_path"]]
    return LabelTable(table, tuple(findings), "random",
                      tuple(str(p) for p in (train_csv, valid_csv) if p.is_file()))


# --------------------------------------------------------------------------------------------
# Datasets
# --------------------------------------------------------------------------------------------
class ImageFileDataset(Dataset):
    """Image files + targets held as arrays: what retrain.py reads when there is no uint8 cache
    (chexnet/loaders.py). Item i is `(transform(image), target (K,), image_id)`; with the
    training transform, `reference_geometry`, the image is uint8 (1, S, S)."""

    def __init__(self, paths: Sequence[str], targets: np.ndarray, image_ids: Sequence[str],
                 findings: Sequence[str], transform: Callable | None = None):
        if len(paths) != len(targets) or len(paths) != len(image_ids):
            raise ValueError("paths, targets and image_ids must have the same length")
        self.paths = list(paths)
        self.targets = torch.tensor(np.asarray(targets, dtype=np.float32))
        self.image_ids = list(image_ids)
        self.findings = tuple(findings)
        self.transform = transform or build_transform(224)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, str]:
        image = self.transform(load_xray(self.paths[i]))
        return image, self.targets[i], self.image_ids[i]

    @classmethod
    def from_table(cls, table: pd.DataFrame, findings: Sequence[str], fold: str | None,
                   transform: Callable | None = None) -> "ImageFileDataset":
        rows = table if fold is None else table[table["fold"] == fold]
        return cls(rows["path"].tolist(), rows[list(findings)].to_numpy(np.float32),
                   rows["image_id"].tolist(), findings, transform)


class CXRDataset(Dataset):
    """reproduce-chexnet's `CXRDataset`, constructor and items alike, for code written against it.

        CXRDataset(path_to_images, fold, transform=None, sample=0, finding="any")

    Args, with the reference's meaning:
        path_to_images: the folder holding the NIH PNGs (`os.path.join(path_to_images, name)`).
        fold: "train", "val" or "test": the rows of the labels file's `fold` column.
        transform: applied to the RGB PIL image (None: the PIL image itself is the item).
        sample: when 0 < sample < rows, that many rows drawn at random (`DataFrame.sample`, from
            numpy's global random state, as the reference: seed numpy for a repeatable draw).
        finding: "any", or a finding: only its positive rows (all rows, with a message, when it
            has none; a message and all rows when it is not a finding of the file).
        labels: the labels file (not in the reference, which reads `nih_labels.csv` from the
            working directory): default that file when it exists, else this repository's
            nih_labels.csv, which holds the same split.

    Item i is `(image, label, image_name)`: label is an int array of the 14 findings
    (`PRED_LABEL`), image the transform of the image converted to RGB. One difference from the
    reference: images are read with `load_xray` (16-bit PNGs scaled, RGBA flattened, EXIF
    orientation applied), which names an undecodable file instead of a bare PIL error.

    Training here does not use this class (chexnet/loaders.py builds the loaders); it exists so
    that reproduce-chexnet's loader code runs unchanged on this repository.
    """

    PRED_LABEL = list(NIH_FINDINGS)

    def __init__(self, path_to_images: str | os.PathLike, fold: str,
                 transform: Callable | None = None, sample: int = 0, finding: str = "any",
                 labels: str | os.PathLike | None = None):
        self.transform = transform
        self.path_to_images = path_to_images
        if labels is None:
            labels = "nih_labels.csv" if os.path.isfile("nih_labels.csv") else DEFAULT_NIH_LABELS
        df = read_csv_or_explain(Path(labels))
        missing = [c for c in ("Image Index", "fold", *self.PRED_LABEL) if c not in df.columns]
        if missing:
            raise DataError(f"{labels}: no column {', '.join(missing)}; CXRDataset reads a "
                            "reproduce-chexnet nih_labels.csv (Image Index, the 14 findings, "
                            "fold).")
        df = df[df["fold"] == fold]
        if 0 < sample < len(df):
            df = df.sample(sample)
        if finding != "any":
            if finding in df.columns:
                if (df[finding] == 1).any():
                    df = df[df[finding] == 1]
                else:
                    print(f"No positive cases exist for {finding}, returning all unfiltered cases")
            else:
                print(f"cannot filter on finding {finding} as not in data - please check spelling")
        self.df = df.set_index("Image Index")
        # The reference's per-item loop: a finding's int value where it is positive, else 0.
        self._labels = np.maximum(self.df[self.PRED_LABEL].to_numpy().astype(int), 0)

    def __len__(self) -> int:
        return len(self.df)

    def __getitem__(self, idx: int):
        name = self.df.index[idx]
        image = load_xray(os.path.join(self.path_to_images, name)).convert("RGB")
        if self.transform:
            image = self.transform(image)
        return image, self._labels[idx].copy(), name


def resolve_nih_labels(data: str | os.PathLike, labels: str | os.PathLike | None = None,
                       reference_split: bool = False) -> Path:
    """The labels file of an NIH-format dataset folder: the one rule every tool follows.

    `labels` when given; else DATA/nih_labels.csv (prepare_data.py writes it); else, unless
    the reference split is wanted, a Data_Entry_2017*.csv(.gz) in DATA (the demo's labels, or
    NIH's own download); else this repository's nih_labels.csv, whose fold column is the
    reference split (what `retrain.py --dataset nih` trains on by default).

    Raises:
        DataError: a given `labels` file that does not exist.
    """
    if labels is not None:
        path = Path(labels)
        if not path.is_file():
            raise DataError(f"{path}: labels file not found. Pass --labels with an existing "
                            "nih_labels.csv or Data_Entry_2017*.csv.")
        return path
    data = Path(data)
    candidates = [data / "nih_labels.csv"]
    if not reference_split:
        candidates += [*sorted(data.glob("Data_Entry_2017*.csv")),
                       *sorted(data.glob("Data_Entry_2017*.csv.gz"))]
    return next((p for p in candidates if p.is_file()), DEFAULT_NIH_LABELS)


def nih_table(data: str | os.PathLike, labels: str | os.PathLike | None = None,
              missing: str = "error", seed: int = 0, split: str | None = None,
              dataset: str = "nih", cached: dict[str, Path] | None = None
              ) -> tuple[LabelTable, list[str]]:
    """NIH (or demo) label table, its folds set by `split`, joined with the image files found
    under `data`.

    `labels` defaults to `resolve_nih_labels`'s choice (NIH: data/nih_labels.csv, else the
    committed reference-split file; demo: also a Data_Entry_2017*.csv in `data`). `split` None
    means the labels file's own folds when it has a `fold` column, else `reference` (NIH) or
    `random` (the demo, whose images are not NIH's). The table's `split` says which split the
    folds are: a file whose folds equal the reference split's is recorded as `reference`.

    `cached` (image id -> the cache file holding its pixels; `loaders.load_tables` passes a
    valid cache's usable rows when retrain.py reads the cache) stands in for images that are
    not on disk, e.g. on a Colab VM after a reset, where only the cache was copied back.
    """
    data = Path(data)
    if not data.is_dir():
        raise DataError(f"{data}: data folder not found. Pass --data with the dataset root.")
    labels = resolve_nih_labels(data, labels, reference_split=dataset == "nih")
    labelled = read_nih_labels(labels, seed)
    if split is None:
        split = ("file" if labelled.split == "file"
                 else "reference" if dataset == "nih" else "random")
    if split == "reference" and dataset == "demo":
        raise DataError("--split reference is NIH's split; the demo's images are generated, "
                        "so use --split random (the default) or file.")
    labelled = apply_split(labelled, split, seed, data if split == "official" else None,
                           str(labels))
    if split == "file" and dataset == "nih" and _is_reference(labelled.frame):
        labelled = labelled.replace(split="reference")
    paths = index_images(data)
    if cached:
        paths = {**cached, **paths}  # an image on disk is itself; the others, their cache row
    if not paths:
        raise DataError(f"{data}: no PNG/JPEG images found (looked in images/, images_*/images/, "
                        "the folder itself and three levels below).")
    table, skipped = attach_paths(labelled.frame, paths, str(labels), missing)
    return labelled.replace(frame=table), skipped


def _is_reference(table: pd.DataFrame) -> bool:
    """Whether every image of the table is in the reference split, in its reference fold."""
    folds = reference_folds()
    mapped = table["image_id"].map(folds)
    return bool(mapped.notna().all() and (mapped == table["fold"]).all())
