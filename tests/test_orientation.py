"""EXIF orientation is applied wherever an image is opened: a phone photo tagged "rotate 90"
must reach the network upright, not sideways."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from chexnet import cache as cxr_cache
from chexnet.datatools import cache_build
from chexnet.files import sha256_file
from chexnet.analysis import predict
from chexnet.data import build_transform, load_xray

ORIENTATION = 0x0112


def asymmetric(h: int = 48, w: int = 64) -> np.ndarray:
    """A grey image that no flip or rotation maps onto itself: (h, w) uint8."""
    yy, xx = np.mgrid[0:h, 0:w]
    img = (xx * 3 + yy * 1) % 256
    img[: h // 4, : w // 3] = 255  # a bright block in the top-left corner
    return img.astype(np.uint8)


def upright_for(stored: np.ndarray, tag: int) -> np.ndarray:
    """What a viewer shows for pixels stored with this EXIF orientation (the EXIF standard's
    table, written out with numpy: 3 = rotated 180, 6 = stored rotated 90 counter-clockwise,
    8 = stored rotated 90 clockwise, 2 = mirrored)."""
    return {1: stored, 2: stored[:, ::-1], 3: np.rot90(stored, 2), 6: np.rot90(stored, -1),
            8: np.rot90(stored, 1)}[tag]


def save_tagged(path, pixels: np.ndarray, tag: int) -> None:
    exif = Image.Exif()
    exif[ORIENTATION] = tag
    Image.fromarray(pixels, "L").save(path, exif=exif)


@pytest.mark.parametrize("tag", [1, 2, 3, 6, 8])
def test_load_xray_applies_the_orientation_tag(tmp_path, tag):
    stored = asymmetric()
    path = tmp_path / f"photo_{tag}.png"  # PNG carries EXIF too, and is lossless
    save_tagged(path, stored, tag)
    assert Image.open(path).getexif().get(ORIENTATION) == tag
    np.testing.assert_array_equal(np.asarray(load_xray(path)), upright_for(stored, tag))


def test_a_phone_jpeg_tagged_rotate_90_is_read_upright(tmp_path):
    stored = asymmetric(96, 128)
    path = tmp_path / "phone.jpg"
    exif = Image.Exif()
    exif[ORIENTATION] = 6
    Image.fromarray(stored, "L").convert("RGB").save(path, quality=95, exif=exif)
    got = np.asarray(load_xray(path), dtype=int)
    assert got.shape == (128, 96)  # portrait, as the phone showed it
    assert np.abs(got - upright_for(stored, 6)).mean() < 3  # JPEG noise only


def test_cache_and_predict_see_the_upright_image(tmp_path):
    stored = asymmetric(80, 60)
    tagged, upright = tmp_path / "tagged.png", tmp_path / "upright.png"
    save_tagged(tagged, stored, 6)
    Image.fromarray(np.ascontiguousarray(upright_for(stored, 6)), "L").save(upright)
    # The cache build.
    labels = tmp_path / "labels.txt"
    labels.write_text("tagged.png\nupright.png\n")
    cache_build.build_cache(cxr_cache.cache_dir(tmp_path, 32), ["tagged.png", "upright.png"],
                          [tagged, upright], 32, sha256_file(labels), workers=1,
                          progress=False)
    rows = np.asarray(cxr_cache.open_cache(tmp_path, 32, labels).images())
    np.testing.assert_array_equal(rows[0], rows[1])
    # predict.py's reader and the dataset transform.
    a = predict.preprocess(predict.load_any(tagged), 32)
    b = predict.preprocess(predict.load_any(upright), 32)
    assert torch.equal(a, b)
    assert torch.equal(build_transform(32)(load_xray(tagged)), b[0])


def test_an_old_cache_version_is_rebuilt(tmp_path, capsys):
    """Caches written before orientation was applied may hold sideways photos: not reused."""
    path = tmp_path / "a.png"
    save_tagged(path, asymmetric(), 1)
    labels = tmp_path / "labels.txt"
    labels.write_text("a.png\n")
    folder = cxr_cache.cache_dir(tmp_path, 16)
    sha = sha256_file(labels)
    cache_build.build_cache(folder, ["a.png"], [path], 16, sha, workers=1, progress=False)
    manifest = (folder / "manifest.json").read_text()
    (folder / "manifest.json").write_text(manifest.replace('"version": 2', '"version": 1'))
    assert cxr_cache.open_cache(tmp_path, 16, labels) is None
    assert "cache version 1, expected 2" in capsys.readouterr().out
