"""Supervised fine-tuning: the data (parsing, the chat template, the loss mask, packed and padded
rows), the vocabulary grown for the chat tokens, and `data.task: sft` runs on the one loop."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from lmforge.config import load_config
from lmforge.data.errors import DataError
from lmforge.data.sft import (
    CHAT_TOKENS,
    IGNORE_INDEX,
    SFTDataset,
    add_chat_tokens,
    build_rows,
    parse_example,
    prepare_sft,
    render,
    row_plan,
)
from lmforge.data.tokenizer import load_tokenizer
from lmforge.models import build_model, model_config
from lmforge.ops.cross_entropy import cross_entropy
from lmforge.rundir import checkpoint_weights, latest_checkpoint
from lmforge.train.pretrain import pretrain

QUIET = {"progress": False, "tensorboard": False, "plot": False}
ROW = 128  # positions per row: several examples fit one


def write_examples(path: Path, n: int = 60, seed: int = 0) -> Path:
    rng = random.Random(seed)
    with path.open("w") as f:
        for i in range(n):
            a, b = rng.randint(0, 99), rng.randint(0, 99)
            if i % 2:
                example = {"prompt": f"What is {a} plus {b}?", "response": f"{a} plus {b} is {a + b}."}
            else:
                example = {"messages": [{"role": "system", "content": "Add."}, {"role": "user", "content": f"{a}+{b}"},
                                        {"role": "assistant", "content": str(a + b)}]}  # fmt: skip
            f.write(json.dumps(example) + "\n")
    return path


@pytest.fixture(scope="module")
def chat_tokenizer(prepared_dir):
    return add_chat_tokens(load_tokenizer(prepared_dir / "tokenizer.json"))


def test_the_template_trains_on_the_assistants_tokens_only(chat_tokenizer):
    messages = parse_example(json.dumps({"prompt": "Hi?", "response": "Hello."}))
    ids, trained = render(messages, chat_tokenizer)
    text = chat_tokenizer.decode(ids, skip_special_tokens=False)
    assert text == "<|im_start|>user\nHi?<|im_end|>\n<|im_start|>assistant\nHello.<|im_end|>\n"
    learned = chat_tokenizer.decode(
        [i for i, t in zip(ids, trained, strict=True) if t], skip_special_tokens=False
    )
    assert learned == "Hello.<|im_end|>"


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('{"prompt": "a"', "not JSON"),
        ('["a"]', "expected a JSON object"),
        ('{"text": "a"}', 'expected {"prompt", "response"} or {"messages": [...]}'),
        (
            '{"messages": [{"role": "robot", "content": "x"}]}',
            "unknown role 'robot' (expected one of system, user, assistant)",
        ),
        ('{"messages": [{"role": "user", "content": "x"}]}', "no assistant message"),
        ('{"prompt": 1, "response": "b"}', "must be strings"),
    ],
)
def test_a_malformed_line_is_named(line, message, tmp_path, prepared_dir):
    data = tmp_path / "data.jsonl"
    data.write_text('{"prompt": "a", "response": "b"}\n' + line + '\n{"prompt": "c", "response": "d"}\n')
    with pytest.raises(
        DataError, match=re.escape(f"SFT data file {data}, line 2: ") + ".*" + re.escape(message)
    ):
        prepare_sft(str(data), tmp_path / "out", prepared_dir / "tokenizer.json", 64, 0.1, 0)
    assert not (tmp_path / "out" / "manifest.json").exists()
    with pytest.warns(UserWarning, match="skipped 1 malformed lines"):
        manifest = prepare_sft(
            str(data), tmp_path / "out", prepared_dir / "tokenizer.json", 64, 0.1, 0, "skip"
        )
    assert manifest["skipped"] == 1 and manifest["examples"] == {"train": 1, "val": 1}


@pytest.fixture(scope="module")
def sft_data(tmp_path_factory, prepared_dir) -> Path:
    tmp = tmp_path_factory.mktemp("sft")
    out = tmp / "prepared"
    prepare_sft(str(write_examples(tmp / "data.jsonl")), out, prepared_dir / "tokenizer.json", ROW, 0.2, 0)
    return out


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_a_packed_row_gives_each_example_the_logits_it_gets_alone(family, sft_data):
    dataset = SFTDataset(sft_data, "train")
    plan = row_plan(dataset.lengths, iter(range(len(dataset))), 2, ROW, packing=True)
    assert all(len(row) >= 2 for row in plan)  # several examples per row
    inputs, targets, doc_ids = build_rows(dataset, plan, ROW, pad_id=2)
    torch.manual_seed(0)
    model = build_model(model_config(family, "debug", vocab_size=576, max_seq_len=ROW), "cpu").eval()
    with torch.no_grad():
        packed = model(inputs, doc_ids=doc_ids)
        for row, examples in enumerate(plan):
            position = 0
            for index in examples:
                x, y = dataset.pairs(index)
                alone = model(torch.from_numpy(x)[None])[0]
                assert (packed[row, position : position + len(x)] - alone).abs().max() < 1e-5
                assert targets[row, position : position + len(y)].tolist() == y.tolist()
                position += len(x)
            assert (targets[row, position:] == IGNORE_INDEX).all()  # the padding has no loss


def test_prompt_positions_contribute_exactly_zero_gradient(sft_data):
    dataset = SFTDataset(sft_data, "train")
    plan = row_plan(dataset.lengths, iter(range(len(dataset))), 2, ROW, packing=True)
    inputs, targets, doc_ids = build_rows(dataset, plan, ROW, pad_id=2)
    torch.manual_seed(0)
    model = build_model(model_config("llama", "debug", vocab_size=576, max_seq_len=ROW), "cpu")
    logits = model(inputs, doc_ids=doc_ids)
    logits.retain_grad()
    cross_entropy(logits, targets).backward()
    per_position = logits.grad.abs().sum(-1)  # (B, T)
    ignored = targets == IGNORE_INDEX
    assert ignored.any() and (~ignored).any()
    assert (per_position[ignored] == 0).all()  # exactly zero, not small
    assert (per_position[~ignored] > 0).all()
    # The fused loss (what training uses) computes the same value from the same rows.
    fused = model(inputs, targets=targets, doc_ids=doc_ids)
    assert torch.allclose(fused, cross_entropy(logits.detach(), targets), atol=1e-5)


def test_padding_puts_one_example_per_row(sft_data):
    dataset = SFTDataset(sft_data, "train")
    plan = row_plan(dataset.lengths, iter(range(len(dataset))), 3, ROW, packing=False)
    assert plan == [[0], [1], [2]]


# ---------------------------------------------------------------------------- runs


@pytest.fixture(scope="module")
def examples_file(tmp_path_factory) -> Path:
    return write_examples(tmp_path_factory.mktemp("examples") / "train.jsonl", n=80)


def sft_run(debug_config, base_run, examples_file, out, steps=4, **sections):
    data = {"task": "sft", "source": str(examples_file), "dir": None, **sections.pop("data", {})}
    train = {
        "max_steps": steps,
        "eval_every": 2,
        "sample_tokens": 8,
        "init": str(base_run),
        **sections.pop("train", {}),
    }
    return pretrain(
        debug_config(data=data, train=train, checkpoint={"every_steps": 2}, logging=QUIET, **sections), out
    )


def test_the_vocabulary_grows_for_the_chat_tokens_from_the_mean(
    base_run, examples_file, debug_config, tmp_path
):
    result = sft_run(debug_config, base_run, examples_file, tmp_path / "run")
    assert result["step"] == 4 and np.isfinite(result["val_loss"])
    base = tmp_path / "run" / "base"
    tokenizer = load_tokenizer(base / "tokenizer.json")
    old_size = load_tokenizer(base_run / "tokenizer.json").get_vocab_size()
    assert [tokenizer.token_to_id(t) for t in CHAT_TOKENS] == [old_size, old_size + 1]
    old = checkpoint_weights(latest_checkpoint(base_run))["tok_embeddings.weight"]
    grown = checkpoint_weights(latest_checkpoint(base))["tok_embeddings.weight"]
    assert grown.shape[0] == 576 and old.shape[0] == 512  # 514 tokens, padded to a multiple of 64
    assert torch.equal(grown[:old_size], old[:old_size])
    assert torch.allclose(grown[old_size], old[:old_size].mean(0)) and torch.equal(grown[old_size], grown[-1])
    # The run's tokenizer is the grown one; its config names the user's init.
    assert load_tokenizer(tmp_path / "run" / "tokenizer.json").token_to_id(CHAT_TOKENS[0]) == old_size
    assert load_config(tmp_path / "run" / "config.yaml").train.init == str(
        latest_checkpoint(base_run).resolve()
    )
    # The Hugging Face export carries the template: transformers renders the same ids.
    transformers = pytest.importorskip("transformers")
    from lmforge.hf import export_hf

    export_hf(latest_checkpoint(tmp_path / "run"), tmp_path / "hf")
    messages = [
        {"role": "system", "content": "Add."},
        {"role": "user", "content": "1+2"},
        {"role": "assistant", "content": "3"},
    ]
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf").apply_chat_template(
        messages, return_dict=False
    )
    assert theirs == render(messages, tokenizer)[0]


@pytest.mark.parametrize("packing", [True, False], ids=["packed", "padded"])
def test_an_sft_run_resumes_exactly(packing, base_run, examples_file, debug_config, tmp_path):
    lora = {"rank": 4}
    sft_run(
        debug_config,
        base_run,
        examples_file,
        tmp_path / "straight",
        steps=6,
        data={"packing": packing},
        lora=lora,
    )
    sft_run(
        debug_config,
        base_run,
        examples_file,
        tmp_path / "resumed",
        steps=4,
        data={"packing": packing},
        lora=lora,
    )
    cfg = load_config(tmp_path / "resumed" / "config.yaml")
    from dataclasses import replace

    pretrain(replace(cfg, train=replace(cfg.train, max_steps=6)), tmp_path / "resumed", resume=True)
    straight = checkpoint_weights(latest_checkpoint(tmp_path / "straight"), merge_adapters=False)
    resumed = checkpoint_weights(latest_checkpoint(tmp_path / "resumed"), merge_adapters=False)
    assert all(torch.equal(straight[n], resumed[n]) for n in straight)


def test_an_sft_source_with_a_bad_line_fails_before_training(base_run, debug_config, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "response": "b"}\n{"messages": [{"role": "bot", "content": "x"}]}\n')
    with pytest.raises(DataError, match=rf"SFT data file {bad}, line 2: message 0 has unknown role 'bot'"):
        sft_run(debug_config, base_run, bad, tmp_path / "run")
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_sft_keeps_the_chat_tokens_trainable(base_run, examples_file, debug_config, tmp_path):
    """Their rows start equal (the mean): under LoRA the embedding and head train whole
    (lora.embeddings defaults on for SFT), and freezing the embeddings is refused."""
    from lmforge.errors import ConfigError

    with pytest.raises(ConfigError, match="freeze the embedding rows of the chat tokens"):
        sft_run(debug_config, base_run, examples_file, tmp_path / "frozen", freeze={"embeddings": True})
    sft_run(debug_config, base_run, examples_file, tmp_path / "run", lora={"rank": 4})
    assert load_config(tmp_path / "run" / "config.yaml").lora.embeddings is True
    tuned = checkpoint_weights(latest_checkpoint(tmp_path / "run"), merge_adapters=False)[
        "tok_embeddings.weight"
    ]
    start, end = (load_tokenizer(tmp_path / "run" / "tokenizer.json").token_to_id(t) for t in CHAT_TOKENS)
    assert not torch.equal(tuned[start], tuned[end])  # the two new tokens learned apart
    from lmforge.errors import CheckpointError
    from lmforge.hf import export_peft

    with pytest.raises(CheckpointError, match="also trained its embeddings"):
        export_peft(latest_checkpoint(tmp_path / "run"), tmp_path / "peft")
