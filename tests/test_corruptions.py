"""Photo corruptions: each changes the image, severity 0 is the identity, higher severity
changes it more, same rng -> same output; the robustness evaluation writes every row."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from chexnet import corruptions as pc
from conftest import tiny_run
from chexnet.labels import NIH_FINDINGS


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def xray() -> Image.Image:
    """A 64 px demo phantom (body, lungs, heart, ribs: edges and smooth regions alike)."""
    from chexnet.demo import render_phantom, sample_anatomy

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


def test_robustness_cli_writes_every_row(tmp_path_factory, tmp_path, capsys):
    run = tiny_run(tmp_path_factory)
    out, plot = tmp_path / "rob.csv", tmp_path / "rob.png"
    assert pc.main(["--run", str(run), "--severities", "1", "5", "--out", str(out),
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
    assert pc.main(["--run", str(tmp_path), "--out", str(tmp_path / "r.csv")]) == 2
    assert str(tmp_path / "checkpoint.pt") in capsys.readouterr().err
    assert pc.main(["--run", str(run), "--kinds", "fog", "--out", str(tmp_path / "r.csv")]) == 2
    assert "fog" in capsys.readouterr().err
    assert pc.main(["--run", str(run), "--severities", "0", "--out", str(tmp_path / "r.csv")]) == 2
    assert "1 to 5" in capsys.readouterr().err
    assert not (tmp_path / "r.csv").exists()
