"""fetch_reference.py and chexnet.reference: reproduce-chexnet's published files, fetched once
into pretrained/ and checked by sha256 whenever they are read. The network is a loopback
server (tests/test_download.py's FileServer); nothing here reaches the internet."""
from __future__ import annotations

import hashlib
import socket

import pytest

from chexnet import reference
from chexnet.datatools import fetch_reference
from conftest import hashes, shared
from test_download import FileServer, server  # noqa: F401  (the fixture)

NAMES = ("preds.csv", "aucs.csv", "log_train")


@pytest.fixture
def published(monkeypatch) -> dict[str, bytes]:
    """Generated stand-ins for the three files, with their hashes as the published ones."""
    blobs = {"preds.csv": b"Image Index,prob_Atelectasis\n00000001_000.png,0.5\n" * 300,
             "aucs.csv": b"label,auc\nAtelectasis,0.5\n", "log_train": b"epoch,train_loss\n"}
    monkeypatch.setattr(reference, "FILES", {n: reference.ReferenceFile(
        n, hashlib.sha256(b).hexdigest(), len(b), f"{n} of the reference") for n, b in
        blobs.items()})
    return blobs


def base_url(srv: FileServer) -> str:
    return srv.url("")


def test_fetch_places_checked_files_and_fetches_nothing_twice(server, published,  # noqa: F811
                                                               tmp_path, capsys):
    server.files.update(published)
    assert fetch_reference.main(["--out", str(tmp_path), "--base-url", base_url(server)]) == 0
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == published  # no staging left
    assert "Re-score them: python eval_model.py --preds pretrained/preds.csv" in \
        capsys.readouterr().out
    gets = len(server.gets())
    assert fetch_reference.main(["--out", str(tmp_path), "--base-url", base_url(server)]) == 0
    assert len(server.gets()) == gets  # all three already here, checked, not downloaded
    assert capsys.readouterr().out.count("already here (sha256 checked)") == 3


def test_an_interrupted_download_resumes(server, published, tmp_path):  # noqa: F811
    server.files.update(published)
    server.break_first["preds.csv"] = 1  # half the body, then the connection drops
    with pytest.raises(reference.CommandError):
        fetch_reference.fetch(tmp_path, base_url(server), retries=0, progress=False)
    assert not (tmp_path / "preds.csv").exists()  # never a partial file in place
    fetch_reference.fetch(tmp_path, base_url(server), retries=0, progress=False)
    assert (tmp_path / "preds.csv").read_bytes() == published["preds.csv"]
    ranges = [r for _, name, r in server.gets("preds.csv")]
    assert ranges[0] is None and ranges[1] == f"bytes={len(published['preds.csv']) // 2}-"


def test_a_download_that_is_not_the_published_file_is_refused(server, published,  # noqa: F811
                                                              tmp_path, capsys):
    server.files.update(published)
    server.files["aucs.csv"] = b"label,auc\nAtelectasis,0.99\n"  # a changed mirror
    assert fetch_reference.main(["--out", str(tmp_path), "--base-url", base_url(server),
                           "--retries", "0"]) == 2
    err = capsys.readouterr().err
    assert f"{base_url(server)}aucs.csv: the download is not reproduce-chexnet's published " \
        "aucs.csv (wrong sha256), removed" in err and "Traceback" not in err
    assert not (tmp_path / "aucs.csv").exists() and not (tmp_path / ".download" /
                                                         "aucs.csv").exists()


def test_a_different_file_in_place_is_never_replaced(server, published, tmp_path,  # noqa: F811
                                                     capsys):
    server.files.update(published)
    mine = tmp_path / "preds.csv"
    mine.write_text("Image Index,prob_Atelectasis\nmine.png,0.1\n")  # the user's own
    before = hashes(tmp_path)
    assert fetch_reference.main(["--out", str(tmp_path), "--base-url", base_url(server)]) == 2
    assert f"{mine}: not reproduce-chexnet's published preds.csv" in capsys.readouterr().err
    assert hashes(tmp_path) == before and not server.gets()


def test_offline_is_a_message_that_says_where_to_get_the_files(tmp_path, capsys):
    with socket.socket() as s:  # a port with nothing listening: the connection is refused
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    assert fetch_reference.main(["--out", str(tmp_path), "--base-url", f"http://127.0.0.1:{port}/",
                           "--retries", "0"]) == 2
    err = capsys.readouterr().err
    assert "failed to download preds.csv" in err and "Traceback" not in err
    assert f"Without internet here: download the files of {reference.BROWSE_URL}" in err
    assert not any(p.is_file() for p in tmp_path.iterdir())


def test_readers_check_the_file_and_say_how_to_fetch_a_missing_one(published, tmp_path):
    with pytest.raises(reference.ReferenceMissing, match=r"preds.csv: not found\. It is "
                       r"reproduce-chexnet's published .*python fetch_reference.py"):
        reference.reference_path("preds.csv", tmp_path)
    (tmp_path / "aucs.csv").write_bytes(published["aucs.csv"])
    assert reference.reference_path("aucs.csv", tmp_path) == tmp_path / "aucs.csv"
    (tmp_path / "aucs.csv").write_bytes(published["aucs.csv"] + b"Mass,0.5\n")
    with pytest.raises(reference.ReferenceMismatch, match="aucs.csv: not reproduce-chexnet's"):
        reference.reference_path("aucs.csv", tmp_path)
    assert "fetch_reference.py" in reference.hint(reference.PRETRAINED_DIR / "log_train")
    assert reference.hint(tmp_path / "log_train") == ""  # only the repository's pretrained/
    assert reference.hint(reference.PRETRAINED_DIR / "mine.csv") == ""


def test_the_pinned_hashes_are_the_published_files(server, tmp_path):  # noqa: F811
    """The shared copies of reproduce-chexnet's pretrained/ files, served under their names,
    pass the pinned sha256 and sizes."""
    for name in NAMES:
        source = "log_train" if name == "log_train" else name.removesuffix(".csv")
        server.files[name] = shared(
            "reference", f"reproduce_chexnet_pretrained_{source}.csv").read_bytes()
    paths = fetch_reference.fetch(tmp_path, base_url(server), retries=0, progress=False)
    assert [p.stat().st_size for p in paths] == [4_188_340, 421, 666]
