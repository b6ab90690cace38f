"""Localisation metrics: box parsing and geometry, pointing game and mass on perfect and
reversed heatmaps, the demo's boxes through the real transform, the CLI on a tiny run."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from torchvision.transforms import v2 as T

from chexnet.analysis import localization as loc
from conftest import shared, tiny_run
from chexnet.data import DataError, nih_table
from chexnet.labels import NIH_FINDINGS


pytestmark = pytest.mark.usefixtures("one_thread")

BBOX_HEADER = "Image Index,Finding Label,Bbox [x,y,w,h],,,\n"


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory):
    from chexnet.datatools.demo import make_nih_demo

    root = tmp_path_factory.mktemp("loc_demo")
    make_nih_demo(root, n_images=16, size=64, seed=3)
    return root


def test_perfect_heatmap_scores_one_and_reversed_zero():
    boxes = np.array([[2.0, 3.0, 9.0, 7.0], [0.0, 0.0, 16.0, 2.5], [10.2, 10.2, 10.6, 10.7]])
    masks = loc.box_masks(boxes, 16).astype(np.float64)        # (3, 16, 16)
    assert masks.sum(axis=(1, 2)).min() >= 1                     # even the sub-pixel box
    assert loc.pointing_game(masks, boxes).all()
    np.testing.assert_allclose(loc.mass_inside(masks, boxes), 1.0)
    reversed_ = 1.0 - masks
    assert not loc.pointing_game(reversed_, boxes).any()
    np.testing.assert_allclose(loc.mass_inside(reversed_, boxes), 0.0)
    half = (masks / masks.sum(axis=(1, 2), keepdims=True)
            + (1 - masks) / (1 - masks).sum(axis=(1, 2), keepdims=True))
    np.testing.assert_allclose(loc.mass_inside(half, boxes), 0.5)
    # Negative values (CAM's evidence against) are not mass.
    np.testing.assert_allclose(loc.mass_inside(masks - 3 * (1 - masks), boxes), 1.0)
    assert np.isnan(loc.mass_inside(-np.ones((1, 16, 16)), boxes[:1]))[0]


def test_pointing_game_tolerance():
    heat = np.zeros((1, 20, 20))
    heat[0, 5, 12] = 1.0                           # peak at pixel centre (12.5, 5.5)
    box = np.array([[2.0, 2.0, 10.0, 10.0]])
    assert not loc.pointing_game(heat, box)[0]
    assert not loc.pointing_game(heat, box, tolerance=2.0)[0]
    assert loc.pointing_game(heat, box, tolerance=2.5)[0]


def test_pointing_game_ties_go_to_the_cell_centre_not_the_corner():
    """A 3 x 3 map whose top-left cell is the maximum, upsampled like the heatmaps: the peak is
    a plateau from that cell's centre (16, 16) to the image corner; it points at the centre."""
    coarse = torch.zeros(1, 1, 3, 3)
    coarse[0, 0, 0, 0] = 1.0
    heat = torch.nn.functional.interpolate(coarse, size=(96, 96), mode="bilinear",
                                           align_corners=False)[:, 0].numpy()
    assert (heat[0, :16, :16] == heat.max()).all()          # the plateau
    assert loc.pointing_game(heat, np.array([[12.0, 12.0, 20.0, 20.0]]))[0]
    assert not loc.pointing_game(heat, np.array([[0.0, 0.0, 8.0, 8.0]]))[0]
    # A flat map points nowhere, even at a box around the centre.
    assert not loc.pointing_game(np.zeros((1, 96, 96)), np.array([[40.0, 40.0, 56.0, 56.0]]))[0]


def test_centre_baseline_points_at_the_centre():
    g = loc.centre_heatmap(32)
    assert g.shape == (32, 32) and np.unravel_index(g.argmax(), g.shape) == (15, 15)
    centred = np.array([[12.0, 12.0, 20.0, 20.0]])
    corner = np.array([[0.0, 0.0, 8.0, 8.0]])
    assert loc.pointing_game(g[None], centred)[0] and not loc.pointing_game(g[None], corner)[0]
    assert loc.mass_inside(g[None], centred)[0] > 5 * loc.mass_inside(g[None], corner)[0]


def test_resize_crop_geometry_matches_torchvision():
    # 100 x 80 image, S = 40: height -> 40 (scale 0.5), width -> 50, crop 5 px on the left.
    assert loc.resize_crop_geometry(100, 80, 40) == (0.5, 0.5, 5, 0)
    for w, h, s in [(100, 80, 40), (64, 90, 48), (1024, 1024, 224), (77, 77, 32)]:
        sx, sy, left, top = loc.resize_crop_geometry(w, h, s)
        resized = T.Resize(s, antialias=True)(Image.new("L", (w, h)))
        assert resized.size == (round(sx * w), round(sy * h))
        assert (left, top) == (int(round((resized.size[0] - s) / 2)),
                               int(round((resized.size[1] - s) / 2)))


def test_boxes_follow_the_model_transform(tmp_path):
    """A bright rectangle drawn at a box in a non-square original lands, after the model's
    Resize + CenterCrop, where the mapped box says."""
    w, h, s = 92, 60, 30
    arr = np.zeros((h, w), np.uint8)
    x, y, bw, bh = 30, 12, 24, 18
    arr[y:y + bh, x:x + bw] = 255
    Image.fromarray(arr).save(tmp_path / "a.png")
    (tmp_path / "b.csv").write_text(BBOX_HEADER + f"a.png,Infiltrate,{x},{y},{bw},{bh}\n")
    boxes = loc.read_boxes(tmp_path / "b.csv")
    images = pd.DataFrame({"path": [str(tmp_path / "a.png")]}, index=["a.png"])
    mapped = loc.boxes_in_input_space(boxes, images, s, dataset="demo")
    assert mapped["finding"].tolist() == ["Infiltration"]
    # Height 60 -> 30 (scale 0.5), width 92 -> 46, 8 px cropped on the left.
    x0, y0, x1, y1 = mapped.loc[0, ["x0", "y0", "x1", "y1"]]
    assert (x0, y0, x1, y1) == pytest.approx((7.0, 6.0, 19.0, 15.0))
    seen = np.asarray(T.CenterCrop(s)(T.Resize(s, antialias=True)(Image.open(tmp_path / "a.png"))))
    bright = np.argwhere(seen > 127)                              # (row, col) pairs
    assert (bright[:, 1].min(), bright[:, 1].max() + 1) == (7, 19)
    assert (bright[:, 0].min(), bright[:, 0].max() + 1) == (6, 15)


def test_nih_boxes_are_in_1024_pixels_whatever_the_copy(tmp_path):
    Image.new("L", (128, 128)).save(tmp_path / "n.png")   # a pre-resized 128 px copy
    (tmp_path / "b.csv").write_text(BBOX_HEADER + "n.png,Mass,512,256,128,256\n")
    images = pd.DataFrame({"path": [str(tmp_path / "n.png")]}, index=["n.png"])
    boxes = loc.read_boxes(tmp_path / "b.csv")
    nih = loc.boxes_in_input_space(boxes, images, 32, dataset="nih")
    assert tuple(nih.loc[0, ["x0", "y0", "x1", "y1"]]) == pytest.approx((16, 8, 20, 16))
    demo = loc.boxes_in_input_space(boxes, images, 32, dataset="demo", frame_size=1024)
    assert tuple(demo.loc[0, ["x0", "y0", "x1", "y1"]]) == pytest.approx((16, 8, 20, 16))
    # Read as the file's own pixels, the box starts beyond the image: nothing is left.
    assert loc.boxes_in_input_space(boxes, images, 32, dataset="demo").empty


def test_oracle_and_reversed_heatmaps_on_the_demo(demo_root):
    """Oracle: each box painted in the original image's pixels and passed through the model's
    Resize + CenterCrop; it must win the pointing game and keep nearly all its mass inside the
    mapped box. The reversed map (everything but the box) must lose."""
    s = 48
    table = nih_table(demo_root, dataset="demo")[0].frame
    boxed = loc.boxes_in_input_space(loc.read_boxes(demo_root / "BBox_List_2017.csv"),
                                     table.set_index("image_id"), s, dataset="demo")
    raw = loc.read_boxes(demo_root / "BBox_List_2017.csv")
    assert len(boxed) == len(raw) > 5      # every demo box survives the (square) crop
    to_input = T.Compose([T.Resize(s, antialias=True), T.CenterCrop(s)])
    oracle = []
    for r in raw.itertuples():
        canvas = np.zeros((64, 64), np.float32)
        canvas[int(r.y):int(np.ceil(r.y + r.h)), int(r.x):int(np.ceil(r.x + r.w))] = 1.0
        oracle.append(to_input(torch.from_numpy(canvas)[None])[0].numpy())
    oracle = np.stack(oracle)
    scored = loc.score_boxes(boxed, oracle, s)
    assert scored["hit"].all()
    # Antialiasing spills a little outside, which matters only for the 3 x 3 px boxes.
    assert scored["mass"].median() > 0.9 and scored["mass"].min() > 0.5
    reverse = loc.score_boxes(boxed, 1.0 - oracle, s)
    small = (boxed["x1"] - boxed["x0"]) * (boxed["y1"] - boxed["y0"]) < 0.5 * s * s
    assert not reverse.loc[small, "hit"].any()
    assert (reverse["mass"] < scored["mass"]).all()
    summary = loc.summarize(scored)
    assert summary.iloc[-2]["finding"] == "mean" and summary.iloc[-1]["finding"] == "all"
    assert (summary["hit_rate"] == 1).all() and summary.iloc[-1]["n_boxes"] == len(boxed)
    assert set(summary["finding"][:-2]) == set(boxed["finding"])
    assert list(summary["finding"][:-2]) == [f for f in NIH_FINDINGS if f in set(boxed["finding"])]


def test_read_boxes_errors(tmp_path):
    with pytest.raises(DataError, match="nope.csv"):
        loc.read_boxes(tmp_path / "nope.csv")
    (tmp_path / "h.csv").write_text("Image,Label,x,y,w,h\na.png,Mass,1,2,3,4\n")
    with pytest.raises(DataError, match="h.csv.*NIH schema"):
        loc.read_boxes(tmp_path / "h.csv")
    (tmp_path / "f.csv").write_text(BBOX_HEADER + "a.png,Tumour,1,2,3,4\n")
    with pytest.raises(DataError, match="row 2.*Tumour"):
        loc.read_boxes(tmp_path / "f.csv")
    (tmp_path / "n.csv").write_text(BBOX_HEADER + "a.png,Mass,1,2,3,4\nb.png,Mass,1,x,3,4\n")
    with pytest.raises(DataError, match="row 3"):
        loc.read_boxes(tmp_path / "n.csv")


def test_real_nih_box_file():
    boxes = loc.read_boxes(shared("nih", "BBox_List_2017.csv.gz"))
    assert len(boxes) == 984 and boxes["image_id"].nunique() == 880
    assert "Infiltration" in set(boxes["finding"]) and "Infiltrate" not in set(boxes["finding"])
    assert set(boxes["finding"]) <= set(NIH_FINDINGS)
    assert (boxes[["x", "y"]] >= 0).all().all() and ((boxes["x"] + boxes["w"]) <= 1024).all()


def test_cli_on_a_tiny_run(tmp_path_factory, tmp_path, capsys):
    run = tiny_run(tmp_path_factory)
    data = pd.read_json(run / "config.json", typ="series")["data"]
    out, per_box = tmp_path / "loc.csv", tmp_path / "boxes.csv"
    assert loc.main(["--run", str(run), "--boxes", f"{data}/BBox_List_2017.csv", "--out",
                     str(out), "--per-box", str(per_box), "--method", "gradcam"]) == 0
    summary, boxes = pd.read_csv(out), pd.read_csv(per_box)
    assert list(summary.columns) == ["finding", "n_boxes", "n_images", "hit_rate", "mass_inside",
                                     "centre_hit_rate", "centre_mass_inside", "n_no_mass"]
    assert summary["finding"].iloc[-1] == "all" and summary["n_boxes"].iloc[-1] == len(boxes)
    test_ids = set(pd.read_csv(run / "preds.csv")["Image Index"])
    assert set(boxes["image_id"]) <= test_ids and len(boxes) > 0
    assert boxes["hit"].isin([True, False]).all() and boxes["prob"].between(0, 1).all()
    assert "centre" in capsys.readouterr().out
    assert loc.main(["--run", str(run), "--boxes", str(tmp_path / "none.csv")]) == 2
    assert "none.csv" in capsys.readouterr().err
    assert loc.main(["--run", str(tmp_path), "--boxes", f"{data}/BBox_List_2017.csv"]) == 2
    assert "checkpoint.pt" in capsys.readouterr().err
    (tmp_path / "other.csv").write_text(BBOX_HEADER + "zz.png,Mass,1,2,3,4\n")
    assert loc.main(["--run", str(run), "--boxes", str(tmp_path / "other.csv")]) == 2
    assert "none of its 1 boxes" in capsys.readouterr().err
