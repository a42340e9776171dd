"""User-facing errors: one clear line, no traceback.

Every problem a user can fix (a typo in a config, a missing corpus, a corrupt checkpoint)
is raised as an `LmforgeError`; the CLI prints its message on one line and exits non-zero.
Anything else is a bug in lmforge and keeps its traceback.
"""

import sys


class LmforgeError(Exception):
    """A problem with the user's input, named in one line. every_rank: every rank of a distributed
    run raises it at the same point (a failure the ranks agreed on in a collective)."""

    every_rank = False
    reported = False  # its line is printed (lmforge.errors.report)

    def __init__(self, message: str = "", every_rank: bool = False) -> None:
        super().__init__(message)
        self.every_rank = every_rank


def report(err: LmforgeError) -> None:
    """Print the error's one line to stderr, once."""
    if not err.reported:
        sys.stderr.write(f"lmforge: error: {err}\n")  # one write: ranks' lines do not interleave
        sys.stderr.flush()
        err.reported = True


class ConfigError(LmforgeError):
    """A config key is unknown, has the wrong type, or an invalid value."""


class CheckpointError(LmforgeError):
    """A checkpoint or run directory is missing, incomplete or corrupt."""
