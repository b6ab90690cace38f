"""Heatmaps of a trained DenseNet-121 over X-rays: CAM or Grad-CAM, one image or a gallery.

    python visualize_prediction.py --checkpoint results/demo/checkpoint.pt \\
        --image data/demo/nih/images/00000003_000.png --label Cardiomegaly --out heatmap.png
    python visualize_prediction.py --run results/demo --label Cardiomegaly --top 12 \\
        --out gallery.png [--method gradcam] [--boxes data/demo/nih/BBox_List_2017.csv]

CAM (Zhou et al. 2016, as used by CheXNet): the last dense block's feature maps F (C, h, w),
after the final norm + ReLU, weighted by the classifier row of the finding: cam = sum_c w_c F_c.
The reference code computed this with a triple Python loop; here it is one tensor contraction.

Grad-CAM (Selvaraju et al. 2017): the same feature maps weighted by alpha_c, the spatial mean of
the gradient of the finding's logit with respect to F_c, then a ReLU. For DenseNet's global
average pool + linear head alpha_c = w_c / (h w), so Grad-CAM is ReLU(CAM) / (h w); it is
computed by autograd anyway, so that it stays right for any differentiable head.

Gallery mode renders the most confident true-or-predicted positives of a run's test
predictions (`preds.csv`) into one grid, with the probability and the ground truth per tile.
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torchvision.transforms import v2 as T

import retrain
from cxr_dataset import DataError, build_transform, load_xray
from eval_model import PROB_PREFIX, read_preds
from model import build_model

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

METHODS = ("cam", "gradcam")


# --------------------------------------------------------------------------------------------
# Heatmaps
# --------------------------------------------------------------------------------------------
def class_activation_maps(model: nn.Module, images: torch.Tensor) -> tuple[torch.Tensor,
                                                                           torch.Tensor]:
    """CAMs for every finding, and the probabilities.

    Args:
        model: torchvision DenseNet (`features` + linear `classifier`).
        images: (B, 3, S, S) normalised batch.

    Returns:
        (cams (B, K, h, w) in logit units, before upsampling; probabilities (B, K))
    """
    feats = F.relu(model.features(images))                          # (B, C, h, w)
    cams = torch.einsum("kc,bchw->bkhw", model.classifier.weight, feats)
    logits = model.classifier(feats.mean(dim=(2, 3)))               # == model(images)
    return cams, torch.sigmoid(logits)


def grad_cams(model: nn.Module, images: torch.Tensor, ks: Sequence[int] | torch.Tensor
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Grad-CAM of finding ks[b] for each image b, and the probabilities.

    The feature maps are computed without a graph and then made a leaf: the gradient of a
    logit with respect to them only involves the head, so the backbone's graph (most of the
    memory) is never built, and nothing is left attached to the model.

    Args:
        model: torchvision DenseNet (`features` + `classifier`), in eval mode.
        images: (B, 3, S, S) normalised batch.
        ks: (B,) output index to explain for each image.

    Returns:
        (maps (B, h, w), >= 0, in logit units per feature cell; probabilities (B, K))
    """
    ks = torch.as_tensor(ks, dtype=torch.long, device=images.device)
    with torch.no_grad():
        feats = F.relu(model.features(images))                      # (B, C, h, w)
    feats = feats.detach().requires_grad_(True)
    with torch.enable_grad():
        logits = model.classifier(feats.mean(dim=(2, 3)))           # (B, K)
        # Images are independent in eval mode, so one backward of the sum gives every
        # image's own gradient.
        chosen = logits.gather(1, ks[:, None]).sum()
        (grads,) = torch.autograd.grad(chosen, feats)               # (B, C, h, w)
    alpha = grads.mean(dim=(2, 3))                                  # (B, C)
    maps = F.relu(torch.einsum("bc,bchw->bhw", alpha, feats.detach()))
    return maps, torch.sigmoid(logits.detach())


def heatmaps(model: nn.Module, images: torch.Tensor, ks: Sequence[int] | torch.Tensor,
             method: str = "cam") -> tuple[np.ndarray, np.ndarray]:
    """Heatmaps of finding ks[b] over image b, upsampled (bilinear) to the input size.

    Args:
        model: DenseNet in eval mode (on any device; images are moved to it).
        images: (B, 3, S, S) normalised batch.
        ks: (B,) output index per image.
        method: `cam` (logit units, can be negative) or `gradcam` (>= 0).

    Returns:
        (maps (B, S, S) float32, probabilities (B, K) float32), numpy.
    """
    if method not in METHODS:
        raise ValueError(f"method {method!r}: expected one of {METHODS}")
    device = next(model.parameters()).device
    images = images.to(device)
    ks = torch.as_tensor(ks, dtype=torch.long, device=device)
    if method == "cam":
        with torch.inference_mode():
            cams, probs = class_activation_maps(model, images)
            maps = cams[torch.arange(len(ks), device=device), ks]   # (B, h, w)
    else:
        maps, probs = grad_cams(model, images, ks)
    with torch.inference_mode():
        up = F.interpolate(maps[:, None].float(), size=images.shape[-2:], mode="bilinear",
                           align_corners=False)[:, 0]
    return up.cpu().numpy(), probs.float().cpu().numpy()


def heatmap(model: nn.Module, image_tensor: torch.Tensor, k: int, method: str = "cam"
            ) -> np.ndarray:
    """Heatmap of output k over one image: (S, S) float32 numpy, bilinear-upsampled.

    Args:
        image_tensor: (3, S, S) normalised image (as `build_transform` returns it).
    """
    maps, _ = heatmaps(model, image_tensor[None], [k], method)
    return maps[0]


def load_trained(checkpoint: str | Path) -> tuple[nn.Module, list[str], int]:
    """Model, findings and image size of a checkpoint written by retrain.py."""
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    findings, config = state["findings"], state["config"]
    model = build_model(len(findings), "none")
    model.load_state_dict(state["model"])
    return model.eval(), findings, int(config["image_size"])


def model_view(gray: Image.Image, size: int) -> np.ndarray:
    """The image as the model saw it: Resize(S) + CenterCrop(S), (S, S) uint8."""
    return np.asarray(T.CenterCrop(size)(T.Resize(size, antialias=True)(gray)))


# --------------------------------------------------------------------------------------------
# Drawing
# --------------------------------------------------------------------------------------------
def _pyplot():
    import matplotlib
    matplotlib.use("Agg")  # files only: never needs a display
    import matplotlib.pyplot as plt
    return plt


def overlay(ax: "Axes", image: np.ndarray, heat: np.ndarray, finding: str, prob: float,
            truth: Sequence[str] | None = None, boxes: Sequence[Sequence[float]] = (),
            title: str | None = None) -> None:
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
    """
    from matplotlib.patches import Rectangle

    ax.imshow(image, cmap="gray")
    ax.imshow(heat, cmap="jet", alpha=0.4)
    lines = [f"{title or finding}: p = {prob:.3f}"]
    if truth is not None:
        lines.append("truth: " + (", ".join(truth) if truth else "No Finding"))
    ax.set_title("\n".join(lines), fontsize=8)
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


# --------------------------------------------------------------------------------------------
# Runs and galleries
# --------------------------------------------------------------------------------------------
def run_config(run_dir: str | Path, data: str | None = None) -> retrain.TrainConfig:
    """The TrainConfig of a run folder (see `retrain.load_run_config`)."""
    return retrain.load_run_config(run_dir, data)


def run_test_table(run_dir: str | Path, data: str | None = None
                   ) -> tuple[retrain.TrainConfig, pd.DataFrame]:
    """The run's config and its label table restricted to the test fold, indexed by image id
    (columns `patient, fold, path` and one per finding)."""
    cfg = run_config(run_dir, data)
    table, _, _ = retrain.load_tables(cfg)
    return cfg, table[table["fold"] == "test"].set_index("image_id")


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


def gallery_figure(run_dir: str | Path, label: str, top: int, method: str = "cam",
                   boxes: str | Path | None = None, data: str | None = None,
                   batch_size: int = 16) -> "Figure":
    """Build the gallery figure (one Axes per tile, nothing else) without saving it.

    See `gallery`. Raises DataError when the run, the label or the images are unusable.
    """
    if method not in METHODS:
        raise DataError(f"method {method!r}: expected one of {METHODS}")
    if top < 1:
        raise DataError(f"--top {top}: must be at least 1")
    run_dir = Path(run_dir)
    checkpoint = run_dir / "checkpoint.pt"
    if not checkpoint.is_file():
        raise DataError(f"{checkpoint}: not found; --run takes a folder written by retrain.py.")
    preds, id_col, pred_findings = read_preds(run_dir / "preds.csv")
    if label not in pred_findings:
        raise DataError(f"--label {label!r} is not a finding of {run_dir / 'preds.csv'}: "
                        f"{', '.join(pred_findings)}")
    model, findings, size = load_trained(checkpoint)
    k = findings.index(label)
    chosen = select_positives(preds, label, top)
    if chosen.empty:
        raise DataError(f"{run_dir / 'preds.csv'}: no true or predicted positive of {label}.")
    cfg, table = run_test_table(run_dir, data)
    ids = chosen[id_col].astype(str).tolist()
    absent = [i for i in ids if i not in table.index]
    if absent:
        raise DataError(f"{run_dir / 'config.json'}: image {absent[0]} of preds.csv is not in "
                        "the test fold of the recorded dataset; pass --data with the dataset "
                        "the run was trained on.")
    boxes_of: dict[str, list[tuple[float, float, float, float]]] = {i: [] for i in ids}
    if boxes is not None:
        # localization.py imports this module, so its box reader is imported here, on use.
        import localization
        boxed = localization.boxes_in_input_space(
            localization.read_boxes(boxes), table.loc[ids], size, cfg.dataset)
        for row in boxed[boxed["finding"] == label].itertuples():
            boxes_of[row.image_id].append((row.x0, row.y0, row.x1, row.y1))
    transform = build_transform(size, train=False)
    grays = [load_xray(table.at[i, "path"]) for i in ids]
    maps = []
    for start in range(0, len(ids), batch_size):
        batch = torch.stack([transform(g) for g in grays[start:start + batch_size]])
        maps.append(heatmaps(model, batch, [k] * len(batch), method)[0])
    maps_all = np.concatenate(maps)
    truths = true_findings(chosen, pred_findings)

    plt = _pyplot()
    n = len(ids)
    cols = min(4, n)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.5 * rows), squeeze=False)
    for t, ax in enumerate(axes.flat):
        if t >= n:
            fig.delaxes(ax)  # so that fig.axes holds exactly one Axes per tile
            continue
        overlay(ax, model_view(grays[t], size), maps_all[t], label,
                float(chosen[PROB_PREFIX + label].iloc[t]), truths[t], boxes_of[ids[t]],
                title=ids[t])
    fig.suptitle(f"{run_dir.name}: {label}, {method.upper()}, top {n} true-or-predicted "
                 "positives of the test fold", fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.45 / fig.get_figheight()))  # room for the suptitle
    return fig


def gallery(run_dir: str | Path, label: str, top: int, out: str | Path, method: str = "cam",
            boxes: str | Path | None = None, data: str | None = None) -> Path:
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

    Returns:
        `out` as a Path.
    """
    fig = gallery_figure(run_dir, label, top, method, boxes, data)
    out = Path(out)
    fig.savefig(out, dpi=100)
    _pyplot().close(fig)
    return out


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------
def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", help="checkpoint.pt written by retrain.py (one-image mode)")
    p.add_argument("--image", help="PNG or JPEG X-ray (one-image mode)")
    p.add_argument("--run", help="run folder (gallery mode): checkpoint.pt, preds.csv, config.json")
    p.add_argument("--label", help="finding to map (default in one-image mode: the most probable)")
    p.add_argument("--method", choices=METHODS, default="cam")
    p.add_argument("--top", type=int, default=12, help="gallery tiles")
    p.add_argument("--boxes", help="gallery: NIH-schema BBox_List CSV whose boxes are drawn")
    p.add_argument("--data", help="gallery: dataset folder, if it moved since training")
    p.add_argument("--out", default=None, help="PNG (default heatmap.png, gallery.png)")
    args = p.parse_args(argv)
    if args.run:
        if not args.label:
            print("error: gallery mode (--run) needs --label", file=sys.stderr)
            return 2
        try:
            out = gallery(args.run, args.label, args.top, args.out or "gallery.png",
                          args.method, args.boxes, args.data)
        except (DataError, FileNotFoundError) as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        print(f"wrote {out}")
        return 0
    if not (args.checkpoint and args.image):
        print("error: pass --checkpoint and --image (one image), or --run and --label "
              "(gallery)", file=sys.stderr)
        return 2
    try:
        model, findings, size = load_trained(args.checkpoint)
        if args.label and args.label not in findings:
            raise DataError(f"--label {args.label!r} is not a finding of this model: "
                            f"{', '.join(findings)}")
        gray = load_xray(args.image)
    except (DataError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    x = build_transform(size, train=False)(gray)[None]
    with torch.inference_mode():
        probs = torch.sigmoid(model(x))[0]
    k = findings.index(args.label) if args.label else int(probs.argmax())
    heat = heatmap(model, x[0], k, args.method)
    out = args.out or "heatmap.png"
    render(model_view(gray, size), heat, f"{findings[k]} ({args.method}): p = {probs[k]:.3f}",
           out)
    ranked = sorted(zip(findings, probs.tolist()), key=lambda t: -t[1])
    for name, prob in ranked:
        print(f"{name:20s} {prob:.3f}")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
