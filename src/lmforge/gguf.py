"""GGUF export: a checkpoint as the one file that llama.cpp, Ollama and LM Studio run.

`export_gguf(ckpt_dir, out, outtype)` writes, with the `gguf` package (llama.cpp's own writer):
- the model's shape under its llama.cpp architecture (`general.architecture` "llama", "qwen3" for a
  QK-norm llama, "gpt2"; context length, widths, heads, norm epsilon, RoPE base and dimensions);
- the tokenizer: byte-level BPE as GPT-2 has it (tokenizer.ggml.model "gpt2"), every token in id
  order with its type (special tokens are control tokens), the merges, the bos/eos/pad ids, and
  pre-tokenizer "gpt-2": llama.cpp then splits text with the regex of Hugging Face's ByteLevel
  pre-tokenizer, which lmforge's tokenizer uses (lmforge.data.tokenizer), so both give the same ids;
- the tensors under llama.cpp's names and layouts (the family's `GGUFMap`, models/<family>/hf.py),
  in f32, bf16 or q8_0 (`OUTTYPES`).

A LoRA run is written merged. The file is written under a temporary name and renamed into place:
an interrupted export leaves no half-written FILE. The `gguf` package is an extra (`lmforge[gguf]`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

from tokenizers import Tokenizer
from torch import Tensor

from lmforge.data.sft import CHAT_TEMPLATE, CHAT_TOKENS, has_chat_template
from lmforge.data.tokenizer import load_tokenizer, special_ids
from lmforge.errors import CheckpointError, ConfigError
from lmforge.models import spec_of
from lmforge.models.spec import GGUFShape
from lmforge.rundir import checkpoint_weights, meta_model, read_manifest

if TYPE_CHECKING:
    import numpy as np
    from gguf import GGMLQuantizationType, GGUFWriter

# f32: exact. bf16: half the size, the weights rounded to bf16. q8_0: about a quarter of f32, each
# block of 32 weights as 8-bit integers and one fp16 scale (llama.cpp's Q8_0).
OUTTYPES = ("f32", "bf16", "q8_0")


def export_gguf(ckpt_dir: Path, out: Path, outtype: str = "f32") -> Path:
    """Write the checkpoint as one GGUF file `out`; returns it.

    CheckpointError (one line) for a model llama.cpp has no architecture for: an encoder, a
    classifier, a family without a GGUF map, a tokenizer that is not byte-level BPE.
    """
    try:
        import gguf
    except ImportError:
        raise ConfigError("--format gguf needs the gguf package: pip install 'lmforge[gguf]'") from None
    if outtype not in OUTTYPES:
        raise ConfigError(f"--outtype is {outtype!r}; choose one of {', '.join(OUTTYPES)}")
    model = meta_model(ckpt_dir)
    spec = spec_of(model)
    where = f"cannot export {ckpt_dir} to GGUF"
    if spec.encoder:
        raise CheckpointError(f"{where}: family {spec.name} is an encoder; llama.cpp runs decoders")
    if spec.hf is None or spec.hf.gguf is None:
        raise CheckpointError(f"{where}: family {spec.name} has no GGUF map")
    if model.cfg.n_classes:
        raise CheckpointError(f"{where}: it is a classifier (no language-model head)")
    try:
        shape = spec.hf.gguf.shape(model.cfg)
    except ValueError as err:
        raise CheckpointError(f"{where}: {err}") from None
    tokenizer = load_tokenizer(ckpt_dir / "tokenizer.json")
    _check_byte_level_bpe(tokenizer, where)
    tensors = spec.hf.gguf.state_to_gguf(checkpoint_weights(ckpt_dir), model.cfg)  # LoRA merged

    file_types = {
        "f32": gguf.LlamaFileType.ALL_F32,
        "bf16": gguf.LlamaFileType.MOSTLY_BF16,
        "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    writer = gguf.GGUFWriter(tmp, shape.architecture)
    try:
        writer.add_name(ckpt_dir.parent.parent.name or ckpt_dir.name)
        writer.add_description(f"lmforge checkpoint {ckpt_dir.name} (step {read_manifest(ckpt_dir)['step']})")
        writer.add_file_type(file_types[outtype])
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        _add_shape(writer, shape, model.cfg.vocab_size)
        _add_tokenizer(writer, tokenizer, model.cfg.vocab_size)
        for name, tensor in tensors.items():
            data, qtype = _encode(name, tensor, outtype)
            writer.add_tensor(name, data, raw_dtype=qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, out)
    except BaseException:
        writer.close()
        tmp.unlink(missing_ok=True)
        raise
    return out


def _add_shape(writer: GGUFWriter, shape: GGUFShape, vocab_size: int) -> None:
    writer.add_vocab_size(vocab_size)
    writer.add_context_length(shape.context_length)
    writer.add_embedding_length(shape.embedding_length)
    writer.add_block_count(shape.block_count)
    writer.add_feed_forward_length(shape.feed_forward_length)
    writer.add_head_count(shape.head_count)
    writer.add_head_count_kv(shape.head_count_kv)
    if shape.rms_norm:
        writer.add_layer_norm_rms_eps(shape.norm_eps)
    else:
        writer.add_layer_norm_eps(shape.norm_eps)
    if shape.rope_freq_base is not None:
        writer.add_rope_freq_base(shape.rope_freq_base)
    if shape.rope_dimension_count is not None:
        writer.add_rope_dimension_count(shape.rope_dimension_count)


def _check_byte_level_bpe(tokenizer: Tokenizer, where: str) -> None:
    """CheckpointError unless llama.cpp's "gpt2" tokenizer with the "gpt-2" pre-tokenizer splits
    text as this tokenizer does: BPE, no normalizer, ByteLevel pre-tokenization with its regex."""
    content = json.loads(tokenizer.to_str())
    pre = content.get("pre_tokenizer") or {}
    if (
        content["model"].get("type") != "BPE"
        or content.get("normalizer") is not None
        or pre.get("type") != "ByteLevel"
        or not pre.get("use_regex", True)
        or pre.get("add_prefix_space", False)
    ):
        raise CheckpointError(
            f"{where}: its tokenizer is not byte-level BPE as GPT-2's (lmforge's); llama.cpp would split text differently"
        )


def _add_tokenizer(writer: GGUFWriter, tokenizer: Tokenizer, vocab_size: int) -> None:
    """Tokens in id order, padded with unused ones up to the embedding's rows (llama.cpp expects
    one token per row), their types, the merges and the special ids."""
    from gguf import TokenType

    by_id = {token_id: token for token, token_id in tokenizer.get_vocab(with_added_tokens=True).items()}
    added = tokenizer.get_added_tokens_decoder()  # id -> AddedToken
    tokens: list[str] = []
    types: list[int] = []
    for token_id in range(vocab_size):
        if token_id not in by_id:
            tokens.append(f"[PAD{token_id}]")
            types.append(TokenType.UNUSED)
        else:
            tokens.append(by_id[token_id])
            if token_id not in added:
                types.append(TokenType.NORMAL)
            else:  # special ones (bos, eos, pad, chat tokens) are control tokens: text never becomes one
                types.append(TokenType.CONTROL if added[token_id].special else TokenType.USER_DEFINED)
    merges = json.loads(tokenizer.to_str())["model"]["merges"]
    # tokenizers >= 0.20 writes a merge as a pair, older versions as one "a b" string.
    merges = [m if isinstance(m, str) else " ".join(m) for m in merges]
    ids = special_ids(tokenizer)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    writer.add_bos_token_id(ids["bos"])
    writer.add_eos_token_id(ids["eos"])
    writer.add_pad_token_id(ids["pad"])
    # Pretraining saw documents each followed by eos, with no bos in front: a prompt is its text alone.
    writer.add_add_bos_token(False)
    writer.add_add_eos_token(False)
    # An SFT run's tokenizer: lmforge's chat template (ChatML), whose turns end with <|im_end|>.
    end_of_turn = tokenizer.token_to_id(CHAT_TOKENS[1])
    if has_chat_template(tokenizer) and end_of_turn is not None:
        writer.add_chat_template(CHAT_TEMPLATE)
        writer.add_eot_token_id(end_of_turn)


def _encode(name: str, tensor: Tensor, outtype: str) -> tuple[np.ndarray, GGMLQuantizationType]:
    """The tensor's bytes as the GGUF file holds it, and their type. As llama.cpp's converter does:
    norms, biases and position embeddings stay f32 (llama.cpp computes with them in f32); the other
    matrices get `outtype`, and under q8_0 a matrix whose rows are not whole 32-value blocks stays f32."""
    from gguf import GGMLQuantizationType, quants

    data = tensor.detach().float().contiguous().numpy()  # fp32 whatever the checkpoint's dtype
    matrix = data.ndim == 2 and name.endswith(".weight") and not name.startswith("position_embd")
    if not matrix or outtype == "f32" or (outtype == "q8_0" and data.shape[-1] % 32):
        return data, GGMLQuantizationType.F32
    qtype = GGMLQuantizationType.BF16 if outtype == "bf16" else GGMLQuantizationType.Q8_0
    return quants.quantize(data, qtype), qtype
