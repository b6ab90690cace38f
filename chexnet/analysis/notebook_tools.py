"""What the notebooks need beyond the library: copying a dataset once, and running a command
with its output streamed into the notebook.

Colab's notebooks run the project's scripts as subprocesses. `subprocess.run(...,
capture_output=True)` showed nothing for hours and then the last lines; `stream` shows the
progress bars as they move. Copying NIH's images from Drive to the local disk takes tens of
minutes; `copy_missing` copies only what is not already there, so re-running the cell costs
nothing.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Sequence, TextIO

from chexnet.files import atomic_write


def copy_missing(src: str | os.PathLike, dst: str | os.PathLike) -> tuple[int, int]:
    """Copy every file under `src` to the same relative path under `dst`, unless a file of
    the same size is already there. A file is copied to a temporary name and renamed, so an
    interrupted copy leaves no half file that a later run would take for a whole one.

    Returns:
        (files copied, files already present).
    """
    src, dst = Path(src), Path(dst)
    if not src.is_dir():
        raise FileNotFoundError(f"{src}: folder not found; nothing to copy.")
    copied = present = 0
    for path in sorted(p for p in src.rglob("*") if p.is_file()):
        target = dst / path.relative_to(src)
        if target.is_file() and target.stat().st_size == path.stat().st_size:
            present += 1
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(target, lambda tmp, path=path: shutil.copyfile(path, tmp))
        copied += 1
    return copied, present


def stream(cmd: Sequence[str], out: TextIO | None = None) -> int:
    """Run `cmd`, writing its stdout and stderr to `out` (default: this process's stdout, which
    a notebook shows live) as they come, carriage returns included so that progress bars
    update in place. Returns the exit status."""
    out = out or sys.stdout
    proc = subprocess.Popen(list(cmd), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert proc.stdout is not None
    while True:
        chunk = proc.stdout.read1(4096)
        if not chunk:
            break
        out.write(chunk.decode(errors="replace"))
        out.flush()
    return proc.wait()
