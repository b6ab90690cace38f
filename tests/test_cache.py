"""chexnet/cache.py: cached batches through model_input against the reference preprocessing,
the cache as a Dataset for torch's DataLoader, the loaders retrain.py gets (cache = files),
the real NIH sample, the benchmark's smoke run."""
from __future__ import annotations

import dataclasses
import pickle
import re

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from torch.utils.data import DataLoader, default_collate

from chexnet import cache as cxr_cache
from chexnet import train as training
from chexnet.cache import CachedImages, cache_dir, collate_batch, open_cache
from chexnet.config import TrainConfig
from chexnet.data import ImageFileDataset, build_transform, load_xray, model_input
from chexnet.datatools import cache_build
from chexnet.datatools import prepare as prepare_data
from chexnet.datatools.cache_build import resize_center_crop
from chexnet.files import sha256_file
from chexnet.labels import NIH_FINDINGS
from chexnet.loaders import load_tables, make_datasets, make_loaders
from chexnet.runs import EpochProgress
from chexnet.runtime import Dist
from conftest import ROOT, load_benchmark, make_nih, shared, xray_like


def reference_batch(images: list[Image.Image], size: int) -> torch.Tensor:
    """build_transform(size) of each image, stacked: (B, 3, S, S)."""
    transform = build_transform(size)
    return torch.stack([transform(img) for img in images])


def cached(images: list[Image.Image], size: int) -> torch.Tensor:
    """What the cache holds for these images: (B, 1, S, S) uint8."""
    return torch.stack([torch.from_numpy(resize_center_crop(img, size)) for img in images])[:, None]


@pytest.fixture
def generated_cache(tmp_path):
    """A 10-image cache (24 px) whose image i is filled with grey level 10 * i + 5, so a batch's
    pixels tell which rows it holds; labels.txt is the file it is keyed to."""
    folder = tmp_path / "images"
    folder.mkdir()
    ids = [f"img{i}.png" for i in range(10)]
    for i, name in enumerate(ids):
        Image.fromarray(np.full((30, 30), 10 * i + 5, np.uint8)).save(folder / name)
    labels = tmp_path / "labels.txt"
    labels.write_text("\n".join(ids))
    cache_build.build_cache(cache_dir(tmp_path, 24), ids, [folder / i for i in ids], 24,
                          sha256_file(labels), workers=1, progress=False)
    cache = open_cache(tmp_path, 24, labels)
    assert cache is not None
    return cache


# --------------------------------------------------------------------------------------------
# model_input: a cached (or PNG) uint8 batch -> the network's input
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n", [3, 9])   # within one CPU step, and over several
def test_model_input_is_the_reference_when_sizes_match(n):
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (32, 32), dtype=np.uint8), "L")
              for _ in range(n)]
    x = torch.stack([torch.from_numpy(np.array(img)) for img in images])[:, None]
    out = model_input(x, "cpu")
    assert out.shape == (n, 3, 32, 32) and out.dtype == torch.float32
    assert torch.equal(out, reference_batch(images, 32))  # bit for bit


def test_cache_then_model_input_is_the_reference_from_larger_originals():
    """Originals of several shapes -> cache at S -> model_input: exactly the reference."""
    rng = np.random.default_rng(1)
    images = [Image.fromarray(xray_like(rng, h, w), "L")
              for h, w in [(1024, 1024), (300, 260), (260, 300), (20, 24), (64, 64)]]
    out = model_input(cached(images, 64), "cpu")
    assert torch.equal(out, reference_batch(images, 64))


def test_normalisation_shapes_and_dtype():
    for n in (2, 6):
        x = torch.stack([torch.zeros(1, 8, 8, dtype=torch.uint8)] * (n // 2)
                        + [torch.full((1, 8, 8), 255, dtype=torch.uint8)] * (n // 2))
        out = model_input(x, "cpu")
        assert out.shape == (n, 3, 8, 8) and out.dtype == torch.float32 and out.is_contiguous()
        mean = torch.tensor([0.485, 0.456, 0.406])  # ImageNet's, as literals: not our constants
        std = torch.tensor([0.229, 0.224, 0.225])
        torch.testing.assert_close(out[0, :, 0, 0], -mean / std)
        torch.testing.assert_close(out[-1, :, 0, 0], (1 - mean) / std)
        assert x.dtype == torch.uint8 and int(x[-1].min()) == 255  # the input is left alone


def test_model_input_refuses_a_batch_that_is_already_float():
    """Normalising twice would feed the network wrong numbers without a sound: refused."""
    with pytest.raises(TypeError, match="uint8"):
        model_input(torch.zeros(2, 3, 8, 8), "cpu")


# --------------------------------------------------------------------------------------------
# CachedImages: a Dataset over the cache, fed to torch's DataLoader
# --------------------------------------------------------------------------------------------
def loader_for(cache, rows, **kw) -> DataLoader:
    rows = np.asarray(rows)
    targets = np.stack([rows, -rows], axis=1).astype(np.float32)  # (N, 2): row, -row
    ds = CachedImages(cache, rows, targets, [cache.ids[r] for r in rows], ("row", "minus"))
    return DataLoader(ds, collate_fn=collate_batch, **kw)


def check_batch(cache, images, targets, ids) -> list[int]:
    """Pixels, targets and ids of a batch agree; returns its rows."""
    assert images.dtype == torch.uint8 and images.shape[1:] == (1, 24, 24)
    rows = [(int(v) - 5) // 10 for v in images[:, 0, 0, 0]]
    assert rows == [int(t) for t in targets[:, 0]] == [cache.ids.index(i) for i in ids]
    assert (images == images[:, :, :1, :1]).all()  # each image is one flat grey
    return rows


def test_loader_covers_every_image_once_per_epoch(generated_cache):
    loader = loader_for(generated_cache, range(10), batch_size=4, shuffle=True,
                        generator=torch.Generator().manual_seed(0))
    assert len(loader) == 3 and len(loader.dataset) == 10
    rows = [r for batch in loader for r in check_batch(generated_cache, *batch)]
    assert sorted(rows) == list(range(10))
    dropped = loader_for(generated_cache, range(10), batch_size=4, shuffle=True, drop_last=True,
                         generator=torch.Generator().manual_seed(0))
    assert len(dropped) == 2 and sum(len(b[2]) for b in dropped) == 8


def test_batches_follow_the_sampler_order(generated_cache):
    """A batch is the sampler's next batch_size positions, in that order (the rows are read
    sorted and put back), and the same generator seed gives the same epoch."""
    loader = loader_for(generated_cache, range(10), batch_size=3,
                        sampler=[4, 6, 9, 1, 0, 7, 8, 2, 3, 5])
    got = [check_batch(generated_cache, *b) for b in loader]
    assert got == [[4, 6, 9], [1, 0, 7], [8, 2, 3], [5]]

    def epoch(seed):
        return [check_batch(generated_cache, *b) for b in loader_for(
            generated_cache, range(10), batch_size=3, shuffle=True,
            generator=torch.Generator().manual_seed(seed))]
    assert epoch(1) == epoch(1) != epoch(2)
    rows = [7, 2, 9, 0, 5, 5]
    loader = loader_for(generated_cache, rows, batch_size=4, shuffle=False)
    assert [r for batch in loader for r in check_batch(generated_cache, *batch)] == rows


def test_a_batch_read_at_once_equals_the_items_collated(generated_cache):
    """__getitems__ (one read per batch) and __getitem__ + torch's default collate agree."""
    ds = loader_for(generated_cache, [7, 2, 9, 0, 5], batch_size=5).dataset
    images, targets, ids = ds.__getitems__([4, 0, 2, 2])
    one_by_one = default_collate([ds[i] for i in (4, 0, 2, 2)])
    assert torch.equal(images, one_by_one[0]) and torch.equal(targets, one_by_one[1])
    assert ids == list(one_by_one[2]) == ["img5.png", "img7.png", "img9.png", "img9.png"]


def test_worker_processes_read_the_same_batches(generated_cache):
    """The dataset pickles without its memory map (each worker opens its own)."""
    def batches(workers):
        loader = loader_for(generated_cache, range(10), batch_size=3, shuffle=True,
                            num_workers=workers, generator=torch.Generator().manual_seed(3))
        return [(x.clone(), ids) for x, _, ids in loader]

    plain, workers = batches(0), batches(1)
    assert [ids for _, ids in plain] == [ids for _, ids in workers]
    assert all(torch.equal(a, b) for (a, _), (b, _) in zip(plain, workers))
    ds = loader_for(generated_cache, range(10), batch_size=3).dataset
    ds.pixels()
    assert pickle.loads(pickle.dumps(ds))._pixels is None
    assert len(pickle.dumps(ds)) < 10 * 24 * 24  # not the pixels


def test_dataset_rejects_rows_outside_the_cache(generated_cache):
    with pytest.raises(ValueError, match="rows"):
        CachedImages(generated_cache, np.array([0, 10]), np.zeros((2, 1), np.float32),
                     ["a", "b"], ("x",))


# --------------------------------------------------------------------------------------------
# make_loaders: what retrain.py calls, from the cache or from the files
# --------------------------------------------------------------------------------------------
def test_cache_loaders_serve_what_the_file_loaders_serve(tmp_path, capsys):
    """With retrain's EpochSampler, every batch from the cache equals the batch from the image
    files, mid-epoch starts included, and retrain's training and evaluation loops accept them."""
    from torch import nn

    make_nih(tmp_path, n=12, shapes=[("L", 40, 40), ("RGBA", 50, 40)], folds=True)
    cfg = TrainConfig(dataset="nih", data=str(tmp_path), labels=str(tmp_path / "labels.csv"),
                      image_size=32, batch_size=2, eval_batch_size=5, workers=0, seed=3)
    labels, _ = load_tables(cfg)
    table, findings = labels.frame, list(labels.findings)
    device = torch.device("cpu")
    assert make_datasets(cfg, labels)[1] is False   # no cache yet: the files

    prepare_data.prepare_nih(tmp_path, 32, str(tmp_path / "labels.csv"), workers=1,
                             progress=False)
    # The same labels now sit in DATA/nih_labels.csv, which is the default.
    cfg = dataclasses.replace(cfg, labels=None)
    labels, _ = load_tables(cfg)
    table, findings = labels.frame, list(labels.findings)
    ours = make_loaders(cfg, labels, device)
    assert "uint8 cache" in capsys.readouterr().out
    assert isinstance(ours["train"].dataset, CachedImages)
    theirs = make_loaders(dataclasses.replace(cfg, cache="off"), labels, device)
    assert isinstance(theirs["train"].dataset, ImageFileDataset)
    for epoch, start in [(1, 0), (2, 4)]:
        for loaders in (ours, theirs):
            loaders["train"].sampler.set_epoch(epoch, start)
        assert len(ours["train"]) == len(theirs["train"]) == (6 - start) // 2
    for fold in ("train", "val", "test"):
        a_batches, b_batches = list(ours[fold]), list(theirs[fold])
        assert [ids for *_, ids in a_batches] == [list(ids) for *_, ids in b_batches]
        for (a, ta, _), (b, tb, _) in zip(a_batches, b_batches):
            assert a.dtype == b.dtype == torch.uint8   # both normalised later, the same way
            assert torch.equal(a, b) and torch.equal(ta, tb)
    assert len(ours["train"].dataset) == (table["fold"] == "train").sum() == 6

    model = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(3, len(findings)))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    ours["train"].sampler.set_epoch(1)
    loss = training.train_one_epoch(model, ours["train"], optimizer, device,
                                    EpochProgress(1), cfg.seed)
    assert np.isfinite(loss)
    _, probs, targets, ids = training.evaluate(model, ours["test"], device)
    assert ids == table.loc[table["fold"] == "test", "image_id"].tolist()
    assert probs.shape == targets.shape == (3, len(NIH_FINDINGS))


def test_cache_loaders_split_evaluation_over_processes(tmp_path):
    make_nih(tmp_path, n=16, shapes=[("L", 40, 40)], folds=True)
    prepare_data.prepare_nih(tmp_path, 32, str(tmp_path / "labels.csv"), workers=1,
                             progress=False)
    cfg = TrainConfig(dataset="nih", data=str(tmp_path), image_size=32, batch_size=4,
                      eval_batch_size=2)
    labels, _ = load_tables(cfg)
    cpu = torch.device("cpu")
    full = make_loaders(cfg, labels, cpu)
    # --workers auto on a CPU: the cache is read in this process, the files decoded by one
    # worker process.
    assert full["train"].num_workers == 0
    files = make_loaders(dataclasses.replace(cfg, cache="off"), labels, cpu)
    assert files["train"].num_workers == 1
    parts = [make_loaders(cfg, labels, cpu, Dist(rank=r, world=2)) for r in (0, 1)]
    for fold in ("val", "test"):
        whole = [i for *_, ids in full[fold] for i in ids]
        assert [i for p in parts for *_, ids in p[fold] for i in ids] == whole
    assert all(p["train"].batch_size == 2 for p in parts)
    assert parts[0]["val"].dataset.dataset.findings == tuple(NIH_FINDINGS)


def test_stale_cache_is_not_used(tmp_path, capsys):
    make_nih(tmp_path, n=8, shapes=[("L", 40, 40)], folds=True)
    prepare_data.prepare_nih(tmp_path, 32, str(tmp_path / "labels.csv"), workers=1,
                             progress=False)
    cfg = TrainConfig(dataset="nih", data=str(tmp_path), image_size=32)
    labels, _ = load_tables(cfg)
    assert cxr_cache.cache_datasets(cfg, labels) is not None
    edited = pd.read_csv(tmp_path / "nih_labels.csv")
    edited.loc[0, "Hernia"] = 1 - edited.loc[0, "Hernia"]
    edited.to_csv(tmp_path / "nih_labels.csv", index=False)
    labels, _ = load_tables(cfg)
    capsys.readouterr()
    assert cxr_cache.cache_datasets(cfg, labels) is None
    assert "another labels file" in capsys.readouterr().out
    assert make_datasets(cfg, labels)[1] is False
    assert cxr_cache.cache_datasets(dataclasses.replace(cfg, image_size=24), labels) is None


# --------------------------------------------------------------------------------------------
# The real NIH sample, and the benchmark
# --------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_real_nih_sample_builds_and_reads_back_as_the_reference(tmp_path):
    images = shared("nih", "images")
    (tmp_path / "images").symlink_to(images, target_is_directory=True)
    names = sorted(p.name for p in images.glob("*.png"))
    committed = pd.read_csv(ROOT / "nih_labels.csv")
    committed[committed["Image Index"].isin(names)].to_csv(tmp_path / "labels.csv", index=False)
    result = prepare_data.prepare_nih(tmp_path, 224, str(tmp_path / "labels.csv"), workers=2,
                                      progress=False)
    assert result.count == len(names) == 120 and result.complete and not result.skipped
    cache = open_cache(tmp_path, 224, tmp_path / "nih_labels.csv")
    ds = CachedImages(cache, np.arange(len(cache)), np.zeros((len(cache), 14), np.float32),
                      cache.ids, NIH_FINDINGS)
    loader = DataLoader(ds, batch_size=32, collate_fn=collate_batch)
    transform = build_transform(224)
    for x, _, ids in loader:
        out = model_input(x, "cpu")
        expected = torch.stack([transform(load_xray(images / i)) for i in ids])
        assert torch.equal(out, expected)


def test_benchmark_quick_smoke(capsys):
    bench = load_benchmark("data_pipeline")
    assert bench.main(["--quick"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert re.fullmatch(r"read/reference ratio: \d+\.\dx", lines[-1]), lines[-1]
    assert any(line.startswith("| (a) reference") for line in lines)
    assert any(line.startswith("| (c) cache read") for line in lines)
