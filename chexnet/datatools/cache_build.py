"""Building the uint8 image cache (its format: chexnet/cache.py): what prepare_data.py runs.

Every image is decoded once, in parallel chunks of at most MAX_CHUNK rows, resized with the
reference geometry (`resize_center_crop`) and written into images.u8; done.npy records each
chunk only once its pixels are flushed, so a killed build resumes where it stopped.
"""
from __future__ import annotations

import concurrent.futures as cf
import json
import os
import shutil
import signal
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import pandas as pd
from PIL import Image
from torchvision.transforms import v2 as T
from tqdm import tqdm

from chexnet.cache import (
    BAD, CACHE_VERSION, DONE, DONE_FILE, IMAGES_FILE, INDEX_FILE, MANIFEST_FILE, SKIP_FILE, TODO,
    read_manifest,
)
from chexnet.data import DataError, ImageReadError, load_xray
from chexnet.files import atomic_write, atomic_write_text

MAX_CHUNK = 64              # images per work unit at most: about 1 s of decoding, 3 MB of pixels


class CacheBuildError(DataError):
    """The build stopped on images that are missing or cannot be decoded; names them."""


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
    manifest = read_manifest(folder)
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
    manifest = read_manifest(folder) if folder.is_dir() else None
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
