"""The Hugging Face round trip: each family's names and layouts (models/<family>/hf.py) against the
transformers classes themselves, and `lmforge export --format hf` loaded by AutoModelForCausalLM and
AutoTokenizer, their logits and greedy tokens equal to lmforge's.

The weights are random with a large std (0.5), so that every position's argmax differs and a wrong
permutation, transpose or name changes the logits far beyond the 1e-4 tolerance (checked once per
map: test_a_wrong_permutation_is_caught).
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers  # a dev dependency: the reference the round trip is checked against

from lmforge.api import evaluate_text, load
from lmforge.config import load_config
from lmforge.data.tokenizer import load_tokenizer
from lmforge.errors import CheckpointError
from lmforge.hf import export_hf, import_hf
from lmforge.infer.generate import generate
from lmforge.models import build_model, spec_of
from lmforge.models.gpt2.model import GPT2Config
from lmforge.models.llama.model import LlamaConfig
from lmforge.rundir import checkpoint_name, model_state_dict, verify_checkpoint

CONFIGS = {
    "llama GQA": LlamaConfig(
        vocab_size=96,
        max_seq_len=32,
        dim=64,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        ffn_hidden=96,
        rope_theta=500000.0,
        norm_eps=1e-6,
    ),  # fmt: skip
    "llama tied MHA": LlamaConfig(
        vocab_size=96, max_seq_len=32, dim=48, n_layers=2, n_heads=3, tie_embeddings=True
    ),  # fmt: skip
    "llama pruned heads": LlamaConfig(  # lmforge compress prune: 2 heads of 16 are not dim = 64 wide
        vocab_size=96, max_seq_len=32, dim=64, n_layers=2, n_heads=2, n_kv_heads=1, ffn_hidden=80, head_dim=16
    ),  # fmt: skip
    "gpt2": GPT2Config(vocab_size=96, max_seq_len=32, dim=64, n_layers=2, n_heads=4, norm_eps=1e-5),
    "gpt2 without biases": GPT2Config(
        vocab_size=96, max_seq_len=32, dim=48, n_layers=2, n_heads=3, bias=False
    ),
}


def random_model(cfg, seed: int = 0):
    torch.manual_seed(seed)
    model = build_model(cfg, "cpu").eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.5)
    return model


def hf_model(model):
    """transformers' model for ours, built from the map's config and loaded with the map's weights."""
    hf = spec_of(model).hf
    config = transformers.AutoConfig.for_model(hf.model_type, **hf.config_to_hf(model.cfg))
    theirs = transformers.AutoModelForCausalLM.from_config(config).eval()
    missing, unexpected = theirs.load_state_dict(
        hf.state_to_hf(model_state_dict(model), model.cfg), strict=False
    )
    assert unexpected == [] and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    assert type(theirs).__name__ == hf.architecture
    return theirs


@pytest.mark.parametrize("name", CONFIGS)
def test_the_map_gives_transformers_the_same_logits(name):
    model = random_model(CONFIGS[name])
    theirs = hf_model(model)
    ids = torch.randint(0, model.cfg.vocab_size, (3, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, hf_logits = model(ids), theirs(ids).logits
    assert ours.shape == hf_logits.shape
    assert (ours - hf_logits).abs().max().item() < 1e-4
    assert ours.argmax(-1).unique().numel() > 2  # the logits are not flat: the argmax varies


@pytest.mark.parametrize("name", CONFIGS)
def test_the_map_round_trips_exactly(name):
    model = random_model(CONFIGS[name])
    hf = spec_of(model).hf
    # gpt2: transformers' GPT2 always has biases; a model without them comes back with (zero) biases.
    expected = dataclasses.replace(model.cfg, bias=True) if isinstance(model.cfg, GPT2Config) else model.cfg
    assert hf.config_from_hf(hf.config_to_hf(model.cfg)) == expected
    state = model_state_dict(model)
    back = hf.state_from_hf(hf.state_to_hf(state, model.cfg), model.cfg)
    if isinstance(model.cfg, GPT2Config) and not model.cfg.bias:  # written as zero biases
        extra = {k: v for k, v in back.items() if k not in state}
        assert extra and all(k.endswith(".bias") and not v.any() for k, v in extra.items())
        back = {k: v for k, v in back.items() if k in state}
    assert back.keys() == state.keys() and all(torch.equal(back[k], state[k]) for k in state)


@pytest.mark.parametrize("name", ["llama GQA", "gpt2"])
def test_a_wrong_permutation_is_caught(name, monkeypatch):
    """The tolerance is tight enough: without the q/k (llama) or c_attn (gpt2) reordering the
    logits differ by far more than 1e-4."""
    model = random_model(CONFIGS[name])
    module = __import__(f"lmforge.models.{type(model.cfg).__name__[:-6].lower()}.hf", fromlist=["x"])
    helper = "_pairs_to_halves" if name.startswith("llama") else "_heads_to_blocks"
    monkeypatch.setattr(module, helper, lambda t, n: t)
    theirs = hf_model(model)
    ids = torch.randint(0, model.cfg.vocab_size, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (model(ids) - theirs(ids).logits).abs().max().item() > 1e-2


def test_unsupported_configs_are_named():
    hf = spec_of(build_model(CONFIGS["llama GQA"], "meta")).hf
    with pytest.raises(ValueError, match="LlamaForCausalLM has no QK-norm"):
        hf.config_to_hf(dataclasses.replace(CONFIGS["llama GQA"], qk_norm=True))
    good = hf.config_to_hf(CONFIGS["llama GQA"])
    for change, message in [({"hidden_act": "gelu"}, "hidden_act is 'gelu'"),
                            ({"attention_bias": True}, "attention_bias is True"),
                            ({"rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5}}, "rope type is 'llama3'")]:  # fmt: skip
        with pytest.raises(ValueError, match=message):
            hf.config_from_hf({**good, **change})


# ---------------------------------------------------------------------------- the export, end to end


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def exported(request, tmp_path_factory, prepared_dir, session_debug_config):
    """A checkpoint of a debug model with random weights, and its `export_hf` directory."""
    from lmforge.rundir import run_model_config
    from lmforge.train.checkpoint import save_checkpoint
    from lmforge.train.optim import build_optimizer

    family = request.param
    cfg = session_debug_config(model={"family": family, "flavor": "debug"})
    model = random_model(run_model_config(cfg.model, cfg.data.seq_len, 512))
    run = tmp_path_factory.mktemp(f"run_{family}")
    ckpt = save_checkpoint(run, 3, model, build_optimizer(model, cfg.optim, "cpu"), {"loader": {}}, cfg,
                           prepared_dir / "tokenizer.json", 1)  # fmt: skip
    out = run / "hf"
    assert export_hf(ckpt, out) == out / "model.safetensors"
    return model, ckpt, out


def test_transformers_loads_the_export_and_computes_the_same(exported):
    model, _, out = exported
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["config.json", "generation_config.json", "model.safetensors", "special_tokens_map.json",
         "tokenizer.json", "tokenizer_config.json"])  # fmt: skip
    theirs = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(theirs).__name__ == spec_of(model).hf.architecture
    assert theirs.dtype == torch.float32
    ids = torch.randint(3, 512, (2, 24), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert (model(ids) - theirs(ids).logits).abs().max().item() < 1e-4

    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    text = "def f(x):\n    return x + 1  # naïve café\n"
    ours = load_tokenizer(out / "tokenizer.json")
    assert tokenizer(text, add_special_tokens=False)["input_ids"] == ours.encode(text).ids
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (0, 1, 2)
    config = json.loads((out / "config.json").read_text())
    assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == (0, 1, 2)

    prompt = tokenizer("class Point:\n", add_special_tokens=False)["input_ids"]
    want = list(generate(model, prompt, max_new_tokens=24, temperature=0.0))
    got = theirs.generate(torch.tensor([prompt]), max_new_tokens=24, do_sample=False,
                          eos_token_id=None, pad_token_id=2)[0, len(prompt):].tolist()  # fmt: skip
    assert len(set(want)) > 1  # not one token repeated
    assert got == want


def lmforge_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "lmforge", *args], capture_output=True, text=True, timeout=300
    )


def test_the_cli_exports_and_refuses_what_it_cannot(exported, tmp_path):
    _, ckpt, _ = exported
    result = lmforge_cli("export", str(ckpt), "--format", "hf", "--out", str(tmp_path / "hf"))
    assert result.returncode == 0, result.stderr[-2000:]
    weights = tmp_path / "hf" / "model.safetensors"
    assert json.loads(result.stdout.strip().splitlines()[-1]) == {
        "exported": str(weights), "format": "hf", "bytes": weights.stat().st_size}  # fmt: skip
    bad = lmforge_cli("export", str(ckpt), "--format", "onnx")
    assert bad.returncode == 2 and len(bad.stderr.splitlines()) == 1, bad.stderr
    assert bad.stderr.startswith("lmforge: error: ") and "format" in bad.stderr, bad.stderr


def test_an_export_of_a_checkpoint_without_out_goes_beside_it_in_its_run(exported, capsys):
    """Never into the checkpoint directory: a file its manifest lacks would fail its check."""
    from lmforge.cli import main
    from lmforge.rundir import resolve_checkpoint

    _, ckpt, _ = exported
    assert main(["export", str(ckpt), "--format", "hf"]) == 0
    written = Path(json.loads(capsys.readouterr().out.strip().splitlines()[-1])["exported"])
    assert written.parent == ckpt.parent.parent / f"export-hf-{ckpt.name}"
    assert not any(p.name.startswith("export") for p in ckpt.iterdir())
    resolve_checkpoint(ckpt)  # still verifies against its manifest


# ---------------------------------------------------------------------------- import


def test_an_export_imports_back_as_the_same_model(exported, tmp_path):
    model, _, out = exported
    ckpt = import_hf(out, tmp_path / "imported")
    assert ckpt == tmp_path / "imported" / "checkpoints" / checkpoint_name(0)
    verify_checkpoint(ckpt)
    back, tokenizer = load(tmp_path / "imported")
    assert type(back) is type(model) and back.cfg == model.cfg
    assert all(torch.equal(a, b) for a, b in zip(model_state_dict(back).values(), model_state_dict(model).values(),
                                                 strict=True))  # fmt: skip
    assert tokenizer.to_str() == load_tokenizer(out / "tokenizer.json").to_str()
    saved = load_config(ckpt / "config.yaml")
    assert saved.model.family == spec_of(model).name and saved.data.seq_len == model.cfg.max_seq_len
    assert saved.model.shape and "dim" in saved.model.shape
    generated = lmforge_cli("generate", str(tmp_path / "imported"), "--prompt", "def f(", "--max-new-tokens", "4",
                            "--temperature", "0")  # fmt: skip
    assert generated.returncode == 0 and generated.stdout.startswith("def f("), generated.stderr[-2000:]
    (tmp_path / "notes.txt").write_text("def f(x):\n    return x * 2\n" * 20)
    on_text = evaluate_text(tmp_path / "imported", str(tmp_path / "notes.txt"), seq_len=32, max_batches=1)
    assert on_text["windows"] > 1 and math.isfinite(on_text["loss"]) and on_text["bits_per_byte"] > 0


def transformers_model_dir(family: str, prepared_dir: Path, out: Path) -> Path:
    """A model that transformers made (its own classes, random weights), saved as it saves them."""
    if family.startswith("llama"):  # rope_theta as transformers 5 writes it (in rope_parameters only)
        config = transformers.LlamaConfig(vocab_size=520, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=48,
                                          rms_norm_eps=1e-5, tie_word_embeddings=family == "llama tied",
                                          rope_parameters={"rope_type": "default", "rope_theta": 5e5})  # fmt: skip
    else:
        config = transformers.GPT2Config(vocab_size=520, n_positions=48, n_embd=64, n_layer=2, n_head=4)
    torch.manual_seed(5)
    theirs = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for p in theirs.parameters():
            p.normal_(0.0, 0.5)
    theirs.save_pretrained(out)
    shutil.copyfile(prepared_dir / "tokenizer.json", out / "tokenizer.json")
    return out


@pytest.mark.parametrize("family", ["llama", "llama tied", "gpt2"])
def test_a_model_transformers_made_imports_with_the_same_logits_and_tokens(family, prepared_dir, tmp_path):
    hf_dir = transformers_model_dir(family, prepared_dir, tmp_path / "hf")
    saved = json.loads((hf_dir / "config.json").read_text())
    if family.startswith("llama"):
        assert saved["rope_parameters"]["rope_theta"] == 5e5 and "rope_theta" not in saved
    theirs = transformers.AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    result = lmforge_cli("import", str(hf_dir), "--out", str(tmp_path / "run"))
    assert result.returncode == 0, result.stderr[-2000:]
    model, _ = load(tmp_path / "run")
    if family.startswith("llama"):
        assert model.cfg.rope_theta == 5e5 and model.cfg.tie_embeddings == (family == "llama tied")
    ids = torch.randint(3, 520, (2, 30), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert (model(ids) - theirs(ids).logits).abs().max().item() < 1e-4
    prompt = ids[0, :8].tolist()
    want = theirs.generate(torch.tensor([prompt]), max_new_tokens=16, do_sample=False, eos_token_id=None,
                           pad_token_id=2)[0, len(prompt):].tolist()  # fmt: skip
    assert list(generate(model, prompt, max_new_tokens=16, temperature=0.0)) == want


def test_a_transformers_4_config_imports():
    """transformers < 5 writes rope_theta at the top and rope_scaling null."""
    hf = spec_of(build_model(CONFIGS["llama GQA"], "meta")).hf
    old = {k: v for k, v in hf.config_to_hf(CONFIGS["llama GQA"]).items() if k != "rope_parameters"}
    assert hf.config_from_hf({**old, "rope_scaling": None}) == CONFIGS["llama GQA"]


def broken_copy(hf_dir: Path, to: Path, config: dict | None = None, weights: dict | None = None) -> Path:
    from safetensors.torch import load_file, save_file

    shutil.copytree(hf_dir, to)
    if config is not None:
        (to / "config.json").write_text(json.dumps(config))
    if weights is not None:
        save_file(weights(load_file(to / "model.safetensors")), to / "model.safetensors")
    return to


def test_what_cannot_be_imported_is_named_before_anything_is_written(prepared_dir, tmp_path):
    hf_dir = transformers_model_dir("llama", prepared_dir, tmp_path / "hf")
    config = json.loads((hf_dir / "config.json").read_text())
    q = "model.layers.0.self_attn.q_proj.weight"
    cases = {
        "bert": ({**config, "model_type": "bert"}, None, "has model_type 'bert'; lmforge imports ['gpt2', 'llama']"),
        "act": ({**config, "hidden_act": "gelu"}, None, "config.json hidden_act is 'gelu'; lmforge's llama supports only 'silu'"),
        "heads": ({**{k: v for k, v in config.items() if k != "head_dim"}, "num_attention_heads": 0}, None, "config.json has a value of the wrong kind (ZeroDivisionError"),
        "rope": ({**config, "rope_parameters": 5}, None, "config.json rope_parameters is 5, not a mapping"),
        "no key": ({k: v for k, v in config.items() if k != "hidden_size"}, None, "config.json lacks key 'hidden_size'"),
        "vocab": ({**config, "vocab_size": 100}, None, "its tokenizer has 512 tokens, the model's embedding 100 rows"),
        "wide": ({**config, "intermediate_size": 96}, None,
                 "weight 'model.layers.0.mlp.down_proj.weight' has shape (64, 160), the config says (64, 96)"),
        "missing": (None, lambda w: {k: v for k, v in w.items() if k != q}, f"the weights lack '{q}' (1 missing)"),
        "extra": (None, lambda w: {**w, "model.extra.weight": w[q].clone()}, "weight 'model.extra.weight' has no place"),
        "odd rows": (None, lambda w: {**w, q: w[q][:-1].contiguous()}, f"weight '{q}' has shape (63, 64), the config says (64, 64)"),
    }  # fmt: skip
    for name, (changed_config, weights, message) in cases.items():
        broken = broken_copy(hf_dir, tmp_path / name, changed_config, weights)
        with pytest.raises(CheckpointError) as err:
            import_hf(broken, tmp_path / f"run-{name}")
        assert message in str(err.value) and "\n" not in str(err.value), (name, str(err.value))
        assert not (tmp_path / f"run-{name}").exists()
    (tmp_path / "no weights").mkdir()
    shutil.copy(hf_dir / "config.json", tmp_path / "no weights")
    shutil.copy(hf_dir / "tokenizer.json", tmp_path / "no weights")
    with pytest.raises(CheckpointError, match="has no .safetensors weights"):
        import_hf(tmp_path / "no weights", tmp_path / "run-no-weights")
    corrupt = broken_copy(hf_dir, tmp_path / "corrupt")
    (corrupt / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not a header")
    with pytest.raises(CheckpointError, match="cannot read weights .*model.safetensors"):
        import_hf(corrupt, tmp_path / "run-corrupt")
    foreign = broken_copy(hf_dir, tmp_path / "foreign tokenizer")
    (foreign / "tokenizer.json").write_text(
        (foreign / "tokenizer.json").read_text().replace("<|eos|>", "</s>")
    )
    with pytest.raises(CheckpointError, match="tokenizer has no special token '<\\|eos\\|>'"):
        import_hf(foreign, tmp_path / "run-foreign")


def test_an_import_never_writes_into_an_existing_run(prepared_dir, tmp_path):
    hf_dir = transformers_model_dir("gpt2", prepared_dir, tmp_path / "hf")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "keep.txt").write_text("a file of a run")
    result = lmforge_cli("import", str(hf_dir), "--out", str(tmp_path / "run"))
    assert result.returncode == 2 and len(result.stderr.splitlines()) == 1, result.stderr[-2000:]
    assert (
        result.stderr
        == f"lmforge: error: cannot import into {tmp_path / 'run'}: it exists and is not an empty directory\n"
    )
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["keep.txt"]
    (tmp_path / "empty").mkdir()
    assert import_hf(hf_dir, tmp_path / "empty").is_dir()  # an empty directory is fine


def test_a_qk_norm_run_is_refused_by_the_export(prepared_dir, tmp_path, debug_config):
    from lmforge.rundir import run_model_config
    from lmforge.train.checkpoint import save_checkpoint
    from lmforge.train.optim import build_optimizer

    cfg = debug_config(model={"family": "llama", "flavor": "debug", "qk_norm": True})
    model = build_model(run_model_config(cfg.model, cfg.data.seq_len, 512), "cpu")
    ckpt = save_checkpoint(tmp_path / "run", 1, model, build_optimizer(model, cfg.optim, "cpu"), {"loader": {}}, cfg,
                           prepared_dir / "tokenizer.json", 1)  # fmt: skip
    with pytest.raises(CheckpointError) as err:
        export_hf(ckpt, tmp_path / "hf")
    assert (
        str(err.value)
        == f"cannot export {ckpt} to Hugging Face format: LlamaForCausalLM has no QK-norm (model.qk_norm is true)"
    )
    assert not (tmp_path / "hf").exists()
