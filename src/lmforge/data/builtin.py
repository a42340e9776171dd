"""Built-in tasks made from the Python standard library's source: real text on every machine, no
download. Used by the docs' commands, the benchmarks and the tests.

    stdlib-docstrings   supervised fine-tuning examples: the prompt asks for the docstring of a
                        documented function, `name(arguments)`, of a few stdlib packages; the
                        response is that docstring (its first 600 characters)
    stdlib-packages     classification: which top-level package (asyncio, email, json, ... 11 of
                        them) a chunk of 24 source lines comes from; split by file, so no file is
                        on both sides
"""

from __future__ import annotations

import ast
import sysconfig
from pathlib import Path

STDLIB_DOCSTRINGS = "stdlib-docstrings"
DOCSTRING_PACKAGES = ("json", "email", "http", "asyncio", "unittest", "xml", "multiprocessing", "logging")


def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def docstring_examples(
    packages: tuple[str, ...] = DOCSTRING_PACKAGES,
) -> list[tuple[str, list[dict[str, str]]]]:
    """(origin "file:line", messages) for every documented function of `packages`, in file order."""
    examples = []
    for package in packages:
        for path in sorted((stdlib_dir() / package).rglob("*.py")):
            try:
                tree = ast.parse(path.read_text(encoding="utf-8", errors="replace"))
            except SyntaxError:  # a test fixture that is not Python on purpose
                continue
            for node in ast.walk(tree):
                if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                    doc = ast.get_docstring(node)
                    if doc:
                        prompt = f"Write the docstring of {node.name}({ast.unparse(node.args)})."
                        messages = [
                            {"role": "user", "content": prompt},
                            {"role": "assistant", "content": doc[:600]},
                        ]
                        examples.append((f"{path}:{node.lineno}", messages))
    return examples


STDLIB_PACKAGES = "stdlib-packages"
# Packages of the standard library with enough source each; tkinter, idlelib and the test suite are
# left out (not on every Python build, or not representative code).
CLASSIFY_PACKAGES = ("asyncio", "email", "json", "unittest", "xml", "multiprocessing", "http", "importlib",
                     "concurrent", "logging", "urllib")  # fmt: skip
CHUNK_LINES = 24


def package_examples(packages: tuple[str, ...] = CLASSIFY_PACKAGES) -> list[tuple[str, str, str]]:
    """(group, text, label): chunks of CHUNK_LINES lines of each package's source files (tests left
    out), labelled with the top-level package; the group is the file, so a split by group keeps
    every file whole on one side. Chunks that are mostly blank are left out."""
    examples = []
    for package in packages:
        root = stdlib_dir() / package
        for path in sorted(root.rglob("*.py")):
            if "test" in path.relative_to(root).parts[:-1] or path.name.startswith("test_"):
                continue
            lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
            for start in range(0, len(lines), CHUNK_LINES):
                chunk = "\n".join(lines[start : start + CHUNK_LINES])
                if len(chunk.strip()) >= 200:
                    examples.append((str(path), chunk, package))
    return examples
