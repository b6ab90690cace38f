"""Commands run as a user runs them, each in a process of its own, without paying Python's
start-up and the torch import (4-7 s on 2 cores) per command.

One server process (this file, run as a script) imports the project once, then forks a child
per command. A child is a real process, as `python SCRIPT ARGS` would be after its imports:
its own pid, process group, exit status, stdin (/dev/null), stdout and stderr, working folder
and environment, and signals as a terminal delivers them (SIGINT raises KeyboardInterrupt).
It runs SCRIPT with runpy as __main__, and exits as the interpreter would: SystemExit's code,
a printed traceback and exit 1 for an uncaught exception, atexit handlers run.

What it does not exercise is the interpreter's start-up and the script's own top-level
imports; tests/test_layout.py and the README tests start scripts cold.

    with Warm() as warm:
        done = warm.run(["eval_model.py", "--preds", "x.csv"])    # Done(returncode, out, err)
        child = warm.start([...]); os.killpg(child.pid, signal.SIGINT); child.wait()

The server never runs a command itself, so every child starts from the same pristine state,
and it has a single Python thread (checked), so a fork copies no lock another thread held.
"""
from __future__ import annotations

import contextlib
import json
import os
import select
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT = 300  # seconds a command may take before the test fails (and the child is killed)


@dataclass
class Done:
    returncode: int          # negative: killed by that signal
    stdout: str
    stderr: str

    @property
    def output(self) -> str:
        return self.stdout + self.stderr


class Child:
    """A started command: `pid` (also its process group), then `wait()` for its Done."""

    def __init__(self, warm: "Warm", pid: int, out: Path, err: Path):
        self.warm, self.pid, self._out, self._err = warm, pid, out, err

    def wait(self, timeout: float = TIMEOUT) -> Done:
        reply = self.warm._read(timeout, on_timeout=self.pid)
        self.warm._running = None
        return Done(reply["returncode"], self._out.read_text(errors="replace"),
                    self._err.read_text(errors="replace"))


class Warm:
    """The client side: starts the server, then one command at a time."""

    def __init__(self, cwd: Path = ROOT):
        self.cwd = Path(cwd)
        self._tmp = tempfile.TemporaryDirectory(prefix="warm-")
        self._n = 0
        self._running: Child | None = None
        self._buffer = b""
        self.proc = subprocess.Popen([sys.executable, __file__], cwd=ROOT,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        ready = self._read(TIMEOUT)
        if ready.get("threads") != 1:
            raise RuntimeError(f"the warm server has {ready.get('threads')} threads after its "
                               "imports: forking it would copy locks held by the others")

    def start(self, argv: list[str], cwd: str | os.PathLike | None = None,
              env: dict[str, str] | None = None, read_only: str | os.PathLike | None = None,
              fault: dict | None = None) -> Child:
        """SCRIPT ARGS... (SCRIPT relative to the repository root, or absolute). `read_only`:
        a folder every write under which is refused (tests/read_only.py). `fault`: a signal
        sent from inside the command at a chosen call, e.g. {"target":
        "chexnet.datatools.cache_build:_build_chunk", "call": 2, "when": "after",
        "signal": "SIGINT", "group": True} (see `_inject`)."""
        assert self._running is None, "one command at a time"
        self._n += 1
        out, err = (Path(self._tmp.name) / f"{self._n}.{kind}" for kind in ("out", "err"))
        request = {"argv": [str(ROOT / argv[0]), *map(str, argv[1:])],
                   "cwd": str(cwd or self.cwd), "env": dict(os.environ if env is None else env),
                   "read_only": None if read_only is None else str(read_only),
                   "fault": fault,
                   "stdout": str(out), "stderr": str(err)}
        self.proc.stdin.write(json.dumps(request).encode() + b"\n")
        self.proc.stdin.flush()
        self._running = Child(self, self._read(TIMEOUT)["pid"], out, err)
        return self._running

    def run(self, argv: list[str], **kwargs) -> Done:
        return self.start(argv, **kwargs).wait()

    def _read(self, timeout: float, on_timeout: int | None = None) -> dict:
        fd = self.proc.stdout.fileno()
        while b"\n" not in self._buffer:
            ready, _, _ = select.select([fd], [], [], timeout)
            chunk = os.read(fd, 65536) if ready else b""
            if not chunk:
                if on_timeout is not None and ready == []:
                    os.killpg(on_timeout, 9)
                    raise TimeoutError(f"the command (pid {on_timeout}) ran over {timeout} s")
                raise RuntimeError(f"the warm server stopped (exit {self.proc.poll()})")
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        return json.loads(line)

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)
        self._tmp.cleanup()

    def __enter__(self) -> "Warm":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ---------------------------------------------------------------------------------------------
# The server (this file as a script) and its children
# ---------------------------------------------------------------------------------------------
def _preload() -> None:
    """What the scripts import, once: every module of the package and every script."""
    import importlib
    import pkgutil

    sys.path.insert(0, str(ROOT))  # as for `python SCRIPT`: this checkout's package first
    import chexnet.idle_threads  # noqa: F401  (as every script does, before torch)
    import matplotlib

    matplotlib.use("Agg")
    import chexnet

    for info in pkgutil.iter_modules(chexnet.__path__):
        importlib.import_module(f"chexnet.{info.name}")
    for script in sorted(ROOT.glob("*.py")):
        importlib.import_module(script.stem)


def _child(request: dict) -> None:
    """In the forked child: become the command, run it, exit with its status. Never returns."""
    import atexit
    import runpy
    import signal
    import traceback

    code = 1
    try:
        os.setpgid(0, 0)  # a group of its own: killpg reaches it and its workers only
        for fd, path, flags in ((0, os.devnull, os.O_RDONLY),
                                (1, request["stdout"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC),
                                (2, request["stderr"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC)):
            new = os.open(path, flags, 0o644)
            os.dup2(new, fd)
            os.close(new)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        if request["read_only"]:
            sys.path.insert(0, str(Path(__file__).parent))
            from read_only import refuse_writes

            refuse_writes(request["read_only"])
        if request["fault"]:
            _inject(**request["fault"])
        sys.argv = list(request["argv"])
        here = str(Path(__file__).resolve().parent)
        sys.path[:] = [str(Path(sys.argv[0]).parent)] + [p for p in sys.path[1:]
                                                         if p not in (here, str(ROOT))]
        try:
            runpy.run_path(sys.argv[0], run_name="__main__")
            code = 0
        except SystemExit as stop:
            if stop.code is None or isinstance(stop.code, int):
                code = stop.code or 0
            else:
                print(stop.code, file=sys.stderr)
                code = 1
        except KeyboardInterrupt:
            traceback.print_exc()
            code = 128 + signal.SIGINT
        except BaseException:  # an uncaught exception: what the interpreter prints
            traceback.print_exc()
            code = 1
        atexit._run_exitfuncs()
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):  # a closed or broken stream: nothing left to flush
                pass
        os._exit(code)


def _inject(target: str, call: int, when: str, signal: str, group: bool) -> None:
    """Wrap `module:function` so that its `call`-th call (counted in each process: a worker
    forked from the command counts its own) sends `signal`, `before` or `after` the call, to
    this process or to its whole group (as a terminal's Ctrl-C reaches the workers too).
    The wrapper keeps the function's name, so a process pool pickles it by reference and its
    forked workers run the wrapped one."""
    import functools
    import importlib
    import signal as signals

    module_name, _, name = target.partition(":")
    module = importlib.import_module(module_name)
    real, calls = getattr(module, name), 0

    def fire() -> None:
        number = getattr(signals, signal)
        os.killpg(0, number) if group else os.kill(os.getpid(), number)

    @functools.wraps(real)
    def wrapped(*args, **kwargs):
        nonlocal calls
        calls += 1
        if calls == call and when == "before":
            fire()
        result = real(*args, **kwargs)
        if calls == call and when == "after":
            fire()
        return result

    setattr(module, name, wrapped)


def _serve() -> None:
    import signal
    import threading

    _preload()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a terminal's Ctrl-C is for the children
    reply = sys.stdout.buffer

    def send(message: dict) -> None:
        reply.write(json.dumps(message).encode() + b"\n")
        reply.flush()

    # Python's threads. The OS counts one or two more: the idle pools of numpy's and scipy's
    # OpenBLAS, which re-create themselves in a forked child (pthread_atfork handlers).
    send({"threads": threading.active_count()})
    for line in sys.stdin.buffer:
        request = json.loads(line)
        pid = os.fork()
        if pid == 0:
            _child(request)
        send({"pid": pid})
        _, status = os.waitpid(pid, 0)
        send({"returncode": os.waitstatus_to_exitcode(status)})


@contextlib.contextmanager
def one_thread_warm() -> Iterator["Warm"]:
    """The warm server (tests/warm.py), started with OMP_NUM_THREADS=1: torch reads it once, at
    the server's import, so every command forked from it runs torch on one thread (what
    conftest.py's one_thread does in this process, for the same reason: 2 shared cores)."""
    saved = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = "1"
    try:
        server = Warm()
    finally:
        if saved is None:
            del os.environ["OMP_NUM_THREADS"]
        else:
            os.environ["OMP_NUM_THREADS"] = saved
    with server:
        yield server


if __name__ == "__main__":
    _serve()

