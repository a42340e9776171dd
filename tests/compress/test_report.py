"""`lmforge compress report`: the table, the JSON figures and the Pareto plot of a baseline and its
variants (distilled, quantized, pruned)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lmforge.api import load
from lmforge.cli import main
from lmforge.compress.prune import block_linears
from lmforge.compress.report import _pareto
from lmforge.data.loader import val_batches
from lmforge.evaluate.perplexity import evaluate_loss
from lmforge.rundir import resolve_checkpoint, run_precision
from lmforge.train.pretrain import pretrain

CPU = torch.device("cpu")

QUIET = {"progress": False, "tensorboard": False, "plot": False}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, session_debug_config, prepared_dir) -> tuple[Path, Path]:
    """A debug llama (the baseline) and a one-block student distilled from it."""
    root = tmp_path_factory.mktemp("report")
    steps = {"eval_every": 0, "sample_tokens": 0}
    pretrain(session_debug_config(train={"max_steps": 4, **steps}, logging=QUIET), root / "base")
    student = session_debug_config(
        train={"max_steps": 2, **steps}, logging=QUIET, model={"shape": {"n_layers": 1}},
        distill={"teacher": str(root / "base")},
    )  # fmt: skip
    pretrain(student, root / "student")
    return root / "base", root / "student"


def test_the_report_writes_a_table_figures_and_a_plot(runs, tmp_path, capsys, prepared_dir):
    base, student = runs
    assert (
        main(
            [
                "compress",
                "report",
                str(base),
                str(student),
                "--out",
                str(tmp_path / "report"),
                "--rounds",
                "2",
                "--new-tokens",
                "16",
            ]
        )
        == 0
    )
    figures = json.loads((tmp_path / "report" / "report.json").read_text())
    rows = {v["name"]: v for v in figures["variants"]}
    assert list(rows) == ["base", "student"]
    assert rows["base"]["method"] == "baseline" and rows["student"]["method"].startswith("distill")
    # The quality figures are those of the model on the baseline's validation windows.
    model, _ = load(base)
    expected = evaluate_loss(model, val_batches(prepared_dir, 4, 64, 20), torch.device("cpu"))["val_loss"]
    assert abs(rows["base"]["val_loss"] - expected) < 1e-6
    assert rows["student"]["params"] < rows["base"]["params"]
    assert rows["student"]["bytes"] < rows["base"]["bytes"]
    for row in rows.values():
        # Evaluation in the run's precision, one prompt decoded in fp32 (a plain model on a CPU).
        run_dtype = "bf16" if run_precision(resolve_checkpoint(base), CPU) == torch.bfloat16 else "fp32"
        assert row["compute"] == f"{run_dtype} / fp32"
        assert row["eval_tokens_per_s"] > 0 and row["decode_tokens_per_s"] > 0
        low, high = row["decode_spread"]
        assert low <= row["decode_tokens_per_s"] <= high
    table = (tmp_path / "report" / "report.md").read_text()
    assert table.count("\n| ") == 4  # the header, its rule and two rows
    assert "| base | baseline |" in table and "| student | distill" in table
    base_row = next(line for line in table.splitlines() if line.startswith("| base |"))
    assert "| 1.000 |" in base_row and "+0.00%" in base_row  # the baseline's ratios to itself
    assert (tmp_path / "report" / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "report.md" in capsys.readouterr().out


def test_quantized_and_pruned_variants_have_their_labels_sizes_and_nonzero_parameters(runs, tmp_path):
    base, _ = runs
    variants = {
        "int8": ["quantize", str(base), "--scheme", "int8-weight"],
        "magnitude": ["prune", str(base), "--method", "magnitude", "--sparsity", "0.5"],
        "heads-channels": ["prune", str(base), "--method", "heads-channels", "--sparsity", "0.5",
                           "--calibration-batches", "1"],
    }  # fmt: skip
    for name, argv in variants.items():
        assert main(["compress", *argv, "--out", str(tmp_path / name)]) == 0
    report = ["compress", "report", str(base), *(str(tmp_path / name) for name in variants),
              "--out", str(tmp_path / "report"), "--rounds", "1", "--new-tokens", "4"]  # fmt: skip
    assert main(report) == 0
    figures = json.loads((tmp_path / "report" / "report.json").read_text())
    rows = {v["name"]: v for v in figures["variants"]}
    assert {name: row["method"] for name, row in rows.items()} == {
        "base": "baseline",
        "int8": "quantize int8-weight",
        "magnitude": "prune magnitude 0.5",
        "heads-channels": "prune heads-channels 0.5",
    }
    whole, int8, magnitude, heads_channels = rows.values()
    # int8: the same parameters in under a third of the bytes (its integers are not counted as nonzero).
    assert int8["params"] == whole["params"] and int8["nonzero_params"] is None
    assert int8["bytes"] < 0.3 * whole["bytes"]
    # magnitude: the same matrices on disk, half of the blocks' linear weights zero.
    pruned = sum(linear.weight.numel() for linear in block_linears(load(base)[0]).values()) // 2
    assert magnitude["params"] == whole["params"] and magnitude["bytes"] == whole["bytes"]
    assert magnitude["nonzero_params"] == whole["nonzero_params"] - pruned
    # heads-channels: smaller matrices.
    assert heads_channels["params"] < whole["params"] and heads_channels["bytes"] < whole["bytes"]
    table = (tmp_path / "report" / "report.md").read_text()
    lines = {
        line.split(" | ")[0].removeprefix("| "): line for line in table.splitlines() if line.startswith("| ")
    }
    params = f"{whole['params'] / 1e6:.2f}M ({magnitude['nonzero_params'] / 1e6:.2f}M nonzero)"
    assert lines["magnitude"].startswith(f"| magnitude | prune magnitude 0.5 | {params} |")
    assert lines["int8"].startswith("| int8 | quantize int8-weight |")
    assert all("nonzero" not in lines[name] for name in ("base", "int8", "heads-channels"))


def test_variants_with_another_tokenizer_are_refused(runs, tmp_path, capsys):
    base, _ = runs
    other = tmp_path / "other"
    pretrain_cfg_dir = tmp_path / "corpus"
    pretrain_cfg_dir.mkdir()
    for i in range(10):
        (pretrain_cfg_dir / f"{i}.txt").write_text(f"the quick brown fox {i} jumps over the lazy dog\n" * 40)
    from lmforge.config import load_config, parse_config_dict, to_dict

    values = to_dict(load_config(Path(__file__).parents[2] / "recipes" / "debug.yaml"))
    values["data"].update(source=str(pretrain_cfg_dir), vocab_size=300, dir=None, val_fraction=0.2)
    values["train"].update(max_steps=1, eval_every=0, sample_tokens=0)
    values["logging"].update(QUIET)
    pretrain(parse_config_dict(values), other)
    assert main(["compress", "report", str(base), str(other), "--out", str(tmp_path / "r")]) == 2
    assert "another tokenizer" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_the_pareto_front_keeps_only_undominated_points():
    # (bytes, ppl): (2, 5) is beaten by (1, 4); (3, 3) and (1, 4) and (4, 2) are not.
    assert _pareto([(2.0, 5.0), (1.0, 4.0), (3.0, 3.0), (4.0, 2.0), (5.0, 2.5)]) == [1, 2, 3]
