"""predict.py: PNG and DICOM inputs give the dataset path's probabilities; DICOM windowing and
MONOCHROME1; heatmaps; unreadable inputs refused by name; --out writes reproduce-chexnet's
preds.csv (folders expanded, rows in a fixed order, unreadable files left out, ambiguous file
names disambiguated, the file written atomically).

DICOM files are generated with pydicom so that their windowed 8-bit image equals a known 8-bit
image G exactly: stored P = low + 10 * G with Window Width 2550 (10 units per grey level).
"""
from __future__ import annotations

import csv
import re

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from chexnet.analysis import predict
from conftest import shared
from chexnet.data import ImageFileDataset, build_transform, load_xray
from chexnet.labels import NIH_FINDINGS
from chexnet.model import build_model

pydicom = pytest.importorskip("pydicom")
from pydicom.dataset import Dataset, FileMetaDataset  # noqa: E402
from pydicom.uid import (  # noqa: E402
    ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid,
)

SIZE = 64
CENTER, WIDTH = 2001, 2550          # window [726, 3276]: 10 stored units per grey level
LOW = CENTER - WIDTH // 2
MAX12 = 2**12 - 1                   # Bits Stored 12


def write_dicom(path, pixels: np.ndarray, photometric: str = "MONOCHROME2",
                window: tuple[float, float] | None = None,
                rescale: tuple[float, float] | None = None, frames: int = 1,
                bits_stored: int = 12) -> None:
    """A minimal single- or multi-frame DICOM file; pixels (frames?, H, W[, 3]) uint16/uint8."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "DX"
    color = photometric == "RGB"
    ds.Rows, ds.Columns = pixels.shape[-3:-1] if color else pixels.shape[-2:]
    ds.SamplesPerPixel = 3 if color else 1
    if color:
        ds.PlanarConfiguration = 0
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = pixels.dtype.itemsize * 8
    ds.BitsStored = bits_stored if not color else 8
    ds.HighBit = ds.BitsStored - 1
    ds.PixelRepresentation = 0
    if frames > 1:
        ds.NumberOfFrames = frames
    if window:
        ds.WindowCenter, ds.WindowWidth = window
    if rescale:
        ds.RescaleSlope, ds.RescaleIntercept = rescale
    ds.PixelData = np.ascontiguousarray(pixels).tobytes()
    ds.save_as(path, enforce_file_format=True)


def dicom_twins(tmp_path, gray: np.ndarray, name: str) -> tuple:
    """The 8-bit image `gray` as (MONOCHROME2 with rescale, MONOCHROME1 inverted) DICOMs."""
    modality = LOW + 10 * gray.astype(np.int64)        # values after the modality LUT
    mono2, mono1 = tmp_path / f"{name}_m2.dcm", tmp_path / f"{name}_m1.dcm"
    # Stored with slope 2, intercept -1000, so the rescale has to be applied first.
    write_dicom(mono2, ((modality + 1000) // 2).astype(np.uint16), "MONOCHROME2",
                window=(CENTER, WIDTH), rescale=(2, -1000))
    assert ((modality + 1000) % 2 == 0).all()
    # MONOCHROME1: same anatomy, stored inverted, window inverted with it.
    write_dicom(mono1, (MAX12 - modality).astype(np.uint16), "MONOCHROME1",
                window=(MAX12 - CENTER, WIDTH))
    return mono2, mono1


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple:
    """A random-initialised model saved as a project checkpoint (image size 64)."""
    torch.manual_seed(0)
    model = build_model(len(NIH_FINDINGS), "none").eval()
    path = tmp_path_factory.mktemp("ckpt") / "checkpoint.pt"
    torch.save({"model": model.state_dict(), "epoch": 1, "val_loss": 0.5,
                "config": {"image_size": SIZE, "dataset": "nih"},
                "findings": list(NIH_FINDINGS)}, path)
    return model, path


def dataset_probs(model: nn.Module, png) -> torch.Tensor:
    """Probabilities through the training/evaluation data path, for reference. (K,)"""
    ds = ImageFileDataset([str(png)], np.zeros((1, len(NIH_FINDINGS))), ["x"], NIH_FINDINGS,
                    build_transform(SIZE))
    with torch.inference_mode():
        return torch.sigmoid(model(ds[0][0][None]))[0]


def predict_file(model: nn.Module, path) -> torch.Tensor:
    return predict.predict_probs(model, predict.preprocess(predict.load_any(path), SIZE))[0]


def random_gray(seed: int = 0, shape=(48, 40)) -> np.ndarray:
    """A smooth-ish random image, so that the model's output depends on its content."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (6, 5)).astype(np.uint8)
    img = np.asarray(Image.fromarray(coarse).resize(shape[::-1], Image.BILINEAR), np.int64)
    return np.clip(img + rng.integers(-20, 21, shape), 0, 255).astype(np.uint8)


def test_dicom_equals_png_path_and_monochrome1_equals_monochrome2(tmp_path, trained):
    model, _ = trained
    gray = random_gray()
    png = tmp_path / "x.png"
    Image.fromarray(gray, mode="L").save(png)
    mono2, mono1 = dicom_twins(tmp_path, gray, "x")
    for dcm in (mono2, mono1):
        np.testing.assert_array_equal(np.asarray(predict.load_dicom(dcm)), gray)
    expected = dataset_probs(model, png)
    torch.testing.assert_close(predict_file(model, png), expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(predict_file(model, mono2), expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(predict_file(model, mono1), predict_file(model, mono2),
                               rtol=0, atol=1e-6)
    # The comparison has power: an un-inverted MONOCHROME1 image would change the outputs.
    Image.fromarray(255 - gray, mode="L").save(tmp_path / "neg.png")
    assert (dataset_probs(model, tmp_path / "neg.png") - expected).abs().max() > 1e-4


def test_real_nih_png_and_its_dicom(tmp_path, trained):
    pngs = sorted(shared("nih", "images").glob("*.png"))
    if not pngs:
        pytest.skip("no NIH PNG in the shared data")
    model, _ = trained
    png = pngs[0]
    expected = dataset_probs(model, png)
    torch.testing.assert_close(predict_file(model, png), expected, rtol=0, atol=1e-6)
    gray = np.asarray(load_xray(png))
    mono2, mono1 = dicom_twins(tmp_path, gray, png.stem)
    torch.testing.assert_close(predict_file(model, mono2), expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(predict_file(model, mono1), expected, rtol=0, atol=1e-6)


def test_window_maps_edges_to_0_and_255(tmp_path):
    values = np.array([[LOW - 300, LOW, CENTER, LOW + WIDTH, LOW + WIDTH + 300, LOW + 1275]])
    np.testing.assert_array_equal(predict.window_to_uint8(values, CENTER, WIDTH),
                                  [[0, 0, 128, 255, 255, 128]])
    path = tmp_path / "w.dcm"
    write_dicom(path, values.astype(np.uint16), window=(CENTER, WIDTH))
    np.testing.assert_array_equal(np.asarray(predict.load_dicom(path)),
                                  [[0, 0, 128, 255, 255, 128]])
    # MONOCHROME1: the low end of the window is white (the centre, 127.5, rounds to even).
    write_dicom(path, values.astype(np.uint16), "MONOCHROME1", window=(CENTER, WIDTH))
    np.testing.assert_array_equal(np.asarray(predict.load_dicom(path)),
                                  [[255, 255, 128, 0, 0, 128]])


def test_dicom_without_window_is_stretched_min_max(tmp_path):
    values = np.array([[100, 600, 1100]], dtype=np.uint16)
    path = tmp_path / "nowin.dcm"
    write_dicom(path, values)
    np.testing.assert_array_equal(np.asarray(predict.load_dicom(path)), [[0, 128, 255]])


def test_dicom_is_recognised_by_content(tmp_path):
    path = tmp_path / "image_without_suffix"
    write_dicom(path, (LOW + 10 * random_gray(1).astype(np.uint16)), window=(CENTER, WIDTH))
    assert predict.is_dicom(path)
    np.testing.assert_array_equal(np.asarray(predict.load_any(path)), random_gray(1))


def test_cli_table_heatmaps_and_refusals(tmp_path, trained, capsys):
    _, ckpt = trained
    gray = random_gray(2)
    png = tmp_path / "a.png"
    Image.fromarray(gray, mode="L").save(png)
    mono2, mono1 = dicom_twins(tmp_path, gray, "a")
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(png.read_bytes()[:60])
    text = tmp_path / "notes.png"
    text.write_text("not an image\n")
    multi = tmp_path / "multi.dcm"
    write_dicom(multi, np.zeros((2, 8, 8), np.uint16), frames=2)
    rgb = tmp_path / "colour.dcm"
    write_dicom(rgb, np.zeros((8, 8, 3), np.uint8), "RGB")
    garbage = tmp_path / "garbage.dcm"
    garbage.write_bytes(b"\x00" * 10)
    bad = {tmp_path / "absent.png": "not found", truncated: "not a readable",
           text: "not a readable", multi: "multi-frame", rgb: "colour", garbage: "DICOM"}
    heat = tmp_path / "heat"

    code = predict.main([str(png), *map(str, bad), str(mono2), str(mono1),
                         "--checkpoint", str(ckpt), "--heatmap", str(heat)])
    out, err = capsys.readouterr()
    assert code == 2
    for path, words in bad.items():
        line = next((ln for ln in err.splitlines() if str(path) in ln), "")
        assert words in line, (path, err)
    # One table per readable image; the same pixels give the same table.
    blocks = re.findall(r"^(\S+)\n((?:  .*\n)+)", out, re.M)
    tables = {name: re.sub(r"  heatmap.*\n", "", block) for name, block in blocks}
    assert set(tables) == {str(png), str(mono2), str(mono1)}
    assert tables[str(png)] == tables[str(mono2)] == tables[str(mono1)]
    rows = [ln.split() for ln in tables[str(png)].splitlines()]
    assert len(rows) == len(NIH_FINDINGS)
    probs = [float(p) for _, p in rows]
    assert probs == sorted(probs, reverse=True)
    top = rows[0][0]
    written = sorted(p.name for p in heat.iterdir())
    assert written == sorted(f"{stem}_{top}.png" for stem in ("a", "a_m2", "a_m1"))
    assert Image.open(heat / f"a_{top}.png").size[0] > 200

    assert predict.main([str(png), "--checkpoint", str(ckpt), "--top", "3"]) == 0
    out = capsys.readouterr().out
    assert len(out.strip().splitlines()) == 1 + 3


def test_missing_or_foreign_checkpoint(tmp_path, monkeypatch, capsys):
    png = tmp_path / "a.png"
    Image.fromarray(random_gray(3), mode="L").save(png)
    monkeypatch.setattr(predict, "DEFAULT_CHECKPOINT", tmp_path / "pretrained" / "checkpoint.pt")
    assert predict.main([str(png)]) == 2
    err = capsys.readouterr().err
    assert "pretrained" in err and "--checkpoint" in err and "retrain.py" in err

    pickled = tmp_path / "pickled.pt"
    torch.save({"model": nn.Linear(2, 2)}, pickled)
    assert predict.main([str(png), "--checkpoint", str(pickled)]) == 2
    err = capsys.readouterr().err
    assert str(pickled) in err and "convert_checkpoint.py" in err

    assert predict.main([str(png), "--checkpoint", str(png)]) == 2
    assert f"{png}: not a PyTorch checkpoint" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------
# --out: the CSV
# --------------------------------------------------------------------------------------------
# reproduce-chexnet's preds.csv columns for the checkpoint's (NIH) findings, written out.
HEADER = ["Image Index", "prob_Atelectasis", "prob_Cardiomegaly", "prob_Effusion",
          "prob_Infiltration", "prob_Mass", "prob_Nodule", "prob_Pneumonia", "prob_Pneumothorax",
          "prob_Consolidation", "prob_Edema", "prob_Emphysema", "prob_Fibrosis",
          "prob_Pleural_Thickening", "prob_Hernia"]


def read_preds(path) -> tuple[list[str], list[str], np.ndarray]:
    """(header, first column, the other columns as floats), read with the csv module."""
    with open(path, newline="") as f:
        header, *rows = list(csv.reader(f))
    return header, [r[0] for r in rows], np.array([[float(v) for v in r[1:]] for r in rows])


def save_gray(path, seed: int, **kw) -> np.ndarray:
    """random_gray(seed) written to `path` (format from the suffix); returns the pixels."""
    gray = random_gray(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(gray, mode="L").save(path, **kw)
    return gray


def expected_rows(model: nn.Module, pngs) -> np.ndarray:
    """The dataset path's probabilities of each file, stacked (N, K)."""
    return np.stack([dataset_probs(model, p).numpy() for p in pngs]).astype(np.float64)


def test_out_csv_rows_ids_columns_folders_and_unreadable(tmp_path, trained, capsys):
    model, ckpt = trained
    root = tmp_path / "scans"
    save_gray(root / "z.png", 10)
    save_gray(root / "UPPER.PNG", 11)
    save_gray(root / "sub" / "b.jpg", 12, quality=95)
    gray = save_gray(tmp_path / "a_as_png.png", 13)          # the DICOM's twin, for reference
    (root / "sub" / "deeper").mkdir()
    mono2, _ = dicom_twins(root / "sub" / "deeper", gray, "a")
    mono2.rename(root / "sub" / "deeper" / "a.dcm")
    (root / "sub" / "deeper" / "a_m1.dcm").unlink()
    broken = root / "sub" / "broken.png"
    broken.write_bytes((root / "z.png").read_bytes()[:60])
    (root / "notes.txt").write_text("not an image, not listed\n")
    (root / ".hidden.png").write_bytes(b"macOS resource fork")
    extra = tmp_path / "extra.png"
    save_gray(extra, 14)
    out = tmp_path / "preds.csv"

    # z.png is named again: one row. Batches of 2 leave a partial last batch.
    code = predict.main([str(root), str(extra), str(root / "z.png"), "--checkpoint", str(ckpt),
                         "--out", str(out), "--batch-size", "2"])
    stdout, err = capsys.readouterr()
    assert code == 2
    assert f"error: {broken}: not a readable" in err and "1 of 6 images failed" in err
    assert ".hidden" not in err and "notes.txt" not in err
    assert f"wrote {out}: 5 images" in stdout
    header, ids, probs = read_preds(out)
    assert header == HEADER
    # Sorted by path inside the folder (so a.dcm after b.jpg), then the next argument.
    assert ids == ["UPPER.PNG", "b.jpg", "a.dcm", "z.png", "extra.png"]
    sources = [root / "UPPER.PNG", root / "sub" / "b.jpg", tmp_path / "a_as_png.png",
               root / "z.png", extra]
    expected = expected_rows(model, sources)
    assert (np.abs(expected[:, None] - expected[None]).max(-1) + np.eye(5)).min() > 1e-3
    np.testing.assert_allclose(probs, expected, rtol=0, atol=1e-5)

    # Without --out the folder is expanded the same way, and the tables are printed.
    assert predict.main([str(root), str(extra), "--checkpoint", str(ckpt)]) == 2
    names = re.findall(r"^(\S+)\n  ", capsys.readouterr().out, re.M)
    assert names == [str(root / "UPPER.PNG"), str(root / "sub" / "b.jpg"),
                     str(root / "sub" / "deeper" / "a.dcm"), str(root / "z.png"), str(extra)]


def test_out_columns_follow_the_checkpoint_findings(tmp_path, trained, capsys):
    model, ckpt = trained
    state = torch.load(ckpt, weights_only=True)
    state["findings"] = state["findings"][::-1]     # output k is now named findings[-1 - k]
    reordered = tmp_path / "reordered.pt"
    torch.save(state, reordered)
    png = tmp_path / "a.png"
    save_gray(png, 15)
    assert predict.main([str(png), "--checkpoint", str(reordered), "--out",
                         str(tmp_path / "p.csv")]) == 0
    header, ids, probs = read_preds(tmp_path / "p.csv")
    assert header == HEADER[:1] + HEADER[:0:-1] and ids == ["a.png"]
    np.testing.assert_allclose(probs, expected_rows(model, [png]), rtol=0, atol=1e-5)


def test_out_same_file_name_in_two_folders(tmp_path, trained, capsys):
    """x.png in a/ and b/: those rows get their path under the common folder; y.png keeps its
    name; each row holds its own file's probabilities."""
    model, ckpt = trained
    files = [tmp_path / "a" / "x.png", tmp_path / "b" / "x.png", tmp_path / "b" / "y.png"]
    for seed, path in enumerate(files, 20):
        save_gray(path, seed)
    out = tmp_path / "preds.csv"
    assert predict.main([str(tmp_path / "a"), str(tmp_path / "b"), "--checkpoint", str(ckpt),
                         "--out", str(out)]) == 0
    err = capsys.readouterr().err
    header, ids, probs = read_preds(out)
    assert header == HEADER
    assert ids == ["a/x.png", "b/x.png", "y.png"]
    assert f"{files[0]} -> a/x.png" in err and f"{files[1]} -> b/x.png" in err
    np.testing.assert_allclose(probs, expected_rows(model, files), rtol=0, atol=1e-5)


def test_out_with_heatmap(tmp_path, trained, capsys):
    _, ckpt = trained
    png = tmp_path / "a.png"
    save_gray(png, 30)
    out, heat = tmp_path / "preds.csv", tmp_path / "heat"
    assert predict.main([str(png), "--checkpoint", str(ckpt), "--out", str(out),
                         "--heatmap", str(heat)]) == 0
    header, ids, probs = read_preds(out)
    assert ids == ["a.png"]
    top = HEADER[1 + int(np.argmax(probs[0]))][len("prob_"):]
    assert [p.name for p in heat.iterdir()] == [f"a_{top}.png"]


def test_out_refusals_name_the_file_and_keep_the_old_csv(tmp_path, trained, capsys, monkeypatch):
    _, ckpt = trained
    png, broken = tmp_path / "a.png", tmp_path / "broken.png"
    save_gray(png, 31)
    broken.write_bytes(b"\x89PNG truncated")
    args = [str(png), str(broken), "--checkpoint", str(ckpt), "--out"]

    # Missing folder and a folder as --out: refused before any image is read.
    missing = tmp_path / "no_such_dir" / "preds.csv"
    assert predict.main([*args, str(missing)]) == 2
    err = capsys.readouterr().err
    assert f"{missing}: {missing.parent} does not exist" in err and str(broken) not in err
    assert not missing.parent.exists()
    assert predict.main([*args, str(tmp_path)]) == 2
    assert f"{tmp_path} is a folder" in capsys.readouterr().err

    # The write fails at the end: reported, the previous CSV intact, no temp file left.
    out = tmp_path / "out" / "predictions.csv"  # preds.csv would make "out" a run folder
    out.parent.mkdir()
    out.write_text("previous\n")
    def refuse(src, dst):
        raise PermissionError(13, "Permission denied")
    monkeypatch.setattr(predict.os, "replace", refuse)
    assert predict.main([*args, str(out)]) == 2
    err = capsys.readouterr().err
    assert f"could not write {out}: Permission denied" in err
    assert out.read_text() == "previous\n" and sorted(out.parent.iterdir()) == [out]
    monkeypatch.undo()

    # Nothing readable, or an empty folder: nothing written, exit 2.
    assert predict.main([str(broken), "--checkpoint", str(ckpt), "--out", str(out)]) == 2
    assert "no image could be read" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert predict.main([str(tmp_path / "empty"), "--checkpoint", str(ckpt), "--out",
                         str(out)]) == 2
    assert f"{tmp_path / 'empty'}: no .png" in capsys.readouterr().err
    assert out.read_text() == "previous\n"
    with pytest.raises(SystemExit):
        predict.main([str(png), "--checkpoint", str(ckpt), "--out", str(out), "--top", "3"])
    assert "--top" in capsys.readouterr().err


def test_visualize_prediction_reads_a_dicom_as_predict_does(tmp_path, trained, capsys):
    """It said 'corrupt or truncated' for a valid DICOM: it now reads it with the same reader
    as predict.py, and draws the same heatmap as for the PNG with the same pixels."""
    import visualize_prediction as visualize

    gray = random_gray(5)
    mono2, _ = dicom_twins(tmp_path, gray, "scan")
    png = tmp_path / "scan.png"
    Image.fromarray(gray, "L").save(png)
    _, checkpoint = trained
    outs = []
    for source in (mono2, png):
        out = tmp_path / f"heat_{source.suffix[1:]}.png"
        assert visualize.main(["--checkpoint", str(checkpoint), "--image", str(source), "--label",
                        "Mass", "--out", str(out)]) == 0
        outs.append(np.asarray(Image.open(out)))
    err = capsys.readouterr().err
    assert "corrupt" not in err and "Traceback" not in err
    np.testing.assert_array_equal(outs[0], outs[1])


def test_read_only_out_folder_is_refused_before_predicting(tmp_path, trained, capsys,
                                                           monkeypatch):
    """A folder the user may not write into (a read-only mount, which os.access does not
    report to root): refused at once, naming --out, before any image is read."""
    import errno
    import os

    _, ckpt = trained
    png = tmp_path / "a.png"
    save_gray(png, 3)
    locked = tmp_path / "locked"
    locked.mkdir()
    real_open = os.open

    def os_open(path, flags, *args, **kwargs):
        if (flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT) and isinstance(path, (str, os.PathLike))
                and os.path.realpath(path).startswith(str(locked))):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_open(path, flags, *args, **kwargs)

    def predicted(*args, **kwargs):
        raise AssertionError("images were predicted before --out was checked")

    monkeypatch.setattr(os, "open", os_open)
    monkeypatch.setattr(predict, "predict_batches", predicted)
    out = locked / "preds.csv"
    assert predict.main([str(png), "--checkpoint", str(ckpt), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert (f"{out}: cannot write in the folder {locked} (Permission denied). Choose a "
            "writable place with --out.") in err
    assert not out.exists()
