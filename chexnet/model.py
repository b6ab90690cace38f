"""DenseNet-121 for multi-label chest X-ray classification (CheXNet).

The network returns logits; the loss is `BCEWithLogitsLoss` (masked where a label is missing)
and a sigmoid is applied only where probabilities are written. The reference code's
Sigmoid + BCELoss is numerically fragile and breaks under autocast.
"""
from __future__ import annotations

import os
import pickle
import urllib.error
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from chexnet.cli import CommandError

IMAGENET_WEIGHTS = torchvision.models.DenseNet121_Weights.IMAGENET1K_V1


class WeightsUnavailable(CommandError, RuntimeError):
    """Pretrained weights could not be obtained; the message says how to fix it."""


def imagenet_weights_path() -> Path:
    """Where torchvision looks for (and caches) the ImageNet DenseNet-121 file."""
    name = os.path.basename(IMAGENET_WEIGHTS.url)
    return Path(torch.hub.get_dir()) / "checkpoints" / name


def build_model(num_classes: int, weights: str = "none", memory_efficient: bool = False
                ) -> nn.Module:
    """torchvision DenseNet-121 with a `num_classes`-way linear head returning logits.

    Args:
        num_classes: 14 for NIH, 13 for CheXphoto.
        weights: `imagenet` (torchvision's ImageNet weights; downloaded once into the torch
            hub cache), `none` (random initialisation), or a path to a checkpoint written by
            this project or a plain DenseNet-121 state dict.
        memory_efficient: torchvision's checkpointed dense layers (less memory, ~20% slower).

    Raises:
        WeightsUnavailable: `imagenet` weights cannot be downloaded and are not cached.
    """
    if weights == "imagenet":
        try:
            net = torchvision.models.densenet121(weights=IMAGENET_WEIGHTS,
                                                 memory_efficient=memory_efficient)
        except (urllib.error.URLError, OSError) as err:
            raise WeightsUnavailable(
                f"Could not download the ImageNet DenseNet-121 weights ({err}).\n"
                f"Either download {IMAGENET_WEIGHTS.url}\n"
                f"on a machine with internet and place it at {imagenet_weights_path()}\n"
                "(set TORCH_HOME to use another cache folder), pass --weights PATH to a copy, "
                "or train from scratch with --weights none.") from err
    else:
        net = torchvision.models.densenet121(weights=None, memory_efficient=memory_efficient)
    net.classifier = nn.Linear(net.classifier.in_features, num_classes)
    if weights not in ("imagenet", "none"):
        load_weights_file(net, weights)
    return net


def load_weights_file(net: nn.Module, path: str | os.PathLike) -> None:
    """Load a state dict file into `net`, strictly.

    Accepts this project's checkpoints (`{'model': state_dict, ...}`) and bare DenseNet-121
    state dicts. A classifier of another size (e.g. ImageNet's 1000 classes) is not loaded and
    the new head keeps its initialisation; every other key must match exactly.

    Raises:
        FileNotFoundError: no such file.
        WeightsUnavailable: a pickled model (reproduce-chexnet), old key names
            (arnoweng/CheXNet), not a checkpoint, or missing or unexpected keys (listed):
            never a silently random model, and never advice to unpickle the file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: weights file not found (--weights takes imagenet, "
                                "none or a path).")
    state = _read_state(path)
    keys = [k for k in state if isinstance(k, str)] if isinstance(state, dict) else []
    if any(k.startswith(("module.", "densenet121.")) or ".norm.1" in k for k in keys):
        raise WeightsUnavailable(
            f"{path}: an arnoweng/CheXNet-style checkpoint (old DenseNet key names such as "
            f"{keys[0]!r}). Convert it once with\n  python convert_checkpoint.py {path} "
            "converted.pt\nand pass --weights converted.pt.")
    head = net.classifier
    if state.get("classifier.weight", head.weight).shape != head.weight.shape:
        state = {k: v for k, v in state.items() if not k.startswith("classifier.")}
        state.update({f"classifier.{k}": v for k, v in head.state_dict().items()})
    try:
        result = net.load_state_dict(state, strict=False)
    except RuntimeError as err:  # a tensor of another shape under a matching name
        raise WeightsUnavailable(
            f"{path}: does not match DenseNet-121 ({str(err)[-300:].strip()}). A checkpoint "
            "from reproduce-chexnet or arnoweng/CheXNet must first be converted with "
            "convert_checkpoint.py.") from None
    if result.missing_keys or result.unexpected_keys:
        raise WeightsUnavailable(
            f"{path}: does not match DenseNet-121. Missing keys: {result.missing_keys[:8]} "
            f"({len(result.missing_keys)}); unexpected keys: {result.unexpected_keys[:8]} "
            f"({len(result.unexpected_keys)}). A checkpoint from reproduce-chexnet or "
            "arnoweng/CheXNet must first be converted with convert_checkpoint.py.")


def _read_state(path: Path) -> dict:
    """The state dict in a weights file (this project's checkpoint, arnoweng/CheXNet's
    model.pth.tar, or a bare state dict), read by `read_checkpoint`: no code unpickled."""
    state = read_checkpoint(path, keys=(), error=WeightsUnavailable,
                            damaged_hint="--weights takes imagenet, none, or a checkpoint "
                            "written by retrain.py", convert_to="converted.pt",
                            then=", and pass --weights converted.pt")
    for key in ("model", "state_dict"):  # this project's checkpoints; arnoweng's model.pth.tar
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise WeightsUnavailable(f"{path}: holds a {type(state).__name__}, not a state dict.")
    return state


def masked_bce_with_logits(logits: torch.Tensor, target: torch.Tensor,
                           reduction: str = "mean") -> torch.Tensor:
    """Binary cross-entropy on logits, ignoring NaN targets (labels masked out of the loss).

    Args:
        logits: (B, K) raw outputs.
        target: (B, K) in {0, 1} or NaN.
        reduction: `mean` over the unmasked entries, or `sum`.

    With no NaN this equals `BCEWithLogitsLoss()`, i.e. the reference's mean over all entries.
    """
    mask = ~torch.isnan(target)
    loss = F.binary_cross_entropy_with_logits(
        logits.float(), torch.where(mask, target, 0.0).float(), reduction="none")
    total = (loss * mask).sum()
    if reduction == "sum":
        return total
    return total / mask.sum().clamp(min=1)


# --------------------------------------------------------------------------------------------
# The one reader of this project's checkpoints (checkpoint.pt, last.pt)
# --------------------------------------------------------------------------------------------
class CheckpointError(CommandError, ValueError):
    """A checkpoint file that is missing, not a checkpoint, damaged or of another kind; the
    message names the file and what to do."""


# The first bytes of a legacy (pre-1.6, non-zip) torch.save file: the pickled magic number
# 0x1950a86a20f9469cfc6c, protocol 2, as written by PyTorch 0.3/0.4 (both reference projects).
_LEGACY_TORCH_MAGIC = b"\x8a\x0al\xfc\x9cF\xf9 j\xa8P\x19"


def looks_like_torch_file(path: Path) -> bool:
    """True for a `torch.save` file: a zip archive (PyTorch >= 1.6) or the legacy pickle format.

    Checked before unpickling so that "not a checkpoint at all" and "a checkpoint that needs
    unsafe unpickling" get different messages (torch raises UnpicklingError for both).
    """
    with open(path, "rb") as f:
        head = f.read(16)
    # The local-file-header signature, not zipfile.is_zipfile: a truncated archive has lost
    # its central directory but is still a (corrupt) checkpoint, not some other file.
    return head.startswith(b"PK\x03\x04") or _LEGACY_TORCH_MAGIC in head


def read_checkpoint(path: str | os.PathLike, keys: tuple[str, ...] = ("model",),
                    damaged_hint: str = "copy it again, or retrain",
                    convert_to: str = "pretrained/checkpoint.pt", then: str = "",
                    error: type[CommandError] = CheckpointError) -> dict:
    """A checkpoint, loaded on the CPU without unpickling code: the one reader of every
    checkpoint a command is given (--checkpoint, --resume's last.pt, --weights).

    Args:
        keys: what the file must hold (retrain.py writes model, config, findings, ...).
        damaged_hint: what the user can do about a truncated or damaged file.
        convert_to, then: the conversion command's output for a pickled model, and what to do
            with it.
        error: the class raised (CheckpointError; --weights raises WeightsUnavailable).

    Raises:
        `error`: the file is missing, not a PyTorch file, a pickled model (another project's),
            truncated or damaged, or lacks `keys`.
    """
    path = Path(path)
    if not path.is_file():
        raise error(f"{path}: checkpoint not found"
                    f"{' (it is a folder)' if path.is_dir() else ''}.")
    if not looks_like_torch_file(path):
        raise error(f"{path}: not a PyTorch checkpoint (give checkpoint.pt or last.pt of a "
                    "retrain.py run).")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        # torch's own message advises weights_only=False, i.e. running the file's code: not
        # passed on. `from None`: that advice is not printed with this error either.
        raise error(
            f"{path}: a pickled model (reproduce-chexnet style), which is not loaded directly "
            "because unpickling runs code from the file. Convert it once: python "
            f"convert_checkpoint.py {path} {convert_to} --trust-pickle (only for files from a "
            f"source you trust){then}.") from None
    except (RuntimeError, EOFError, ValueError, OSError, KeyError) as err:
        raise error(f"{path}: cannot read this checkpoint; it is truncated or damaged "
                    f"({type(err).__name__}: {str(err)[:160]}). "
                    f"{damaged_hint[:1].upper()}{damaged_hint[1:]}.") from None
    missing = [k for k in keys if not isinstance(state, dict) or k not in state]
    if missing:
        raise error(f"{path}: not a checkpoint of this project (no {', '.join(missing)}; "
                    "retrain.py writes model, config and findings). Convert other CheXNet "
                    "checkpoints with convert_checkpoint.py.")
    return state
