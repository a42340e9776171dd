"""Errors and warnings of the data pipeline.

Every problem with the user's input (a corpus, a tokenizer file, a prepared data directory) is raised
as :class:`DataError` with one line that names the file, key or value at fault, so the CLI can print it
as is. Problems that only cost some input (a binary file in a corpus) are :class:`DataWarning`.
"""

from __future__ import annotations

from lmforge.errors import LmforgeError


class DataError(LmforgeError):
    """A user-facing data problem; ``str(err)`` is one line naming the file/key/value at fault."""


class DataWarning(UserWarning):
    """Some input was skipped (a binary or non-UTF-8 file); the message names it."""
