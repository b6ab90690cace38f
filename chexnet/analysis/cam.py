"""Class activation maps of a trained DenseNet-121: CAM, Grad-CAM and reproduce-chexnet's
log-odds grid, computed as tensors; drawing them is chexnet/analysis/heatmaps.py's job.

CAM (Zhou et al. 2016, as used by CheXNet): the last dense block's feature maps F (C, h, w),
after the final norm + ReLU, weighted by the classifier row of the finding: cam = sum_c w_c F_c.
Grad-CAM (Selvaraju et al. 2017): the same maps weighted by the spatial mean of the gradient of
the finding's logit, then a ReLU.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import NamedTuple, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torchvision.transforms import v2 as T

from chexnet.model import CheckpointError, build_model, read_checkpoint

METHODS = ("cam", "gradcam")


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


def reference_log_odds_maps(model: nn.Module, images: torch.Tensor, k: int, prevalence: float
                            ) -> tuple[np.ndarray, np.ndarray]:
    """reproduce-chexnet's `calc_cam` map of finding k: log(sigmoid(CAM + b_k) / prevalence).

    The head is a linear map of the average pool, so a cell's CAM plus the bias is the logit the
    head would give if every cell's features were that cell's; its sigmoid is the
    reference's "local region probability", and dividing by the finding's base rate says how
    much more (> 0) or less (< 0) likely than baseline that region makes it, in log units.
    `class_activation_maps` already applies DenseNet's final ReLU (as the reference's
    `densenet_last_layer` does) and leaves the bias out; it is added here. log(sigmoid(z)) is
    computed as logsigmoid(z): the same value, but finite where sigmoid(z) underflows to 0.

    Args:
        model: torchvision DenseNet (`features` + linear `classifier` with a bias), eval mode.
        images: (B, 3, S, S) normalised batch (moved to the model's device).
        k: output index of the finding.
        prevalence: the finding's base rate, in (0, 1] (see `training_prevalence`).

    Returns:
        (maps (B, h, w) float32, h = w = 7 at S = 224; probabilities (B, K) float32), numpy.
    """
    if not 0 < prevalence <= 1:
        raise ValueError(f"prevalence {prevalence}: expected a base rate in (0, 1]")
    device = next(model.parameters()).device
    with torch.inference_mode():
        cams, probs = class_activation_maps(model, images.to(device))    # (B, K, h, w), (B, K)
        logits = cams[:, k] + model.classifier.bias[k]                   # (B, h, w)
        maps = F.logsigmoid(logits) - math.log(prevalence)
    return maps.float().cpu().numpy(), probs.float().cpu().numpy()


class TrainedModel(NamedTuple):
    """A retrain.py checkpoint, loaded for inference."""
    model: nn.Module        # DenseNet-121 in evaluation mode, on the CPU
    findings: list[str]     # its outputs, in order
    size: int               # the image size S it was trained at
    config: dict            # its recorded TrainConfig (config.json's contents)


def load_trained_model(checkpoint: str | Path) -> TrainedModel:
    """Model, findings, image size and recorded config of a retrain.py checkpoint.

    Raises:
        CheckpointError: missing, not a checkpoint, damaged, or not a DenseNet-121 of this
            project (named, with what to do).
    """
    state = read_checkpoint(checkpoint, ("model", "config", "findings"))
    findings, config = state["findings"], state["config"]
    try:
        model = build_model(len(findings), "none")
        model.load_state_dict(state["model"])
        size = int(config["image_size"])
    except (RuntimeError, KeyError, TypeError, ValueError) as err:
        detail = " ".join(str(err).split())[:200]  # torch's message spans lines: one line
        raise CheckpointError(f"{checkpoint}: not a DenseNet-121 checkpoint of this project "
                              f"({type(err).__name__}: {detail}). Convert other CheXNet "
                              "checkpoints with convert_checkpoint.py.") from None
    return TrainedModel(model.eval(), list(findings), size, config)


def model_view(gray: Image.Image, size: int) -> np.ndarray:
    """The image as the model saw it: Resize(S) + CenterCrop(S), (S, S) uint8."""
    return np.asarray(T.CenterCrop(size)(T.Resize(size, antialias=True)(gray)))


