"""What the command lines share: argument types and old option names kept working.

Light on purpose (argparse only), so that a script can parse and refuse its arguments before
torch is imported.
"""
from __future__ import annotations

import argparse
import sys
from typing import Callable


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


class OldName(argparse.Action):
    """argparse action for an option's old name: sets the new option (its `dest`) and says on
    stderr what the option is called now, so old commands keep working."""

    def __call__(self, parser, namespace, values, option_string=None):
        new = "--" + self.dest.replace("_", "-")
        print(f"note: {option_string} is now called {new}, as in the other scripts; the old "
              "name still works for now.", file=sys.stderr)
        setattr(namespace, self.dest, values)
