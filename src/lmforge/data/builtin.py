"""Built-in tasks made from the Python standard library's source: real text on every machine, no
download. Used by the docs' commands, the benchmarks and the tests.

    stdlib-docstrings   supervised fine-tuning examples: the prompt asks for the docstring of a
                        documented function, `name(arguments)`, of a few stdlib packages; the
                        response is that docstring (its first 600 characters)
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
