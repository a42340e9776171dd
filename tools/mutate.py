"""`make mutate`: mutation testing of the modules where a silent bug loses work or gives wrong answers.

For each module below, a scratch copy of the working tree gets a `[tool.mutmut]` section naming that
module and the tests that exercise it, and mutmut (https://github.com/boxed/mutmut) mutates it: one
small change at a time (an operator, a constant, a comparison), each run against the tests that
call the mutated function (mutmut maps tests to functions in a first run). A mutant the tests do not
notice "survived": either a test is missing, or the change is equivalent (the code does the same
thing) and is listed in tools/mutation_equivalents.yaml with one line of why, matched by the line
before and after.

    make mutate                                   # every module (not part of CI)
    .venv/bin/python tools/mutate.py --modules schedule,kv_cache

Prints one row per module (mutants, killed, equivalent, survived, not covered) and every survivor's
diff; the table goes into docs/reliability.md ("Mutation testing"). Needs `pip install mutmut`
(`make mutate` installs it).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]

# name -> (module, the tests that exercise it). Tests that only run the code in another process
# (the CLI in a subprocess, torch.multiprocessing) cannot see a mutant: mutmut switches mutants
# inside this process, so only in-process tests are listed.
MODULES: dict[str, tuple[str, list[str]]] = {
    "schedule": ("src/lmforge/train/schedule.py", ["tests/train/test_schedule.py"]),
    "kv_cache": ("src/lmforge/models/kv_cache.py", ["tests/infer", "tests/models"]),
    "loss": ("src/lmforge/ops/cross_entropy.py", ["tests/ops/test_cross_entropy.py"]),
    "generation": ("src/lmforge/infer/generate.py", ["tests/infer"]),
    "loader": ("src/lmforge/data/loader.py", ["tests/data"]),
    "guards": ("src/lmforge/train/guards.py", ["tests/train/test_guards.py"]),
    "checkpoint": ("src/lmforge/train/checkpoint.py", ["tests/train/test_checkpoint.py"]),
    "resume": ("src/lmforge/train/resume.py", ["tests/train/test_checkpoint.py"]),
}

EQUIVALENTS = Path(__file__).with_name("mutation_equivalents.yaml")
# pytest's exit code for each mutant -> its status, as mutmut.stats.status_by_exit_code except 2
# ("interrupted": a collection error, or a KeyboardInterrupt the mutant let through) and -2, -15
# (the test process ended by a SIGINT or SIGTERM the mutant left unhandled): the tests did not pass,
# so these count as killed, as do -6, -7 and -11 (the test process aborted, or died of a SIGBUS or
# SIGSEGV the mutant caused, e.g. by reading a truncated shard through a mapping it should not have
# kept).
STATUS = {
    0: "survived",
    1: "killed",
    2: "killed",
    -2: "killed",
    -15: "killed",
    -6: "killed",
    -7: "killed",
    -11: "killed",
    3: "killed",
    5: "not covered",
    33: "not covered",
    36: "timeout",
    24: "timeout",
    -24: "timeout",
    152: "timeout",
}


@dataclass
class Result:
    name: str
    module: str
    counts: dict[str, int] = field(default_factory=dict)
    survivors: list[tuple[str, str, str]] = field(default_factory=list)  # (key, before, after)
    equivalent: list[tuple[str, str]] = field(default_factory=list)  # (key, why)
    stale: list[tuple[str, str]] = field(default_factory=list)  # equivalents no survivor matched
    seconds: float = 0.0


def scratch_copy(dest: Path) -> None:
    """The working tree's files (tracked, and untracked ones git does not ignore) copied to dest."""
    if dest.exists():
        shutil.rmtree(dest)
    files = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, check=True, capture_output=True, text=True
    ).stdout.splitlines()
    for name in files:
        source = ROOT / name
        if source.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, dest / name)


def changed_line(diff: str) -> tuple[str, str]:
    """The mutated line before and after, from `mutmut show`'s diff."""
    before = next(
        (
            line[1:].strip()
            for line in diff.splitlines()
            if line.startswith("-") and not line.startswith("---")
        ),
        "",
    )
    after = next(
        (
            line[1:].strip()
            for line in diff.splitlines()
            if line.startswith("+") and not line.startswith("+++")
        ),
        "",
    )
    return before, after


def run(name: str, scratch: Path, mutmut: str, timeout_s: int, retry: bool = True) -> Result:
    module, tests = MODULES[name]
    work = scratch / name
    scratch_copy(work)
    with (work / "pyproject.toml").open("a") as f:
        f.write(
            "\n[tool.mutmut]\n"
            'source_paths = ["src/"]\n'
            f'only_mutate = ["{module}"]\n'
            'also_copy = ["recipes/"]\n'  # the tests' configs start from recipes/debug.yaml
            f"pytest_add_cli_args_test_selection = {json.dumps(tests)}\n"
            'pytest_add_cli_args = ["-q", "-x", "-p", "no:cacheprovider", "-p", "no:xdist", "-p", "no:randomly"]\n'
        )
    start = time.perf_counter()
    log = work / "mutmut.log"
    with log.open("w") as out:
        # its own session, so that a timeout ends mutmut and every test process it forked
        proc = subprocess.Popen([mutmut, "run", "--max-children", "2"], cwd=work, stdout=out, stderr=out,
                                start_new_session=True)  # fmt: skip
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise SystemExit(f"mutate: {name} ran past {timeout_s} s (log: {log})") from None
    meta_file = work / "mutants" / f"{module}.meta"
    if proc.returncode != 0 and "failed to collect stats" in log.read_text() and retry:
        # mutmut's traced first run (one pytest process for all the tests) now and then fails in its
        # own call-stack bookkeeping (a LookupError resetting its ContextVar); a second try passes.
        print(f"mutate: mutmut's stats run failed on {name}; once more (log: {log})", flush=True)
        return run(name, scratch, mutmut, timeout_s, retry=False)
    if proc.returncode != 0 or not meta_file.is_file():
        raise SystemExit(f"mutate: mutmut failed on {name} (exit {proc.returncode}; log: {log})")
    result = Result(name, module, seconds=time.perf_counter() - start)
    meta = json.loads(meta_file.read_text())
    equivalents = (
        (yaml.safe_load(EQUIVALENTS.read_text()) or {}).get(name) or [] if EQUIVALENTS.exists() else []
    )
    matched: set[tuple[str, str]] = set()
    for key, code in sorted(meta["exit_code_by_key"].items()):
        status = STATUS.get(code, "other")  # not checked, skipped, suspicious
        if status == "survived":
            diff = subprocess.run([mutmut, "show", key], cwd=work, capture_output=True, text=True).stdout
            before, after = changed_line(diff)
            entry = next((e for e in equivalents if (e["from"], e["to"]) == (before, after)), None)
            if entry is not None:
                # `where: gpu` or `where: torchrun`: a real difference, caught only by tests this run
                # cannot run (`pytest -m gpu`, tests/reliability's torchrun jobs): not caught here.
                status = "elsewhere" if entry.get("where") else "equivalent"
                result.equivalent.append((key, entry["why"]))
                matched.add((before, after))
            else:
                result.survivors.append((key, before, after))
        result.counts[status] = result.counts.get(status, 0) + 1
    # A listed equivalent that no survivor matches is killed now, or its code changed: drop the claim.
    result.stale = sorted({(e["from"], e["to"]) for e in equivalents} - matched)
    return result


def table(results: list[Result]) -> str:
    rows = ["| module | mutants | killed | equivalent | only GPU / torchrun tests | survived | not covered | "
            "timeout | other | caught of non-equivalent | time |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]  # fmt: skip
    for r in results:
        c = r.counts
        total, killed, equivalent = sum(c.values()), c.get("killed", 0), c.get("equivalent", 0)
        columns = (killed, equivalent, c.get("elsewhere", 0), c.get("survived", 0), c.get("not covered", 0),
                   c.get("timeout", 0), c.get("other", 0))  # fmt: skip
        assert sum(columns) == total, (r.name, c)
        # Caught: killed, or made the tests hang until the timeout (Stryker's "detected"; mutmut's ⏰).
        caught = killed + c.get("timeout", 0)
        rate = caught / (total - equivalent) if total > equivalent else 1.0
        rows.append(
            f"| `{r.module}` | {total} | "
            + " | ".join(map(str, columns))
            + f" | {rate:.1%} | {r.seconds:.0f} s |"
        )
    return "\n".join(rows)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--modules", default=",".join(MODULES), help=f"comma-separated, of: {', '.join(MODULES)}"
    )
    parser.add_argument("--scratch", default="/tmp/lmforge-mutate", help="where the mutated copies go")
    parser.add_argument("--timeout-s", type=int, default=1800, help="per module")
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args()
    names = [n for n in args.modules.split(",") if n]
    unknown = sorted(set(names) - set(MODULES))
    if unknown:
        print(f"mutate: unknown module(s) {unknown}; known: {', '.join(MODULES)}", file=sys.stderr)
        return 2
    mutmut = shutil.which("mutmut", path=str(Path(sys.executable).parent)) or shutil.which("mutmut")
    if mutmut is None:
        print("mutate: mutmut is not installed (pip install mutmut==3.8.1, or make mutate)", file=sys.stderr)
        return 2
    results = []
    for name in names:
        r = run(name, Path(args.scratch), mutmut, args.timeout_s)
        results.append(r)
        print(f"{name}: {r.counts} in {r.seconds:.0f} s", flush=True)
    print(table(results))
    for r in results:
        for key, before, after in r.survivors:
            print(f"survived {key}:\n  - {before}\n  + {after}")
        for before, after in r.stale:
            print(
                f"stale equivalent in {EQUIVALENTS.name} ({r.name}; no survivor matches it):\n  - {before}\n  + {after}"
            )
    if args.json:
        Path(args.json).write_text(json.dumps([r.__dict__ for r in results], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
