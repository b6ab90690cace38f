"""Every image mode becomes 8-bit grey; unreadable files raise with their name; layouts are
found."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from chexnet.data import ImageReadError, build_transform, index_images, load_xray
from conftest import shared


@pytest.fixture
def gray(tmp_path):
    arr = np.tile(np.arange(64, dtype=np.uint8) * 4, (64, 1))
    return arr


@pytest.mark.parametrize("mode", ["L", "RGB", "RGBA", "LA", "P"])
def test_modes_become_gray(tmp_path, gray, mode):
    path = tmp_path / f"x_{mode}.png"
    Image.fromarray(gray, "L").convert(mode).save(path)
    img = load_xray(path)
    assert img.mode == "L"
    np.testing.assert_allclose(np.asarray(img, dtype=int), gray, atol=1)


def test_16bit_png_is_rescaled_not_clipped(tmp_path):
    arr = (np.tile(np.arange(64, dtype=np.uint16), (64, 1)) * 64)  # 0..4032, a 12-bit range
    path = tmp_path / "x16.png"
    Image.fromarray(arr).save(path)
    assert Image.open(path).mode.startswith("I")
    out = np.asarray(load_xray(path))
    assert out.min() == 0 and out.max() == 255
    assert (np.diff(out[0].astype(int)) >= 0).all()  # order kept, not saturated


def test_truncated_and_empty_files_are_named(tmp_path, gray):
    good = tmp_path / "good.png"
    Image.fromarray(gray).save(good)
    cut = tmp_path / "cut.png"
    cut.write_bytes(good.read_bytes()[:60])
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    for path in (cut, empty, tmp_path / "absent.png"):
        with pytest.raises(ImageReadError, match=path.name):
            load_xray(path)


def test_transform_matches_reference_rgb_pipeline(tmp_path):
    """Our grey path equals the reference's convert('RGB') + torchvision v1 transforms."""
    from torchvision import transforms as v1

    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (100, 120), dtype=np.uint8), "L")
    reference = v1.Compose([v1.Resize(32), v1.CenterCrop(32), v1.ToTensor(),
                            v1.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])])
    ours = build_transform(32)(img)
    expected = reference(img.convert("RGB"))
    assert ours.shape == (3, 32, 32)
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("layout", ["images", "images_001/images", "images_224", "."])
def test_index_images_layouts(tmp_path, gray, layout):
    folder = tmp_path / layout
    folder.mkdir(parents=True, exist_ok=True)
    Image.fromarray(gray).save(folder / "00000001_000.png")
    found = index_images(tmp_path)
    assert found["00000001_000.png"] == folder / "00000001_000.png"


def test_kaggle_layout_spans_folders(tmp_path, gray):
    for i, name in enumerate(["00000001_000.png", "00000002_000.png"]):
        folder = tmp_path / f"images_{i + 1:03d}" / "images"
        folder.mkdir(parents=True)
        Image.fromarray(gray).save(folder / name)
    assert set(index_images(tmp_path)) == {"00000001_000.png", "00000002_000.png"}


def test_real_rgba_nih_images_load():
    for name in ("00000100_000.png", "00001369_000.png"):
        path = shared("nih", "images", name)
        assert Image.open(path).mode == "RGBA"
        img = load_xray(path)
        assert img.mode == "L" and img.size == (1024, 1024)
        assert 20 < np.asarray(img).mean() < 235  # a real X-ray, not a blank
