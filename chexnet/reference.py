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
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import sys
from pathlib import Path
from typing import Sequence

from chexnet.cli import CommandError, command, integer
from chexnet.data import REPO_DIR
from chexnet.files import check_outputs, move_into_place, sha256_file

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


def fetch(folder: str | os.PathLike = PRETRAINED_DIR, base_url: str = BASE_URL,
          retries: int = 3, backoff: float = 2.0, progress: bool = True) -> list[Path]:
    """Download the reference files that `folder` lacks; check every one (sha256).

    Each file is downloaded into FOLDER/.download/ (an interrupted download resumes there),
    checked, then renamed into place: `folder` never holds a partial or wrong file. A file
    already in place is checked and kept; a different file in its place is refused, never
    replaced.

    Returns:
        The paths of the three files.

    Raises:
        ReferenceMismatch: a different file is in place, or the download is not the
            published file (the message names the URL).
        chexnet.download.DownloadError: the download failed (offline: the message says where
            to get the files by hand).
    """
    from chexnet.download import DownloadError, download_file

    folder = Path(folder)
    staging = folder / ".download"
    paths = []
    for ref in FILES.values():
        dest = folder / ref.name
        if dest.exists():
            check_file(dest, ref)
            print(f"{dest}: already here (sha256 checked)")
            paths.append(dest)
            continue
        url = base_url + ref.name
        try:
            got = download_file(url, staging / ref.name, retries=retries, backoff=backoff,
                                progress=progress)
        except DownloadError as err:
            raise DownloadError(
                f"{err} Without internet here: download the files of {BROWSE_URL} on a machine "
                f"that has it and copy them into {folder}/ (they are checked by sha256).",
                err.filename, err.url, err.part, err.connection_failed) from None
        try:
            check_file(got, ref)
        except ReferenceMismatch:
            got.unlink()
            raise ReferenceMismatch(f"{url}: the download is not reproduce-chexnet's published "
                                    f"{ref.name} (wrong sha256), removed. Is --base-url a "
                                    "mirror of that commit?") from None
        move_into_place(got, dest)
        print(f"{dest}: {ref.what}, {ref.size:,} bytes (sha256 checked)", file=sys.stderr)
        paths.append(dest)
    shutil.rmtree(staging, ignore_errors=True)
    return paths


@command
def main(argv: Sequence[str] | None = None) -> int:
    """fetch_reference.py: see the module docstring."""
    p = argparse.ArgumentParser(prog="fetch_reference.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(PRETRAINED_DIR), metavar="FOLDER",
                   help="where the files go (default: this repository's pretrained/, where "
                   "the commands look for them)")
    p.add_argument("--base-url", default=BASE_URL, metavar="URL",
                   help="a mirror of reproduce-chexnet's pretrained/ folder at commit "
                   f"{SOURCE_COMMIT[:7]} (default: GitHub's)")
    p.add_argument("--retries", type=integer(0), default=3)
    args = p.parse_args(argv)
    check_outputs({"--out": args.out}, {}, folders=("--out",))
    base = args.base_url if args.base_url.endswith("/") else args.base_url + "/"
    fetch(args.out, base, retries=args.retries)
    print(f"reproduce-chexnet's published results are in {args.out}/ (preds.csv, aucs.csv, "
          "log_train). Re-score them: python eval_model.py --preds pretrained/preds.csv "
          "--labels nih_labels.csv")
    return 0
