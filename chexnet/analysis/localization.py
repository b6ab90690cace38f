"""Does the heatmap point at the lesion? Pointing game and heatmap mass inside NIH boxes.

    python localization.py --run results/NAME --boxes BBox_List_2017.csv [--out loc.csv] \\
        [--method cam|gradcam] [--tolerance PX]

For each box of the NIH `BBox_List_2017.csv` (schema `Image Index, Finding Label, Bbox [x,y,w,h]`)
on an image of the run's test fold, the run's model draws the heatmap of the box's finding, and:
- pointing game: is the heatmap's maximum inside the box (grown by `--tolerance` pixels)?
- mass inside: the fraction of the heatmap's positive part that lies inside the box.
Both are also given for an image-independent centre baseline (a centred Gaussian, whose maximum
is the image centre), which any heatmap worth looking at must beat.

Geometry: boxes are in the original image's pixels (NIH: 1024 x 1024; the demo: the generated
size, read from the image file). The model saw Resize(S) + CenterCrop(S) of the image, so boxes
are scaled and shifted the same way into the S x S input, where the heatmaps live. A pixel is
inside a box when its centre is; the pixel holding the box centre always is, so that a box
smaller than a pixel still has one.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
import torch
from PIL import Image, UnidentifiedImageError

from chexnet.files import check_outputs, run_files
from chexnet.cli import NON_NEGATIVE, at_least, command
from chexnet.analysis import cam
from chexnet.runs import run_test_table
from chexnet.data import DataError, build_transform, load_xray
from chexnet.labels import NIH_BBOX_ALIASES, NIH_FINDINGS

# NIH boxes are drawn on the 1024 x 1024 originals (docs/datasets.md), whatever copy is on disk.
NIH_ORIGINAL_SIZE = 1024
# Centre baseline: a centred Gaussian of standard deviation S * CENTRE_SIGMA.
CENTRE_SIGMA = 0.25
BOX_COLUMNS = ("image_id", "finding", "x", "y", "w", "h")


# --------------------------------------------------------------------------------------------
# Boxes
# --------------------------------------------------------------------------------------------
def read_boxes(path: str | Path) -> pd.DataFrame:
    """Read boxes in the NIH `BBox_List_2017.csv` schema (plain or .gz).

    The header has 9 fields (`Bbox [x,y,w,h]` holds commas, plus 3 empty ones) while the real
    file's rows have 6, the demo's 9: only the first 6 columns are used, by position.

    Returns:
        DataFrame image_id, finding (Data_Entry spelling: `Infiltrate` -> `Infiltration`),
        x, y, w, h (float pixels of the image the boxes were drawn on).

    Raises:
        DataError: missing file, wrong header, unknown finding, non-numeric or empty box.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: boxes file not found; expected NIH's BBox_List_2017.csv.")
    raw = pd.read_csv(path, header=0, dtype=str, keep_default_na=False)
    if raw.shape[1] < 6 or list(raw.columns[:2]) != ["Image Index", "Finding Label"]:
        raise DataError(f"{path}: header {list(raw.columns[:6])}; expected the NIH schema "
                        "'Image Index,Finding Label,Bbox [x,y,w,h],,,'.")
    df = raw.iloc[:, :6].copy()
    df.columns = list(BOX_COLUMNS)
    df["finding"] = df["finding"].str.strip().replace(NIH_BBOX_ALIASES)
    unknown = ~df["finding"].isin(NIH_FINDINGS)
    if unknown.any():
        row = int(np.flatnonzero(unknown.to_numpy())[0])
        raise DataError(f"{path}: row {row + 2}: unknown finding {df['finding'].iat[row]!r}; "
                        f"expected one of {', '.join(NIH_FINDINGS)} (or 'Infiltrate').")
    coords = df[["x", "y", "w", "h"]].apply(pd.to_numeric, errors="coerce")
    bad = coords.isna().any(axis=1) | (coords["w"] <= 0) | (coords["h"] <= 0)
    if bad.any():
        row = int(np.flatnonzero(bad.to_numpy())[0])
        raise DataError(f"{path}: row {row + 2}: box {df.iloc[row, 2:].tolist()} is not four "
                        "numbers x, y, w > 0, h > 0.")
    df[["x", "y", "w", "h"]] = coords.astype(np.float64)
    df["image_id"] = df["image_id"].str.strip()
    return df.reset_index(drop=True)


def resize_crop_geometry(width: int, height: int, size: int) -> tuple[float, float, int, int]:
    """How Resize(size) + CenterCrop(size) maps a width x height image, as torchvision does it.

    Resize with an int scales the short side to `size` and the long side to
    int(size * long / short); CenterCrop then drops round((new - size) / 2) pixels at the start.

    Returns:
        (scale_x, scale_y, left, top): input x' = x * scale_x - left, y' = y * scale_y - top.
    """
    if width <= height:
        new_w, new_h = size, int(size * height / width)
    else:
        new_w, new_h = int(size * width / height), size
    left = int(round((new_w - size) / 2.0))
    top = int(round((new_h - size) / 2.0))
    return new_w / width, new_h / height, left, top


def image_size_on_disk(path: str | Path) -> tuple[int, int]:
    """(width, height) of an image file, read from its header only."""
    try:
        with Image.open(path) as img:
            return img.size
    except (FileNotFoundError, UnidentifiedImageError, OSError) as err:
        raise DataError(f"{path}: cannot read the image size ({err}).") from err


def boxes_in_input_space(boxes: pd.DataFrame, images: pd.DataFrame, size: int,
                         dataset: str = "demo", frame_size: int | None = None) -> pd.DataFrame:
    """Boxes of the listed images, mapped into the model's S x S input.

    Args:
        boxes: `read_boxes` output.
        images: table indexed by image id with a `path` column (e.g. a run's test fold);
            boxes of other images are dropped.
        size: the model's input size S.
        dataset: `nih` boxes are in 1024 x 1024 pixels even when the copy on disk was
            resized; other datasets' boxes are in the pixels of the file itself.
        frame_size: the (square) size the boxes were drawn on, overriding the above.

    Returns:
        DataFrame image_id, finding, path, x0, y0, x1, y1 (input pixels, clipped to [0, S]);
        boxes left with no area by the centre crop are dropped.
    """
    kept = boxes[boxes["image_id"].isin(images.index)].copy()
    if kept.empty:
        return kept.assign(path=[], x0=[], y0=[], x1=[], y1=[]).drop(
            columns=["x", "y", "w", "h"])
    kept["path"] = images.loc[kept["image_id"], "path"].to_numpy()
    sizes = {p: image_size_on_disk(p) for p in kept["path"].unique()}
    file_w = np.array([sizes[p][0] for p in kept["path"]], np.float64)
    file_h = np.array([sizes[p][1] for p in kept["path"]], np.float64)
    if frame_size is None and dataset == "nih":
        frame_size = NIH_ORIGINAL_SIZE
    frame_w = np.full_like(file_w, frame_size) if frame_size else file_w
    frame_h = np.full_like(file_h, frame_size) if frame_size else file_h
    geometry = np.array([resize_crop_geometry(int(w), int(h), size)
                         for w, h in zip(file_w, file_h)])        # (N, 4)
    sx = geometry[:, 0] * file_w / frame_w
    sy = geometry[:, 1] * file_h / frame_h
    x0 = kept["x"].to_numpy() * sx - geometry[:, 2]
    y0 = kept["y"].to_numpy() * sy - geometry[:, 3]
    x1 = (kept["x"] + kept["w"]).to_numpy() * sx - geometry[:, 2]
    y1 = (kept["y"] + kept["h"]).to_numpy() * sy - geometry[:, 3]
    out = pd.DataFrame({"image_id": kept["image_id"].to_numpy(),
                        "finding": kept["finding"].to_numpy(), "path": kept["path"].to_numpy(),
                        "x0": np.clip(x0, 0, size), "y0": np.clip(y0, 0, size),
                        "x1": np.clip(x1, 0, size), "y1": np.clip(y1, 0, size)})
    has_area = (out["x1"] > out["x0"]) & (out["y1"] > out["y0"])
    return out[has_area].reset_index(drop=True)


# --------------------------------------------------------------------------------------------
# Metrics (pure functions)
# --------------------------------------------------------------------------------------------
def _inside(cols: np.ndarray, rows: np.ndarray, boxes: np.ndarray, tolerance: float
            ) -> np.ndarray:
    """Whether pixel (row, col) is inside box n: its centre within the box grown by
    `tolerance`, or it is the pixel holding the box centre. cols/rows broadcast against
    boxes[:, k] reshaped to (N, 1, 1)."""
    x0, y0, x1, y1 = (boxes[:, k].reshape(-1, 1, 1) for k in range(4))
    cx, cy = cols + 0.5, rows + 0.5
    inside = ((cx >= x0 - tolerance) & (cx <= x1 + tolerance)
              & (cy >= y0 - tolerance) & (cy <= y1 + tolerance))
    centre = (cols == np.floor((x0 + x1) / 2)) & (rows == np.floor((y0 + y1) / 2))
    return inside | centre


def box_masks(boxes: np.ndarray, size: int, tolerance: float = 0.0) -> np.ndarray:
    """(N, S, S) bool: pixels inside each box (see `_inside`).

    Args:
        boxes: (N, 4) x0, y0, x1, y1 in input pixels (pixel i spans [i, i + 1)).
        size: S.
        tolerance: pixels by which each box is grown on every side.
    """
    boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
    grid = np.arange(size, dtype=np.float64)
    return _inside(grid[None, None, :], grid[None, :, None], boxes, tolerance)


def pointing_game(heatmaps: np.ndarray, boxes: np.ndarray, tolerance: float = 0.0
                  ) -> np.ndarray:
    """Pointing-game hits: is each heatmap's maximum inside its box?

    Ties go to the maximal pixel nearest the image centre. A coarse map (DenseNet's is S/32 on
    a side) upsampled bilinearly is flat from each border cell's centre out to the image edge,
    so its maximum is often a plateau; the first pixel in row-major order would be the image
    corner, far from the cell centre that the value belongs to, which is the plateau's
    innermost point. A flat heatmap (e.g. Grad-CAM's all-zero map where no feature speaks for
    the finding) points nowhere: a miss, not a tie won by the image centre.

    Args:
        heatmaps: (N, S, S).
        boxes: (N, 4) x0, y0, x1, y1 in heatmap pixels.
        tolerance: pixels by which each box is grown (0: the strict game).

    Returns:
        (N,) bool.
    """
    heatmaps = np.asarray(heatmaps, np.float64)
    n, s = heatmaps.shape[0], heatmaps.shape[-1]
    flat = heatmaps.reshape(n, -1)
    peak = flat.max(axis=1, keepdims=True)
    tied = np.isclose(flat, peak, rtol=1e-6, atol=0.0)                 # (N, S*S)
    rows_all, cols_all = np.divmod(np.arange(s * s), s)
    to_centre = (rows_all + 0.5 - s / 2) ** 2 + (cols_all + 0.5 - s / 2) ** 2
    best = np.where(tied, -to_centre[None, :], -np.inf).argmax(axis=1)
    rows, cols = np.divmod(best, s)
    boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
    inside = _inside(cols.reshape(-1, 1, 1).astype(np.float64),
                     rows.reshape(-1, 1, 1).astype(np.float64), boxes, tolerance).reshape(n)
    return inside & (peak[:, 0] > flat.min(axis=1))


def mass_inside(heatmaps: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """Fraction of each heatmap's positive part that lies inside its box.

    Args:
        heatmaps: (N, S, S); negative values (CAM's evidence against) count as 0.
        boxes: (N, 4) x0, y0, x1, y1 in heatmap pixels.

    Returns:
        (N,) in [0, 1]; NaN where a heatmap has no positive value at all.
    """
    pos = np.clip(np.asarray(heatmaps, np.float64), 0, None)
    masks = box_masks(boxes, pos.shape[-1])
    total = pos.sum(axis=(1, 2))
    inside = (pos * masks).sum(axis=(1, 2))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, inside / np.where(total > 0, total, 1.0), np.nan)


def centre_heatmap(size: int, sigma: float = CENTRE_SIGMA) -> np.ndarray:
    """(S, S) centred Gaussian (standard deviation sigma * S, peak 1): the baseline that
    ignores the image and points at its middle."""
    c = np.arange(size, dtype=np.float64) + 0.5 - size / 2
    g = np.exp(-0.5 * (c / (sigma * size)) ** 2)
    return np.outer(g, g)


# --------------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------------
def score_boxes(boxed: pd.DataFrame, maps: np.ndarray, size: int, tolerance: float = 0.0,
                chunk: int = 256) -> pd.DataFrame:
    """Per-box metrics for given heatmaps and for the centre baseline.

    Args:
        boxed: `boxes_in_input_space` rows (N).
        maps: (N, S, S) heatmap of each row's finding over its image.
        chunk: rows scored at a time (bounds the temporary (chunk, S*S) arrays).

    Returns:
        `boxed` plus hit, mass, centre_hit, centre_mass.
    """
    xyxy = boxed[["x0", "y0", "x1", "y1"]].to_numpy(np.float64)
    centre = centre_heatmap(size)
    parts: dict[str, list[np.ndarray]] = {"hit": [], "mass": [], "centre_hit": [],
                                          "centre_mass": []}
    for start in range(0, len(boxed), chunk):
        b = xyxy[start:start + chunk]
        m = np.asarray(maps[start:start + chunk])
        c = np.broadcast_to(centre, (len(b), size, size))
        parts["hit"].append(pointing_game(m, b, tolerance))
        parts["mass"].append(mass_inside(m, b))
        parts["centre_hit"].append(pointing_game(c, b, tolerance))
        parts["centre_mass"].append(mass_inside(c, b))
    empty = {"hit": bool, "mass": float, "centre_hit": bool, "centre_mass": float}
    return boxed.assign(**{k: np.concatenate(v) if v else np.zeros(0, empty[k])
                           for k, v in parts.items()})


def localize(model: torch.nn.Module, findings: Sequence[str], size: int, boxed: pd.DataFrame,
             method: str = "cam", tolerance: float = 0.0, batch_size: int = 16) -> pd.DataFrame:
    """Heatmaps of every box's finding over its image, scored against the box.

    Each (image, finding) heatmap is computed once, however many boxes it has.

    Args:
        model: DenseNet in eval mode.
        findings: its output names; boxes of other findings are dropped.
        size: input size S.
        boxed: `boxes_in_input_space` output.

    Returns:
        Per-box DataFrame: boxed's columns, prob, hit, mass, centre_hit, centre_mass.
    """
    boxed = boxed[boxed["finding"].isin(findings)].reset_index(drop=True)
    pairs = boxed[["image_id", "finding", "path"]].drop_duplicates(["image_id", "finding"])
    pairs = pairs.sort_values("image_id", kind="stable").reset_index(drop=True)
    transform = build_transform(size)
    maps: dict[tuple[str, str], np.ndarray] = {}
    probs: dict[tuple[str, str], float] = {}
    images: dict[str, torch.Tensor] = {}
    for start in range(0, len(pairs), batch_size):
        chunk = pairs.iloc[start:start + batch_size]
        batch = []
        for image_id, path in zip(chunk["image_id"], chunk["path"]):
            if image_id not in images:
                # Pairs are sorted by image, so only the latest few decoded images are
                # needed again; the rest are dropped to bound memory.
                if len(images) > 4 * batch_size:
                    images.clear()
                images[image_id] = transform(load_xray(path))
            batch.append(images[image_id])
        ks = [findings.index(f) for f in chunk["finding"]]
        chunk_maps, chunk_probs = cam.heatmaps(model, torch.stack(batch), ks, method)
        for t, (image_id, finding) in enumerate(zip(chunk["image_id"], chunk["finding"])):
            maps[(image_id, finding)] = chunk_maps[t]
            probs[(image_id, finding)] = float(chunk_probs[t, ks[t]])
    keys = list(zip(boxed["image_id"], boxed["finding"]))
    stacked = np.stack([maps[key] for key in keys]) if keys else np.zeros((0, size, size))
    scored = score_boxes(boxed, stacked, size, tolerance)
    scored.insert(3, "prob", [probs[key] for key in keys])
    return scored


def summarize(scored: pd.DataFrame) -> pd.DataFrame:
    """Per-finding table (NIH order), a `mean` row (over findings with boxes) and an `all`
    row (pooled over boxes).

    Columns: finding, n_boxes, n_images, hit_rate, mass_inside, centre_hit_rate,
    centre_mass_inside, n_no_mass (heatmaps with no positive part: left out of both mass
    columns, so that they are means over the same boxes).
    """
    rows = []
    for finding in [f for f in NIH_FINDINGS if f in set(scored["finding"])]:
        part = scored[scored["finding"] == finding]
        rows.append(_summary_row(finding, part))
    table = pd.DataFrame(rows, columns=["finding", "n_boxes", "n_images", "hit_rate",
                                        "mass_inside", "centre_hit_rate", "centre_mass_inside",
                                        "n_no_mass"])
    if rows:
        mean = {"finding": "mean", "n_boxes": int(table["n_boxes"].sum()),
                "n_images": scored["image_id"].nunique(),
                "n_no_mass": int(table["n_no_mass"].sum())}
        for col in ("hit_rate", "mass_inside", "centre_hit_rate", "centre_mass_inside"):
            mean[col] = float(table[col].mean())
        pooled = _summary_row("all", scored)
        table = pd.concat([table, pd.DataFrame([mean, pooled])], ignore_index=True)
    return table


def _summary_row(name: str, part: pd.DataFrame) -> dict:
    mass = part["mass"].to_numpy(np.float64)
    defined = ~np.isnan(mass)
    return {"finding": name, "n_boxes": len(part), "n_images": part["image_id"].nunique(),
            "hit_rate": float(part["hit"].mean()),
            "mass_inside": float(mass[defined].mean()) if defined.any() else float("nan"),
            "centre_hit_rate": float(part["centre_hit"].mean()),
            # Over the same boxes as mass_inside, so the two columns compare like with like.
            "centre_mass_inside": float(part["centre_mass"].to_numpy()[defined].mean())
            if defined.any() else float("nan"),
            "n_no_mass": int((~defined).sum())}


def run_localization(run_dir: str | Path, boxes_path: str | Path, method: str = "cam",
                     tolerance: float = 0.0, data: str | None = None,
                     frame_size: int | None = None, batch_size: int = 16
                     ) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Localisation metrics of a run's model on the boxes of its test fold.

    Returns:
        (summary table, per-box table); see `summarize` and `localize`.

    Raises:
        DataError: unusable run or boxes file, a model without NIH findings, or no box on a
            test-fold image.
    """
    if method not in cam.METHODS:
        raise DataError(f"method {method!r}: expected one of {cam.METHODS}")
    run_dir = Path(run_dir)
    checkpoint = run_dir / "checkpoint.pt"
    if not checkpoint.is_file():
        raise DataError(f"{checkpoint}: not found; --run takes a folder written by retrain.py.")
    boxes = read_boxes(boxes_path)
    model, findings, size, _ = cam.load_trained_model(checkpoint)
    if not set(findings) & set(NIH_FINDINGS):
        raise DataError(f"{checkpoint}: the model predicts {', '.join(findings)}; the NIH boxes "
                        "need a model trained on NIH findings (--dataset nih or demo).")
    cfg, test = run_test_table(run_dir, data)
    boxed = boxes_in_input_space(boxes, test, size, cfg.dataset, frame_size)
    if boxed.empty:
        raise DataError(f"{boxes_path}: none of its {len(boxes)} boxes is on one of the "
                        f"{len(test)} test-fold images of {run_dir}.")
    scored = localize(model.to(_device()), findings, size, boxed, method, tolerance, batch_size)
    return summarize(scored), scored


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def format_summary(table: pd.DataFrame) -> str:
    """Fixed-width rendering of a `summarize` table (3 decimals, NaN shown as n/a)."""
    return table.to_string(index=False, na_rep="n/a", float_format=lambda v: f"{v:.3f}")


@command
def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, help="run folder written by retrain.py")
    p.add_argument("--boxes", required=True, help="BBox_List_2017.csv (NIH schema, .gz ok)")
    p.add_argument("--out", help="summary CSV (default: RUN/localization_<method>.csv)")
    p.add_argument("--per-box", help="also write one row per box to this CSV")
    p.add_argument("--method", choices=cam.METHODS, default="cam")
    p.add_argument("--tolerance", type=NON_NEGATIVE, default=0.0,
                   help="pointing game: grow boxes by this many input pixels (DenseNet's "
                   "heatmap cell is 32 px, so 16 is half a cell); default 0")
    p.add_argument("--data", help="dataset folder, if it moved since training")
    p.add_argument("--box-image-size", type=at_least(1),
                   help="size of the (square) images the boxes "
                   "were drawn on; default 1024 for NIH, the file's own size otherwise")
    p.add_argument("--batch-size", type=at_least(1), default=16)
    args = p.parse_args(argv)
    check_outputs({"--out": args.out, "--per-box": args.per_box},
                  {"--boxes": args.boxes, **run_files(args.run)})
    summary, scored = run_localization(args.run, args.boxes, args.method, args.tolerance,
                                       args.data, args.box_image_size, args.batch_size)
    out = Path(args.out) if args.out else Path(args.run) / f"localization_{args.method}.csv"
    summary.to_csv(out, index=False)
    if args.per_box:
        scored.drop(columns=["path"]).to_csv(args.per_box, index=False)
    print(f"{args.method.upper()} localisation on {len(scored)} boxes of "
          f"{scored['image_id'].nunique()} test-fold images (tolerance {args.tolerance:g} px); "
          f"centre_* = a centred Gaussian that ignores the image:")
    print(format_summary(summary))
    print(f"wrote {out}" + (f" and {args.per_box}" if args.per_box else ""))
    return 0
