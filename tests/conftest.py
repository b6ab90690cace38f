"""Shared fixtures. The repo root goes on sys.path so tests import the scripts as modules."""
from __future__ import annotations

import os
import sys
from pathlib import Path

# As retrain.py does, before anything imports torch: the suite runs on 2 shared cores, where
# spinning OpenMP threads slow every CPU training step 10-30x.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SHARED_DATA = ROOT.parent / "shared" / "data"


def shared(*parts: str) -> Path:
    """A path under ../shared/data; the calling test is skipped when it is absent."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} not present (the shared sample data is optional)")
    return path


def nih_demo(tmp_path_factory, n_images: int, size: int, seed: int) -> Path:
    """A small NIH-format demo dataset (demo_data.make_nih_demo) in a fresh temp folder."""
    from demo_data import make_nih_demo

    root = tmp_path_factory.mktemp("demo")
    make_nih_demo(root, n_images=n_images, size=size, seed=seed)
    return root
