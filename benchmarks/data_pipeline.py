"""Data pipeline benchmark: the reference per-image pipeline against the uint8 cache.

    python benchmarks/data_pipeline.py   # the 120 NIH PNGs of ../shared/data (not in a clone)
    python benchmarks/data_pipeline.py --images DIR --repeats 7
    python benchmarks/data_pipeline.py --quick              # 8 generated images, 1 repeat (tests)

Side by side, in one run, on the same images (median of --repeats after a warm-up):
  (a) reference: per image, PIL open, convert RGB, torchvision Resize 224, CenterCrop 224,
      ToTensor, Normalize; one process (what one DataLoader worker does).
  floor: a plain full decode of each PNG (Pillow; OpenCV too when importable, the faster counts).
  (b) cache build (`cache.build_cache`, every core): cost per image per core =
      wall time x workers / images, compared with the decode floor.
  (c) one epoch read from the cache: `cache.CachedImages` in torch's DataLoader (shuffled,
      batch 64, what retrain.py reads on a CPU) + flip_batch + model_input (train: flips,
      normalisation), over the cached images repeated to --read-images per epoch; beside it,
      (c0) the same epoch through the batch loop of the CacheLoader class that 0.3.0 had
      (replaced by CachedImages + DataLoader; kept here, in `removed_cache_loader`, only to
      show that the change costs no read rate).
torch runs on one thread throughout, so (a) and (c) each use one core. Prints a markdown table;
the last line is `read/reference ratio: N.Nx`.
"""
from __future__ import annotations

import chexnet.idle_threads  # noqa: F401  (first, before torch loads: idle threads sleep)

import argparse
import os
import resource
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image
from torchvision import transforms as v1

from torch.utils.data import DataLoader

from chexnet.cache import CachedImages, cache_dir, collate_batch, open_cache
from chexnet.data import flip_batch, model_input
from chexnet.datatools.cache_build import build_cache, default_workers, peak_rss_mb
from chexnet.files import sha256_file
from chexnet.labels import IMAGENET_MEAN, IMAGENET_STD

# The project is installed (make / pip install -e .); ROOT is only for default paths.
ROOT = Path(__file__).resolve().parents[1]

DEFAULT_IMAGES = ROOT.parent / "shared" / "data" / "nih" / "images"


def cpu_seconds() -> float:
    """CPU time of this process and of its finished children (pool workers), user + system."""
    me, kids = (resource.getrusage(who) for who in (resource.RUSAGE_SELF,
                                                     resource.RUSAGE_CHILDREN))
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def median_time(fn: Callable[[], object], repeats: int, warmup: int) -> tuple[float, float]:
    """Median (wall seconds, CPU seconds) of `fn()` over `repeats` runs after `warmup` runs.

    CPU time counts every process involved, so on a machine shared with other jobs it still
    measures the work done, while wall time also measures the waiting for a core.
    """
    for _ in range(warmup):
        fn()
    walls, cpus = [], []
    for _ in range(repeats):
        c0, t0 = cpu_seconds(), time.perf_counter()
        fn()
        walls.append(time.perf_counter() - t0)
        cpus.append(cpu_seconds() - c0)
    return statistics.median(walls), statistics.median(cpus)


def alternated(a: Callable[[], object], b: Callable[[], object], repeats: int, warmup: int
               ) -> tuple[float, float]:
    """Median wall seconds of `a()` and of `b()`, timed in turn (b, a, b, a, ...) so that a
    change in the machine's load hits both alike."""
    times: dict[str, list[float]] = {"a": [], "b": []}
    for _ in range(repeats):
        times["b"].append(median_time(b, 1, warmup)[0])
        times["a"].append(median_time(a, 1, warmup)[0])
    return statistics.median(times["a"]), statistics.median(times["b"])


def reference_pipeline(paths: Sequence[Path], size: int) -> Callable[[], None]:
    """reproduce-chexnet's per-image preprocessing (torchvision v1 transforms on RGB)."""
    transform = v1.Compose([v1.Resize(size), v1.CenterCrop(size), v1.ToTensor(),
                            v1.Normalize(IMAGENET_MEAN, IMAGENET_STD)])

    def run() -> None:
        for p in paths:
            with Image.open(p) as img:
                transform(img.convert("RGB"))
    return run


def decode_floors(paths: Sequence[Path]) -> dict[str, Callable[[], None]]:
    """Plain full decodes: Pillow, and OpenCV when it is installed."""
    def pillow() -> None:
        for p in paths:
            with Image.open(p) as img:
                img.load()
    floors = {"Pillow": pillow}
    try:
        import cv2  # optional: opencv-python-headless
    except ImportError:
        return floors

    def opencv() -> None:
        for p in paths:
            cv2.imread(str(p), cv2.IMREAD_UNCHANGED)
    floors["OpenCV"] = opencv
    return floors


def removed_cache_loader(dataset: CachedImages, batch_size: int, generator: torch.Generator):
    """The batches of 0.3.0's CacheLoader (shuffle, no prefetch thread: its CPU setting), as
    it read them: one permutation from `generator`, then per batch one sorted fancy-index of
    the memory map, put back in drawn order. For the (c0) row only."""
    images = dataset.cache.images()
    order = torch.randperm(len(dataset), generator=generator).numpy()
    for i in range(0, len(order), batch_size):
        positions = order[i:i + batch_size]
        rows = dataset.rows[positions]
        sort = np.argsort(rows, kind="stable")
        pixels = images[rows[sort]]
        if not np.array_equal(sort, np.arange(len(sort))):
            pixels = pixels[np.argsort(sort)]
        yield (torch.from_numpy(pixels).unsqueeze(1),
               torch.from_numpy(dataset.targets[positions]),
               [dataset.image_ids[p] for p in positions])


def make_images(folder: Path, n: int, side: int) -> None:
    """n grey PNGs with X-ray-like smooth content (for --quick)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:side, 0:side] / side
    for i in range(n):
        img = 80 + 100 * np.exp(-((yy - rng.uniform(.3, .7)) ** 2 + (xx - .5) ** 2) / .05)
        img = img + 30 * np.sin(9 * xx + i) + rng.normal(0, 5, img.shape)
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(folder / f"{i:08d}_000.png")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=Path, help=f"folder of PNGs (default {DEFAULT_IMAGES})")
    p.add_argument("--image-size", dest="size", type=int, default=224)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--workers", type=int, default=default_workers(), help="cache build processes")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--read-images", type=int, default=4096,
                   help="images per timed cache-read epoch (the cache is cycled)")
    p.add_argument("--quick", action="store_true",
                   help="8 generated 256 px images, size 64, 1 repeat, 1 worker: a smoke test")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(1)
    warmup = 1
    if args.quick:
        args.repeats, args.size, args.workers, args.read_images, warmup = 1, 64, 1, 256, 0

    with tempfile.TemporaryDirectory(prefix="cxr_bench_") as tmp:
        m = measure(args, Path(tmp), warmup)
    if isinstance(m, int):  # an error, already printed: its exit status
        return m
    print_table(args, m, warmup)
    return 0


def measure(args: argparse.Namespace, work: Path, warmup: int) -> SimpleNamespace | int:
    """Time (a) the reference pipeline, the decode floors, (b) the cache build and (c) reading
    the cache, all on the same images in `work`."""
    if args.quick and args.images is None:
        images_dir = work / "generated"
        make_images(images_dir, 8, 256)
    else:
        images_dir = args.images or DEFAULT_IMAGES
    paths = sorted(p for p in Path(images_dir).glob("*") if p.suffix.lower() in
                   (".png", ".jpg", ".jpeg"))
    if not paths and args.images is None:
        # The default is the 120 real NIH images of the project's shared sample, which a clone
        # does not have: say so, and what to run instead.
        print(f"skipped: {images_dir} is not here (the default is the 120 real NIH images of "
              "the shared sample beside the repository, ../shared/data/nih/images, which a "
              "plain clone does not have). Pass --images DIR with NIH PNGs (e.g. "
              "/data/nih/images_001/images), or --quick for 8 generated images.",
              file=sys.stderr)
        return 0
    if not paths:
        print(f"error: no PNG/JPEG images in {images_dir}", file=sys.stderr)
        return 2
    n = len(paths)
    ids = [p.name for p in paths]
    labels_file = work / "labels.txt"  # stands in for the labels file the cache is keyed to
    labels_file.write_text("\n".join(ids) + "\n")
    sha = sha256_file(labels_file)
    folder = cache_dir(work, args.size)
    rss_start = peak_rss_mb()["self"]

    # (b) first: the pool forks before torch has started any threads in this process.
    def build(workers: int) -> Callable[[], None]:
        def run() -> None:
            if folder.exists():
                shutil.rmtree(folder)
            build_cache(folder, ids, paths, args.size, sha, workers=workers, progress=False)
        return run
    build_s, build_cpu_s = median_time(build(args.workers), args.repeats, warmup)
    rss_build = peak_rss_mb()
    # One worker runs in this process: its wall time per image is the cost per core with
    # no pool and no competition for cores, directly comparable with the decode floor.
    build1_s = (median_time(build(1), args.repeats, warmup)[0] if args.workers > 1
                else build_s)

    floors = {name: median_time(fn, args.repeats, warmup)
              for name, fn in decode_floors(paths).items()}
    floor_name = min(floors, key=lambda k: floors[k][1])
    floor_s, floor_cpu_s = (t / n for t in floors[floor_name])
    ref_s = median_time(reference_pipeline(paths, args.size), args.repeats, warmup)[0] / n

    cache = open_cache(work, args.size, labels_file)
    if cache is None:
        print("error: the cache just built did not open", file=sys.stderr)
        return 1
    reps = -(-args.read_images // n)
    rows = np.tile(np.arange(n), reps)
    dataset = CachedImages(cache, rows, np.zeros((len(rows), 14), np.float32),
                           [ids[r] for r in rows], [f"f{k}" for k in range(14)])
    loader = DataLoader(dataset, args.batch_size, shuffle=True, collate_fn=collate_batch,
                        generator=torch.Generator().manual_seed(0))

    def read_epoch() -> None:
        for seed, (x, _, _) in enumerate(loader):
            model_input(flip_batch(x, seed), "cpu")

    def read_epoch_removed() -> None:
        batches = removed_cache_loader(dataset, args.batch_size, torch.Generator().manual_seed(0))
        for seed, (x, _, _) in enumerate(batches):
            model_input(flip_batch(x, seed), "cpu")
    read_s, removed_s = (t / len(rows) for t in alternated(
        read_epoch, read_epoch_removed, args.repeats, max(warmup, 1)))
    rss = peak_rss_mb()
    return SimpleNamespace(n=n, images_dir=images_dir, build_s=build_s, build_cpu_s=build_cpu_s,
                           build1_s=build1_s, floors=floors, floor_name=floor_name,
                           floor_s=floor_s, floor_cpu_s=floor_cpu_s, ref_s=ref_s, read_s=read_s,
                           removed_s=removed_s,
                           rows=len(rows), rss_start=rss_start, rss_build=rss_build, rss=rss)


def print_table(args: argparse.Namespace, m: SimpleNamespace, warmup: int) -> None:
    build_per_core_s = m.build_s * args.workers / m.n
    build_cpu_per_image = m.build_cpu_s / m.n
    ref_ips, read_ips = 1 / m.ref_s, 1 / m.read_s
    print(f"images: {m.n} from {m.images_dir}; size {args.size}; torch threads 1; "
          f"build workers {args.workers} of {os.cpu_count()} cores; batch {args.batch_size}; "
          f"median of {args.repeats} after {warmup} warm-up; load average "
          f"{os.getloadavg()[0]:.1f}")
    print()
    print("| stage | img/s | ms/img (wall) | ms/img (CPU) | notes |")
    print("| --- | ---: | ---: | ---: | --- |")
    print(f"| (a) reference per-image pipeline | {ref_ips:.1f} | {1000 * m.ref_s:.2f} | | "
          "PIL RGB + Resize/CenterCrop/ToTensor/Normalize, 1 process |")
    for name, (wall, cpu) in m.floors.items():
        print(f"| decode floor: {name} | {m.n / wall:.1f} | {1000 * wall / m.n:.2f} | "
              f"{1000 * cpu / m.n:.2f} | full decode, 1 process |")
    print(f"| (b) cache build, per core | {1 / build_per_core_s:.1f} | "
          f"{1000 * build_per_core_s:.2f} | {1000 * build_cpu_per_image:.2f} | wall "
          f"{m.build_s:.2f} s x {args.workers} workers / {m.n} images; CPU: all processes |")
    n = m.n
    print(f"| (b) cache build, all workers | {n / m.build_s:.1f} | {1000 * m.build_s / n:.2f} "
          f"| | {args.workers} workers |")
    if args.workers > 1:
        print(f"| (b) cache build, 1 worker | {n / m.build1_s:.1f} | "
              f"{1000 * m.build1_s / n:.2f} | | in this process, no pool |")
    print(f"| (c0) cache read, 0.3.0 CacheLoader (removed) | {1 / m.removed_s:.0f} | "
          f"{1000 * m.removed_s:.4f} | | the same epoch, the old batch loop |")
    print(f"| (c) cache read + flip + normalise | {read_ips:.0f} | {1000 * m.read_s:.4f} | | "
          f"{m.rows} images/epoch, shuffled, flips + normalise, CPU; CachedImages + "
          "DataLoader |")
    print()
    print(f"build/reference ratio (per core, wall): {m.ref_s / build_per_core_s:.2f}x")
    one_worker = (f"{m.build1_s / n / m.floor_s:.2f}x wall (1 worker), "
                  if args.workers > 1 else "")
    print(f"build cost / decode floor ({m.floor_name}), per image per core: "
          f"{build_per_core_s / m.floor_s:.2f}x wall ({args.workers} workers), {one_worker}"
          f"{build_cpu_per_image / m.floor_cpu_s:.2f}x CPU ({args.workers} workers)")
    workers_rss = (f", {m.rss_build['children']:.0f} MiB largest build worker"
                   if args.workers > 1 else "")
    print(f"peak RSS: {m.rss_start:.0f} MiB after imports; {m.rss_build['self']:.0f} MiB main "
          f"after build{workers_rss}; {m.rss['self']:.0f} MiB at the end")
    print(f"cache read, DataLoader / removed CacheLoader: {m.removed_s / m.read_s:.2f}x "
          "(1.00x = the same rate)")
    print(f"read/reference ratio: {read_ips / ref_ips:.1f}x")


if __name__ == "__main__":
    sys.exit(main())
