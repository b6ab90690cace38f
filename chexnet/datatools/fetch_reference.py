"""Download reproduce-chexnet's published results into pretrained/: fetch_reference.py.

    python fetch_reference.py                       # pretrained/preds.csv, aucs.csv, log_train
    python fetch_reference.py --base-url URL        # from a mirror of that folder

What the files are, where they come from and how commands read them: chexnet/reference.py.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path
from typing import Sequence

from chexnet.cli import command, integer
from chexnet.datatools.download import DownloadError, download_file
from chexnet import reference
from chexnet.files import check_outputs, move_into_place
from chexnet.reference import (
    BASE_URL, BROWSE_URL, PRETRAINED_DIR, SOURCE_COMMIT, ReferenceMismatch, check_file,
)


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
        DownloadError: the download failed (offline: the message says where to get the files
            by hand).
    """
    folder = Path(folder)
    staging = folder / ".download"
    paths = []
    for ref in reference.FILES.values():
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
    p = argparse.ArgumentParser(prog="fetch_reference.py", description=reference.__doc__,
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
