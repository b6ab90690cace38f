"""A uint8 image cache: decode and resize every X-ray once, then train from a memory map.

Decoding a 1024x1024 NIH PNG costs about 10-13 ms of CPU; the reference pipeline about
15-19 ms (performance.md, benchmarks/data_pipeline.py). Reading a 224x224 image back from a
page-cached memory map costs about 0.01 ms, and flips and normalisation are a few vectorised
tensor operations per batch (about 0.3 ms per image on one CPU core; a GPU does them for free).

On disk, under `<root>/cache/<S>/` (or `<DIR>/<S>/` with --cache-dir DIR):
    images.u8      raw uint8, shape (N, S, S), row r is the grey image of index.csv's row r:
                   the reference Resize(S) (shorter side, antialiased bilinear) + CenterCrop(S)
                   of `data.load_xray(path)`, byte for byte what the reference feeds
                   ToTensor. Rows of undecodable images (skipped with --skip-bad) stay zero.
    index.csv      `row, image_id`
    done.npy       (N,) uint8 progress record: 0 to do, 1 done, 2 undecodable (skipped).
                   A worker sets its rows' flags only after their pixels are flushed, so a
                   killed build resumes exactly where it stopped.
    manifest.json  version, size, count, sha256 of the label file(s), source root, layout,
                   created/completed times, complete flag, skipped ids.
    skip.txt       `image_id<TAB>reason` for every listed image not in the usable rows.

The cache is built by `prepare_data.py` (which calls `build_cache`) and read by `open_cache`,
`CacheLoader` + `batch_transform`, or `cache_loaders` (what retrain.py calls).
"""
from __future__ import annotations

import concurrent.futures as cf
import json
import os
import queue
import shutil
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np
import pandas as pd
import torch
from PIL import Image
from torch.utils.data import Sampler
from torchvision.transforms import v2 as T
from tqdm import tqdm

from chexnet.files import atomic_write, atomic_write_text, sha256_file
from chexnet.data import (
    DataError, ImageReadError, drops_last_batch, find_chexphoto_root, resolve_nih_labels,
    load_xray,
)

CACHE_VERSION = 2  # 2: EXIF orientation applied (version 1 caches may hold sideways photos)
DEFAULT_SIZE = 224          # the reference recipe's Resize 224 + CenterCrop 224
MAX_CHUNK = 64              # images per work unit at most: about 1 s of decoding, 3 MB of pixels
TODO, DONE, BAD = 0, 1, 2   # done.npy flags

IMAGES_FILE, INDEX_FILE, DONE_FILE = "images.u8", "index.csv", "done.npy"
MANIFEST_FILE, SKIP_FILE = "manifest.json", "skip.txt"


class CacheBuildError(DataError):
    """The build stopped on images that are missing or cannot be decoded; names them."""


# --------------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------------
def cache_dir(root: str | os.PathLike, size: int, base: str | os.PathLike | None = None
              ) -> Path:
    """`<root>/cache/<size>`: where the cache of a dataset root at one image size lives; with
    `base` (prepare_data.py's and retrain.py's --cache-dir, for a read-only dataset folder),
    `<base>/<size>` instead."""
    return (Path(base) if base else Path(root) / "cache") / str(int(size))


def resize_center_crop(img: Image.Image, size: int) -> np.ndarray:
    """The reference geometry on a grey PIL image -> (size, size) uint8.

    Same torchvision calls as `data.build_transform` (Resize(size) of the shorter side,
    antialiased bilinear, then CenterCrop(size)), so the bytes equal what the reference pipeline
    hands to ToTensor. An exact resize costs ~1.8 ms on a 1024 px image against ~10-13 ms to
    decode it, so a faster approximate resize (reducing_gap, reduce) is not worth the mismatch.
    """
    if img.size == (size, size):  # a pre-resized copy: torchvision's Resize would return
        return np.array(img, dtype=np.uint8)  # these very bytes (tests/test_prepare)
    out = T.CenterCrop(size)(T.Resize(size, antialias=True)(img))
    return np.array(out, dtype=np.uint8)  # a writable copy (50 KB at 224 px)


def peak_rss_mb() -> dict[str, float]:
    """Peak resident set size so far (MiB): this process, and its largest finished child.
    Empty where the `resource` module does not exist (Windows)."""
    try:
        import resource
    except ImportError:
        return {}
    scale = 1 / 2**20 if sys.platform == "darwin" else 1 / 1024  # bytes on macOS, KiB on Linux
    return {"self": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale,
            "children": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * scale}


def default_workers() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS
        return os.cpu_count() or 1


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _read_manifest(folder: Path) -> dict | None:
    try:
        return json.loads((folder / MANIFEST_FILE).read_text())
    except FileNotFoundError:
        return None
    except json.JSONDecodeError:
        return {}


# --------------------------------------------------------------------------------------------
# Building
# --------------------------------------------------------------------------------------------
@dataclass
class _ChunkTask:
    """One work unit: rows (sorted) and their image paths. Picklable, small."""
    images_path: str
    done_path: str
    size: int
    rows: list[int]
    paths: list[str]


@dataclass
class _ChunkResult:
    rows: list[int]
    bad: list[tuple[int, str]]      # (row, reason)
    cpu_seconds: float              # process CPU time spent on this chunk


def _build_chunk(task: _ChunkTask) -> _ChunkResult:
    """Decode, resize and write one chunk's rows, then mark them in done.npy.

    Runs in a worker process. Only the rows' span of images.u8 is mapped, and unmapped after,
    so a worker's resident memory stays at a few chunk-sized buffers whatever N is.
    """
    cpu0 = time.process_time()
    S = task.size
    start, stop = task.rows[0], task.rows[-1] + 1
    images = np.memmap(task.images_path, dtype=np.uint8, mode="r+", offset=start * S * S,
                       shape=(stop - start, S, S))
    good: list[int] = []
    bad: list[tuple[int, str]] = []
    for row, path in zip(task.rows, task.paths):
        try:
            img = load_xray(path)
        except ImageReadError as err:
            bad.append((row, str(err)))
            continue
        images[row - start] = resize_center_crop(img, S)
        good.append(row)
    images.flush()  # pixels reach the file before their rows are marked done
    del images
    done = np.load(task.done_path, mmap_mode="r+")
    done[good] = DONE
    done[[r for r, _ in bad]] = BAD
    done.flush()
    del done
    return _ChunkResult(task.rows, bad, time.process_time() - cpu0)


def _leave_ctrl_c_to_main() -> None:
    """In each pool worker: ignore SIGINT. A terminal's Ctrl-C reaches the whole process
    group; the main process stops (its one message), lets the chunks in flight finish and
    record themselves, and the workers print no KeyboardInterrupt traceback of their own."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _run_chunks(tasks: list[_ChunkTask], workers: int) -> Iterator[_ChunkResult]:
    """Yield chunk results as they finish. One worker: in this process (no pool start-up).

    At most 2 x workers chunks are in flight, so stopping early (an error, `max_chunks`, a
    closed generator) only waits for those; finished chunks are already recorded on disk.
    """
    if workers <= 1:
        for task in tasks:
            yield _build_chunk(task)
        return
    pending: set[cf.Future] = set()
    todo = iter(tasks)
    with cf.ProcessPoolExecutor(max_workers=workers, initializer=_leave_ctrl_c_to_main) as pool:
        try:
            for task in todo:
                pending.add(pool.submit(_build_chunk, task))
                if len(pending) >= 2 * workers:
                    break
            while pending:
                finished, pending = cf.wait(pending, return_when=cf.FIRST_COMPLETED)
                for fut in finished:
                    nxt = next(todo, None)
                    if nxt is not None:
                        pending.add(pool.submit(_build_chunk, nxt))
                    yield fut.result()
        finally:
            for fut in pending:
                fut.cancel()


@dataclass
class BuildResult:
    """What a `build_cache` call did."""
    dir: Path
    count: int                          # rows in the cache (images found on disk)
    decoded: int                        # images decoded by this call (resume: only the rest)
    skipped: dict[str, str]             # image id -> reason, for every unusable listed image
    complete: bool                      # False when stopped early by `max_chunks`
    workers: int
    wall_seconds: float
    worker_cpu_seconds: float           # summed over chunks: decode + resize + write


def _reuse_reason(folder: Path, size: int, sha: str, ids: Sequence[str]) -> str | None:
    """Why the cache in `folder` cannot be resumed (None: it can)."""
    manifest = _read_manifest(folder)
    if manifest is None:
        return None if not any(folder.iterdir()) else "it has no manifest.json"
    if manifest.get("version") != CACHE_VERSION:
        return f"it was written by cache version {manifest.get('version')}, not {CACHE_VERSION}"
    if manifest.get("size") != size:
        return f"its manifest says size {manifest.get('size')}, not {size}"
    if manifest.get("labels_sha256") != sha:
        return "the labels file changed since it was built (sha256 differs)"
    try:
        index = pd.read_csv(folder / INDEX_FILE, dtype={"image_id": str}, keep_default_na=False)
        done = np.load(folder / DONE_FILE, mmap_mode="r")
        nbytes = (folder / IMAGES_FILE).stat().st_size
    except (FileNotFoundError, ValueError, OSError) as err:
        return f"its files are unreadable ({err})"
    if index["image_id"].tolist() != list(ids):
        return ("the images found on disk changed since it was built "
                f"({len(index)} then, {len(ids)} now)")
    if len(done) != len(ids) or nbytes != len(ids) * size * size:
        return "its files do not match its index"
    return None


def _create(folder: Path, ids: Sequence[str], size: int, manifest: dict) -> None:
    """Fresh, empty cache files, their disk space reserved (see `_reserved_file`)."""
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_text(folder / MANIFEST_FILE, json.dumps(manifest, indent=1) + "\n")
    index = pd.DataFrame({"row": np.arange(len(ids)), "image_id": list(ids)})
    atomic_write_text(folder / INDEX_FILE, index.to_csv(index=False))
    atomic_write(folder / IMAGES_FILE, lambda tmp: _reserved_file(tmp, len(ids) * size * size))
    # The per-row 'done' flags: N bytes (112 KB for NIH), written out, never sparse.
    atomic_write(folder / DONE_FILE, lambda tmp: _zeros_npy(tmp, len(ids)))


def _zeros_npy(path: Path, n: int) -> None:
    with open(path, "wb") as f:  # a file object: np.save would add .npy to the name
        np.save(f, np.zeros(n, np.uint8))


def _reserved_file(path: Path, n_bytes: int) -> None:
    """A file of n_bytes zeros whose disk space is allocated now, without an n_bytes buffer
    in RAM. The workers write it through a memory map: a page of a sparse file that the disk
    has no room for kills the process with SIGBUS (a "Bus error", a "worker process died"),
    where a reservation fails here with ENOSPC, which the command reports as a full disk."""
    with open(path, "wb") as f:
        f.truncate(n_bytes)
    _reserve(path, n_bytes)


def _reserve(path: Path, n_bytes: int) -> None:
    """Allocate the disk blocks of `path`'s first n_bytes (idempotent; os.posix_fallocate
    writes zeros itself on filesystems without fallocate). Where the call does not exist
    (macOS, Windows) the file stays sparse."""
    if n_bytes and hasattr(os, "posix_fallocate"):
        with open(path, "r+b") as f:
            os.posix_fallocate(f.fileno(), 0, n_bytes)


def build_cache(folder: str | os.PathLike, ids: Sequence[str], paths: Sequence[str],
                size: int, sha: str, *, absent: dict[str, str] | None = None,
                skip_bad: bool = False, workers: int | None = None,
                chunk_size: int | None = None, meta: dict | None = None,
                max_chunks: int | None = None, on_chunk: Callable[[int], None] | None = None,
                progress: bool = True) -> BuildResult:
    """Build (or resume) the cache of `paths` in `folder`.

    Args:
        folder: the cache folder, normally `cache_dir(root, size)`.
        ids, paths: image id and file of every row, in row order (images present on disk).
        size: S, the side of the cached images in pixels.
        sha: `files.sha256_file` of the label file(s) the rows come from; a cache built from
            another labels file, at another size or over other images is deleted and rebuilt
            (with a printed message), never reused.
        absent: listed images not on disk (id -> reason). With `skip_bad` they are recorded in
            skip.txt and the manifest; without, the build stops before decoding anything.
        skip_bad: record undecodable images and carry on, instead of stopping.
        workers: processes (default: every core this process may use). 1: no pool.
        chunk_size: images per work unit; progress is flushed after each. Default: up to
            MAX_CHUNK, small enough to give every worker at least 4 units.
        meta: extra manifest fields (dataset, source_root, layout, labels_files).
        max_chunks: stop after this many chunks, as if interrupted (tests).
        on_chunk: called with the number of chunks finished so far, after each is recorded.
        progress: show a tqdm bar.

    Raises:
        CacheBuildError: absent or undecodable images without `skip_bad` (names them). Rows
            finished before the error stay done, so a rerun after fixing the files resumes.
    """
    t0 = time.perf_counter()
    folder = Path(folder)
    ids, paths = list(ids), [str(p) for p in paths]
    absent = dict(absent or {})
    workers = max(1, workers or default_workers())
    _check_inputs(ids, paths, absent, skip_bad)
    manifest = _open_or_create(folder, ids, size, sha, meta)

    done = np.load(folder / DONE_FILE)  # (N,) uint8: a small copy, read once
    todo = np.flatnonzero(done != DONE)  # undecodable rows are retried: the file may be fixed
    already = len(ids) - len(todo)
    if already and len(todo):
        print(f"{folder}: resuming, {already} of {len(ids)} images already cached")
    if chunk_size is None:
        chunk_size = max(1, min(MAX_CHUNK, -(-len(todo) // (4 * workers))))
    tasks = [_ChunkTask(str(folder / IMAGES_FILE), str(folder / DONE_FILE), size,
                        rows.tolist(), [paths[r] for r in rows])
             for rows in (todo[i:i + chunk_size] for i in range(0, len(todo), chunk_size))]
    run = _decode_chunks(tasks, workers, len(ids), already, size, skip_bad, max_chunks,
                         on_chunk, progress)
    if run.bad and not skip_bad:
        listing = "\n".join(f"  {ids[r]}: {why}" for r, why in list(run.bad.items())[:10])
        raise CacheBuildError(
            f"{len(run.bad)} image(s) cannot be decoded:\n{listing}\nReplace or delete them "
            "and rerun (the images already cached are kept), or pass --skip-bad to leave them "
            "out (their ids go to skip.txt).")

    skipped = dict(absent)
    skipped.update({ids[r]: why for r, why in sorted(run.bad.items())})
    result = BuildResult(folder, len(ids), run.decoded, skipped, not run.stopped_early,
                         workers, time.perf_counter() - t0, run.cpu)
    if not run.stopped_early:
        result.complete = _finish(folder, manifest, len(ids), skipped)
    return result


def _check_inputs(ids: list[str], paths: list[str], absent: dict[str, str],
                  skip_bad: bool) -> None:
    if len(ids) != len(paths):
        raise ValueError("ids and paths must have the same length")
    if absent and not skip_bad:
        names = list(absent)
        raise CacheBuildError(
            f"{len(names)} listed image(s) are not under the data folder (first: "
            f"{', '.join(names[:5])}). Point --data at the dataset folder, or pass --skip-bad "
            "to cache the images present (the skipped ids go to skip.txt).")
    if not ids:
        raise CacheBuildError("no listed image was found on disk: nothing to cache.")


def _open_or_create(folder: Path, ids: list[str], size: int, sha: str,
                    meta: dict | None) -> dict:
    """The manifest of a reusable cache in `folder`, or of a new, empty one (a stale cache is
    deleted with a message)."""
    if folder.is_dir():
        reason = _reuse_reason(folder, size, sha, ids)
        if reason is not None:
            print(f"{folder}: existing cache not reusable: {reason}. Rebuilding it.")
            shutil.rmtree(folder)
    manifest = _read_manifest(folder) if folder.is_dir() else None
    if not manifest:
        manifest = {"version": CACHE_VERSION, "size": size, "count": len(ids),
                    "labels_sha256": sha, "created": _now(), "complete": False,
                    **(meta or {})}
        _create(folder, ids, size, manifest)
    elif not manifest.get("complete"):  # resuming: space for the rows still to be written
        _reserve(folder / IMAGES_FILE, len(ids) * size * size)
    return manifest


@dataclass
class _DecodeRun:
    decoded: int = 0
    cpu: float = 0.0
    bad: dict[int, str] = field(default_factory=dict)   # row -> why it could not be decoded
    stopped_early: bool = False


def _decode_chunks(tasks: list[_ChunkTask], workers: int, total: int, already: int, size: int,
                   skip_bad: bool, max_chunks: int | None,
                   on_chunk: Callable[[int], None] | None, progress: bool) -> _DecodeRun:
    """Decode the chunks in worker processes; each chunk records its own rows as done."""
    run, finished = _DecodeRun(), 0
    results = _run_chunks(tasks, min(workers, max(1, len(tasks))))
    bar = None
    try:
        for res in results:
            if bar is None:  # made once the pool has forked: tqdm starts a monitor thread
                bar = tqdm(total=total, initial=already, unit="img", desc=f"cache {size}px",
                           disable=not progress, dynamic_ncols=True)
            finished += 1
            run.decoded += len(res.rows)
            run.cpu += res.cpu_seconds
            run.bad.update(dict(res.bad))
            bar.update(len(res.rows))
            if res.bad and not skip_bad:
                break
            if on_chunk is not None:
                on_chunk(finished)
            if max_chunks is not None and finished >= max_chunks and finished < len(tasks):
                run.stopped_early = True
                break
    finally:
        results.close()  # waits for chunks in flight; they record their own progress
        if bar is not None:
            bar.close()
    return run


def _finish(folder: Path, manifest: dict, count: int, skipped: dict[str, str]) -> bool:
    """skip.txt and the final manifest; returns whether every row is decoded or skipped."""
    flags = np.load(folder / DONE_FILE)
    atomic_write_text(folder / SKIP_FILE, "".join(f"{i}\t{why}\n" for i, why in skipped.items()))
    manifest.update({"count": count, "complete": bool((flags != TODO).all()),
                     "completed": _now(), "skipped_count": len(skipped),
                     "skipped": list(skipped)})
    atomic_write_text(folder / MANIFEST_FILE, json.dumps(manifest, indent=1) + "\n")
    return manifest["complete"]


# --------------------------------------------------------------------------------------------
# Opening
# --------------------------------------------------------------------------------------------
@dataclass
class Cache:
    """A complete, validated cache. `images()` maps images.u8 read-only as (N, S, S) uint8."""
    dir: Path
    manifest: dict
    ids: list[str]                  # row -> image id
    skipped: frozenset[str]         # listed ids with no usable row (absent or undecodable)

    @property
    def size(self) -> int:
        return int(self.manifest["size"])

    def __len__(self) -> int:
        return len(self.ids)

    def row_of(self) -> dict[str, int]:
        """image id -> row, for the usable rows only."""
        return {i: r for r, i in enumerate(self.ids) if i not in self.skipped}

    def images(self) -> np.memmap:
        return np.memmap(self.dir / IMAGES_FILE, dtype=np.uint8, mode="r",
                         shape=(len(self.ids), self.size, self.size))


def open_cache(data_dir: str | os.PathLike, size: int,
               labels_path: str | os.PathLike | Sequence[str | os.PathLike],
               base: str | os.PathLike | None = None, quiet: bool = False) -> Cache | None:
    """The cache of `data_dir` at `size` (in `cache_dir(data_dir, size, base)`), if present,
    complete and built from `labels_path`.

    Returns None when there is no cache; also None, with the reason printed (unless
    `quiet`), when one is present but incomplete or stale (other labels file, other size,
    damaged files).
    """
    folder = cache_dir(data_dir, size, base)
    manifest = _read_manifest(folder) if folder.is_dir() else None
    if manifest is None:
        return None

    def stale(why: str) -> None:
        if quiet:
            return None
        print(f"{folder}: not using the image cache: {why}. Rerun prepare_data.py to "
              "(re)build it.")
        return None

    if manifest.get("version") != CACHE_VERSION:
        return stale(f"cache version {manifest.get('version')}, expected {CACHE_VERSION}")
    if manifest.get("size") != size:
        return stale(f"its manifest says size {manifest.get('size')}, not {size}")
    files = [labels_path] if isinstance(labels_path, (str, os.PathLike)) else list(labels_path)
    if manifest.get("labels_sha256") != sha256_file(files):
        return stale("built from another labels file (sha256 differs from that of "
                     f"{', '.join(map(str, files))})")
    try:
        index = pd.read_csv(folder / INDEX_FILE, dtype={"image_id": str}, keep_default_na=False)
        flags = np.load(folder / DONE_FILE, mmap_mode="r")
        nbytes = (folder / IMAGES_FILE).stat().st_size
    except (FileNotFoundError, ValueError, OSError) as err:
        return stale(f"files missing or unreadable ({err})")
    n = len(index)
    if len(flags) != n or nbytes != n * size * size or manifest.get("count") != n:
        return stale("its files do not match its index")
    todo = int((np.asarray(flags) == TODO).sum())
    if todo or not manifest.get("complete"):
        return stale(f"incomplete ({n - todo} of {n} images done)")
    ids = index["image_id"].tolist()
    skipped = set(manifest.get("skipped", []))
    skipped.update(ids[r] for r in np.flatnonzero(np.asarray(flags) == BAD))
    return Cache(folder, manifest, ids, frozenset(skipped))


# --------------------------------------------------------------------------------------------
# Reading batches
# --------------------------------------------------------------------------------------------
class CachedImages:
    """`loader.dataset` of a CacheLoader: its images as arrays, like a CXRDataset's.

    rows (N,) cache rows, targets (N, K) float32 (NaN = masked), image_ids (N), findings (K).
    """

    def __init__(self, rows: np.ndarray, targets: np.ndarray, image_ids: list[str],
                 findings: Sequence[str] = ()):
        self.rows, self.targets, self.image_ids = rows, targets, image_ids
        self.findings = tuple(findings)

    def __len__(self) -> int:
        return len(self.rows)


_END = object()


class _Raised:
    def __init__(self, err: BaseException):
        self.err = err


def _prefetched(items: Iterable, depth: int) -> Iterator:
    """Produce `items` in a background thread, `depth` ahead of the consumer.

    Useful when numpy/torch release the GIL (copies, pinning); the consumer may stop at any
    time and the thread ends with it.
    """
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(item: object) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def fill() -> None:
        try:
            for item in items:
                if not put(item):
                    return
            put(_END)
        except BaseException as err:  # handed to the consumer, which re-raises it
            put(_Raised(err))

    thread = threading.Thread(target=fill, daemon=True, name="cache-prefetch")
    thread.start()
    try:
        while True:
            item = q.get()
            if item is _END:
                return
            if isinstance(item, _Raised):
                raise item.err
            yield item
    finally:
        stop.set()
        thread.join()


class CacheLoader:
    """Batches of cached images: `(uint8 (B, 1, S, S), targets float32 (B, K), ids list)`.

    The order of an epoch is drawn when iteration starts: from `sampler` when given (e.g.
    retrain's EpochSampler, which may also start part-way through an epoch), else a permutation
    from `generator` (shuffle) or 0..N-1. Batch i holds order[i*B:(i+1)*B], in that order, so
    reseeding `generator` (or setting the sampler's epoch) fixes an epoch's batches exactly as
    it does for a DataLoader over the same images. Each batch is one numpy fancy-index of the
    memory map with sorted rows (sequential reads, no per-image Python work).

    Args:
        cache: an open Cache.
        rows: (N,) cache rows of the images to serve.
        targets: (N, K) float32, NaN = masked.
        ids: N image ids.
        batch_size, shuffle, drop_last: as for a DataLoader.
        generator: torch.Generator for the shuffle.
        sampler: iterable of positions 0..N-1 with a len(), used instead of `shuffle`.
        findings: the K target names (`loader.dataset.findings`, as a CXRDataset has).
        prefetch: batches read ahead in a background thread (0: none).
        pin_memory: pin batches for fast asynchronous copies to a CUDA device.
    """

    def __init__(self, cache: Cache, rows: np.ndarray, targets: np.ndarray, ids: Sequence[str],
                 batch_size: int, shuffle: bool, generator: torch.Generator | None = None,
                 drop_last: bool = False, sampler: Sampler | None = None,
                 findings: Sequence[str] = (), prefetch: int = 0, pin_memory: bool = False):
        rows = np.asarray(rows, dtype=np.int64)
        targets = np.asarray(targets, dtype=np.float32)
        if targets.ndim != 2 or len(targets) != len(rows) or len(ids) != len(rows):
            raise ValueError("rows (N,), targets (N, K) and ids (N) must have the same length")
        if len(rows) and (rows.min() < 0 or rows.max() >= len(cache)):
            raise ValueError(f"rows must be in 0..{len(cache) - 1}")
        self.cache = cache
        self.images = cache.images()
        self.dataset = CachedImages(rows, targets, list(ids), findings)
        self.batch_size, self.shuffle, self.drop_last = batch_size, shuffle, drop_last
        if generator is None:  # like DataLoader: seeded from the global torch RNG
            generator = torch.Generator()
            generator.manual_seed(int(torch.empty((), dtype=torch.int64).random_().item()))
        self.generator, self.sampler = generator, sampler
        self.prefetch, self.pin_memory = prefetch, pin_memory

    def __len__(self) -> int:
        n = len(self.sampler) if self.sampler is not None else len(self.dataset)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def _read(self, positions: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
        rows = self.dataset.rows[positions]
        order = np.argsort(rows, kind="stable")
        pixels = self.images[rows[order]]                   # (B, S, S) uint8, one sorted read
        if not np.array_equal(order, np.arange(len(order))):
            pixels = pixels[np.argsort(order)]              # back to the drawn order
        images = torch.from_numpy(pixels).unsqueeze(1)      # (B, 1, S, S)
        targets = torch.from_numpy(self.dataset.targets[positions])
        if self.pin_memory:
            images, targets = images.pin_memory(), targets.pin_memory()
        return images, targets, [self.dataset.image_ids[p] for p in positions]

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, list[str]]]:
        # The order is drawn here, in the caller's thread: a prefetch thread never touches the
        # generator or the sampler.
        if self.sampler is not None:
            order = np.fromiter(iter(self.sampler), dtype=np.int64)
        elif self.shuffle:
            order = torch.randperm(len(self.dataset), generator=self.generator).numpy()
        else:
            order = np.arange(len(self.dataset))
        b = self.batch_size
        batches = (self._read(order[i:i + b]) for i in range(0, len(self) * b, b))
        return _prefetched(batches, self.prefetch) if self.prefetch > 0 else batches


# --------------------------------------------------------------------------------------------
# What retrain.py calls
# --------------------------------------------------------------------------------------------
def cache_root_and_labels(cfg, table: pd.DataFrame | None = None) -> tuple[Path, list[Path]]:
    """Where a run's cache lives, and the label file(s) its table was read from.

    The label files are `table.attrs['sources']` (set by `nih_table` / `chexphoto_table`);
    without them, the same choice `train.load_tables` makes (`data.resolve_nih_labels`);
    CheXphoto train.csv and valid.csv. CheXphoto's cache is under `find_chexphoto_root(DATA)`.
    """
    data = Path(cfg.data)
    root = find_chexphoto_root(data) if cfg.dataset == "chexphoto" else data
    sources = table.attrs.get("sources") if table is not None else None
    if sources:
        return root, [Path(p) for p in sources]
    if cfg.dataset == "chexphoto":
        return root, [p for p in (root / "train.csv", root / "valid.csv") if p.is_file()]
    return data, [resolve_nih_labels(data, cfg.labels, reference_split=cfg.dataset == "nih")]


def cache_loaders(cfg, table: pd.DataFrame, findings: Sequence[str],
                  train_sampler: Callable[[int], Sampler] | None = None, rank: int = 0,
                  world: int = 1, pin_memory: bool = False) -> dict[str, CacheLoader] | None:
    """train/val/test loaders over the uint8 cache, or None when no valid cache exists.

    Batches are `(uint8 (B, 1, S, S), targets, ids)`, as `train.make_loaders` gives from the
    image files: with `train_sampler=lambda n: EpochSampler(n, cfg.seed, rank, world)` every
    batch is bit-identical to its batch there, so a run is the same with or without the cache
    (the training loop flips and normalises both the same way, `data.model_input`).

    Args:
        cfg: a train.TrainConfig (uses data, dataset, labels, image_size, cache_dir,
            batch_size, eval_batch_size, missing, seed).
        table: `train.load_tables(cfg)[0]`: image_id, fold and the finding columns.
        findings: target columns, in model output order.
        train_sampler: called with the number of training images; orders the training fold
            (default: a shuffle from the loader's generator, seeded with cfg.seed).
        rank, world: this process's place under torchrun. Training batches are
            cfg.batch_size // world (the sampler picks this rank's images); each evaluation
            fold is split into `world` contiguous shards, as `runtime.shard` does.
        pin_memory: pin batches and read one ahead (for a CUDA device).

    Raises:
        DataError: images of the table with no usable cache row (absent when the cache was
            built, or undecodable), unless cfg.missing == 'skip', which drops them.
    """
    root, label_files = cache_root_and_labels(cfg, table)
    size = cfg.image_size
    cache = open_cache(root, size, label_files, cfg.cache_dir)
    if cache is None:
        return None
    row_of = cache.row_of()
    rows = table["image_id"].map(row_of)
    absent = rows.isna().to_numpy()
    if absent.any():
        names = table.loc[absent, "image_id"].tolist()
        if cfg.missing != "skip":
            raise DataError(
                f"{len(names)} of {len(table)} images have no usable row in the cache "
                f"{cache.dir} (first: {', '.join(names[:5])}; see skip.txt there). Rebuild the "
                "cache with the images present, or pass --missing skip to train without them.")
        print(f"cache: leaving out {len(names)} images with no usable cached row "
              f"(first: {', '.join(names[:3])})")
    table = table.loc[~absent]
    rows = rows[~absent].astype(np.int64).to_numpy()
    loaders: dict[str, CacheLoader] = {}
    for fold in ("train", "val", "test"):
        pos = np.flatnonzero((table["fold"] == fold).to_numpy())
        if not len(pos):
            raise DataError(f"the {fold} fold is empty ({len(table)} images in all). Check the "
                            "labels file's fold column, or use more images.")
        train = fold == "train"
        if not train and world > 1:
            pos = np.array_split(pos, world)[rank]
        sampler = train_sampler(len(pos)) if train and train_sampler else None
        loaders[fold] = CacheLoader(
            cache, rows[pos], table[list(findings)].to_numpy(np.float32)[pos],
            table["image_id"].to_numpy()[pos].tolist(),
            cfg.batch_size // world if train else cfg.eval_batch_size, shuffle=train,
            generator=torch.Generator().manual_seed(cfg.seed),
            sampler=sampler,
            drop_last=train and drops_last_batch(len(sampler) if sampler is not None else
                                                 len(pos), cfg.batch_size // world, size),
            findings=findings, prefetch=1 if pin_memory else 0, pin_memory=pin_memory)
    print(f"reading images from the uint8 cache {cache.dir} ({len(cache)} images, "
          f"{size} px)")
    return loaders
