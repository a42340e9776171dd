"""User-facing errors: one clear line, no traceback.

Every problem a user can fix (a typo in a config, a missing corpus, a corrupt checkpoint)
is raised as an `LmforgeError`; the CLI prints its message on one line and exits non-zero.
Anything else is a bug in lmforge and keeps its traceback.
"""


class LmforgeError(Exception):
    """A problem with the user's input, named in one line."""


class ConfigError(LmforgeError):
    """A config key is unknown, has the wrong type, or an invalid value."""


class CheckpointError(LmforgeError):
    """A checkpoint or run directory is missing, incomplete or corrupt."""
