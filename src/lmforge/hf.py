"""The Hugging Face round trip: a checkpoint written as a directory that transformers loads, and such
a directory made into an lmforge run.

`export_hf(ckpt_dir, out_dir)` writes what `AutoModelForCausalLM.from_pretrained(out_dir)` and
`AutoTokenizer.from_pretrained(out_dir)` read: config.json (the architecture and its shape),
model.safetensors (Hugging Face's names and layouts), generation_config.json, and the tokenizer
(tokenizer.json as trained, tokenizer_config.json and special_tokens_map.json naming its special
tokens). `import_hf(hf_dir, run_dir)` reads such a directory (config.json, its safetensors files
and tokenizer.json) into a run directory whose checkpoint `lmforge generate`, `lmforge eval` and
`lmforge.load` use like any other. The names and layouts are each family's (`FamilySpec.hf`,
models/<family>/hf.py); this module only reads and writes the files. transformers is not imported.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from collections import Counter
from pathlib import Path
from typing import Any

from safetensors import SafetensorError, safe_open
from torch import Tensor

from lmforge.config import DataConfig, ModelConfig, RunConfig, TrainConfig, load_config
from lmforge.data.errors import DataError
from lmforge.data.sft import CHAT_TEMPLATE, CHAT_TOKENS, has_chat_template
from lmforge.data.tokenizer import SPECIAL_TOKENS, load_tokenizer, special_ids
from lmforge.errors import CheckpointError
from lmforge.models import FAMILIES, build_model, spec_of
from lmforge.rundir import checkpoint_weights, meta_model, model_state_dict, read_manifest, write_export
from lmforge.train.checkpoint import save_checkpoint
from lmforge.train.optim import build_optimizer


def export_hf(ckpt_dir: Path, out_dir: Path) -> Path:
    """Write the checkpoint as a Hugging Face model directory; returns out_dir/model.safetensors.

    Written as lmforge.rundir.write_export writes (the weights renamed into place last). CheckpointError for a model
    transformers has no architecture for (the message names what is missing).
    """
    if load_config(ckpt_dir / "config.yaml").compress.quantize:  # torchao tensors: no transformers layout
        raise CheckpointError(
            f"cannot export {ckpt_dir} to Hugging Face format: it is quantized; export its source"
        )
    model = meta_model(ckpt_dir)
    spec = spec_of(model)
    if spec.hf is None:
        raise CheckpointError(f"cannot export {ckpt_dir} to Hugging Face format: family {spec.name} has none")
    if model.cfg.n_classes:
        raise CheckpointError(
            f"cannot export {ckpt_dir} to Hugging Face format: it is a classifier (no causal-LM head)"
        )
    try:
        shape = spec.hf.config_to_hf(model.cfg)
    except ValueError as err:
        raise CheckpointError(f"cannot export {ckpt_dir} to Hugging Face format: {err}") from None
    weights = checkpoint_weights(ckpt_dir)
    # The dtype most weights have (a checkpoint's are all fp32 today).
    dtype = Counter(str(t.dtype).removeprefix("torch.") for t in weights.values()).most_common(1)[0][0]
    state = spec.hf.state_to_hf(weights, model.cfg)
    tokenizer = load_tokenizer(ckpt_dir / "tokenizer.json")
    ids = special_ids(tokenizer)
    # A tokenizer with the chat tokens has lmforge's chat template (lmforge.data.sft): transformers'
    # apply_chat_template renders the same text.
    chat = (
        {"chat_template": CHAT_TEMPLATE, "additional_special_tokens": list(CHAT_TOKENS)}
        if has_chat_template(tokenizer)
        else {}
    )
    config = {
        "architectures": [spec.hf.architecture],
        "model_type": spec.hf.model_type,
        **shape,
        "bos_token_id": ids["bos"],
        "eos_token_id": ids["eos"],
        "pad_token_id": ids["pad"],
        "torch_dtype": dtype,  # the name transformers < 5 reads
        "dtype": dtype,
        "use_cache": True,
    }
    bos, eos, pad = SPECIAL_TOKENS
    special = {"bos_token": bos, "eos_token": eos, "pad_token": pad}
    texts = {
        "config.json": config,
        "generation_config.json": {
            "bos_token_id": ids["bos"],
            "eos_token_id": ids["eos"],
            "pad_token_id": ids["pad"],
        },  # fmt: skip
        "tokenizer_config.json": {
            "tokenizer_class": "PreTrainedTokenizerFast",
            **special,
            "model_max_length": model.cfg.max_seq_len,
            "clean_up_tokenization_spaces": False,
            **chat,
        },
        "special_tokens_map.json": special,
    }
    return write_export(
        out_dir,
        state,
        {"format": "pt", "lmforge_step": str(read_manifest(ckpt_dir)["step"])},
        {"tokenizer.json": ckpt_dir / "tokenizer.json"},
        {name: json.dumps(content, indent=2) + "\n" for name, content in texts.items()},
    )


def export_peft(ckpt_dir: Path, out_dir: Path) -> Path:
    """Write a LoRA run's adapters alone as PEFT writes them: adapter_config.json and
    adapter_model.safetensors, with Hugging Face module names, so that
    `PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(BASE_HF), out_dir)` computes what
    the run computes, BASE_HF being the export (`--format hf`) of the run's base (its train.init).
    Returns out_dir/adapter_model.safetensors."""
    cfg = load_config(ckpt_dir / "config.yaml")
    if not cfg.lora.rank:
        raise CheckpointError(
            f"cannot export {ckpt_dir} as PEFT adapters: it is not a LoRA run (lora.rank is 0)"
        )
    model = meta_model(ckpt_dir)
    spec = spec_of(model)
    if spec.hf is None:
        raise CheckpointError(
            f"cannot export {ckpt_dir} as PEFT adapters: family {spec.name} has no Hugging Face map"
        )
    if cfg.lora.embeddings or model.cfg.n_classes:
        raise CheckpointError(
            f"cannot export {ckpt_dir} as PEFT adapters alone: it also trained its embeddings, output head or "
            "classifier whole; export it merged (--format hf, or lmforge)"
        )
    weights = checkpoint_weights(ckpt_dir, merge_adapters=False)
    tensors: dict[str, Tensor] = {}
    targets = set()
    for name in sorted(n.removesuffix(".lora_A") for n in weights if n.endswith(".lora_A")):
        hf_name, lora_b = spec.hf.lora_to_hf(name, weights[f"{name}.lora_B"], model.cfg)
        tensors[f"base_model.model.{hf_name}.lora_A.weight"] = weights[f"{name}.lora_A"].contiguous()
        tensors[f"base_model.model.{hf_name}.lora_B.weight"] = lora_b.contiguous()
        layer = name.split(".")[1]  # blocks are named PREFIX.N.rest on both sides
        targets.add(hf_name.split(f".{layer}.", 1)[1])  # PEFT matches a target on whole trailing name parts
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": cfg.train.init,
        "r": cfg.lora.rank,
        "lora_alpha": cfg.lora.alpha,
        "lora_dropout": cfg.lora.dropout,
        "target_modules": sorted(targets),
        "fan_in_fan_out": spec.hf.fan_in_fan_out,
        "bias": "none",
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
    }
    path = write_export(out_dir, tensors, {"format": "pt", "lmforge_step": str(read_manifest(ckpt_dir)["step"])},
                        {}, {"adapter_config.json": json.dumps(config, indent=2) + "\n"},
                        weights_name="adapter_model.safetensors")  # fmt: skip
    return path


def _read_json(path: Path) -> dict[str, Any]:
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"cannot read {path}: {type(err).__name__}: {err}") from None
    if not isinstance(content, dict):
        raise CheckpointError(f"{path} is not a JSON object")
    return content


def _hf_weights(hf_dir: Path) -> dict[str, Tensor]:
    """Every tensor of the directory's safetensors files (one file, or the shards an index lists)."""
    files = sorted(hf_dir.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{hf_dir} has no .safetensors weights (pickled .bin weights are not read)")
    weights: dict[str, Tensor] = {}
    for file in files:
        try:
            with safe_open(str(file), framework="pt") as f:
                for key in f.keys():  # noqa: SIM118 - safe_open is not a dict
                    weights[key] = f.get_tensor(key)
        except (SafetensorError, OSError) as err:
            raise CheckpointError(f"cannot read weights {file}: {err}") from None
    return weights


# Tensors some Hugging Face checkpoints hold that are not weights: old RoPE frequency buffers and
# GPT-2's causal-mask buffers. They are recomputed, never read.
_BUFFERS = ("rotary_emb.inv_freq", ".attn.bias", ".attn.masked_bias")


def _match_hf_names(found: dict[str, Tensor], expected: dict[str, Tensor], where: Path) -> dict[str, Tensor]:
    """`found` under the expected Hugging Face names, checked: a checkpoint saved from the bare model
    (GPT2Model's `h.0...` for GPT2LMHeadModel's `transformer.h.0...`) gets its prefix; buffers and a
    tied head saved anyway are dropped; a missing, unexpected or misshapen weight is named."""
    prefixes = sorted({name.split(".", 1)[0] + "." for name in expected})
    out: dict[str, Tensor] = {}
    for name, tensor in found.items():
        full = name if name in expected else next((p + name for p in prefixes if p + name in expected), name)
        if full in expected:
            out[full] = tensor
        elif not (name.endswith(_BUFFERS) or name == "lm_head.weight"):  # lm_head: tied, not expected
            raise CheckpointError(f"cannot import {where}: weight '{name}' has no place in the model")
    missing = sorted(set(expected) - set(out))
    if missing:
        raise CheckpointError(
            f"cannot import {where}: the weights lack '{missing[0]}' ({len(missing)} missing)"
        )
    for name in sorted(out):
        if out[name].shape != expected[name].shape:
            raise CheckpointError(
                f"cannot import {where}: weight '{name}' has shape {tuple(out[name].shape)}, "
                f"the config says {tuple(expected[name].shape)}"
            )
    return out


def import_hf(hf_dir: Path, run_dir: Path) -> Path:
    """Make `run_dir` (new, or an empty directory) an lmforge run whose one checkpoint (step 0) holds
    the model of `hf_dir`.

    The checkpoint is written as a run's first one is: the weights, and the optimizer state of a
    fresh AdamW (so it takes about 16 bytes per parameter in memory and on disk). Its config.yaml
    names the family and the whole shape (model.shape) with the context length as data.seq_len.
    CheckpointError names what cannot be imported, before anything is written: an architecture no
    family maps, a feature the family lacks, a weight with no place, of the wrong shape or missing.
    """
    if run_dir.exists() and (not run_dir.is_dir() or any(run_dir.iterdir())):
        raise CheckpointError(f"cannot import into {run_dir}: it exists and is not an empty directory")
    config = _read_json(hf_dir / "config.json")
    spec = next((s for s in FAMILIES.values() if s.hf and s.hf.model_type == config.get("model_type")), None)
    if spec is None or spec.hf is None:
        known = sorted(s.hf.model_type for s in FAMILIES.values() if s.hf)
        raise CheckpointError(
            f"{hf_dir / 'config.json'} has model_type {config.get('model_type')!r}; lmforge imports {known}"
        )
    try:
        family_cfg = spec.hf.config_from_hf(config)
    except ValueError as err:
        raise CheckpointError(f"cannot import {hf_dir}: config.json {err}") from None
    except KeyError as err:
        raise CheckpointError(f"cannot import {hf_dir}: config.json lacks key {err}") from None
    except (TypeError, AttributeError, ZeroDivisionError) as err:
        raise CheckpointError(
            f"cannot import {hf_dir}: config.json has a value of the wrong kind ({type(err).__name__}: {err})"
        ) from None
    tokenizer_path = hf_dir / "tokenizer.json"
    try:
        tokenizer = load_tokenizer(tokenizer_path)
        special_ids(tokenizer)
    except DataError as err:
        raise CheckpointError(f"cannot import {hf_dir}: {err}") from None
    if tokenizer.get_vocab_size() > family_cfg.vocab_size:
        raise CheckpointError(
            f"cannot import {hf_dir}: its tokenizer has {tokenizer.get_vocab_size()} tokens, "
            f"the model's embedding {family_cfg.vocab_size} rows"
        )
    model = build_model(family_cfg, "cpu")
    expected = model_state_dict(model)
    hf_state = _match_hf_names(_hf_weights(hf_dir), spec.hf.state_to_hf(expected, family_cfg), hf_dir)
    # Names and shapes are checked: the permutations and transposes cannot fail now.
    model.load_state_dict(spec.hf.state_from_hf(hf_state, family_cfg), strict=False)  # a tied head follows
    shape = {
        f.name: getattr(family_cfg, f.name)
        for f in dataclasses.fields(family_cfg)
        if f.name not in ("vocab_size", "max_seq_len")
    }
    cfg = RunConfig(
        model=ModelConfig(
            family=spec.name, flavor=next(iter(spec.flavors)), vocab_size=family_cfg.vocab_size, shape=shape
        ),  # fmt: skip
        data=DataConfig(
            tokenizer=str((run_dir / "tokenizer.json").resolve()), seq_len=family_cfg.max_seq_len
        ),
        train=TrainConfig(micro_batch_size=1),
    )
    created = not run_dir.exists()
    run_dir.mkdir(parents=True, exist_ok=True)
    try:
        shutil.copyfile(tokenizer_path, run_dir / "tokenizer.json")
        trainer_state = {"loader": {}, "imported_from": str(hf_dir.resolve())}
        return save_checkpoint(run_dir, 0, model, build_optimizer(model, cfg.optim, "cpu"), trainer_state, cfg,
                               run_dir / "tokenizer.json", keep_last=1)  # fmt: skip
    except BaseException:
        for path in [run_dir] if created else list(run_dir.iterdir()):  # nothing half-written is left
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink()
        raise
