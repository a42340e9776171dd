"""Fine-tuning on the one training loop: `train.init` (lmforge finetune --init) with the freeze and
lora sections, in one process. Layouts with several processes: test_finetune_parallel.py."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lmforge.api import load
from lmforge.cli import main
from lmforge.config import load_config
from lmforge.errors import CheckpointError, ConfigError
from lmforge.rundir import (
    checkpoint_weights,
    export_checkpoint,
    latest_checkpoint,
    meta_model,
    tensor_headers,
)
from lmforge.train.pretrain import pretrain

QUIET = {"progress": False, "tensorboard": False, "plot": False}


def finetune(debug_config, base_run: Path, out: Path, steps: int = 4, **sections) -> Path:
    train = {
        "max_steps": steps,
        "eval_every": 0,
        "sample_tokens": 0,
        "init": str(base_run),
        **sections.pop("train", {}),
    }
    checkpoint = {"every_steps": 2, **sections.pop("checkpoint", {})}
    pretrain(debug_config(train=train, checkpoint=checkpoint, logging=QUIET, **sections), out)
    return latest_checkpoint(out)


def weights(ckpt: Path) -> dict[str, torch.Tensor]:
    return checkpoint_weights(ckpt, merge_adapters=False)


@pytest.mark.parametrize(
    ("freeze", "frozen"),
    [
        ({"embeddings": True, "first_blocks": 1}, lambda n: n.startswith(("tok_embeddings.", "layers.0."))),
        ({"all_but_head": True}, lambda n: not n.startswith("output.")),
    ],
    ids=["embeddings+first_block", "all_but_head"],
)
def test_frozen_parameters_do_not_change_and_get_no_optimizer_state(
    freeze, frozen, base_run, debug_config, tmp_path
):
    ckpt = finetune(debug_config, base_run, tmp_path / "run", freeze=freeze)
    before, after = weights(latest_checkpoint(base_run)), weights(ckpt)
    assert before.keys() == after.keys()
    frozen_names = sorted(n for n in before if frozen(n))
    assert frozen_names and len(frozen_names) < len(before)
    for name in before:
        assert torch.equal(before[name], after[name]) == frozen(name), name  # bit for bit, or trained
    # AdamW keeps exp_avg and exp_avg_sq for the trained parameters only: the state bytes show it.
    state = tensor_headers(ckpt / "optimizer")
    assert {key.removeprefix("state.").rsplit(".", 1)[0] for key in state} == set(before) - set(frozen_names)
    trained = sum(t.numel() for n, t in before.items() if not frozen(n))
    optimizer_bytes = sum(p.stat().st_size for p in (ckpt / "optimizer").glob("*.safetensors"))
    assert 2 * 4 * trained <= optimizer_bytes < 2 * 4 * trained + 16_384  # + the safetensors headers


def test_a_lora_run_trains_only_adapters_and_loads_merged(base_run, debug_config, tmp_path):
    ckpt = finetune(
        debug_config, base_run, tmp_path / "run", lora={"rank": 4, "targets": ["attention", "mlp"]}
    )
    base, tuned = weights(latest_checkpoint(base_run)), weights(ckpt)
    adapters = sorted(set(tuned) - set(base))
    assert adapters and all(n.endswith((".lora_A", ".lora_B")) for n in adapters)
    assert all(torch.equal(base[n], tuned[n]) for n in base)  # the base, bit for bit
    assert all(tuned[n].abs().max() > 0 for n in adapters if n.endswith("lora_B"))  # B moved off zero

    # The run as trained (adapters apart) and as lmforge.load gives it (merged) compute the same.
    unmerged = meta_model(ckpt)
    unmerged.to_empty(device="cpu")
    unmerged.init_weights()
    from lmforge.rundir import load_model_weights

    load_model_weights(unmerged, ckpt / "model")
    merged, _ = load(tmp_path / "run")
    assert not any("lora" in n for n, _ in merged.named_parameters())
    ids = torch.randint(3, 512, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (merged(ids) - unmerged.eval()(ids)).abs().max() < 1e-5
    # The lmforge export is the merged model, its config without adapters.
    out = export_checkpoint(ckpt, tmp_path / "export")
    exported = load_file(out)
    assert exported.keys() == base.keys()
    assert load_config(out.parent / "config.yaml").lora.rank == 0
    assert torch.equal(
        exported["layers.0.attention.wq.weight"], merged.layers["0"].attention.wq.weight.detach()
    )


def test_a_lora_run_resumes_exactly(base_run, debug_config, tmp_path):
    lora = {"rank": 4, "dropout": 0.1}  # dropout: the RNG state must be restored too
    straight = weights(finetune(debug_config, base_run, tmp_path / "straight", steps=6, lora=lora))
    finetune(debug_config, base_run, tmp_path / "resumed", steps=4, lora=lora)
    cfg = dataclasses.replace(load_config(tmp_path / "resumed" / "config.yaml"))
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, max_steps=6))
    pretrain(cfg, tmp_path / "resumed", resume=True)
    resumed = weights(latest_checkpoint(tmp_path / "resumed"))
    assert all(torch.equal(straight[n], resumed[n]) for n in straight)


def test_the_init_sets_model_tokenizer_and_context(base_run, debug_config, tmp_path):
    finetune(debug_config, base_run, tmp_path / "run", steps=2, data={"seq_len": 32})
    cfg = load_config(tmp_path / "run" / "config.yaml")
    base_cfg = load_config(base_run / "config.yaml")
    assert cfg.model == base_cfg.model
    assert cfg.train.init == str(latest_checkpoint(base_run).resolve())
    assert cfg.data.tokenizer == str(latest_checkpoint(base_run).resolve() / "tokenizer.json")
    assert cfg.data.seq_len == 32  # the config's own; by default the init's
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics if "loss" in m] == [1, 2]


@pytest.mark.parametrize(
    ("sections", "error", "message"),
    [
        (
            {"train": {"init": "no/such/run"}},
            CheckpointError,
            "run or checkpoint directory no/such/run does not exist",
        ),
        ({"model": {"family": "gpt2", "flavor": "debug"}}, ConfigError, "fine-tuning keeps the model"),
        (
            {"lora": {"rank": 2, "targets": ["wx"]}},
            ConfigError,
            "'wx' names no linear layer of a llama block",
        ),
        (
            {"freeze": {"first_blocks": 3}},
            ConfigError,
            "'freeze.first_blocks' is 3 but the model has 2 blocks",
        ),
    ],
    ids=["init-missing", "other-model", "lora-target", "too-many-blocks"],
)
def test_bad_fine_tuning_input_is_one_clear_error(sections, error, message, base_run, debug_config, tmp_path):
    with pytest.raises(error, match=message):
        finetune(debug_config, base_run, tmp_path / "run", steps=2, **sections)
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_fine_tuning_refuses_data_of_another_tokenizer(base_run, debug_config, tmp_path, corpus_dir):
    from lmforge.data.prepare import prepare_data

    other = tmp_path / "other-data"
    prepare_data(str(corpus_dir), other, vocab_size=300, val_fraction=0.2, seed=0, num_workers=1)
    with pytest.raises(
        ConfigError, match="prepared with another tokenizer than that of config key 'train.init'"
    ):
        finetune(debug_config, base_run, tmp_path / "run", steps=2, data={"dir": str(other)})


def test_fine_tuning_a_lora_run_is_refused(base_run, debug_config, tmp_path):
    finetune(debug_config, base_run, tmp_path / "lora", steps=2, lora={"rank": 2})
    with pytest.raises(ConfigError, match="is a LoRA run"):
        finetune(debug_config, tmp_path / "lora", tmp_path / "again", steps=2)


def test_the_cli_needs_an_init(capsys, tmp_path):
    recipe = Path(__file__).parents[2] / "recipes" / "debug.yaml"
    assert main(["finetune", "--config", str(recipe), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert (
        err
        == "lmforge: error: finetune needs --init RUN_OR_CHECKPOINT: the run or checkpoint whose weights it starts from\n"
    )


@pytest.mark.parametrize(
    "kind",
    [
        ["--freeze.first_blocks=1"],
        ["--lora.rank=4", "--lora.targets=[wq, wv]"],
        ["--data.task=sft", "--data.source=stdlib-docstrings", "--data.dir=null", "--lora.rank=4"],
    ],
    ids=["frozen", "lora", "sft-lora"],
)
def test_lmforge_finetune_end_to_end(kind, base_run, tmp_path, capsys):
    """The command as a user types it, then generate and eval on the result."""
    recipe = Path(__file__).parents[2] / "recipes" / "debug.yaml"
    out = tmp_path / "run"
    args = ["finetune", "--config", str(recipe), "--init", str(base_run), "--out", str(out), "--train.max_steps=3",
            "--train.eval_every=0", "--train.sample_tokens=0", "--logging.progress=false", *kind]  # fmt: skip
    assert main(args) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["step"] == 3
    chat = ["--chat"] if "--data.task=sft" in kind else []
    assert (
        main(["generate", str(out), "--prompt", "def", "--max-new-tokens", "4", "--temperature", "0", *chat])
        == 0
    )
    if not chat:
        assert main(["eval", str(out), "--batches", "2"]) == 0
        assert "val_loss" in json.loads(capsys.readouterr().out.strip().splitlines()[-1])
