"""Shared fixtures and data generators (the only place tests share code from)."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

# As every entry point does, before anything imports torch: the suite runs on 2 shared cores,
# where spinning OpenMP threads slow every CPU training step 10-30x.
import chexnet.idle_threads  # noqa: F401,E402

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from chexnet.labels import NIH_FINDINGS

ROOT = Path(__file__).resolve().parents[1]

SHARED_DATA = ROOT.parent / "shared" / "data"


def shared(*parts: str) -> Path:
    """A path under ../shared/data; the calling test is skipped when it is absent."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} not present (the shared sample data is optional)")
    return path


_HASHED: dict[tuple, str] = {}


def hashes(*paths: str | Path) -> dict[str, str]:
    """sha256 of every file under the given folders and of the given files (links not
    followed): compare before and after a command to prove it changed nothing.

    Each file's hash is remembered under its (path, device, inode, size, mtime, ctime) once that
    ctime is over 2 s old. The kernel sets a file's ctime to the current time on every write,
    truncation, rename or utime, and no call sets it back: a file written since it was hashed
    has another key, so a remembered hash is never stale (the fuzz tests hash a run folder's
    28 MB checkpoint twice per example)."""
    import time

    from chexnet.files import sha256_file

    out, now = {}, time.time_ns()
    for top in map(Path, paths):
        for path in [top] if not top.is_dir() else sorted(top.rglob("*")):
            if path.is_file() and not path.is_symlink():
                st = path.stat()
                key = (str(path), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns,
                       st.st_ctime_ns)
                digest = _HASHED.get(key) or sha256_file(path)
                if now - st.st_ctime_ns > 2_000_000_000:
                    _HASHED[key] = digest
                out[str(path)] = digest
    return out


def reference_densenet(seed: int = 0):
    """The network reproduce-chexnet and arnoweng/CheXNet train: torchvision DenseNet-121 with a
    Sequential(Linear(1024, 14), Sigmoid) head; random weights and BatchNorm statistics (so
    that evaluation mode matters), in evaluation mode."""
    import torchvision
    from torch import nn

    torch.manual_seed(seed)
    net = torchvision.models.densenet121(weights=None)
    net.classifier = nn.Sequential(nn.Linear(1024, len(NIH_FINDINGS)), nn.Sigmoid())
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.normal_(1, 0.1)
                m.bias.normal_(0, 0.1)
    return net.eval()


def load_benchmark(name: str):
    """A script of benchmarks/ as a module (benchmarks are scripts, not part of the package)."""
    import importlib.util
    import sys

    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while being defined
    spec.loader.exec_module(module)
    return module


def nih_demo(tmp_path_factory, n_images: int, size: int, seed: int) -> Path:
    """A small NIH-format demo dataset (demo_data.make_nih_demo) in a fresh temp folder."""
    from chexnet.datatools.demo import make_nih_demo

    root = tmp_path_factory.mktemp("demo")
    make_nih_demo(root, n_images=n_images, size=size, seed=seed)
    return root


ENTRY_COLUMNS = ["Image Index", "Finding Labels", "Follow-up #", "Patient ID", "Patient Age",
                 "Patient Gender", "View Position", "OriginalImage[Width", "Height]",
                 "OriginalImagePixelSpacing[x", "y]"]
# (mode, width, height): every mode load_xray handles, square and not, smaller than S too.
SHAPES = [("L", 300, 300), ("RGB", 300, 260), ("RGBA", 260, 300), ("P", 300, 300),
          ("LA", 120, 90), ("I;16", 300, 300), ("L", 20, 24), ("L", 1024, 1024)]


def xray_like(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """A smooth grey image with some texture: (h, w) uint8."""
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    blob = np.exp(-((yy - rng.uniform(.3, .7)) ** 2 + (xx - rng.uniform(.3, .7)) ** 2) / .05)
    img = 60 + 120 * blob + 40 * np.sin(8 * xx + rng.uniform(0, 6)) + rng.normal(0, 6, (h, w))
    return np.clip(img, 0, 255).astype(np.uint8)


def save_image(path: Path, mode: str, w: int, h: int, rng: np.random.Generator) -> None:
    arr = xray_like(rng, h, w)
    if mode == "I;16":
        Image.fromarray(arr.astype(np.uint16) * 16).save(path)   # a 12-bit range
    else:
        Image.fromarray(arr, "L").convert(mode).save(path)


def make_nih(root: Path, n: int = 8, shapes=SHAPES, seed: int = 0, folds: bool = False
             ) -> pd.DataFrame:
    """n NIH-named PNGs in root/images (modes and sizes cycled from `shapes`), and a labels
    file: Data_Entry_2017.csv (one patient per image), or with `folds` a nih_labels-style
    labels.csv whose folds cycle train, train, val, test. Returns the entries written."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    names = [f"{i + 1:08d}_000.png" for i in range(n)]
    for i, name in enumerate(names):
        save_image(root / "images" / name, *shapes[i % len(shapes)], rng)
    findings = [["No Finding"], ["Effusion", "Mass"], ["Hernia"], ["Atelectasis"]]
    entries = pd.DataFrame({
        "Image Index": names, "Finding Labels": ["|".join(findings[i % 4]) for i in range(n)],
        "Follow-up #": 0, "Patient ID": np.arange(1, n + 1), "Patient Age": 50,
        "Patient Gender": "M", "View Position": "PA", "OriginalImage[Width": 1024,
        "Height]": 1024, "OriginalImagePixelSpacing[x": 0.14, "y]": 0.14})
    if folds:
        table = pd.DataFrame({"Image Index": names, "Patient ID": np.arange(1, n + 1)})
        for f in NIH_FINDINGS:
            table[f] = [int(f in findings[i % 4]) for i in range(n)]
        table["fold"] = [("train", "train", "val", "test")[i % 4] for i in range(n)]
        table.to_csv(root / "labels.csv", index=False)
    else:
        entries[ENTRY_COLUMNS].to_csv(root / "Data_Entry_2017.csv", index=False)
    return entries


_RUNS: dict[str, Path] = {}


@pytest.fixture(scope="module")
def one_thread():
    """Run torch on one thread in these tests. The 2 cores are shared with other processes,
    and OpenMP threads spin-wait for each other at every op: once descheduled, a 2-thread
    DenseNet forward is ~10x slower than a 1-thread one (measured here: 90 s -> 11 s for the
    robustness test). Restored afterwards, so other test modules are unaffected. Modules that
    want it say `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_run(tmp_path_factory, n_images: int = 40, size: int = 48, image_size: int = 32) -> Path:
    """A demo NIH dataset and a run folder on it (config.json, checkpoint.pt, preds.csv,
    aucs.csv) whose model is a random-init DenseNet; built once per test session."""
    key = f"{n_images}-{size}-{image_size}"
    if key in _RUNS:
        return _RUNS[key]
    from chexnet import train as training
    from chexnet.config import TrainConfig
    from chexnet.loaders import load_tables, make_loaders
    from chexnet.runs import write_predictions
    from chexnet.datatools.demo import make_nih_demo
    from chexnet.model import build_model

    root = tmp_path_factory.mktemp("tiny_demo")
    make_nih_demo(root / "nih", n_images=n_images, size=size, seed=0)
    cfg = TrainConfig(dataset="demo", data=str(root / "nih"), out=str(root / "results"),
                      name="tiny", image_size=image_size, weights="none", workers=0)
    labels, _ = load_tables(cfg)
    findings = list(labels.findings)
    cfg = dataclasses.replace(cfg, split=labels.split, findings=findings)
    torch.manual_seed(0)
    model = build_model(len(findings), "none").eval()
    run_dir = cfg.run_dir
    run_dir.mkdir(parents=True)
    (run_dir / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2))
    torch.save({"model": model.state_dict(), "epoch": 0, "val_loss": 0.0,
                "config": dataclasses.asdict(cfg), "findings": list(findings)},
               run_dir / "checkpoint.pt")
    test_loader = make_loaders(cfg, labels, torch.device("cpu"))["test"]
    _, probs, targets, ids = training.evaluate(model, test_loader, torch.device("cpu"))
    write_predictions(run_dir, cfg, findings, ids, probs, targets)
    _RUNS[key] = run_dir
    return run_dir
