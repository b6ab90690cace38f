"""Convert CheXNet checkpoints from other projects into this project's format.

    python convert_checkpoint.py results/checkpoint pretrained/checkpoint.pt --trust-pickle
    python convert_checkpoint.py model.pth.tar pretrained/checkpoint.pt

Accepted inputs:
- reproduce-chexnet (`results/checkpoint`): `{'model': <pickled DenseNet-121>, 'best_loss',
  'epoch', 'rng_state', 'LR'}`. The model is a whole pickled torchvision DenseNet whose head is
  `Sequential(Linear(1024, 14), Sigmoid())`. Unpickling it runs code named inside the file, so
  it is refused unless `--trust-pickle` is given.
- arnoweng/CheXNet (`model.pth.tar`): `{'state_dict': ..., 'epoch', 'best_loss', 'optimizer'}`
  with keys like `module.densenet121.features.denseblock1.denselayer1.norm.1.weight`
  (DataParallel prefix, wrapper attribute, pre-0.4 torchvision layer names).
- a bare DenseNet-121 state dict, with or without the `module.` prefix, or this project's own
  `{'model': state_dict, ...}`.

The output is `{'model': state_dict, 'epoch': None, 'val_loss': None, 'config': {...},
'findings': [...]}`, the layout retrain.py writes; it loads with `torch.load(weights_only=True)`
and strictly into `model.build_model(14)`.

The reference heads end in a Sigmoid; this project's model returns logits and applies the
sigmoid only where probabilities are written (predict.py, eval_model.py). Dropping the Sigmoid
module therefore leaves every probability unchanged: `classifier.0.*` (the Linear inside the
Sequential) becomes `classifier.*` and the Sigmoid, which has no weights, disappears.

Loading is strict: every key of DenseNet-121 must be present with the right shape and nothing
may be left over. (arnoweng's checkpoint loaded with `strict=False` leaves the network random,
mean AUC 0.49.) The one exception is `num_batches_tracked`, a counter BatchNorm gained in
PyTorch 0.4.1 that older files lack; it only matters with `momentum=None`, and PyTorch itself
fills it with 0 when loading such files, as is done here.
"""
from __future__ import annotations

import argparse
import os
import pickle
import re
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import torch
from torch import nn

from chexnet.files import check_outputs
from chexnet.cli import CommandError, at_least, command
from chexnet.labels import findings_for
from chexnet.model import build_model, looks_like_torch_file
from chexnet.runs import atomic_torch_save

# Pre-0.4 torchvision named the layers of a dense layer `norm.1`, `relu.1`, `conv.1`, `norm.2`,
# `relu.2`, `conv.2`; today they are `norm1` ... `conv2`. (torchvision's own loader uses the
# same pattern when it reads its old ImageNet files.)
_OLD_DENSE_LAYER = re.compile(r"^(.*denselayer\d+\.(?:norm|relu|conv))\.([12])\.(.+)$")
# DataParallel's `module.` and arnoweng's wrapper attribute `densenet121.`.
_WRAPPER_PREFIXES = ("module.", "densenet121.")
_SHOW = 10  # keys listed per kind of mismatch


class ConversionError(CommandError, ValueError):
    """The input cannot be converted; the message names the file and what to do."""


@dataclass
class Source:
    """A state dict extracted from an input checkpoint, before key conversion."""
    state: dict[str, torch.Tensor]
    source_format: str                  # reproduce-chexnet | arnoweng-chexnet | state-dict
    epoch: int | None = None
    best_loss: float | None = None
    notes: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------
def read_source(path: str | os.PathLike, trust_pickle: bool = False) -> object:
    """`torch.load` the file on the CPU, with `weights_only=True` unless that is impossible.

    Args:
        path: the input checkpoint.
        trust_pickle: allow full unpickling (arbitrary code) when the safe loader refuses.

    Raises:
        ConversionError: missing file, not a torch file, corrupt file, or a pickle that needs
            `trust_pickle`.
    """
    path = Path(path)
    if not path.is_file():
        raise ConversionError(f"{path}: file not found.")
    if not looks_like_torch_file(path):
        raise ConversionError(f"{path}: not a PyTorch checkpoint (neither a torch.save zip "
                              "archive nor the legacy torch.save format).")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        # The safe loader met a class it will not import: a pickled model object.
        refused = err
    except (RuntimeError, EOFError, OSError, KeyError, ValueError) as err:
        raise ConversionError(f"{path}: cannot read this PyTorch file ({type(err).__name__}: "
                              f"{str(err)[:200]}). It is truncated or corrupt: copy it again."
                              ) from err
    if not trust_pickle:
        raise ConversionError(
            f"{path}: this checkpoint holds a pickled Python object (e.g. reproduce-chexnet's "
            f"whole model), not only tensors{_unsafe_globals(path)}. Unpickling it imports and "
            "runs code named inside the file, so a tampered file could run anything on this "
            "machine. Only if the file comes from a source you trust (e.g. your own "
            "reproduce-chexnet run), rerun with --trust-pickle. The converted output holds "
            "tensors only and loads safely with weights_only=True.") from refused
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except (ImportError, AttributeError) as err:
        raise ConversionError(f"{path}: the pickle refers to code that is not installed here "
                              f"({err}).") from err
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, KeyError,
            ValueError) as err:
        raise ConversionError(f"{path}: cannot read this PyTorch file ({type(err).__name__}: "
                              f"{str(err)[:200]}). It is truncated or corrupt.") from err


def _unsafe_globals(path: Path) -> str:
    """` (it would import: a, b, ...)` for a zip checkpoint, read without executing anything."""
    # Available from PyTorch 2.5 and only for zip checkpoints; the list is a courtesy.
    lister = getattr(torch.serialization, "get_unsafe_globals_in_checkpoint", None)
    if lister is None or not zipfile.is_zipfile(path):
        return ""
    try:
        names = sorted(lister(path))
    except (RuntimeError, ValueError, pickle.UnpicklingError):
        return ""
    shown = ", ".join(names[:6]) + (", ..." if len(names) > 6 else "")
    return f" (unpickling would import: {shown})" if names else ""


def extract_state_dict(obj: object, path: str | os.PathLike) -> Source:
    """Find the network's state dict in a loaded checkpoint and say which layout it had.

    Raises:
        ConversionError: no state dict in a known place.
    """
    if isinstance(obj, nn.Module):
        return Source(dict(obj.state_dict()), "pickled-model")
    if not isinstance(obj, Mapping):
        raise ConversionError(f"{Path(path)}: holds a {type(obj).__name__}, not a checkpoint "
                              "dict or a model.")
    epoch, best_loss = _number(obj.get("epoch"), int), _number(obj.get("best_loss"), float)
    model = obj.get("model")
    if isinstance(model, nn.Module):
        return Source(dict(model.state_dict()), "reproduce-chexnet", epoch, best_loss)
    if _is_state_dict(model):
        # This project's own layout (or something shaped like it): convert again harmlessly.
        return Source(dict(model), "state-dict", epoch, _number(obj.get("val_loss"), float))
    if _is_state_dict(obj.get("state_dict")):
        return Source(dict(obj["state_dict"]), "arnoweng-chexnet", epoch, best_loss)
    if _is_state_dict(obj):
        return Source(dict(obj), "state-dict")
    raise ConversionError(
        f"{Path(path)}: no model weights found. Expected reproduce-chexnet's {{'model': ...}}, "
        f"arnoweng/CheXNet's {{'state_dict': ...}} or a bare state dict; top-level keys: "
        f"{list(obj)[:_SHOW]}.")


def _is_state_dict(obj: object) -> bool:
    return (isinstance(obj, Mapping) and len(obj) > 0
            and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()))


def _number(value: object, kind: type) -> int | float | None:
    """A plain int/float from a Python number or a one-element tensor (old losses were tensors)."""
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    return kind(value) if isinstance(value, (int, float)) else None


# --------------------------------------------------------------------------------------------
# Key conversion
# --------------------------------------------------------------------------------------------
def convert_key(key: str) -> str:
    """One source key -> the torchvision DenseNet-121 key of this project's model.

    `module.densenet121.features.denseblock1.denselayer1.norm.1.weight`
        -> `features.denseblock1.denselayer1.norm1.weight`
    `module.densenet121.classifier.0.bias` -> `classifier.bias`
    """
    while key.startswith(_WRAPPER_PREFIXES):
        key = key.split(".", 1)[1]
    key = _OLD_DENSE_LAYER.sub(r"\1\2.\3", key)
    if key.startswith("classifier.0."):
        key = "classifier." + key[len("classifier.0."):]
    return key


def convert_keys(state: Mapping[str, torch.Tensor], path: str | os.PathLike
                 ) -> dict[str, torch.Tensor]:
    """Apply `convert_key` to every key; two source keys landing on one name is an error."""
    out: dict[str, torch.Tensor] = {}
    origin: dict[str, str] = {}
    for key, value in state.items():
        new = convert_key(key)
        if new in out:
            raise ConversionError(f"{Path(path)}: keys {origin[new]!r} and {key!r} both "
                                  f"convert to {new!r}.")
        out[new], origin[new] = value, key
    return out


def fill_num_batches_tracked(state: dict[str, torch.Tensor], expected: Mapping[str, torch.Tensor]
                             ) -> int:
    """Add `num_batches_tracked = 0` to BatchNorm layers saved before PyTorch 0.4.1.

    Only where the layer's `running_mean` is present, so a layer that is missing altogether
    is still reported as missing. Returns the number of counters added.
    """
    added = 0
    for key in expected:
        if key.endswith(".num_batches_tracked") and key not in state:
            layer = key[: -len("num_batches_tracked")]
            if layer + "running_mean" in state:
                state[key] = torch.tensor(0, dtype=torch.long)
                added += 1
    return added


def check_keys(state: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor],
               path: str | os.PathLike) -> None:
    """Raise unless `state` has exactly the keys and shapes of `expected`.

    Raises:
        ConversionError: listing up to 10 missing, unexpected and wrongly shaped keys each,
            with their counts.
    """
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [f"{k} {tuple(state[k].shape)} != {tuple(v.shape)}" for k, v in expected.items()
              if k in state and state[k].shape != v.shape]
    if not (missing or unexpected or shapes):
        return
    parts = [f"{Path(path)}: the weights do not match DenseNet-121 after key conversion "
             f"({len(state)} keys converted, {len(expected)} expected)."]
    for what, keys in (("missing", missing), ("unexpected", unexpected),
                       ("wrong shape", shapes)):
        if keys:
            more = f", ... ({len(keys) - _SHOW} more)" if len(keys) > _SHOW else ""
            parts.append(f"{len(keys)} {what}: {', '.join(keys[:_SHOW])}{more}")
    parts.append("Refusing to write a partly random model. Is this a DenseNet-121 CheXNet "
                 "checkpoint?")
    raise ConversionError("\n".join(parts))


def to_project_state(source: Source, path: str | os.PathLike, num_classes: int | None = None
                     ) -> tuple[dict[str, torch.Tensor], int]:
    """Converted, strictly checked state dict of `build_model(K)`, and K.

    Args:
        source: the extracted state dict.
        path: the input file, for messages.
        num_classes: expected K; by default inferred from `classifier.weight` (K, 1024).

    Returns:
        (state dict as `build_model(K).state_dict()` holds it, float32 on the CPU; K)
    """
    state = convert_keys(source.state, path)
    if num_classes is None:
        head = state.get("classifier.weight")
        num_classes = int(head.shape[0]) if head is not None and head.dim() == 2 else 14
    net = build_model(num_classes, "none")
    expected = net.state_dict()
    added = fill_num_batches_tracked(state, expected)
    if added:
        source.notes.append(f"set num_batches_tracked = 0 in {added} BatchNorm layers (the file "
                            "predates PyTorch 0.4.1)")
    check_keys(state, expected, path)
    net.load_state_dict(state, strict=True)
    return net.state_dict(), num_classes


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------
def convert(in_path: str | os.PathLike, out_path: str | os.PathLike, trust_pickle: bool = False,
            image_size: int = 224, dataset: str = "nih") -> tuple[dict, Source]:
    """Read IN, convert it, write OUT in this project's checkpoint format.

    Args:
        in_path: reproduce-chexnet, arnoweng/CheXNet or bare state-dict checkpoint.
        out_path: where to write; its folder is created.
        trust_pickle: allow unpickling a whole model (runs code from the file).
        image_size: input size S (pixels) the model was trained at; stored in the config and
            used by predict.py's preprocessing (both reference projects used 224).
        dataset: `nih` (14 findings) or `chexphoto` (13): the label order of the outputs.

    Returns:
        (the checkpoint dict written, the extracted source with its notes)

    Raises:
        ConversionError: see `read_source`, `extract_state_dict`, `check_keys`.
    """
    in_path, out_path = Path(in_path), Path(out_path)
    if out_path.exists() and out_path.resolve() == in_path.resolve():
        raise ConversionError(f"{out_path}: OUT is the input file; write the conversion "
                              "elsewhere so the original is kept.")
    findings = list(findings_for(dataset))
    source = extract_state_dict(read_source(in_path, trust_pickle), in_path)
    state, num_classes = to_project_state(source, in_path)
    if num_classes != len(findings):
        raise ConversionError(
            f"{in_path}: the classifier has {num_classes} outputs but {dataset} has "
            f"{len(findings)} findings. Pass --dataset chexphoto for a 13-output CheXphoto "
            "model, --dataset nih for a 14-output NIH model.")
    checkpoint = {
        "model": state, "epoch": None, "val_loss": None,
        "config": {"image_size": int(image_size), "dataset": dataset,
                   "converted_from": str(in_path), "source_format": source.source_format,
                   "source_epoch": source.epoch, "source_best_loss": source.best_loss},
        "findings": findings,
    }
    out_path.parent.mkdir(parents=True, exist_ok=True)
    atomic_torch_save(checkpoint, out_path)
    return checkpoint, source


@command
def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("input", metavar="IN", help="checkpoint to convert")
    p.add_argument("output", metavar="OUT", help="where to write the converted checkpoint")
    p.add_argument("--trust-pickle", action="store_true",
                   help="allow unpickling a whole pickled model (runs code from the file; only "
                        "for files from a source you trust)")
    p.add_argument("--image-size", type=at_least(32), default=224,
                   help="input size the model was trained at (default 224)")
    p.add_argument("--dataset", choices=("nih", "chexphoto"), default="nih",
                   help="label set of the outputs (default nih: 14 findings)")
    args = p.parse_args(argv)
    check_outputs({"OUT": args.output}, {"IN": args.input})
    checkpoint, source = convert(args.input, args.output, args.trust_pickle,
                                 args.image_size, args.dataset)
    n = len(checkpoint["findings"])
    loss = "?" if source.best_loss is None else f"{source.best_loss:.4g}"
    print(f"{args.input}: {source.source_format} checkpoint, DenseNet-121 with {n} outputs "
          f"(epoch {'?' if source.epoch is None else source.epoch}, best loss {loss})")
    for note in source.notes:
        print(f"note: {note}")
    print(f"wrote {args.output} (image size {args.image_size}; loads with weights_only=True)")
    return 0
