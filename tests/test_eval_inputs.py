"""eval_model.py refuses predictions it cannot score honestly, naming the file, column and row,
and a failing command writes nothing."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

import eval_model
from chexnet.labels import NIH_FINDINGS


def preds_frame(n: int = 8, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    frame = pd.DataFrame({"Image Index": [f"{i + 1:08d}_000.png" for i in range(n)]})
    for f in NIH_FINDINGS:
        frame[f"prob_{f}"] = rng.random(n).round(4)
    for f in NIH_FINDINGS:
        frame[f] = np.tile([0, 1], n // 2)
    return frame


def run(tmp_path, frame_or_text, capsys, *extra):
    path = tmp_path / "preds.csv"
    if isinstance(frame_or_text, str):
        path.write_text(frame_or_text)
    else:
        frame_or_text.to_csv(path, index=False)
    code = eval_model.main(["--preds", str(path), "--no-published", *extra])
    return code, capsys.readouterr().err, path


def test_a_good_file_is_scored(tmp_path, capsys):
    code, err, path = run(tmp_path, preds_frame(), capsys)
    assert code == 0 and (tmp_path / "aucs.csv").is_file()


def test_duplicated_rows_are_refused_not_scored_twice(tmp_path, capsys):
    frame = preds_frame()
    frame = pd.concat([frame, frame.iloc[[3]]], ignore_index=True)
    code, err, path = run(tmp_path, frame, capsys)
    assert code == 2
    assert f"{path}: image '00000004_000.png' is listed more than once" in err
    assert "CSV rows [5, 10]" in err


@pytest.mark.parametrize("value,why", [(-2.19, "outside [0, 1]: these look like logits"),
                                       (3.5, "outside [0, 1]"),
                                       ("abc", "is not a number"),
                                       (None, "is not a number")])
def test_values_that_are_not_probabilities_are_refused(tmp_path, capsys, value, why):
    frame = preds_frame().astype({"prob_Mass": object})
    frame.loc[5, "prob_Mass"] = value
    code, err, path = run(tmp_path, frame, capsys, "--thresholds")
    assert code == 2
    assert f"{path}: column 'prob_Mass', CSV row 7 (Image Index '00000006_000.png')" in err
    assert why in err and "Traceback" not in err
    assert not (tmp_path / "aucs.csv").exists()


def test_a_missing_finding_column_is_refused(tmp_path, capsys):
    frame = preds_frame().drop(columns=["prob_Hernia"])
    code, err, path = run(tmp_path, frame, capsys)
    assert code == 2 and "no column for prob_Hernia (13 of the 14 findings)" in err


def test_an_empty_file_names_the_file(tmp_path, capsys):
    code, err, path = run(tmp_path, "", capsys)
    assert code == 2 and f"{path}: the file is empty" in err and "Traceback" not in err


def test_a_failing_compare_leaves_the_previous_aucs_csv(tmp_path, capsys):
    """Item 5: --compare that fails must not have overwritten the run's aucs.csv first."""
    frame = preds_frame()
    code, _, path = run(tmp_path, frame, capsys)
    assert code == 0
    before = (tmp_path / "aucs.csv").read_text()
    other = tmp_path / "other.csv"
    bad = preds_frame(seed=1)
    bad["Image Index"] = [f"9{i:07d}_000.png" for i in range(len(bad))]  # no image in common
    bad.to_csv(other, index=False)
    frame["prob_Atelectasis"] = frame["prob_Atelectasis"][::-1].to_numpy()  # new scores
    frame.to_csv(path, index=False)
    assert eval_model.main(["--preds", str(path), "--no-published", "--compare",
                            str(other)]) == 2
    assert "error:" in capsys.readouterr().err
    assert (tmp_path / "aucs.csv").read_text() == before


def test_a_read_only_output_folder_is_a_message(tmp_path, capsys, monkeypatch):
    """The suite runs as root, which chmod cannot stop: the refusal is simulated at the
    filesystem boundary, as a read-only folder (e.g. Kaggle's input) raises it."""
    path = tmp_path / "preds.csv"
    preds_frame().to_csv(path, index=False)
    real = pd.DataFrame.to_csv

    def read_only(self, target=None, *args, **kwargs):
        if target is not None:
            raise PermissionError(13, "Permission denied", str(target))
        return real(self, target, *args, **kwargs)

    monkeypatch.setattr(pd.DataFrame, "to_csv", read_only)
    assert eval_model.main(["--preds", str(path), "--no-published"]) == 2
    err = capsys.readouterr().err
    assert f"error: {tmp_path / 'aucs.csv'}: Permission denied. Check its permissions, or " \
        "choose another place for the output" in err  # the message of every command (cli.run)
    assert "Traceback" not in err
