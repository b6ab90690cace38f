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
import json
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

from conftest import hashes, tiny_run
from chexnet.labels import NIH_FINDINGS

EXAMPLES = int(os.environ.get("CHEXNET_FUZZ_EXAMPLES", "40"))
FUZZ = settings(max_examples=EXAMPLES, derandomize=True, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

# One torch thread: every example runs a model pass or more on 2 shared cores (conftest.py).
pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]


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


def drawn_csv(data, path: Path) -> Path:
    """`path`, holding a drawn CSV (csv_bytes)."""
    path.write_bytes(data.draw(csv_bytes()))
    return path


@st.composite
def image_file(draw, folder: Path) -> Path:
    """An image file (or something where one should be)."""
    name = draw(st.sampled_from(["a.png", "b.jpg", "c.png", "d.jpeg"]))
    path = folder / f"{len(list(folder.iterdir()))}_{name}"  # a new name in the folder
    kind = draw(st.sampled_from(["image", "image", "image", "truncated", "empty", "text",
                                 "folder", "dangling link", "frames", "bomb", "tiff frames"]))
    w, h = draw(st.integers(1, 48)), draw(st.integers(1, 48))
    if kind == "bomb":
        path.write_bytes(png_bomb())
        return path
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
    if kind in ("frames", "tiff frames"):
        frames = [image.convert("L"), image.convert("L").rotate(90)]
        kind_of_file = "TIFF" if kind == "tiff frames" else "PNG" if fmt == "PNG" else "GIF"
        frames[0].save(buffer, kind_of_file, save_all=True, append_images=frames[1:])
    else:
        image.save(buffer, fmt)
    data = buffer.getvalue()
    if kind == "truncated":
        data = data[: draw(st.integers(0, max(len(data) - 1, 0)))]
    path.write_bytes(data)
    return path


def png_bomb(side: int = 20_000) -> bytes:
    """A PNG header claiming side x side grey pixels (400 million: over twice PIL's
    MAX_IMAGE_PIXELS, so PIL raises DecompressionBombError on opening), in 60 bytes."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data)))
    header = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b""))
            + chunk(b"IEND", b""))


BOX_COLUMNS = ["Image Index", "Finding Label", "Bbox [x", "y", "w", "h]"]


@st.composite
def boxes_bytes(draw, ids: list[str]) -> bytes:
    """A BBox_List_2017.csv: NIH's header (or another), rows naming the run's images or not,
    boxes in or out of the image, findings spelled NIH's way or not."""
    header = draw(st.sampled_from([BOX_COLUMNS, BOX_COLUMNS, BOX_COLUMNS[:3], ["a", "b"]]))
    rows = []
    for _ in range(draw(st.integers(0, 5))):
        rows.append([draw(st.sampled_from([*ids, "x.png", ""])),
                     draw(st.sampled_from(["Cardiomegaly", "Infiltrate", "Mass", "Nope", ""])),
                     *(draw(VALUE) for _ in header[2:])])
    text = ",".join(header) + ",,,\n" + "".join(",".join(map(str, r)) + "\n" for r in rows)
    return text.encode()


@st.composite
def checkpoint_file(draw, folder: Path, good: Path, good_weight: int = 6) -> Path:
    """A checkpoint: the real one (`good_weight` chances in 6 + `good_weight`), truncated,
    random bytes, foreign, or of other findings."""
    path = folder / "model.pt"
    kind = draw(st.sampled_from(["good"] * good_weight + [
        "truncated", "bytes", "foreign", "other findings", "missing", "weights only"]))
    state = torch.load(good, weights_only=True) if kind in ("other findings", "weights only") \
        else None  # (28 MB to read: only where it is used)
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


READ_ONLY = "read_only"  # a folder of this name in a test's folder refuses writes (check)


def output_path(draw, folder: Path, inputs: list[Path], run: Path,
                fresh: int = 2) -> Path | None:
    """An output path: a new file (`fresh` chances in 7 + `fresh`) or a wrong place."""
    choice = draw(st.sampled_from(["fresh"] * fresh + [
        "an input", "an input", "a folder", "missing parent", "a run's file", "none",
        "read-only"]))
    if choice == "read-only":
        (folder / READ_ONLY).mkdir(exist_ok=True)
        return folder / READ_ONLY / "out_file.csv"
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
@contextlib.contextmanager
def writes_refused(folder: Path):
    """Every write under `folder` raises PermissionError, as on a read-only mount (root
    ignores chmod): tests/read_only.py, undone afterwards."""
    from read_only import refuse_writes

    saved = []

    def patch(owner, name, value):
        saved.append((owner, name, getattr(owner, name)))
        setattr(owner, name, value)
    refuse_writes(folder, patch)
    try:
        yield
    finally:
        for owner, name, value in reversed(saved):
            setattr(owner, name, value)


def check(main, argv: list[str], inputs: list[Path]) -> tuple[int, str]:
    """Run `main(argv)`; assert rules 1-3 of the module docstring; return (code, stderr).
    Writes under a READ_ONLY folder beside the first input's are refused."""
    before = hashes(*inputs)
    err = io.StringIO()
    read_only = Path(tempfile.gettempdir()) / "no-such-folder"
    for path in inputs:
        if (path.parent / READ_ONLY).is_dir():
            read_only = path.parent / READ_ONLY
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()), \
            writes_refused(read_only):
        try:
            code = main(argv)
        except SystemExit as stop:  # argparse
            code = stop.code
    message = err.getvalue()
    assert code in (0, 2, 3), (argv, code, message)
    assert "Traceback" not in message, (argv, message)
    after = hashes(*inputs)
    assert {path: after.get(path) for path in before} == before, (argv, "an input changed")
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
        preds = drawn_csv(data, folder / "preds.csv")
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
        log = drawn_csv(data, folder / "log_train.csv")
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
        # Mostly a good model and a new --out: the check below (every readable input
        # predicted or named) needs both.
        ckpt = data.draw(checkpoint_file(folder, run_dir / "checkpoint.pt", good_weight=18))
        out = output_path(data.draw, folder, [*drawn, ckpt], run_dir, fresh=14)
        target = data.draw(st.sampled_from([images, drawn[0]]))
        argv = [str(target), "--checkpoint", str(ckpt)] + (["--out", str(out)] if out else [])
        fresh = out is not None and not out.exists()
        code, message = check(predict.main, argv, [images, ckpt, run_dir])
        if code == 0 and out:
            table = pd.read_csv(out)
            assert len(table) >= 1 and not table.filter(like="prob_").isna().any().any()
        if fresh and out.is_file():
            # Written: every drawn file is predicted (a row) or named as left out, and exit 0
            # only when none was left out.
            rows = set(pd.read_csv(out)["Image Index"])
            for path in (drawn if target == images else [target]):
                if path.is_file():
                    predicted = any(Path(str(row)).name == path.name for row in rows)
                    assert predicted or (code == 2 and str(path) in message), (path, message)


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
        entry = drawn_csv(data, folder / "Data_Entry_2017.csv")
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


# ---------------------------------------------------------------------------------------------
# The other entry points: the analysis tools, data tooling and the downloader
# ---------------------------------------------------------------------------------------------
FEW = settings(FUZZ, max_examples=max(4, EXAMPLES // 5))  # a whole report or model pass each


def mostly(good: list[str], bad: list[str]) -> st.SearchStrategy[str]:
    """A value of `good` three times in four: a bad number is refused while parsing (tested
    for every option in test_invariants), so most examples go on to the inputs."""
    return st.sampled_from(good * (3 * max(1, len(bad)) // max(1, len(good)) + 1) + bad)


@st.composite
def damaged_run(draw, folder: Path, good: Path) -> Path:
    """A copy of a run folder with up to two of its files replaced by bad ones or deleted."""
    run = folder / "run"
    shutil.copytree(good, run)
    for _ in range(draw(st.integers(0, 2))):
        name = draw(st.sampled_from(["preds.csv", "config.json", "checkpoint.pt",
                                     "log_train.csv"]))
        how = draw(st.sampled_from(["delete", "replace"]))
        target = run / name
        target.unlink(missing_ok=True)
        if how == "delete":
            continue
        if name == "checkpoint.pt":
            drawn = draw(checkpoint_file(folder, good / "checkpoint.pt"))
            if drawn.exists():  # ("missing" is one of the drawn kinds)
                shutil.move(drawn, target)
        elif name == "config.json":
            target.write_text(draw(st.sampled_from(["", "{", "[]", '{"image_size": -3}',
                                                    '{"dataset": "nope"}'])))
        else:
            target.write_bytes(draw(csv_bytes()))
    return run


def with_suffix(out: Path | None, suffix: str) -> Path | None:
    return out.with_suffix(suffix) if out is not None and out.suffix == ".csv" else out


@FEW
@given(data=st.data())
def test_retrain_inputs(run_dir, data):
    """retrain.py given a drawn labels file, --weights checkpoint or last.pt to resume from:
    a message, or one epoch whose outputs parse; a refused --resume leaves its run as it was."""
    import retrain

    nih = run_dir.parents[1] / "nih"
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        argv = ["--dataset", "demo", "--data", str(nih), "--out", str(folder / "runs"),
                "--name", "r", "--epochs", "1", "--image-size", "32", "--batch-size", "8",
                "--workers", "0", "--eval-batch-size", "16"]
        inputs = [nih, run_dir]
        what = data.draw(st.sampled_from(["labels", "weights", "resume"]))
        if what == "labels":
            argv += ["--weights", "none", "--labels",
                     str(drawn_csv(data, folder / "labels.csv"))]
            inputs.append(folder / "labels.csv")
        elif what == "weights":
            weights = data.draw(checkpoint_file(folder, run_dir / "checkpoint.pt", 2))
            argv += ["--weights", str(weights)]
            inputs.append(weights)
        else:  # a run folder whose last.pt is drawn: a checkpoint.pt is no last.pt, ...
            run = folder / "runs" / "r"
            shutil.copytree(run_dir, run)
            drawn = data.draw(checkpoint_file(folder, run_dir / "checkpoint.pt", 2))
            if drawn.exists():
                shutil.move(drawn, run / "last.pt")
            argv += ["--weights", "none", "--resume"]
        before = hashes(folder / "runs")
        code, _ = check(retrain.main, argv, inputs)
        if code != 0:
            assert hashes(folder / "runs") == before, (argv, "a refused run changed a file")
        else:
            out = folder / "runs" / "r"
            assert set(pd.read_csv(out / "preds.csv")["Image Index"]) == set(
                pd.read_csv(run_dir / "preds.csv")["Image Index"])  # the same test fold
            assert "model" in torch.load(out / "checkpoint.pt", weights_only=True)


@FEW
@given(data=st.data())
def test_report(run_dir, data):
    import report

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        run = data.draw(damaged_run(folder, run_dir))
        out = with_suffix(output_path(data.draw, folder, [run / "preds.csv"], run), ".html")
        argv = [str(run), "--n-boot", data.draw(mostly(["5"], ["0", "x"])), "--top", "1"]
        argv += ["--out", str(out)] if out else []
        code, _ = check(report.main, argv, [run])
        if code == 0:
            html = (out or run / "report.html").read_text()
            assert html.rstrip().endswith("</html>") and run.name in html


@FUZZ
@given(data=st.data())
def test_prepare_data(data):
    import prepare_data

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        root = folder / "nih"
        (root / "images").mkdir(parents=True)
        drawn = [data.draw(image_file(root / "images"))
                 for _ in range(data.draw(st.integers(1, 4)))]
        entry = root / "Data_Entry_2017.csv"
        if data.draw(st.booleans()):  # a well-formed file listing the drawn images (and one more)
            names = [p.name for p in drawn] + data.draw(st.sampled_from([[], ["absent.png"]]))
            rows = [f"{n},{data.draw(st.sampled_from(['No Finding', 'Mass|Nodule', 'Nope']))},"
                    f"0,{i + 1},40,F,PA,8,8,0.1,0.1" for i, n in enumerate(names)]
            entry.write_text("Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,"
                             "Patient Gender,View Position,OriginalImage[Width,Height],"
                             "OriginalImagePixelSpacing[x,y]\n" + "\n".join(rows) + "\n")
        else:
            entry.write_bytes(data.draw(csv_bytes()))
        labels_out = output_path(data.draw, folder, [entry, *drawn], root) or root / "labels.csv"
        argv = ["nih", "--data", str(root), "--labels", str(entry), "--workers", "1",
                "--image-size", data.draw(mostly(["8", "16"], ["0"])),
                "--split", data.draw(st.sampled_from(["random", "reference", "official"])),
                "--labels-out", str(labels_out), "--cache-dir", str(folder / "cache")]
        argv += data.draw(st.sampled_from([[], ["--skip-bad"]]))
        code, _ = check(prepare_data.main, argv, [entry, root / "images"])
        if code == 0:
            listed = pd.read_csv(labels_out)
            assert "fold" in listed.columns
            cache = next((folder / "cache").iterdir())
            assert json.loads((cache / "manifest.json").read_text())["complete"]
            cached = set(pd.read_csv(cache / "index.csv")["image_id"])
            skipped = (cache / "skip.txt").read_text()
            for image in listed["Image Index"]:  # cached, or named in skip.txt
                assert image in cached or image in skipped, image


@FUZZ
@given(data=st.data())
def test_explore_data(run_dir, data):
    import explore_data

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        labels = drawn_csv(data, folder / "labels.csv")
        out = output_path(data.draw, folder, [labels], run_dir) or folder / "explore"
        nih = run_dir.parents[1] / "nih"
        argv = ["nih", "--data", str(nih), "--labels", str(labels), "--out", str(out),
                "--k", data.draw(mostly(["1", "2"], ["0", "-1"])),
                "--missing", data.draw(st.sampled_from(["keep", "skip"]))]
        code, _ = check(explore_data.main, argv, [labels, nih, run_dir])
        if code == 0:
            assert list(Path(out).glob("*.csv")) and list(Path(out).glob("*.png"))


@FEW
@given(data=st.data())
def test_cross_eval(run_dir, data):
    import cross_eval

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        ckpt = data.draw(checkpoint_file(folder, run_dir / "checkpoint.pt"))
        labels = drawn_csv(data, folder / "labels.csv")
        out = output_path(data.draw, folder, [ckpt, labels], run_dir) or folder / "cross.csv"
        nih = run_dir.parents[1] / "nih"
        argv = ["--checkpoint", str(ckpt), "--dataset", "demo", "--data", str(nih),
                "--out", str(out), "--n-boot", data.draw(mostly(["0", "5"], ["-1"])),
                "--fold", data.draw(st.sampled_from(["test", "all"]))]
        argv += data.draw(st.sampled_from([[], ["--labels", str(labels)]]))
        code, _ = check(cross_eval.main, argv, [ckpt, labels, nih, run_dir])
        if code == 0:
            assert "auc" in pd.read_csv(out).columns


@FEW
@given(data=st.data())
def test_localization(run_dir, data):
    import localization

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        run = data.draw(damaged_run(folder, run_dir))
        ids = pd.read_csv(run_dir / "preds.csv")["Image Index"].tolist()
        boxes = folder / "boxes.csv"
        boxes.write_bytes(data.draw(boxes_bytes(ids)))
        out = output_path(data.draw, folder, [boxes], run) or folder / "loc.csv"
        argv = ["--run", str(run), "--boxes", str(boxes), "--out", str(out),
                "--method", data.draw(st.sampled_from(["cam", "gradcam"])),
                "--tolerance", data.draw(mostly(["0", "2"], ["-1", "nan"]))]
        code, _ = check(localization.main, argv, [boxes, run])
        if code == 0:
            assert len(pd.read_csv(out)) >= 1


@FEW
@given(data=st.data())
def test_photo_corruptions(run_dir, data):
    import photo_corruptions

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        run = data.draw(damaged_run(folder, run_dir))
        out = output_path(data.draw, folder, [run / "preds.csv"], run) or folder / "rob.csv"
        kinds = data.draw(st.lists(st.sampled_from(["blur", "jpeg", "glare", "nope"]),
                                   min_size=1, max_size=2))
        severities = data.draw(st.lists(mostly(["1", "5"], ["0", "6", "x"]), min_size=1,
                                        max_size=2))
        argv = ["--run", str(run), "--kinds", *kinds, "--severities", *severities,
                "--max-images", data.draw(mostly(["4"], ["0"])), "--workers", "0",
                "--out", str(out)]
        code, _ = check(photo_corruptions.main, argv, [run])
        if code == 0:
            table = pd.read_csv(out)
            assert set(table["corruption"]) >= set(kinds) - {"nope"}


@FUZZ
@given(data=st.data())
def test_nih_batch_download_zips(data):
    """URLs only on this machine: a closed port (connection refused), a missing file:// path,
    or nonsense; no network is ever reached."""
    import socket

    import nih_batch_download_zips

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{s.getsockname()[1]}/images_001.tar.gz"
    url = mostly([closed, "file:///no/such/file.tar.gz"], ["not a url", "ftp://", ""])
    name = mostly(["images_001.tar.gz", "images_002.tar.gz"], ["../escape.tar.gz", "a b", ""])
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        urls = folder / "urls.txt"
        lines = [f"{data.draw(name)} {data.draw(url)}" for _ in range(data.draw(st.integers(0, 3)))]
        urls.write_text("\n".join(lines + data.draw(st.sampled_from([[], ["# c", "x"]]))) + "\n")
        out = output_path(data.draw, folder, [urls], folder) or folder / "dl"
        argv = ["--out", str(out), "--url-list", str(urls), "--retries", "0", "--timeout", "2",
                "--backoff", "0", "--no-progress"]
        argv += data.draw(st.sampled_from([[], [], ["--only", "1"], ["--only", "0"],
                                           ["--extract"], ["--extract"]]))
        code, _ = check(nih_batch_download_zips.main, argv, [urls])
        if code == 0:
            assert not lines or all(not line.split()[0:1] for line in lines) or out.is_dir()


@FUZZ
@given(data=st.data())
def test_demo_data(data):
    import demo_data

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        (folder / "keep.txt").write_text("an input beside the output")
        out = output_path(data.draw, folder, [folder / "keep.txt"], folder) or folder / "demo"
        argv = ["--out", str(out), "--kind", data.draw(st.sampled_from(["nih", "chexphoto"])),
                "--n-images", data.draw(mostly(["3", "1"], ["0", "-1", "x"])),
                "--n-train", "3", "--n-valid", "2", "--workers", "1",
                "--png-size", data.draw(mostly(["16"], ["3", "0"]))]
        argv += data.draw(st.sampled_from([[], ["--underdiagnose", "F:0.5"],
                                           ["--underdiagnose", "X:2"], ["--underdiagnose", ":"]]))
        code, _ = check(demo_data.main, argv, [folder / "keep.txt"])
        if code == 0:
            entries = list(Path(out).rglob("*.csv"))
            assert entries and all(len(pd.read_csv(e)) >= 1 for e in entries
                                   if e.name in ("Data_Entry_2017.csv", "train.csv"))
