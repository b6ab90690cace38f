"""Predict the findings of chest X-rays (PNG, JPEG or DICOM) with a trained model.

    python predict.py scan1.png scan2.dcm --checkpoint results/nih_run/checkpoint.pt
    python predict.py scan.dcm --heatmap heatmaps/ --top 5

For each image, prints the findings sorted by probability. With --heatmap DIR, also writes a
class activation map (CAM) of the most probable finding per image, `DIR/<image>_<finding>.png`.

Preprocessing is exactly the dataset's: the file becomes an 8-bit greyscale image, then
`cxr_dataset.build_transform(S, train=False)` with the checkpoint's image size S. DICOM files
are turned into 8-bit greyscale the way a viewer shows them (see `load_dicom`).

Unreadable files (missing, corrupt, not an image, multi-frame or colour DICOM) are reported on
stderr with their name; the other images are still predicted, and the exit status is 2.
Checkpoints from reproduce-chexnet or arnoweng/CheXNet must first be converted with
convert_checkpoint.py.
"""
from __future__ import annotations

import argparse
import pickle
import re
import struct
import sys
from collections import abc
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torchvision.transforms import v2 as T

from convert_checkpoint import looks_like_torch_file
from cxr_dataset import DataError, ImageReadError, build_transform, load_xray
from visualize_prediction import class_activation_maps, load_trained, render

REPO_DIR = Path(__file__).resolve().parent
DEFAULT_CHECKPOINT = REPO_DIR / "pretrained" / "checkpoint.pt"
DICOM_SUFFIXES = (".dcm", ".dicom")
PYDICOM_PIN = "pydicom>=3.0,<4"


# --------------------------------------------------------------------------------------------
# Reading images
# --------------------------------------------------------------------------------------------
def is_dicom(path: str | Path) -> bool:
    """DICOM Part 10 files carry `DICM` after a 128-byte preamble; bare datasets exported
    without that header are recognised by their `.dcm` / `.dicom` suffix."""
    path = Path(path)
    if path.suffix.lower() in DICOM_SUFFIXES:
        return True
    with open(path, "rb") as f:
        head = f.read(132)
    return head[128:132] == b"DICM"


def load_any(path: str | Path) -> Image.Image:
    """Open a PNG, JPEG or DICOM X-ray as an 8-bit greyscale (mode L) image.

    Dispatches on content (the DICOM magic) or the `.dcm` suffix; everything else goes
    through `cxr_dataset.load_xray`, the loader training used.

    Raises:
        ImageReadError: missing, unreadable or unsupported file; the message names it.
    """
    path = Path(path)
    if not path.is_file():
        raise ImageReadError(f"{path}: file not found.")
    try:
        dicom = is_dicom(path)
    except OSError as err:
        raise ImageReadError(f"{path}: cannot open ({err.strerror}).") from err
    if dicom:
        return load_dicom(path)
    try:
        return load_xray(path)
    except ImageReadError as err:
        # load_xray's advice is about training (--missing skip); say what matters here.
        raise ImageReadError(f"{path}: not a readable PNG, JPEG or DICOM image "
                             f"({err.__cause__ or err}).") from err


def window_to_uint8(values: np.ndarray, center: float, width: float,
                    function: str = "LINEAR") -> np.ndarray:
    """Map a DICOM window onto 0-255: `center - width/2` -> 0, `center + width/2` -> 255.

    Args:
        values: pixel values in modality units (after Rescale Slope/Intercept), any shape.
        center: Window Center, same units.
        width: Window Width (> 0), same units.
        function: VOI LUT Function: `LINEAR` (also used for `LINEAR_EXACT`) clips to the
            window and scales linearly; `SIGMOID` is the standard's logistic curve.

    Returns:
        uint8 array of the same shape.
    """
    values = np.asarray(values, dtype=np.float64)
    if function.upper() == "SIGMOID":
        out = 255.0 / (1.0 + np.exp(-4.0 * (values - center) / width))
    else:
        low = center - width / 2.0
        out = (np.clip(values, low, low + width) - low) * (255.0 / width)
    return np.round(out).clip(0, 255).astype(np.uint8)


def minmax_to_uint8(values: np.ndarray) -> np.ndarray:
    """Stretch the image's own min-max range to 0-255, as `cxr_dataset.load_xray` does for
    16-bit PNGs (a constant image becomes black). Returns uint8, same shape."""
    values = np.asarray(values, dtype=np.float64)
    lo, hi = float(values.min()), float(values.max())
    if hi <= lo:
        return np.zeros(values.shape, dtype=np.uint8)
    return np.round((values - lo) * (255.0 / (hi - lo))).astype(np.uint8)


def load_dicom(path: str | Path) -> Image.Image:
    """Read a single-frame greyscale DICOM as an 8-bit mode-L image, bone bright.

    Steps, in the standard's order: stored values -> Modality LUT (Rescale Slope/Intercept,
    or a Modality LUT Sequence) -> the first Window Center/Width (VOI LUT Function honoured)
    -> 0-255. Without a window, a VOI LUT Sequence is applied and then stretched min-max;
    without either, the values are stretched min-max. MONOCHROME1 (low values shown white)
    is inverted so that the result looks like MONOCHROME2, as NIH PNGs do. The inversion
    negates values and window before the single rounding, so a MONOCHROME1 file gives the
    same 8-bit pixels as its MONOCHROME2 twin.

    Raises:
        ImageReadError: pydicom missing, unreadable file, no pixel data, multi-frame,
            colour, or compressed pixel data without a decoder. The message names the file.
    """
    path = Path(path)
    try:
        import pydicom
        from pydicom.errors import InvalidDicomError
        from pydicom.pixels import apply_modality_lut, apply_voi
    except ImportError as err:
        raise ImageReadError(f"{path}: reading DICOM needs pydicom: pip install "
                             f"'{PYDICOM_PIN}'.") from err
    # pydicom parses elements lazily, so a damaged file can fail at any attribute access:
    # all of it runs under one handler that names the file.
    parse_errors = (InvalidDicomError, OSError, EOFError, ValueError, KeyError, TypeError,
                    AttributeError, NotImplementedError, struct.error)
    try:
        with open(path, "rb") as f:
            has_header = f.read(132)[128:132] == b"DICM"
        # force: exports without the 128-byte preamble are still valid datasets.
        ds = pydicom.dcmread(path, force=not has_header)
        stored, photometric = _single_grey_frame(ds, path)
        values = apply_modality_lut(stored, ds).astype(np.float64)
        center, width = _first(ds.get("WindowCenter")), _first(ds.get("WindowWidth"))
        function = str(ds.get("VOILUTFunction", "LINEAR"))
        # Negating (instead of 255 - x after rounding) keeps MONOCHROME1 and 2 bit-identical.
        sign = -1.0 if photometric == "MONOCHROME1" else 1.0
        if center is not None and width is not None and width > 0:
            gray = window_to_uint8(sign * values, sign * center, width, function)
        else:
            if ds.get("VOILUTSequence"):
                values = apply_voi(np.round(values).astype(np.int64), ds).astype(np.float64)
            gray = minmax_to_uint8(sign * values)
    except ImageReadError:
        raise
    except parse_errors as err:
        raise ImageReadError(f"{path}: cannot read this DICOM file ({type(err).__name__}: "
                             f"{str(err)[:200]}). It is damaged or not DICOM.") from err
    return Image.fromarray(gray, mode="L")


def _single_grey_frame(ds: object, path: Path) -> tuple[np.ndarray, str]:
    """The stored pixel values (H, W) of a one-frame greyscale dataset, and its photometric
    interpretation; anything else is refused with ImageReadError."""
    if "PixelData" not in ds:
        raise ImageReadError(f"{path}: no image in this file (no DICOM Pixel Data); it is not "
                             "a DICOM image.")
    photometric = str(ds.get("PhotometricInterpretation", "")).strip().upper()
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    if samples != 1 or photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise ImageReadError(
            f"{path}: colour DICOM (Photometric Interpretation {photometric or '?'}, "
            f"{samples} samples per pixel); only greyscale MONOCHROME1/2 X-rays are supported.")
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames != 1:
        raise ImageReadError(f"{path}: multi-frame DICOM ({frames} frames); export the frame "
                             "to predict as a single-frame file.")
    try:
        stored = ds.pixel_array
    except (RuntimeError, NotImplementedError, ValueError, AttributeError) as err:
        syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
        hint = (" Compressed DICOM needs a decoder: pip install pylibjpeg pylibjpeg-libjpeg "
                "(or gdcm).") if getattr(syntax, "is_compressed", False) else ""
        raise ImageReadError(f"{path}: cannot decode the DICOM pixel data (transfer syntax "
                             f"{getattr(syntax, 'name', syntax)}: {err}).{hint}") from err
    if stored.ndim != 2:
        raise ImageReadError(f"{path}: DICOM pixel data has shape {stored.shape}; expected a "
                             "single greyscale frame.")
    return stored, photometric


def _first(value: object) -> float | None:
    """The first of a possibly multi-valued DICOM number (several windows may be listed)."""
    if value is None:
        return None
    if isinstance(value, abc.Sequence) and not isinstance(value, (str, bytes)):
        if len(value) == 0:
            return None
        value = value[0]
    return float(value)


# --------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------
def load_model(checkpoint: str | Path) -> tuple[nn.Module, list[str], int]:
    """Model (eval mode, CPU), findings and image size S of a project checkpoint.

    Raises:
        DataError: missing file, or not a checkpoint of this project (with what to do).
    """
    path = Path(checkpoint)
    if not path.is_file():
        raise DataError(f"{path}: checkpoint not found.")
    if not looks_like_torch_file(path):
        raise DataError(f"{path}: not a PyTorch checkpoint.")
    try:
        return load_trained(path)
    except pickle.UnpicklingError as err:
        raise DataError(f"{path}: a pickled model (reproduce-chexnet style), which is not loaded "
                        "directly because unpickling runs code from the file. Convert it once: "
                        f"python convert_checkpoint.py {path} pretrained/checkpoint.pt "
                        "--trust-pickle (only for files from a source you trust).") from err
    except (KeyError, TypeError, IndexError) as err:
        raise DataError(f"{path}: not a checkpoint of this project (expected the keys model, "
                        "config, findings as retrain.py writes them). Convert other CheXNet "
                        "checkpoints with convert_checkpoint.py.") from err
    except (RuntimeError, EOFError) as err:
        raise DataError(f"{path}: cannot load this checkpoint ({str(err)[:300]}).") from err


def preprocess(gray: Image.Image, image_size: int) -> torch.Tensor:
    """The evaluation transform of the dataset. Returns a (1, 3, S, S) normalised batch."""
    return build_transform(image_size, train=False)(gray)[None]


def predict_probs(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Probabilities sigmoid(model(images)): (B, 3, S, S) -> (B, K) in [0, 1]."""
    with torch.inference_mode():
        return torch.sigmoid(model(images))


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


def format_table(findings: Sequence[str], probs: Sequence[float], top: int | None = None) -> str:
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


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text}: expected a positive integer")
    return value


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("images", nargs="+", metavar="IMAGE", help="PNG, JPEG or DICOM files")
    p.add_argument("--checkpoint", help="checkpoint.pt written by retrain.py or "
                   "convert_checkpoint.py (default: pretrained/checkpoint.pt)")
    p.add_argument("--heatmap", metavar="DIR", help="write a CAM of the top finding per image")
    p.add_argument("--top", type=_positive_int, help="print only the K most probable findings")
    args = p.parse_args(argv)

    if args.checkpoint is None and not DEFAULT_CHECKPOINT.is_file():
        print(f"error: no model at {DEFAULT_CHECKPOINT}. Train one (python retrain.py ...; "
              "copy results/<name>/checkpoint.pt there) or pass --checkpoint PATH. Checkpoints "
              "from reproduce-chexnet or arnoweng/CheXNet: convert them first with "
              "convert_checkpoint.py.", file=sys.stderr)
        return 2
    try:
        model, findings, size = load_model(args.checkpoint or DEFAULT_CHECKPOINT)
    except DataError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    heat_dir = Path(args.heatmap) if args.heatmap else None
    if heat_dir is not None:
        heat_dir.mkdir(parents=True, exist_ok=True)

    failed, used = [], set()
    for name in args.images:
        try:
            gray = load_any(name)
        except ImageReadError as err:
            print(f"error: {err}", file=sys.stderr)
            failed.append(name)
            continue
        x = preprocess(gray, size)
        probs = predict_probs(model, x)[0].tolist()
        print(f"{name}\n{format_table(findings, probs, args.top)}")
        if heat_dir is not None:
            k = int(np.argmax(probs))
            out = heatmap_path(heat_dir, Path(name), findings[k], used)
            try:
                write_heatmap(model, x, gray, size, k, f"{findings[k]}: p = {probs[k]:.3f}", out)
            except OSError as err:
                print(f"error: {out}: cannot write the heatmap ({err.strerror or err}).",
                      file=sys.stderr)
                failed.append(name)
                continue
            print(f"  heatmap ({findings[k]}): {out}")
    if failed:
        print(f"{len(failed)} of {len(args.images)} images failed: "
              f"{', '.join(failed)}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
