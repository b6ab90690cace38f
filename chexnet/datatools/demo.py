"""Small synthetic chest X-ray datasets in the real NIH ChestX-ray14 and CheXphoto file formats.

The whole pipeline (label building, patient split, training, evaluation, heatmaps) can then run
anywhere in minutes without the 42 GB NIH download. Every image is a chest-like phantom (body, two
lungs, mediastinum, heart, diaphragm domes, ribs, clavicles) on which each finding draws its own
strong, distinct signature, big enough to survive downsampling to 64x64 px. Findings co-occur
through a small latent-factor model, and follow-ups of one patient share anatomy and chronic
findings, so an image-level split leaks just as it would on the real data.

Conventions
- Images are drawn in "anatomical" coordinates: x and y are fractions of the image width/height
  (0..1, y down) before a small per-image shift/scale/rotation. Radiological convention: the
  patient's right is on the image left, so the heart bulges to the image right. In code a lung's
  `side` is -1 (image left, patient's right lung) or +1 (image right, patient's left lung);
  "lateral" means away from the midline.
- Intensities are 0-255 grey levels: air outside the body ~20, lungs ~45-70, soft tissue ~120-145,
  mediastinum/heart ~150-175, bone brighter.
- Randomness: each image draws from its own seeded streams
  (`numpy.random.default_rng([seed, ...])`), so the output bytes do not depend on the number of
  worker processes. Each finding draws from its own stream, so adding a finding to an image leaves
  the phantom and the other findings untouched; chronic findings (a mass, emphysema, ...) are
  seeded per patient so they reappear in place on follow-ups.

Typical use:
    python demo_data.py --out demo_data --kind both --n-images 3000 --png-size 128 --workers 2
    python demo_data.py --out demo_biased --kind nih --underdiagnose F:0.7   # a known subgroup
        # effect: 70% of women's positive labels removed (images unchanged), for subgroups.py
"""
from __future__ import annotations

import argparse
import csv
import math
import multiprocessing
import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np
import torch
from PIL import Image

from chexnet.cli import CommandError, at_least, command, integer
from chexnet.files import check_outputs
from chexnet.datatools import corruptions
from chexnet.labels import (
    CHEXPERT_META_COLS,
    CHEXPERT_OBSERVATIONS,
    NIH_BBOX_ALIASES,
    NIH_FINDINGS,
    NIH_NO_FINDING,
    NIH_TO_CHEXPERT,
)

# ---------------------------------------------------------------------------------------------
# File schemas (exactly as in the real releases)
# ---------------------------------------------------------------------------------------------
NIH_ENTRY_HEADER = ("Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,"
                    "View Position,OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y]")
NIH_BBOX_HEADER = "Image Index,Finding Label,Bbox [x,y,w,h],,,"
NIH_ENTRY_FILE = "Data_Entry_2017.csv"
NIH_BBOX_FILE = "BBox_List_2017.csv"
# Data_Entry name -> BBox_List name (the real BBox file spells Infiltration "Infiltrate").
BBOX_LABEL_NAME = {v: k for k, v in NIH_BBOX_ALIASES.items()}
CHEXPHOTO_DIR = "CheXphoto-v1.1"
CHEXPHOTO_FIRST_VALID_PATIENT = 64541  # the real valid set's patient ids start here
RENDITIONS = ("natural", "synthetic/digital", "synthetic/photographic")

# Signatures drawn only for CheXphoto's extra observations (not NIH findings).
EXTRA_SIGNATURES: tuple[str, ...] = ("Widened_Mediastinum", "Rib_Fracture", "Support_Device")
ALL_SIGNATURES: tuple[str, ...] = NIH_FINDINGS + EXTRA_SIGNATURES

# A box: (finding name as in NIH_FINDINGS / EXTRA_SIGNATURES, x, y, w, h), pixels of the output
# image.
Box = tuple[str, int, int, int, int]

# ---------------------------------------------------------------------------------------------
# Label model: which findings an image has
# ---------------------------------------------------------------------------------------------
# Target prevalence per image. Real NIH prevalences are 0.2-18%; here every finding is 7.5-17% so
# a random 20% patient-level test fold of 3000 images holds >= 25 positives of each in ~99% of
# splits (chronic findings cluster in patients, which widens the spread). Hernia is rarest.
PREVALENCE: dict[str, float] = {
    "Atelectasis": 0.12, "Cardiomegaly": 0.09, "Effusion": 0.14, "Infiltration": 0.17,
    "Mass": 0.085, "Nodule": 0.09, "Pneumonia": 0.08, "Pneumothorax": 0.08,
    "Consolidation": 0.08, "Edema": 0.08, "Emphysema": 0.085, "Fibrosis": 0.085,
    "Pleural_Thickening": 0.09, "Hernia": 0.075,
    "Widened_Mediastinum": 0.07, "Rib_Fracture": 0.06, "Support_Device": 0.22,
}
# Latent factors (disease processes) and how persistent each is across a patient's follow-ups
# (share of its variance that is patient-level, 0..1).
FACTOR_PERSISTENCE: dict[str, float] = {
    "general": 0.7, "cardiac": 0.85, "infection": 0.3, "neoplasm": 0.9, "copd": 0.9, "chronic": 0.9,
}
# Loadings of each finding's latent score on the factors. The rest of its unit variance is its own
# noise term. This gives Effusion with Cardiomegaly/Edema/Atelectasis, Pneumonia with
# Infiltration/Consolidation, Mass with Nodule, Emphysema with Pneumothorax, Fibrosis with
# Pleural_Thickening, and, through "general", more No Finding images than independence would.
LOADINGS: dict[str, dict[str, float]] = {
    "Atelectasis": {"general": 0.45, "cardiac": 0.35, "infection": 0.25},
    "Cardiomegaly": {"general": 0.35, "cardiac": 0.65},
    "Effusion": {"general": 0.45, "cardiac": 0.5, "infection": 0.15, "neoplasm": 0.15},
    "Infiltration": {"general": 0.45, "infection": 0.5},
    "Mass": {"general": 0.35, "neoplasm": 0.65},
    "Nodule": {"general": 0.35, "neoplasm": 0.55},
    "Pneumonia": {"general": 0.4, "infection": 0.65},
    "Pneumothorax": {"general": 0.4, "copd": 0.45},
    "Consolidation": {"general": 0.45, "infection": 0.55},
    "Edema": {"general": 0.4, "cardiac": 0.6},
    "Emphysema": {"general": 0.35, "copd": 0.7},
    "Fibrosis": {"general": 0.35, "chronic": 0.65},
    "Pleural_Thickening": {"general": 0.35, "chronic": 0.5, "neoplasm": 0.1},
    "Hernia": {"general": 0.3},
    "Widened_Mediastinum": {"general": 0.4, "cardiac": 0.2},
    "Rib_Fracture": {"general": 0.25},
    "Support_Device": {"general": 0.6},
}
# Persistence of each finding's own noise term. Chronic findings persist across follow-ups (so a
# patient with Cardiomegaly keeps it), acute ones mostly come and go.
OWN_PERSISTENCE: dict[str, float] = {
    "Cardiomegaly": 0.95, "Emphysema": 0.95, "Fibrosis": 0.95, "Pleural_Thickening": 0.95,
    "Hernia": 0.95, "Mass": 0.95, "Nodule": 0.95, "Support_Device": 0.5,
}
# Findings whose drawing (position, size) is seeded per patient, so they reappear in place.
CHRONIC: frozenset[str] = frozenset(
    ("Cardiomegaly", "Emphysema", "Fibrosis", "Pleural_Thickening", "Hernia", "Mass", "Nodule",
     "Widened_Mediastinum", "Rib_Fracture"))


def sample_findings(rng: np.random.Generator, patient_of_image: np.ndarray,
                    names: Sequence[str] = NIH_FINDINGS) -> np.ndarray:
    """Draw co-occurring findings for a set of images with the latent-factor model.

    Each finding f has a latent score z_f = sum_k w_fk F_k + c_f e_f of unit variance (factor
    loadings `LOADINGS`); it is present when z_f exceeds the normal quantile of `PREVALENCE[f]`, so
    marginal prevalences are exact in expectation. Every factor and noise term is the sum of a
    patient-level and an image-level normal, weighted by its persistence, which makes follow-ups of
    one patient share (chronic) findings.

    Args:
        rng: random generator (consumed).
        patient_of_image: (N,) integer patient index per image, values 0..P-1.
        names: findings to draw, each a key of PREVALENCE and LOADINGS.

    Returns:
        (N, len(names)) bool array, True where the image has the finding.
    """
    patient_of_image = np.asarray(patient_of_image)
    n = len(patient_of_image)
    n_patients = int(patient_of_image.max()) + 1 if n else 0
    factors = list(FACTOR_PERSISTENCE)
    rho_f = np.array([FACTOR_PERSISTENCE[k] for k in factors])
    fac = (np.sqrt(rho_f) * rng.standard_normal((n_patients, len(factors)))[patient_of_image]
           + np.sqrt(1 - rho_f) * rng.standard_normal((n, len(factors))))  # (N, K)
    w = np.array([[LOADINGS[f].get(k, 0.0) for k in factors] for f in names])  # (F, K)
    own_var = 1.0 - (w ** 2).sum(1)
    if (own_var <= 0).any():
        raise ValueError("LOADINGS rows must have squared sums < 1")
    rho_e = np.array([OWN_PERSISTENCE.get(f, 0.3) for f in names])
    own = (np.sqrt(rho_e) * rng.standard_normal((n_patients, len(names)))[patient_of_image]
           + np.sqrt(1 - rho_e) * rng.standard_normal((n, len(names))))  # (N, F)
    z = fac @ w.T + np.sqrt(own_var) * own
    thresholds = np.array([statistics.NormalDist().inv_cdf(1.0 - PREVALENCE[f]) for f in names])
    return z > thresholds


# ---------------------------------------------------------------------------------------------
# Anatomy
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Anatomy:
    """Patient-level phantom parameters (fractions of image width/height; grey levels 0-255).

    Follow-ups of one patient reuse the same Anatomy; each image only adds a small pose and
    exposure jitter.
    """

    body_hw: float = 0.47     # half width of the body ellipse
    lung_dx: float = 0.19     # lateral offset of each lung centre from the midline
    lung_hw: float = 0.148    # lung half width
    lung_hh: float = 0.28     # lung half height
    lung_top: float = 0.125   # y of the lung apices
    dome_h: float = 0.06      # height of each diaphragm dome above its costophrenic angle
    heart_dx: float = 0.045   # heart centre, right of the midline
    heart_hh: float = 0.13    # heart half height (vertical extent)
    ctr: float = 0.42         # cardiothoracic ratio (heart width / thoracic width)
    med_hw: float = 0.045     # half width of the upper mediastinum
    tissue: float = 132.0     # soft tissue grey
    lung_grey: float = 58.0   # lung field grey
    bone: float = 14.0        # rib brightness over the lungs
    noise: float = 4.0        # per-pixel noise sigma
    brightness: float = 0.0   # global offset
    contrast: float = 1.0     # global gain around mid-grey
    marker: int = 0           # side marker letter box: -1 top-left, +1 top-right, 0 none


def sample_anatomy(rng: np.random.Generator) -> Anatomy:
    """Draw one patient's anatomy.

    Args:
        rng: random generator (consumed).

    Returns:
        An Anatomy with a normal cardiothoracic ratio (0.38-0.46).
    """
    u = rng.uniform
    return Anatomy(
        body_hw=u(0.44, 0.5), lung_dx=u(0.18, 0.2), lung_hw=u(0.14, 0.155),
        lung_hh=u(0.265, 0.295), lung_top=u(0.1, 0.15), dome_h=u(0.05, 0.075),
        heart_dx=u(0.035, 0.06), heart_hh=u(0.12, 0.14), ctr=u(0.38, 0.46), med_hw=u(0.04, 0.05),
        tissue=u(120, 145), lung_grey=u(46, 70), bone=u(10, 18), noise=u(3.0, 5.5),
        brightness=u(-12, 12), contrast=u(0.88, 1.12), marker=int(rng.choice([-1, 0, 1])))


# ---------------------------------------------------------------------------------------------
# Drawing primitives (vectorised over the whole image)
# ---------------------------------------------------------------------------------------------
_PIXEL_CENTRES: dict[int, tuple[np.ndarray, np.ndarray]] = {}


def _pixel_grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """(size, size) float32 x and y of pixel centres in image fractions, cached per size."""
    if size not in _PIXEL_CENTRES:
        c = (np.arange(size, dtype=np.float32) + 0.5) / size
        _PIXEL_CENTRES[size] = (np.broadcast_to(c[None, :], (size, size)),
                                np.broadcast_to(c[:, None], (size, size)))
    return _PIXEL_CENTRES[size]


class _Canvas:
    """An image being drawn: anatomical coordinate grids, the grey image and the anatomy layout.

    Attributes:
        X, Y: (S, S) float32 anatomical coordinates of each output pixel.
        px: size of one output pixel in anatomical units (for one-pixel anti-aliased edges).
        img: (S, S) float32 grey levels.
        g: mutable geometry (lungs, heart, ...) that pre-hooks of findings may change.
        lung, rr: per side (-1, +1), the soft lung mask and its normalised superellipse radius.
    """

    def __init__(self, size: int, shift: tuple[float, float], scale: float, angle: float):
        u, v = _pixel_grid(size)
        ca, sa = math.cos(angle), math.sin(angle)
        xc, yc = (u - 0.5 - shift[0]) / scale, (v - 0.5 - shift[1]) / scale
        self.X = (ca * xc + sa * yc + 0.5).astype(np.float32)
        self.Y = (-sa * xc + ca * yc + 0.5).astype(np.float32)
        self.size = size
        self.px = 1.0 / (size * scale)
        self.img = np.zeros((size, size), np.float32)
        self.g: dict = {}
        self.lung: dict[int, np.ndarray] = {}
        self.rr: dict[int, np.ndarray] = {}
        self.heart = np.zeros((size, size), np.float32)  # soft heart mask, set by _draw_anatomy

    def soft(self, d: np.ndarray) -> np.ndarray:
        """Anti-aliased inside-mask from a signed distance `d` (anatomical units, > 0 inside)."""
        return np.clip(d / self.px + 0.5, 0.0, 1.0)

    def blend(self, mask: np.ndarray, value: np.ndarray | float) -> None:
        """Replace the image by `value` where mask is 1 (linearly in between)."""
        self.img += mask * (value - self.img)

    def disc(self, x: float, y: float, r: float) -> np.ndarray:
        """Soft mask of a disc of radius r centred at (x, y)."""
        return self.soft(r - np.hypot(self.X - x, self.Y - y))

    def ellipse(self, x: float, y: float, a: float, b: float) -> np.ndarray:
        """Soft mask of an axis-aligned ellipse with half axes a, b."""
        rr = np.hypot((self.X - x) / a, (self.Y - y) / b)
        return self.soft((1.0 - rr) * min(a, b))

    def segments(self, points: Sequence[tuple[float, float]], half_width: float) -> np.ndarray:
        """Soft mask of a polyline through `points` with the given half thickness."""
        dist = np.full(self.X.shape, np.inf, np.float32)
        for (ax, ay), (bx, by) in zip(points[:-1], points[1:]):
            vx, vy = bx - ax, by - ay
            t = np.clip(((self.X - ax) * vx + (self.Y - ay) * vy) / max(vx * vx + vy * vy, 1e-12),
                        0.0, 1.0)
            np.minimum(dist, np.hypot(self.X - ax - t * vx, self.Y - ay - t * vy), out=dist)
        return self.soft(half_width - dist)

    def gauss(self, x: float, y: float, sx: float, sy: float) -> np.ndarray:
        """Unnormalised 2-D Gaussian bump (peak 1) with standard deviations sx, sy."""
        return np.exp(-0.5 * (((self.X - x) / sx) ** 2 + ((self.Y - y) / sy) ** 2))

    def lung_point(self, side: int, a: float, b: float, rmax: float = 0.7,
                   avoid_heart: bool = False) -> tuple[float, float]:
        """Anatomical (x, y) at lateral fraction a, vertical fraction b of a lung, kept inside it.

        Args:
            side: -1 or +1.
            a: position across the lung, -1 medial edge .. +1 lateral edge.
            b: position down the lung, -1 apex .. +1 base.
            rmax: the point is pulled toward the lung centre until its normalised radius <= rmax.
            avoid_heart: push the point laterally off the heart shadow (for small findings).
        """
        L = self.g["lungs"][side]
        r = (abs(a) ** 2.5 + abs(b) ** 2.5) ** 0.4
        if r > rmax:
            a, b = a * rmax / r, b * rmax / r
        x, y = L["cx"] + side * a * L["hw"], L["cy"] + b * L["hh"]
        dome_top = L["dome_y"] - L["dome_h"] * max(0.0, 1.0 - ((x - L["cx"]) / L["hw"]) ** 2)
        y = min(y, dome_top - 0.035)
        if avoid_heart:
            h = self.g["heart"]
            if side * (x - h["x"]) < h["hw"] + 0.02 and abs(y - h["y"]) < h["hh"] + 0.02:
                x = h["x"] + side * (h["hw"] + 0.03)
                if side * (x - L["cx"]) > 0.6 * L["hw"]:  # no room beside the heart: go higher
                    x, y = L["cx"] + side * 0.3 * L["hw"], h["y"] - h["hh"] - 0.03
        return float(x), float(y)

    def bbox(self, mask: np.ndarray, thr: float = 0.5) -> tuple[int, int, int, int] | None:
        """Pixel box (x, y, w, h) of mask > thr, or None where the mask is empty."""
        on = mask > thr
        rows, cols = np.flatnonzero(on.any(1)), np.flatnonzero(on.any(0))
        if rows.size == 0:
            return None
        return (int(cols[0]), int(rows[0]),
                int(cols[-1] - cols[0] + 1), int(rows[-1] - rows[0] + 1))


def _box(cv: _Canvas, name: str, mask: np.ndarray, thr: float = 0.1) -> list[Box]:
    """[(name, x, y, w, h)] for mask > thr, or [] if nothing was drawn.

    The low default threshold keeps anti-aliased rims inside the box: a box must cover every pixel
    the signature visibly changed (heatmap pointing game)."""
    b = cv.bbox(mask, thr)
    return [] if b is None else [(name, *b)]


def _sides(rng: np.random.Generator, p_both: float) -> list[int]:
    """Both lungs with probability p_both, else one at random."""
    return [-1, 1] if rng.random() < p_both else [int(rng.choice([-1, 1]))]


# ---------------------------------------------------------------------------------------------
# Frontal phantom
# ---------------------------------------------------------------------------------------------
def _layout(anat: Anatomy) -> dict:
    """Geometry dict derived from the anatomy; findings' pre-hooks edit it before drawing."""
    lungs = {}
    for side in (-1, 1):
        hw = anat.lung_hw * (0.94 if side == 1 else 1.0)  # the left lung is narrower (heart)
        cy = anat.lung_top + anat.lung_hh
        lungs[side] = dict(cx=0.5 + side * anat.lung_dx, cy=cy, hw=hw, hh=anat.lung_hh,
                           # the right hemidiaphragm (image left) sits a little higher
                           dome_y=cy + 0.86 * anat.lung_hh + (0.012 if side == 1 else -0.005),
                           dome_h=anat.dome_h, grey=anat.lung_grey, hilum=22.0)
    thorax = (lungs[1]["cx"] + lungs[1]["hw"]) - (lungs[-1]["cx"] - lungs[-1]["hw"])
    heart = dict(hw=anat.ctr * thorax / 2, hh=anat.heart_hh, x=0.5 + anat.heart_dx)
    return dict(lungs=lungs, thorax=thorax, heart=heart, med_hw=anat.med_hw)


def _draw_anatomy(cv: _Canvas, anat: Anatomy, texture_rng: np.random.Generator) -> None:
    """Draw background, body, lungs, mediastinum, heart, spine, ribs and clavicles."""
    X, Y, g = cv.X, cv.Y, cv.g
    cv.img[:] = 18.0 + 8.0 * Y
    body = cv.ellipse(0.5, 0.66, anat.body_hw, 0.74)
    cv.blend(body, anat.tissue + 15.0 * (Y - 0.5))
    # Below the diaphragm the liver/abdomen is as dense as the heart, so the heart merges into it.
    base = 0.5 * (g["lungs"][-1]["dome_y"] + g["lungs"][1]["dome_y"]) - 0.05
    cv.blend(body * cv.soft(Y - base) * np.clip((Y - base) / 0.08, 0.0, 1.0), anat.tissue + 28.0)
    # Lung texture: smooth random field standing in for vessels and overlapping soft tissue.
    tex = _smooth_noise(texture_rng, cv.size, 12, 6.0)
    h = g["heart"]
    for side in (-1, 1):
        L = g["lungs"][side]
        dx, dy = (X - L["cx"]) / L["hw"], (Y - L["cy"]) / L["hh"]
        # Superellipse: round apex (p=2), squarer base (p=3) so the costophrenic angles are sharp.
        rr = np.where(dy < 0, np.hypot(dx, dy), np.cbrt(np.abs(dx) ** 3 + np.abs(dy) ** 3))
        dome = L["dome_y"] - L["dome_h"] * np.clip(1.0 - dx * dx, 0.0, 1.0)
        mask = cv.soft((1.0 - rr) * min(L["hw"], L["hh"])) * cv.soft(dome - Y)
        hilum = cv.gauss(L["cx"] - side * 0.55 * L["hw"], L["cy"] + 0.05, 0.035, 0.06)
        value = L["grey"] + 10.0 * dy + L["hilum"] * hilum + tex
        cv.blend(mask, value)
        cv.lung[side], cv.rr[side] = mask, rr
    # Heart sits on the left hemidiaphragm (image right).
    h["y"] = g["lungs"][1]["dome_y"] - g["lungs"][1]["dome_h"] - 0.25 * h["hh"]
    top = h["y"] - 0.6 * h["hh"]
    med = cv.soft(g["med_hw"] - np.abs(X - 0.5)) * cv.soft(top + 0.02 - Y)
    cv.blend(med, anat.tissue + 30.0)
    # aortic knob
    cv.blend(cv.disc(0.5 + g["med_hw"] + 0.004, top - 0.06, 0.026), anat.tissue + 30.0)
    trachea = cv.soft(0.011 - np.abs(X - 0.5)) * cv.soft(top - 0.08 - Y)
    cv.blend(trachea * 0.6, anat.lung_grey + 25.0)
    heart = _heart_mask(cv, h)
    cv.blend(heart, anat.tissue + 28.0 + 8.0 * (Y - h["y"]) / h["hh"])
    cv.heart = heart
    # Spine: faint vertebral banding through the mediastinum.
    cv.img += body * cv.soft(0.028 - np.abs(X - 0.5)) * (8.0 + 5.0 * np.cos(Y * (2 * np.pi / 0.05)))
    # Posterior ribs: bands drooping laterally, visible mostly over the lungs.
    lungs = np.maximum(cv.lung[-1], cv.lung[1])
    t = (Y - 1.1 * (X - 0.5) ** 2 - 0.12) / 0.056
    k = np.round(t)
    ribs = cv.soft(0.0075 - np.abs(t - k) * 0.056) * (k >= 0) * (k <= 10)
    cv.img += anat.bone * ribs * (0.35 + 0.65 * lungs) * body
    for side in (-1, 1):
        cv.blend(cv.segments([(0.5 + side * 0.045, 0.21), (0.5 + side * 0.17, 0.15),
                              (0.5 + side * 0.31, 0.13)], 0.012) * 0.7, anat.tissue + 45.0)
    if anat.marker:
        # Lead side marker in a top corner, outside the body, as on real films.
        x0 = 0.5 + anat.marker * 0.42
        cv.blend(cv.soft(0.018 - np.maximum(np.abs(X - x0), np.abs(Y - 0.07))), 245.0)


def _heart_mask(cv: _Canvas, h: Mapping[str, float]) -> np.ndarray:
    """Soft mask of the heart: an ellipse tilted 30 degrees (apex down and to the image right),
    sized so that its horizontal half extent is h["hw"] and its vertical one h["hh"]."""
    c, s = math.cos(math.radians(30)), math.sin(math.radians(30))
    # Half axes (a, b) of the tilted ellipse from its axis-aligned half extents (hw, hh):
    # hw^2 = a^2 c^2 + b^2 s^2, hh^2 = a^2 s^2 + b^2 c^2.
    det = c ** 4 - s ** 4
    a2 = (h["hw"] ** 2 * c ** 2 - h["hh"] ** 2 * s ** 2) / det
    b2 = (h["hh"] ** 2 * c ** 2 - h["hw"] ** 2 * s ** 2) / det
    a, b = math.sqrt(max(a2, 1e-4)), math.sqrt(max(b2, 1e-4))
    dx, dy = cv.X - h["x"], cv.Y - h["y"]
    rr = np.hypot((c * dx + s * dy) / a, (-s * dx + c * dy) / b)
    return cv.soft((1.0 - rr) * min(a, b))


def _smooth_noise(rng: np.random.Generator, size: int, cells: int, amplitude: float) -> np.ndarray:
    """(size, size) float32 smooth random field: a cells x cells normal grid, bilinearly
    upsampled."""
    small = (amplitude * rng.standard_normal((cells, cells))).astype(np.float32)
    return np.asarray(Image.fromarray(small).resize((size, size), Image.BILINEAR), np.float32)


# ---------------------------------------------------------------------------------------------
# Finding signatures. pre(g, rng) edits the geometry before the anatomy is drawn (volume changes);
# draw(cv, rng) paints on the anatomy and returns the boxes of what it drew. Both of one finding
# use the same generator, pre first.
# ---------------------------------------------------------------------------------------------
def _pre_atelectasis(g: dict, rng: np.random.Generator) -> None:
    side = int(rng.choice([-1, 1]))
    g["atel_side"] = side
    L = g["lungs"][side]  # volume loss: the lung shrinks from below, its hemidiaphragm rises
    top = L["cy"] - L["hh"]
    L["hh"] *= 0.95
    L["cy"] = top + L["hh"]
    L["dome_y"] -= 0.02


def _draw_atelectasis(cv: _Canvas, rng: np.random.Generator) -> list[Box]:
    # Plate-like atelectasis: a dense, thin, nearly horizontal band in the mid/lower lung.
    side = cv.g["atel_side"]
    x0, y0 = cv.lung_point(side, rng.uniform(-0.35, 0.35), rng.uniform(0.0, 0.4), avoid_heart=True)
    ang = math.radians(rng.uniform(-25, 25))
    half_len, half_thick = rng.uniform(0.075, 0.11), rng.uniform(0.016, 0.022)
    a = (cv.X - x0) * math.cos(ang) + (cv.Y - y0) * math.sin(ang)
    b = -(cv.X - x0) * math.sin(ang) + (cv.Y - y0) * math.cos(ang)
    m = cv.soft(half_len - np.abs(a)) * cv.soft(half_thick - np.abs(b)) * cv.lung[side]
    cv.img += rng.uniform(85, 105) * m
    return _box(cv, "Atelectasis", m)


def _pre_cardiomegaly(g: dict, rng: np.random.Generator) -> None:
    h = g["heart"]
    h["hw"] = rng.uniform(0.57, 0.66) * g["thorax"] / 2  # CTR > 0.55
    h["hh"] *= rng.uniform(1.1, 1.25)
    h["x"] += rng.uniform(0.005, 0.02)  # enlargement bulges mostly to the patient's left


def _draw_cardiomegaly(cv: _Canvas, rng: np.random.Generator) -> list[Box]:
    return _box(cv, "Cardiomegaly", cv.heart)


def _draw_effusion(cv: _Canvas, rng: np.random.Generator) -> list[Box]:
    # Fluid fills the lung base: flat level with a meniscus climbing the lateral wall, hiding the
    # diaphragm dome and the costophrenic angle.
    boxes: list[Box] = []
    for side in _sides(rng, 0.25):
        L = cv.g["lungs"][side]
        dx = (cv.X - L["cx"]) / L["hw"]
        level = L["cy"] + rng.uniform(0.25, 0.55) * L["hh"]
        meniscus = rng.uniform(0.035, 0.06)
        top = level - meniscus * np.clip(side * dx, 0.0, 1.0) ** 2
        inside = cv.soft((1.0 - cv.rr[side]) * L["hw"]) * cv.soft(L["dome_y"] + 0.01 - cv.Y)
        m = cv.soft(cv.Y - top) * inside
        fluid = rng.uniform(165, 185) + 60.0 * (cv.Y - level)
        cv.blend(m, np.maximum(cv.img, fluid))
        boxes += _box(cv, "Effusion", m)
    return boxes


def _draw_infiltration(cv: _Canvas, rng: np.random.Generator) -> list[Box]:
    # Patchy, mottled clusters of soft blobs over a lung zone.
    boxes: list[Box] = []
    for side in _sides(rng, 0.3):
        zx, zy = cv.lung_point(side, rng.uniform(-0.3, 0.5), rng.uniform(-0.5, 0.45), rmax=0.55)
        zone = rng.uniform(0.06, 0.09)
        m = np.zeros_like(cv.img)
        for _ in range(int(rng.integers(7, 11))):
            rad, ang = zone * math.sqrt(rng.random()), rng.uniform(0, 2 * math.pi)
            r = rng.uniform(0.018, 0.03)
            bx, by = zx + rad * math.cos(ang), zy + rad * math.sin(ang)
            d = np.hypot(cv.X - bx, cv.Y - by)
            m = np.maximum(m, rng.uniform(0.7, 1.0) * np.clip((r - d) / (1.5 * cv.px) + 0.5, 0, 1))
        m *= cv.lung[side]
        cv.img += rng.uniform(50, 65) * m
        boxes += _box(cv, "Infiltration", m)
    return boxes


def _draw_mass(cv: _Canvas, rng: np.random.Generator) -> list[Box]:
    # Large (diameter >= 10% of the width) bright disc with a lobulated, irregular edge.
    side = int(rng.choice([-1, 1]))
    x, y = cv.lung_point(side, rng.uniform(-0.2, 0.5), rng.uniform(-0.55, 0.35), rmax=0.5,
                         avoid_heart=True)
    r0 = rng.uniform(0.05, 0.068)
    theta = np.arctan2(cv.Y - y, cv.X - x)
    r = r0 * (1.0 + sum(rng.uniform(0.04, 0.1) * np.sin(k * theta + rng.uniform(0, 2 * np.pi))
                        for k in (3, 5, 7)))
    d = np.hypot(cv.X - x, cv.Y - y)
    m = cv.soft(r - d)
    cv.img += m * rng.uniform(95, 115) * (0.85 + 0.15 * np.clip(1 - d / r0, 0, 1))
    return _box(cv, "Mass", m)


def _draw_nodule(cv: _Canvas, rng: np.random.Generator) -> list[Box]:
    # 1-3 small (diameter 3-4% of the width) very bright discs.
    boxes: list[Box] = []
    for _ in range(int(rng.choice([1, 2, 3], p=[0.5, 0.35, 0.15]))):
        side = int(rng.choice([-1, 1]))
        x, y = cv.lung_point(side, rng.uniform(-0.4, 0.7), rng.uniform(-0.7, 0.5), rmax=0.72,
                             avoid_heart=True)
        m = cv.disc(x, y, rng.uniform(0.016, 0.02))
        cv.blend(m, rng.uniform(235, 250))
        boxes += _box(cv, "Nodule", m)
    return boxes


def _draw_pneumonia(cv: _Canvas, rng: np.random.Generator) -> list[Box]:
    # Soft, fuzzy-edged haze in a mid/lower lung, with a few dark air bronchograms inside.
    boxes: list[Box] = []
    for side in _sides(rng, 0.15):
        x, y = cv.lung_point(side, rng.uniform(-0.1, 0.5), rng.uniform(0.0, 0.5), rmax=0.55)
        sx, sy = rng.uniform(0.045, 0.06), rng.uniform(0.055, 0.075)
        haze = cv.gauss(x, y, sx, sy) * np.clip(cv.lung[side] * 1.2, 0.0, 1.0)
        amp = rng.uniform(80, 95)
        cv.img += amp * haze
        for _ in range(int(rng.integers(2, 4))):
            ang = rng.uniform(0, 2 * np.pi)
            tip = (x + 1.3 * sx * math.cos(ang), y + 1.3 * sy * math.sin(ang))
            cv.img -= 0.45 * amp * haze * cv.segments([(x, y), tip], 0.0055)
        boxes += _box(cv, "Pneumonia", haze, 0.25)
    return boxes


def _draw_pneumothorax(cv: _Canvas, rng: np.random.Generator) -> list[Box]:
    # Collapsed lung: a black, structureless crescent at the apex / upper lateral edge, bounded by
    # a thin bright visceral pleural line.
    side = int(rng.choice([-1, 1]))
    L = cv.g["lungs"][side]
    k = rng.uniform(0.62, 0.75)
    hw, hh = k * L["hw"], k * L["hh"]
    cx, cy = L["cx"] - side * (L["hw"] - hw), L["cy"] + (L["hh"] - hh) * 0.9  # shrink to hilum
    rin = np.hypot((cv.X - cx) / hw, (cv.Y - cy) / hh)
    upper = cv.soft(L["cy"] + 0.3 * L["hh"] - cv.Y)
    crescent = cv.soft((rin - 1.0) * min(hw, hh)) * cv.lung[side] * upper
    cv.blend(crescent, rng.uniform(6, 18))
    line = cv.soft(0.0065 - np.abs(rin - 1.0) * min(hw, hh)) * cv.lung[side] * upper
    cv.img += rng.uniform(55, 75) * line
    return _box(cv, "Pneumothorax", np.maximum(crescent, line))


def _draw_consolidation(cv: _Canvas, rng: np.random.Generator) -> list[Box]:
    # Lobar consolidation: the lung is uniformly dense up to a sharp, straight fissure.
    boxes: list[Box] = []
    for side in _sides(rng, 0.1):
        L = cv.g["lungs"][side]
        tilt = math.tan(math.radians(rng.uniform(-12, 12)))
        yline = cv.Y - tilt * (cv.X - L["cx"])
        if rng.random() < 0.5:  # upper lobe: everything above the fissure
            f = L["cy"] + rng.uniform(-0.3, 0.0) * L["hh"]
            m = cv.soft(f - yline)
        else:  # a lobe-sized band between two straight borders, above the base
            f = L["cy"] + rng.uniform(-0.2, 0.15) * L["hh"]
            m = cv.soft(yline - f) * cv.soft(f + rng.uniform(0.11, 0.15) - yline)
        m = m * cv.lung[side]
        cv.blend(m, rng.uniform(160, 178))
        boxes += _box(cv, "Consolidation", m)
    return boxes


def _draw_edema(cv: _Canvas, rng: np.random.Generator) -> list[Box]:
    # Bilateral perihilar "bat-wing" haze plus Kerley B lines: short horizontal lines at the lateral
    # lung bases, touching the pleura.
    boxes: list[Box] = []
    amp, sx, sy = rng.uniform(55, 70), rng.uniform(0.05, 0.065), rng.uniform(0.08, 0.1)
    for side in (-1, 1):
        L = cv.g["lungs"][side]
        haze = cv.gauss(L["cx"] - side * 0.45 * L["hw"], L["cy"] + 0.03, sx, sy)
        haze *= np.clip(cv.lung[side] * 1.2, 0.0, 1.0)
        cv.img += amp * haze
        n, y0, gap = int(rng.integers(4, 7)), L["cy"] + rng.uniform(0.2, 0.3) * L["hh"], 0.022
        t = (cv.Y - y0) / gap
        j = np.round(t)
        lines = cv.soft(0.0055 - np.abs(t - j) * gap) * (j >= 0) * (j < n)
        edge = 1.0 - cv.rr[side]  # distance inward from the lateral pleura, in half widths
        lateral = (side * (cv.X - L["cx"]) > 0) & (edge * L["hw"] < rng.uniform(0.035, 0.05))
        kerley = lines * lateral * cv.lung[side]
        cv.img += rng.uniform(55, 70) * kerley
        boxes += _box(cv, "Edema", np.maximum(haze, kerley), 0.3)
    return boxes


def _pre_emphysema(g: dict, rng: np.random.Generator) -> None:
    # Hyperinflation: bigger, darker lungs with fewer vessels; low, flat diaphragm.
    grow_w, grow_h, dark = rng.uniform(1.05, 1.1), rng.uniform(1.1, 1.16), rng.uniform(18, 26)
    for L in g["lungs"].values():
        top = L["cy"] - L["hh"]
        L["hw"] *= grow_w
        L["hh"] *= grow_h
        L["cy"] = top + L["hh"]
        L["dome_y"] = L["cy"] + 0.9 * L["hh"]
        L["dome_h"] = 0.015
        L["grey"] -= dark
        L["hilum"] *= 0.5


def _draw_emphysema(cv: _Canvas, rng: np.random.Generator) -> list[Box]:
    return [b for side in (-1, 1) for b in _box(cv, "Emphysema", cv.lung[side])]


def _draw_fibrosis(cv: _Canvas, rng: np.random.Generator) -> list[Box]:
    # Reticular net of fine lines (two crossing families, wobbly) in the lower, peripheral lungs.
    boxes: list[Box] = []
    period, half = rng.uniform(0.05, 0.06), rng.uniform(0.0065, 0.008)
    amp = rng.uniform(45, 60)
    for side in _sides(rng, 0.8):
        L = cv.g["lungs"][side]
        net = np.zeros_like(cv.img)
        for ang in (rng.uniform(30, 60), rng.uniform(-60, -30)):
            a = math.radians(ang)
            p = cv.X * math.cos(a) + cv.Y * math.sin(a)
            p = p + 0.012 * np.sin(cv.Y * 40.0 + rng.uniform(0, 6.3)) + rng.uniform(0, period)
            t = p / period
            net = np.maximum(net, cv.soft(half - np.abs(t - np.round(t)) * period))
        lateral = np.clip(0.4 + 0.8 * side * (cv.X - L["cx"]) / L["hw"], 0.0, 1.0)
        zone = cv.lung[side] * np.clip((cv.Y - L["cy"] + 0.05) / 0.08, 0.0, 1.0) * lateral
        m = net * zone
        cv.img += amp * m
        boxes += _box(cv, "Fibrosis", m, 0.2)
    return boxes


def _draw_pleural_thickening(cv: _Canvas, rng: np.random.Generator) -> list[Box]:
    # Smooth bright band along the lateral chest wall (or an apical cap), inside the lung edge.
    boxes: list[Box] = []
    for side in _sides(rng, 0.2):
        L = cv.g["lungs"][side]
        inward = (1.0 - cv.rr[side]) * L["hw"]
        band = cv.soft(rng.uniform(0.028, 0.04) - inward)
        if rng.random() < 0.25:
            where = cv.soft(L["cy"] - 0.55 * L["hh"] - cv.Y)  # apical cap
        else:
            y0 = L["cy"] + rng.uniform(-0.45, 0.25) * L["hh"]
            half = rng.uniform(0.08, 0.14)
            where = cv.soft(half - np.abs(cv.Y - y0)) * (side * (cv.X - L["cx"]) > 0.2 * L["hw"])
        m = band * where * cv.lung[side]
        cv.blend(m, rng.uniform(165, 185))
        boxes += _box(cv, "Pleural_Thickening", m)
    return boxes


def _draw_hernia(cv: _Canvas, rng: np.random.Generator) -> list[Box]:
    # Hiatal hernia: round gas bubble with a flat air-fluid level, behind the lower heart.
    h = cv.g["heart"]
    r = rng.uniform(0.048, 0.065)
    x, y = 0.5 + rng.uniform(0.0, 0.05), h["y"] + h["hh"] * rng.uniform(0.1, 0.4)
    disc = cv.disc(x, y, r)
    level = y + r * rng.uniform(-0.1, 0.35)
    gas = disc * cv.soft(level - cv.Y)
    cv.blend(disc, cv.img + 20.0)  # wall of the herniated stomach
    cv.blend(cv.disc(x, y, r - 0.008) * cv.soft(level - cv.Y), rng.uniform(28, 45))
    return _box(cv, "Hernia", np.maximum(gas, disc))


def _pre_widened_mediastinum(g: dict, rng: np.random.Generator) -> None:
    g["med_hw"] = rng.uniform(0.085, 0.105)


def _draw_widened_mediastinum(cv: _Canvas, rng: np.random.Generator) -> list[Box]:
    h = cv.g["heart"]
    top = h["y"] - 0.6 * h["hh"]
    m = cv.soft(cv.g["med_hw"] - np.abs(cv.X - 0.5)) * cv.soft(top + 0.02 - cv.Y) * cv.soft(cv.Y)
    return _box(cv, "Widened_Mediastinum", m)


def _draw_rib_fracture(cv: _Canvas, rng: np.random.Generator) -> list[Box]:
    # A lateral rib segment drawn bright, broken by a dark gap with a step-off, and callus.
    side = int(rng.choice([-1, 1]))
    L = cv.g["lungs"][side]
    y_lat = L["cy"] + rng.uniform(-0.5, 0.3) * L["hh"]
    x0 = L["cx"] + side * L["hw"] * rng.uniform(0.55, 0.8)
    step = rng.uniform(0.01, 0.016)
    length = 0.05
    m1 = cv.segments([(x0 - side * length, y_lat - 0.01), (x0 - side * 0.006, y_lat)], 0.011)
    m2 = cv.segments([(x0 + side * 0.006, y_lat + step),
                      (x0 + side * length, y_lat + step + 0.012)], 0.011)
    callus = cv.disc(x0, y_lat + step / 2, 0.02) * 0.6
    m = np.maximum(np.maximum(m1, m2), callus)
    cv.img += rng.uniform(60, 80) * m
    return _box(cv, "Rib_Fracture", m)


def _draw_support_device(cv: _Canvas, rng: np.random.Generator) -> list[Box]:
    # Tubes, lines and pacemakers: near-white, sharp-edged man-made shapes.
    boxes: list[Box] = []
    kinds = ["tube", "line", "pacer"]
    picked = [k for k in kinds if rng.random() < 0.45] or [kinds[int(rng.integers(3))]]
    h = cv.g["heart"]
    for kind in picked:
        if kind == "tube":  # endotracheal / nasogastric tube down the midline
            m = cv.segments([(0.5, -0.02), (0.5 + rng.uniform(-0.01, 0.01), h["y"] - h["hh"] - 0.08
                              + rng.uniform(0.0, 0.3))], 0.007)
        elif kind == "line":  # central venous line from below a clavicle into the mediastinum
            s = int(rng.choice([-1, 1]))
            m = cv.segments([(0.5 + s * 0.3, 0.2), (0.5 + s * 0.15, 0.19), (0.5 + s * 0.03, 0.26),
                             (0.5 + s * 0.02, h["y"] - h["hh"] * 0.8)], 0.005)
        else:  # pacemaker box high on the chest with leads to the heart
            x, y = 0.5 + rng.uniform(0.2, 0.3), rng.uniform(0.14, 0.2)
            box = cv.soft(0.035 - np.abs(cv.X - x)) * cv.soft(0.022 - np.abs(cv.Y - y))
            lead = cv.segments([(x, y), (0.55, 0.25), (h["x"], h["y"])], 0.004)
            m = np.maximum(box, lead)
        cv.blend(m, 250.0)
        boxes += _box(cv, "Support_Device", m)
    return boxes


# name -> (pre-hook or None, draw). Drawing follows DRAW_ORDER: parenchymal patterns first, then
# pleural ones that overlie them, then focal bright objects.
SIGNATURES: dict[str, tuple[Callable | None, Callable]] = {
    "Atelectasis": (_pre_atelectasis, _draw_atelectasis),
    "Cardiomegaly": (_pre_cardiomegaly, _draw_cardiomegaly),
    "Effusion": (None, _draw_effusion),
    "Infiltration": (None, _draw_infiltration),
    "Mass": (None, _draw_mass),
    "Nodule": (None, _draw_nodule),
    "Pneumonia": (None, _draw_pneumonia),
    "Pneumothorax": (None, _draw_pneumothorax),
    "Consolidation": (None, _draw_consolidation),
    "Edema": (None, _draw_edema),
    "Emphysema": (_pre_emphysema, _draw_emphysema),
    "Fibrosis": (None, _draw_fibrosis),
    "Pleural_Thickening": (None, _draw_pleural_thickening),
    "Hernia": (None, _draw_hernia),
    "Widened_Mediastinum": (_pre_widened_mediastinum, _draw_widened_mediastinum),
    "Rib_Fracture": (None, _draw_rib_fracture),
    "Support_Device": (None, _draw_support_device),
}
DRAW_ORDER: tuple[str, ...] = (
    "Cardiomegaly", "Emphysema", "Widened_Mediastinum", "Fibrosis", "Edema", "Infiltration",
    "Pneumonia", "Consolidation", "Atelectasis", "Effusion", "Pleural_Thickening", "Pneumothorax",
    "Mass", "Nodule", "Hernia", "Rib_Fracture", "Support_Device",
)
assert sorted(DRAW_ORDER) == sorted(ALL_SIGNATURES) == sorted(SIGNATURES)


def _finish(img: np.ndarray, anat: Anatomy, rng: np.random.Generator) -> np.ndarray:
    """Add quantum noise, a smooth exposure field, global brightness/contrast; return uint8."""
    size = img.shape[0]
    img = img + anat.noise * rng.standard_normal(img.shape, dtype=np.float32)
    img += _smooth_noise(rng, size, 4, 5.0)
    contrast = anat.contrast * rng.uniform(0.96, 1.04)
    brightness = anat.brightness + rng.uniform(-5, 5)
    img = (img - 128.0) * contrast + 128.0 + brightness
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def render_phantom(rng: np.random.Generator, findings: Iterable[str],
                   anatomy: Anatomy | None = None, size: int = 128,
                   finding_rngs: Mapping[str, np.random.Generator] | None = None
                   ) -> tuple[np.ndarray, list[Box]]:
    """Draw one frontal (PA/AP) chest phantom with the given findings.

    The generator is split into independent streams (anatomy+pose, texture, noise, and one per
    finding), so rendering the same `rng` seed with and without a finding gives the same phantom
    and differs only where that finding's signature was drawn.

    Args:
        rng: random generator; a fresh `default_rng(seed)` gives a reproducible image.
        findings: names from NIH_FINDINGS and EXTRA_SIGNATURES.
        anatomy: patient anatomy; drawn from `rng` when None.
        size: output width = height in pixels.
        finding_rngs: optional generator per finding (e.g. seeded per patient so a chronic finding
            stays in place across follow-ups); missing ones come from `rng`.

    Returns:
        image: (size, size) uint8 grey levels.
        boxes: [(finding, x, y, w, h)] in pixels, one per drawn finding instance, tightly around
            where its signature changed the image.
    """
    findings = set(findings)
    unknown = findings - set(ALL_SIGNATURES)
    if unknown:
        raise ValueError(f"unknown findings {sorted(unknown)}; "
                         f"expected names from {ALL_SIGNATURES}")
    base_rng, texture_rng, noise_rng, sig_rng = rng.spawn(4)
    own = dict(zip(ALL_SIGNATURES, sig_rng.spawn(len(ALL_SIGNATURES))))
    own.update(finding_rngs or {})
    if anatomy is None:
        anatomy = sample_anatomy(base_rng)
    shift = (float(np.clip(base_rng.normal(0, 0.015), -0.035, 0.035)),
             float(np.clip(base_rng.normal(0, 0.015), -0.035, 0.035)))
    cv = _Canvas(size, shift, base_rng.uniform(0.94, 1.04),
                 math.radians(base_rng.uniform(-2.5, 2.5)))
    cv.g = _layout(anatomy)
    present = [f for f in DRAW_ORDER if f in findings]
    for f in present:
        pre = SIGNATURES[f][0]
        if pre is not None:
            pre(cv.g, own[f])
    _draw_anatomy(cv, anatomy, texture_rng)
    boxes: list[Box] = []
    for f in present:
        boxes += SIGNATURES[f][1](cv, own[f])
    return _finish(cv.img, anatomy, noise_rng), boxes


def render_lateral(rng: np.random.Generator, findings: Iterable[str],
                   anatomy: Anatomy | None = None, size: int = 128) -> np.ndarray:
    """Draw a simple lateral chest phantom (anterior to the image left) for CheXphoto lateral
    views.

    Only the findings visible on a lateral film are drawn, coarsely (bigger heart, darker larger
    lung, posterior effusion, focal opacities, retrocardiac gas, devices); no boxes are produced.

    Args:
        rng: random generator.
        findings: names from NIH_FINDINGS and EXTRA_SIGNATURES.
        anatomy: patient anatomy; drawn from `rng` when None.
        size: output width = height in pixels.

    Returns:
        (size, size) uint8 image.
    """
    findings = set(findings)
    base_rng, texture_rng, noise_rng, sig_rng = rng.spawn(4)
    if anatomy is None:
        anatomy = sample_anatomy(base_rng)
    cv = _Canvas(size, (float(base_rng.normal(0, 0.015)), float(base_rng.normal(0, 0.015))),
                 base_rng.uniform(0.94, 1.04), math.radians(base_rng.uniform(-3, 3)))
    X, Y = cv.X, cv.Y
    cv.img[:] = 18.0 + 8.0 * Y
    cv.blend(cv.ellipse(0.5, 0.68, 0.44, 0.78), anatomy.tissue + 22.0 * (Y - 0.5))
    emph = "Emphysema" in findings
    hw, hh, cx, cy = 0.27 * (1.06 if emph else 1), 0.28 * (1.12 if emph else 1), 0.52, 0.45
    dx, dy = (X - cx) / hw, (Y - cy) / hh
    rr = np.where(dy < 0, np.hypot(dx, dy), np.cbrt(np.abs(dx) ** 3 + np.abs(dy) ** 3))
    dome = cy + 0.86 * hh - (0.02 if emph else 0.07) * np.clip(1 - dx * dx, 0, 1) + 0.04 * dx
    lung = cv.soft((1 - rr) * hw) * cv.soft(dome - Y)
    cv.blend(lung, anatomy.lung_grey - (22 if emph else 0) + 10 * dy
             + _smooth_noise(texture_rng, size, 12, 6.0))
    big = "Cardiomegaly" in findings
    heart = cv.ellipse(0.38, 0.6, 0.13 * (1.4 if big else 1), 0.14 * (1.15 if big else 1))
    cv.blend(heart * 0.85, anatomy.tissue + 25.0)
    # Spine: vertebral bodies (bright blocks) separated by darker disc spaces, posteriorly.
    t = Y / 0.055
    column = cv.soft(0.045 - np.abs(X - 0.8))
    discs = cv.soft(0.006 - np.abs(t - np.round(t)) * 0.055)
    cv.img += 25.0 * column * (1.0 - discs)
    cv.blend(cv.soft(0.008 - np.abs(X - 0.16 - 0.1 * (Y - 0.4))) * cv.soft(0.62 - Y) * 0.7,
             anatomy.tissue + 40.0)  # sternum
    own = dict(zip(ALL_SIGNATURES, sig_rng.spawn(len(ALL_SIGNATURES))))
    for f in DRAW_ORDER:
        if f not in findings:
            continue
        r = own[f]
        if f == "Effusion":  # fluid in the posterior costophrenic sulcus (image right)
            level = cy + r.uniform(0.35, 0.6) * hh
            m = cv.soft(Y - level + 0.05 * np.clip(dx, 0, 1)) * cv.soft((1 - rr) * hw)
            cv.blend(m, np.maximum(cv.img, r.uniform(165, 185)))
        elif f in ("Mass", "Nodule"):
            x, y = cx + r.uniform(-0.5, 0.5) * hw, cy + r.uniform(-0.5, 0.3) * hh
            rad = r.uniform(0.05, 0.065) if f == "Mass" else r.uniform(0.016, 0.02)
            cv.blend(cv.disc(x, y, rad), r.uniform(200, 240))
        elif f in ("Pneumonia", "Consolidation", "Infiltration", "Atelectasis", "Edema",
                   "Fibrosis"):
            x, y = cx + r.uniform(-0.4, 0.4) * hw, cy + r.uniform(-0.2, 0.5) * hh
            cv.img += r.uniform(50, 75) * cv.gauss(x, y, 0.06, 0.05) * lung
        elif f == "Pneumothorax":
            cv.blend(cv.soft(rr - 0.75) * cv.soft(cy - 0.3 * hh - Y) * lung, 12.0)
        elif f == "Pleural_Thickening":
            cv.blend(cv.soft(0.035 - (1 - rr) * hw) * (X > cx) * lung, 175.0)
        elif f == "Hernia":
            cv.blend(cv.disc(0.52, 0.66, 0.055) * cv.soft(0.665 - Y), 35.0)
        elif f == "Support_Device":
            cv.blend(cv.segments([(0.45, -0.02), (0.5, 0.35)], 0.007), 250.0)
    return _finish(cv.img, anatomy, noise_rng)


# ---------------------------------------------------------------------------------------------
# NIH ChestX-ray14 look-alike
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _NihJob:
    """Everything a worker needs to render and save one NIH image."""

    path: str
    seed: int
    patient: int
    follow_up: int
    findings: tuple[str, ...]
    anatomy: Anatomy
    size: int


def _image_rngs(seed: int, tag: int, patient: int, image: int, findings: Iterable[str]
                ) -> tuple[np.random.Generator, dict[str, np.random.Generator]]:
    """Per-image generator plus per-finding ones (chronic findings seeded per patient)."""
    rngs = {}
    for f in findings:
        i = ALL_SIGNATURES.index(f)
        key = [seed, tag, 1, patient, i] if f in CHRONIC else [seed, tag, 2, patient, image, i]
        rngs[f] = np.random.default_rng(key)
    return np.random.default_rng([seed, tag, 0, patient, image]), rngs


def _render_nih(job: _NihJob) -> list[Box]:
    """Render one NIH image to job.path; returns its boxes."""
    rng, frngs = _image_rngs(job.seed, 10, job.patient, job.follow_up, job.findings)
    img, boxes = render_phantom(rng, job.findings, job.anatomy, job.size, frngs)
    Image.fromarray(img).save(job.path, optimize=False, compress_level=6)
    return boxes


def _one_thread_per_worker() -> None:
    """Pool initializer: torch (the photo primitives of chexnet/datatools/corruptions.py) on one
    thread.
    The worker processes are the parallelism already, and a forked worker of a parent that has
    run a multi-threaded torch op hangs in its first OpenMP parallel region (libgomp)."""
    torch.set_num_threads(1)


def _run_jobs(fn: Callable, jobs: list, workers: int, progress: bool, desc: str) -> Iterator:
    """Map fn over jobs in order, in `workers` processes, with an optional tqdm bar."""
    bar = None
    if progress:
        try:
            from tqdm import tqdm
        except ImportError:  # the bar is a nicety; generation works without it
            tqdm = None
        if tqdm is not None:
            bar = tqdm(total=len(jobs), desc=desc, unit="img")
    try:
        if workers > 1:
            # fork is cheap on Linux; elsewhere it is unsafe or absent, so spawn (slower start).
            method = "fork" if sys.platform.startswith("linux") else "spawn"
            ctx = multiprocessing.get_context(method)
            with ctx.Pool(workers, initializer=_one_thread_per_worker) as pool:
                for out in pool.imap(fn, jobs, chunksize=16):
                    if bar is not None:
                        bar.update()
                    yield out
        else:
            for job in jobs:
                out = fn(job)
                if bar is not None:
                    bar.update()
                yield out
    finally:
        if bar is not None:
            bar.close()


def _follow_up_counts(rng: np.random.Generator, n_images: int) -> list[int]:
    """Images per patient, 1-5 follow-ups (mean 2.5), summing to exactly n_images."""
    counts: list[int] = []
    while sum(counts) < n_images:
        counts.append(int(rng.choice([1, 2, 3, 4, 5], p=[0.3, 0.25, 0.2, 0.15, 0.1])))
    counts[-1] -= sum(counts) - n_images
    return counts


def remove_positive_labels(labels: np.ndarray, sex: np.ndarray, target: str, fraction: float,
                           rng: np.random.Generator) -> np.ndarray:
    """Under-diagnosis in the labels: each positive label of an image of sex `target` is
    removed with probability `fraction`, as a reader who misses findings more often in one
    group would write them. The images are untouched: they still show the finding.

    Args:
        labels: (N, F) bool, the findings each image shows.
        sex: (N,) the `Patient Gender` of each image ("M" or "F").
        target: the sex whose labels lose positives.
        fraction: probability of removing each of its positive labels, in [0, 1].
        rng: random generator (consumed: one uniform per entry of labels).

    Returns:
        (N, F) bool, the labels as written to Data_Entry_2017.csv.
    """
    if target not in ("M", "F") or not 0.0 <= fraction <= 1.0:
        raise ValueError(f"underdiagnose ({target!r}, {fraction}): expected sex 'M' or 'F' and "
                         "a fraction in [0, 1]")
    drop = (rng.random(labels.shape) < fraction) & (np.asarray(sex) == target)[:, None]
    return labels & ~drop


def stand_in_scores(shown: np.ndarray, seed: int = 0, separation: float = 2.5,
                    overconfidence: float = 1.0) -> np.ndarray:
    """Probabilities of a stand-in model that sees what each demo image shows, for exercising
    the evaluation without training: a known answer to check an analysis against.

    Each finding's evidence is x = separation * shown + N(0, 1); the Bayes posterior given x
    and the finding's prevalence in `shown` is sigmoid(separation * x - separation^2 / 2 +
    log odds of the prevalence), so with overconfidence 1 the probabilities are calibrated (in
    expectation) and the AUC is about Phi(separation / sqrt 2). overconfidence k multiplies
    that logit: k > 1 gives the over-confident probabilities temperature scaling corrects
    (its fitted temperature is about k).

    Args:
        shown: (N, F) 0/1, the findings the images show (e.g. the labels of a demo generated
            without --underdiagnose).
        seed: seed of the evidence noise.
        separation, overconfidence: as above.

    Returns:
        (N, F) float64 probabilities.
    """
    shown = np.asarray(shown, np.float64)
    rng = np.random.default_rng([seed, 11])
    evidence = separation * shown + rng.standard_normal(shown.shape)
    prevalence = np.clip(shown.mean(axis=0), 1e-6, 1 - 1e-6)
    logit = separation * evidence - separation ** 2 / 2 + np.log(prevalence / (1 - prevalence))
    return 1.0 / (1.0 + np.exp(-overconfidence * logit))


def _plan_nih_images(root: Path, size: int, seed: int, rng: np.random.Generator,
                     counts: np.ndarray, labels: np.ndarray, written: np.ndarray,
                     anatomies: Sequence[Anatomy], ages: np.ndarray, genders: np.ndarray
                     ) -> tuple[list[_NihJob], list[list[str]]]:
    """Plan the NIH images, patient by patient and follow-up by follow-up: one render job and one
    Data_Entry_2017.csv row per image.

    Args:
        root: output folder; images go to root/images.
        size: image width = height in pixels.
        seed: random seed of make_nih_demo (passed on to the render jobs).
        rng: make_nih_demo's generator, consumed here: one uniform per image (view position).
        counts: (P,) number of images of each patient.
        labels: (N, 14) bool, the findings each image shows (drawn).
        written: (N, 14) bool, the findings written to the CSV (labels, or fewer).
        anatomies, ages, genders: per patient.

    Returns:
        (jobs, rows): the _NihJob of each image and its 11-column CSV row, in image order.
    """
    jobs, rows, i = [], [], 0
    for p, count in enumerate(counts):
        pid = p + 1
        for fu in range(count):
            findings = tuple(f for f, on in zip(NIH_FINDINGS, labels[i]) if on)
            name = f"{pid:08d}_{fu:03d}.png"
            jobs.append(_NihJob(str(root / "images" / name), seed, pid, fu, findings, anatomies[p],
                                size))
            view = "AP" if rng.random() < (0.5 if findings else 0.25) else "PA"
            spacing = 350.0 / size
            labelled = [f for f, on in zip(NIH_FINDINGS, written[i]) if on]
            rows.append([name, "|".join(labelled) or NIH_NO_FINDING, str(fu), str(pid),
                         str(min(int(ages[p]) + fu // 2, 95)), str(genders[p]), view, str(size),
                         str(size), repr(spacing), repr(spacing)])
            i += 1
    return jobs, rows


def _write_nih_csvs(root: Path, rows: list[list[str]], jobs: Sequence[_NihJob],
                    all_boxes: Iterable[list[Box]]) -> tuple[Path, Path, int]:
    """Write root/Data_Entry_2017.csv (the rows) and root/BBox_List_2017.csv (one line per box of
    each job's image, NIH label spelling, empty trailing columns as in the real file).

    Returns:
        (data entry path, bbox list path, number of boxes written).
    """
    entry = root / NIH_ENTRY_FILE
    with open(entry, "w", newline="") as fh:
        fh.write(NIH_ENTRY_HEADER + "\n")
        csv.writer(fh, lineterminator="\n").writerows(rows)
    bbox = root / NIH_BBOX_FILE
    n_boxes = 0
    with open(bbox, "w", newline="") as fh:
        fh.write(NIH_BBOX_HEADER + "\n")
        for job, boxes in zip(jobs, all_boxes):
            for f, x, y, w, h in boxes:
                fh.write(f"{Path(job.path).name},{BBOX_LABEL_NAME.get(f, f)},"
                         f"{float(x)},{float(y)},{float(w)},{float(h)},,,\n")
                n_boxes += 1
    return entry, bbox, n_boxes


def make_nih_demo(root: str | os.PathLike, n_images: int = 3000, size: int = 128, seed: int = 0,
                  workers: int = 1, progress: bool = False,
                  underdiagnose: tuple[str, float] | None = None) -> dict:
    """Write a small synthetic NIH ChestX-ray14 look-alike.

    Layout (as the real release): `root/images/PPPPPPPP_FFF.png` (mode L, size x size; patient id,
    follow-up number from 000), `root/Data_Entry_2017.csv` (11 columns, real header) and
    `root/BBox_List_2017.csv` (real header, one box per drawn finding instance, all 14 findings,
    pixel coordinates of the generated image, Infiltration spelled `Infiltrate`).
    OriginalImage[Width,Height] is the generated size and the pixel spacing assumes a 350 mm film.

    Args:
        root: output folder (created).
        n_images: number of images.
        size: image width = height in pixels.
        seed: random seed; the output bytes depend only on (n_images, size, seed).
        workers: processes rendering images.
        progress: show a tqdm progress bar.
        underdiagnose: (sex, fraction), e.g. ("F", 0.5): inject a known subgroup effect, each
            positive label of that sex's images removed from Data_Entry_2017.csv with that
            probability (`remove_positive_labels`). Off by default. Images, boxes and every
            other column are the same as without it (its draws come from their own stream).

    Returns:
        Summary dict: n_images, n_patients, n_boxes, no_finding (fraction), prevalence
        {finding: fraction of images}, both as the labels are written, removed_labels (how many
        positive labels the injection removed, 0 without it), seconds, and paths root /
        images / data_entry / bbox.
    """
    if n_images < 1:
        raise ValueError(f"n_images must be >= 1, got {n_images}")
    t0 = time.perf_counter()
    root = Path(root)
    (root / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng([seed, 1])
    counts = _follow_up_counts(rng, n_images)
    patient_of_image = np.repeat(np.arange(len(counts)), counts)
    labels = sample_findings(rng, patient_of_image)  # (N, 14)
    anatomies = [sample_anatomy(np.random.default_rng([seed, 2, p + 1]))
                 for p in range(len(counts))]
    ages = rng.integers(18, 86, len(counts))
    genders = rng.choice(["M", "F"], len(counts), p=[0.56, 0.44])
    written = labels
    if underdiagnose is not None:
        written = remove_positive_labels(labels, genders[patient_of_image], *underdiagnose,
                                         np.random.default_rng([seed, 9]))
    jobs, rows = _plan_nih_images(root, size, seed, rng, counts, labels, written, anatomies, ages,
                                  genders)
    all_boxes = list(_run_jobs(_render_nih, jobs, workers, progress, "NIH demo"))
    entry, bbox, n_boxes = _write_nih_csvs(root, rows, jobs, all_boxes)
    return dict(n_images=n_images, n_patients=len(counts), n_boxes=n_boxes,
                no_finding=float((~written.any(1)).mean()),
                prevalence={f: float(written[:, k].mean()) for k, f in enumerate(NIH_FINDINGS)},
                removed_labels=int(labels.sum() - written.sum()),
                seconds=round(time.perf_counter() - t0, 2),
                paths=dict(root=str(root), images=str(root / "images"), data_entry=str(entry),
                           bbox=str(bbox)))


# ---------------------------------------------------------------------------------------------
# CheXphoto look-alike
# ---------------------------------------------------------------------------------------------
def chexpert_observations(findings: Iterable[str]) -> dict[str, bool]:
    """CheXpert observations implied by drawn signatures.

    The 7 shared findings map through NIH_TO_CHEXPERT; Lung Lesion = Mass or Nodule; Lung Opacity =
    Consolidation, Pneumonia, Edema, Atelectasis or Infiltration; Enlarged Cardiomediastinum =
    Cardiomegaly or Widened_Mediastinum; Pleural Other = Pleural_Thickening; Fracture =
    Rib_Fracture; Support Devices = Support_Device. No Finding follows CheXpert's labeler: no
    pathology among the other observations (Support Devices do not count), so an image showing only
    Emphysema, Fibrosis or Hernia (no CheXpert column) is No Finding.

    Args:
        findings: names from NIH_FINDINGS and EXTRA_SIGNATURES.

    Returns:
        {observation: present} for all 14 CHEXPERT_OBSERVATIONS.
    """
    f = set(findings)
    obs = {o: False for o in CHEXPERT_OBSERVATIONS}
    for nih, chx in NIH_TO_CHEXPERT.items():
        obs[chx] = nih in f
    obs["Lung Lesion"] = bool(f & {"Mass", "Nodule"})
    obs["Lung Opacity"] = bool(f & {"Consolidation", "Pneumonia", "Edema", "Atelectasis",
                                    "Infiltration"})
    obs["Enlarged Cardiomediastinum"] = bool(f & {"Cardiomegaly", "Widened_Mediastinum"})
    obs["Pleural Other"] = "Pleural_Thickening" in f
    obs["Fracture"] = "Rib_Fracture" in f
    obs["Support Devices"] = "Support_Device" in f
    obs["No Finding"] = not any(v for o, v in obs.items()
                                if o not in ("No Finding", "Support Devices"))
    return obs


def _film_quad(size: int, rng: np.random.Generator) -> list[list[float]]:
    """Where a photo shows the film (TL, TR, BR, BL corners, pixels): a margin of 5-12% of the
    side, rotated by up to 4 degrees, each corner off by up to 5% (a hand-held phone)."""
    m, j = size * rng.uniform(0.05, 0.12), size * 0.05
    rot = math.radians(rng.uniform(-4, 4))
    half = size / 2 - m
    quad = []
    for cx, cy in [(-1, -1), (1, -1), (1, 1), (-1, 1)]:
        x, y = cx * half, cy * half
        quad.append([size / 2 + x * math.cos(rot) - y * math.sin(rot) + rng.uniform(-j, j),
                     size / 2 + x * math.sin(rot) + y * math.cos(rot) + rng.uniform(-j, j)])
    return quad


def _natural_photo(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A smartphone photo of the film: lower contrast, the film a tilted, rotated quadrilateral
    on a dark tinted background, a glare blob, blur, sensor noise and a colour cast."""
    size = img.shape[0]
    img = corruptions.brightness_contrast(img, rng.uniform(0.65, 0.85), rng.uniform(-10, 15),
                                          128.0)
    corners, quad = [[0, 0], [size, 0], [size, size], [0, size]], _film_quad(size, rng)
    film = corruptions.perspective(Image.fromarray(img.astype(np.float32)), corners, quad)
    inside = np.asarray(corruptions.perspective(Image.new("F", (size, size), 1.0), corners, quad))
    u, v = _pixel_grid(size)
    bg = rng.uniform(25, 70) + 25.0 * (u * rng.uniform(-1, 1) + v * rng.uniform(-1, 1))
    img = inside * np.asarray(film) + (1 - inside) * (bg + _smooth_noise(rng, size, 6, 6.0))
    centre = (rng.uniform(0.2, 0.8) * size, rng.uniform(0.2, 0.8) * size)
    img = corruptions.glare(img, centre, rng.uniform(0.06, 0.16) * size, rng.uniform(50, 110))
    img = corruptions.blur(img, rng.uniform(0.4, 1.0) * size / 128)
    img = corruptions.noise(img, rng.uniform(2, 5), rng)
    return corruptions.colour_cast(img, (1.0, rng.uniform(0.94, 1.0), rng.uniform(0.85, 1.05)))


def _screen_photo(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A photo of the X-ray on a monitor: moire bands (2-5 beats across the image), the
    screen's pixel columns every 3 pixels, sensor noise."""
    size = img.shape[0]
    period = rng.uniform(corruptions.MIN_MOIRE_PERIOD, 3.6)  # pixels
    delta = rng.uniform(2, 5) * period / size  # grating rotation giving that many beats
    img = corruptions.moire(img, rng.uniform(0, math.pi), delta, period,
                            rng.uniform(0, 2 * math.pi, 2), rng.uniform(8, 16))
    img = corruptions.pixel_grid(img, 3, rng.uniform(3, 7))
    img = corruptions.noise(img, rng.uniform(4, 8), rng)
    return corruptions.colour_cast(img, (1.0, 1.0, 1.0))


def _retouched(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A synthetically photographed X-ray: gamma, contrast and brightness changes, blur, mild
    noise, grey."""
    size = img.shape[0]
    img = corruptions.gamma(img, rng.uniform(0.8, 1.25))
    img = corruptions.brightness_contrast(img, rng.uniform(0.7, 1.3),
                                          255.0 * rng.uniform(-0.1, 0.1), 127.5)
    img = corruptions.blur(img, rng.uniform(0.3, 1.2) * size / 128)
    img = corruptions.noise(img, rng.uniform(1, 4), rng)
    return corruptions.colour_cast(img, (1.0, 1.0, 1.0))


_RENDERERS: dict[str, Callable[[np.ndarray, np.random.Generator], np.ndarray]] = {
    "natural": _natural_photo, "synthetic/digital": _screen_photo,
    "synthetic/photographic": _retouched,
}
assert tuple(_RENDERERS) == RENDITIONS


def render_rendition(xray: np.ndarray, rendition: str, rng: np.random.Generator) -> np.ndarray:
    """Turn a clean X-ray into a CheXphoto-style rendition, chaining the photo effects of
    chexnet/datatools/corruptions.py with magnitudes drawn from `rng`.

    - "natural": a smartphone photo of the film/monitor: the film is a tilted, rotated quadrilateral
      on a dark tinted background, with lower contrast, a glare blob, blur, noise and a colour cast.
    - "synthetic/digital": screen moire, the screen's pixel grid and noise.
    - "synthetic/photographic": brightness, contrast and gamma changes, blur, mild noise.

    Args:
        xray: (S, S) uint8 grey image.
        rendition: one of RENDITIONS.
        rng: random generator.

    Returns:
        (S, S, 3) uint8 RGB image.
    """
    if rendition not in _RENDERERS:
        raise ValueError(f"unknown rendition {rendition!r}: expected one of {RENDITIONS}")
    rgb = _RENDERERS[rendition](xray.astype(np.float32), rng)
    return np.clip(np.rint(rgb), 0, 255).astype(np.uint8)


@dataclass(frozen=True)
class _PhotoJob:
    """One CheXphoto X-ray: rendered once, saved in one or more renditions."""

    paths: tuple[str, ...]        # absolute output paths, one per rendition
    renditions: tuple[str, ...]
    seed: int
    tag: int                      # 20 train, 30 valid: separate random streams
    patient: int
    image: int                    # study * 10 + view, unique within the patient
    lateral: bool
    findings: tuple[str, ...]
    anatomy: Anatomy
    size: int


def _render_photo(job: _PhotoJob) -> None:
    """Render one X-ray and save each of its renditions as JPEG."""
    rng, frngs = _image_rngs(job.seed, job.tag, job.patient, job.image, job.findings)
    if job.lateral:
        xray = render_lateral(rng, job.findings, job.anatomy, job.size)
    else:
        xray, _ = render_phantom(rng, job.findings, job.anatomy, job.size, frngs)
    for k, (path, rendition) in enumerate(zip(job.paths, job.renditions)):
        rrng = np.random.default_rng([job.seed, job.tag, 3, job.patient, job.image, k])
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(render_rendition(xray, rendition, rrng)).save(path, quality=90)


def _chexphoto_split(root: Path, split: str, n_rows: int, first_patient: int, seed: int, size: int,
                     renditions_per_xray: int
                     ) -> tuple[list[_PhotoJob], list[list[str]], np.ndarray]:
    """Plan one split: jobs to render, CSV rows, and the (rows, observations) 0/1 label matrix."""
    tag = 20 if split == "train" else 30
    rng = np.random.default_rng([seed, tag])
    n_xrays = math.ceil(n_rows / renditions_per_xray)
    if n_xrays <= 0:
        return [], [], np.zeros((0, len(CHEXPERT_OBSERVATIONS)), bool)
    # Patients with 1-3 studies; a study has a frontal view and sometimes a lateral one.
    views: list[tuple[int, int, bool]] = []  # (patient index, study, lateral)
    p = 0
    while len(views) < n_xrays:
        for study in range(1, int(rng.choice([1, 2, 3], p=[0.6, 0.3, 0.1])) + 1):
            views.append((p, study, False))
            if rng.random() < 0.12:
                views.append((p, study, True))
        p += 1
    views = views[:n_xrays]
    n_patients = views[-1][0] + 1
    # One latent draw per study: frontal and lateral of a study show the same findings.
    study_keys = sorted({(pp, s) for pp, s, _ in views})
    study_index = {k: i for i, k in enumerate(study_keys)}
    labels = sample_findings(rng, np.array([k[0] for k in study_keys]), ALL_SIGNATURES)
    anatomies = [sample_anatomy(np.random.default_rng([seed, tag, 2, q]))
                 for q in range(n_patients)]
    sexes = rng.choice(["Male", "Female"], n_patients)
    ages = rng.integers(18, 90, n_patients)
    jobs, rows, obs_rows = [], [], []
    n_left = n_rows
    for pp, study, lateral in views:
        pid = first_patient + pp
        findings = tuple(f for f, on in zip(ALL_SIGNATURES, labels[study_index[(pp, study)]]) if on)
        view = "view2_lateral.jpg" if lateral else "view1_frontal.jpg"
        if split == "train":  # one rendition per X-ray, mostly natural photos
            rends = (str(rng.choice(RENDITIONS, p=[0.5, 0.25, 0.25])),)
        else:  # every X-ray in every rendition (the last one possibly cut short)
            rends = RENDITIONS[:min(renditions_per_xray, n_left)]
        n_left -= len(rends)
        rels = [f"{CHEXPHOTO_DIR}/{split}/{r}/patient{pid:05d}/study{study}/{view}" for r in rends]
        jobs.append(_PhotoJob(tuple(str(root / r) for r in rels), rends, seed, tag, pid,
                              study * 10 + int(lateral), lateral, findings, anatomies[pp], size))
        obs = chexpert_observations(findings)
        frontal_lateral = "Lateral" if lateral else "Frontal"
        ap_pa = "" if lateral else ("AP" if rng.random() < (0.7 if findings else 0.4) else "PA")
        for rel in rels:
            values = [_chexpert_value(obs[o], o, split, rng) for o in CHEXPERT_OBSERVATIONS]
            if split == "train":  # No Finding is 1.0 only when nothing else is positive/uncertain
                pathologies = [v for o, v in zip(CHEXPERT_OBSERVATIONS, values)
                               if o not in ("No Finding", "Support Devices")]
                values[0] = "1.0" if not any(v in ("1.0", "-1.0") for v in pathologies) else ""
            rows.append([rel, str(sexes[pp]), str(int(ages[pp])), frontal_lateral, ap_pa] + values)
            obs_rows.append([obs[o] for o in CHEXPERT_OBSERVATIONS])
    return jobs, rows, np.array(obs_rows, bool).reshape(-1, len(CHEXPERT_OBSERVATIONS))


def _chexpert_value(positive: bool, observation: str, split: str, rng: np.random.Generator) -> str:
    """CSV cell for one observation: valid 1.0/0.0; train 1.0/-1.0 for positives (10% uncertain)
    and blank/0.0/-1.0 for negatives (3% uncertain, most not mentioned, as CheXpert's labeler)."""
    if split != "train":
        return "1.0" if positive else "0.0"
    if observation == "No Finding":
        return ""  # set from the other cells by the caller
    r = rng.random()
    if positive:
        return "-1.0" if r < 0.10 else "1.0"
    if r < 0.03:
        return "-1.0"
    return "0.0" if r < 0.30 else ""


def make_chexphoto_demo(root: str | os.PathLike, n_train: int = 1200, n_valid: int = 240,
                        size: int = 128, seed: int = 0, workers: int = 1,
                        progress: bool = False) -> dict:
    """Write a small synthetic CheXphoto look-alike.

    Layout (as the real release): `root/CheXphoto-v1.1/{train,valid}.csv` in the CheXpert schema
    (`Path,Sex,Age,Frontal/Lateral,AP/PA` + the 14 observations) and RGB JPEGs at
    `root/<Path>`, e.g. `CheXphoto-v1.1/train/natural/patient00001/study1/view1_frontal.jpg` or
    `CheXphoto-v1.1/valid/synthetic/digital/patient64541/study1/view1_frontal.jpg`. Train rows are
    one rendition per X-ray with values 1.0/0.0/-1.0/blank; valid X-rays (patients from 64541)
    appear in all three renditions with the same labels, values 1.0/0.0 only. About 12% of studies
    add a lateral view (`view2_lateral.jpg`, AP/PA blank).

    Args:
        root: output folder (created).
        n_train: rows (= images) in train.csv.
        n_valid: rows in valid.csv (about n_valid / 3 X-rays).
        size: image width = height in pixels.
        seed: random seed; the output bytes depend only on the arguments but `workers`.
        workers: processes rendering images.
        progress: show a tqdm progress bar.

    Returns:
        Summary dict: n_train, n_valid, n_valid_xrays, n_patients {split: count}, prevalence
        {split: {observation: fraction of rows positive}}, seconds, and paths root / train_csv /
        valid_csv.
    """
    t0 = time.perf_counter()
    root = Path(root)
    base = root / CHEXPHOTO_DIR
    base.mkdir(parents=True, exist_ok=True)
    header = list(CHEXPERT_META_COLS) + list(CHEXPERT_OBSERVATIONS)
    summary: dict = dict(n_patients={}, prevalence={})
    for split, n_rows, first, per in (("train", n_train, 1, 1),
                                      ("valid", n_valid, CHEXPHOTO_FIRST_VALID_PATIENT, 3)):
        jobs, rows, obs = _chexphoto_split(root, split, n_rows, first, seed, size, per)
        for _ in _run_jobs(_render_photo, jobs, workers, progress, f"CheXphoto {split}"):
            pass
        with open(base / f"{split}.csv", "w", newline="") as fh:
            csv.writer(fh, lineterminator="\n").writerows([header] + rows)
        summary[f"n_{split}"] = len(rows)
        summary["n_patients"][split] = len({j.patient for j in jobs})
        summary["prevalence"][split] = {o: float(obs[:, k].mean()) if len(obs) else 0.0
                                        for k, o in enumerate(CHEXPERT_OBSERVATIONS)}
        if split == "valid":
            summary["n_valid_xrays"] = len(jobs)
    summary["seconds"] = round(time.perf_counter() - t0, 2)
    summary["paths"] = dict(root=str(root), train_csv=str(base / "train.csv"),
                            valid_csv=str(base / "valid.csv"))
    return summary


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------
def _print_prevalence(title: str, prevalence: Mapping[str, float]) -> None:
    print(title)
    for name, frac in prevalence.items():
        print(f"  {name:<28} {100 * frac:5.1f}%")


def _underdiagnose_arg(text: str) -> tuple[str, float]:
    """argparse type of --underdiagnose: 'F:0.5' -> ('F', 0.5)."""
    sex, _, fraction = text.partition(":")
    try:
        value = float(fraction)
    except ValueError:
        value = math.nan
    if sex not in ("M", "F") or not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"{text!r}: expected SEX:FRACTION with SEX M or F and "
                                         "FRACTION in [0, 1], e.g. F:0.5")
    return sex, value


@command
def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point (demo_data.py): write the dataset(s), print a summary."""
    generate(argv)
    return 0


class DemoError(CommandError, ValueError):
    """demo_data.py refuses its --out (the message says why and what to do)."""


def generate(argv: Sequence[str] | None = None) -> dict:
    """Parse demo_data.py's arguments, write the dataset(s), print and return a summary."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True,
                    help="output folder; writes OUT/nih and/or OUT/chexphoto")
    ap.add_argument("--kind", choices=("nih", "chexphoto", "both"), default="both")
    ap.add_argument("--n-images", type=at_least(1), default=3000, help="NIH images")
    ap.add_argument("--n-train", type=at_least(1), default=1200, help="CheXphoto train rows")
    ap.add_argument("--n-valid", type=at_least(1), default=240, help="CheXphoto valid rows")
    ap.add_argument("--png-size", type=at_least(16), default=128,
                    help="side in pixels of the generated images (the model's input size is "
                    "retrain.py --image-size)")
    ap.add_argument("--seed", type=integer(0), default=0)
    ap.add_argument("--workers", type=at_least(1), default=1, help="rendering processes")
    ap.add_argument("--underdiagnose", metavar="SEX:FRACTION", type=_underdiagnose_arg,
                    help="NIH demo: remove each positive label of one sex's images with this "
                    "probability (a known subgroup effect in the labels), e.g. F:0.5; off by "
                    "default")
    args = ap.parse_args(argv)
    out = Path(args.out)
    kinds = ("nih", "chexphoto") if args.kind == "both" else (args.kind,)
    check_outputs({"--out": out, **{f"--out ({k})": out / k for k in kinds}}, {},
                  folders=("--out", *(f"--out ({k})" for k in kinds)))
    for kind in kinds:
        if (out / kind).is_dir() and any((out / kind).iterdir()):
            raise DemoError(f"{out / kind} already holds files: demo_data.py writes a dataset "
                            "only into a new or empty folder, so that it never mixes with or "
                            "replaces another. Choose another --out, or delete that folder.")
    result = {}
    if args.kind in ("nih", "both"):
        s = make_nih_demo(out / "nih", args.n_images, args.png_size, args.seed, args.workers,
                          progress=True, underdiagnose=args.underdiagnose)
        print(f"NIH demo: {s['n_images']} images of {s['n_patients']} patients, "
              f"{s['n_boxes']} boxes, {100 * s['no_finding']:.1f}% No Finding, "
              f"{s['seconds']} s -> {s['paths']['root']}")
        if args.underdiagnose:
            sex, fraction = args.underdiagnose
            print(f"injected under-diagnosis: {s['removed_labels']} positive labels of sex {sex} "
                  f"removed (each with probability {fraction}); the images still show them")
        _print_prevalence("prevalence per finding:", s["prevalence"])
        result["nih"] = s
    if args.kind in ("chexphoto", "both"):
        s = make_chexphoto_demo(out / "chexphoto", args.n_train, args.n_valid, args.png_size,
                                args.seed, args.workers, progress=True)
        print(f"CheXphoto demo: {s['n_train']} train rows ({s['n_patients']['train']} patients), "
              f"{s['n_valid']} valid rows ({s['n_valid_xrays']} X-rays, {s['n_patients']['valid']} "
              f"patients), {s['seconds']} s -> {s['paths']['root']}")
        _print_prevalence("train prevalence (drawn findings, before -1/blank labelling):",
                          s["prevalence"]["train"])
        result["chexphoto"] = s
    return result
