"""Every setting of a training run: `TrainConfig`, and reading it back from a run folder.

A TrainConfig is frozen: retrain.py builds it from the command line, and what set-up resolves
(the split actually used, the findings, an automatic batch size) makes a new value
(`dataclasses.replace`), so the config.json of a run is exactly the config it trained with.
The recipes (which values each --recipe chooses) are in chexnet/train.py, beside the code
that uses them.
"""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from chexnet.data import DataError

DATASETS = ("nih", "chexphoto", "demo")
OPTIMIZERS = ("sgd", "adam")


@dataclass(frozen=True)
class TrainConfig:
    """Every setting of a run. Saved as config.json and inside every checkpoint."""
    dataset: str = "nih"
    data: str = "data/nih"
    labels: str | None = None           # NIH: labels file; default data/nih_labels.csv, then repo's
    name: str = "run"
    out: str = "results"
    recipe: str = "reproduce-chexnet"   # reproduce-chexnet | paper: the defaults below
    split: str | None = None            # reference | random | official | file (None: see --split)
    epochs: int = 100                   # upper bound; early stopping usually ends sooner
    batch_size: int = 16                # global batch (split over torchrun processes); -1: auto
    eval_batch_size: int = 64
    image_size: int = 224
    optimizer: str = "sgd"              # sgd | adam
    lr: float = 0.01
    momentum: float = 0.9               # SGD
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])   # Adam
    weight_decay: float = 1e-4
    lr_decay: float = 10.0              # lr is divided by this when val loss gets worse
    keep_momentum: bool = False         # False: optimizer state reset at each decay (reference)
    patience: int = 3                   # stop this many epochs after the best epoch
    weights: str = "imagenet"           # imagenet | none | PATH
    amp: str = "off"                    # auto | bf16 | fp16 | off (off = the faithful fp32 recipe)
    channels_last: bool = False
    compile: bool = False
    memory_efficient: bool = False      # torchvision's checkpointed DenseNet, for 6 GB cards
    device: str = "auto"
    workers: int = -1                   # -1: auto (min(8, cores) on GPU, 1 on CPU)
    seed: int = 0
    cache: str = "auto"                 # auto | on | off: read prepare_data.py's uint8 cache
    cache_dir: str | None = None        # where that cache is (None: DATA/cache, its default)
    save_every: int = 1000              # also write last.pt every N optimizer steps (0: per epoch)
    missing: str = "error"              # error | skip: images listed but absent on disk
    uncertainty: str = "zeros"          # CheXphoto: zeros | ones | ignore
    source: str = "all"                 # CheXphoto: all|natural|synthetic|digital|photographic
    view: str = "frontal"               # CheXphoto: frontal | lateral | all
    no_finding: bool = False            # CheXphoto: also predict "No Finding"
    resume: bool = False
    force: bool = False                 # resume even if the config changed
    findings: list[str] = field(default_factory=list)   # filled in from the dataset

    @property
    def run_dir(self) -> Path:
        return Path(self.out) / self.name

    def record(self) -> dict:
        """The settings as config.json holds them."""
        return dataclasses.asdict(self)


def load_run_config(run_dir: str | os.PathLike, data: str | None = None) -> TrainConfig:
    """The TrainConfig of a run folder, from its config.json (keys it does not know ignored).

    Args:
        run_dir: folder written by retrain.py.
        data: dataset folder to use instead of the recorded one (moved data, or a run trained
            from another working directory: the recorded path may be relative).

    Raises:
        DataError: no config.json, not JSON, or not a retrain.py config.
    """
    path = Path(run_dir) / "config.json"
    if not path.is_file():
        raise DataError(f"{path}: not found; expected a run folder written by retrain.py.")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise DataError(f"{path}: not valid JSON ({err}).") from err
    if not isinstance(config, dict) or "dataset" not in config:
        raise DataError(f"{path}: no 'dataset' entry; not a retrain.py config.")
    return config_from_record(config, data)


def config_from_record(record: dict, data: str | None = None) -> TrainConfig:
    """The TrainConfig a recorded config (config.json, a checkpoint's "config") describes; keys
    it does not know are ignored. `data`: the dataset folder to use instead of the recorded."""
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    settings = {k: v for k, v in record.items() if k in names}
    if data is not None:
        settings["data"] = data
    return TrainConfig(**settings)
