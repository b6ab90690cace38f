"""reproduce-chexnet's published results: the three files of its `pretrained/` folder.

    python fetch_reference.py            # once: downloads them into pretrained/ (4 MB)

| file | what |
| --- | --- |
| `pretrained/preds.csv` | its DenseNet-121's probabilities on its 22,433-image test fold |
| `pretrained/aucs.csv` | its per-finding test AUCs (those preds.csv scores to) |
| `pretrained/log_train` | its train and validation loss per epoch (printed tensors) |

They come from github.com/jrzech/reproduce-chexnet (BSD 3-Clause license, (c) John Zech) at
commit `SOURCE_COMMIT`, pinned, and each is checked against its sha256 here: when fetched and
whenever a command reads it through `reference_path`. This repository does not commit them:
they are fetched like the datasets. The pickled `checkpoint` of that folder is not fetched
(unpickling runs code; see pretrained/README.md for converting one you have).
The download itself is chexnet/datatools/fetch_reference.py.
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from chexnet.cli import CommandError
from chexnet.data import REPO_DIR
from chexnet.files import sha256_file

SOURCE_REPO = "jrzech/reproduce-chexnet"
SOURCE_COMMIT = "eb2c322fb2e7ca402f9def5d6fb867df099c9d72"
BASE_URL = f"https://raw.githubusercontent.com/{SOURCE_REPO}/{SOURCE_COMMIT}/pretrained/"
BROWSE_URL = f"https://github.com/{SOURCE_REPO}/tree/{SOURCE_COMMIT}/pretrained"
PRETRAINED_DIR = REPO_DIR / "pretrained"
FETCH_COMMAND = "python fetch_reference.py"


@dataclasses.dataclass(frozen=True)
class ReferenceFile:
    name: str
    sha256: str
    size: int
    what: str


FILES = {f.name: f for f in (
    ReferenceFile("preds.csv", "303332d593f56dc3c8191f2a903f09043c93f7205179d03189f3eaaf6247ad40",
                  4_188_340, "test predictions (22,433 images)"),
    ReferenceFile("aucs.csv", "281cd22d37290a1a799ea79d311007d6f45bfc324dc9fabddbc1ae3e057cf337",
                  421, "per-finding test AUCs"),
    ReferenceFile("log_train", "4e69a33a913c14a25e3bb1f4e76cdfa7318fb501d2b850ffe5f556e90277040b",
                  666, "training log"),
)}


class ReferenceMissing(CommandError, FileNotFoundError):
    """A reference file that is not in pretrained/ (not fetched yet)."""


class ReferenceMismatch(CommandError, ValueError):
    """A file in the reference's place that is not the published one."""


def how_to_fetch() -> str:
    return (f"Download reproduce-chexnet's published results once with `{FETCH_COMMAND}` "
            f"(make reference; 4 MB from {SOURCE_REPO} at commit {SOURCE_COMMIT[:7]}).")


def hint(path: str | os.PathLike) -> str:
    """What to say about a missing file that is one of the reference's, else ''."""
    path = Path(path)
    try:
        here = path.parent.resolve() == PRETRAINED_DIR.resolve()
    except OSError:
        return ""
    return f" It is reproduce-chexnet's published {FILES[path.name].what}. {how_to_fetch()}" \
        if here and path.name in FILES else ""


def check_file(path: Path, expected: ReferenceFile) -> None:
    """Raises ReferenceMismatch unless `path` holds the published bytes."""
    got = sha256_file(path)
    if got != expected.sha256:
        raise ReferenceMismatch(
            f"{path}: not reproduce-chexnet's published {expected.name} (sha256 {got[:12]}..., "
            f"expected {expected.sha256[:12]}...). Move it away (it may be yours) and run "
            f"`{FETCH_COMMAND}` again.")


def reference_path(name: str, folder: str | os.PathLike | None = None) -> Path:
    """pretrained/NAME (or FOLDER/NAME), checked against its sha256.

    Raises:
        ReferenceMissing: it is not there; the message says how to fetch it.
        ReferenceMismatch: another file is there.
    """
    path = Path(folder) / name if folder is not None else PRETRAINED_DIR / name
    if not path.is_file():
        raise ReferenceMissing(f"{path}: not found. It is reproduce-chexnet's published "
                               f"{FILES[name].what}. {how_to_fetch()}")
    check_file(path, FILES[name])
    return path
