"""`lmforge generate` end to end on a trained debug run: stop strings and a draft model on the
command line, and batch inference over a JSONL file: in input order, resumable after a crash, and
the same output from two gloo ranks under torchrun as from one process."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

import lmforge.infer.files as files_module
from lmforge import load
from lmforge.cli import main
from lmforge.infer.generate import complete

PROMPTS = ["def main(", "import os\n", "", "class Tree:\n    def", "x = [1, 2", "é → ∑", "return", "# note"]
GREEDY = ["--temperature", "0", "--max-new-tokens", "10"]


@pytest.fixture(scope="module")
def run(tmp_path_factory, session_debug_config) -> Path:
    """A debug llama pretrained 2 steps on the test corpus."""
    from lmforge.train.pretrain import pretrain

    out = tmp_path_factory.mktemp("generate") / "run"
    quiet = {"progress": False, "tensorboard": False, "plot": False}
    pretrain(
        session_debug_config(train={"max_steps": 2, "eval_every": 0, "sample_tokens": 0}, logging=quiet), out
    )
    return out


@pytest.fixture
def prompts_file(tmp_path) -> Path:
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    return path


def records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_the_cli_cuts_at_a_stop_string_and_a_draft_changes_nothing_but_the_speed(run, capsys):
    assert main(["generate", str(run), "--prompt", "def ", *GREEDY]) == 0
    plain = capsys.readouterr().out.removesuffix("\n")
    continuation = plain.removeprefix("def ")
    assert len(continuation) > 4
    stop = continuation[2:4]
    assert main(["generate", str(run), "--prompt", "def ", *GREEDY, "--stop", stop]) == 0
    assert capsys.readouterr().out == "def " + continuation[: continuation.index(stop)] + "\n"

    assert (
        main(["generate", str(run), "--prompt", "def ", *GREEDY, "--draft", str(run), "--draft-tokens", "3"])
        == 0
    )
    out, err = capsys.readouterr()
    assert out.removesuffix("\n") == plain
    assert "speculative decoding: acceptance rate 1.000" in err  # the run is its own draft


def test_a_prompts_file_gives_each_prompts_completion_in_order(run, prompts_file, tmp_path, capsys):
    out = tmp_path / "out.jsonl"
    assert main(["generate", str(run), "--input", str(prompts_file), "--output", str(out), "--batch-size", "3",
                 *GREEDY]) == 0  # fmt: skip
    summary = json.loads(capsys.readouterr().out)
    assert summary["generated"] == len(PROMPTS) and summary["skipped"] == 0
    model, tokenizer = load(run)
    got = records(out)
    assert [r["prompt"] for r in got] == PROMPTS
    for record, prompt in zip(got, PROMPTS, strict=True):
        assert record["completion"] == complete(model, tokenizer, prompt, 10, temperature=0.0)
        assert record["finish_reason"] in ("eos", "length") and 0 < record["tokens"] <= 10
    assert not list(tmp_path.glob("out.jsonl.*"))  # no part or temporary file left


def test_a_crashed_run_resumes_where_it_stopped(run, prompts_file, tmp_path, capsys, monkeypatch):
    args = ["generate", str(run), "--input", str(prompts_file), "--batch-size", "2", *GREEDY]
    reference = tmp_path / "reference.jsonl"
    assert main([*args, "--output", str(reference)]) == 0
    capsys.readouterr()
    # The state a crash leaves: three batches' lines flushed, the fourth torn mid-line, no output.
    out = tmp_path / "out.jsonl"
    lines = [
        json.dumps({"index": i, **r}, ensure_ascii=False) + "\n" for i, r in enumerate(records(reference))
    ]
    Path(f"{out}.part-0").write_text("".join(lines[:3]) + lines[3][:25])
    generated = []
    real = files_module.generate_batch_detailed

    def counting(model, prompts, *args, **kwargs):
        generated.extend(prompts)
        return real(model, prompts, *args, **kwargs)

    monkeypatch.setattr(files_module, "generate_batch_detailed", counting)
    assert main([*args, "--output", str(out)]) == 0
    assert json.loads(capsys.readouterr().out)["skipped"] == 3
    assert len(generated) == len(PROMPTS) - 3  # the torn line's prompt is generated again
    assert out.read_bytes() == reference.read_bytes()
    assert not list(tmp_path.glob("out.jsonl.*"))

    # Done: a second run finds everything in the output and generates nothing.
    generated.clear()
    assert main([*args, "--output", str(out)]) == 0
    assert generated == [] and out.read_bytes() == reference.read_bytes()
    # An output made from other prompts is not resumed into.
    other = tmp_path / "other.jsonl"
    other.write_text(json.dumps({"prompt": "something else"}) + "\n")
    assert main(["generate", str(run), "--input", str(other), "--output", str(out)]) == 2
    assert "holds an output for another prompts file" in capsys.readouterr().err


def test_two_gloo_ranks_under_torchrun_write_what_one_process_writes(run, prompts_file, tmp_path, capsys):
    one = tmp_path / "one.jsonl"
    args = ["generate", str(run), "--input", str(prompts_file), "--batch-size", "2", "--device", "cpu",
            *GREEDY]  # fmt: skip
    assert main([*args, "--output", str(one)]) == 0
    two = tmp_path / "two.jsonl"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               "-m", "lmforge", *args, "--output", str(two)]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, timeout=150)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["generated"] == len(PROMPTS) // 2  # rank 0's share: prompts 0, 2, 4, 6
    assert two.read_bytes() == one.read_bytes()
    assert not list(tmp_path.glob("two.jsonl.*"))


def test_models_split_over_gloo_ranks_with_tp_generate_what_one_process_does(
    run, prompts_file, tmp_path, capsys
):
    """Tensor parallelism: each rank holds half of every block's heads and MLP channels and its KV
    caches half of the heads. Four processes with --tp 2 are two models that split the file; their
    tokens are those of one process. Two processes with --tp 2 are one model: one rank prints, and
    sampling without --seed draws one seed for both (or they would leave each other's collectives)."""
    one = tmp_path / "one.jsonl"
    args = ["generate", str(run), "--device", "cpu", *GREEDY]
    assert main([*args, "--input", str(prompts_file), "--output", str(one), "--batch-size", "3"]) == 0
    capsys.readouterr()
    assert main([*args, "--prompt", "class Tree:\n    def"]) == 0
    alone = capsys.readouterr().out

    def torchrun(processes: int, *more: str) -> subprocess.CompletedProcess:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
                   str(processes), "-m", "lmforge", *args, "--tp", "2", *more]  # fmt: skip
        result = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, timeout=200)
        assert result.returncode == 0, result.stderr[-3000:]
        return result

    four = tmp_path / "four.jsonl"
    result = torchrun(4, "--input", str(prompts_file), "--output", str(four), "--batch-size", "3")
    assert json.loads(result.stdout.strip().splitlines()[-1])["generated"] == len(PROMPTS) // 2  # model 0's
    assert four.read_bytes() == one.read_bytes()
    assert not list(tmp_path.glob("four.jsonl.*"))
    assert torchrun(2, "--prompt", "class Tree:\n    def").stdout == alone  # printed once, by rank 0
    sampled = torchrun(2, "--prompt", "def", "--temperature", "0.9", "--max-new-tokens", "24").stdout
    assert sampled.startswith("def") and sampled.count("\n") >= 1


def test_tp_gets_one_line_for_what_it_cannot_do(run, prompts_file, capsys, monkeypatch):
    assert main(["generate", str(run), "--tp", "2", "--prompt", "x"]) == 2  # one process
    assert "--tp 2 must divide the number of processes torchrun starts (1)" in capsys.readouterr().err
    monkeypatch.setenv("WORLD_SIZE", "3")  # refused before the processes meet: no torchrun needed
    assert main(["generate", str(run), "--tp", "3", "--input", str(prompts_file), "--output", "o.jsonl"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("lmforge: error: --tp 3:") and "divisible" in err and len(err.splitlines()) == 1
