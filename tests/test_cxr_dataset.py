"""cxr_dataset.CXRDataset: reproduce-chexnet's constructor and items, on the demo data.

The loaders below are written the way reproduce-chexnet's model.py builds them (its documented
`CXRDataset(path_to_images, fold, transform=None, sample=0, finding="any")`), with one change
torchvision forced: `transforms.Scale`, removed from torchvision, is `transforms.Resize`.
"""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from torchvision import transforms

import cxr_dataset as CXR
from conftest import ROOT, nih_demo

MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
FINDINGS = ["Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule",
            "Pneumonia", "Pneumothorax", "Consolidation", "Edema", "Emphysema", "Fibrosis",
            "Pleural_Thickening", "Hernia"]


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    root = nih_demo(tmp_path_factory, n_images=60, size=64, seed=3)
    from chexnet.datatools.prepare import prepare_nih

    # nih_labels.csv with a fold column beside the images, as reproduce-chexnet expects
    prepare_nih(root, 64, str(root / "Data_Entry_2017.csv"), split="random", workers=1,
                progress=False)
    return root


def reference_loaders(path_to_images, batch_size=16):
    """reproduce-chexnet's model.py, train_cnn: transforms, datasets, loaders."""
    data_transforms = {
        'train': transforms.Compose([
            transforms.RandomHorizontalFlip(),
            transforms.Resize(224),
            transforms.CenterCrop(224),
            transforms.ToTensor(),
            transforms.Normalize(MEAN, STD)
        ]),
        'val': transforms.Compose([
            transforms.Resize(224),
            transforms.CenterCrop(224),
            transforms.ToTensor(),
            transforms.Normalize(MEAN, STD)
        ]),
    }
    transformed_datasets = {}
    transformed_datasets['train'] = CXR.CXRDataset(
        path_to_images=path_to_images, fold='train', transform=data_transforms['train'])
    transformed_datasets['val'] = CXR.CXRDataset(
        path_to_images=path_to_images, fold='val', transform=data_transforms['val'])
    dataloaders = {}
    dataloaders['train'] = torch.utils.data.DataLoader(
        transformed_datasets['train'], batch_size=batch_size, shuffle=True, num_workers=0)
    dataloaders['val'] = torch.utils.data.DataLoader(
        transformed_datasets['val'], batch_size=batch_size, shuffle=True, num_workers=0)
    return transformed_datasets, dataloaders, data_transforms


def test_reproduce_chexnets_loaders_run_unchanged(demo, monkeypatch):
    monkeypatch.chdir(demo)   # the reference reads nih_labels.csv from the working directory
    labels = pd.read_csv(demo / "nih_labels.csv")
    datasets, loaders, tfs = reference_loaders(str(demo / "images"))
    for fold in ("train", "val"):
        assert len(datasets[fold]) == int((labels["fold"] == fold).sum())
    images, targets, names = next(iter(loaders["train"]))
    assert images.shape == (16, 3, 224, 224) and images.dtype == torch.float32
    assert targets.shape == (16, 14) and targets.dtype == torch.int64
    assert len(names) == 16 and all(n.endswith(".png") for n in names)
    # Item by item: the image as PIL opens and converts it, the labels as the CSV has them.
    by_name = labels.set_index("Image Index")
    for i in range(3):
        image, label, name = datasets["val"][i]
        expected = tfs["val"](Image.open(demo / "images" / name).convert("RGB"))
        assert torch.equal(image, expected)
        assert label.tolist() == [int(by_name.loc[name, f]) for f in FINDINGS]
        assert by_name.loc[name, "fold"] == "val"


def test_no_transform_gives_the_rgb_image(demo, monkeypatch):
    monkeypatch.chdir(demo)
    image, label, name = CXR.CXRDataset(str(demo / "images"), "test")[0]
    assert isinstance(image, Image.Image) and image.mode == "RGB"
    assert np.array_equal(np.asarray(image),
                          np.asarray(Image.open(demo / "images" / name).convert("RGB")))


def test_sample_and_finding_filter_as_the_reference(demo, monkeypatch, capsys):
    monkeypatch.chdir(demo)
    labels = pd.read_csv(demo / "nih_labels.csv")
    train = labels[labels["fold"] == "train"]
    np.random.seed(7)
    first = CXR.CXRDataset(str(demo / "images"), "train", sample=5)
    np.random.seed(7)
    again = CXR.CXRDataset(str(demo / "images"), "train", sample=5)
    assert len(first) == 5 and list(first.df.index) == list(again.df.index)
    assert set(first.df.index) <= set(train["Image Index"])
    assert len(CXR.CXRDataset(str(demo / "images"), "train", sample=10_000)) == len(train)

    positive = train[train["Effusion"] == 1]["Image Index"]
    assert len(positive) > 0
    only = CXR.CXRDataset(str(demo / "images"), "train", finding="Effusion")
    assert sorted(only.df.index) == sorted(positive)
    everything = CXR.CXRDataset(str(demo / "images"), "train", finding="Effusoin")
    assert len(everything) == len(train)
    assert "cannot filter on finding Effusoin" in capsys.readouterr().out


def test_without_a_labels_file_here_it_reads_the_repositorys(tmp_path, monkeypatch):
    """Outside a folder with nih_labels.csv, the committed file (the reference split)."""
    monkeypatch.chdir(tmp_path)
    committed = pd.read_csv(ROOT / "nih_labels.csv", usecols=["fold"])
    test = CXR.CXRDataset(str(tmp_path), "test")
    assert len(test) == int((committed["fold"] == "test").sum()) == 22_433
