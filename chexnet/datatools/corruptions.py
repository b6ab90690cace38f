"""Photo-like corruptions of X-rays: the one set of photo effects of the project.

CheXphoto exists because smartphone photos of X-rays (of a film or a monitor) differ from the
digital originals. The corruptions here imitate that, at severities 1-5, on a grey (mode L) image:
- perspective: keystone tilt of a photo taken off-axis (one edge farther from the camera);
- blur: Gaussian defocus / motion-free camera blur;
- glare: an additive bright radial blob (a light reflected by the film or screen);
- moire: the product of two slightly rotated sinusoidal gratings (screen pixels against
  sensor pixels), whose beat gives moire's broad bands;
- brightness_contrast: a washed-out or darkened exposure (contrast down, brightness shifted);
- jpeg: JPEG encode/decode at decreasing quality (phone compression, messaging apps).
Every corruption is a pure function of (image, kind, severity, rng). Severity 0 is the identity.
Magnitudes are set relative to the image size (a 1024 px NIH image and a 128 px demo image get
the same corruption after Resize), and the random draws (direction, position, phase) never depend
on the severity, so one rng seed gives one corruption growing with severity.

Each kind is a public primitive of the same name taking explicit magnitudes (`blur(arr, sigma)`,
`glare(arr, centre, radius, peak)`, ...), joined by gamma, noise, pixel_grid and colour_cast,
which no kind uses: the CheXphoto demo (chexnet/datatools/demo.py) chains them all into its photo
renditions, so each photo effect is written once, here.

How much a trained model's test AUC suffers from them is chexnet/analysis/robustness.py's job
(`python photo_corruptions.py`).
"""
from __future__ import annotations

import io
import math
import zlib
from typing import Sequence

import numpy as np
import torch
import torchvision.transforms.functional as TF
from PIL import Image
from torchvision.transforms import InterpolationMode


KINDS: tuple[str, ...] = ("perspective", "blur", "glare", "moire", "brightness_contrast", "jpeg")
SEVERITIES: tuple[int, ...] = (1, 2, 3, 4, 5)
CLEAN = "clean"
# Lengths below are in pixels of a 224 px image (the model's input) and scaled to the image at
# hand, so a corruption looks the same once the image is resized for the model.
REFERENCE_SIZE = 224
# Per severity 1..5:
TILT = (0.04, 0.08, 0.12, 0.17, 0.22)            # far-edge inset, fraction of the image side
BLUR_SIGMA = (0.7, 1.3, 2.0, 3.0, 4.5)           # Gaussian sigma, reference pixels
# ... but at least this many image pixels: a thinner blur vanishes in the rounding to 8 bits,
# and a small image (a pre-resized copy, a test image) must still be changed by each severity.
MIN_BLUR_SIGMA = (0.5, 0.65, 0.8, 0.95, 1.1)
GLARE_PEAK = (45.0, 80.0, 115.0, 150.0, 190.0)   # grey levels added at the blob centre
MOIRE_AMPLITUDE = (8.0, 15.0, 24.0, 34.0, 46.0)  # grey levels
MIN_MOIRE_PERIOD = 2.5                            # pixels: a finer grating aliases into noise
CONTRAST_STEP = 0.12                              # contrast is multiplied by 1 - step * s
BRIGHTNESS_STEP = 10.0                            # grey levels of shift per severity step
JPEG_QUALITY = (60, 35, 20, 12, 6)


# --------------------------------------------------------------------------------------------
# Corruptions
# --------------------------------------------------------------------------------------------
def corrupt(img: Image.Image, kind: str, severity: int, rng: np.random.Generator
            ) -> Image.Image:
    """Apply one photo-like corruption.

    Args:
        img: grey (mode L) image of any size.
        kind: one of KINDS.
        severity: 0 (identity) to 5.
        rng: random generator; the output is a function of (img, kind, severity, rng state).

    Returns:
        A new mode L image of the same size.

    Raises:
        ValueError: unknown kind, severity out of range, or an image that is not mode L.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown corruption {kind!r}: expected one of {KINDS}")
    if not isinstance(severity, (int, np.integer)) or not 0 <= severity <= 5:
        raise ValueError(f"severity {severity!r}: expected an integer 0 (identity) to 5")
    if img.mode != "L":
        raise ValueError(f"corrupt expects a grey (mode L) image, got mode {img.mode}; load "
                         "X-rays with data.load_xray")
    if severity == 0:
        return img.copy()
    return _CORRUPTIONS[kind](img, int(severity) - 1, rng)


# --------------------------------------------------------------------------------------------
# Primitives: one effect each, with explicit magnitudes (pixels, grey levels), no randomness of
# their own but noise's. The arithmetic ones take and return float (H, W) grey-level arrays,
# unrounded and unclipped, so they chain; perspective and jpeg take and return PIL images.
# corrupt() draws their magnitudes from a severity; the CheXphoto demo (chexnet/datatools/demo.py)
# draws
# its own and chains them into its photo renditions.
# --------------------------------------------------------------------------------------------
def perspective(img: Image.Image, startpoints: Sequence[Sequence[float]],
                endpoints: Sequence[Sequence[float]], fill: float = 0) -> Image.Image:
    """Warp a flat film or screen as a camera off its axis sees it: the image points
    `startpoints` ([x, y] pixels: top-left, top-right, bottom-right, bottom-left) move to
    `endpoints`. Bilinear; pixels mapped from outside the image get `fill`."""
    return TF.perspective(img, startpoints, endpoints,
                          interpolation=InterpolationMode.BILINEAR, fill=fill)


def blur(arr: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian blur (camera defocus); sigma in pixels, edges reflected."""
    # Reflect padding needs the kernel to be shorter than twice the image side.
    radius = min(int(math.ceil(3 * sigma)), min(arr.shape) - 1)
    tensor = torch.from_numpy(np.array(arr, np.float32))[None]
    return TF.gaussian_blur(tensor, [2 * radius + 1] * 2, [sigma, sigma])[0].numpy()


def glare(arr: np.ndarray, centre: tuple[float, float], radius: float, peak: float
          ) -> np.ndarray:
    """Add a bright radial Gaussian blob (a light reflected by the film or screen): `peak`
    grey levels at `centre` ([x, y] pixels), falling off with standard deviation `radius`."""
    x, y = _grid(arr.shape)
    cx, cy = centre
    blob = np.exp(-0.5 * ((x - cx) ** 2 + (y - cy) ** 2) / radius ** 2)
    return arr + peak * blob


def moire(arr: np.ndarray, angle: float, delta: float, period: float,
          phases: Sequence[float], amplitude: float) -> np.ndarray:
    """Add `amplitude` grey levels times the product of two sinusoidal gratings of `period`
    pixels, at `angle` and `angle + delta` radians, with the given two phases (screen pixels
    against sensor pixels): their beat, of period ~ period / delta, gives moire's broad bands."""
    x, y = _grid(arr.shape)
    g1, g2 = (np.cos(2 * math.pi * (x * math.cos(t) + y * math.sin(t)) / period + p)
              for t, p in zip((angle, angle + delta), phases))
    # The product of the screen's grating and the sensor's, as in a photographed monitor:
    # cos a cos b = (cos(a - b) + cos(a + b)) / 2 holds the broad, low-frequency bands of
    # moire, which survive the Resize to the model's input where the fine gratings do not.
    return arr + amplitude * g1 * g2


def brightness_contrast(arr: np.ndarray, contrast: float, brightness: float, pivot: float
                        ) -> np.ndarray:
    """Multiply the contrast about the grey level `pivot` by `contrast`, then add `brightness`
    grey levels: a washed-out, dark or flat exposure."""
    return (arr - pivot) * contrast + pivot + brightness


def gamma(arr: np.ndarray, exponent: float) -> np.ndarray:
    """Raise grey levels (clipped to 0-255, as fractions of 255) to `exponent`: a camera's
    tone curve, darkening mid-tones above 1 and brightening them below."""
    return 255.0 * (np.clip(arr, 0.0, 255.0) / 255.0) ** exponent


def noise(arr: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
    """Add white Gaussian sensor noise of standard deviation `sigma` grey levels."""
    return arr + sigma * rng.standard_normal(np.shape(arr))


def pixel_grid(arr: np.ndarray, pitch: int, depth: float) -> np.ndarray:
    """Darken every `pitch`-th pixel column by `depth` grey levels: the dark gaps between a
    photographed monitor's pixel columns."""
    return arr - depth * ((np.arange(np.shape(arr)[1]) % pitch) == 0)[None, :]


def colour_cast(arr: np.ndarray, gains: Sequence[float]) -> np.ndarray:
    """Grey (H, W) -> colour (H, W, 3) with each channel scaled by its gain (red, green, blue):
    a white balance off for the light in the room."""
    return np.asarray(arr)[..., None] * np.asarray(gains, np.float32)


def jpeg(img: Image.Image, quality: int) -> Image.Image:
    """JPEG encode and decode a grey image at `quality` (1-95): phone or messaging-app
    compression."""
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    buf.seek(0)
    with Image.open(buf) as decoded:
        return decoded.convert("L")


# --------------------------------------------------------------------------------------------
# Severities: each kind's primitive, its magnitude set by the severity and its random draws
# (direction, position, phase) taken from rng in a fixed order that does not depend on it.
# --------------------------------------------------------------------------------------------
def _scale(img: Image.Image) -> float:
    """Image pixels per reference pixel."""
    return min(img.size) / REFERENCE_SIZE


def _to_image(arr: np.ndarray) -> Image.Image:
    return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), mode="L")


def _grid(shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """(H, W) x and y pixel-centre coordinates of an image of this (H, W) shape."""
    h, w = shape[:2]
    return np.meshgrid(np.arange(w) + 0.5, np.arange(h) + 0.5)


def _perspective_at(img: Image.Image, s: int, rng: np.random.Generator) -> Image.Image:
    w, h = img.size
    far_edge = int(rng.integers(4))         # top, right, bottom, left: farther from the camera
    skew = float(rng.uniform(-0.25, 0.25))  # the far edge also slides sideways a little
    d = TILT[s] * min(w, h)
    tl, tr, br, bl = [0, 0], [w - 1, 0], [w - 1, h - 1], [0, h - 1]
    start = [tl, tr, br, bl]
    end = [list(p) for p in start]
    # The two corners of the far edge move towards each other (keystone) and inwards.
    a, b = [(0, 1), (1, 2), (2, 3), (3, 0)][far_edge]
    along = np.subtract(start[b], start[a], dtype=np.float64)
    along /= np.linalg.norm(along)
    inward = np.array([-along[1], along[0]])  # corners run clockwise, so this points inside
    for idx, sign in ((a, 1.0), (b, -1.0)):
        end[idx] = (np.array(start[idx]) + sign * d * along + 0.5 * d * inward
                    + skew * d * along).tolist()
    return perspective(img, start, end)


def _blur_at(img: Image.Image, s: int, rng: np.random.Generator) -> Image.Image:
    sigma = max(BLUR_SIGMA[s] * _scale(img), MIN_BLUR_SIGMA[s])
    return _to_image(blur(np.asarray(img, np.float32), sigma))


def _glare_at(img: Image.Image, s: int, rng: np.random.Generator) -> Image.Image:
    w, h = img.size
    centre = (rng.uniform(0.25, 0.75) * w, rng.uniform(0.2, 0.7) * h)
    radius = rng.uniform(0.15, 0.3) * min(w, h)
    return _to_image(glare(np.asarray(img, np.float64), centre, radius, GLARE_PEAK[s]))


def _moire_at(img: Image.Image, s: int, rng: np.random.Generator) -> Image.Image:
    angle = rng.uniform(0, math.pi)
    delta = rng.uniform(0.04, 0.12)      # rotation between the two gratings: sets the beat
    period = rng.uniform(3.0, 5.0) * _scale(img)
    period = max(period, MIN_MOIRE_PERIOD)
    phases = rng.uniform(0, 2 * math.pi, 2)
    return _to_image(moire(np.asarray(img, np.float64), angle, delta, period, phases,
                           MOIRE_AMPLITUDE[s]))


def _brightness_contrast_at(img: Image.Image, s: int, rng: np.random.Generator) -> Image.Image:
    sign = 1.0 if rng.random() < 0.5 else -1.0  # washed out or underexposed
    arr = np.asarray(img, np.float64)
    step = s + 1
    # Both terms grow linearly with the severity, so the change does too (until clipping).
    return _to_image(brightness_contrast(arr, 1 - CONTRAST_STEP * step,
                                         sign * BRIGHTNESS_STEP * step, arr.mean()))


def _jpeg_at(img: Image.Image, s: int, rng: np.random.Generator) -> Image.Image:
    return jpeg(img, JPEG_QUALITY[s])


_CORRUPTIONS = {"perspective": _perspective_at, "blur": _blur_at, "glare": _glare_at,
                "moire": _moire_at, "brightness_contrast": _brightness_contrast_at,
                "jpeg": _jpeg_at}


# --------------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------------
def image_rng(seed: int, kind: str, severity: int, image_id: str) -> np.random.Generator:
    """The generator for one image's corruption: depends only on (seed, kind, severity, id),
    so results do not depend on batch order, loader workers or which subset is scored."""
    return np.random.default_rng([seed, KINDS.index(kind), severity,
                                  zlib.crc32(image_id.encode())])
