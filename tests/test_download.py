"""Tests for nih_batch_download_zips.py against a local HTTP server.

Everything runs on 127.0.0.1 with tiny generated archives: no external
network, no sleeping (retry backoff is 0), and timeouts only as a safety net.
"""

from __future__ import annotations

import gzip
import io
import json
import random
import re
import socket
import tarfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Iterator, Optional

import pytest

from chexnet.datatools import download as nbd

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
FAST = ["--retries", "0", "--backoff", "0", "--timeout", "2", "--no-progress"]


def fake_png(seed: int, size: int = 3000) -> bytes:
    """Deterministic incompressible bytes, so archives have a useful size."""
    return PNG_MAGIC + random.Random(seed).randbytes(size)


def make_archive(members: dict[str, bytes], add_images_dir: bool = True) -> bytes:
    """Build a .tar.gz in memory holding the given regular-file members."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        if add_images_dir:
            info = tarfile.TarInfo("images")
            info.type = tarfile.DIRTYPE
            info.mode = 0o755
            tar.addfile(info)
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def nih_like_archive(index: int, n_images: int = 3) -> tuple[bytes, dict[str, bytes]]:
    members = {f"images/{index:05d}_{k:03d}.png": fake_png(index * 100 + k)
               for k in range(n_images)}
    return make_archive(members), members


class FileServer:
    """Serves in-memory files at /files/NAME with Range support and fault injection."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.requests: list[tuple[str, str, Optional[str]]] = []  # (method, name, Range)
        self.break_first: dict[str, int] = {}  # name -> GETs left to break off
        self.always_break: set[str] = set()
        self.ignore_range = False
        self.lock = threading.Lock()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self.httpd.daemon_threads = True
        self.httpd.state = self  # type: ignore[attr-defined]
        # A short poll interval keeps shutdown() (and so each test) quick.
        self.thread = threading.Thread(target=self.httpd.serve_forever,
                                       kwargs={"poll_interval": 0.02}, daemon=True)

    def url(self, name: str) -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://{host}:{port}/files/{name}"

    def gets(self, name: Optional[str] = None) -> list[tuple[str, str, Optional[str]]]:
        with self.lock:
            return [r for r in self.requests if r[0] == "GET" and (name is None or r[1] == name)]

    def should_break(self, name: str) -> bool:
        with self.lock:
            if name in self.always_break:
                return True
            left = self.break_first.get(name, 0)
            if left > 0:
                self.break_first[name] = left - 1
                return True
            return False


class _Handler(BaseHTTPRequestHandler):
    # HTTP/1.0: one request per connection, so closing early is a clean EOF.
    protocol_version = "HTTP/1.0"

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        pass  # keep pytest output clean

    def do_GET(self) -> None:  # noqa: N802 - http.server naming
        state: FileServer = self.server.state  # type: ignore[attr-defined]
        name = self.path.rsplit("/", 1)[-1]
        range_header = self.headers.get("Range")
        with state.lock:
            state.requests.append(("GET", name, range_header))
        data = state.files.get(name)
        if data is None:
            self.send_error(404)
            return
        start, status = 0, 200
        if range_header and not state.ignore_range:
            match = re.fullmatch(r"bytes=(\d+)-", range_header)
            assert match, range_header
            start = int(match.group(1))
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            status = 206
        body = data[start:]
        self.send_response(status)
        self.send_header("Content-Type", "application/gzip")
        self.send_header("Content-Length", str(len(body)))
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.end_headers()
        if state.should_break(name):
            # Promise the whole body, deliver half, then hang up.
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(body)


@pytest.fixture
def server() -> Iterator[FileServer]:
    srv = FileServer()
    srv.thread.start()
    try:
        yield srv
    finally:
        srv.httpd.shutdown()
        srv.httpd.server_close()
        srv.thread.join(timeout=5)


def write_url_list(path: Path, pairs: list[tuple[str, str]]) -> Path:
    path.write_text("# test mirror\n\n" + "".join(f"{n} {u}\n" for n, u in pairs))
    return path


def serve_archives(server: FileServer, tmp_path: Path, count: int = 2
                   ) -> tuple[Path, dict[str, bytes], dict[str, dict[str, bytes]]]:
    """Put `count` archives on the server; return (url list, name->bytes, name->members)."""
    blobs: dict[str, bytes] = {}
    members: dict[str, dict[str, bytes]] = {}
    for i in range(1, count + 1):
        name = f"images_{i:03d}.tar.gz"
        blobs[name], members[name] = nih_like_archive(i)
        server.files[name] = blobs[name]
    url_list = write_url_list(tmp_path / "urls.txt", [(n, server.url(n)) for n in blobs])
    return url_list, blobs, members


def closed_port() -> int:
    """A loopback port with nothing listening on it."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    return port


# --------------------------------------------------------------------------
# URL table and helpers
# --------------------------------------------------------------------------

def test_nih_archive_table() -> None:
    names = [n for n, _ in nbd.NIH_ARCHIVES]
    urls = [u for _, u in nbd.NIH_ARCHIVES]
    assert names == [f"images_{i:03d}.tar.gz" for i in range(1, 13)]
    assert len(set(urls)) == 12
    assert all(re.fullmatch(r"https://nihcc\.box\.com/shared/static/[0-9a-z]{32}\.gz", u)
               for u in urls)
    assert sum(nbd.NIH_IMAGE_COUNTS.values()) == 112_120


def test_read_url_list_and_select(tmp_path: Path) -> None:
    path = write_url_list(tmp_path / "u.txt", [("a.tar.gz", "http://x/a"),
                                               ("b.tar.gz", "http://x/b"),
                                               ("c.tar.gz", "http://x/c")])
    pairs = nbd.read_url_list(path)
    assert pairs == [("a.tar.gz", "http://x/a"), ("b.tar.gz", "http://x/b"),
                     ("c.tar.gz", "http://x/c")]
    assert nbd.select_archives(pairs, [3, 1]) == [pairs[0], pairs[2]]
    assert nbd.select_archives(pairs, None) == pairs
    with pytest.raises(ValueError):
        nbd.select_archives(pairs, [4])
    (tmp_path / "bad.txt").write_text("../evil.tar.gz http://x/e\n")
    with pytest.raises(ValueError, match="plain name"):
        nbd.read_url_list(tmp_path / "bad.txt")
    (tmp_path / "bad2.txt").write_text("only-one-field\n")
    with pytest.raises(ValueError, match="expected"):
        nbd.read_url_list(tmp_path / "bad2.txt")


# --------------------------------------------------------------------------
# Downloading
# --------------------------------------------------------------------------

def test_full_download_and_extract(server: FileServer, tmp_path: Path,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    url_list, blobs, members = serve_archives(server, tmp_path)
    out = tmp_path / "data"
    rc = nbd.main(["--out", str(out), "--url-list", str(url_list), "--extract", *FAST])
    assert rc == 0
    for name, blob in blobs.items():
        assert (out / name).read_bytes() == blob
        assert not (out / f"{name}.part").exists()
        assert json.loads((out / f"{name}.json").read_text())["size"] == len(blob)
    expected = {Path(m).name: data for ms in members.values() for m, data in ms.items()}
    got = {p.name: p.read_bytes() for p in (out / "images").glob("*.png")}
    assert got == expected
    assert not list((out / "images").glob("*.tmp"))
    assert "downloaded 2, skipped 0, failed 0, extracted 2" in capsys.readouterr().out


def test_progress_bar_goes_to_stderr(server: FileServer, tmp_path: Path,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    name = "images_001.tar.gz"
    server.files[name], _ = nih_like_archive(1)
    dest = nbd.download_file(server.url(name), tmp_path / name, retries=0, timeout=2,
                             backoff=0, progress=True)
    assert dest.read_bytes() == server.files[name]
    captured = capsys.readouterr()
    assert name in captured.err and name not in captured.out


def test_resume_after_connection_breaks_off(server: FileServer, tmp_path: Path) -> None:
    url_list, blobs, _ = serve_archives(server, tmp_path, count=1)
    name = "images_001.tar.gz"
    server.break_first[name] = 1
    out = tmp_path / "data"
    rc = nbd.main(["--out", str(out), "--url-list", str(url_list),
                   "--retries", "2", "--backoff", "0", "--timeout", "2", "--no-progress"])
    assert rc == 0
    gets = server.gets(name)
    assert len(gets) == 2
    assert gets[0][2] is None
    assert gets[1][2] == f"bytes={len(blobs[name]) // 2}-"
    assert (out / name).read_bytes() == blobs[name]
    assert not (out / f"{name}.part").exists()


def test_rerun_resumes_kept_part_file(server: FileServer, tmp_path: Path) -> None:
    """A .part left by an earlier (failed) run is continued, not restarted."""
    url_list, blobs, _ = serve_archives(server, tmp_path, count=1)
    name = "images_001.tar.gz"
    out = tmp_path / "data"
    out.mkdir()
    (out / f"{name}.part").write_bytes(blobs[name][:1000])
    assert nbd.main(["--out", str(out), "--url-list", str(url_list), *FAST]) == 0
    assert [g[2] for g in server.gets(name)] == ["bytes=1000-"]
    assert (out / name).read_bytes() == blobs[name]


def test_server_ignoring_range_restarts_from_zero(server: FileServer, tmp_path: Path) -> None:
    url_list, blobs, _ = serve_archives(server, tmp_path, count=1)
    name = "images_001.tar.gz"
    server.ignore_range = True
    server.break_first[name] = 1
    out = tmp_path / "data"
    rc = nbd.main(["--out", str(out), "--url-list", str(url_list),
                   "--retries", "1", "--backoff", "0", "--timeout", "2", "--no-progress"])
    assert rc == 0
    gets = server.gets(name)
    assert len(gets) == 2 and gets[1][2] is not None  # we asked; it answered 200
    assert (out / name).read_bytes() == blobs[name]


def test_part_already_complete_gets_416(server: FileServer, tmp_path: Path) -> None:
    """A run killed between the last byte and the rename is finished via 416."""
    url_list, blobs, _ = serve_archives(server, tmp_path, count=1)
    name = "images_001.tar.gz"
    out = tmp_path / "data"
    out.mkdir()
    (out / f"{name}.part").write_bytes(blobs[name])
    assert nbd.main(["--out", str(out), "--url-list", str(url_list), *FAST]) == 0
    assert [g[2] for g in server.gets(name)] == [f"bytes={len(blobs[name])}-"]
    assert (out / name).read_bytes() == blobs[name]


def test_complete_files_are_skipped(server: FileServer, tmp_path: Path,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    url_list, blobs, _ = serve_archives(server, tmp_path)
    out = tmp_path / "data"
    args = ["--out", str(out), "--url-list", str(url_list), *FAST]
    assert nbd.main(args) == 0
    assert len(server.gets()) == 2
    capsys.readouterr()
    assert nbd.main(args) == 0
    assert len(server.gets()) == 2  # no new GET for complete files
    out_text = capsys.readouterr().out
    assert "downloaded 0, skipped 2, failed 0" in out_text
    for name in blobs:
        assert f"{name}: already complete" in out_text


def test_only_selects_archives(server: FileServer, tmp_path: Path) -> None:
    url_list, _, _ = serve_archives(server, tmp_path, count=3)
    out = tmp_path / "data"
    assert nbd.main(["--out", str(out), "--url-list", str(url_list), "--only", "1", "3",
                     *FAST]) == 0
    assert sorted(p.name for p in out.glob("*.tar.gz")) == ["images_001.tar.gz",
                                                            "images_003.tar.gz"]
    assert {g[1] for g in server.gets()} == {"images_001.tar.gz", "images_003.tar.gz"}


def test_extraction_is_idempotent_and_delete_archives(server: FileServer,
                                                      tmp_path: Path) -> None:
    url_list, blobs, members = serve_archives(server, tmp_path)
    out = tmp_path / "data"
    args = ["--out", str(out), "--url-list", str(url_list), "--extract",
            "--delete-archives", *FAST]
    assert nbd.main(args) == 0
    assert not list(out.glob("*.tar.gz")) and not list(out.glob("*.json"))
    assert len(list((out / "images").glob("*.png"))) == sum(len(m) for m in members.values())
    assert nbd.main(args) == 0
    assert len(server.gets()) == 2  # extracted archives are neither fetched nor unpacked again


def test_extract_to_other_folder(server: FileServer, tmp_path: Path) -> None:
    url_list, _, members = serve_archives(server, tmp_path, count=1)
    out, target = tmp_path / "archives", tmp_path / "elsewhere"
    assert nbd.main(["--out", str(out), "--url-list", str(url_list), "--extract",
                     "--extract-to", str(target), *FAST]) == 0
    assert len(list((target / "images").glob("*.png"))) == len(members["images_001.tar.gz"])
    assert (out / "images_001.tar.gz").exists()  # --keep-archives is the default


# --------------------------------------------------------------------------
# Integrity
# --------------------------------------------------------------------------

def test_verify_archive_detects_damage(tmp_path: Path) -> None:
    blob, _ = nih_like_archive(1)
    good = tmp_path / "good.tar.gz"
    good.write_bytes(blob)
    nbd.verify_archive(good)
    nbd.verify_archive(good, expected_size=len(blob))

    truncated = tmp_path / "truncated.tar.gz"
    truncated.write_bytes(blob[: len(blob) // 2])
    with pytest.raises(nbd.ArchiveCorruptError, match="truncated.tar.gz"):
        nbd.verify_archive(truncated)

    with pytest.raises(nbd.ArchiveCorruptError, match="size"):
        nbd.verify_archive(good, expected_size=len(blob) + 1)

    flipped = bytearray(blob)
    flipped[len(blob) // 2] ^= 0xFF
    bad = tmp_path / "flipped.tar.gz"
    bad.write_bytes(bytes(flipped))
    with pytest.raises(nbd.ArchiveCorruptError, match="flipped.tar.gz"):
        nbd.verify_archive(bad)

    not_gzip = tmp_path / "notgzip.tar.gz"
    not_gzip.write_bytes(b"<html>Box login page</html>")
    with pytest.raises(nbd.ArchiveCorruptError):
        nbd.verify_archive(not_gzip)

    # A valid gzip whose tar payload is cut short.
    raw_tar = gzip.decompress(blob)
    short = tmp_path / "shorttar.tar.gz"
    short.write_bytes(gzip.compress(raw_tar[:1500]))
    with pytest.raises(nbd.ArchiveCorruptError):
        nbd.verify_archive(short)


def test_corrupt_complete_archive_is_redownloaded(server: FileServer, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    url_list, blobs, _ = serve_archives(server, tmp_path, count=1)
    name = "images_001.tar.gz"
    out = tmp_path / "data"
    args = ["--out", str(out), "--url-list", str(url_list), *FAST]
    assert nbd.main(args) == 0
    damaged = bytearray(blobs[name])
    damaged[len(damaged) // 2] ^= 0xFF  # same size, so only the stream read can tell
    (out / name).write_bytes(bytes(damaged))
    capsys.readouterr()

    assert nbd.main(args) == 0
    err = capsys.readouterr().err
    assert f"corrupt archive {name}" in err
    assert len(server.gets(name)) == 2
    assert (out / name).read_bytes() == blobs[name]


def test_corrupt_on_server_fails_after_one_retry(server: FileServer, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    name = "images_001.tar.gz"
    server.files[name] = b"<html>not an archive</html>"
    url_list = write_url_list(tmp_path / "urls.txt", [(name, server.url(name))])
    rc = nbd.main(["--out", str(tmp_path / "data"), "--url-list", str(url_list), *FAST])
    assert rc == 2
    assert len(server.gets(name)) == 2  # original download plus exactly one re-download
    captured = capsys.readouterr()
    assert f"corrupt archive {name} even after downloading it again" in captured.err
    assert "failed 1" in captured.out


# --------------------------------------------------------------------------
# Network failures
# --------------------------------------------------------------------------

def test_connection_refused_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    port = closed_port()
    url = f"http://127.0.0.1:{port}/files/images_001.tar.gz"
    url_list = write_url_list(tmp_path / "urls.txt", [("images_001.tar.gz", url),
                                                      ("images_002.tar.gz", url)])
    rc = nbd.main(["--out", str(tmp_path / "data"), "--url-list", str(url_list),
                   "--retries", "1", "--backoff", "0", "--timeout", "2", "--no-progress"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "images_001.tar.gz" in err and url in err
    assert "Connection" in err and "re-running the same command resumes" in err
    # The network is down, so the run stops instead of trying every file.
    assert "images_002.tar.gz" not in err


def test_timeout_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # A socket that listens but never answers: connect succeeds, read times out.
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(4)
        url = f"http://127.0.0.1:{silent.getsockname()[1]}/images_001.tar.gz"
        url_list = write_url_list(tmp_path / "urls.txt", [("images_001.tar.gz", url)])
        rc = nbd.main(["--out", str(tmp_path / "data"), "--url-list", str(url_list),
                       "--retries", "0", "--backoff", "0", "--timeout", "0.2",
                       "--no-progress"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "images_001.tar.gz" in err and "timed out" in err


def test_always_breaking_server_exhausts_retries(server: FileServer, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    url_list, blobs, _ = serve_archives(server, tmp_path, count=1)
    name = "images_001.tar.gz"
    server.always_break.add(name)
    out = tmp_path / "data"
    rc = nbd.main(["--out", str(out), "--url-list", str(url_list),
                   "--retries", "2", "--backoff", "0", "--timeout", "2", "--no-progress"])
    assert rc == 2
    assert len(server.gets(name)) == 3
    part = out / f"{name}.part"
    assert part.exists()
    assert 0 < part.stat().st_size < len(blobs[name])
    assert blobs[name].startswith(part.read_bytes())
    assert not (out / name).exists()
    err = capsys.readouterr().err
    assert f"failed to download {name}" in err and "was kept" in err


def test_http_404_continues_with_other_files(server: FileServer, tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    blob, _ = nih_like_archive(2)
    server.files["images_002.tar.gz"] = blob
    url_list = write_url_list(tmp_path / "urls.txt", [
        ("images_001.tar.gz", server.url("missing.tar.gz")),
        ("images_002.tar.gz", server.url("images_002.tar.gz"))])
    out = tmp_path / "data"
    rc = nbd.main(["--out", str(out), "--url-list", str(url_list), *FAST])
    assert rc == 2
    assert (out / "images_002.tar.gz").read_bytes() == blob
    assert "HTTP 404" in capsys.readouterr().err


# --------------------------------------------------------------------------
# Extraction safety
# --------------------------------------------------------------------------

def _archive_with_symlink() -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        info = tarfile.TarInfo("images/link.png")
        info.type = tarfile.SYMTYPE
        info.linkname = "/etc/passwd"
        tar.addfile(info)
    return buf.getvalue()


@pytest.mark.parametrize("blob", [
    make_archive({"images/ok.png": b"ok", "../evil.png": b"evil"}),
    make_archive({"images/../../evil.png": b"evil"}),
    make_archive({"/tmp/evil_abs.png": b"evil"}),
    make_archive({"other/evil.png": b"evil"}),
    _archive_with_symlink(),
], ids=["dotdot", "images-dotdot", "absolute", "outside-images", "symlink"])
def test_path_traversal_member_is_refused(tmp_path: Path, blob: bytes) -> None:
    archive = tmp_path / "images_001.tar.gz"
    archive.write_bytes(blob)
    dest = tmp_path / "root" / "data"
    with pytest.raises(nbd.UnsafeArchiveError, match="refusing"):
        nbd.extract_archive(archive, dest, progress=False)
    assert not (tmp_path / "root" / "evil.png").exists()
    assert not (tmp_path / "evil.png").exists()
    assert not (dest / "images" / "link.png").exists()
    assert not (dest / "other").exists()
    assert not nbd.extraction_marker(archive, dest).exists()


def test_unsafe_archive_via_cli_exits_2(server: FileServer, tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    name = "images_001.tar.gz"
    server.files[name] = make_archive({"images/../../evil.png": b"evil"})
    url_list = write_url_list(tmp_path / "urls.txt", [(name, server.url(name))])
    out = tmp_path / "a" / "data"
    rc = nbd.main(["--out", str(out), "--url-list", str(url_list), "--extract", *FAST])
    assert rc == 2
    assert not (tmp_path / "evil.png").exists()
    assert f"ERROR extracting {name}" in capsys.readouterr().err
