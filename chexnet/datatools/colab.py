"""A Colab VM reset that costs minutes: the uint8 cache kept on Google Drive and copied back.

A reset wipes the VM's local disk. Training reads only the cache (224 px: 5.6 GB, one file, for
all of NIH), so that is all a new session needs back; copying the ~42 GB of images again from
Drive and decoding 112,120 PNGs into a new cache is what a reset used to cost (BENCHMARKS.md,
"A Colab reset", has the minutes). `notebooks/Retrain_colab.ipynb` does:

    restored = restore_cache(DRIVE_CACHE, DATA, IMAGE_SIZE)  # copy the cache back, if saved
    if not restored.ok:                                      # says why not
        ...the images to the local disk, prepare_data.py...
        save_cache(DATA, IMAGE_SIZE, DRIVE_CACHE)            # once, for the next reset

On Drive, the folder (e.g. MyDrive/chexnet_cache/nih-224) holds the cache's files (images.u8,
index.csv, done.npy, manifest.json, skip.txt: see chexnet/cache.py), the labels file it was
built with (nih_labels.csv) and `copies.json`, written last, with each file's size and sha256.
A folder without copies.json (a save that was interrupted) is not used. Every copy goes
through a `.part` file that a later copy continues (`files.copy_resumable`), and every copied
file is checked against copies.json's sha256: a damaged file is refused, never trained on.
After the copy, retrain.py checks the cache itself as always (its manifest, the labels' sha256),
and trains from it without the images (`loaders.load_tables(..., from_cache=True)`).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from tqdm import tqdm

from chexnet.cache import (
    DONE_FILE, IMAGES_FILE, INDEX_FILE, MANIFEST_FILE, SKIP_FILE, cache_dir,
)
from chexnet.files import atomic_write_text, copy_resumable, sha256_file

COPIES_FILE = "copies.json"
CACHE_FILES = (IMAGES_FILE, INDEX_FILE, DONE_FILE, MANIFEST_FILE, SKIP_FILE)
LABELS_FILE = "nih_labels.csv"  # prepare_data.py writes DATA/nih_labels.csv


@dataclass
class Restored:
    """What `restore_cache` did. `ok`: the cache is on the local disk, checked; else `reason`
    says why not (the notebook then prepares the cache from the images)."""
    ok: bool
    reason: str = ""
    bytes_copied: int = 0
    copied: list[str] = field(default_factory=list)   # files copied (or finished) this time
    present: list[str] = field(default_factory=list)  # already on the local disk, checked


def _local_paths(data: Path, size: int) -> dict[str, Path]:
    """Each saved file's place on the local disk: the cache under DATA/cache/<size>/, the
    labels file at DATA/nih_labels.csv (where retrain.py looks for it by default)."""
    folder = cache_dir(data, size)
    return {**{name: folder / name for name in CACHE_FILES}, LABELS_FILE: data / LABELS_FILE}


def _bar(total: int, what: str) -> tqdm:
    return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=what,
                mininterval=1.0)


def _copy_checked(src: Path, dst: Path, want: str | None) -> tuple[int, str]:
    """Copy src to dst (resuming a `.part`); with `want`, check the sha256 and, when a
    resumed copy does not match (a .part from older bytes), copy once more from the start.
    Returns the bytes copied and the sha256 of dst. Raises ValueError when the bytes do not
    hash to `want`."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    copied = 0
    for attempt in (1, 2):
        with _bar(src.stat().st_size, src.name) as bar:
            part = dst.with_name(dst.name + ".part")
            bar.update(part.stat().st_size if part.is_file() else 0)
            done = copy_resumable(src, dst, bar.update)
        copied += done.bytes
        if want is None or done.sha256 == want:
            return copied, done.sha256
        resumed = done.bytes < src.stat().st_size
        dst.unlink()
        if not resumed or attempt == 2:
            raise ValueError(f"{src}: its bytes do not match the sha256 that {COPIES_FILE} "
                             "records for it (damaged on Drive, or changed since it was saved)")
    raise AssertionError("unreachable")


def save_cache(data: str | os.PathLike, size: int, drive: str | os.PathLike) -> int:
    """Copy the complete local cache of DATA at `size` and its labels file to the Drive folder
    `drive`, then write `copies.json` there. Files already on Drive with the recorded size and
    sha256 are not copied again. Returns the bytes copied.

    Raises:
        FileNotFoundError: no complete cache (or no labels file) on the local disk.
    """
    data, drive = Path(data), Path(drive)
    local = _local_paths(data, size)
    manifest_path = local[MANIFEST_FILE]
    if not manifest_path.is_file() or not json.loads(manifest_path.read_text()).get("complete"):
        raise FileNotFoundError(f"{manifest_path.parent}: no complete cache to save; run "
                                "prepare_data.py first.")
    if not local[LABELS_FILE].is_file():
        raise FileNotFoundError(f"{local[LABELS_FILE]}: the labels file the cache was built "
                                "with is not there.")
    drive.mkdir(parents=True, exist_ok=True)
    old = _read_copies(drive)
    (drive / COPIES_FILE).unlink(missing_ok=True)  # until all is copied, the folder is unusable
    record, copied = {}, 0
    for name, path in local.items():
        size, there = path.stat().st_size, drive / name
        before = (old or {}).get(name)
        if before and before["size"] == size and there.is_file() and \
                there.stat().st_size == size and sha256_file(path) == before["sha256"]:
            record[name] = before  # on Drive already, unchanged
            continue
        # Each byte is read once: the copy hashes what it writes. Only a .part left on Drive
        # (older bytes, perhaps) needs the source's own hash to check the resumed copy.
        resumes = there.with_name(there.name + ".part").is_file()
        got, sha = _copy_checked(path, there, sha256_file(path) if resumes else None)
        record[name] = {"size": size, "sha256": sha}
        copied += got
    atomic_write_text(drive / COPIES_FILE, json.dumps({
        "files": record, "image_size": int(size), "labels": LABELS_FILE,
        "saved": datetime.now(timezone.utc).isoformat(timespec="seconds")}, indent=1) + "\n")
    print(f"cache saved to {drive}: {copied:,} bytes copied ({len(record)} files, "
          f"{sum(r['size'] for r in record.values()):,} bytes in all)")
    return copied


def _read_copies(drive: Path) -> dict | None:
    """copies.json's files (name -> size, sha256); None when it is absent or not one that
    save_cache wrote (unreadable, truncated, edited into another shape)."""
    try:
        files = json.loads((drive / COPIES_FILE).read_text())["files"]
        if all(isinstance(r["size"], int) and isinstance(r["sha256"], str)
               for r in files.values()):
            return files
    except (OSError, KeyError, TypeError, ValueError, AttributeError):
        pass
    return None


def restore_cache(drive: str | os.PathLike, data: str | os.PathLike, size: int) -> Restored:
    """Copy the cache saved in the Drive folder `drive` (by `save_cache`) to DATA's local cache
    folder, and its labels file to DATA/nih_labels.csv. Each file is checked against the
    sha256 in copies.json; one already on the local disk with that hash is not copied.

    Returns a `Restored`: ok, or not ok with the reason (nothing saved on Drive yet, an
    interrupted save, a damaged or changed file, a local labels file that is another one).
    Nothing is left half-copied: an interrupted copy leaves a `.part` that the next call
    continues.
    """
    drive, data = Path(drive), Path(data)
    files = _read_copies(drive)
    if files is None:
        why = ("no cache saved on Drive yet" if not drive.exists()
               else f"{drive} has no readable {COPIES_FILE} (a save that did not finish)")
        return Restored(False, why)
    local = _local_paths(data, size)
    if set(files) != set(local):
        return Restored(False, f"{drive / COPIES_FILE} lists {sorted(files)}, not the files of "
                        f"a {size} px cache")
    for name, want in files.items():
        there = drive / name
        if not there.is_file() or there.stat().st_size != want["size"]:
            have = there.stat().st_size if there.is_file() else "no"
            return Restored(False, f"{there}: {have} bytes on Drive, {COPIES_FILE} says "
                            f"{want['size']:,}")
    labels = local[LABELS_FILE]
    if labels.is_file() and sha256_file(labels) != files[LABELS_FILE]["sha256"]:
        return Restored(False, f"{labels} is another labels file than the one the Drive cache "
                        "was built with (sha256 differs); it is kept, and the cache is "
                        "prepared for it")
    done = Restored(True)
    for name, want in files.items():
        path = local[name]
        if path.is_file() and path.stat().st_size == want["size"] and \
                sha256_file(path) == want["sha256"]:
            done.present.append(name)
            continue
        try:
            done.bytes_copied += _copy_checked(drive / name, path, want["sha256"])[0]
        except ValueError as err:
            return Restored(False, str(err), done.bytes_copied, done.copied, done.present)
        done.copied.append(name)
    print(f"cache restored from {drive} to {local[IMAGES_FILE].parent}: "
          f"{done.bytes_copied:,} bytes copied ({', '.join(done.copied) or 'nothing'}; "
          f"already here and checked: {', '.join(done.present) or 'nothing'})")
    return done
