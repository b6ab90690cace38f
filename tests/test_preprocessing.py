"""The tensor fed to the network equals reproduce-chexnet's, bit for bit (max difference 0).

The reference feeds DenseNet `Image.open(path).convert('RGB')` through torchvision's
`Resize(224) -> CenterCrop(224) -> ToTensor() -> Normalize(ImageNet)`. We decode to 8-bit grey
and expand to three channels at the end; the PNG path (`build_transform`), the uint8 cache
(`prepare_data.py` + `model_input`) and `predict.py` must all give exactly its numbers.
"""
from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as v1

from chexnet import cache as cxr_cache
from chexnet.datatools import cache_build
from chexnet.files import sha256_file
from chexnet.analysis import predict
from conftest import shared
from chexnet.data import build_transform, load_xray, model_input, normalize_uint8

SIZE = 224
RGBA_FILES = ("00000100_000.png", "00001369_000.png")


def reference_tensor(path, size: int = SIZE) -> torch.Tensor:
    """reproduce-chexnet's own pipeline, written out as it is there (torchvision v1 API)."""
    transform = v1.Compose([v1.Resize(size), v1.CenterCrop(size), v1.ToTensor(),
                            v1.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])])
    return transform(Image.open(path).convert("RGB"))


def nih_sample(n: int = 10) -> list:
    """n real NIH PNGs, the two RGBA ones first."""
    folder = shared("nih", "images")
    rgba = [folder / name for name in RGBA_FILES]
    rest = [p for p in sorted(folder.glob("*.png")) if p.name not in RGBA_FILES]
    return rgba + rest[:n - len(rgba)]


def cache_tensors(paths, tmp_path, size: int = SIZE) -> dict[str, torch.Tensor]:
    """Build a real cache of `paths` (as prepare_data.py does) and read each row back through
    the training loader's transform."""
    ids = [p.name for p in paths]
    labels = tmp_path / "labels.txt"
    labels.write_text("\n".join(ids))
    cache_build.build_cache(cxr_cache.cache_dir(tmp_path, size), ids, [str(p) for p in paths],
                          size, sha256_file(labels), workers=1, progress=False)
    cache = cxr_cache.open_cache(tmp_path, size, labels)
    rows = cache.row_of()
    x = torch.from_numpy(np.array(cache.images()[[rows[i] for i in ids]]))[:, None]
    out = model_input(x, "cpu")
    return dict(zip(ids, out))


def test_every_grey_level_is_normalised_as_to_tensor_does():
    """All 256 levels, against ToTensor + Normalize applied to an RGB image of those levels."""
    levels = np.arange(256, dtype=np.uint8).reshape(16, 16)
    expected = v1.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])(
        v1.ToTensor()(Image.fromarray(levels, "L").convert("RGB")))
    ours = normalize_uint8(torch.from_numpy(levels)[None])
    assert ours.dtype == torch.float32 and ours.shape == (3, 16, 16)
    assert torch.equal(ours, expected)
    # The multiply-by-1/255 shortcut is not the same computation: this test would see it.
    shortcut = v1.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])(
        torch.from_numpy(levels)[None].expand(3, -1, -1).to(torch.float32).mul(1 / 255))
    assert not torch.equal(shortcut, expected)


def test_generated_images_all_paths_are_exact(tmp_path):
    """PNG, cache and predict paths on generated grey and RGBA images of several shapes."""
    rng = np.random.default_rng(0)
    paths = []
    for i, (h, w, mode) in enumerate([(300, 260, "L"), (260, 300, "RGBA"), (256, 256, "L")]):
        grey = rng.integers(0, 256, (h, w), dtype=np.uint8)
        path = tmp_path / f"img{i}.png"
        Image.fromarray(grey, "L").convert(mode).save(path)
        paths.append(path)
    cached = cache_tensors(paths, tmp_path, 64)
    for path in paths:
        expected = reference_tensor(path, 64)
        assert torch.equal(build_transform(64)(load_xray(path)), expected)
        assert torch.equal(cached[path.name], expected)
        assert torch.equal(predict.preprocess(predict.load_any(path), 64)[0], expected)


def test_real_nih_pngs_png_path_is_exact():
    for path in nih_sample():
        ours = build_transform(SIZE)(load_xray(path))
        diff = (ours - reference_tensor(path)).abs().max().item()
        assert diff == 0, f"{path.name}: max difference {diff}"


def test_real_nih_pngs_cache_path_is_exact(tmp_path):
    paths = nih_sample()
    cached = cache_tensors(paths, tmp_path)
    for path in paths:
        diff = (cached[path.name] - reference_tensor(path)).abs().max().item()
        assert diff == 0, f"{path.name}: max difference {diff}"


def test_real_nih_pngs_predict_path_is_exact(tmp_path):
    for path in nih_sample(6):
        copy = tmp_path / path.name  # predict reads any path the user gives
        shutil.copyfile(path, copy)
        ours = predict.preprocess(predict.load_any(copy), SIZE)
        assert ours.shape == (1, 3, SIZE, SIZE)
        diff = (ours[0] - reference_tensor(path)).abs().max().item()
        assert diff == 0, f"{path.name}: max difference {diff}"


def test_rgba_sample_really_is_rgba():
    """The RGBA files are the hard case; make sure the sample still holds them."""
    for path in nih_sample(2):
        assert Image.open(path).mode == "RGBA"


@pytest.mark.parametrize("size", [32, 224])
def test_float_path_matches_reference_on_noise(size):
    """Random noise has every grey level at every position class: a stricter case than X-rays."""
    rng = np.random.default_rng(size)
    img = Image.fromarray(rng.integers(0, 256, (300, 280), dtype=np.uint8), "L")
    reference = v1.Compose([v1.Resize(size), v1.CenterCrop(size), v1.ToTensor(),
                            v1.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])])
    assert torch.equal(build_transform(size)(img), reference(img.convert("RGB")))
