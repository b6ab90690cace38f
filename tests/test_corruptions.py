"""Photo corruptions: each changes the image, severity 0 is the identity, higher severity
changes it more, same rng -> same output; the robustness evaluation writes every row."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from chexnet.datatools import corruptions as pc
from chexnet.analysis import robustness
from conftest import tiny_run
from chexnet.labels import NIH_FINDINGS


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def xray() -> Image.Image:
    """A 64 px demo phantom (body, lungs, heart, ribs: edges and smooth regions alike)."""
    from chexnet.datatools.demo import render_phantom, sample_anatomy

    rng = np.random.default_rng(0)
    img, _ = render_phantom(rng, ("Cardiomegaly",), sample_anatomy(rng), 64)
    return Image.fromarray(np.asarray(img, np.uint8))


def _diff(a: Image.Image, b: Image.Image) -> float:
    return float(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).mean())


@pytest.mark.parametrize("kind", pc.KINDS)
def test_corruption_grows_with_severity(xray, kind):
    diffs = []
    for severity in range(6):
        out = pc.corrupt(xray, kind, severity, np.random.default_rng(7))
        assert out.mode == "L" and out.size == xray.size
        diffs.append(_diff(out, xray))
    assert diffs[0] == 0.0                            # severity 0: the image itself
    assert diffs[1] > 0.0                             # every severity changes the image
    assert all(b > a for a, b in zip(diffs, diffs[1:])), diffs


@pytest.mark.parametrize("kind", pc.KINDS)
def test_corruption_is_deterministic_given_the_rng(xray, kind):
    a = pc.corrupt(xray, kind, 3, np.random.default_rng(11))
    b = pc.corrupt(xray, kind, 3, np.random.default_rng(11))
    assert np.array_equal(np.asarray(a), np.asarray(b))
    assert pc.corrupt(xray, kind, 0, np.random.default_rng(1)) is not xray   # a copy
    if kind not in ("blur", "jpeg"):                  # those two draw nothing at random
        others = [pc.corrupt(xray, kind, 3, np.random.default_rng(s)) for s in range(12, 16)]
        assert any(not np.array_equal(np.asarray(a), np.asarray(o)) for o in others)


def test_corruption_works_on_any_size(xray):
    big = xray.resize((200, 150))
    for kind in pc.KINDS:
        assert pc.corrupt(big, kind, 5, np.random.default_rng(0)).size == (200, 150)


def test_bad_arguments(xray):
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="unknown corruption"):
        pc.corrupt(xray, "fog", 1, rng)
    with pytest.raises(ValueError, match="severity"):
        pc.corrupt(xray, "blur", 6, rng)
    with pytest.raises(ValueError, match="mode L"):
        pc.corrupt(xray.convert("RGB"), "blur", 1, rng)


def test_image_rng_depends_on_the_image_not_the_order():
    a = pc.image_rng(0, "glare", 3, "x.png").random()
    assert a == pc.image_rng(0, "glare", 3, "x.png").random()
    assert a != pc.image_rng(0, "glare", 3, "y.png").random()
    assert a != pc.image_rng(1, "glare", 3, "x.png").random()


@pytest.mark.slow
def test_robustness_cli_writes_every_row(tmp_path_factory, tmp_path, capsys):
    run = tiny_run(tmp_path_factory)
    out, plot = tmp_path / "rob.csv", tmp_path / "rob.png"
    assert robustness.main(["--run", str(run), "--severities", "1", "5", "--out", str(out),
                    "--plot", str(plot)]) == 0
    table = pd.read_csv(out)
    assert list(table.columns) == ["corruption", "severity", "label", "auc", "clean_auc", "drop"]
    combos = set(zip(table["corruption"], table["severity"]))
    assert combos == {("clean", 0)} | {(k, s) for k in pc.KINDS for s in (1, 5)}
    for _, part in table.groupby(["corruption", "severity"]):
        assert list(part["label"]) == [*NIH_FINDINGS, "mean"]
    clean = table[table["corruption"] == "clean"]
    np.testing.assert_allclose(clean["auc"], clean["clean_auc"])
    # The clean pass reproduces the run's own test AUCs (same images, same transform).
    aucs = pd.read_csv(run / "aucs.csv").set_index("label")["auc"]
    np.testing.assert_allclose(clean.set_index("label")["auc"].reindex(aucs.index), aucs,
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(table["drop"], table["clean_auc"] - table["auc"])
    assert plot.is_file() and Image.open(plot).format == "PNG"
    assert "mean_auc" in capsys.readouterr().out


def test_robustness_cli_errors(tmp_path_factory, tmp_path, capsys):
    run = tiny_run(tmp_path_factory)
    assert robustness.main(["--run", str(tmp_path), "--out", str(tmp_path / "r.csv")]) == 2
    assert str(tmp_path / "checkpoint.pt") in capsys.readouterr().err
    out = str(tmp_path / "r.csv")
    assert robustness.main(["--run", str(run), "--kinds", "fog", "--out", out]) == 2
    assert "fog" in capsys.readouterr().err
    with pytest.raises(SystemExit) as refused:  # refused while the arguments are parsed
        robustness.main(["--run", str(run), "--severities", "0", "--out", out])
    assert refused.value.code == 2
    assert "--severities: 0 is out of range: it must be >= 1 and <= 5" in capsys.readouterr().err
    assert not (tmp_path / "r.csv").exists()


# ------------------------------------------------------------------ primitives, on literal values
def test_arithmetic_primitives_on_literal_values():
    row = np.array([[0.0, 100.0, 200.0]])
    np.testing.assert_allclose(pc.brightness_contrast(row, 0.5, 10.0, 100.0), [[60, 110, 160]])
    np.testing.assert_allclose(pc.gamma(np.array([[-5.0, 63.75, 255.0, 300.0]]), 2.0),
                               [[0.0, 15.9375, 255.0, 255.0]])     # clipped to 0-255 first
    np.testing.assert_allclose(pc.pixel_grid(np.zeros((2, 7)), 3, 5.0),
                               [[-5, 0, 0, -5, 0, 0, -5]] * 2)
    cast = pc.colour_cast(row, (1.0, 0.5, 0.25))
    assert cast.shape == (1, 3, 3)
    np.testing.assert_allclose(cast[0], [[0, 0, 0], [100, 50, 25], [200, 100, 50]])
    # Glare: the peak at the centre pixel, exp(-1/2) of it one radius away.
    g = pc.glare(np.zeros((5, 5)), (2.5, 2.5), 1.0, 100.0)
    assert g[2, 2] == pytest.approx(100.0) and g[2, 3] == pytest.approx(100 * np.exp(-0.5))
    assert g[3, 3] == pytest.approx(100 * np.exp(-1.0))
    # Moire at pixel centre (0.5, 0.5), gratings along x of period 4, no rotation or phase:
    # 10 cos(2 pi 0.5 / 4)^2 = 10 cos(pi / 4)^2 = 5.
    m = pc.moire(np.zeros((2, 2)), 0.0, 0.0, 4.0, (0.0, 0.0), 10.0)
    assert m[0, 0] == pytest.approx(5.0) and m[1, 0] == pytest.approx(5.0)


def test_noise_is_white_gaussian_of_the_given_sigma():
    out = pc.noise(np.full((200, 200), 50.0), 4.0, np.random.default_rng(0))
    assert abs(out.mean() - 50.0) < 0.1 and abs(out.std() - 4.0) < 0.1
    assert np.array_equal(out, pc.noise(np.full((200, 200), 50.0), 4.0,
                                        np.random.default_rng(0)))


def test_blur_matches_a_naive_gaussian_convolution():
    delta = np.zeros((21, 21))
    delta[10, 10] = 100.0
    sigma = 1.5
    k = np.exp(-0.5 * (np.arange(-5, 6) / sigma) ** 2)         # radius ceil(3 sigma) = 5
    k /= k.sum()
    out = pc.blur(delta, sigma)
    np.testing.assert_allclose(out[5:16, 5:16], 100.0 * np.outer(k, k), atol=1e-4)
    assert np.abs(out[:5]).max() < 1e-6                        # nothing beyond the kernel
    np.testing.assert_allclose(pc.blur(np.full((8, 8), 7.0), 3.0), 7.0, rtol=1e-6)


def test_perspective_moves_the_given_points():
    img = Image.fromarray(np.full((20, 20), 200, np.uint8))
    corners = [[0, 0], [20, 0], [20, 20], [0, 20]]
    assert np.array_equal(np.asarray(pc.perspective(img, corners, corners)), np.asarray(img))
    # The image shrunk into the square (5, 5)-(15, 15): filled outside, the image inside.
    out = np.asarray(pc.perspective(img, corners, [[5, 5], [15, 5], [15, 15], [5, 15]], fill=9))
    assert (out[7:13, 7:13] == 200).all() and (out[:4] == 9).all() and (out[:, 16:] == 9).all()
