"""Figures of what a trained DenseNet-121 looked at: overlays, run galleries and
reproduce-chexnet's annotated log-odds grid, drawn from chexnet/analysis/cam.py's maps.

A gallery shows the most confident true-or-predicted positives of a run's test predictions
(`preds.csv`) in one grid, with the probability and the ground truth per tile (captions wrap,
and each row is as tall as its longest caption). The reference style draws, per feature cell,
log(sigmoid(CAM + bias) / prevalence) on a fixed -5..5 viridis scale, the prevalence being the
finding's rate in the run's TRAINING fold. visualize_prediction.py is the command line.
"""
from __future__ import annotations

import dataclasses
import math
import re
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Sequence

import numpy as np
import pandas as pd
import torch
from PIL import Image
from torch import nn

from chexnet.analysis import localization
from chexnet.config import config_from_record, load_run_config
from chexnet.loaders import load_tables
from chexnet.runs import run_tables
from chexnet.analysis.cam import (
    METHODS, heatmaps, load_trained_model,
    model_view, reference_log_odds_maps,
)
from chexnet.data import DataError, build_transform, load_xray
from chexnet.scoring import PROB_PREFIX, read_preds
from chexnet.labels import IMAGENET_MEAN, IMAGENET_STD

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.collections import QuadMesh
    from matplotlib.figure import Figure

STYLES = ("heatmap", "reference")     # heatmap: this tool's overlay; reference: reproduce-chexnet's
REFERENCE_SCALE = (-5.0, 5.0)         # the reference's heatmap(..., vmin=-5, vmax=5)
TILE_INCHES = 3.2                     # side of a gallery tile's image, in inches
CAPTION_FONTSIZE = 8                  # tile captions; the gallery's own title is 10 pt
TITLE_FONTSIZE = 10
EM_PER_CHAR = 0.6                     # DejaVu Sans: widest mean advance of a caption's letters
LINE_SPACING = 1.2                    # matplotlib's multi-line text spacing


# --------------------------------------------------------------------------------------------
# Drawing
# --------------------------------------------------------------------------------------------
def _pyplot():
    import matplotlib
    matplotlib.use("Agg")  # files only: never needs a display
    import matplotlib.pyplot as plt
    return plt


def wrap_caption(text: str, width: int) -> str:
    """`text` broken into lines of at most `width` characters: after a space or a '/' (between
    the findings of a list, between the folders of an image path), and a longer run with
    neither cut where it must be. Existing line breaks are kept."""
    lines: list[str] = []
    for paragraph in text.split("\n"):
        line = ""
        for token in re.split(r"(?<=[ /])", paragraph):
            if line and len((line + token).rstrip()) > width:
                lines.append(line.rstrip())
                line = ""
            line += token
            while len(line.rstrip()) > width:
                lines.append(line[:width])
                line = line[width:]
        lines.append(line.rstrip())
    return "\n".join(lines)


def caption_width(inches: float, fontsize: float = CAPTION_FONTSIZE) -> int:
    """How many characters of `fontsize` text fit on a line `inches` wide."""
    return max(8, int(inches * 72 / (fontsize * EM_PER_CHAR)))


def caption(head: str, truth: Sequence[str] | None, width: int | None = None) -> str:
    """A tile's caption: `head`, then `truth: A, B, ...` (No Finding for an empty list; no line
    when the truth is unknown), wrapped to `width` characters when given."""
    text = head
    if truth is not None:
        text += "\ntruth: " + (", ".join(truth) if truth else "No Finding")
    return wrap_caption(text, width) if width else text


def text_height(text: str, fontsize: float) -> float:
    """Height in inches of `text` (its lines) set at `fontsize`."""
    return (text.count("\n") + 1) * fontsize * LINE_SPACING / 72


def overlay(ax: "Axes", image: np.ndarray, heat: np.ndarray, finding: str, prob: float,
            truth: Sequence[str] | None = None, boxes: Sequence[Sequence[float]] = (),
            title: str | None = None, wrap: int | None = None) -> None:
    """Draw an X-ray with its heatmap on `ax`.

    Args:
        image: (S, S) grey image as the model saw it.
        heat: (S, S) heatmap (any units; colours span its own range).
        finding: name of the finding the heatmap explains.
        prob: the model's probability for it.
        truth: the image's true findings, when known ([] = none, i.e. No Finding).
        boxes: rectangles to draw (e.g. the finding's ground-truth boxes), each
            (x0, y0, x1, y1) in the image's pixels.
        title: first title line (default: the finding).
        wrap: break the caption into lines of at most this many characters (`caption`).
    """
    from matplotlib.patches import Rectangle

    ax.imshow(image, cmap="gray")
    ax.imshow(heat, cmap="jet", alpha=0.4)
    ax.set_title(caption(f"{title or finding}: p = {prob:.3f}", truth, wrap),
                 fontsize=CAPTION_FONTSIZE)
    for x0, y0, x1, y1 in boxes:
        ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, edgecolor="lime",
                               linewidth=1.5))
    ax.axis("off")


def render(image: np.ndarray, cam: np.ndarray, title: str, out: str | Path) -> None:
    """Save the X-ray next to the X-ray with the heatmap (upsampled to the image) overlaid."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(8, 4.3))
    axes[0].imshow(image, cmap="gray")
    axes[0].set_title("X-ray")
    axes[1].imshow(image, cmap="gray")
    axes[1].imshow(cam, cmap="jet", alpha=0.4)
    axes[1].set_title(title, fontsize=9)
    for ax in axes:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def denormalise(image: torch.Tensor) -> np.ndarray:
    """The input as the reference shows it: std * x + mean, clipped to [0, 1].

    Args:
        image: (3, S, S) ImageNet-normalised tensor (as `build_transform` returns it).

    Returns:
        (S, S, 3) float64 RGB in [0, 1] (grey X-rays come back as three equal channels).
    """
    x = image.detach().float().cpu().numpy().transpose(1, 2, 0)
    return np.clip(np.asarray(IMAGENET_STD) * x + np.asarray(IMAGENET_MEAN), 0, 1)


def _luminance(rgba: np.ndarray) -> np.ndarray:
    """WCAG relative luminance of (..., 4) colours: seaborn's rule for dark or light text."""
    rgb = rgba[..., :3]
    rgb = np.where(rgb <= 0.03928, rgb / 12.92, ((rgb + 0.055) / 1.055) ** 2.4)
    return rgb @ np.array([0.2126, 0.7152, 0.0722])


def draw_log_odds_grid(ax: "Axes", rgb: np.ndarray, grid: np.ndarray,
                       boxes: Sequence[Sequence[float]] = (), fontsize: float = 9) -> "QuadMesh":
    """The reference's seaborn `heatmap(grid, annot=True, vmin=-5, vmax=5, cmap='viridis',
    alpha=0.3, square=True)` over the image, in plain matplotlib (seaborn is not a dependency).

    As in seaborn, cell (i, j) is the unit square at x in [j, j+1], y in [i, i+1] with row 0 at
    the top, and carries its value in seaborn's default format (.2g); the image is stretched
    under the cells over the same extent, as the reference's `imshow(extent=xlim + ylim)`.

    Args:
        rgb: (S, S, 3) image in [0, 1] (`denormalise`).
        grid: (h, w) map (`reference_log_odds_maps`), drawn on the fixed REFERENCE_SCALE.
        boxes: rectangles in the image's pixels, (x0, y0, x1, y1) each, scaled to the grid.
        fontsize: of the cell values.

    Returns:
        The cells' QuadMesh, for a colour bar.
    """
    from matplotlib.patches import Rectangle

    h, w = grid.shape
    vmin, vmax = REFERENCE_SCALE
    mesh = ax.pcolormesh(np.arange(w + 1), np.arange(h + 1), grid, cmap="viridis", vmin=vmin,
                         vmax=vmax, alpha=0.3, zorder=2)
    ax.imshow(rgb, extent=(0, w, h, 0), zorder=1)
    ax.set_xlim(0, w)
    ax.set_ylim(h, 0)
    ax.set_aspect("equal")
    light = _luminance(mesh.cmap(mesh.norm(grid))) > 0.408                  # (h, w)
    for (i, j), value in np.ndenumerate(grid):
        ax.text(j + 0.5, i + 0.5, format(value, ".2g"), ha="center", va="center", zorder=3,
                fontsize=fontsize, color="0.15" if light[i, j] else "w")
    sx, sy = w / rgb.shape[1], h / rgb.shape[0]
    for x0, y0, x1, y1 in boxes:
        ax.add_patch(Rectangle((x0 * sx, y0 * sy), (x1 - x0) * sx, (y1 - y0) * sy, fill=False,
                               edgecolor="lime", linewidth=1.5, zorder=4))
    ax.axis("off")
    return mesh


def reference_figure(image: torch.Tensor, grid: np.ndarray, finding: str, prob: float,
                     name: str) -> "Figure":
    """reproduce-chexnet's `show_next` figure: the input titled with its file name, next to the
    annotated log-odds grid over it titled P(finding)=prob, with a colour bar of the fixed scale.

    Args:
        image: (3, S, S) normalised input.
        grid: (h, w) `reference_log_odds_maps` map of that input.
        finding: the finding mapped; prob: the model's probability of it.
        name: the image's file name or id.
    """
    plt = _pyplot()
    fig, (plain, heat) = plt.subplots(1, 2, figsize=(14, 5), layout="constrained")
    rgb = denormalise(image)
    plain.imshow(rgb)
    plain.axis("off")
    plain.set_title(name)
    mesh = draw_log_odds_grid(heat, rgb, grid)
    heat.set_title(f"P({finding})={prob:.3f}")
    fig.colorbar(mesh, ax=heat, label="log(P(region) / prevalence)")
    return fig


# --------------------------------------------------------------------------------------------
# Runs, prevalences and galleries
# --------------------------------------------------------------------------------------------
def training_prevalence(table: pd.DataFrame, findings: Sequence[str]) -> pd.Series:
    """Fraction of the training fold's images positive for each finding, (K,) indexed by name.

    The base rate a model has learnt is that of the images it was fitted on, so the validation
    and test folds are left out (the test fold's rate would also leak evaluation labels into
    the picture). The reference hard-coded the rates of its own training split. Masked labels
    (NaN, e.g. CheXphoto's --uncertainty ignore) are left out of their finding's fraction.

    Args:
        table: label table with a `fold` column and one 0/1 column per finding.
    """
    train = table[table["fold"] == "train"]
    if train.empty:
        raise DataError("the run's label table has no 'train' fold, so there is no base rate; "
                        "pass --prevalence with a fraction, e.g. --prevalence 0.05.")
    labels = train[list(findings)].astype(np.float64)
    return (labels == 1).sum() / labels.notna().sum()


def finding_prevalence(prevalences: pd.Series, finding: str, source: str) -> float:
    """prevalences[finding], checked usable as the reference map's divisor (> 0)."""
    if finding not in prevalences.index:
        raise DataError(f"{source}: its labels have no {finding!r} column; pass --prevalence "
                        "with a fraction, e.g. --prevalence 0.05.")
    p = float(prevalences[finding])
    if not p > 0:
        raise DataError(f"{source}: no training image is positive for {finding}, so its base "
                        "rate is 0 and log(p / prevalence) is undefined; pass --prevalence with a "
                        "fraction, e.g. --prevalence 0.01.")
    return p


def parse_prevalence(value: str, finding: str, data: str | None = None) -> tuple[float, str]:
    """`--prevalence`: a fraction in (0, 1], or a retrain.py run folder whose training fold gives
    the rate of `finding`. Returns (prevalence, where it came from)."""
    try:
        p = float(value)
    except ValueError:
        config = Path(value) / "config.json"
        if not config.is_file():
            raise DataError(f"--prevalence {value}: neither a fraction in (0, 1] nor a run folder "
                            "written by retrain.py (no config.json there).") from None
        cfg = load_run_config(value, data)
        labels, _ = load_tables(cfg)
        table, findings = labels.frame, list(labels.findings)
        p = finding_prevalence(training_prevalence(table, findings), finding, str(config))
        return p, f"training fold of {config}"
    if not 0 < p <= 1:
        raise DataError(f"--prevalence {value}: a base rate is a fraction in (0, 1], e.g. "
                        "--prevalence 0.05.")
    return p, f"--prevalence {value}"


def checkpoint_prevalence(checkpoint: str | Path, config: dict, finding: str,
                          data: str | None = None) -> tuple[float, str]:
    """The rate of `finding` in the training fold of the data recorded in a retrain.py checkpoint
    (its `config`). Returns (prevalence, where it came from).

    Raises DataError when the checkpoint records no training data (e.g. one converted from
    reproduce-chexnet by convert_checkpoint.py): its base rates are then unknown here.
    """
    if not {"dataset", "data"} <= config.keys():
        raise DataError(f"{checkpoint}: records no training data (not written by retrain.py), so "
                        f"the base rate of {finding} is unknown; pass --prevalence RUN_DIR (a "
                        "retrain.py run folder) or a fraction, e.g. --prevalence 0.05.")
    cfg = config_from_record(config, data)
    labels, _ = load_tables(cfg)
    table, findings = labels.frame, list(labels.findings)
    source = f"{checkpoint}'s training data {cfg.data}"
    return finding_prevalence(training_prevalence(table, findings), finding, source), \
        f"training fold of {cfg.data}"


def positive_test_images(table: pd.DataFrame, label: str) -> list[str]:
    """Ids of the test-fold images whose ground truth for `label` is 1, in table order (the order
    of preds.csv): the images the reference's `show_next` steps through.

    Args:
        table: label table with columns `image_id`, `fold` and `label` (`run_tables`).
    """
    if label not in table.columns:
        names = [c for c in table.columns if c not in ("image_id", "patient", "fold", "path")]
        raise DataError(f"{label!r} is not a finding of the run's labels: {', '.join(names)}")
    test = table[table["fold"] == "test"]
    return test.loc[test[label] == 1, "image_id"].astype(str).tolist()


def probability_table(probs: Sequence[float], truth: Sequence[float], findings: Sequence[str]
                      ) -> pd.DataFrame:
    """The reference `show_next`'s table of one image: index `Finding`, columns `Predicted
    Probability` (rounded to 3 decimals) and `Ground Truth` (bool), most probable first.

    Args:
        probs: (K,) the model's probabilities (ordered by the unrounded values).
        truth: (K,) labels; 1 is True, 0 and NaN (masked) are False.
        findings: (K,) names.
    """
    probs = np.asarray(probs, dtype=np.float64)
    table = pd.DataFrame({"Predicted Probability": probs.round(3),
                          "Ground Truth": np.asarray(truth, dtype=np.float64) == 1},
                         index=pd.Index(list(findings), name="Finding"))
    return table.iloc[np.argsort(-probs, kind="stable")]


@dataclasses.dataclass
class ReferenceExample:
    """One `show_next` step: the figure, the 14-finding table, and the numbers drawn."""
    image_id: str
    figure: "Figure"
    table: pd.DataFrame              # `probability_table`
    log_odds: np.ndarray             # (h, w) `reference_log_odds_maps` grid
    prob: float                      # P(label) of the image
    prevalence: float                # the label's base rate used


def reference_examples(run_dir: str | Path, label: str, data: str | None = None,
                       prevalence: str | None = None) -> Iterator[ReferenceExample]:
    """The reference's `show_next` over a run: one ReferenceExample per test image positive for
    `label` (`positive_test_images` order), built lazily on each next(). The run, the label and
    the prevalence are checked now, so that mistakes surface before the first image.

    Args:
        run_dir: folder written by retrain.py (checkpoint.pt, config.json).
        label: the finding to map.
        data: dataset folder, if it moved since training.
        prevalence: `--prevalence` value; default the run's training fold.
    """
    run_dir = Path(run_dir)
    model, findings, size = _run_checkpoint(run_dir)
    if label not in findings:
        raise DataError(f"{label!r} is not a finding of {run_dir / 'checkpoint.pt'}: "
                        f"{', '.join(findings)}")
    _, table = run_tables(run_dir, data)
    p = _run_prevalence(run_dir, table, findings, label, prevalence, data)
    ids = positive_test_images(table, label)
    if not ids:
        raise DataError(f"{run_dir / 'config.json'}: no test-fold image is positive for {label}.")
    return _reference_steps(model, findings, size, table.set_index("image_id"), ids, label, p)


def _reference_steps(model: nn.Module, findings: list[str], size: int, table: pd.DataFrame,
                     ids: list[str], label: str, p: float) -> Iterator[ReferenceExample]:
    transform = build_transform(size)
    k = findings.index(label)
    for image_id in ids:
        x = transform(load_xray(table.at[image_id, "path"]))                 # (3, S, S)
        maps, probs = reference_log_odds_maps(model, x[None], k, p)
        fig = reference_figure(x, maps[0], label, float(probs[0, k]), image_id)
        truth = table.loc[image_id, findings].to_numpy(np.float64)
        yield ReferenceExample(image_id, fig, probability_table(probs[0], truth, findings),
                               maps[0], float(probs[0, k]), p)


def _run_checkpoint(run_dir: Path) -> tuple[nn.Module, list[str], int]:
    checkpoint = run_dir / "checkpoint.pt"
    if not checkpoint.is_file():
        raise DataError(f"{checkpoint}: not found; --run takes a folder written by retrain.py.")
    model, findings, size, _ = load_trained_model(checkpoint)
    return model, findings, size


def _run_prevalence(run_dir: Path, table: pd.DataFrame, findings: Sequence[str], label: str,
                    value: str | None, data: str | None) -> float:
    """`--prevalence` when given, else the label's rate in the run's training fold."""
    if value is not None:
        return parse_prevalence(value, label, data)[0]
    return finding_prevalence(training_prevalence(table, findings), label,
                              str(run_dir / "config.json"))


def true_findings(preds: pd.DataFrame, findings: Sequence[str]) -> list[list[str] | None]:
    """Per row of a preds.csv, the findings whose ground-truth column is 1 (None when the file
    has no ground-truth columns)."""
    if not all(f in preds.columns for f in findings):
        return [None] * len(preds)
    truth = preds[list(findings)].to_numpy(np.float64) == 1
    return [[f for f, on in zip(findings, row) if on] for row in truth]


def select_positives(preds: pd.DataFrame, label: str, top: int, threshold: float = 0.5
                     ) -> pd.DataFrame:
    """The `top` rows with the highest probability of `label` among those that are true
    positives (ground truth 1) or predicted positives (probability >= threshold)."""
    prob = preds[PROB_PREFIX + label]
    candidate = prob >= threshold
    if label in preds.columns:
        candidate |= preds[label] == 1
    return preds[candidate].sort_values(PROB_PREFIX + label, ascending=False,
                                        kind="stable").head(top)


def _check_method_style(method: str, style: str) -> None:
    if method not in METHODS:
        raise DataError(f"method {method!r}: expected one of {METHODS}")
    if style not in STYLES:
        raise DataError(f"style {style!r}: expected one of {STYLES}")
    if style == "reference" and method != "cam":
        raise DataError(f"--style reference draws the reference's CAM map; --method {method} "
                        "does not apply to it (drop --method, or use --style heatmap).")


def _gallery_boxes(boxes: str | Path | None, test: pd.DataFrame, ids: list[str], size: int,
                   dataset: str, label: str) -> dict[str, list[tuple[float, ...]]]:
    """image id -> the boxes of `label` on it, in the model's input pixels."""
    boxes_of: dict[str, list[tuple[float, ...]]] = {i: [] for i in ids}
    if boxes is not None:
        # localization.py imports this module, so its box reader is imported here, on use.
        boxed = localization.boxes_in_input_space(
            localization.read_boxes(boxes), test.loc[ids], size, dataset)
        for row in boxed[boxed["finding"] == label].itertuples():
            boxes_of[row.image_id].append((row.x0, row.y0, row.x1, row.y1))
    return boxes_of


def _gallery_maps(model: nn.Module, grays: list[Image.Image], size: int, k: int, method: str,
                  prevalence: float | None, batch_size: int) -> np.ndarray:
    """(N, S, S) heatmaps of `method`, or, with a prevalence (reference style), the (N, h, w)
    log-odds grids; computed `batch_size` images at a time."""
    transform = build_transform(size)
    maps = []
    for start in range(0, len(grays), batch_size):
        batch = torch.stack([transform(g) for g in grays[start:start + batch_size]])
        if prevalence is None:
            maps.append(heatmaps(model, batch, [k] * len(batch), method)[0])
        else:
            maps.append(reference_log_odds_maps(model, batch, k, prevalence)[0])
    return np.concatenate(maps)


def gallery_figure(run_dir: str | Path, label: str, top: int, method: str = "cam",
                   boxes: str | Path | None = None, data: str | None = None,
                   batch_size: int = 16, style: str = "heatmap",
                   prevalence: str | None = None) -> "Figure":
    """Build the gallery figure without saving it: one Axes per tile, nothing else (in the
    reference style, plus a last one: the colour bar).

    See `gallery`. Raises DataError when the run, the label or the images are unusable.
    """
    _check_method_style(method, style)
    if top < 1:
        raise DataError(f"--top {top}: must be at least 1")
    run_dir = Path(run_dir)
    model, findings, size = _run_checkpoint(run_dir)
    preds, id_col, pred_findings = read_preds(run_dir / "preds.csv")
    if label not in pred_findings:
        raise DataError(f"--label {label!r} is not a finding of {run_dir / 'preds.csv'}: "
                        f"{', '.join(pred_findings)}")
    chosen = select_positives(preds, label, top)
    if chosen.empty:
        raise DataError(f"{run_dir / 'preds.csv'}: no true or predicted positive of {label}.")
    cfg, table = run_tables(run_dir, data)
    test = table[table["fold"] == "test"].set_index("image_id")
    ids = chosen[id_col].astype(str).tolist()
    absent = [i for i in ids if i not in test.index]
    if absent:
        raise DataError(f"{run_dir / 'config.json'}: image {absent[0]} of preds.csv is not in "
                        "the test fold of the recorded dataset; pass --data with the dataset "
                        "the run was trained on.")
    p = (_run_prevalence(run_dir, table, findings, label, prevalence, data)
         if style == "reference" else None)
    boxes_of = _gallery_boxes(boxes, test, ids, size, cfg.dataset, label)
    grays = [load_xray(test.at[i, "path"]) for i in ids]
    maps = _gallery_maps(model, grays, size, findings.index(label), method, p, batch_size)
    probs = chosen[PROB_PREFIX + label].astype(float).tolist()
    truths = true_findings(chosen, pred_findings)
    title = (f"{run_dir.name}: {label}, "
             + ("log(P(region) / training prevalence)" if p else method.upper())
             + f", top {len(ids)} true-or-predicted positives of the test fold")
    return _gallery_grid(title, label, ids, grays, size, maps, probs, truths, boxes_of,
                         reference=p is not None)


def _gallery_grid(title: str, label: str, ids: list[str], grays: list[Image.Image], size: int,
                  maps: np.ndarray, probs: list[float], truths: list[list[str] | None],
                  boxes_of: dict[str, list], reference: bool) -> "Figure":
    """Draw the tiles (`overlay`, or `draw_log_odds_grid` + one colour bar when `reference`).

    Every caption (image id, probability, ground truth) is wrapped to its tile's width, and
    each row of tiles is given the height of its longest caption, so that no caption runs over
    a neighbour or off the figure, however many findings an image has.
    """
    plt = _pyplot()
    n = len(ids)
    cols = min(4, n)
    rows = math.ceil(n / cols)
    width = caption_width(TILE_INCHES - 0.3)
    heads = ([f"{i}: p = {p:.3f}" for i, p in zip(ids, probs)] if not reference else
             [f"{i}\nP({label})={p:.3f}" for i, p in zip(ids, probs)])
    captions = [caption(h, t, width) for h, t in zip(heads, truths)]
    fig_width = TILE_INCHES * cols + reference
    title = wrap_caption(title, caption_width(fig_width - 0.2, TITLE_FONTSIZE))
    row_heights = [max(text_height(c, CAPTION_FONTSIZE) for c in captions[r * cols:(r + 1) * cols])
                   + TILE_INCHES for r in range(rows)]
    height = sum(row_heights) + text_height(title, TITLE_FONTSIZE) + 0.2
    fig, axes = plt.subplots(rows, cols, figsize=(fig_width, height), squeeze=False,
                             layout="constrained")
    transform = build_transform(size)
    for t, ax in enumerate(axes.flat):
        if t >= n:
            fig.delaxes(ax)  # so that fig.axes holds exactly one Axes per tile
            continue
        if not reference:
            overlay(ax, model_view(grays[t], size), maps[t], label, probs[t], truths[t],
                    boxes_of[ids[t]], title=ids[t], wrap=width)
            continue
        mesh = draw_log_odds_grid(ax, denormalise(transform(grays[t])), maps[t],
                                  boxes_of[ids[t]], fontsize=6)
        ax.set_title(captions[t], fontsize=CAPTION_FONTSIZE)
    fig.suptitle(title, fontsize=TITLE_FONTSIZE)
    if reference:
        fig.colorbar(mesh, ax=axes.flat[:n], shrink=0.8, label="log(P(region) / prevalence)")
    return fig


def gallery(run_dir: str | Path, label: str, top: int, out: str | Path, method: str = "cam",
            boxes: str | Path | None = None, data: str | None = None, style: str = "heatmap",
            prevalence: str | None = None) -> Path:
    """Render the `top` most confident true-or-predicted positives of `label` in a run's test
    predictions into one grid PNG, each tile titled with image id, probability and ground truth.

    Args:
        run_dir: folder written by retrain.py (checkpoint.pt, preds.csv, config.json).
        label: finding to show.
        top: number of tiles (fewer when the run has fewer positives).
        out: PNG path.
        method: `cam` or `gradcam`.
        boxes: optional NIH-schema BBox_List CSV; a tile's box of `label` is drawn.
        data: dataset folder, if it moved since training.
        style: `heatmap` (smooth overlay) or `reference` (reproduce-chexnet's annotated grid).
        prevalence: reference style: `--prevalence` value; default the run's training fold.

    Returns:
        `out` as a Path.
    """
    fig = gallery_figure(run_dir, label, top, method, boxes, data, style=style,
                         prevalence=prevalence)
    out = Path(out)
    fig.savefig(out, dpi=100)
    _pyplot().close(fig)
    return out
