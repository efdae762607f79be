"""What the command lines in `examples/` share: a user's mistake ends in one line, not a traceback.

A mistake is what the library raises for bad input: `ValueError` (a bad value, a config that does not fit),
`OSError` (a missing file or Hub repo), `ImportError` (a missing optional package) and `FloatingPointError` (a
training run whose loss is no longer finite). Anything else is a bug of ours, and keeps its traceback.
"""

import argparse
import contextlib

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
