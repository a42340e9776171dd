"""Malformed inputs end in one line `lmforge: error: ...` naming the file or key, and exit code 2 (point 11).

Every case runs the real CLI in a subprocess under a wall-clock timeout and an address-space cap: a
parser that hangs, or that allocates what a corrupt length field claims, fails the test instead of
the machine. "Rehashed" cases also rewrite the checkpoint manifest to match the damaged file (bit rot
before the manifest was written, or a deliberate edit), so the file's own parser must catch it.
"""

from __future__ import annotations

import hashlib
import json
import resource
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer

RECIPE = Path(__file__).parents[2] / "recipes" / "debug.yaml"
TIMEOUT_S = 120  # a case takes ~4 s (mostly importing torch); a hang ends here
MEMORY_CAP = 4 << 30  # address space: torch imports and runs the debug model well within it


def _cap_memory() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_CAP, MEMORY_CAP))


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "lmforge", *args]
    return subprocess.run(
        command, capture_output=True, text=True, cwd=cwd, timeout=TIMEOUT_S, preexec_fn=_cap_memory
    )


def run_cli_concurrently(commands: dict[str, list[str]], cwd: Path) -> dict[str, subprocess.CompletedProcess]:
    """run_cli for several commands at once: most of a case's ~3 s is importing torch, which
    overlaps on several cores."""
    processes = {
        case: subprocess.Popen([sys.executable, "-m", "lmforge", *args], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, cwd=cwd, preexec_fn=_cap_memory)
        for case, args in commands.items()
    }  # fmt: skip
    results = {}
    try:
        for case, process in processes.items():
            stdout, stderr = process.communicate(timeout=TIMEOUT_S)
            results[case] = subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)
    finally:
        for process in processes.values():
            process.kill()  # only those still running after a timeout; a no-op for the others
            process.wait()
    return results


def assert_one_line_error(
    result: subprocess.CompletedProcess, *names: str, warnings: tuple[str, ...] = ()
) -> str:
    """Exit code 2 and stderr exactly one `lmforge: error: ...` line, which contains every one of
    `names`, after exactly the expected `lmforge: warning: ...` lines (each contains its `warnings` entry)."""
    assert result.returncode == 2, result.stderr[-3000:]
    lines = result.stderr.splitlines()
    assert len(lines) == len(warnings) + 1, result.stderr[-3000:]
    *warning_lines, error = lines
    for line, expected in zip(warning_lines, warnings, strict=True):
        assert line.startswith("lmforge: warning: ") and expected in line, result.stderr[-3000:]
    assert error.startswith("lmforge: error: "), result.stderr[-3000:]
    for name in names:
        assert name in error, error
    return error


# ---------------------------------------------------------------------------- checkpoints


@pytest.fixture(scope="module")
def trained_run(prepared_dir, tmp_path_factory) -> Path:
    """Two steps of the debug model, one checkpoint (step 2); the cases damage copies of it."""
    out = tmp_path_factory.mktemp("malformed") / "run"
    result = run_cli(
        "pretrain", "--config", str(RECIPE), "--out", str(out), f"--data.dir={prepared_dir}",
        "--data.vocab_size=512", "--train.max_steps=2", "--checkpoint.every_steps=0",
        "--logging.progress=false", "--logging.tensorboard=false", "--logging.plot=false",
        "--train.sample_tokens=0", cwd=out.parent,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def weights_file(ckpt: Path, part: str = "model") -> Path:
    (path,) = sorted((ckpt / part).glob("*.safetensors"))
    return path


def rehash_manifest(ckpt: Path) -> None:
    """Make the manifest agree with the files as they are now, so that only the files' parsers can
    object (bit rot before the manifest was written, or a deliberate edit)."""
    manifest = json.loads((ckpt / "manifest.json").read_text())
    for name, meta in manifest["files"].items():
        data = (ckpt / name).read_bytes()
        meta.update(bytes=len(data), sha256=hashlib.sha256(data).hexdigest())
    (ckpt / "manifest.json").write_text(json.dumps(manifest, indent=1))


def truncate_weights(ckpt: Path) -> list[str]:
    weights = weights_file(ckpt)
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # header kept, data cut
    return [str(weights)]


def truncate_optimizer_state(ckpt: Path) -> list[str]:
    optimizer = weights_file(ckpt, "optimizer")
    optimizer.write_bytes(optimizer.read_bytes()[:-100])
    return [str(optimizer)]


def claim_a_huge_header(ckpt: Path) -> list[str]:
    weights = weights_file(ckpt)
    data = weights.read_bytes()
    weights.write_bytes(struct.pack("<Q", 2**40) + data[8:])  # 1 TiB of header, under MEMORY_CAP = 4 GiB
    return [str(weights)]


def transpose_one_tensor(ckpt: Path) -> list[str]:
    """Rewrite the weights with one matrix's shape transposed: the tensor, the saved and the model's shape."""
    weights = weights_file(ckpt)
    tensors = load_file(str(weights))
    name = next(n for n, t in sorted(tensors.items()) if t.ndim == 2 and t.shape[0] != t.shape[1])
    expected = list(tensors[name].shape)
    tensors[name] = tensors[name].reshape(expected[::-1]).contiguous()
    save_file(tensors, str(weights), metadata={"format": "pt"})
    return [f"'{name}'", str(expected[::-1]), str(expected)]


def binary_config(ckpt: Path) -> list[str]:
    """A checkpoint's config.yaml is read by load_config (the recipe cases below, by the CLI's parser)."""
    (ckpt / "config.yaml").write_bytes(b"\x00\x01\xff\xfe not text")
    return [str(ckpt / "config.yaml"), "not UTF-8"]


def generate(run: Path, ckpt: Path) -> list[str]:
    return ["generate", str(ckpt), "--max-new-tokens=2"]


def export(run: Path, ckpt: Path) -> list[str]:
    return ["export", str(ckpt), "--out", str(run / "export")]


def export_run(run: Path, ckpt: Path) -> list[str]:
    return ["export", str(run), "--out", str(run / "export")]


def resume(run: Path, ckpt: Path) -> list[str]:
    return ["pretrain", "--out", str(run), "--resume", "--train.max_steps=3"]


DAMAGED = {  # case: (damage(ckpt) -> what the error line names, manifest rehashed to match, command)
    "truncated-weights": (truncate_weights, False, generate),
    "truncated-weights-rehashed/generate": (truncate_weights, True, generate),
    "truncated-weights-rehashed/export": (truncate_weights, True, export),
    "huge-header-rehashed": (claim_a_huge_header, True, generate),
    "truncated-optimizer-rehashed/resume": (truncate_optimizer_state, True, resume),
    "wrong-shape-rehashed/generate": (transpose_one_tensor, True, generate),
    "wrong-shape-rehashed/export": (transpose_one_tensor, True, export),
    "binary-config-rehashed": (binary_config, True, generate),
    "truncated-weights-in-run": (truncate_weights, False, export_run),
}


@pytest.fixture(scope="module")
def damaged_results(
    trained_run, tmp_path_factory
) -> dict[str, tuple[subprocess.CompletedProcess, list[str], Path]]:
    """Every case of DAMAGED on its own copy of the run, run concurrently: (result, names, run copy)."""
    root = tmp_path_factory.mktemp("damaged")
    commands, names, runs = {}, {}, {}
    for i, (case, (damage, rehash, command)) in enumerate(DAMAGED.items()):
        run = root / f"run{i}"
        shutil.copytree(trained_run, run)
        ckpt = run / "checkpoints" / "step_0000002"
        names[case] = damage(ckpt)
        if rehash:
            rehash_manifest(ckpt)
        commands[case], runs[case] = command(run, ckpt), run
    results = run_cli_concurrently(commands, cwd=root)
    return {case: (results[case], names[case], runs[case]) for case in DAMAGED}


@pytest.mark.parametrize("case", list(DAMAGED))
def test_damaged_checkpoint(case, damaged_results):
    result, names, run = damaged_results[case]
    if case == "truncated-weights-in-run":
        # The run's only checkpoint is skipped with a warning naming the file; the error names the run.
        skipped = f"skipping checkpoint step_0000002: checkpoint file {names[0]}"
        assert_one_line_error(result, str(run), warnings=(skipped,))
    else:
        assert_one_line_error(result, *names)
    assert not (run / "export").exists()  # a failed export leaves nothing behind


# ---------------------------------------------------------------------------- prepared token shards


def _grow_manifest_shard(data: Path) -> None:
    """The manifest claims one more token in train_000.bin than the file holds (totals kept consistent)."""
    manifest = json.loads((data / "manifest.json").read_text())
    shard = next(s for s in manifest["shards"] if s["file"] == "train_000.bin")
    shard["n_tokens"] += 1
    manifest["counts"]["tokens"]["train"] += 1
    (data / "manifest.json").write_text(json.dumps(manifest))


def _append_a_byte(data: Path) -> None:
    """train_000.bin is one byte longer than its n_tokens (and not a whole number of tokens)."""
    with open(data / "train_000.bin", "ab") as f:
        f.write(b"\x00")


@pytest.mark.parametrize("damage", [_grow_manifest_shard, _append_a_byte], ids=["manifest", "shard"])
def test_shard_length_mismatch_names_the_shard(damage, prepared_dir, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(prepared_dir, data)
    damage(data)
    result = run_cli(
        "pretrain", "--config", str(RECIPE), "--out", str(tmp_path / "run"), f"--data.dir={data}",
        "--data.vocab_size=512", "--train.max_steps=1", "--logging.progress=false", cwd=tmp_path,
    )  # fmt: skip
    assert_one_line_error(result, str(data / "train_000.bin"))
    assert not (tmp_path / "run" / "checkpoints").exists()


# ---------------------------------------------------------------------------- text corpora


def test_binary_and_non_utf8_files_are_skipped_with_a_warning(corpus_dir, tmp_path):
    corpus = tmp_path / "corpus"
    shutil.copytree(corpus_dir, corpus)
    (corpus / "good_marker.py").write_text("GOODMARKER = 'kept'\n")
    bad = {  # file: what its warning says
        corpus / "latin1.py": "not UTF-8",
        corpus
        / "late_latin1.py": "not UTF-8",  # past the first bytes that are checked before the rest is read
        corpus / "blob.py": "binary",
        corpus / "weights.bin": "binary",
    }
    (corpus / "latin1.py").write_bytes("BADMARKER = 'caf\xe9'\n".encode("latin-1"))
    (corpus / "late_latin1.py").write_bytes(b"BADMARKER = 1\n" + b"# filler\n" * 10_000 + b"caf\xe9\n")
    (corpus / "blob.py").write_bytes(b"BADMARKER = 1\n\x00\x01\x02\x03" * 4)
    with open(corpus / "weights.bin", "wb") as f:
        f.truncate(8 << 30)  # sparse, no disk used: 8 GiB of NULs, twice MEMORY_CAP, must not be read whole

    out = tmp_path / "data"
    result = run_cli("data", "prepare", "--source", str(corpus), "--out", str(out), "--vocab-size=300",
                     cwd=tmp_path)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    warnings = [line for line in result.stderr.splitlines() if line.startswith("lmforge: warning")]
    for path, reason in bad.items():
        assert any(f"skipping {path}: {reason}" in line for line in warnings), result.stderr

    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["counts"]["skipped_files"] == len(bad)
    assert sorted(manifest["skipped_sample"]) == sorted(str(path) for path in bad)
    assert sum(manifest["counts"]["documents"].values()) == len(list(corpus_dir.iterdir())) + 1
    tokenizer = Tokenizer.from_file(str(out / "tokenizer.json"))
    text = "".join(
        tokenizer.decode(np.fromfile(out / s["file"], dtype=manifest["dtype"]).tolist())
        for s in manifest["shards"]
    )
    assert "GOODMARKER" in text  # the check below could see a marker
    assert "BADMARKER" not in text


def test_empty_corpus_is_an_error_before_anything_is_written(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    out = tmp_path / "data"
    result = run_cli("data", "prepare", "--source", str(empty), "--out", str(out), cwd=tmp_path)
    assert_one_line_error(result, str(empty), "no readable text documents")
    assert not out.exists()


def test_corpus_of_only_unreadable_files_is_an_error(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "blob.bin").write_bytes(b"\x00\x01" * 100)
    (corpus / "latin1.txt").write_bytes(b"caf\xe9\n")
    out = tmp_path / "data"
    result = run_cli("data", "prepare", "--source", str(corpus), "--out", str(out), cwd=tmp_path)
    assert_one_line_error(result, str(corpus), "2 skipped")
    assert not (out / "manifest.json").exists()


# ---------------------------------------------------------------------------- YAML configs


def _alias_bomb() -> bytes:
    """~400 bytes of YAML whose aliases expand to 9**9 strings, as the value of a known key."""
    levels = ['&l0 ["x","x","x","x","x","x","x","x","x"]']
    levels += [f"&l{i} [{','.join([f'*l{i - 1}'] * 9)}]" for i in range(1, 9)]
    return f"model:\n  family: [{', '.join(levels)}]\n".encode()


RECIPES = {  # case: (file content, what the error line names)
    "unknown-key": (b"train:\n  max_stepz: 3\n", ["bad.yaml", "unknown config key 'train.max_stepz'"]),
    "unknown-section": (b"trian:\n  max_steps: 3\n", ["bad.yaml", "unknown config section 'trian'"]),
    "wrong-type": (b"train:\n  max_steps: abc\n", ["'train.max_steps'", "abc"]),
    "section-not-mapping": (b"train: 5\n", ["bad.yaml", "'train'"]),
    "not-yaml": (b"train: {max_steps: [1, 2\n", ["bad.yaml", "not valid YAML"]),
    "not-mapping": (b"- model\n- train\n", ["bad.yaml", "mapping"]),
    "binary": (b"\x00\x01\xff\xfe\x00 not text", ["bad.yaml", "not UTF-8"]),
    "empty": (b"# nothing but a comment\n", ["bad.yaml", "empty"]),
    "alias-bomb": (_alias_bomb(), ["bad.yaml", "more than"]),
}


@pytest.fixture(scope="module")
def recipe_results(tmp_path_factory) -> dict[str, tuple[subprocess.CompletedProcess, Path]]:
    """`pretrain --config bad.yaml` for every case of RECIPES, run concurrently; (result, its --out)."""
    root = tmp_path_factory.mktemp("recipes")
    commands = {}
    for case, (content, _) in RECIPES.items():
        (root / case).mkdir()
        (root / case / "bad.yaml").write_bytes(content)
        commands[case] = [
            "pretrain",
            "--config",
            str(root / case / "bad.yaml"),
            "--out",
            str(root / case / "run"),
        ]
    results = run_cli_concurrently(commands, cwd=root)
    return {case: (results[case], root / case / "run") for case in RECIPES}


@pytest.mark.parametrize("case", list(RECIPES))
def test_malformed_recipe(case, recipe_results):
    result, out = recipe_results[case]
    assert_one_line_error(result, *RECIPES[case][1])
    assert not out.exists()  # a config mistake is found before any work
