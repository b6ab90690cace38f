"""Class activation maps (CAM) of a trained DenseNet-121 over an X-ray.

    python visualize_prediction.py --checkpoint results/demo/checkpoint.pt \\
        --image data/demo/nih/images/00000003_000.png --label Cardiomegaly --out heatmap.png

CAM (Zhou et al. 2016, as used by CheXNet): the last dense block's feature maps F (C, h, w),
after the final ReLU, weighted by the classifier row of the finding: cam = sum_c w_c F_c. The
reference code computed this with a triple Python loop; here it is one tensor contraction.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.transforms import v2 as T

from cxr_dataset import DataError, build_transform, load_xray
from model import build_model


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


def load_trained(checkpoint: str | Path) -> tuple[nn.Module, list[str], int]:
    """Model, findings and image size of a checkpoint written by retrain.py."""
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    findings, config = state["findings"], state["config"]
    model = build_model(len(findings), "none")
    model.load_state_dict(state["model"])
    return model.eval(), findings, int(config["image_size"])


def render(image: np.ndarray, cam: np.ndarray, title: str, out: str | Path) -> None:
    """Save the X-ray with the CAM (upsampled to the image) overlaid."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="checkpoint.pt written by retrain.py")
    p.add_argument("--image", required=True, help="PNG or JPEG X-ray")
    p.add_argument("--label", help="finding to map (default: the most probable)")
    p.add_argument("--out", default="heatmap.png")
    args = p.parse_args(argv)
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
        cams, probs = class_activation_maps(model, x)
    k = findings.index(args.label) if args.label else int(probs[0].argmax())
    cam = F.interpolate(cams[:, k:k + 1], size=(size, size), mode="bilinear",
                        align_corners=False)[0, 0].numpy()
    shown = np.asarray(T.CenterCrop(size)(T.Resize(size)(gray)))  # what the model saw
    render(shown, cam, f"{findings[k]}: p = {probs[0, k]:.3f}", args.out)
    ranked = sorted(zip(findings, probs[0].tolist()), key=lambda t: -t[1])
    for name, prob in ranked:
        print(f"{name:20s} {prob:.3f}")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
