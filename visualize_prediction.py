"""Heatmaps of a trained DenseNet-121 over X-rays: CAM or Grad-CAM, one image or a gallery.

    python visualize_prediction.py --checkpoint results/demo/checkpoint.pt \\
        --image data/demo/nih/images/00000003_000.png --label Cardiomegaly --out heatmap.png
    python visualize_prediction.py --run results/demo --label Cardiomegaly --top 12 \\
        --out gallery.png [--method gradcam] [--boxes data/demo/nih/BBox_List_2017.csv]
    python visualize_prediction.py --style reference --checkpoint results/demo/checkpoint.pt \\
        --image data/demo/nih/images/00000003_000.png --label Cardiomegaly [--prevalence 0.05]

CAM (Zhou et al. 2016, as used by CheXNet): the last dense block's feature maps F (C, h, w),
after the final norm + ReLU, weighted by the classifier row of the finding: cam = sum_c w_c F_c.
The reference code computed this with a triple Python loop; here it is one tensor contraction.

Grad-CAM (Selvaraju et al. 2017): the same feature maps weighted by alpha_c, the spatial mean of
the gradient of the finding's logit with respect to F_c, then a ReLU. For DenseNet's global
average pool + linear head alpha_c = w_c / (h w), so Grad-CAM is ReLU(CAM) / (h w); it is
computed by autograd anyway, so that it stays right for any differentiable head.

Gallery mode renders the most confident true-or-predicted positives of a run's test
predictions (`preds.csv`) into one grid, with the probability and the ground truth per tile.

`--style reference` draws reproduce-chexnet's own picture instead (its `calc_cam` + `show_next`):
per feature cell, log(sigmoid(CAM + bias) / prevalence), i.e. the log of how much more likely
than the finding's base rate the head would call the finding if every cell's features were this
cell's; as a 7x7 grid (at 224 px) with each cell's value written in it, on a fixed -5..5
viridis scale, over the input image. The prevalence is the finding's rate in the run's TRAINING
fold (the reference hard-coded its own), or `--prevalence` (a fraction, or a run folder). In
one-image mode the default is the training data recorded in the checkpoint (retrain.py stores
its config there); a checkpoint without one needs `--prevalence`.
"""
from __future__ import annotations

import chexnet.idle_threads  # noqa: F401  (first, before torch loads: idle threads sleep)

import argparse
import sys
from pathlib import Path
from typing import Sequence

import torch

from chexnet.files import check_outputs, run_files
from chexnet.cli import at_least, command
from chexnet.data import DataError, build_transform
from chexnet.analysis.cam import (
    METHODS, heatmap, load_trained_model, model_view, reference_log_odds_maps,
)
from chexnet.analysis.heatmaps import (
    STYLES, _check_method_style, _pyplot, checkpoint_prevalence, gallery, parse_prevalence,
    reference_figure, render,
)
from chexnet.xray_io import load_any


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------
@command
def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", help="checkpoint.pt written by retrain.py (one-image mode)")
    p.add_argument("--image", help="PNG or JPEG X-ray (one-image mode)")
    p.add_argument("--run", help="run folder (gallery mode): checkpoint.pt, preds.csv, config.json")
    p.add_argument("--label", help="finding to map (default in one-image mode: the most probable)")
    p.add_argument("--method", choices=METHODS, default=None, help="heatmap style (default cam)")
    p.add_argument("--style", choices=STYLES, default="heatmap",
                   help="heatmap: smooth overlay; reference: reproduce-chexnet's annotated "
                        "log(P(region) / prevalence) grid on a fixed -5..5 scale")
    p.add_argument("--prevalence",
                   help="reference style: the finding's base rate, a fraction in (0, 1] or a run "
                        "folder whose training fold gives it (default: the training fold of the "
                        "run, or of the data recorded in the checkpoint)")
    p.add_argument("--top", type=at_least(1), default=12, help="gallery tiles")
    p.add_argument("--boxes", help="gallery: NIH-schema BBox_List CSV whose boxes are drawn")
    p.add_argument("--data", help="dataset folder, if it moved since training")
    p.add_argument("--out", default=None, help="PNG (default heatmap.png, gallery.png)")
    args = p.parse_args(argv)
    check_outputs({"--out": args.out or ("gallery.png" if args.run else "heatmap.png")},
                  {"--checkpoint": args.checkpoint, "--image": args.image, "--boxes": args.boxes,
                   **run_files(args.run)})
    _check_method_style(args.method or "cam", args.style)
    if args.prevalence is not None and args.style != "reference":
        raise DataError("--prevalence only applies to --style reference.")
    args.method = args.method or "cam"
    if args.run:
        return _gallery_main(args)
    if not (args.checkpoint and args.image):
        print("error: pass --checkpoint and --image (one image), or --run and --label "
              "(gallery)", file=sys.stderr)
        return 2
    return _one_image_main(args)


def _gallery_main(args: argparse.Namespace) -> int:
    if not args.label:
        print("error: gallery mode (--run) needs --label", file=sys.stderr)
        return 2
    out = gallery(args.run, args.label, args.top, args.out or "gallery.png", args.method,
                  args.boxes, args.data, args.style, args.prevalence)
    print(f"wrote {out}")
    return 0


def _one_image_main(args: argparse.Namespace) -> int:
    model, findings, size, config = load_trained_model(args.checkpoint)
    if args.label and args.label not in findings:
        raise DataError(f"--label {args.label!r} is not a finding of this model: "
                        f"{', '.join(findings)}")
    gray = load_any(args.image)  # PNG, JPEG or DICOM, as predict.py reads them
    x = build_transform(size)(gray)[None]
    with torch.inference_mode():
        probs = torch.sigmoid(model(x))[0]
    k = findings.index(args.label) if args.label else int(probs.argmax())
    if args.style == "reference":
        prevalence, source = (
            parse_prevalence(args.prevalence, findings[k], args.data) if args.prevalence
            else checkpoint_prevalence(args.checkpoint, config, findings[k], args.data))
    out = args.out or "heatmap.png"
    if args.style == "reference":
        grid, _ = reference_log_odds_maps(model, x, k, prevalence)
        fig = reference_figure(x[0], grid[0], findings[k], float(probs[k]), Path(args.image).name)
        fig.savefig(out, dpi=100)
        _pyplot().close(fig)
        print(f"prevalence of {findings[k]}: {prevalence:.4f} ({source})")
    else:
        heat = heatmap(model, x[0], k, args.method)
        render(model_view(gray, size), heat,
               f"{findings[k]} ({args.method}): p = {probs[k]:.3f}", out)
    ranked = sorted(zip(findings, probs.tolist()), key=lambda t: -t[1])
    for name, prob in ranked:
        print(f"{name:20s} {prob:.3f}")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
