"""What the command lines share: argument types, old option names kept working, and the one
error boundary (`run`) that every script's `__main__` goes through.

Light on purpose (argparse only), so that a script can parse and refuse its arguments before
torch is imported. Every numeric option uses a type from here (`number`, `integer`,
`at_least`, ...), so it is refused with its range while the arguments are parsed.
"""
from __future__ import annotations

import argparse
import functools
import sys
from typing import Callable, Sequence


def at_least(low: int) -> Callable[[str], int]:
    """argparse type: an integer >= low, checked before any data is read
    ('--image-size: 16 is too small: it must be at least 32')."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"{value} is too small: it must be at least {low}")
        return value
    return parse


# ---------------------------------------------------------------------------------------------
# Numbers and devices, checked while the arguments are parsed
# ---------------------------------------------------------------------------------------------
def number(low: float | None = None, high: float | None = None, *, low_open: bool = False,
           high_open: bool = False, integer: bool = False) -> Callable[[str], float]:
    """argparse type: a finite number in [low, high] (`low_open`/`high_open`: that end
    excluded), e.g. `number(0, low_open=True)` for a learning rate. The message says the
    range: '--lr: -1 is out of range: it must be > 0'."""
    left = "" if low is None else f"{'>' if low_open else '>='} {low:g}"
    right = "" if high is None else f"{'<' if high_open else '<='} {high:g}"
    wanted = " and ".join(s for s in (left, right) if s) or "finite"

    def parse(text: str) -> float:
        try:
            value = int(text) if integer else float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{text!r} is not {'an integer' if integer else 'a number'}") from None
        if value != value or value in (float("inf"), float("-inf")):
            raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
        below = low is not None and (value <= low if low_open else value < low)
        above = high is not None and (value >= high if high_open else value > high)
        if below or above:
            raise argparse.ArgumentTypeError(f"{text} is out of range: it must be {wanted}")
        return value
    parse.__name__ = "integer" if integer else "number"  # argparse names it in its messages
    return parse


def integer(low: int | None = None, high: int | None = None) -> Callable[[str], int]:
    """argparse type: an integer in [low, high]."""
    return number(low, high, integer=True)  # type: ignore[return-value]


POSITIVE = number(0, low_open=True)           # > 0 and finite: a learning rate, a size in mm
NON_NEGATIVE = number(0)                      # >= 0: a weight decay
FRACTION = number(0, 1, low_open=True, high_open=True)  # in (0, 1): a rate of images
MOMENTUM = number(0, 1, high_open=True)       # [0, 1): SGD momentum, Adam's betas
DECAY_FACTOR = number(1, low_open=True)       # > 1: the lr is divided by it


def device_arg(text: str) -> str:
    """argparse type for --device: auto, cpu, cuda, cuda:N or mps (whether that device exists
    here is checked when the command picks it)."""
    import re

    if re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", text):
        return text
    raise argparse.ArgumentTypeError(f"{text!r} is not a device: use auto, cpu, cuda, cuda:N "
                                     "(N = 0 for the first GPU) or mps")


# ---------------------------------------------------------------------------------------------
# The one error boundary of every command
# ---------------------------------------------------------------------------------------------
class CommandError(Exception):
    """An expected failure of a command: its message names the file or argument and says
    what to do. The boundary (`run`) prints it as one line, `error: ...`, and exits with
    `exit_code`. Each module's own errors (DataError, SaveError, ...) derive from it."""

    exit_code = 2


EXIT_ERROR = 2        # an expected failure: bad input, full disk, missing device, ...
EXIT_INTERRUPTED = 130  # Ctrl-C, as a shell reports it


def run(main: Callable[[Sequence[str] | None], int | None],
        argv: Sequence[str] | None = None) -> int:
    """Run a command's `main(argv)` and turn every expected failure into a one-line message
    and an exit code (2; NonFiniteLoss 3; Ctrl-C 130). Every script's `__main__` goes through
    here, so every command treats the same failure the same way.

    Expected: a CommandError; an OSError (missing, unreadable or unwritable file, a full disk:
    named with its path); an image PIL refuses (a decompression bomb); a dead worker process;
    memory exhausted; Ctrl-C. Anything else is a bug, and keeps its traceback. Commands get
    here through the `command` decorator on their `main`.
    """
    try:
        code = main(argv)
        return code if isinstance(code, int) else 0  # some mains return what they made
    except CommandError as err:
        return _fail(str(err), err.exit_code)
    except KeyboardInterrupt:
        print("\ninterrupted (Ctrl-C). Files are written whole or not at all: run the same "
              "command again to redo or resume the work.", file=sys.stderr)
        return EXIT_INTERRUPTED
    except OSError as err:
        return _fail(describe_os_error(err), EXIT_ERROR)
    except MemoryError:
        return _fail("out of memory. Use a smaller --batch-size or fewer --workers, or close "
                     "other programs.", EXIT_ERROR)
    except Exception as err:  # classified below; a bug re-raises with its traceback
        message = describe_expected(err)
        if message is None:
            raise
        return _fail(message, EXIT_ERROR)


def command(main: Callable[[Sequence[str] | None], int | None]
            ) -> Callable[[Sequence[str] | None], int]:
    """Decorator for every command's `main(argv)`: the command runs inside `run`, the one
    error boundary, whether it is started as a script or called from Python (a notebook, a
    test), and returns its exit code."""

    @functools.wraps(main)
    def boundary(argv: Sequence[str] | None = None) -> int:
        return run(main, argv)

    boundary.error_boundary = True  # type: ignore[attr-defined]  (checked by tests/test_layout)
    return boundary


def _fail(message: str, code: int) -> int:
    print(f"error: {message}", file=sys.stderr)
    return code


def describe_os_error(err: OSError) -> str:
    """An OSError as a sentence naming the file and what to do."""
    import errno

    if err.errno is None and err.filename is None and str(err):
        return str(err)  # raised with a message of its own, e.g. FileNotFoundError("x: not found")
    where = err.filename if err.filename is not None else "a file"
    if err.filename2 is not None:
        where = f"{err.filename} -> {err.filename2}"
    reason = err.strerror or str(err) or type(err).__name__
    fix = {
        errno.ENOSPC: "The disk is full: free some space (or choose another output place) "
                      "and run the same command again.",
        errno.EDQUOT: "The disk quota is used up: free some space and run the command again.",
        errno.EACCES: "Check its permissions, or choose another place for the output.",
        errno.EPERM: "Check its permissions, or choose another place for the output.",
        errno.EROFS: "It is on a read-only file system: choose a writable place for the "
                     "output.",
        errno.ENOENT: "Check the path (it is relative to the current folder unless it starts "
                      "with /).",
        errno.EISDIR: "It is a folder where a file is expected: give a file's path.",
        errno.ENOTDIR: "A part of the path is a file, not a folder: check the path.",
    }.get(err.errno, "")
    if type(err).__name__ == "UnidentifiedImageError":  # PIL: an OSError without errno
        return f"{reason}. Is it an image (PNG or JPEG)? Remove it or replace it."
    return f"{where}: {reason}. {fix}".rstrip()


def describe_expected(err: Exception) -> str | None:
    """The message for an expected failure that is not an OSError or a CommandError, or None
    for a bug. Classes are matched by name, so this module need not import PIL or torch."""
    names = {c.__name__ for c in type(err).__mro__}
    if "DecompressionBombError" in names:
        return (f"{err} The image is larger than PIL accepts without confirmation (a "
                "'decompression bomb' guard): check that it is a chest X-ray, or downscale it.")
    if "BrokenExecutor" in names:  # BrokenProcessPool: a worker process died
        return ("a worker process died (killed, out of memory, or a crash in an image "
                "library). Run the same command again with fewer --workers (1 runs in one "
                "process and names the failing file).")
    if "OutOfMemoryError" in names:  # torch.cuda.OutOfMemoryError
        return ("the GPU ran out of memory. Use a smaller --batch-size (or --batch-size auto), "
                "--memory-efficient, or --amp auto.")
    if "RuntimeError" in names and str(err).startswith("DataLoader worker"):
        return (f"{str(err).splitlines()[0]} A data loader process died (often out of shared "
                "memory or RAM): run the same command with fewer --workers, or --workers 0.")
    return None
