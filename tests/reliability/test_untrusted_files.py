"""Checkpoints are data, never code (point 10): a pickle where state is read is refused unexecuted."""

from __future__ import annotations

import ast
import hashlib
import json
import pickle
import shutil
from pathlib import Path

import pytest
from common import checkpoint_dir, error_lines, pretrain_args, run

SRC = Path(__file__).parents[2] / "src" / "lmforge"


class Payload:
    """Unpickling this would create the sentinel file (pickle calls what __reduce__ returns)."""

    def __init__(self, sentinel: Path):
        self.sentinel = sentinel

    def __reduce__(self):
        return (Path.touch, (self.sentinel,))


def plant(ckpt: Path, relative: str, data: bytes) -> None:
    """Replace a checkpoint file and fix its manifest entry: the attacker controls the whole directory."""
    (ckpt / relative).write_bytes(data)
    manifest = json.loads((ckpt / "manifest.json").read_text())
    manifest["files"][relative] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (ckpt / "manifest.json").write_text(json.dumps(manifest))


@pytest.fixture(scope="module")
def trained(prepared_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("trained") / "run"
    result = run(pretrain_args(prepared_dir, out, steps=2, every=0), out.parent)
    assert result.returncode == 0, result.stderr[-3000:]
    return out


@pytest.mark.parametrize(
    ("target", "command"),
    [
        ("trainer_state.json", "resume"),
        ("model/model.safetensors", "resume"),
        ("model/model.safetensors", "generate"),
        ("optimizer/model.safetensors", "resume"),
    ],
)
def test_a_pickle_in_a_checkpoint_is_refused_and_never_run(target, command, trained, prepared_dir, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(trained, out)
    ckpt = checkpoint_dir(out, 2)
    if not (ckpt / target).exists():  # the shard's file name comes from DCP: take the one that is there
        target = str(next((ckpt / Path(target).parent).glob("*.safetensors")).relative_to(ckpt))
    sentinel = tmp_path / "pwned"
    plant(ckpt, target, pickle.dumps(Payload(sentinel)))
    if command == "resume":
        result = run([*pretrain_args(prepared_dir, out, steps=4), f"--resume-from={ckpt}"], tmp_path)
    else:
        result = run(["generate", str(ckpt), "--prompt", "def ", "--max-new-tokens", "4"], tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
    [line] = error_lines(result)
    assert Path(target).name in line
    assert not sentinel.exists()


def test_the_source_never_unpickles():
    """No pickle/marshal/eval/exec in lmforge; every torch.load-like call passes weights_only=True;
    numpy never loads with allow_pickle=True."""
    unpicklers = {"pickle", "marshal", "dill", "cloudpickle", "shelve", "joblib"}
    for path in SRC.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            where = f"{path}:{getattr(node, 'lineno', '?')}"
            if isinstance(node, ast.Import | ast.ImportFrom):
                names = {alias.name.split(".")[0] for alias in node.names}
                names.add((getattr(node, "module", None) or "").split(".")[0])
                assert not unpicklers & names, where
            if isinstance(node, ast.Call):
                func = ast.unparse(node.func)
                keywords = {k.arg: ast.unparse(k.value) for k in node.keywords}
                assert func not in ("eval", "exec", "compile", "__import__"), where
                if func.split(".")[-1] == "load" and func.split(".")[0] in ("torch", "serialization", "jit"):
                    assert keywords.get("weights_only") == "True", where
                assert keywords.get("allow_pickle") != "True", where
