"""Classification: the data (CSV and JSONL, labels, groups kept on one side, malformed lines), the
metrics, the heads of all three families, and `lmforge finetune` / `eval` / `classify` end to end."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import pytest
import torch

from lmforge.cli import main
from lmforge.data.builtin import package_examples
from lmforge.data.classify import LabelledDataset, prepare_classify, val_groups
from lmforge.data.errors import DataError
from lmforge.evaluate.classify import accuracy_and_macro_f1
from lmforge.models import build_model, model_config
from lmforge.rundir import checkpoint_weights, latest_checkpoint

QUIET = {"progress": False, "tensorboard": False, "plot": False}


def test_macro_f1_weighs_every_class_alike():
    gold = torch.tensor([0, 0, 0, 0, 1, 2])
    predicted = torch.tensor([0, 0, 0, 0, 0, 2])
    accuracy, macro_f1 = accuracy_and_macro_f1(predicted, gold)
    assert accuracy == pytest.approx(5 / 6)
    # F1: class 0: 2*4/(2*4+1+0) = 8/9; class 1: 0; class 2: 1
    assert macro_f1 == pytest.approx((8 / 9 + 0 + 1) / 3)


def test_csv_and_jsonl_give_the_same_examples_and_groups_stay_whole(tmp_path, prepared_dir):
    rows = [(f"text number {i} " * 3, "good" if i % 3 else "bad", f"g{i % 20}") for i in range(60)]
    (tmp_path / "a.csv").write_text(
        "text,label,group\n" + "".join(f'"{t}",{label},{g}\n' for t, label, g in rows)
    )
    (tmp_path / "b.jsonl").write_text(
        "".join(json.dumps({"text": t, "label": label, "group": g}) + "\n" for t, label, g in rows)
    )
    manifests = [prepare_classify(str(tmp_path / name), tmp_path / name.split(".")[0], prepared_dir / "tokenizer.json",
                                  32, 0.3, 0) for name in ("a.csv", "b.jsonl")]  # fmt: skip
    assert manifests[0]["labels"] == ["bad", "good"]
    assert manifests[0]["examples"] == manifests[1]["examples"]
    val = LabelledDataset(tmp_path / "a", "val")
    train = LabelledDataset(tmp_path / "a", "train")
    in_val = val_groups([(g, t, label) for t, label, g in rows], 0.3, 0)  # whole groups go to val
    assert 0 < len(in_val) < 20
    assert len(val) == sum(1 for _, _, g in rows if g in in_val) and len(train) == 60 - len(val)
    assert sorted(val.labels.tolist()) == sorted(int(label == "good") for _, label, g in rows if g in in_val)
    # Every example starts with <|bos|> (the token an encoder classifies from).
    assert int(train.ids[train.offsets[0]]) == 0


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('{"text": "a", "label": "x"}\n{"text": "b"}\n', "line 2: 'label' is missing or empty"),
        ('{"text": "a", "label": "x"}\nnot json\n', "line 2: not JSON"),
        (
            '{"text": "a", "label": "x"}\n{"text": "b", "label": "x"}\n',
            "has 1 label(s): at least 2 are needed",
        ),
    ],
)
def test_bad_classification_data_is_named(content, message, tmp_path, prepared_dir):
    path = tmp_path / "data.jsonl"
    path.write_text(content)
    with pytest.raises(DataError, match=re.escape(message)):
        prepare_classify(str(path), tmp_path / "out", prepared_dir / "tokenizer.json", 32, 0.5, 0)
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_the_builtin_task_has_at_least_eight_packages_each_on_both_sides_and_no_file_on_both():
    examples = package_examples()
    packages = {label for _, _, label in examples}
    assert len(packages) >= 8
    for seed in (0, 1337):
        held_out = val_groups(examples, 0.2, seed)
        val = Counter(label for group, _, label in examples if group in held_out)
        total = Counter(label for _, _, label in examples)
        # every package is in both splits, near the asked share (a file's chunks share one side)
        shares = {p: val[p] / total[p] for p in packages}
        assert all(0.05 < share < 0.35 for share in shares.values()), shares
        assert 0.18 < val.total() / total.total() < 0.25


def test_the_split_without_groups_is_exactly_stratified():
    examples = [(f"line {i}", "text", label) for i, label in enumerate(["a"] * 50 + ["b"] * 10 + ["c"] * 5)]
    held_out = val_groups(examples, 0.2, 0)
    assert Counter(label for group, _, label in examples if group in held_out) == {"a": 10, "b": 2, "c": 1}
    one_group = [("g", "text", "a"), ("g", "text", "a"), ("h", "text", "b")]
    assert val_groups(one_group, 0.5, 0) == set()  # a label's only group stays in training
    # a label that is only ever the minority of one group: that group stays in training, whatever the seed
    mixed = [(f"g{i}", "text", "good") for i in range(10) for _ in range(3)]
    mixed += [("r", "text", "bad"), *[("r", "text", "good")] * 3]
    assert all("r" not in val_groups(mixed, 0.5, seed) for seed in range(20))


@pytest.mark.parametrize(
    ("family", "shape"),
    [("llama", {}), ("gpt2", {}), ("bert", {}), ("bert", {"pooling": "mean"})],
    ids=["llama", "gpt2", "bert", "bert-mean"],
)
def test_the_head_reads_the_right_token_and_ignores_padding(family, shape):
    torch.manual_seed(0)
    model = build_model(model_config(family, "debug", n_classes=3, **shape), "cpu").eval()
    ids = torch.randint(3, 512, (1, 9), generator=torch.Generator().manual_seed(1))
    padded = torch.cat([ids, torch.full((1, 5), 2)], dim=1)
    mask = torch.cat([torch.ones(1, 9), torch.zeros(1, 5)], dim=1).bool()
    with torch.no_grad():
        alone, with_pads = model(ids), model(padded, pad_mask=mask)
        if family == "bert":  # the pooling chosen is the one read
            hidden = model.hidden_states(ids)
            pooled = hidden.mean(dim=1) if shape else hidden[:, 0]
            assert torch.allclose(alone, model.classifier(pooled), atol=1e-6)
    assert alone.shape == (1, 3)
    assert (alone - with_pads).abs().max() < 1e-5


@pytest.fixture(scope="module")
def labelled(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("labelled") / "data.jsonl"
    words = {"alpha": "def class import return", "beta": "the and of to in", "gamma": "0 1 2 3 4 5 6"}
    lines = [
        json.dumps({"text": f"{words[label]} {i}", "label": label}) for i in range(40) for label in words
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_finetune_eval_and_classify_a_decoder_with_lora(base_run, labelled, tmp_path, capsys):
    recipe = Path(__file__).parents[2] / "recipes" / "debug.yaml"
    args = ["finetune", "--config", str(recipe), "--init", str(base_run), "--out", str(tmp_path / "run"),
            "--data.task=classify", f"--data.source={labelled}", "--data.dir=null", "--data.val_fraction=0.25",
            "--lora.rank=4", "--train.max_steps=30", "--train.eval_every=0", "--train.eval_batches=100",
            "--logging.progress=false", "--optim.lr=1e-2"]  # fmt: skip
    assert main(args) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["val_accuracy"] > 0.9  # three classes of distinct words
    tuned = checkpoint_weights(latest_checkpoint(tmp_path / "run"), merge_adapters=False)
    base = checkpoint_weights(latest_checkpoint(base_run))
    assert tuned["classifier.weight"].shape == (3, 64)
    assert all(torch.equal(base[n], tuned[n]) for n in base)  # LoRA: the base is untouched

    assert main(["eval", str(tmp_path / "run")]) == 0
    record = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert record["labels"] == ["alpha", "beta", "gamma"] and record["val_accuracy"] == result["val_accuracy"]
    assert record["val_macro_f1"] > 0.9
    assert main(["classify", str(tmp_path / "run"), "--text", "the and of to in 99"]) == 0
    assert json.loads(capsys.readouterr().out)["label"] == "beta"
    texts = tmp_path / "texts.jsonl"
    texts.write_text(
        json.dumps({"text": "0 1 2 3 4 5 6 7"}) + "\n" + json.dumps({"text": "def class import"}) + "\n"
    )
    assert main(["classify", str(tmp_path / "run"), "--input", str(texts)]) == 0
    assert [json.loads(line)["label"] for line in capsys.readouterr().out.splitlines()] == ["gamma", "alpha"]
    assert main(["classify", str(base_run), "--text", "x"]) == 2
    assert "is not a classification run" in capsys.readouterr().err
