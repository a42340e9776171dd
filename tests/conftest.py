"""Shared fixtures: a small real corpus (files of the Python standard library) and configs on it."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

# Tests compare losses across runs with ==; pin the thread count so every run does the same sums.
torch.set_num_threads(1)
# The processes the tests start (the CLI, torchrun's ranks) inherit one thread each too: under
# `make test` two pytest workers and their subprocesses share 2 cores, and more threads than cores
# make OpenMP's threads spin against each other (a step can then take several times longer).
os.environ.setdefault("OMP_NUM_THREADS", "1")

STDLIB = Path(sysconfig.get_paths()["stdlib"])
CORPUS_FILES = ["argparse.py", "json/decoder.py", "json/encoder.py", "textwrap.py", "shlex.py", "heapq.py",
                "bisect.py", "fnmatch.py", "glob.py", "string.py", "csv.py", "copy.py"]  # fmt: skip


@pytest.fixture(scope="session")
def corpus_dir(tmp_path_factory) -> Path:
    """~12 real Python source files (about 250 KB)."""
    out = tmp_path_factory.mktemp("corpus")
    for name in CORPUS_FILES:
        shutil.copyfile(STDLIB / name, out / name.replace("/", "_"))
    return out


@pytest.fixture(scope="session")
def prepared_dir(tmp_path_factory, corpus_dir) -> Path:
    """The small corpus prepared once per test session with a 512-token tokenizer."""
    from lmforge.data.prepare import prepare_data

    out = tmp_path_factory.mktemp("prepared")
    prepare_data(str(corpus_dir), out, vocab_size=512, val_fraction=0.2, seed=0, num_workers=1)
    return out


@pytest.fixture
def debug_config(prepared_dir):
    """debug_config(section={key: value}, ...): the debug recipe on the prepared test corpus."""
    return lambda **sections: make_debug_config(prepared_dir, **sections)


@pytest.fixture(scope="session")
def session_debug_config(prepared_dir):
    """debug_config for fixtures of a wider scope than one test."""
    return lambda **sections: make_debug_config(prepared_dir, **sections)


def make_debug_config(prepared_dir: Path, **sections):
    """The debug recipe on the prepared test corpus, with per-section overrides."""
    from lmforge.config import load_config, parse_config_dict, to_dict

    values = to_dict(load_config(Path(__file__).parent.parent / "recipes" / "debug.yaml"))
    values["data"]["dir"] = str(prepared_dir)
    values["data"]["vocab_size"] = 512
    values["logging"].update(progress=False, tensorboard=True, plot=True)
    for section, overrides in sections.items():
        values[section].update(overrides)
    return parse_config_dict(values)


# `make test` runs `pytest -n 2 --dist loadscope --no-loadscope-reorder`: two workers, each taking a
# whole module at a time (so a module's fixtures are built once), in collection order. The real
# quickstart is by far the longest test (minutes): first in the order, it starts at once on one
# worker while the other runs the rest of the suite beside it, instead of at the end.
# A fresh Python process: lmforge.load each run directory, its logits of the ids beside it.
_RELOAD = """
import sys
import torch
from safetensors.torch import load_file, save_file
import lmforge
ids = load_file(sys.argv[1])["ids"]
for out in sys.argv[2:]:
    model, _ = lmforge.load(out)
    with torch.no_grad():
        save_file({"logits": model(ids)}, out + ".logits.safetensors")
"""


@pytest.fixture(scope="session")
def logits_in_a_fresh_process(tmp_path_factory):
    """f(runs, ids) -> the logits of ids of each run directory, as one new Python process loads them
    (lmforge.load): what a saved artifact gives after the process that wrote it is gone."""

    def logits(runs: list[Path], ids: torch.Tensor) -> list[torch.Tensor]:
        ids_file = tmp_path_factory.mktemp("ids") / "ids.safetensors"
        save_file({"ids": ids.contiguous()}, ids_file)
        subprocess.run([sys.executable, "-c", _RELOAD, str(ids_file), *map(str, runs)], check=True)
        return [load_file(f"{run}.logits.safetensors")["logits"] for run in runs]

    return logits


FIRST = ("tests/cli/test_quickstart.py",)


def pytest_collection_modifyitems(config, items) -> None:
    order = {path: rank for rank, path in enumerate(FIRST)}
    # A stable sort: the other tests keep their order.
    items.sort(key=lambda item: order.get(item.nodeid.split("::")[0], len(order)))
