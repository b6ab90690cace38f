"""Reading any X-ray file as an 8-bit grey image: PNG and JPEG through `data.load_xray`
(the loader training uses), DICOM rendered the way a viewer shows it (rescale, windowing,
MONOCHROME1 inverted). Used by predict.py and visualize_prediction.py.
"""
from __future__ import annotations

import struct
from collections import abc
from pathlib import Path

import numpy as np
from PIL import Image

from chexnet.data import ImageReadError, load_xray

DICOM_SUFFIXES = (".dcm", ".dicom")
PYDICOM_PIN = "pydicom>=3.0,<4"


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
    through `data.load_xray`, the loader training used.

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
    """Stretch the image's own min-max range to 0-255, as `data.load_xray` does for
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
# Inputs
