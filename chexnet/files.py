"""Files written whole or not at all, and file fingerprints: the one place for both.

Every result, checkpoint, cache index, labels file and download the project writes goes through
`atomic_write`: the bytes go to a temporary file beside the target, which is renamed over the
target only once complete (a rename within one folder is atomic on POSIX and Windows). A crash,
a kill or a full disk at any instant leaves either the previous file or the new one, never half
of one.
"""
from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path
from typing import Callable, Sequence

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
