"""A read-only folder for tests that run as root (where chmod stops nothing), as on a read-only
mount such as Kaggle's /kaggle/input: every write under the folder (open for writing, create,
rename, delete, mkdir) raises PermissionError.

In a test:      refuse_writes(folder, monkeypatch.setattr)
As a wrapper:   python tests/read_only.py FOLDER SCRIPT ARGS...   (SCRIPT runs as __main__)
"""
from __future__ import annotations

import builtins
import errno
import io
import os
import runpy
import sys
from typing import Callable

WRITING_CALLS = ("mkdir", "replace", "rename", "remove", "unlink", "rmdir")


def refuse_writes(folder: str | os.PathLike, setattr_: Callable = setattr) -> None:
    """Patch open/os.open and os's writing calls (with `setattr_`, e.g. monkeypatch.setattr,
    so a test undoes it) to refuse any path under `folder`."""
    top = os.path.realpath(folder)

    def under(path) -> bool:
        if not isinstance(path, (str, bytes, os.PathLike)):
            return False  # a file descriptor
        path = os.path.realpath(os.fsdecode(path))
        return path == top or path.startswith(top + os.sep)

    def deny(path):
        raise PermissionError(errno.EACCES, "Permission denied", os.fsdecode(path))

    real_open, real_os_open = builtins.open, os.open

    def open_(file, mode="r", *args, **kwargs):
        if set(mode) & set("wax+") and under(file):
            deny(file)
        return real_open(file, mode, *args, **kwargs)

    def os_open(path, flags, *args, **kwargs):
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT) and under(path):
            deny(path)
        return real_os_open(path, flags, *args, **kwargs)

    def refusing(real):
        def call(path, *args, **kwargs):
            if under(path) or (args and under(args[0])):
                deny(path)
            return real(path, *args, **kwargs)
        return call

    setattr_(builtins, "open", open_)
    setattr_(io, "open", open_)
    setattr_(os, "open", os_open)
    for name in WRITING_CALLS:
        setattr_(os, name, refusing(getattr(os, name)))


if __name__ == "__main__":
    refuse_writes(sys.argv[1])
    sys.argv = sys.argv[2:]
    runpy.run_path(sys.argv[0], run_name="__main__")
