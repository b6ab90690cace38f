"""notebook_tools: a copy that skips what is there, and a command streamed as it runs."""
from __future__ import annotations

import io
import sys

from chexnet.analysis.notebook_tools import copy_missing, stream


def test_copy_missing_copies_once_and_completes_a_partial_copy(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    (src / "sub").mkdir(parents=True)
    for name, data in [("a.png", b"aaaa"), ("b.png", b"bb"), ("sub/c.png", b"c")]:
        (src / name).write_bytes(data)
    assert copy_missing(src, dst) == (3, 0)
    assert (dst / "sub" / "c.png").read_bytes() == b"c"
    assert copy_missing(src, dst) == (0, 3)          # nothing copied the second time
    (dst / "b.png").write_bytes(b"b")                # a file cut short by an interruption
    (dst / "a.png").unlink()
    assert copy_missing(src, dst) == (2, 1)
    assert (dst / "b.png").read_bytes() == b"bb" and (dst / "a.png").read_bytes() == b"aaaa"
    assert not list(dst.rglob("*.tmp")) and not list(dst.rglob("*.part"))


def test_stream_passes_stdout_stderr_and_carriage_returns_in_order():
    code = ("import sys\n"
            "print('first', flush=True)\n"
            "sys.stderr.write('bar 1/2\\rbar 2/2\\n'); sys.stderr.flush()\n"
            "print('last', flush=True)\n"
            "sys.exit(3)\n")
    out = io.StringIO()
    assert stream([sys.executable, "-c", code], out) == 3
    assert out.getvalue() == "first\nbar 1/2\rbar 2/2\nlast\n"
