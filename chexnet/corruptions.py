"""Photo-like corruptions of X-rays, and how much a trained model's test AUC suffers from them.

    python photo_corruptions.py --run results/NAME [--kinds blur jpeg ...] \\
        [--severities 1 3 5] --out robustness.csv [--plot robustness.png]

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

The evaluation re-scores a run's checkpoint on its test fold with each corruption applied to the
image before the standard Resize + CenterCrop + normalisation, and writes, per corruption and
severity, each finding's AUC, the clean AUC and the drop, plus a `mean` row.
"""
from __future__ import annotations

import argparse
import io
import math
import sys
import zlib
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
import torch
import torchvision.transforms.functional as TF
from PIL import Image
from torch.utils.data import DataLoader
from torchvision.transforms import InterpolationMode

from chexnet import train as training
from chexnet import cam
from chexnet import heatmaps as vp
from chexnet.data import CXRDataset, DataError, build_transform, load_xray
from chexnet.scoring import per_label_auc

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
                         "X-rays with cxr_dataset.load_xray")
    if severity == 0:
        return img.copy()
    return _CORRUPTIONS[kind](img, int(severity) - 1, rng)


def _scale(img: Image.Image) -> float:
    """Image pixels per reference pixel."""
    return min(img.size) / REFERENCE_SIZE


def _to_image(arr: np.ndarray) -> Image.Image:
    return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), mode="L")


def _grid(img: Image.Image) -> tuple[np.ndarray, np.ndarray]:
    """(H, W) x and y pixel-centre coordinates."""
    w, h = img.size
    return np.meshgrid(np.arange(w) + 0.5, np.arange(h) + 0.5)


def _perspective(img: Image.Image, s: int, rng: np.random.Generator) -> Image.Image:
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
    return TF.perspective(img, start, end, interpolation=InterpolationMode.BILINEAR, fill=0)


def _blur(img: Image.Image, s: int, rng: np.random.Generator) -> Image.Image:
    sigma = max(BLUR_SIGMA[s] * _scale(img), MIN_BLUR_SIGMA[s])
    # Reflect padding needs the kernel to be shorter than twice the image side.
    radius = min(int(math.ceil(3 * sigma)), min(img.size) - 1)
    return TF.gaussian_blur(img, [2 * radius + 1] * 2, [sigma, sigma])


def _glare(img: Image.Image, s: int, rng: np.random.Generator) -> Image.Image:
    w, h = img.size
    cx, cy = rng.uniform(0.25, 0.75) * w, rng.uniform(0.2, 0.7) * h
    radius = rng.uniform(0.15, 0.3) * min(w, h)
    x, y = _grid(img)
    blob = np.exp(-0.5 * ((x - cx) ** 2 + (y - cy) ** 2) / radius ** 2)
    return _to_image(np.asarray(img, np.float64) + GLARE_PEAK[s] * blob)


def _moire(img: Image.Image, s: int, rng: np.random.Generator) -> Image.Image:
    angle = rng.uniform(0, math.pi)
    delta = rng.uniform(0.04, 0.12)      # rotation between the two gratings: sets the beat
    period = rng.uniform(3.0, 5.0) * _scale(img)
    period = max(period, 2.5)            # below ~2 px a grating is aliased into noise
    phases = rng.uniform(0, 2 * math.pi, 2)
    x, y = _grid(img)
    g1, g2 = (np.cos(2 * math.pi * (x * math.cos(t) + y * math.sin(t)) / period + p)
              for t, p in zip((angle, angle + delta), phases))
    # The product of the screen's grating and the sensor's, as in a photographed monitor:
    # cos a cos b = (cos(a - b) + cos(a + b)) / 2 holds the broad, low-frequency bands of
    # moire (period ~ period / delta), which survive the Resize to the model's input where
    # the fine gratings themselves do not.
    return _to_image(np.asarray(img, np.float64) + MOIRE_AMPLITUDE[s] * g1 * g2)


def _brightness_contrast(img: Image.Image, s: int, rng: np.random.Generator) -> Image.Image:
    sign = 1.0 if rng.random() < 0.5 else -1.0  # washed out or underexposed
    arr = np.asarray(img, np.float64)
    mean = arr.mean()
    step = s + 1
    # Both terms grow linearly with the severity, so the change does too (until clipping).
    return _to_image((arr - mean) * (1 - CONTRAST_STEP * step) + mean
                     + sign * BRIGHTNESS_STEP * step)


def _jpeg(img: Image.Image, s: int, rng: np.random.Generator) -> Image.Image:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=JPEG_QUALITY[s])
    buf.seek(0)
    with Image.open(buf) as decoded:
        return decoded.convert("L")


_CORRUPTIONS = {"perspective": _perspective, "blur": _blur, "glare": _glare, "moire": _moire,
                "brightness_contrast": _brightness_contrast, "jpeg": _jpeg}


# --------------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------------
def image_rng(seed: int, kind: str, severity: int, image_id: str) -> np.random.Generator:
    """The generator for one image's corruption: depends only on (seed, kind, severity, id),
    so results do not depend on batch order, loader workers or which subset is scored."""
    return np.random.default_rng([seed, KINDS.index(kind), severity,
                                  zlib.crc32(image_id.encode())])


class CorruptedDataset(CXRDataset):
    """A CXRDataset whose images are corrupted (as PIL L) before the transform."""

    def __init__(self, base: CXRDataset, kind: str, severity: int, seed: int = 0):
        super().__init__(base.paths, base.targets.numpy(), base.image_ids, base.findings,
                         base.transform)
        if kind != CLEAN and kind not in KINDS:
            raise ValueError(f"unknown corruption {kind!r}: expected one of {KINDS}")
        self.kind, self.severity, self.seed = kind, severity, seed

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, str]:
        gray = load_xray(self.paths[i])
        if self.kind != CLEAN:
            gray = corrupt(gray, self.kind, self.severity,
                           image_rng(self.seed, self.kind, self.severity, self.image_ids[i]))
        return self.transform(gray), self.targets[i], self.image_ids[i]


def robustness(run_dir: str | Path, kinds: Sequence[str] = KINDS,
               severities: Sequence[int] = (1, 3, 5), seed: int = 0, device: str = "auto",
               max_images: int | None = None, data: str | None = None, workers: int = 0,
               batch_size: int = 64) -> pd.DataFrame:
    """AUCs of a run's checkpoint on its test fold, clean and under each corruption.

    Args:
        run_dir: folder written by retrain.py.
        kinds: corruptions (KINDS).
        severities: severities 1-5 to apply.
        seed: corruption seed.
        device: auto | cpu | cuda.
        max_images: score only the first N test images (the same ones for every corruption).
        data: dataset folder, if it moved since training.
        workers: data loader processes.
        batch_size: images per forward pass.

    Returns:
        Long table: corruption, severity, label (each finding, then `mean`), auc, clean_auc,
        drop (= clean_auc - auc); the clean rows have corruption `clean`, severity 0.
        The mean is over the findings with a defined clean AUC.

    Raises:
        DataError: unusable run folder or data, unknown kinds or severities.
    """
    unknown = [k for k in kinds if k not in KINDS]
    if unknown:
        raise DataError(f"unknown corruption(s) {unknown}: expected {', '.join(KINDS)}")
    bad = [s for s in severities if s not in SEVERITIES]
    if bad:
        raise DataError(f"severities {bad}: expected integers 1 to 5")
    run_dir = Path(run_dir)
    checkpoint = run_dir / "checkpoint.pt"
    if not checkpoint.is_file():
        raise DataError(f"{checkpoint}: not found; --run takes a folder written by retrain.py.")
    model, findings, size = cam.load_trained(checkpoint)
    cfg, test = training.run_test_table(run_dir, data)
    if test.empty:
        raise DataError(f"{run_dir / 'config.json'}: the recorded dataset has no test fold.")
    if max_images is not None:
        test = test.iloc[:max_images]
    base = CXRDataset.from_table(test.reset_index(), findings, None,
                                 build_transform(size, train=False))
    dev = training.pick_device(device)
    model = model.to(dev)
    rows: list[dict] = []
    clean: dict[str, float] = {}
    plan = [(CLEAN, 0)] + [(k, s) for k in kinds for s in severities]
    for kind, severity in plan:
        loader = DataLoader(CorruptedDataset(base, kind, severity, seed), batch_size=batch_size,
                            num_workers=workers)
        _, probs, targets, _ = training.evaluate(model, loader, dev,
                                                desc=f"{kind} {severity}")
        aucs = per_label_auc(targets, probs, findings, warn=kind == CLEAN)
        if kind == CLEAN:
            clean = aucs
        for f in findings:
            rows.append({"corruption": kind, "severity": severity, "label": f, "auc": aucs[f],
                         "clean_auc": clean[f]})
        defined = [f for f in findings if not math.isnan(clean[f])]
        rows.append({"corruption": kind, "severity": severity, "label": "mean",
                     "auc": float(np.mean([aucs[f] for f in defined])) if defined else math.nan,
                     "clean_auc": float(np.mean([clean[f] for f in defined])) if defined
                     else math.nan})
        print(f"{kind:>20s} {severity}: mean AUC {rows[-1]['auc']:.4f}", flush=True)
    table = pd.DataFrame(rows)
    table["drop"] = table["clean_auc"] - table["auc"]
    return table


def summary_table(table: pd.DataFrame) -> pd.DataFrame:
    """Mean AUC and its drop per corruption x severity (the `mean` rows, one row each)."""
    means = table[table["label"] == "mean"]
    return means[["corruption", "severity", "auc", "drop"]].rename(
        columns={"auc": "mean_auc"}).reset_index(drop=True)


def plot_robustness(table: pd.DataFrame, out: str | Path) -> Path:
    """Lines of mean AUC against severity, one per corruption, starting from the clean AUC."""
    plt = vp._pyplot()
    means = table[table["label"] == "mean"]
    clean = float(means.loc[means["corruption"] == CLEAN, "auc"].iloc[0])
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for kind in [k for k in KINDS if k in set(means["corruption"])]:
        part = means[means["corruption"] == kind].sort_values("severity")
        ax.plot([0] + part["severity"].tolist(), [clean] + part["auc"].tolist(), marker="o",
                label=kind)
    ax.axhline(clean, color="gray", linestyle=":", linewidth=1, label="clean")
    ax.axhline(0.5, color="black", linestyle="--", linewidth=0.8)
    ax.set_xlabel("severity (0 = clean)")
    ax.set_ylabel("mean AUC over findings")
    ax.set_xticks(range(6))
    ax.legend(fontsize=8)
    ax.set_title("Test-fold AUC under photo-like corruptions", fontsize=10)
    fig.tight_layout()
    out = Path(out)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, help="run folder written by retrain.py")
    p.add_argument("--kinds", nargs="+", default=list(KINDS), metavar="KIND",
                   help=f"corruptions (default all): {' '.join(KINDS)}")
    p.add_argument("--severities", nargs="+", type=int, default=[1, 3, 5])
    p.add_argument("--out", default="robustness.csv", help="CSV, one row per corruption x "
                   "severity x finding (+ mean)")
    p.add_argument("--plot", help="PNG of mean AUC against severity")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--max-images", type=int, help="score only the first N test images")
    p.add_argument("--data", help="dataset folder, if it moved since training")
    p.add_argument("--workers", type=int, default=0)
    args = p.parse_args(argv)
    try:
        table = robustness(args.run, args.kinds, args.severities, args.seed, args.device,
                           args.max_images, args.data, args.workers)
    except (DataError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    table.to_csv(args.out, index=False)
    print(summary_table(table).to_string(index=False, na_rep="n/a",
                                         float_format=lambda v: f"{v:.4f}"))
    print(f"wrote {args.out}")
    if args.plot:
        print(f"wrote {plot_robustness(table, args.plot)}")
    return 0
