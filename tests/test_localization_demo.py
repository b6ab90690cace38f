"""benchmarks/localization_demo.py: its --quick smoke run and the side-by-side table.

The quick run's numbers mean nothing (one epoch at 64 px); these tests check that the whole
chain runs (generate, train, CAM and Grad-CAM scoring) and that the table puts each method next
to the centre baseline of the same boxes.
"""
from __future__ import annotations


import pandas as pd
import pytest

from conftest import load_benchmark

# Trains networks or runs subprocesses: `pytest -m "not slow"` leaves these out.
# One torch thread in this process (conftest.py one_thread: 2 shared cores).
pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]

ld = load_benchmark("localization_demo")


def test_side_by_side_takes_each_column_from_its_method():
    def table(hit, mass):
        return pd.DataFrame({"finding": ["Mass", "mean"], "n_boxes": [3, 3], "n_images": [2, 2],
                             "hit_rate": hit, "mass_inside": mass,
                             "centre_hit_rate": [0.1, 0.1], "centre_mass_inside": [0.2, 0.2],
                             "n_no_mass": [0, 0]})
    out = ld.side_by_side({"cam": table([0.5, 0.5], [0.4, 0.4]),
                           "gradcam": table([0.7, 0.7], [0.3, 0.3])})
    assert list(out.columns) == ["boxes", "cam_hit", "cam_mass", "gradcam_hit", "gradcam_mass",
                                 "centre_hit", "centre_mass"]
    assert out.loc["Mass"].tolist() == [3, 0.5, 0.4, 0.7, 0.3, 0.1, 0.2]


def test_quick_run_end_to_end(tmp_path, capsys):
    """The quick run, then the same command again (it reuses the data and the finished run),
    then once more without the boxes file (named, exit 2): one training for the three."""
    assert ld.main(["--quick", "--work", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    table = pd.read_csv(tmp_path / "localization_demo.csv", index_col=0)
    assert {"mean", "all"} <= set(table.index)
    assert table[["cam_hit", "gradcam_hit", "centre_hit"]].loc["all"].between(0, 1).all()
    assert "mean over findings: CAM pointing" in out
    for method in ld.METHODS:
        assert (tmp_path / f"localization_{method}.csv").is_file()
    # a second run reuses the data and the finished run instead of training again
    assert ld.main(["--quick", "--work", str(tmp_path)]) == 0
    assert "epoch 1" not in capsys.readouterr().err

    # A missing boxes file is named (this was test_a_missing_boxes_file_is_named, which
    # trained the same quick run again first).
    (tmp_path / "data" / "nih" / "BBox_List_2017.csv").unlink()
    assert ld.main(["--quick", "--work", str(tmp_path)]) == 2
    assert "BBox_List_2017.csv: boxes file not found" in capsys.readouterr().err
