"""What a Colab VM reset costs before and after the cache is kept on Drive, from measured rates.

    python benchmarks/colab_reset.py                            # rates of this machine's disk
    python benchmarks/colab_reset.py --source /content/drive/MyDrive/bench   # on Colab: Drive's

After a reset the VM's disk is empty. Before (main 139749d), "Run all" copied NIH's images
again (112,120 PNGs, about 42 GB; `notebook_tools.copy_missing`, file by file) and rebuilt the
uint8 cache (112,120 decodes); now it copies the cache alone (one 5.6 GB images.u8 and four
small files; `files.copy_resumable`, hashing as it copies, then the check against
copies.json). This script measures, side by side in one run, on the folder given:
  1. the many-small-files copy rate (copy_missing over --small-files files of NIH's mean PNG
     size, 375 KB = 42 GB / 112,120);
  2. the one-big-file copy rate (copy_resumable of a --big-mb file, sha256 included);
  3. the cache build rate per core on the real NIH PNGs in --images (decode + the reference
     resize, `cache.build_cache` with one worker), when that folder exists;
and prints the minutes from "Run all" to the first training step for all of NIH on a 2-core
VM, before and after. The files are written to --source (on Colab: a folder on Drive, so the
copies read from Drive) and copied to a temporary folder on the local disk. The rates of the
first run of a fresh file may differ from later ones (caches); each copy is done once.
"""
from __future__ import annotations

import chexnet.idle_threads  # noqa: F401  (first, before torch loads: idle threads sleep)

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Sequence

import numpy as np

NIH_IMAGES = 112_120
NIH_BYTES = 42e9            # the 12 archives extracted (README: about 42 GB)
CACHE_BYTES = NIH_IMAGES * 224 * 224
MEAN_PNG = int(NIH_BYTES / NIH_IMAGES)
SHARED_IMAGES = Path(__file__).resolve().parents[2] / "shared" / "data" / "nih" / "images"


def _write_sources(folder: Path, small: int, big_mb: int) -> tuple[Path, Path]:
    rng = np.random.default_rng(0)  # incompressible bytes: no filesystem shortcut
    pngs = folder / "pngs"
    pngs.mkdir(parents=True, exist_ok=True)
    for i in range(small):
        (pngs / f"{i:08d}_000.png").write_bytes(rng.integers(0, 256, MEAN_PNG, np.uint8)
                                                .tobytes())
    big = folder / "images.u8"
    with open(big, "wb") as fh:
        for _ in range(big_mb):
            fh.write(rng.integers(0, 256, 2**20, np.uint8).tobytes())
    return pngs, big


def _decode_rate(images: Path, work: Path) -> float | None:
    from chexnet.datatools.cache_build import build_cache

    paths = sorted(images.glob("*.png"))
    if not paths:
        return None
    ids = [p.name for p in paths]
    t0 = time.perf_counter()
    build_cache(work / "cache", ids, [str(p) for p in paths], 224, "bench", workers=1,
                progress=False)
    return len(paths) / (time.perf_counter() - t0)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source", help="where the files to copy are written (default: a "
                   "temporary folder on this disk)")
    p.add_argument("--small-files", type=int, default=1000)
    p.add_argument("--big-mb", type=int, default=1024)
    p.add_argument("--images", default=str(SHARED_IMAGES),
                   help="real NIH PNGs for the decode rate (default: the shared sample)")
    p.add_argument("--cores", type=int, default=2, help="the VM's cores (Colab: 2)")
    p.add_argument("--decode-rate", type=float, default=63.1,
                   help="img/s per core when --images has no PNG (default: README's measured "
                   "cache build rate, 2-vCPU machine, 2026-11-26)")
    args = p.parse_args(argv)
    from chexnet.files import copy_resumable
    from chexnet.analysis.notebook_tools import copy_missing

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        source = Path(args.source) if args.source else tmp / "source"
        pngs, big = _write_sources(source, args.small_files, args.big_mb)
        os.sync()
        t0 = time.perf_counter()
        copy_missing(pngs, tmp / "local" / "images")
        small_rate = args.small_files * MEAN_PNG / (time.perf_counter() - t0)
        t0 = time.perf_counter()
        copy_resumable(big, tmp / "local" / "images.u8")
        big_rate = big.stat().st_size / (time.perf_counter() - t0)
        measured = _decode_rate(Path(args.images), tmp)
        if args.source:
            shutil.rmtree(pngs)
            big.unlink()
    decode = measured or args.decode_rate
    where = (f"measured here on {args.images}" if measured
             else "README's figure (no PNG in --images)")
    copy_images = NIH_BYTES / small_rate
    build = NIH_IMAGES / (decode * args.cores)
    copy_cache = CACHE_BYTES / big_rate
    print(f"copy rates from {args.source or 'a folder on this disk'} to this machine's disk "
          f"(one copy each):")
    print("| what | rate | source |\n| --- | ---: | --- |")
    print(f"| {args.small_files} files of {MEAN_PNG / 1e3:.0f} KB (copy_missing) | "
          f"{small_rate / 1e6:,.0f} MB/s | measured now |")
    print(f"| one {args.big_mb} MiB file (copy_resumable, sha256 included) | "
          f"{big_rate / 1e6:,.0f} MB/s | measured now |")
    print(f"| cache build per core (decode + reference resize) | {decode:.1f} img/s | {where} |")
    print()
    print(f"all of NIH on a {args.cores}-core VM, from Run all to the first training step:")
    print("| after a reset | copy | build the cache | minutes |\n| --- | ---: | ---: | ---: |")
    print(f"| before: images again + cache rebuilt | {copy_images / 60:.1f} min "
          f"({NIH_BYTES / 1e9:.0f} GB) | {build / 60:.1f} min ({NIH_IMAGES:,} images) | "
          f"{(copy_images + build) / 60:.1f} |")
    print(f"| now: the cache alone from Drive | {copy_cache / 60:.1f} min "
          f"({CACHE_BYTES / 1e9:.1f} GB) | none | {copy_cache / 60:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
