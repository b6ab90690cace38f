"""Files written whole or not at all, resumable copies, and file fingerprints: the one place.

Every result, checkpoint, cache index, labels file and download the project writes goes through
`atomic_write`: the bytes go to a temporary file beside the target, which is renamed over the
target only once complete (a rename within one folder is atomic on POSIX and Windows). A crash,
a kill or a full disk at any instant leaves either the previous file or the new one, never half
of one. `copy_resumable` (a cache copied to and from Google Drive, chexnet/datatools/colab.py)
writes
through `<name>.part`, which a later copy continues, and hashes the bytes as they go.
"""
from __future__ import annotations

import hashlib
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from chexnet.cli import CommandError

CHUNK = 1 << 20  # bytes read at a time when hashing


def temp_path(path: Path) -> Path:
    """Where `atomic_write` puts the bytes before the rename: `<name>.tmp` beside `path`."""
    return path.with_name(path.name + ".tmp")


def atomic_write(path: str | os.PathLike, write: Callable[[Path], object]) -> Path:
    """Call `write(tmp)` to fill a temporary file beside `path`, then rename it over `path`.

    Raises:
        Whatever `write` or the rename raise (OSError for a full disk or a read-only folder);
        the temporary file is removed first, and a previous file at `path` is untouched.
    """
    path = Path(path)
    tmp = temp_path(path)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:  # also KeyboardInterrupt: remove the temp file, then re-raise
        tmp.unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """`text` (UTF-8) to `path`, atomically."""
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def move_into_place(src: str | os.PathLike, dest: str | os.PathLike) -> Path:
    """Rename a finished, checked file `src` to `dest` in one step (same filesystem: atomic),
    e.g. a download verified in a staging folder beside its destination."""
    os.replace(src, dest)
    return Path(dest)


def probe_writable(folder: str | os.PathLike) -> None:
    """Create and delete a scratch file in `folder`. Raises the OSError a real write would
    (read-only mount, full disk), which os.access does not see for root. Lets a command refuse
    an unwritable output before its work, not after."""
    with tempfile.TemporaryFile(dir=folder):
        pass


def sha256_bytes(data: bytes) -> str:
    """Hex sha256 of bytes in memory (e.g. an array's buffer)."""
    return hashlib.sha256(data).hexdigest()


def sha256_file(paths: str | os.PathLike | Sequence[str | os.PathLike]) -> str:
    """Hex sha256 of a file's bytes, or of several files' bytes concatenated in order."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    digest = hashlib.sha256()
    for p in paths:
        with open(p, "rb") as fh:
            for block in iter(lambda: fh.read(CHUNK), b""):
                digest.update(block)
    return digest.hexdigest()


@dataclass(frozen=True)
class Copied:
    """What `copy_resumable` did: bytes copied this time (a resumed copy: only the rest) and
    the sha256 of the whole file as written."""
    bytes: int
    sha256: str


def copy_resumable(src: str | os.PathLike, dst: str | os.PathLike,
                   progress: Callable[[int], object] | None = None) -> Copied:
    """Copy `src` to `dst` through `<dst>.part`, continuing a `.part` that an interrupted copy
    left (its bytes are kept and hashed, the rest read from `src`), then rename it over `dst`.
    `dst` is never a half file. `progress(n)` is called with each block's byte count.

    The returned sha256 is that of the bytes in `dst`; compare it with a recorded one, since
    a `.part` left from an older `src` is only caught that way.

    Raises:
        OSError: reading, writing (a full disk) or `src` changing size while copied.
    """
    src, dst = Path(src), Path(dst)
    part = dst.with_name(dst.name + ".part")
    total = src.stat().st_size
    have = part.stat().st_size if part.is_file() else 0
    if have > total:  # not a prefix of this file
        part.unlink()
        have = 0
    digest = hashlib.sha256()
    if have:
        with open(part, "rb") as fh:
            for block in iter(lambda: fh.read(CHUNK), b""):
                digest.update(block)
    with open(src, "rb") as fin, open(part, "ab") as fout:
        fin.seek(have)
        for block in iter(lambda: fin.read(8 * CHUNK), b""):
            fout.write(block)
            digest.update(block)
            if progress is not None:
                progress(len(block))
        fout.flush()
        os.fsync(fout.fileno())
    if part.stat().st_size != total:
        raise OSError(f"{src}: its size changed while it was copied ({total:,} bytes before, "
                      f"{part.stat().st_size:,} copied); copy it again.")
    os.replace(part, dst)
    return Copied(total - have, digest.hexdigest())


# ---------------------------------------------------------------------------------------------
# The output policy of every command: nothing destroys what it did not make
# ---------------------------------------------------------------------------------------------
# What makes a folder a run (any one of them), and the files only retrain.py writes there: the
# run's record, which no other command replaces (their own outputs, e.g. eval_model.py's
# aucs.csv, can be re-derived from this record and may be rewritten).
RUN_MARKERS = ("config.json", "checkpoint.pt", "preds.csv", "log_train.csv", "last.pt")
RUN_RECORD = RUN_MARKERS + ("run_record.json", "val_preds.csv")


def is_run_folder(folder: str | os.PathLike) -> bool:
    """True when `folder` holds any of a run's files (not only last.pt: a run whose last.pt
    was deleted is still a run)."""
    return any((Path(folder) / name).exists() for name in RUN_MARKERS)


def same_path(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """Do `a` and `b` name the same file (through links, `..` or a relative path)?"""
    a, b = Path(a), Path(b)
    try:
        if a.exists() and b.exists():
            return os.path.samefile(a, b)
    except OSError:
        pass
    return a.resolve() == b.resolve()


class OutputRefused(CommandError):
    """An output path that would destroy an input or a run's record (exit 2)."""


def check_outputs(outputs: dict[str, str | os.PathLike | None],
                  inputs: dict[str, str | os.PathLike | None], overwrite: bool | None = None,
                  folders: Sequence[str] = ()) -> None:
    """Refuse, before any work, an output that is one of the command's inputs, or a file of a
    run's record (`RUN_RECORD` in a run folder) that this command would replace. Every command
    that writes calls this with its outputs and inputs, each under the name the user gave it
    (e.g. {"--out": "aucs.csv"}); `overwrite` (a command's --overwrite; None for a command
    without one) allows replacing a run's file, never an input. An output that is an existing
    folder is refused too (a figure would silently go to FOLDER.png beside it), unless its
    label is in `folders` (an output that is a folder, e.g. predict.py --heatmap), which in
    turn is refused when it is an existing file.

    Raises:
        OutputRefused (a chexnet.cli.CommandError): naming the output and what to do.
    """
    for label, out in outputs.items():
        if out is None:
            continue
        out = Path(out)
        if label not in folders and out.is_dir():
            raise OutputRefused(f"{label} {out} is a folder: give the path of a file (e.g. "
                                f"{out / 'out.png'}).")
        if label in folders and out.exists() and not out.is_dir():
            raise OutputRefused(f"{label} {out} is a file: give the path of a folder (new or "
                                "existing).")
        for in_label, given in inputs.items():
            if given is not None and same_path(out, given):
                raise OutputRefused(
                    f"{label} {out} is also this command's input ({in_label}): writing it would "
                    "destroy that input. Choose another output path.")
        if not overwrite and out.name in RUN_RECORD and is_run_folder(out.parent):
            raise OutputRefused(
                f"{label} {out}: {out.parent} holds a run's files ("
                + ", ".join(n for n in RUN_MARKERS if (out.parent / n).exists())
                + f"), so it is treated as a run folder, and {out.name} is part of a run's "
                "record (only retrain.py writes it). Choose another output path"
                + (", or pass --overwrite." if overwrite is not None else "."))


def run_files(folder: str | os.PathLike | None) -> dict[str, Path]:
    """A run folder's record files, as `check_outputs` inputs (for a command that reads a run)."""
    if folder is None:
        return {}
    return {str(Path(folder) / name): Path(folder) / name for name in RUN_RECORD}
