"""Fine-tuning under DDP and FSDP2 on 2 gloo processes (torchrun, as a user launches it): the same
losses as one process on the same global batch, and frozen weights unchanged bit for bit; SFT that
first grows the vocabulary; masked-LM pretraining; distillation from a teacher of another family."""

from __future__ import annotations

import json

import pytest
import torch

# The launch helpers of the pretraining layouts' tests (the same torchrun command line).
from test_data_parallel import assert_close, common_args, launch, losses

from lmforge.rundir import checkpoint_weights, latest_checkpoint, sha256_file

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def base(prepared_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("base") / "run"
    result = launch(1, common_args(prepared_dir, out, 1), out.parent)
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def finetune_args(prepared_dir, base, out, dp, *extra):
    args = common_args(prepared_dir, out, dp, f"--train.init={base}", "--train.max_steps=6", *extra)
    return ["finetune", *args[1:]]


KINDS = {
    "freeze": ["--freeze.embeddings=true", "--freeze.first_blocks=1"],
    "lora": ["--lora.rank=4", "--lora.targets=[attention, mlp]"],
}


@pytest.fixture(scope="module")
def single(prepared_dir, base, tmp_path_factory):
    """Each kind of fine-tuning in one process."""
    runs = {}
    for kind, extra in KINDS.items():
        out = tmp_path_factory.mktemp(kind) / "run"
        result = launch(1, finetune_args(prepared_dir, base, out, 1, *extra), out.parent)
        assert result.returncode == 0, result.stderr[-3000:]
        runs[kind] = out
    return runs


@pytest.mark.parametrize(
    ("kind", "layout"),
    [
        ("freeze", ["--parallel.dp_replicate=2", "--parallel.dp_shard=1"]),
        ("freeze", []),  # FSDP2 over both ranks
        ("lora", []),
    ],
    ids=["freeze-ddp", "freeze-fsdp", "lora-fsdp"],
)
def test_fine_tuning_matches_one_process(kind, layout, prepared_dir, base, single, tmp_path):
    out = tmp_path / "run"
    result = launch(2, finetune_args(prepared_dir, base, out, 2, *KINDS[kind], *layout), tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert_close(losses(out), losses(single[kind]))
    before = checkpoint_weights(latest_checkpoint(base))
    after = checkpoint_weights(latest_checkpoint(out), merge_adapters=False)
    frozen = (
        [n for n in before if n.startswith(("tok_embeddings.", "layers.0."))]
        if kind == "freeze"
        else list(before)
    )
    assert frozen and all(torch.equal(before[n], after[n]) for n in frozen)
    assert any(not torch.equal(before[n], after[n]) for n in before) == (kind == "freeze")


def test_masked_lm_under_fsdp_matches_one_process(prepared_dir, tmp_path):
    """The encoder's masked-LM pretraining: masks are drawn per global row, so 2 ranks of 4 rows
    train on exactly the batches one process of 8 does."""
    bert = ["--model.family=bert", "--model.flavor=debug", "--train.max_steps=6"]
    one = tmp_path / "one"
    result = launch(1, common_args(prepared_dir, one, 1, *bert), tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    two = tmp_path / "two"
    result = launch(2, common_args(prepared_dir, two, 2, *bert), tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert_close(losses(two), losses(one))


def test_sft_that_grows_the_vocabulary_under_fsdp_matches_one_process(prepared_dir, base, tmp_path):
    """The base has no chat tokens: SFT first writes a grown copy of it (a checkpoint, saved by every
    rank together), then trains; 2 ranks neither hang nor differ from one process."""
    examples = tmp_path / "chat.jsonl"
    lines = [
        {"prompt": f"What is {a} plus {b}?", "response": f"{a} plus {b} is {a + b}."}
        for a in range(40)
        for b in (1, 2)
    ]
    examples.write_text("".join(json.dumps(line) + "\n" for line in lines))
    runs = {}
    for nproc in (1, 2):
        out = tmp_path / f"run{nproc}"
        sft = [
            "--data.task=sft",
            f"--data.source={examples}",
            f"--data.dir={out}-data",
            "--data.val_fraction=0.2",
        ]
        result = launch(nproc, finetune_args(prepared_dir, base, out, nproc, *sft), tmp_path)
        assert result.returncode == 0, result.stderr[-3000:]
        assert (out / "base" / "tokenizer.json").is_file()  # the grown base
        runs[nproc] = out
    assert_close(losses(runs[2]), losses(runs[1]))


def test_distillation_under_fsdp_matches_one_process(prepared_dir, base, tmp_path):
    """`lmforge compress distill` of a gpt2 student from the llama base: each rank holds a whole
    teacher and distills on its half of the global batch; the losses and the student's weights are
    those of one process."""
    teacher_files = {p: sha256_file(p) for p in sorted(latest_checkpoint(base).rglob("*.safetensors"))}
    runs = {}
    for nproc in (1, 2):
        out = tmp_path / f"run{nproc}"
        args = common_args(prepared_dir, out, nproc, "--model.family=gpt2", "--train.max_steps=4")
        result = launch(nproc, ["compress", "distill", "--teacher", str(base), *args[1:]], tmp_path)
        assert result.returncode == 0, result.stderr[-3000:]
        runs[nproc] = out
    assert sorted(losses(runs[2])) == [1, 2, 3, 4]
    assert_close(losses(runs[2]), losses(runs[1]))
    one, two = (checkpoint_weights(latest_checkpoint(runs[n])) for n in (1, 2))
    assert one.keys() == two.keys() and "wte.weight" in one
    for name, tensor in one.items():
        assert (two[name] - tensor).abs().max() < 1e-4, name
    assert {p: sha256_file(p) for p in teacher_files} == teacher_files
