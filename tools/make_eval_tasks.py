"""Write the data of lmforge's own lm-evaluation-harness tasks (src/lmforge/evaluate/tasks/) from the
Python standard library's source, so that `lmforge eval RUN --tasks stdlib_mc,stdlib_ppl` runs with
no download. Run once; its output is committed (the rows then stay the same on every Python):

    .venv/bin/python tools/make_eval_tasks.py

stdlib_mc.jsonl   80 rows (at most 4 per module): `def name(arguments):` and the opening of its docstring as the context,
                  four candidate first lines of the docstring (the right one and three other
                  functions' of the same module where it has enough), `label` the right one's index
stdlib_ppl.jsonl  20 documents: the opening of a stdlib module's source (about 3000 characters, cut
                  at a line end), for perplexity with the whole document scored
"""

from __future__ import annotations

import ast
import json
import random
import sysconfig
from pathlib import Path

STDLIB = Path(sysconfig.get_paths()["stdlib"])
OUT = Path(__file__).resolve().parents[1] / "src" / "lmforge" / "evaluate" / "tasks"

MC_MODULES = ("argparse.py", "base64.py", "bisect.py", "calendar.py", "configparser.py", "copy.py", "csv.py",
              "difflib.py", "fnmatch.py", "fractions.py", "functools.py", "glob.py", "gzip.py", "heapq.py",
              "inspect.py", "ipaddress.py", "os.py", "pathlib.py", "posixpath.py", "random.py", "shlex.py",
              "shutil.py", "statistics.py", "string.py", "tarfile.py", "tempfile.py", "textwrap.py",
              "zipfile.py")  # fmt: skip
MC_ROWS = 80
MC_PER_MODULE = 4
PPL_MODULES = ("abc.py", "bisect.py", "colorsys.py", "contextvars.py", "copyreg.py", "fnmatch.py",
               "genericpath.py", "getopt.py", "glob.py", "heapq.py", "keyword.py", "numbers.py",
               "opcode.py", "operator.py", "queue.py", "sched.py", "shlex.py", "stat.py", "textwrap.py",
               "this.py")  # fmt: skip
PPL_CHARS = 3000


def documented_functions(module: str) -> list[tuple[str, str, int]]:
    """(`def name(arguments):` line, first line of its docstring, line number) of a module's
    functions whose docstring opens with a line of 20 to 100 characters."""
    path = STDLIB / module
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef) and not node.name.startswith("_"):
            doc = ast.get_docstring(node, clean=True)
            first = doc.splitlines()[0].strip() if doc else ""
            if 20 <= len(first) <= 100:
                found.append((f"def {node.name}({ast.unparse(node.args)}):", first, node.lineno))
    return found


def multiple_choice_rows(rng: random.Random) -> list[dict]:
    by_module = {module: documented_functions(module) for module in MC_MODULES}
    every_line = sorted({first for functions in by_module.values() for _, first, _ in functions})
    candidates = [(module, f) for module, functions in by_module.items() for f in functions]
    rng.shuffle(candidates)
    taken: dict[str, int] = {}
    rows = []
    for module, (signature, first, lineno) in candidates:
        if len(rows) == MC_ROWS or taken.get(module, 0) == MC_PER_MODULE:
            continue  # at most a few rows per module: many modules, not mostly the largest
        taken[module] = taken.get(module, 0) + 1
        # Distractors from the same module where it has three others: the same vocabulary, so the
        # choice turns on the function, not on the module's subject.
        same = sorted({f for _, f, _ in by_module[module]} - {first})
        pool = same if len(same) >= 3 else sorted(set(every_line) - {first})
        choices = [first, *rng.sample(pool, 3)]
        rng.shuffle(choices)
        rows.append(
            {
                "context": f'{signature}\n    """',
                "choices": choices,
                "label": choices.index(first),
                "origin": f"{module}:{lineno}",
            }
        )
    return rows


def perplexity_rows() -> list[dict]:
    rows = []
    for module in PPL_MODULES:
        text = (STDLIB / module).read_text(encoding="utf-8")
        cut = text.rfind("\n", 0, PPL_CHARS) + 1 if len(text) > PPL_CHARS else len(text)
        rows.append({"text": text[:cut], "origin": module})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    tmp.replace(path)  # never a half-written data file under the real name
    print(f"{path}: {len(rows)} rows")


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    write_jsonl(OUT / "stdlib_mc.jsonl", multiple_choice_rows(random.Random(0)))
    write_jsonl(OUT / "stdlib_ppl.jsonl", perplexity_rows())


if __name__ == "__main__":
    main()
