"""prepare_data.py: label files, a cache equal to the reference preprocessing, resume, rebuild,
bad images, the official split and CheXphoto."""
from __future__ import annotations

import dataclasses
import json
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from chexnet import cache as cxr_cache
from chexnet.datatools import cache_build
from chexnet.datatools import prepare as prepare_data
from read_only import refuse_writes
from conftest import ROOT, make_nih, save_image, xray_like
from chexnet.files import sha256_file
from chexnet.cache import DONE, CachedImages, cache_dir, open_cache
from chexnet.config import TrainConfig
from chexnet.loaders import load_tables, make_loaders
from chexnet.data import DEFAULT_NIH_LABELS, build_transform, load_xray, model_input
from chexnet.labels import CHEXPERT_OBSERVATIONS, NIH_FINDINGS

def reference(path: str | Path, size: int) -> torch.Tensor:
    """The reference preprocessing of one file: (3, S, S) normalised."""
    return build_transform(size)(load_xray(path))


def assert_cache_is_reference(folder: Path, root: Path, size: int) -> None:
    """Every usable cached row, through model_input, is bit-identical to the reference."""
    index = pd.read_csv(folder / "index.csv", dtype={"image_id": str})
    images = np.memmap(folder / "images.u8", np.uint8, "r", shape=(len(index), size, size))
    paths = {p.name: p for p in (root / "images").iterdir()}
    done = np.load(folder / "done.npy")
    for row, image_id in zip(index["row"], index["image_id"]):
        if done[row] != DONE:
            continue
        got = model_input(torch.from_numpy(np.array(images[row]))[None, None], "cpu")[0]
        assert torch.equal(got, reference(paths[image_id], size)), image_id


class CountDecodes:
    """Stands in for cache_build.load_xray (one-worker builds run in this process)."""

    def __init__(self):
        self.names: list[str] = []

    def __call__(self, path):
        self.names.append(Path(path).name)
        return load_xray(path)


# --------------------------------------------------------------------------------------------
def test_nih_cache_equals_reference_preprocessing(tmp_path):
    make_nih(tmp_path, n=8)
    result = prepare_data.prepare_nih(tmp_path, size=32, labels=tmp_path / "Data_Entry_2017.csv",
                                      workers=2, chunk_size=3, progress=False)
    folder = cache_dir(tmp_path, 32)
    assert result.dir == folder and result.count == 8 and result.decoded == 8 and result.complete
    labels = pd.read_csv(tmp_path / "nih_labels.csv")
    meta = ["Follow-up #", "Patient Age", "Patient Gender", "View Position"]
    assert list(labels.columns) == ["Image Index", meta[0], "Patient ID", *meta[1:],
                                    *NIH_FINDINGS, "fold"]  # reproduce-chexnet's columns
    entry = pd.read_csv(tmp_path / "Data_Entry_2017.csv")
    assert labels[meta].equals(entry[meta])
    assert labels.loc[1, "Effusion"] == 1 and labels.loc[1, "Mass"] == 1
    assert labels.loc[0, list(NIH_FINDINGS)].sum() == 0
    index = pd.read_csv(folder / "index.csv")
    assert list(index["image_id"]) == list(labels["Image Index"])
    assert (folder / "images.u8").stat().st_size == 8 * 32 * 32
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["version"] == cxr_cache.CACHE_VERSION and manifest["size"] == 32
    assert manifest["count"] == 8 and manifest["complete"] and manifest["skipped"] == []
    assert manifest["labels_sha256"] == sha256_file(tmp_path / "nih_labels.csv")
    assert manifest["source_root"] == str(tmp_path.resolve()) and manifest["layout"] == ["images"]
    assert manifest["created"] and manifest["dataset"] == "nih"
    assert (np.load(folder / "done.npy") == DONE).all()
    assert_cache_is_reference(folder, tmp_path, 32)
    cache = open_cache(tmp_path, 32, tmp_path / "nih_labels.csv")
    assert cache is not None and cache.ids == list(labels["Image Index"])


def test_default_split_is_the_committed_file_and_missing_images_stop(tmp_path, capsys):
    committed = pd.read_csv(DEFAULT_NIH_LABELS, nrows=4)
    first_absent, committed = committed["Image Index"].iloc[3], committed.iloc[:3]
    (tmp_path / "images").mkdir()
    rng = np.random.default_rng(0)
    for name in committed["Image Index"]:
        save_image(tmp_path / "images" / name, "L", 64, 64, rng)
    args = ["nih", "--data", str(tmp_path), "--image-size", "16", "--workers", "1"]
    assert prepare_data.main(args) == 2
    err = capsys.readouterr().err
    assert "not under the data folder" in err and "--skip-bad" in err
    assert first_absent in err

    assert prepare_data.main(args + ["--skip-bad"]) == 0
    out = capsys.readouterr().out
    assert "skipped 112117 listed images" in out
    assert (tmp_path / "nih_labels.csv").read_bytes() == DEFAULT_NIH_LABELS.read_bytes()
    folder = cache_dir(tmp_path, 16)
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["count"] == 3 and manifest["skipped_count"] == 112_117
    assert first_absent in (folder / "skip.txt").read_text()
    cache = open_cache(tmp_path, 16, tmp_path / "nih_labels.csv")
    assert cache is not None and cache.ids == list(committed["Image Index"])


def test_official_split_on_the_command_line(tmp_path):
    make_nih(tmp_path, n=8, shapes=[("L", 40, 40)])
    names = [f"{i + 1:08d}_000.png" for i in range(8)]
    (tmp_path / "test_list.txt").write_text("\n".join(names[:2]) + "\n")
    (tmp_path / "train_val_list.txt").write_text("\n".join(names[2:]) + "\n")
    assert prepare_data.main(["nih", "--data", str(tmp_path), "--image-size", "16", "--workers",
                              "1", "--labels", str(tmp_path / "Data_Entry_2017.csv"),
                              "--split", "official"]) == 0
    labels = pd.read_csv(tmp_path / "nih_labels.csv")
    assert set(labels.loc[labels["fold"] == "test", "Image Index"]) == set(names[:2])
    assert set(labels["fold"]) <= {"train", "val", "test"} and len(labels) == 8
    (tmp_path / "test_list.txt").unlink()
    with pytest.raises(prepare_data.DataError, match="test_list.txt"):
        prepare_data.prepare_nih(tmp_path, 16, str(tmp_path / "Data_Entry_2017.csv"), "official")


def test_interrupted_build_resumes_without_redoing_images(tmp_path, monkeypatch, capsys):
    make_nih(tmp_path, n=8)
    labels = tmp_path / "Data_Entry_2017.csv"
    first = CountDecodes()
    monkeypatch.setattr(cache_build, "load_xray", first)
    result = prepare_data.prepare_nih(tmp_path, 32, labels, workers=1, chunk_size=2,
                                      max_chunks=2, progress=False)
    assert not result.complete and result.decoded == 4 and len(first.names) == 4
    assert open_cache(tmp_path, 32, tmp_path / "nih_labels.csv") is None
    assert "incomplete (4 of 8 images done)" in capsys.readouterr().out

    second = CountDecodes()
    monkeypatch.setattr(cache_build, "load_xray", second)
    result = prepare_data.prepare_nih(tmp_path, 32, labels, workers=1, chunk_size=2,
                                      progress=False)
    assert result.complete and result.decoded == 4
    assert sorted(first.names + second.names) == sorted(p.name for p in
                                                        (tmp_path / "images").iterdir())
    assert "resuming, 4 of 8 images already cached" in capsys.readouterr().out
    assert_cache_is_reference(cache_dir(tmp_path, 32), tmp_path, 32)
    third = CountDecodes()
    monkeypatch.setattr(cache_build, "load_xray", third)
    assert prepare_data.prepare_nih(tmp_path, 32, labels, workers=1).decoded == 0
    assert third.names == []


@pytest.mark.slow
def test_killed_build_resumes_where_it_stopped(tmp_path, monkeypatch):
    """SIGKILL after two chunks (no cleanup at all); the rerun decodes only the rest."""
    make_nih(tmp_path, n=8, shapes=[("L", 64, 64), ("RGB", 64, 48)])
    labels = tmp_path / "Data_Entry_2017.csv"
    code = (
        "import os, signal, sys; from chexnet.datatools import prepare\n"
        "kill = lambda k: os.kill(os.getpid(), signal.SIGKILL) if k == 2 else None\n"
        "prepare.prepare_nih(sys.argv[2], 32, sys.argv[3], workers=1, chunk_size=2, "
        "on_chunk=kill, progress=False)\n")
    proc = subprocess.run([sys.executable, "-c", code, str(ROOT), str(tmp_path), str(labels)],
                          capture_output=True, text=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    folder = cache_dir(tmp_path, 32)
    assert int((np.load(folder / "done.npy") == DONE).sum()) == 4
    assert not json.loads((folder / "manifest.json").read_text())["complete"]

    counter = CountDecodes()
    monkeypatch.setattr(cache_build, "load_xray", counter)
    result = prepare_data.prepare_nih(tmp_path, 32, labels, workers=1, chunk_size=2,
                                      progress=False)
    assert result.complete and len(counter.names) == 4
    assert_cache_is_reference(folder, tmp_path, 32)


def test_changed_labels_or_size_rebuild_with_a_message(tmp_path, monkeypatch, capsys):
    make_nih(tmp_path, n=4, shapes=[("L", 64, 64)])
    labels = tmp_path / "Data_Entry_2017.csv"
    prepare_data.prepare_nih(tmp_path, 24, labels, workers=1, progress=False)
    nih_labels = tmp_path / "nih_labels.csv"
    assert open_cache(tmp_path, 24, nih_labels) is not None
    capsys.readouterr()

    entries = pd.read_csv(labels)
    entries.loc[0, "Finding Labels"] = "Pneumonia"
    entries.to_csv(labels, index=False)
    old = nih_labels.read_bytes()
    prepare_data.write_nih_labels(tmp_path, labels)  # the new labels, cache not rebuilt yet
    assert open_cache(tmp_path, 24, nih_labels) is None
    assert "built from another labels file" in capsys.readouterr().out
    assert (tmp_path / "nih_labels.csv.bak").read_bytes() == old

    counter = CountDecodes()
    monkeypatch.setattr(cache_build, "load_xray", counter)
    prepare_data.prepare_nih(tmp_path, 24, labels, workers=1, progress=False)
    out = capsys.readouterr().out
    assert "labels file changed" in out and "Rebuilding" in out
    assert len(counter.names) == 4
    assert open_cache(tmp_path, 24, nih_labels) is not None

    assert open_cache(tmp_path, 28, nih_labels) is None  # another size: its own, absent cache
    manifest_path = cache_dir(tmp_path, 24) / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["size"] = 28
    manifest_path.write_text(json.dumps(manifest))
    assert open_cache(tmp_path, 24, nih_labels) is None
    assert "size 28, not 24" in capsys.readouterr().out
    counter.names.clear()
    prepare_data.prepare_nih(tmp_path, 24, labels, workers=1, progress=False)
    assert "Rebuilding" in capsys.readouterr().out and len(counter.names) == 4
    assert_cache_is_reference(cache_dir(tmp_path, 24), tmp_path, 24)


def test_corrupt_image_stops_and_skip_bad_leaves_it_out(tmp_path, capsys):
    from chexnet.config import TrainConfig
    from chexnet.data import DataError
    from chexnet.loaders import load_tables

    make_nih(tmp_path, n=12, shapes=[("L", 48, 48)], folds=True)
    bad = tmp_path / "images" / "00000005_000.png"
    bad.write_bytes(bad.read_bytes()[:80])
    args = ["nih", "--data", str(tmp_path), "--image-size", "24", "--workers", "1",
            "--labels", str(tmp_path / "labels.csv")]
    assert prepare_data.main(args) == 2
    err = capsys.readouterr().err
    assert "00000005_000.png" in err and "cannot be decoded" in err and "--skip-bad" in err

    assert prepare_data.main(args + ["--skip-bad"]) == 0
    assert "skipped 1 listed images" in capsys.readouterr().out
    folder = cache_dir(tmp_path, 24)
    assert (folder / "skip.txt").read_text().startswith("00000005_000.png\t")
    assert json.loads((folder / "manifest.json").read_text())["skipped"] == ["00000005_000.png"]

    # Training batches of 1: no epoch ends on a dropped single-image batch, so every image shows.
    cfg = TrainConfig(dataset="nih", data=str(tmp_path), image_size=24, batch_size=1,
                      eval_batch_size=4)
    labels, _ = load_tables(cfg)
    table = labels.frame
    with pytest.raises(DataError, match="00000005_000.png"):
        make_loaders(cfg, labels, torch.device("cpu"))
    loaders = make_loaders(dataclasses.replace(cfg, missing="skip"), labels,
                           torch.device("cpu"))
    ids = [i for fold in loaders.values() for _, _, batch_ids in fold for i in batch_ids]
    assert sorted(ids) == sorted(set(table["image_id"]) - {"00000005_000.png"})


def write_chexphoto(base: Path, rng: np.random.Generator) -> Path:
    """A tiny CheXphoto-v1.1 folder: train.csv and valid.csv, JPEG photos of several kinds."""
    root = base / "CheXphoto-v1.1"
    specs = [("train", "natural", 1, "frontal"), ("train", "natural", 1, "lateral"),
             ("train", "synthetic/digital", 2, "frontal"), ("train", "natural", 3, "frontal"),
             ("train", "synthetic/photographic", 4, "frontal"), ("train", "natural", 5, "frontal"),
             ("train", "natural", 6, "frontal"),
             ("valid", "natural", 64552, "frontal"), ("valid", "synthetic/digital", 64553,
                                                       "frontal")]
    rows = {"train": [], "valid": []}
    for split, kind, patient, view in specs:
        rel = f"{split}/{kind}/patient{patient:05d}/study1/view1_{view}.jpg"
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(xray_like(rng, 120, 100)).convert("RGB").save(root / rel, quality=90)
        values = rng.choice([1.0, 0.0, -1.0, np.nan], len(CHEXPERT_OBSERVATIONS))
        if split == "valid":
            values = np.where(np.isnan(values) | (values < 0), 0.0, values)
        rows[split].append({"Path": f"CheXphoto-v1.1/{rel}", "Sex": "Male", "Age": 60,
                            "Frontal/Lateral": view.capitalize(), "AP/PA": "AP",
                            **dict(zip(CHEXPERT_OBSERVATIONS, values))})
    for split, r in rows.items():
        pd.DataFrame(r).to_csv(root / f"{split}.csv", index=False)
    return root


def test_chexphoto_cache_holds_every_row(tmp_path):
    root = write_chexphoto(tmp_path, np.random.default_rng(0))
    result = prepare_data.prepare_chexphoto(tmp_path, size=32, workers=1, progress=False)
    assert result.dir == cache_dir(root, 32) and result.count == 9 and not result.skipped
    index = pd.read_csv(result.dir / "index.csv")
    csv_paths = pd.concat([pd.read_csv(root / "train.csv"), pd.read_csv(root / "valid.csv")])
    assert sorted(index["image_id"]) == sorted(csv_paths["Path"])  # lateral view included
    images = np.memmap(result.dir / "images.u8", np.uint8, "r", shape=(9, 32, 32))
    for row, image_id in zip(index["row"], index["image_id"]):
        expected = reference(root / image_id.split("/", 1)[1], 32)
        got = model_input(torch.from_numpy(np.array(images[row]))[None, None], "cpu")[0]
        assert torch.equal(got, expected)
    cache = open_cache(root, 32, [root / "train.csv", root / "valid.csv"])
    assert cache is not None and cache.manifest["dataset"] == "chexphoto"

    cfg = TrainConfig(dataset="chexphoto", data=str(tmp_path), image_size=32,
                      batch_size=1, eval_batch_size=2)
    labels, _ = load_tables(cfg)  # frontal views only (the default)
    table, findings = labels.frame, list(labels.findings)
    loaders = make_loaders(cfg, labels, torch.device("cpu"))
    assert isinstance(loaders["train"].dataset, CachedImages)
    seen = {}
    for loader in loaders.values():
        for images_, targets, ids in loader:
            assert images_.shape[1:] == (1, 32, 32) and images_.dtype == torch.uint8
            assert targets.shape[1] == len(findings)
            seen.update({i: t for i, t in zip(ids, targets)})
    assert set(seen) == set(table["image_id"]) and not any("lateral" in i for i in seen)
    by_id = table.set_index("image_id")[findings]
    for image_id, target in seen.items():
        np.testing.assert_array_equal(target.numpy(), by_id.loc[image_id].to_numpy(np.float32))


def test_a_failed_prepare_leaves_the_folder_as_it_was(tmp_path, capsys):
    """Every listed image missing (a wrong --data): exit 2, and neither a new nih_labels.csv
    nor an empty cache folder is left behind; an earlier nih_labels.csv is kept as it was."""
    make_nih(tmp_path, n=4, shapes=[("L", 40, 40)])
    for image in (tmp_path / "images").iterdir():
        image.unlink()
    args = ["nih", "--data", str(tmp_path), "--image-size", "16", "--workers", "1", "--labels",
            str(tmp_path / "Data_Entry_2017.csv"), "--split", "random"]
    assert prepare_data.main(args) == 2
    assert "not under the data folder" in capsys.readouterr().err
    assert not (tmp_path / "nih_labels.csv").exists() and not (tmp_path / "cache").exists()
    (tmp_path / "nih_labels.csv").write_text("an earlier file\n")
    assert prepare_data.main(args) == 2
    assert (tmp_path / "nih_labels.csv").read_text() == "an earlier file\n"
    assert not (tmp_path / "cache").exists()


def test_size_zero_is_refused_while_parsing(tmp_path, capsys):
    with pytest.raises(SystemExit):
        prepare_data.main(["nih", "--data", str(tmp_path), "--image-size", "0"])
    assert "--image-size: 0 is too small" in capsys.readouterr().err
    assert not (tmp_path / "cache").exists()


@pytest.mark.slow
def test_options_are_named_as_in_retrain_and_the_old_names_are_gone(tmp_path, capsys):
    """--data and --image-size, as retrain.py calls them; the old --root and --size are
    refused (argparse's exit 2), not quietly mapped."""
    make_nih(tmp_path, n=4, shapes=[("L", 40, 40)])
    tail = ["--workers", "1", "--labels", str(tmp_path / "Data_Entry_2017.csv"), "--split",
            "random"]
    with pytest.raises(SystemExit):
        prepare_data.main(["nih", *tail])
    assert "the following arguments are required: --data" in capsys.readouterr().err
    args = ["nih", "--data", str(tmp_path), *tail]
    assert prepare_data.main([*args, "--image-size", "16"]) == 0
    assert (tmp_path / "cache" / "16" / "manifest.json").is_file()
    for old in (["--size", "20"], ["--root", str(tmp_path)]):
        with pytest.raises(SystemExit) as stop:
            prepare_data.main([*args, *old])
        assert stop.value.code == 2
        assert f"unrecognized arguments: {old[0]}" in capsys.readouterr().err
    assert not (tmp_path / "cache" / "20").exists()
    with pytest.raises(SystemExit):
        prepare_data.main([*args, "--image-size", "0"])
    assert "--image-size: 0 is too small" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        prepare_data.main(["nih", "--help"])
    help_text = capsys.readouterr().out
    assert "--image-size" in help_text and "--size " not in help_text
    assert "--data" in help_text and "--root" not in help_text


def _tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file()}


def test_read_only_dataset_folder_is_a_message_naming_the_options(tmp_path, monkeypatch,
                                                                    capsys):
    root = tmp_path / "input"
    make_nih(root, n=4, shapes=[("L", 40, 40)])
    before = _tree(root)
    refuse_writes(root, monkeypatch.setattr)
    args = ["nih", "--data", str(root), "--image-size", "16", "--workers", "1", "--labels",
            str(root / "Data_Entry_2017.csv"), "--split", "random"]
    # Neither option: the labels file is refused first; the message names the dataset folder
    # and both options, since the cache would go there too.
    assert prepare_data.main(args) == 2
    err = capsys.readouterr().err
    assert f"cannot write the labels file {root / 'nih_labels.csv'}: Permission denied" in err
    assert f"The dataset folder {root} is not writable" in err
    assert "--labels-out FILE and --cache-dir DIR" in err
    # --labels-out only: the cache is refused, named with --cache-dir; the new labels file is
    # removed again, as after any failed prepare.
    labels_out = tmp_path / "work" / "nih_labels.csv"
    assert prepare_data.main([*args, "--labels-out", str(labels_out)]) == 2
    err = capsys.readouterr().err
    assert f"cannot write the image cache in {root / 'cache' / '16'}: Permission denied" in err
    assert "Pass --cache-dir DIR" in err and not labels_out.exists()
    # --cache-dir only: the labels file is refused, named with --labels-out.
    assert prepare_data.main([*args, "--cache-dir", str(tmp_path / "cache")]) == 2
    err = capsys.readouterr().err
    assert f"cannot write the labels file {root / 'nih_labels.csv'}" in err
    assert "Choose a writable place with --labels-out FILE" in err
    assert _tree(root) == before


def test_labels_out_and_cache_dir_leave_the_dataset_folder_untouched(tmp_path, monkeypatch,
                                                                     capsys):
    root = tmp_path / "input"
    make_nih(root, n=6, shapes=[("L", 40, 40)])
    before = _tree(root)
    refuse_writes(root, monkeypatch.setattr)
    labels_out, caches = tmp_path / "work" / "labels.csv", tmp_path / "work" / "caches"
    assert prepare_data.main(["nih", "--data", str(root), "--image-size", "16", "--workers", "1",
                              "--labels", str(root / "Data_Entry_2017.csv"), "--split", "random",
                              "--labels-out", str(labels_out), "--cache-dir", str(caches)]) == 0
    out = capsys.readouterr().out
    assert f"cache: {caches / '16'} (6 images" in out
    assert f"--labels {labels_out} --cache-dir {caches}" in out   # how retrain.py finds it
    assert _tree(root) == before
    monkeypatch.undo()
    assert pd.read_csv(labels_out)["Image Index"].tolist() == [f"{i:08d}_000.png"
                                                               for i in range(1, 7)]
    assert open_cache(root, 16, labels_out, caches) is not None
    assert open_cache(root, 16, labels_out) is None          # not in the dataset folder
    assert_cache_is_reference(caches / "16", root, 16)


def test_chexphoto_cache_dir(tmp_path, monkeypatch, capsys):
    root = write_chexphoto(tmp_path, np.random.default_rng(0))
    refuse_writes(root, monkeypatch.setattr)
    args = ["chexphoto", "--data", str(tmp_path), "--image-size", "16", "--workers", "1"]
    assert prepare_data.main(args) == 2
    err = capsys.readouterr().err
    assert f"cannot write the image cache in {root / 'cache' / '16'}" in err
    assert "--cache-dir" in err
    assert prepare_data.main([*args, "--cache-dir", str(tmp_path / "caches")]) == 0
    monkeypatch.undo()
    assert open_cache(root, 16, [root / "train.csv", root / "valid.csv"],
                      tmp_path / "caches") is not None


@pytest.mark.slow  # trains
def test_training_reads_a_cache_from_cache_dir(tmp_path, monkeypatch, capsys):
    """A read-only dataset folder: prepare_data.py --labels-out --cache-dir, then retrain.py
    --labels --cache-dir --cache on trains from that cache (and records where it was)."""
    import retrain
    from chexnet.datatools.demo import make_nih_demo

    root = tmp_path / "input"
    make_nih_demo(root, n_images=24, size=40, seed=0)
    labels_out, caches = tmp_path / "labels.csv", tmp_path / "caches"
    refuse_writes(root, monkeypatch.setattr)
    assert prepare_data.main(["nih", "--data", str(root), "--image-size", "32", "--workers", "1",
                              "--labels", str(root / "Data_Entry_2017.csv"), "--split", "random",
                              "--labels-out", str(labels_out), "--cache-dir", str(caches)]) == 0
    capsys.readouterr()
    assert retrain.main(["--dataset", "nih", "--data", str(root), "--labels", str(labels_out),
                         "--cache-dir", str(caches), "--cache", "on", "--out",
                         str(tmp_path / "results"), "--name", "r", "--image-size", "32",
                         "--batch-size", "8", "--eval-batch-size", "16", "--weights", "none",
                         "--workers", "0", "--epochs", "1"]) == 0
    assert f"reading images from the uint8 cache {caches / '32'}" in capsys.readouterr().out
    config = json.loads((tmp_path / "results" / "r" / "config.json").read_text())
    assert config["cache_dir"] == str(caches) and config["labels"] == str(labels_out)
