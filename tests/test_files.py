"""chexnet/files.py: the one atomic writer and the one sha256, and that nothing else writes
files by renaming or hashes them on its own."""
from __future__ import annotations

import re

import pytest

from chexnet import files
from conftest import ROOT

ABC_SHA256 = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"  # FIPS 180-2


def test_sha256_of_one_file_and_of_files_concatenated(tmp_path):
    (tmp_path / "a").write_bytes(b"a")
    (tmp_path / "bc").write_bytes(b"bc")
    (tmp_path / "abc").write_bytes(b"abc")
    assert files.sha256_file(tmp_path / "abc") == ABC_SHA256
    assert files.sha256_file(str(tmp_path / "abc")) == ABC_SHA256
    assert files.sha256_file([tmp_path / "a", tmp_path / "bc"]) == ABC_SHA256
    assert files.sha256_bytes(b"abc") == ABC_SHA256


def test_sha256_reads_files_larger_than_one_chunk(tmp_path, monkeypatch):
    monkeypatch.setattr(files, "CHUNK", 2)   # "abc" in chunks "ab", "c"
    (tmp_path / "abc").write_bytes(b"abc")
    assert files.sha256_file(tmp_path / "abc") == ABC_SHA256


def test_atomic_write_replaces_only_when_complete(tmp_path):
    target = tmp_path / "out.csv"
    target.write_text("old")

    def half_then_fail(tmp):
        tmp.write_text("ne")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space"):
        files.atomic_write(target, half_then_fail)
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.csv"]
    with pytest.raises(KeyboardInterrupt):   # Ctrl-C mid-write: the same
        files.atomic_write(target, lambda tmp: (tmp.write_text("x"), _raise(KeyboardInterrupt)))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.csv"]
    assert files.atomic_write_text(target, "new é") == target
    assert target.read_bytes() == "new é".encode("utf-8")


def _raise(exc):
    raise exc


def test_the_final_name_appears_only_after_the_write(tmp_path):
    """While the writer runs, the target does not exist yet: readers never see half a file."""
    target = tmp_path / "preds.csv"
    seen = []

    def write(tmp):
        tmp.write_text("a,b\n")
        seen.append(target.exists())

    files.atomic_write(target, write)
    assert seen == [False] and target.read_text() == "a,b\n"


# The resumable download keeps its partial file (<name>.part) across attempts on purpose and
# renames it when complete; it is the one other rename.
RENAME_ALLOWED = {"chexnet/files.py", "chexnet/datatools/download.py"}


def test_no_other_module_renames_files_into_place_or_hashes_them():
    offenders = []
    for path in sorted(ROOT.glob("*.py")) + sorted((ROOT / "chexnet").rglob("*.py")):
        rel = str(path.relative_to(ROOT))
        for no, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#")[0]
            if re.search(r"\bos\.(replace|rename)\(", code) and rel not in RENAME_ALLOWED:
                offenders.append(f"{rel}:{no}: {line.strip()}")
            if re.search(r"\bhashlib\b", code) and rel != "chexnet/files.py":
                offenders.append(f"{rel}:{no}: {line.strip()}")
    assert offenders == []
