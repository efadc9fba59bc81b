"""The argument parser and argument types the ``rnn-xp`` subcommands share.

Each type turns the text of an option into a value or raises
`argparse.ArgumentTypeError`; `Parser` reports that, and every other usage
error, as one line naming the option, with exit status 2.
"""

from __future__ import annotations

import argparse
import math
import sys
from typing import NoReturn


class Parser(argparse.ArgumentParser):
    """argparse, its usage errors one line on stderr: ``rnn-xp: error: --option: ...``.

    argparse prints the whole usage before its error; the command line's rule
    is one line (``--help`` still shows the usage). Subcommands' parsers are
    of this class too.
    """

    def __init__(self, *args, **kwargs) -> None:
        # Options are named as typed: no abbreviations (--batch for --batch-size).
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        message = " ".join(message.split())
        print(f"rnn-xp: error: {message.removeprefix('argument ')}", file=sys.stderr)
        sys.exit(2)


def _integer(text: str, low: int | None, what: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
    if low is not None and value < low:
        raise argparse.ArgumentTypeError(f"expected {what}, got {value}")
    return value


def positive(text: str) -> int:
    """A positive integer: sizes, counts, steps."""
    return _integer(text, 1, "a positive integer")


def integer(text: str) -> int:
    """Any integer, for options whose range a later check states with more context."""
    return _integer(text, None, "an integer")


def seed(text: str) -> int:
    """A non-negative integer, as NumPy's generators take."""
    return _integer(text, 0, "a non-negative integer")


def nonempty(text: str) -> str:
    if not text.strip():
        raise argparse.ArgumentTypeError(f"expected a non-empty value, got {text!r}")
    return text


def seconds(text: str) -> float:
    """A finite positive number of seconds."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"expected a positive number of seconds, got {text!r}")
    return value
