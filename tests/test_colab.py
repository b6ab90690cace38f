"""A Colab reset that costs minutes: the cache saved to Drive and copied back
(chexnet/datatools/colab.py),
resumable copies (files.copy_resumable), training from the cache alone, and a pre-resized
NIH copy cached as it is. The notebook itself runs as a Colab session in test_colab_notebook."""
from __future__ import annotations

import hashlib
import json
import shutil

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

import retrain
from chexnet.datatools import colab
from chexnet import files
from chexnet.cache import open_cache
from chexnet.datatools.demo import make_nih_demo
from chexnet.datatools.prepare import _source_size, prepare_nih

SIZE = 32
SAVED = ("images.u8", "index.csv", "done.npy", "manifest.json", "skip.txt", "nih_labels.csv")


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# ------------------------------------------------------------------------- resumable copies
def test_a_copy_continues_the_part_file_an_interrupted_copy_left(tmp_path):
    data = np.random.default_rng(0).integers(0, 256, 3_000_000, dtype=np.uint8).tobytes()
    src, dst = tmp_path / "src.bin", tmp_path / "out" / "dst.bin"
    src.write_bytes(data)
    dst.parent.mkdir()
    (tmp_path / "out" / "dst.bin.part").write_bytes(data[:1_000_000])
    seen = []
    done = files.copy_resumable(src, dst, seen.append)
    assert done.bytes == 2_000_000 and sum(seen) == 2_000_000
    assert done.sha256 == sha(data) and dst.read_bytes() == data
    assert sorted(p.name for p in dst.parent.iterdir()) == ["dst.bin"]


def test_a_part_file_longer_than_the_source_is_started_again(tmp_path):
    src, dst = tmp_path / "src.bin", tmp_path / "dst.bin"
    src.write_bytes(b"abc" * 10)
    (tmp_path / "dst.bin.part").write_bytes(b"x" * 100)
    done = files.copy_resumable(src, dst)
    assert done.bytes == 30 and dst.read_bytes() == b"abc" * 10


# ------------------------------------------------------------------------- the Drive cache
@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """A demo NIH folder with its 32 px cache and nih_labels.csv, as prepare_data.py leaves it."""
    root = tmp_path_factory.mktemp("colab") / "nih"
    make_nih_demo(root, n_images=60, size=40, seed=3)
    prepare_nih(root, SIZE, labels=str(root / "Data_Entry_2017.csv"), split="random",
                workers=1, progress=False)
    return root


@pytest.fixture
def drive(prepared, tmp_path):
    folder = tmp_path / "MyDrive" / "chexnet_cache" / "demo-32"
    colab.save_cache(prepared, SIZE, folder)
    return folder


def local_bytes(root) -> dict[str, bytes]:
    return {name: (root / name if name == "nih_labels.csv" else root / "cache" / "32" / name
                   ).read_bytes() for name in SAVED}


def test_save_records_every_file_and_restore_copies_them_back_checked(prepared, drive,
                                                                      tmp_path, capsys):
    want = local_bytes(prepared)
    record = json.loads((drive / "copies.json").read_text())["files"]
    assert record == {n: {"size": len(b), "sha256": sha(b)} for n, b in want.items()}
    fresh = tmp_path / "content" / "nih"  # a reset VM: nothing on the local disk
    done = colab.restore_cache(drive, fresh, SIZE)
    assert done.ok and done.bytes_copied == sum(map(len, want.values()))
    assert local_bytes(fresh) == want
    assert f"{done.bytes_copied:,} bytes copied" in capsys.readouterr().out
    # retrain.py's own check accepts it: same labels file bytes, complete manifest
    assert open_cache(fresh, SIZE, fresh / "nih_labels.csv") is not None
    again = colab.restore_cache(drive, fresh, SIZE)  # the next Run all on the same VM
    assert again.ok and again.bytes_copied == 0 and sorted(again.present) == sorted(SAVED)


def test_a_save_continuing_a_part_of_other_bytes_on_drive_records_the_true_hash(prepared,
                                                                               tmp_path):
    folder = tmp_path / "drive"
    folder.mkdir()
    (folder / "images.u8.part").write_bytes(b"\x07" * 1000)  # an older cache's interrupted save
    colab.save_cache(prepared, SIZE, folder)
    want = local_bytes(prepared)
    record = json.loads((folder / "copies.json").read_text())["files"]
    assert record["images.u8"]["sha256"] == sha(want["images.u8"])
    assert (folder / "images.u8").read_bytes() == want["images.u8"]


def test_saving_again_copies_nothing(prepared, drive, capsys):
    assert colab.save_cache(prepared, SIZE, drive) == 0


def test_an_interrupted_restore_continues_where_it_stopped(prepared, drive, tmp_path):
    images = (drive / "images.u8").read_bytes()
    fresh = tmp_path / "nih"
    (fresh / "cache" / "32").mkdir(parents=True)
    (fresh / "cache" / "32" / "images.u8.part").write_bytes(images[:len(images) // 3])
    done = colab.restore_cache(drive, fresh, SIZE)
    total = sum(len(b) for b in local_bytes(prepared).values())
    assert done.ok and done.bytes_copied == total - len(images) // 3
    assert local_bytes(fresh) == local_bytes(prepared)


def test_a_part_file_from_other_bytes_is_caught_by_the_hash_and_copied_again(prepared, drive,
                                                                             tmp_path):
    fresh = tmp_path / "nih"
    (fresh / "cache" / "32").mkdir(parents=True)
    (fresh / "cache" / "32" / "images.u8.part").write_bytes(b"\x07" * 1000)
    done = colab.restore_cache(drive, fresh, SIZE)
    assert done.ok and local_bytes(fresh) == local_bytes(prepared)


def test_a_damaged_file_on_drive_is_refused_and_nothing_wrong_is_left(drive, tmp_path):
    blob = bytearray((drive / "images.u8").read_bytes())
    blob[len(blob) // 2] ^= 0xFF  # one bit flip, same size
    (drive / "images.u8").write_bytes(bytes(blob))
    fresh = tmp_path / "nih"
    done = colab.restore_cache(drive, fresh, SIZE)
    assert not done.ok and "do not match the sha256" in done.reason and "images.u8" in done.reason
    assert not (fresh / "cache" / "32" / "images.u8").exists()
    assert not (fresh / "cache" / "32" / "images.u8.part").exists()


def test_a_file_of_the_wrong_size_on_drive_is_named(drive, tmp_path):
    with open(drive / "done.npy", "ab") as fh:
        fh.write(b"\0")
    done = colab.restore_cache(drive, tmp_path / "nih", SIZE)
    assert not done.ok and "done.npy" in done.reason and "copies.json says" in done.reason


def test_nothing_saved_and_an_unfinished_save_are_told_apart(prepared, tmp_path, monkeypatch):
    done = colab.restore_cache(tmp_path / "absent", tmp_path / "nih", SIZE)
    assert not done.ok and done.reason == "no cache saved on Drive yet"
    calls = []

    def copy_then_fail(src, dst, progress=None):
        calls.append(src)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        return real(src, dst, progress)

    real = files.copy_resumable
    monkeypatch.setattr(colab, "copy_resumable", copy_then_fail)
    with pytest.raises(OSError):
        colab.save_cache(prepared, SIZE, tmp_path / "drive")
    done = colab.restore_cache(tmp_path / "drive", tmp_path / "nih", SIZE)
    assert not done.ok and "has no readable copies.json (a save that did not finish)" in done.reason


def test_a_saved_cache_is_never_described_by_the_copies_json_of_an_older_one(prepared, drive,
                                                                            monkeypatch):
    """A new save removes copies.json first: interrupted, it leaves no record of other bytes."""
    monkeypatch.setattr(colab, "copy_resumable", lambda *a, **k: (_ for _ in ()).throw(
        OSError("interrupted")))
    (drive / "nih_labels.csv").write_bytes(b"changed on Drive by hand\n")
    with pytest.raises(OSError):
        colab.save_cache(prepared, SIZE, drive)
    assert not (drive / "copies.json").exists()


@pytest.mark.parametrize("text", ['{"files": {"images.u8": {"size": 3}}}', '{"files": [1]}',
                                  '{"files": {"images.u8": {"size": "3", "sha256": "x"}}}',
                                  '{"fil', '[]'])
def test_a_copies_json_of_another_shape_is_a_reason_not_a_traceback(drive, tmp_path, text):
    (drive / "copies.json").write_text(text)
    done = colab.restore_cache(drive, tmp_path / "nih", SIZE)
    assert not done.ok and "has no readable copies.json" in done.reason


def test_a_local_labels_file_that_is_another_one_is_kept(drive, tmp_path):
    fresh = tmp_path / "nih"
    fresh.mkdir()
    (fresh / "nih_labels.csv").write_text("Image Index,fold\nmine.png,train\n")
    done = colab.restore_cache(drive, fresh, SIZE)
    assert not done.ok and "another labels file" in done.reason
    assert (fresh / "nih_labels.csv").read_text() == "Image Index,fold\nmine.png,train\n"
    assert not (fresh / "cache").exists()


def test_saving_needs_a_complete_cache(tmp_path):
    with pytest.raises(FileNotFoundError, match="no complete cache to save"):
        colab.save_cache(tmp_path, SIZE, tmp_path / "drive")


# ------------------------------------------------------------------- training from the cache
TINY = ["--dataset", "demo", "--image-size", "32", "--batch-size", "8", "--eval-batch-size",
        "16", "--weights", "none", "--workers", "0", "--epochs", "1"]


@pytest.mark.slow
def test_a_run_from_the_cache_alone_equals_the_run_from_the_images(prepared, drive, tmp_path,
                                                                   capsys):
    assert retrain.main(TINY + ["--data", str(prepared), "--out", str(tmp_path),
                                "--name", "images"]) == 0
    fresh = tmp_path / "reset" / "nih"  # only the cache and its labels file, no image
    assert colab.restore_cache(drive, fresh, SIZE).ok
    assert not list(fresh.rglob("*.png"))
    capsys.readouterr()
    assert retrain.main(TINY + ["--data", str(fresh), "--out", str(tmp_path),
                                "--name", "cache"]) == 0
    assert f"60 of the 60 images are not on disk under {fresh}: they are read from the cache" \
        in capsys.readouterr().out
    a, b = (torch.load(tmp_path / n / "checkpoint.pt", weights_only=False)["model"]
            for n in ("images", "cache"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    pa, pb = (pd.read_csv(tmp_path / n / "preds.csv") for n in ("images", "cache"))
    pd.testing.assert_frame_equal(pa, pb)


def test_without_the_cache_the_images_are_needed(drive, tmp_path, capsys):
    fresh = tmp_path / "nih"
    assert colab.restore_cache(drive, fresh, SIZE).ok
    assert retrain.main(TINY + ["--data", str(fresh), "--out", str(tmp_path), "--name", "off",
                                "--cache", "off"]) == 2
    assert "no PNG/JPEG images found" in capsys.readouterr().err


# ------------------------------------------------------------------- a pre-resized NIH copy
def test_a_pre_resized_copy_is_cached_as_it_is_and_said_so(tmp_path, capsys):
    root = tmp_path / "nih"
    make_nih_demo(root, n_images=30, size=SIZE, seed=4)  # "pre-resized" to the cache's size
    result = prepare_nih(root, SIZE, labels=str(root / "Data_Entry_2017.csv"), split="random",
                         workers=1, progress=False)
    out = capsys.readouterr().out
    assert "a pre-resized copy (NIH's originals are 1024x1024)" in out
    assert "cached as they are, without resizing" in out and "not bit-exact" in out
    manifest = json.loads((result.dir / "manifest.json").read_text())
    assert manifest["source_image_size"] == "32x32"
    ids = pd.read_csv(result.dir / "index.csv")["image_id"]
    rows = np.fromfile(result.dir / "images.u8", np.uint8).reshape(-1, SIZE, SIZE)
    for row, image_id in enumerate(ids):  # each row is the file's pixels, untouched
        assert np.array_equal(rows[row], np.asarray(Image.open(root / "images" / image_id)))


def test_a_resized_copy_of_another_size_is_resized_and_said_not_bit_exact(tmp_path, capsys):
    paths = []
    for i, side in enumerate((256, 256)):
        paths.append(str(tmp_path / f"{i}.png"))
        Image.new("L", (side, side), 100).save(paths[-1])
    assert _source_size(paths, 224) == "256x256"
    assert "not NIH's 1024x1024 originals: they are resized to 224 px" in capsys.readouterr().out
    originals = []
    for i in range(2):
        originals.append(str(tmp_path / f"o{i}.png"))
        Image.new("L", (1024, 1024), 0).save(originals[-1])
    assert _source_size(originals, 224) == "1024x1024" and capsys.readouterr().out == ""
    shutil.rmtree(tmp_path / "absent", ignore_errors=True)
    assert _source_size([str(tmp_path / "absent.png")], 224) is None
