"""What the command lines in `examples/` share: a user's mistake ends in one line, not a traceback.

A mistake is what the library raises for bad input: `ValueError` (a bad value, a config that does not fit),
`OSError` (a missing file or Hub repo), `ImportError` (a missing optional package) and `FloatingPointError` (a
training run whose loss is no longer finite). Anything else is a bug of ours, and keeps its traceback.
"""

import argparse
import contextlib
from collections.abc import Callable

USER_ERRORS = (ValueError, OSError, ImportError, FloatingPointError)


@contextlib.contextmanager
def one_line_errors(parser: argparse.ArgumentParser):
    """Turns a user's mistake raised inside the block into `prog: error: message` on stderr and exit status 2, as
    argparse does for a bad flag; Ctrl-C (after the trainer saved its checkpoint) exits with 130, quietly."""
    try:
        yield
    except KeyboardInterrupt:
        parser.exit(130)
    except USER_ERRORS as error:
        parser.exit(2, f"{parser.prog}: error: {' '.join(str(error).split())}\n")


def checked(kind: Callable, valid: Callable, expected: str) -> Callable:
    """An argparse `type`: the flag's text read by `kind` and kept if `valid`, else refused in one line naming the
    flag, before anything is loaded: `type=checked(int, lambda n: n >= 1, "at least 1")` gives
    `prog: error: argument --steps: expected at least 1, got 0`."""

    def parse(text: str):
        try:
            value = kind(text)
            if valid(value):
                return value
        except ValueError:
            pass
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text}")

    return parse
