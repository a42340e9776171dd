"""Corpus sources: turn a ``source`` string into a stream of ``(origin, text)`` documents.

A source is one of:

- ``stdlib``: every ``.py`` file of the running Python's standard library (no ``site-packages``);
- ``python``: every ``.py`` file of the running Python's installation: the standard library and
  its ``site-packages`` (origins ``stdlib/...`` and ``site-packages/...``);
- a file: a ``.jsonl`` file (one JSON object per line, document = its ``text`` field), a ``.parquet``
  file (document = one value of its ``text`` column), any other file (document = the whole file);
- a directory: every regular file under it, recursively, sorted, skipping hidden files and folders
  (``.git``) and ``__pycache__``; each file is read by its suffix as above;
- a glob pattern (``data/**/*.txt``, ``*`` ``?`` ``[``), matched recursively, sorted.

Text is read as bytes and decoded as UTF-8 exactly (no newline translation), so documents keep CRLF
and a BOM. Files with NUL bytes or invalid UTF-8 are skipped with a :class:`DataWarning` naming them;
empty and whitespace-only documents are skipped silently. The origin of a document is stable across
machines and spellings of the source (a path relative to the corpus folder: the directory, the file's
folder, or a glob's folder before its first wildcard; plus ``:line``/``:row`` for JSONL/Parquet),
because the train/val split is a function of it.
"""

from __future__ import annotations

import glob
import itertools
import json
import os
import sysconfig
import warnings
from collections.abc import Iterator
from pathlib import Path

from lmforge.data.errors import DataError, DataWarning

STDLIB = "stdlib"
PYTHON = "python"
_GLOB_CHARS = "*?["
_SKIPPED_DIRS = {"__pycache__", "site-packages", "dist-packages"}
_PARQUET_BATCH_ROWS = 1024
_SNIFF_BYTES = 1 << 16


def _stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _site_packages_dirs() -> list[Path]:
    """The running Python's site-packages folders (purelib and platlib; one folder on most systems)."""
    paths = sysconfig.get_paths()
    dirs = dict.fromkeys(Path(paths[key]).resolve() for key in ("purelib", "platlib"))
    return [d for d in dirs if d.is_dir()]


def _python_files(root: Path, prefix: str = "") -> list[tuple[str, Path]]:
    """(prefix + path relative to root, path) of the .py files under root, outside __pycache__ and
    nested site-packages."""
    found = []
    for path in root.rglob("*.py"):
        relative = path.relative_to(root)
        if path.is_file() and not _SKIPPED_DIRS.intersection(relative.parts[:-1]):
            found.append((prefix + relative.as_posix(), path))
    return found


def _resolve(source: str, exclude: str | Path | None) -> list[tuple[str, Path]]:
    """(origin, path) of every file of the source, sorted by origin."""
    files = _find_files(source)
    if exclude is not None:
        excluded = Path(exclude).resolve()
        files = [(origin, p) for origin, p in files if not p.resolve().is_relative_to(excluded)]
    return sorted(files, key=lambda item: item[0])


def _relative_to(root: Path, files: list[Path]) -> list[tuple[str, Path]]:
    return [(p.relative_to(root).as_posix(), p) for p in files]


def _find_files(source: str) -> list[tuple[str, Path]]:
    if source == STDLIB:
        return _python_files(_stdlib_dir())
    if source == PYTHON:
        # Origins "stdlib/..." and "site-packages/...": the same on every machine with the same
        # packages, wherever the installation lives.
        files = _python_files(_stdlib_dir(), "stdlib/")
        for site in _site_packages_dirs():
            files += _python_files(site, "site-packages/")
        return files
    path = Path(source)
    if path.is_file():
        return _relative_to(path.parent, [path])
    if path.is_dir():
        return _relative_to(path, _walk(path))
    if any(ch in source for ch in _GLOB_CHARS):
        # Origins are relative to the pattern's folder before its first wildcard ("data" of "data/**/*.txt").
        base = Path(*itertools.takewhile(lambda part: not any(ch in part for ch in _GLOB_CHARS), path.parts))
        matches = [Path(p) for p in glob.glob(source, recursive=True) if os.path.isfile(p)]
        if not matches:
            raise DataError(f"corpus glob '{source}' matches no files")
        return _relative_to(base, matches)
    raise DataError(
        f"corpus '{source}' does not exist (expected 'stdlib', 'python', a file, a directory or a glob)"
    )


def _walk(root: Path) -> list[Path]:
    files = []
    for dirpath, dirnames, filenames in os.walk(root):  # does not follow symlinked folders: no cycles
        dirnames[:] = [d for d in dirnames if not d.startswith(".") and d != "__pycache__"]
        for name in filenames:
            path = Path(dirpath) / name
            if not name.startswith(".") and path.is_file():
                files.append(path)
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def list_files(source: str, exclude: str | Path | None = None) -> list[Path]:
    """The files of ``source``, sorted, in the order :func:`iter_documents` reads them.

    ``exclude``: a folder whose files are left out (the output folder, when it is inside the corpus).
    """
    return [path for _, path in _resolve(source, exclude)]


def iter_documents(
    source: str, skipped: list[str] | None = None, warn: bool = True, exclude: str | Path | None = None
) -> Iterator[tuple[str, str]]:
    """Yield ``(origin, text)`` for every non-empty document of ``source``.

    Skipped files (binary, not UTF-8) are appended to ``skipped`` if given and reported with a
    :class:`DataWarning` if ``warn``. DataError if the source does not exist or has no document.
    ``exclude``: as for :func:`list_files`.
    """
    files = _resolve(source, exclude)  # now, so that a missing or empty source fails at the call
    if not files:
        raise DataError(f"corpus '{source}' has no readable text documents (0 files looked at)")
    return _documents(source, files, skipped, warn)


def _documents(
    source: str, files: list[tuple[str, Path]], skipped: list[str] | None, warn: bool
) -> Iterator[tuple[str, str]]:
    n_documents = 0
    skipped = [] if skipped is None else skipped
    n_skipped_before = len(skipped)
    for origin, path in files:
        suffix = path.suffix.lower()
        if suffix == ".jsonl":
            documents = _read_jsonl(path, origin)
        elif suffix == ".parquet":
            documents = _read_parquet(path, origin)
        else:
            documents = _read_text(path, origin, skipped, warn)
        for doc in documents:
            if doc[1].strip():
                n_documents += 1
                yield doc
    if n_documents == 0:
        n_skipped = len(skipped) - n_skipped_before
        raise DataError(
            f"corpus '{source}' has no readable text documents ({len(files)} files looked at, "
            f"{n_skipped} skipped as binary or not UTF-8)"
        )


def _sniff(head: bytes) -> str | None:
    """Why a file's first bytes show it is not text, or None (a character cut at their end is fine)."""
    if b"\0" in head:
        return "binary (has NUL bytes)"
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as err:
        if err.end < len(head):
            return f"not UTF-8 (byte {err.start})"
    return None


def _read_text(path: Path, origin: str, skipped: list[str] | None, warn: bool) -> Iterator[tuple[str, str]]:
    try:
        with path.open("rb") as f:
            # A binary file (an archive, a checkpoint left in the corpus) shows it in its first bytes:
            # it is skipped without being read into memory whole.
            reason = _sniff(f.read(_SNIFF_BYTES))
            if reason is None:
                f.seek(0)
                data = f.read()
    except OSError as err:
        raise DataError(f"cannot read corpus file {path}: {err.strerror}") from err
    if reason is None and b"\0" in data:
        reason = "binary (has NUL bytes)"
    if reason is None:
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as err:
            reason = f"not UTF-8 (byte {err.start})"
    if reason is not None:
        if skipped is not None:
            skipped.append(str(path))
        if warn:
            warnings.warn(f"skipping {path}: {reason}", DataWarning, stacklevel=3)
        return
    yield origin, text


def _read_jsonl(path: Path, origin: str) -> Iterator[tuple[str, str]]:
    try:
        f = path.open("rb")
    except OSError as err:
        raise DataError(f"cannot read corpus file {path}: {err.strerror}") from err
    with f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError as err:  # JSONDecodeError and UnicodeDecodeError
                raise DataError(f"{path}:{lineno}: not valid JSON ({err})") from err
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise DataError(f"{path}:{lineno}: expected a JSON object with a string 'text' field")
            yield f"{origin}:{lineno}", record["text"]


def _read_parquet(path: Path, origin: str) -> Iterator[tuple[str, str]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except (OSError, pa.ArrowException) as err:
        raise DataError(f"cannot read parquet file {path}: {err}") from err
    columns = parquet.schema_arrow.names
    if "text" not in columns:
        raise DataError(f"parquet file {path} has no 'text' column (columns: {', '.join(columns)})")
    column_type = parquet.schema_arrow.field("text").type
    if not (pa.types.is_string(column_type) or pa.types.is_large_string(column_type)):
        raise DataError(f"parquet file {path}: column 'text' has type {column_type}, expected string")
    row = 0
    for batch in parquet.iter_batches(batch_size=_PARQUET_BATCH_ROWS, columns=["text"]):
        for text in batch.column(0).to_pylist():
            if text is not None:
                yield f"{origin}:{row}", text
            row += 1
