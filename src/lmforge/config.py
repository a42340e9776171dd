"""The run config: one typed dataclass per component, YAML in and out.

Each stage receives only its own section (the optimizer builder gets `OptimConfig`, the
checkpointer gets `CheckpointConfig`, ...). The resolved config is written to `RUN/config.yaml`
and into every checkpoint, so a run can always be rebuilt from its directory.

Parsing and type checking of YAML files and `--section.key=value` overrides is done by
jsonargparse, which reads these dataclasses' type hints; an unknown key or a value of the wrong
type fails before any work with the key's name. Checks of values that types cannot express
(a positive step count, a batch that divides evenly) live in `__post_init__`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import yaml

from lmforge.errors import ConfigError


def _require(ok: bool, key: str, expected: str, value: object) -> None:
    if not ok:
        raise ConfigError(f"config key '{key}' must be {expected}, got {value!r}")


@dataclass
class ModelConfig:
    """Which architecture to build.

    Args:
        family: Model family, a name of lmforge.models.FAMILIES: `llama` (RMSNorm, RoPE, SwiGLU, GQA) or `gpt2` (LayerNorm, learned positions, GELU).
        flavor: Size preset of the family: debug, tiny, 124m, 350m, 1b, 7b, 70b, 175b.
        vocab_size: Embedding rows; by default the tokenizer's vocab rounded up to a multiple of 64.
        qk_norm: llama only: RMSNorm on each head's queries and keys before RoPE (as OLMo 2 and Qwen3), which keeps attention logits bounded at high learning rates.
        shape: Fields of the family's config that replace the flavor's (e.g. {dim: 512, n_layers: 8}; bert: {positions: rotary}, {head_gradient: batch|all}, {pooling: first|mean}, the one key a fine-tune may set); `lmforge import` writes every field of the model it imports here. The context length is data.seq_len's.
    """

    family: str = "llama"  # checked against the registry of families when a run starts
    flavor: str = "tiny"
    vocab_size: int | None = None
    qk_norm: bool = False
    shape: dict[str, int | float | bool | str] | None = None

    def __post_init__(self) -> None:
        _require(self.vocab_size is None or self.vocab_size > 0, "model.vocab_size", "> 0", self.vocab_size)


@dataclass
class DataConfig:
    """Where the tokens come from.

    Args:
        source: Corpus: `stdlib` (the Python standard library's own source), `python` (the standard library and site-packages), a text file, a directory, a glob, a .jsonl or a .parquet file.
        dir: Prepared data directory (tokenizer.json, shards, manifest.json); default RUN/data, prepared from `source` if missing.
        vocab_size: Vocabulary size of the byte-level BPE tokenizer trained on the corpus.
        tokenizer: Use this tokenizer.json instead of training one.
        val_fraction: Fraction of documents held out for validation.
        seq_len: Tokens per training window (the model's context length).
        num_workers: Tokenizer worker processes (default: all cores).
        loader_workers: Processes that read training batches ahead of the step (0: the training process reads them).
        task: lm (language modelling on text: next-token for decoders, masked LM for encoders), sft (supervised fine-tuning on JSONL chat examples: loss on the assistant's tokens only) or classify (text classification from CSV/JSONL `text` and `label`); docs/finetune.md.
        packing: sft: several examples per row, each attending only to itself (default); false: one example per row, padded.
        malformed: sft, classify: a malformed line is an error naming the file and line (error), or is skipped and counted (skip).
        labels: classify: the class names, in the order of the model's outputs; set from the data when the run starts.
    """

    source: str = "stdlib"
    dir: str | None = None
    vocab_size: int = 8192
    tokenizer: str | None = None
    val_fraction: float = 0.01
    seq_len: int = 256
    num_workers: int | None = None
    loader_workers: int = 0
    task: Literal["lm", "sft", "classify"] = "lm"
    packing: bool = True
    malformed: Literal["error", "skip"] = "error"
    labels: list[str] | None = None

    def __post_init__(self) -> None:
        _require(
            self.vocab_size >= 256 + 3,
            "data.vocab_size",
            ">= 259 (256 bytes + 3 special tokens)",
            self.vocab_size,
        )
        _require(0.0 < self.val_fraction < 1.0, "data.val_fraction", "in (0, 1)", self.val_fraction)
        _require(self.seq_len > 0, "data.seq_len", "> 0", self.seq_len)
        _require(self.loader_workers >= 0, "data.loader_workers", ">= 0", self.loader_workers)


@dataclass
class OptimConfig:
    """The optimizer. Weight decay never applies to norms, biases and embeddings.

    Args:
        name: adamw, adam, sgd, adagrad, adafactor, or muon (Muon for the matrices inside the blocks, AdamW for the rest; one lr for both; needs whole matrices: DDP or pipeline, not FSDP/TP).
        lr: Peak learning rate (reached at the end of warmup).
        betas: Adam(W) moment coefficients.
        eps: Adam(W)/AdaGrad epsilon.
        weight_decay: Decoupled (AdamW, Adafactor) or L2 (others) weight decay on matrix weights.
        momentum: SGD momentum.
        nesterov: SGD Nesterov momentum.
        fused: Fused AdamW/Adam kernel; default: on for CUDA.
        muon_momentum: Muon's momentum (Nesterov).
    """

    name: Literal["adamw", "adam", "sgd", "adagrad", "adafactor", "muon"] = "adamw"
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 0.1
    momentum: float = 0.9
    nesterov: bool = False
    fused: bool | None = None
    muon_momentum: float = 0.95

    def __post_init__(self) -> None:
        _require(self.lr > 0, "optim.lr", "> 0", self.lr)
        _require(self.weight_decay >= 0, "optim.weight_decay", ">= 0", self.weight_decay)
        _require(all(0 <= b < 1 for b in self.betas), "optim.betas", "two numbers in [0, 1)", self.betas)


@dataclass
class ScheduleConfig:
    """Learning-rate schedule: linear warmup, then a decay to `min_lr_ratio * lr`.

    Args:
        name: cosine, linear, constant, or wsd (warmup-stable-decay: flat, then linear decay over the last `decay_fraction`).
        warmup_steps: Steps of linear warmup from 0 to the peak LR.
        min_lr_ratio: Final LR as a fraction of the peak.
        decay_fraction: wsd only: fraction of the steps spent decaying.
        total_steps: Length of the schedule; default train.max_steps.
    """

    name: Literal["cosine", "linear", "constant", "wsd"] = "cosine"
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1
    decay_fraction: float = 0.2
    total_steps: int | None = None

    def __post_init__(self) -> None:
        _require(self.warmup_steps >= 0, "schedule.warmup_steps", ">= 0", self.warmup_steps)
        _require(0.0 <= self.min_lr_ratio <= 1.0, "schedule.min_lr_ratio", "in [0, 1]", self.min_lr_ratio)
        _require(
            0.0 < self.decay_fraction <= 1.0, "schedule.decay_fraction", "in (0, 1]", self.decay_fraction
        )
        _require(
            self.total_steps is None or self.total_steps > 0, "schedule.total_steps", "> 0", self.total_steps
        )


@dataclass
class TrainConfig:
    """The training loop.

    Args:
        max_steps: Optimizer steps to train for.
        seed: Seed of model init and data order.
        micro_batch_size: Sequences per forward/backward.
        global_batch_tokens: Tokens per optimizer step; gradient accumulation makes up the difference. Default: one micro-batch.
        grad_clip: Clip the global gradient norm to this (0 disables).
        precision: auto (bf16 autocast on GPUs that support it, else fp16 with a GradScaler; on CPU bf16 where the CPU computes it natively, AMX or AVX512_BF16, else fp32), fp32, bf16 or fp16. The run's config.yaml records what auto chose.
        compile: torch.compile the model; default: on for CUDA (on CPU, where a recipe asks: docs/speed.md). A CPU without a working C++ compiler trains eagerly after one warning line.
        compile_scope: blocks (each transformer block compiled on its own: one trace reused by every block, short compile) or model (one graph for the whole model).
        compile_mode: torch.compile mode: default, reduce-overhead (CUDA graphs), max-autotune, max-autotune-no-cudagraphs.
        fused_projections: llama: one matmul for q, k, v and one for the SwiGLU gate and up projections (same parameters and checkpoints).
        float8: Train the linear layers inside the blocks in float8 (torchao, tensorwise scaling); needs torchao and a GPU of compute capability >= 8.9.
        check_every: Steps between the loop's host syncs that read the non-finite flags and the stop signal; in between, a non-finite step is skipped on the device (needs a fused Adam/AdamW and no fp16); a stop signal waits for the next read. Default: logging.log_every, at most 10, when that holds, else 1.
        target_val_loss: Stop (with a checkpoint) at the first evaluation whose validation loss is at or below this.
        device: auto, cpu, cuda, cuda:N.
        eval_every: Evaluate on the validation split every N steps (and at the end); 0 disables periodic evaluation.
        eval_batches: Validation batches per evaluation.
        sample_tokens: Tokens of sample text generated at each evaluation (0: none).
        activation_checkpointing: none, selective (recompute every other block in backward) or full (every block): less activation memory for more compute.
        fused_loss: Compute the loss from the last hidden state chunk by chunk, never materialising the logits (lmforge.ops.cross_entropy); default: on, except with parallel.tp or parallel.pp > 1.
        nonfinite_patience: A step whose loss or gradient norm is NaN/Inf is skipped (no optimizer step); this many in a row trigger nonfinite_action.
        nonfinite_action: rollback (reload the last checkpoint, keep reading new data) or stop (exit with an error).
        rollback_lr_factor: Multiply the learning rate by this after each rollback.
        max_rollbacks: Stop instead of rolling back once this many rollbacks happened.
        init: Start from the weights of this run directory (its newest checkpoint) or checkpoint directory instead of a random initialisation: fine-tuning (`lmforge finetune --init` sets it); the model section then comes from it.
    """

    max_steps: int = 1000
    seed: int = 1337
    micro_batch_size: int = 16
    global_batch_tokens: int | None = None
    grad_clip: float = 1.0
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    compile: bool | None = None
    compile_scope: Literal["blocks", "model"] = "blocks"
    compile_mode: Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"] = (
        "default"
    )
    fused_projections: bool = False
    float8: bool = False
    check_every: int | None = None
    target_val_loss: float | None = None
    device: str = "auto"
    eval_every: int = 200
    eval_batches: int = 20
    sample_tokens: int = 48
    activation_checkpointing: Literal["none", "selective", "full"] = "none"
    fused_loss: bool | None = None
    nonfinite_patience: int = 3
    nonfinite_action: Literal["rollback", "stop"] = "rollback"
    rollback_lr_factor: float = 1.0
    max_rollbacks: int = 3
    init: str | None = None

    def __post_init__(self) -> None:
        _require(self.max_steps > 0, "train.max_steps", "> 0", self.max_steps)
        _require(self.micro_batch_size > 0, "train.micro_batch_size", "> 0", self.micro_batch_size)
        _require(
            self.global_batch_tokens is None or self.global_batch_tokens > 0,
            "train.global_batch_tokens",
            "> 0",
            self.global_batch_tokens,
        )
        _require(self.grad_clip >= 0, "train.grad_clip", ">= 0", self.grad_clip)
        _require(re.fullmatch(r"auto|cpu|cuda(:\d+)?|mps", self.device) is not None, "train.device",
                 "auto, cpu, cuda or cuda:N", self.device)  # fmt: skip
        _require(self.eval_every >= 0, "train.eval_every", ">= 0", self.eval_every)
        _require(self.eval_batches > 0, "train.eval_batches", "> 0", self.eval_batches)
        _require(self.nonfinite_patience > 0, "train.nonfinite_patience", "> 0", self.nonfinite_patience)
        _require(
            0 < self.rollback_lr_factor <= 1, "train.rollback_lr_factor", "in (0, 1]", self.rollback_lr_factor
        )
        _require(self.max_rollbacks >= 0, "train.max_rollbacks", ">= 0", self.max_rollbacks)
        _require(
            self.check_every is None or self.check_every > 0, "train.check_every", "> 0", self.check_every
        )
        _require(not (self.float8 and self.fused_projections), "train.float8",
                 "false with train.fused_projections (the fused matmuls bypass the float8 layers)", self.float8)  # fmt: skip
        _require(self.target_val_loss is None or self.target_val_loss > 0, "train.target_val_loss", "> 0",
                 self.target_val_loss)  # fmt: skip


@dataclass
class FreezeConfig:
    """Parameters that training leaves unchanged: they get no gradient and no optimizer state.

    Args:
        embeddings: Freeze the input embeddings (and positions); with tied embeddings, the output head too.
        first_blocks: Freeze the first K transformer blocks.
        all_but_head: Freeze everything except the output head (with tied embeddings the head is the embedding, which then trains).
    """

    embeddings: bool = False
    first_blocks: int = 0
    all_but_head: bool = False

    def __post_init__(self) -> None:
        _require(self.first_blocks >= 0, "freeze.first_blocks", ">= 0", self.first_blocks)


@dataclass
class LoraConfig:
    """Low-rank adapters (LoRA, Hu et al. 2021): W x + (alpha / rank) B A x, only A and B train.

    Args:
        rank: Rank of the adapters; 0: no LoRA.
        alpha: Scale numerator: the update is multiplied by alpha / rank.
        dropout: Dropout on the adapters' input.
        embeddings: Also train the token embeddings and the output head whole (PEFT's modules_to_save), as tokens the run adds need; default: on with data.task sft (its chat tokens), off otherwise.
        targets: Linear layers inside each block that get adapters: `attention`, `mlp`, or module names relative to a block, matched on whole name parts (llama: wq, wk, wv, wo, w1, w2, w3; gpt2: c_attn, attn.c_proj, c_fc, mlp.c_proj).
    """

    rank: int = 0
    alpha: float = 16.0
    dropout: float = 0.0
    targets: list[str] = field(default_factory=lambda: ["attention"])
    embeddings: bool | None = None

    def __post_init__(self) -> None:
        _require(self.rank >= 0, "lora.rank", ">= 0", self.rank)
        _require(self.alpha > 0, "lora.alpha", "> 0", self.alpha)
        _require(0.0 <= self.dropout < 1.0, "lora.dropout", "in [0, 1)", self.dropout)
        _require(len(self.targets) > 0, "lora.targets", "at least one module name", self.targets)


@dataclass
class QatConfig:
    """Quantization-aware training: the linear layers' weights (and activations, for int8-dynamic) are
    fake-quantized in the forward pass, so training learns weights that survive the scheme;
    `lmforge compress quantize` then converts the run with the same scheme and group size.

    Args:
        scheme: none, int4-weight (4-bit weights, per group) or int8-dynamic (int8 weights per channel, int8 activations per token).
        group_size: Weights per quantization group (int4-weight).
    """

    scheme: Literal["none", "int4-weight", "int8-dynamic"] = "none"
    group_size: int = 32

    def __post_init__(self) -> None:
        _require(self.group_size in (16, 32, 64, 128, 256), "qat.group_size", "one of 16, 32, 64, 128, 256",
                 self.group_size)  # fmt: skip


@dataclass
class SparsityConfig:
    """Pruning masks kept through training (the recovery fine-tune of a pruned model).

    Args:
        keep_zeros: Weights of the linear layers that are exactly zero in train.init stay zero: their gradients are masked, so the pruned pattern survives every optimizer step.
    """

    keep_zeros: bool = False


@dataclass
class DistillConfig:
    """Knowledge distillation (Hinton et al. 2015): the loss is (1 - alpha) * cross-entropy + alpha *
    T^2 * KL(teacher || student) at temperature T. The teacher runs in inference mode, never updated.

    Args:
        teacher: Run directory or checkpoint of the teacher (same tokenizer; any family or size); None: no distillation.
        alpha: Weight of the distillation term, in [0, 1].
        temperature: Softmax temperature T of both distributions in the KL term.
    """

    teacher: str | None = None
    alpha: float = 0.5
    temperature: float = 2.0

    def __post_init__(self) -> None:
        _require(0.0 <= self.alpha <= 1.0, "distill.alpha", "in [0, 1]", self.alpha)
        _require(self.temperature > 0, "distill.temperature", "> 0", self.temperature)


@dataclass
class CompressConfig:
    """What `lmforge compress` did to make a run's model (written by it, read by the load path and the
    report; a recipe leaves it empty).

    Args:
        quantize: The quantization scheme of the saved weights (int8-weight, int8-dynamic, int4-weight, float8-weight); None: plain weights.
        group_size: Weights per quantization group (int4-weight).
        prune: The pruning method that made the weights (magnitude, heads-channels, 2:4); None: not pruned.
        sparsity: The pruned fraction that was asked for.
        source: The checkpoint the compressed model was made from.
    """

    quantize: str | None = None
    group_size: int | None = None
    prune: str | None = None
    sparsity: float | None = None
    source: str | None = None


@dataclass
class CheckpointConfig:
    """When checkpoints are written.

    Args:
        every_steps: Write a checkpoint every N steps (and always at the end); 0: only at the end.
        keep_last: Keep this many most recent checkpoints.
        enabled: False: write none at all, not even at the end or on SIGTERM (benchmark runs); such
            a run cannot be resumed, and non-finite steps cannot be rolled back.
    """

    every_steps: int = 500
    keep_last: int = 3
    enabled: bool = True

    def __post_init__(self) -> None:
        _require(self.every_steps >= 0, "checkpoint.every_steps", ">= 0", self.every_steps)
        _require(self.keep_last >= 1, "checkpoint.keep_last", ">= 1", self.keep_last)


@dataclass
class LoggingConfig:
    """What the run reports.

    Args:
        log_every: Write a metrics.jsonl line (and sync with the device) every N steps.
        progress: Show a progress bar.
        tensorboard: Write TensorBoard events to RUN/tb.
        plot: Write RUN/loss.png at the end.
        batch_hashes: Write RUN/batches/rank_R.jsonl: a hash of every micro-batch each rank trains on (to audit data order across resumes).
    """

    log_every: int = 10
    progress: bool = True
    tensorboard: bool = True
    plot: bool = True
    batch_hashes: bool = False

    def __post_init__(self) -> None:
        _require(self.log_every > 0, "logging.log_every", "> 0", self.log_every)


@dataclass
class ParallelConfig:
    """How the job is spread over processes (torchrun); the product of the four degrees is the world size.

    Args:
        dp_replicate: Data-parallel replicas (DDP when dp_shard is 1; HSDP's replicate dimension otherwise).
        dp_shard: Fully sharded data parallel (FSDP2) degree; -1: whatever the other degrees leave of the world size.
        tp: Tensor-parallel degree (attention heads and MLP split over ranks).
        pp: Pipeline-parallel degree (layers split into stages).
        pp_schedule: gpipe, 1f1b or interleaved_1f1b.
        pp_microbatches: Micro-batches per pipeline step (default: pp).
        sequence_parallel: With tp > 1, run norms sequence-parallel.
        fsdp_reshard_after_forward: Free gathered parameters after forward (less memory, one more all-gather in backward).
        fsdp_cpu_offload: Keep sharded parameters, gradients and optimizer state in CPU memory.
        fsdp_reduce_dtype: Gradient reduce-scatter precision under FSDP with bf16 compute.
        timeout_s: Collective timeout: a rank that stops answering ends the job after this long.
        meta_init: Build the model on the meta device and materialise only this rank's shards (FSDP/TP); default: for models of >= 1B parameters. Initial weights then come from DTensor's RNG, not a single-device draw.
    """

    dp_replicate: int = 1
    dp_shard: int = -1
    tp: int = 1
    pp: int = 1
    pp_schedule: Literal["gpipe", "1f1b", "interleaved_1f1b"] = "1f1b"
    pp_microbatches: int | None = None
    sequence_parallel: bool = True
    fsdp_reshard_after_forward: bool = True
    fsdp_cpu_offload: bool = False
    fsdp_reduce_dtype: Literal["fp32", "bf16"] = "fp32"
    timeout_s: int = 600
    meta_init: bool | None = None

    def __post_init__(self) -> None:
        for key in ("dp_replicate", "tp", "pp"):
            _require(getattr(self, key) >= 1, f"parallel.{key}", ">= 1", getattr(self, key))
        _require(self.dp_shard == -1 or self.dp_shard >= 1, "parallel.dp_shard", ">= 1 or -1", self.dp_shard)
        _require(self.timeout_s > 0, "parallel.timeout_s", "> 0", self.timeout_s)


@dataclass
class RunConfig:
    """Everything needed to rebuild a run."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    freeze: FreezeConfig = field(default_factory=FreezeConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    qat: QatConfig = field(default_factory=QatConfig)
    sparsity: SparsityConfig = field(default_factory=SparsityConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    compress: CompressConfig = field(default_factory=CompressConfig)

    def __post_init__(self) -> None:
        for key in ("fused_projections", "float8"):
            # Both swap or bypass the nn.Linear layers that LoRA wraps.
            _require(not (self.lora.rank and getattr(self.train, key)), "lora.rank",
                     f"0 with train.{key} (LoRA adapts plain nn.Linear layers)", self.lora.rank)  # fmt: skip
        tokens_per_micro_batch = self.train.micro_batch_size * self.data.seq_len
        if self.train.global_batch_tokens is not None:
            _require(
                self.train.global_batch_tokens % tokens_per_micro_batch == 0,
                "train.global_batch_tokens",
                f"a multiple of micro_batch_size * seq_len = {tokens_per_micro_batch}",
                self.train.global_batch_tokens,
            )

    @property
    def schedule_steps(self) -> int:
        return self.schedule.total_steps or self.train.max_steps


def to_dict(cfg: RunConfig) -> dict:
    """Plain dict of the config (tuples as lists), as written to YAML."""
    return yaml.safe_load(yaml.safe_dump(dataclasses.asdict(cfg)))


def save_config(cfg: RunConfig, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))


def config_sha256(cfg: RunConfig) -> str:
    return hashlib.sha256(yaml.safe_dump(to_dict(cfg), sort_keys=True).encode()).hexdigest()


def run_config_parser():
    """A jsonargparse parser whose keys are RunConfig's sections (`--train.max_steps`, ...)."""
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(exit_on_error=False, allow_abbrev=False)
    parser.add_class_arguments(RunConfig, None)
    return parser


# A recipe is a few hundred bytes and a few dozen values; a larger file passed as a config is a
# mistake (a checkpoint, a corpus) and is refused before it is read into memory, and YAML aliases that
# expand to more values (an "alias bomb": 1 KB that expands to 10^9 values) before they are expanded.
MAX_CONFIG_BYTES = 1 << 20
MAX_CONFIG_VALUES = 10_000


def load_config(path: str | Path) -> RunConfig:
    """Read and type-check a config YAML file (a recipe or a run's config.yaml)."""
    return parse_config_dict(read_config_file(path), origin=f"config file {path}")


def read_config_file(path: str | Path) -> dict:
    """The sections of a config YAML file, its layout checked: ConfigError naming the file and key if
    it is not UTF-8 YAML, not a mapping of known sections or a section has an unknown key. The
    values' types are checked by the parser (`parse_config_dict`, or the CLI's)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        size = path.stat().st_size
        if size > MAX_CONFIG_BYTES:
            raise ConfigError(f"config file {path} has {size} bytes: too large for a config (at most 1 MiB)")
        text = path.read_bytes().decode("utf-8")
    except OSError as err:
        raise ConfigError(f"cannot read config file {path}: {err.strerror}") from None
    except UnicodeDecodeError as err:
        raise ConfigError(f"config file {path} is not UTF-8 text (byte {err.start})") from None
    try:
        values = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        reason = getattr(err, "problem", None) or one_line(str(err))
        raise ConfigError(f"config file {path} is not valid YAML{where}: {reason}") from None
    if values is None:  # an empty (or truncated to nothing) file: jsonargparse's message names neither
        raise ConfigError(f"config file {path} is empty (expected a mapping of sections)")
    _check_value_count(values, origin=f"config file {path}")  # first: a layout error shows values
    check_config_layout(values, origin=f"config file {path}")
    return values


def _check_value_count(values: object, origin: str) -> None:
    """ConfigError if `values`, aliases expanded, holds more than MAX_CONFIG_VALUES values (counts no further)."""
    pending, count = [values], 0
    while pending:
        value = pending.pop()
        count += 1
        if count > MAX_CONFIG_VALUES:
            raise ConfigError(
                f"{origin} holds more than {MAX_CONFIG_VALUES} values (YAML aliases that expand?)"
            )
        if isinstance(value, dict):
            pending.extend(value.values())
        elif isinstance(value, list):
            pending.extend(value)


def check_config_layout(values: object, origin: str = "config") -> None:
    """ConfigError unless `values` is a mapping of known sections, each a mapping of known keys."""
    if not isinstance(values, dict):
        raise ConfigError(f"{origin}: expected a mapping of sections, got {type(values).__name__}")
    section_types = typing.get_type_hints(RunConfig)
    for section, keys in values.items():
        if section not in section_types:
            raise ConfigError(
                f"{origin}: unknown config section '{section}' (expected one of {', '.join(section_types)})"
            )
        if not isinstance(keys, dict):
            raise ConfigError(
                f"{origin}: config section '{section}' must be a mapping of keys, got {one_line(repr(keys))[:80]}"
            )
        known = [f.name for f in dataclasses.fields(section_types[section])]
        for key in keys:
            if key not in known:
                raise ConfigError(
                    f"{origin}: unknown config key '{section}.{key}' (expected one of {', '.join(known)})"
                )


def parse_config_dict(values: dict, origin: str = "config") -> RunConfig:
    parser = run_config_parser()
    check_config_layout(values, origin)
    try:
        namespace = parser.parse_object(values)
        return namespace_to_config(parser.instantiate(namespace))
    except ConfigError:
        raise
    except Exception as err:
        raise ConfigError(f"{origin}: {explain_parse_error(err)}") from None


def namespace_to_config(namespace) -> RunConfig:
    """The instantiated jsonargparse namespace holds one dataclass per section."""
    return RunConfig(**{f.name: getattr(namespace, f.name) for f in dataclasses.fields(RunConfig)})


def one_line(text: str) -> str:
    return " ".join(text.split())


def explain_parse_error(err: BaseException) -> str:
    """jsonargparse errors span several lines; keep the part that names the key and the value."""
    # A ConfigError raised from a dataclass __post_init__ arrives wrapped; surface it.
    cause: BaseException | None = err
    while cause is not None:
        if isinstance(cause, ConfigError):
            return str(cause)
        cause = cause.__cause__ or cause.__context__
    text = str(err)
    match = re.search(r"ConfigError: (config key .*?)(?:\n|$)", text)
    if match:
        return match.group(1)
    text = re.sub(r"Group '([\w.]+)' does not accept nested key '(\w+)'", r"unknown config key '\1.\2'", text)
    text = re.sub(r"Group '([\w.]+)' does not accept option '(\w+)'", r"unknown config key '\1.\2'", text)
    text = re.sub(r'Parser key "([\w.]+)":\s*Expected a ', r"config key '\1': expected a ", text)
    text = text.replace("<class '", "").replace("'>", "").replace("typing.", "")
    return one_line(text)
