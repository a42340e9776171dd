"""A model family as the rest of lmforge sees it: `FamilySpec`, one per family folder.

The model file holds the math; a family's `parallelize.py` says, as data, which of its modules the
code applied from outside must know about: its transformer blocks, which root modules a pipeline's
first and last stage hold, and its tensor-parallel plan. The plan names a *kind* per module, not a
PyTorch style, because lmforge.models sits below lmforge.parallel: lmforge.parallel.tensor turns
each kind into a DTensor parallel style, and lmforge.plan.comm reads from the same kinds which
dimension of each parameter tensor parallelism splits. `lmforge.models.FAMILIES` lists the specs.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from torch import Tensor, nn

from lmforge.models.stacking import Stacked

# What tensor parallelism (Megatron-LM, see lmforge.parallel.tensor) does with a module:
#   embedding            vocab rows split; the output goes into the residual stream's layout
#   position_embedding   positions split; its (T, dim) output lines up with the token embeddings'
#   norm                 replicated weights (sequence parallelism: runs on a sequence shard)
#   colwise              a Linear split by output features: (out, in) weight and bias by dim 0
#   rowwise              a Linear split by input features: weight by dim 1, bias replicated;
#                        its partial outputs are summed (or reduce-scattered) into the stream
#   head                 the output Linear split colwise by vocab rows; every rank gets full logits
TensorParallelKind = Literal["embedding", "position_embedding", "norm", "colwise", "rowwise", "head"]


@dataclass(frozen=True)
class GatherInput:
    """A sub-block (attention, MLP) whose first positional input, under sequence parallelism, is
    all-gathered from its sequence shard into the full sequence before its colwise matmuls.

    n_other_inputs: the positional inputs after it (RoPE tables, input_pos), passed through as
    they are. Without sequence parallelism the input is already whole and nothing is done.
    """

    n_other_inputs: int


@dataclass(frozen=True)
class TensorParallelPlan:
    """Module name -> what tensor parallelism does with it, applied in this order.

    root: names relative to the model (modules a pipeline stage may hold as None);
    block: names relative to one transformer block, the same for every block.
    """

    root: Mapping[str, TensorParallelKind]
    block: Mapping[str, TensorParallelKind | GatherInput]


@dataclass(frozen=True)
class StageLayout:
    """The root modules outside the blocks, as pipeline parallelism splits them into stages."""

    first: tuple[str, ...]  # modules only the first stage runs (embeddings)
    last: tuple[str, ...]  # modules only the last stage runs (final norm, output head)
    embedding: str  # the input embedding module ...
    head: str  # ... and the output head, which share their weight when the model ties them
    ties_embeddings: Callable[[Any], bool]  # config -> whether embedding and head share a weight


@dataclass(frozen=True)
class SavedBytes:
    """What one forward of the family saves for backward (lmforge.plan.memory adds it up).

    Per token of one block: `norms` (sequence parallelism splits them over tp), `inputs` (the
    colwise linears' inputs: DTensor keeps them gathered whole), `sharded` (attention and MLP
    tensors, split over tp by heads and channels); `block_fixed` per block whatever the tokens.
    `final_norm` per token and `final_fixed` once, on the last stage. Per position of the sequence,
    once per forward: `block_positions` on a stage that runs blocks (RoPE rows), `first_positions`
    on the first stage (position ids).
    """

    norms: int
    inputs: int
    sharded: int
    block_fixed: int
    final_norm: int
    final_fixed: int
    block_positions: int
    first_positions: int
    first_norm: int = 0  # per token on the first stage: an embedding norm (the encoder's)
    fused_loss: int = 0  # per token on the last stage with the fused loss: what it saves besides (a mask)


@dataclass(frozen=True)
class GGUFShape:
    """A model's shape as llama.cpp reads it from a GGUF file's metadata (lmforge.gguf writes each
    field under its GGUF key, `{architecture}.context_length` and so on)."""

    architecture: str  # llama.cpp's architecture ("llama", "qwen3", "gpt2"): the graph it builds
    context_length: int
    embedding_length: int
    block_count: int
    feed_forward_length: int
    head_count: int
    head_count_kv: int
    norm_eps: float
    rms_norm: bool  # RMSNorm (layer_norm_rms_epsilon) or LayerNorm (layer_norm_epsilon)
    rope_freq_base: float | None = None  # None: no RoPE (learned positions)
    rope_dimension_count: int | None = None


@dataclass(frozen=True)
class GGUFMap:
    """How a family's models map onto a llama.cpp architecture (the family's hf.py, beside its
    Hugging Face map): pure functions, lmforge.gguf writes the file. `shape` raises ValueError for a
    config llama.cpp has no architecture for. `state_to_gguf` gets the checkpoint's names (a tied
    head under the embedding's name) and returns GGUF's ("blk.0.attn_q.weight") with each tensor in
    the layout llama.cpp computes with; a 2-D weight stays in nn.Linear's (out, in) layout, which is
    GGUF's (ne0 = in)."""

    shape: Callable[[Any], GGUFShape]
    state_to_gguf: Callable[[Mapping[str, Tensor], Any], dict[str, Tensor]]


@dataclass(frozen=True)
class HuggingFaceMap:
    """How a family's models map onto a Hugging Face transformers architecture (the family's hf.py).

    Pure functions of configs and state dicts: lmforge.hf reads and writes the files, and nothing
    here imports transformers. `state_to_hf` gets the checkpoint's names (a tied head under the
    embedding's name) and returns Hugging Face's, whose tensors own their memory (safetensors refuses
    shared storage); `state_from_hf` the reverse. The config functions raise ValueError for what
    the other side cannot express.
    """

    architecture: str  # config.json "architectures" (e.g. "LlamaForCausalLM")
    model_type: str  # config.json "model_type" (e.g. "llama")
    config_to_hf: Callable[[Any], dict[str, Any]]  # family config -> config.json's shape keys
    config_from_hf: Callable[[Mapping[str, Any]], Any]  # config.json -> family config
    state_to_hf: Callable[[Mapping[str, Tensor], Any], dict[str, Tensor]]
    state_from_hf: Callable[[Mapping[str, Tensor], Any], dict[str, Tensor]]
    # PEFT's names for a LoRA adapter: (our linear layer's name, its lora_B, config) -> (the Hugging
    # Face module's name, lora_B in that module's output order). PEFT keeps lora_A (r, in) and lora_B
    # (out, r) in nn.Linear's layout whatever the module (Conv1D too, with fan_in_fan_out).
    lora_to_hf: Callable[[str, Tensor, Any], tuple[str, Tensor]]
    fan_in_fan_out: bool = False  # PEFT's flag for modules that store (in, out) weights (Conv1D)
    gguf: GGUFMap | None = None  # llama.cpp's names and layouts for a GGUF file (lmforge.gguf)


@dataclass(frozen=True)
class FamilySpec:
    """Everything lmforge needs to build, split and shard one model family."""

    name: str  # the family's name in configs and on the command line ("llama")
    config: type  # the model config dataclass (LlamaConfig)
    model: type[nn.Module]  # built as model(config)
    flavors: Mapping[str, Any]  # named sizes: flavor -> config instance
    blocks: str  # the nn.ModuleDict of transformer blocks, keyed "0".."n_layers-1"
    stages: StageLayout
    tp_plan: TensorParallelPlan
    tp_divisible: tuple[str, ...]  # config fields tensor parallelism must split evenly
    # (config, compute dtype bytes, parameter dtype bytes, norm statistics bytes, tensor-parallel
    # degree) -> SavedBytes: the model file's saved tensors, for the planner (memory.py in the
    # family's folder, checked by tests/plan/test_memory.py and, per layout, test_comm.py)
    saved_bytes: Callable[[Any, int, int, int, int], SavedBytes]
    # module class -> a class with the same parameters and a fused forward (train.fused_projections)
    fused_modules: Mapping[type[nn.Module], type[nn.Module]] = field(default_factory=dict)
    # module class -> the class and linear layers whose weights decoding stacks (lmforge.models.stacking)
    stacked_modules: Mapping[type[nn.Module], Stacked] = field(default_factory=dict)
    hf: HuggingFaceMap | None = None  # the Hugging Face transformers round trip (lmforge.hf)
    # LoRA's target groups (lora.targets: attention, mlp) -> block-relative linear layer names
    lora_groups: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    # An encoder (bidirectional attention, a masked-LM head): pretrained with the masked-LM objective,
    # classified from its first or mean token, never generating; data-parallel layouts only (no TP or PP yet).
    encoder: bool = False
