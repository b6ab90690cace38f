"""Generated bad inputs for the commands (hypothesis): whatever is drawn, a command

1. exits 0, 2 or 3 (argparse's refusals exit 2 too);
2. prints no traceback (no exception escapes its `main`: the boundary, chexnet.cli.run);
3. changes no input file (hashed before and after);
4. exits 0 only with outputs that parse, covering every readable input or naming the rest.

Inputs are drawn from generators of malformed ones: CSVs (delimiters, encodings, empty,
header-only, wrong columns, duplicated or odd ids, values out of range), images (sizes,
modes, frames, formats, truncation, links, folders), checkpoints (truncated, foreign, other
findings), paths (an input as the output, a folder, a missing folder, a run's file) and
numbers. Derandomized (the same examples on every run, so CI is reproducible) and bounded to
about a minute; a longer local search:

    CHEXNET_FUZZ_EXAMPLES=2000 .venv/bin/python -m pytest tests/test_fuzz.py -p no:randomly
"""
from __future__ import annotations

import contextlib
import io
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from conftest import tiny_run
from chexnet.files import sha256_file
from chexnet.labels import NIH_FINDINGS

EXAMPLES = int(os.environ.get("CHEXNET_FUZZ_EXAMPLES", "40"))
FUZZ = settings(max_examples=EXAMPLES, derandomize=True, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    return tiny_run(tmp_path_factory)


# ---------------------------------------------------------------------------------------------
# Generators
# ---------------------------------------------------------------------------------------------
ID = st.one_of(st.sampled_from(["00000001_000.png", "00000002_001.png", "x.png", "", " a.png ",
                                "../../etc/passwd", "é.png", "00000001_000.png"]),
               st.text(max_size=12))
VALUE = st.one_of(st.floats(allow_nan=True, allow_infinity=True, width=32),
                  st.sampled_from(["", "nan", "0.5", "1", "0", "-1", "abc", "1e309", "0,5"]))


@st.composite
def csv_bytes(draw) -> bytes:
    """A predictions / labels / log CSV, mostly wrong in some way."""
    prob = [f"prob_{f}" for f in NIH_FINDINGS]
    columns = draw(st.sampled_from([
        ["Image Index", *prob, *NIH_FINDINGS],      # the right layout
        ["Image Index", *prob[:-1], *NIH_FINDINGS],  # 13 of 14 prob_ columns
        ["Image Index", *prob],                      # no ground truth
        ["Image Index", "Finding Labels", "Patient ID"],
        ["epoch", "train_loss", "val_loss", "lr"],   # a training log
        ["a", "b"], []]))
    rows = draw(st.integers(0, 6))
    table = [[draw(ID) if c in ("Image Index", "Finding Labels") else draw(VALUE)
              for c in columns] for _ in range(rows)]
    sep = draw(st.sampled_from([",", ",", ";", "\t"]))
    text = sep.join(columns) + "\n" + "".join(sep.join(map(str, r)) + "\n" for r in table)
    if draw(st.booleans()) and columns == ["Image Index", *prob, *NIH_FINDINGS]:
        # A well-formed file: ids NIH-style and unique, values in range.
        n = max(rows, 2)
        rng = np.random.default_rng(draw(st.integers(0, 9)))
        frame = pd.DataFrame(rng.random((n, 14)), columns=prob)
        for f in NIH_FINDINGS:
            frame[f] = (np.arange(n) % 2).astype(int)
        frame.insert(0, "Image Index", [f"{i + 1:08d}_000.png" for i in range(n)])
        text = frame.to_csv(index=False)
    encoding = draw(st.sampled_from(["utf-8", "utf-8", "utf-16", "latin-1"]))
    data = text.encode(encoding, errors="replace")
    return data[: draw(st.integers(0, len(data)))] if draw(st.integers(0, 4)) == 0 else data


@st.composite
def image_file(draw, folder: Path) -> Path:
    """An image file (or something where one should be)."""
    name = draw(st.sampled_from(["a.png", "b.jpg", "c.png", "d.jpeg"]))
    path = folder / f"{len(list(folder.iterdir()))}_{name}"  # a new name in the folder
    kind = draw(st.sampled_from(["image", "image", "image", "truncated", "empty", "text",
                                 "folder", "dangling link", "frames"]))
    w, h = draw(st.integers(1, 48)), draw(st.integers(1, 48))
    if kind == "folder":
        path.mkdir()
        return path
    if kind == "dangling link":
        path.symlink_to(folder / "nowhere")
        return path
    if kind == "empty":
        path.write_bytes(b"")
        return path
    if kind == "text":
        path.write_text("not an image\n")
        return path
    mode = draw(st.sampled_from(["L", "RGB", "RGBA", "P", "I;16", "1", "LA"]))
    rng = np.random.default_rng(draw(st.integers(0, 9)))
    if mode == "I;16":
        image = Image.fromarray(rng.integers(0, 65536, (h, w)).astype(np.uint16))
    else:
        image = Image.fromarray(rng.integers(0, 256, (h, w), dtype=np.uint8)).convert(mode)
    fmt = "JPEG" if name.endswith(("jpg", "jpeg")) else "PNG"
    if fmt == "JPEG" and image.mode not in ("L", "RGB"):
        image = image.convert("RGB")
    buffer = io.BytesIO()
    if kind == "frames":
        frames = [image.convert("L"), image.convert("L").rotate(90)]
        frames[0].save(buffer, "PNG" if fmt == "PNG" else "GIF", save_all=True,
                       append_images=frames[1:])
    else:
        image.save(buffer, fmt)
    data = buffer.getvalue()
    if kind == "truncated":
        data = data[: draw(st.integers(0, max(len(data) - 1, 0)))]
    path.write_bytes(data)
    return path


@st.composite
def checkpoint_file(draw, folder: Path, good: Path) -> Path:
    """A checkpoint: the real one, truncated, random bytes, foreign, or of other findings."""
    path = folder / "model.pt"
    kind = draw(st.sampled_from(["good"] * 6 + ["truncated", "bytes", "foreign",
                                              "other findings", "missing", "weights only"]))
    state = torch.load(good, weights_only=True)
    if kind == "good":
        shutil.copyfile(good, path)
    elif kind == "truncated":
        data = good.read_bytes()
        path.write_bytes(data[: draw(st.integers(0, len(data) - 1))])
    elif kind == "bytes":
        path.write_bytes(draw(st.binary(max_size=64)))
    elif kind == "foreign":
        torch.save({"weights": torch.zeros(3)}, path)
    elif kind == "other findings":
        state["findings"] = state["findings"][:5]
        torch.save(state, path)
    elif kind == "weights only":
        torch.save(state["model"], path)
    return path


def output_path(draw, folder: Path, inputs: list[Path], run: Path) -> Path | None:
    choice = draw(st.sampled_from(["fresh", "fresh", "an input", "an input", "a folder",
                                   "missing parent", "a run's file", "none"]))
    if choice == "an input" and inputs:
        return draw(st.sampled_from(inputs))
    if choice == "a folder":
        return folder
    if choice == "missing parent":
        return folder / "no" / "such" / "out.csv"
    if choice == "a run's file":
        return run / draw(st.sampled_from(["preds.csv", "checkpoint.pt", "config.json"]))
    if choice == "none":
        return None
    return folder / "out_file.csv"


# ---------------------------------------------------------------------------------------------
# The invariant, shared by every command
# ---------------------------------------------------------------------------------------------
def hashes(paths) -> dict[str, str]:
    out = {}
    for top in paths:
        top = Path(top)
        found = [top] if not top.is_dir() else sorted(top.rglob("*"))
        for path in found:
            if path.is_file() and not path.is_symlink():
                out[str(path)] = sha256_file(path)
    return out


def check(main, argv: list[str], inputs: list[Path]) -> tuple[int, str]:
    """Run `main(argv)`; assert rules 1-3 of the module docstring; return (code, stderr)."""
    before = hashes(inputs)
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            code = main(argv)
        except SystemExit as stop:  # argparse
            code = stop.code
    message = err.getvalue()
    assert code in (0, 2, 3), (argv, code, message)
    assert "Traceback" not in message, (argv, message)
    assert hashes(inputs) == before, (argv, "an input changed")
    return code, message


# ---------------------------------------------------------------------------------------------
# The commands
# ---------------------------------------------------------------------------------------------
@FUZZ
@given(data=st.data())
def test_eval_model(run_dir, data):
    import eval_model

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        preds = folder / "preds.csv"
        preds.write_bytes(data.draw(csv_bytes()))
        out = output_path(data.draw, folder, [preds], run_dir)
        argv = ["--preds", str(preds), "--no-published"] + (["--out", str(out)] if out else [])
        argv += data.draw(st.sampled_from([[], ["--ci", "--n-boot", "5"], ["--thresholds"],
                                           ["--calibration"], ["--n-boot", "0"]]))
        code, _ = check(eval_model.main, argv, [preds, run_dir])
        if code == 0:
            table = pd.read_csv(out if out else folder / "aucs.csv")
            assert "mean" in set(table["label"])


@FUZZ
@given(data=st.data())
def test_plot_training(run_dir, data):
    import plot_training

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        log = folder / "log_train.csv"
        log.write_bytes(data.draw(csv_bytes()))
        out = output_path(data.draw, folder, [log], run_dir)
        out = out.with_suffix(".png") if out and out.suffix == ".csv" else out
        argv = [str(log)] + (["--out", str(out)] if out else ["--out", str(folder / "c.png")])
        code, _ = check(plot_training.main, argv, [log, run_dir])
        if code == 0:
            Image.open(out or folder / "c.png").verify()


@FUZZ
@given(data=st.data())
def test_predict(run_dir, data):
    import predict

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        images = folder / "images"
        images.mkdir()
        drawn = [data.draw(image_file(images)) for _ in range(data.draw(st.integers(1, 3)))]
        ckpt = data.draw(checkpoint_file(folder, run_dir / "checkpoint.pt"))
        out = output_path(data.draw, folder, [*drawn, ckpt], run_dir)
        target = data.draw(st.sampled_from([images, drawn[0]]))
        argv = [str(target), "--checkpoint", str(ckpt)] + (["--out", str(out)] if out else [])
        code, message = check(predict.main, argv, [images, ckpt, run_dir])
        if code == 0 and out:
            table = pd.read_csv(out)
            assert len(table) >= 1 and not table.filter(like="prob_").isna().any().any()
        if code == 2 and out and ckpt.exists() and "error:" not in message:
            # Some images were unreadable: each left-out one is named.
            assert "failed" in message, message


@FUZZ
@given(data=st.data())
def test_visualize_prediction(run_dir, data):
    import visualize_prediction

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        image = data.draw(image_file(folder))
        ckpt = data.draw(checkpoint_file(folder, run_dir / "checkpoint.pt"))
        out = output_path(data.draw, folder, [image, ckpt], run_dir)
        out = out.with_suffix(".png") if out and out.suffix == ".csv" else out
        argv = ["--checkpoint", str(ckpt), "--image", str(image)] + \
            ["--out", str(out or folder / "h.png")]
        argv += data.draw(st.sampled_from([[], ["--label", "Hernia"], ["--label", "Nope"],
                                           ["--style", "reference", "--prevalence", "0.1"],
                                           ["--top", "0"]]))
        code, _ = check(visualize_prediction.main, argv, [image, ckpt, run_dir])
        if code == 0:
            Image.open(out or folder / "h.png").verify()


@FUZZ
@given(data=st.data())
def test_convert_checkpoint(run_dir, data):
    import convert_checkpoint

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        ckpt = data.draw(checkpoint_file(folder, run_dir / "checkpoint.pt"))
        out = output_path(data.draw, folder, [ckpt], run_dir) or folder / "converted.pt"
        code, _ = check(convert_checkpoint.main, [str(ckpt), str(out)], [ckpt, run_dir])
        if code == 0:
            assert "model" in torch.load(out, weights_only=True)


@FUZZ
@given(data=st.data())
def test_make_nih_labels(run_dir, data):
    import make_nih_labels

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        entry = folder / "Data_Entry_2017.csv"
        entry.write_bytes(data.draw(csv_bytes()))
        out = output_path(data.draw, folder, [entry], run_dir) or folder / "nih_labels.csv"
        argv = ["--data-entry", str(entry), "--out", str(out),
                "--split", data.draw(st.sampled_from(["random", "reference"]))]
        code, _ = check(make_nih_labels.main, argv, [entry, run_dir])
        if code == 0:
            assert "fold" in pd.read_csv(out).columns


NUMBER_TEXT = st.one_of(st.sampled_from(["-1", "0", "1", "nan", "inf", "-inf", "1e309", "abc",
                                         "0.5", "10", "1.0000001", "", " 1"]),
                        st.floats(allow_nan=True).map(repr), st.integers().map(str))


@FUZZ
@given(flag=st.sampled_from(["--lr", "--lr-decay", "--momentum", "--weight-decay", "--epochs",
                             "--patience", "--batch-size", "--image-size", "--workers",
                             "--save-every", "--seed", "--device", "--eval-batch-size"]),
       value=NUMBER_TEXT)
def test_retrain_arguments(tmp_path_factory, flag, value):
    """A drawn option value with data that is not there: refused while parsing (exit 2) or
    at the data (exit 2), never a traceback; nothing trains."""
    import retrain

    folder = Path(tempfile.mkdtemp())
    try:
        argv = ["--dataset", "demo", "--data", str(folder / "none"), "--out", str(folder),
                "--weights", "none", flag, value]
        code, _ = check(retrain.main, argv, [])
        assert code == 2
    finally:
        shutil.rmtree(folder, ignore_errors=True)
