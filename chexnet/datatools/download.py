#!/usr/bin/env python3
"""Download (and optionally extract) the NIH ChestX-ray14 image archives.

The NIH release ships its 112,120 frontal chest X-rays as twelve archives,
``images_001.tar.gz`` .. ``images_012.tar.gz`` (about 42 GB in total). Each
archive holds ``images/<Image Index>.png`` entries: 4,999 images in 001,
10,000 in each of 002-011 and 7,121 in 012.

Compared with the one-shot ``urlretrieve`` loop of the official release, this
script:

* shows a byte progress bar per file (on stderr);
* writes into ``NAME.part`` and atomically renames to ``NAME`` only once the
  whole file has arrived, so a half-written archive never looks complete;
* resumes interrupted downloads with an HTTP ``Range`` request (and copes with
  servers that ignore ``Range`` or answer ``416``);
* records the expected size in a ``NAME.json`` sidecar so completeness can be
  checked offline, and skips archives that are already complete;
* checks every archive (size plus a full gzip/tar stream read) and downloads a
  corrupt one again, once;
* optionally extracts all archives into one folder, idempotently, refusing any
  tar member that is not a regular file under ``images/``.

Usage examples::

    # everything, into data/ (archives only)
    python nih_batch_download_zips.py --out data

    # archives 1, 3 and 12, then extract: PNGs land in data/images/*.png
    python nih_batch_download_zips.py --out data --only 1 3 12 --extract

    # extract and remove each archive once it has been unpacked
    python nih_batch_download_zips.py --out data --extract --delete-archives

    # use a mirror: a text file with one "filename url" pair per line
    python nih_batch_download_zips.py --out data --url-list mirror.txt

Re-running the same command is always safe: complete archives are skipped,
partial ones are resumed and extracted archives are not unpacked again.

Exit status: 0 on success, 2 on any expected failure, as every command of the
project: a download that failed (network or HTTP error; the ``.part`` file is
kept so that a re-run resumes), an archive still corrupt after one re-download,
an unsafe archive, or a bad command line. Each is named on stderr.
"""

from __future__ import annotations

import argparse
import gzip
import http.client
import json
import os
import re
import shutil
import sys
import tarfile
import time
import urllib.error
import urllib.request
import zlib
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Iterable, Optional, Sequence

from tqdm import tqdm

from chexnet.cli import CommandError, NON_NEGATIVE, POSITIVE, command, integer
from chexnet.files import atomic_write, atomic_write_text, check_outputs

# (filename, url) for the 12 archives, in release order. Source: the NIH
# ChestX-ray14 release's batch_download_zips.py (as copied into
# jrzech/reproduce-chexnet as nih_batch_download_zips.py).
NIH_ARCHIVES: tuple[tuple[str, str], ...] = (
    ("images_001.tar.gz", "https://nihcc.box.com/shared/static/vfk49d74nhbxq3nqjg0900w5nvkorp5c.gz"),
    ("images_002.tar.gz", "https://nihcc.box.com/shared/static/i28rlmbvmfjbl8p2n3ril0pptcmcu9d1.gz"),
    ("images_003.tar.gz", "https://nihcc.box.com/shared/static/f1t00wrtdk94satdfb9olcolqx20z2jp.gz"),
    ("images_004.tar.gz", "https://nihcc.box.com/shared/static/0aowwzs5lhjrceb3qp67ahp0rd1l1etg.gz"),
    ("images_005.tar.gz", "https://nihcc.box.com/shared/static/v5e3goj22zr6h8tzualxfsqlqaygfbsn.gz"),
    ("images_006.tar.gz", "https://nihcc.box.com/shared/static/asi7ikud9jwnkrnkj99jnpfkjdes7l6l.gz"),
    ("images_007.tar.gz", "https://nihcc.box.com/shared/static/jn1b4mw4n6lnh74ovmcjb8y48h8xj07n.gz"),
    ("images_008.tar.gz", "https://nihcc.box.com/shared/static/tvpxmn7qyrgl0w8wfh9kqfjskv6nmm1j.gz"),
    ("images_009.tar.gz", "https://nihcc.box.com/shared/static/upyy3ml7qdumlgk2rfcvlb9k6gvqq2pj.gz"),
    ("images_010.tar.gz", "https://nihcc.box.com/shared/static/l6nilvfa9cg3s28tqv1qc1olm3gnz54p.gz"),
    ("images_011.tar.gz", "https://nihcc.box.com/shared/static/hhq8fkdgvcari67vfhs7ppg2w6ni4jze.gz"),
    ("images_012.tar.gz", "https://nihcc.box.com/shared/static/ioqwiy20ihqwyr8pf4c24eazhh281pbu.gz"),
)

# Images per archive in the official release (informational; used in messages).
NIH_IMAGE_COUNTS: dict[str, int] = {
    name: (4999 if i == 1 else 7121 if i == 12 else 10000)
    for i, (name, _) in enumerate(NIH_ARCHIVES, start=1)
}

CHUNK_SIZE = 1 << 20  # 1 MiB: large enough for throughput, small enough for a smooth bar
DEFAULT_RETRIES = 3
DEFAULT_TIMEOUT = 60.0
DEFAULT_BACKOFF = 2.0
USER_AGENT = "chexnet-nih-downloader/1.0 (+urllib)"

EXIT_OK = 0
EXIT_FAILED = 2  # a corrupt or unsafe archive (exit 1 is Python's, for a traceback)
EXIT_NETWORK = 2

# Errors that mean "the transfer did not work this time" and are worth
# retrying. http.client.HTTPException covers IncompleteRead (connection closed
# before Content-Length bytes arrived); OSError covers URLError, refused or
# reset connections, DNS failures and socket timeouts.
_NETWORK_ERRORS = (OSError, http.client.HTTPException)


class DownloadError(CommandError, RuntimeError):
    """A file could not be downloaded after all retries.

    Attributes:
        filename: Name of the archive being downloaded.
        url: URL it was downloaded from.
        part: Path of the partial file left on disk (may not exist).
        connection_failed: True when the server could not be reached or the
            connection broke (as opposed to an HTTP error status such as 404).
    """

    def __init__(self, message: str, filename: str, url: str, part: Path,
                 connection_failed: bool) -> None:
        super().__init__(message)
        self.filename = filename
        self.url = url
        self.part = part
        self.connection_failed = connection_failed


class ArchiveCorruptError(CommandError, ValueError):
    """An archive has the wrong size or its gzip/tar stream is damaged."""


class UnsafeArchiveError(CommandError, ValueError):
    """An archive contains a member that is not a regular file under images/."""


class _TransferInterrupted(Exception):
    """Internal: one download attempt failed in a retryable way."""

    def __init__(self, reason: str, connection_failed: bool = True) -> None:
        super().__init__(reason)
        self.reason = reason
        self.connection_failed = connection_failed


# --------------------------------------------------------------------------
# Sidecar metadata
# --------------------------------------------------------------------------

def sidecar_path(dest: Path) -> Path:
    """Return the path of the JSON sidecar that records ``dest``'s expected size.

    Args:
        dest: Final path of the archive.

    Returns:
        ``dest`` with ``.json`` appended (``images_001.tar.gz.json``).
    """
    return dest.with_name(dest.name + ".json")


def read_sidecar(dest: Path) -> dict:
    """Read the sidecar of ``dest``.

    Args:
        dest: Final path of the archive.

    Returns:
        The recorded metadata (keys ``url`` and ``size``), or ``{}`` if there
        is no readable sidecar.
    """
    path = sidecar_path(dest)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (ValueError, OSError):
        # A damaged sidecar only costs us the offline size check; the archive
        # itself is still verified by reading its stream.
        return {}
    return data if isinstance(data, dict) else {}


def write_sidecar(dest: Path, url: str, size: Optional[int]) -> None:
    """Atomically record the expected size of ``dest``.

    Args:
        dest: Final path of the archive.
        url: URL the size was learned from.
        size: Total size in bytes, or None when the server did not say.
    """
    path = sidecar_path(dest)
    atomic_write_text(path, json.dumps({"url": url, "size": size}) + "\n")


# --------------------------------------------------------------------------
# Downloading
# --------------------------------------------------------------------------

_CONTENT_RANGE_RE = re.compile(r"bytes\s+(\d+)-(\d+)/(\d+|\*)")
_UNSATISFIED_RANGE_RE = re.compile(r"bytes\s+\*/(\d+)")


def _parse_content_range(value: Optional[str]) -> tuple[Optional[int], Optional[int]]:
    """Parse a 206 ``Content-Range`` header.

    Args:
        value: Header value such as ``bytes 100-199/200``.

    Returns:
        (first byte offset, total size); either may be None if unknown.
    """
    if not value:
        return None, None
    match = _CONTENT_RANGE_RE.match(value.strip())
    if not match:
        return None, None
    total = None if match.group(3) == "*" else int(match.group(3))
    return int(match.group(1)), total


def _truncate(path: Path) -> None:
    """Empty ``path`` (creating it if needed) so a download restarts at byte 0."""
    with open(path, "wb"):
        pass


def _open(url: str, offset: int, timeout: float) -> http.client.HTTPResponse:
    """Send the GET request, asking for ``bytes=offset-`` when resuming.

    Args:
        url: URL to fetch.
        offset: Number of bytes already on disk.
        timeout: Socket timeout in seconds (connect and every read).

    Returns:
        The open response (status 200 or 206).

    Raises:
        urllib.error.HTTPError: For HTTP error statuses (including 416).
        OSError: For connection-level failures.
    """
    headers = {"User-Agent": USER_AGENT}
    if offset > 0:
        headers["Range"] = f"bytes={offset}-"
    request = urllib.request.Request(url, headers=headers)
    return urllib.request.urlopen(request, timeout=timeout)


def _describe(exc: BaseException) -> str:
    """Human-readable one-liner for a network exception."""
    if isinstance(exc, urllib.error.URLError) and not isinstance(exc, urllib.error.HTTPError):
        return f"{type(exc.reason).__name__}: {exc.reason}"
    if isinstance(exc, http.client.IncompleteRead):
        return (f"connection closed early ({len(exc.partial)} bytes of the "
                f"last read received)")
    return f"{type(exc).__name__}: {exc}"


def _one_attempt(url: str, dest: Path, part: Path, timeout: float,
                 progress: bool) -> None:
    """Run a single download attempt, resuming from ``part`` when possible.

    On success ``part`` holds the complete file (it is not renamed here).

    Args:
        url: URL to fetch.
        dest: Final archive path (used for the sidecar and the bar label).
        part: Partial-download path.
        timeout: Socket timeout in seconds.
        progress: Whether to show a tqdm bar on stderr.

    Raises:
        _TransferInterrupted: The attempt failed in a retryable way; bytes
            received so far are kept in ``part``.
        DownloadError: A non-retryable HTTP error (e.g. 404).
    """
    offset = part.stat().st_size if part.exists() else 0
    recorded = read_sidecar(dest)
    response = _open_resumed(url, dest, part, offset, recorded, timeout)
    if response is None:  # the part file was already complete
        return
    with response:
        offset, total = _check_response(response, url, dest, part, offset, recorded)
        _copy_body(response, dest, part, offset, total, progress)
    size = part.stat().st_size
    if total is not None and size != total:
        # Some Python versions return b"" instead of raising IncompleteRead
        # when the peer closes early, so check the byte count ourselves.
        if size > total:
            _truncate(part)
        raise _TransferInterrupted(
            f"connection closed after {size} of {total} bytes")
    if total is None:
        # No size advertised: remember what we got so later runs can still
        # check the size offline.
        write_sidecar(dest, url, size)


def _open_resumed(url: str, dest: Path, part: Path, offset: int, recorded: dict,
                  timeout: float):
    """The response to a request from `offset`, or None when the server says the part file is
    already the whole file. HTTP errors become retryable or final errors."""
    try:
        response = _open(url, offset, timeout)
    except urllib.error.HTTPError as exc:
        exc.close()
        if exc.code == 416 and offset > 0:
            # The server says our offset is at/after the end. If the part file
            # has exactly the advertised size, it is already complete;
            # otherwise it is stale (e.g. the file changed) and we start over.
            match = _UNSATISFIED_RANGE_RE.match(exc.headers.get("Content-Range", "") or "")
            total = int(match.group(1)) if match else recorded.get("size")
            if total is not None and offset == total:
                write_sidecar(dest, url, total)
                return None
            _truncate(part)
            raise _TransferInterrupted(
                "server rejected the resume offset (HTTP 416); restarting from zero",
                connection_failed=False) from exc
        if exc.code >= 500 or exc.code in (408, 429):
            raise _TransferInterrupted(f"HTTP {exc.code} {exc.reason}",
                                       connection_failed=False) from exc
        raise DownloadError(
            f"HTTP {exc.code} {exc.reason} for {dest.name} from {url}",
            dest.name, url, part, connection_failed=False) from exc
    except _NETWORK_ERRORS as exc:
        raise _TransferInterrupted(_describe(exc)) from exc
    return response


def _check_response(response, url: str, dest: Path, part: Path, offset: int,
                    recorded: dict) -> tuple[int, int | None]:
    """Whether the body continues the part file (206 with our range) or replaces it (200);
    returns (offset the body starts at, total size or None) and records the size."""
    length_header = response.headers.get("Content-Length")
    body_length = int(length_header) if length_header and length_header.isdigit() else None
    if response.status == 206:
        start, total = _parse_content_range(response.headers.get("Content-Range"))
        previous = recorded.get("size")
        changed = previous is not None and total is not None and previous != total
        if start != offset or changed:
            # Either a range we did not ask for, or the file on the server
            # changed size since we started: the bytes on disk cannot be
            # trusted to line up, so restart cleanly.
            _truncate(part)
            raise _TransferInterrupted(
                "server sent an unexpected range or the file changed size; restarting from "
                "zero",
                connection_failed=False)
    else:
        # 200: either a fresh download or a server that ignores Range. In
        # the latter case the body starts at byte 0, so drop what we had.
        if offset > 0:
            _truncate(part)
            offset = 0
        total = body_length
    if total is not None or not recorded:
        write_sidecar(dest, url, total)
    return offset, total


def _copy_body(response, dest: Path, part: Path, offset: int, total: int | None,
               progress: bool) -> None:
    """Append the body to the part file, with a progress bar."""
    bar = tqdm(total=total, initial=offset, unit="B", unit_scale=True,
               unit_divisor=1024, desc=dest.name, file=sys.stderr,
               disable=not progress, leave=True)
    with bar, open(part, "ab") as out:
        while True:
            try:
                chunk = response.read(CHUNK_SIZE)
            except _NETWORK_ERRORS as exc:
                raise _TransferInterrupted(_describe(exc)) from exc
            if not chunk:
                break
            # Disk errors from write() are deliberately not caught: they
            # are not network problems and retrying would not help.
            out.write(chunk)
            bar.update(len(chunk))


def download_file(url: str, dest: Path | str, retries: int = DEFAULT_RETRIES,
                  timeout: float = DEFAULT_TIMEOUT, backoff: float = DEFAULT_BACKOFF,
                  progress: bool = True) -> Path:
    """Download ``url`` to ``dest`` via ``dest.part``, resuming if possible.

    Bytes go to ``NAME.part``; an existing part file is resumed with a
    ``Range: bytes=N-`` request. Only when all bytes have arrived is the part
    file renamed to ``dest`` with ``os.replace`` (atomic on one filesystem).
    The expected size is written to the ``NAME.json`` sidecar.

    Args:
        url: URL to fetch (http, https or file).
        dest: Final path of the downloaded file.
        retries: Extra attempts after the first one fails.
        timeout: Socket timeout in seconds for connecting and for each read.
        backoff: Base delay in seconds between attempts (doubles each time;
            0 disables waiting, which tests use).
        progress: Show a tqdm byte progress bar on stderr.

    Returns:
        ``dest`` as a Path.

    Raises:
        DownloadError: All attempts failed. The message names the file and
            URL; the partial file is kept so that a re-run resumes.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    attempts = max(0, retries) + 1
    last: Optional[_TransferInterrupted] = None
    for attempt in range(attempts):
        if attempt and backoff > 0:
            # Exponential backoff gives a flaky link or busy server time to
            # recover instead of hammering it.
            time.sleep(backoff * 2 ** (attempt - 1))
        try:
            _one_attempt(url, dest, part, timeout, progress)
        except _TransferInterrupted as exc:
            last = exc
            print(f"[{dest.name}] attempt {attempt + 1}/{attempts} failed: {exc.reason}",
                  file=sys.stderr)
            continue
        os.replace(part, dest)
        return dest

    assert last is not None
    kept = part.stat().st_size if part.exists() else 0
    if kept:
        kept_note = f"The partial file {part} ({kept} bytes) was kept"
    else:
        kept_note = f"No data was received yet (partial file: {part})"
    raise DownloadError(
        f"failed to download {dest.name} from {url} after {attempts} attempt(s): "
        f"{last.reason}. {kept_note}; re-running the same command resumes the download.",
        dest.name, url, part, connection_failed=last.connection_failed)


# --------------------------------------------------------------------------
# Verification and extraction
# --------------------------------------------------------------------------

def verify_archive(path: Path | str, expected_size: Optional[int] = None) -> None:
    """Check that an archive is complete and its gzip/tar stream is intact.

    The size is compared with ``expected_size`` or, if not given, with the
    size recorded in the sidecar (skipped when neither is known). Then the
    whole file is streamed through gzip (which checks the CRC and length
    trailer) and tarfile (which checks every header and member length)
    without writing anything to disk.

    Args:
        path: Archive to check.
        expected_size: Expected byte size, overriding the sidecar.

    Raises:
        ArchiveCorruptError: Size mismatch, truncated or damaged stream, or an
            archive without members. The message starts with the file name.
        FileNotFoundError: ``path`` does not exist.
    """
    path = Path(path)
    if expected_size is None:
        expected_size = read_sidecar(path).get("size")
    actual = path.stat().st_size
    if expected_size is not None and actual != expected_size:
        raise ArchiveCorruptError(
            f"{path.name}: size is {actual} bytes, expected {expected_size}")
    members = 0
    try:
        with gzip.open(path, "rb") as gz:
            with tarfile.open(fileobj=gz, mode="r|") as tar:
                for member in tar:
                    members += 1
                    if member.isreg():
                        # Reading the data makes tarfile notice a member
                        # whose body is shorter than its header claims.
                        src = tar.extractfile(member)
                        if src is not None:
                            while src.read(CHUNK_SIZE):
                                pass
            # tarfile stops at the end-of-archive blocks; drain the rest so
            # gzip reaches its trailer and validates CRC32 and length.
            while gz.read(CHUNK_SIZE):
                pass
    except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile) as exc:
        raise ArchiveCorruptError(f"{path.name}: {type(exc).__name__}: {exc}") from exc
    if members == 0:
        raise ArchiveCorruptError(f"{path.name}: archive contains no members")


def _safe_member_path(member: tarfile.TarInfo) -> Optional[PurePosixPath]:
    """Validate a tar member; return its relative path, or None to skip it.

    Only regular files under ``images/`` are accepted; plain directory
    entries for ``images`` itself are skipped silently.

    Args:
        member: Member to check.

    Returns:
        The member's relative path, or None for a harmless directory entry.

    Raises:
        UnsafeArchiveError: Links, devices, absolute paths, ``..``
            components or anything outside ``images/``.
    """
    name = member.name
    rel = PurePosixPath(name)
    bad_name = ("\\" in name or rel.is_absolute() or ".." in rel.parts
                or not rel.parts or rel.parts[0] != "images")
    if member.isdir() and not bad_name and len(rel.parts) == 1:
        return None
    if bad_name or not member.isreg() or len(rel.parts) < 2:
        kind = "regular file" if member.isreg() else "non-regular member"
        raise UnsafeArchiveError(
            f"refusing {kind} {name!r}: only regular files under images/ are allowed")
    return rel


def extraction_marker(archive: Path | str, dest: Path | str) -> Path:
    """Return the marker file that says ``archive`` was fully extracted to ``dest``.

    Args:
        archive: Archive path (only its name is used).
        dest: Extraction root.

    Returns:
        ``dest/.extracted/<archive name>.done``.
    """
    return Path(dest) / ".extracted" / f"{Path(archive).name}.done"


def extract_archive(path: Path | str, dest: Path | str, progress: bool = True) -> int:
    """Extract the regular files under ``images/`` from an archive into ``dest``.

    Idempotent: when the marker for this archive exists in ``dest`` nothing
    is done. Each file is written to a temporary name and renamed, so an
    interrupted extraction never leaves a truncated PNG under its real name.
    The marker is written only after the last member, so an interrupted run
    extracts the archive again next time.

    Args:
        path: Archive to extract.
        dest: Extraction root; members land in ``dest/images/``.
        progress: Show a tqdm file counter on stderr.

    Returns:
        Number of files extracted (0 if it had already been extracted).

    Raises:
        UnsafeArchiveError: A member is not a regular file under ``images/``
            (files before it may already have been written; they are safe).
        ArchiveCorruptError: The stream is damaged.
    """
    path = Path(path)
    dest = Path(dest)
    marker = extraction_marker(path, dest)
    if marker.exists():
        return 0
    dest.mkdir(parents=True, exist_ok=True)
    root = dest.resolve()
    count = 0
    try:
        with tarfile.open(path, mode="r|gz") as tar, \
                tqdm(desc=f"extract {path.name}", unit="file", file=sys.stderr,
                     disable=not progress, total=NIH_IMAGE_COUNTS.get(path.name)) as bar:
            for member in tar:
                rel = _safe_member_path(member)
                if rel is None:
                    continue
                target = dest.joinpath(*rel.parts)
                target.parent.mkdir(parents=True, exist_ok=True)
                # A pre-existing symlinked directory could still redirect the
                # write outside dest, so check the resolved location too.
                if not target.parent.resolve().is_relative_to(root):
                    raise UnsafeArchiveError(
                        f"refusing {member.name!r}: resolves outside {dest}")
                src = tar.extractfile(member)
                if src is None:  # pragma: no cover - isreg() guarantees data
                    continue
                atomic_write(target, lambda tmp, src=src: _copy_stream(src, tmp))
                count += 1
                bar.update(1)
    except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile) as exc:
        raise ArchiveCorruptError(f"{path.name}: {type(exc).__name__}: {exc}") from exc
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(f"{count}\n", encoding="utf-8")
    return count


# --------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------

def _copy_stream(src, path: Path) -> None:
    """An archive member's bytes to `path`, CHUNK_SIZE at a time."""
    with open(path, "wb") as out:
        shutil.copyfileobj(src, out, CHUNK_SIZE)


def read_url_list(path: Path | str) -> list[tuple[str, str]]:
    """Read a ``filename url`` list (blank lines and ``#`` comments ignored).

    Args:
        path: Text file with one ``filename url`` pair per line.

    Returns:
        The (filename, url) pairs in file order.

    Raises:
        ValueError: A malformed line, or a filename that is not a plain name.
    """
    pairs: list[tuple[str, str]] = []
    for lineno, raw in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split()
        if len(parts) != 2:
            raise ValueError(f"{path}:{lineno}: expected 'filename url', got {raw!r}")
        name, url = parts
        # The name becomes a path under --out, so keep it a plain file name.
        if name in (".", "..") or "/" in name or "\\" in name:
            raise ValueError(f"{path}:{lineno}: filename must be a plain name, got {name!r}")
        pairs.append((name, url))
    return pairs


def select_archives(archives: Sequence[tuple[str, str]],
                    only: Optional[Iterable[int]]) -> list[tuple[str, str]]:
    """Pick archives by 1-based position (``--only 1 3 12``).

    Args:
        archives: All (filename, url) pairs.
        only: 1-based indices to keep, or None for all.

    Returns:
        The selected pairs in list order.

    Raises:
        ValueError: An index is out of range.
    """
    if not only:
        return list(archives)
    wanted = set(only)
    bad = sorted(i for i in wanted if not 1 <= i <= len(archives))
    if bad:
        raise ValueError(f"--only index out of range 1..{len(archives)}: {bad}")
    return [pair for i, pair in enumerate(archives, 1) if i in wanted]


def _build_parser() -> argparse.ArgumentParser:
    """Build the command-line parser.

    Returns:
        The configured parser.
    """
    parser = argparse.ArgumentParser(
        description="Download (and optionally extract) the NIH ChestX-ray14 image archives.",
        epilog="Re-running resumes partial downloads and skips finished work.")
    parser.add_argument("--out", required=True, type=Path,
                        help="folder for the .tar.gz archives")
    parser.add_argument("--only", nargs="+", type=integer(1, 12), metavar="N",
                        help="only these archives (1-based positions, e.g. 1 3 12)")
    parser.add_argument("--extract", action="store_true",
                        help="extract the archives after downloading")
    parser.add_argument("--extract-to", type=Path, metavar="DIR",
                        help="extraction root (default: --out); PNGs land in DIR/images/")
    keep = parser.add_mutually_exclusive_group()
    keep.add_argument("--keep-archives", dest="keep_archives", action="store_true",
                      default=True, help="keep archives after extraction (default)")
    keep.add_argument("--delete-archives", dest="keep_archives", action="store_false",
                      help="delete each archive once it has been extracted")
    parser.add_argument("--url-list", type=Path, metavar="FILE",
                        help="text file of 'filename url' lines replacing the NIH links")
    parser.add_argument("--retries", type=integer(0), default=DEFAULT_RETRIES,
                        help=f"extra attempts per file (default {DEFAULT_RETRIES})")
    parser.add_argument("--timeout", type=POSITIVE, default=DEFAULT_TIMEOUT,
                        help=f"socket timeout in seconds (default {DEFAULT_TIMEOUT:g})")
    parser.add_argument("--backoff", type=NON_NEGATIVE, default=DEFAULT_BACKOFF,
                        help="base seconds between retries, doubling "
                        f"(default {DEFAULT_BACKOFF:g})")
    parser.add_argument("--no-progress", dest="progress", action="store_false",
                        help="hide progress bars")
    return parser


@dataclass
class _Summary:
    """Archive names per outcome, for the final summary line."""

    downloaded: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    extracted: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)


def _fetch_verified(name: str, url: str, dest: Path, args: argparse.Namespace,
                    summary: _Summary) -> bool:
    """Make sure ``dest`` is a complete, intact archive.

    Skips a file that already verifies; downloads otherwise. A file that
    fails verification is reported, deleted and downloaded again once.

    Args:
        name: Archive file name (for messages and the summary).
        url: URL to download from.
        dest: Final archive path.
        args: Parsed CLI options (retries, timeout, backoff, progress).
        summary: Outcome lists to append to.

    Returns:
        True when ``dest`` is good.

    Raises:
        DownloadError: Propagated from :func:`download_file`.
    """
    redownloaded = False
    if dest.exists():
        try:
            verify_archive(dest)
        except ArchiveCorruptError as exc:
            print(f"corrupt archive {name}: {exc}; downloading it again", file=sys.stderr)
            dest.unlink()
            sidecar_path(dest).unlink(missing_ok=True)
            redownloaded = True
        else:
            summary.skipped.append(name)
            print(f"{name}: already complete, skipping")
            return True
    while True:
        download_file(url, dest, retries=args.retries, timeout=args.timeout,
                      backoff=args.backoff, progress=args.progress)
        try:
            verify_archive(dest)
        except ArchiveCorruptError as exc:
            if redownloaded:
                print(f"corrupt archive {name} even after downloading it again: {exc}",
                      file=sys.stderr)
                summary.failed.append(name)
                return False
            print(f"corrupt archive {name}: {exc}; downloading it again", file=sys.stderr)
            dest.unlink()
            sidecar_path(dest).unlink(missing_ok=True)
            redownloaded = True
            continue
        summary.downloaded.append(name)
        return True


@command
def main(argv: Optional[Sequence[str]] = None) -> int:
    """Command-line entry point.

    Args:
        argv: Arguments without the program name (default: ``sys.argv[1:]``).

    Returns:
        Exit status: 0 success, 2 a failed download or a corrupt or unsafe archive.
    """
    parser = _build_parser()
    args = parser.parse_args(argv)
    try:
        archives = read_url_list(args.url_list) if args.url_list else list(NIH_ARCHIVES)
        selected = select_archives(archives, args.only)
    except (ValueError, OSError) as exc:
        parser.error(str(exc))
    out: Path = args.out
    extract_root: Path = args.extract_to if args.extract_to is not None else out
    check_outputs({"--out": out, "--extract-to": extract_root}, {"--url-list": args.url_list},
                  folders=("--out", "--extract-to"))
    out.mkdir(parents=True, exist_ok=True)

    summary = _Summary()
    status = EXIT_OK
    for name, url in selected:
        dest = out / name
        if args.extract and extraction_marker(dest, extract_root).exists():
            # Already unpacked (possibly with --delete-archives): no need to
            # download or verify it again.
            summary.skipped.append(name)
            print(f"{name}: already extracted to {extract_root}, skipping")
            continue
        try:
            ok = _fetch_verified(name, url, dest, args, summary)
        except DownloadError as exc:
            print(f"ERROR: {exc}", file=sys.stderr)
            summary.failed.append(name)
            status = EXIT_NETWORK
            if exc.connection_failed:
                # The server (or our network) is unreachable; the remaining
                # files would fail the same way, so stop here.
                print("Stopping: network failure. Re-run the same command to resume.",
                      file=sys.stderr)
                break
            continue
        if not ok:
            status = max(status, EXIT_FAILED)
            continue
        if args.extract:
            try:
                count = extract_archive(dest, extract_root, progress=args.progress)
            except (UnsafeArchiveError, ArchiveCorruptError) as exc:
                print(f"ERROR extracting {name}: {exc}", file=sys.stderr)
                summary.failed.append(name)
                status = max(status, EXIT_FAILED)
                continue
            summary.extracted.append(name)
            print(f"{name}: extracted {count} files into {extract_root / 'images'}")
            if not args.keep_archives:
                dest.unlink()
                sidecar_path(dest).unlink(missing_ok=True)

    print(f"Summary: downloaded {len(summary.downloaded)}, skipped {len(summary.skipped)}, "
          f"failed {len(summary.failed)}"
          + (f", extracted {len(summary.extracted)}" if args.extract else ""))
    if summary.failed:
        print("Failed: " + ", ".join(summary.failed))
    return status
