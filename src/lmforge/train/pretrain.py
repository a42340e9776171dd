"""Pretraining: next-token prediction on a prepared corpus, from a RunConfig to a run directory.

Set-up, in order: the checkpoint to start from → the run directory, its data (prepared once,
reused) and tokenizer → the model config → layout checks → the step (model built from the seed,
transformed, optimizer; lmforge.train.step) → the objective (causal LM on the corpus) → restore a
checkpoint if resuming → the one training loop (lmforge.train.loop).
"""

from __future__ import annotations

import shutil
from contextlib import ExitStack
from dataclasses import replace
from pathlib import Path

import torch

from lmforge.adapt.freeze import trainable_counts
from lmforge.adapt.lora import is_adapter
from lmforge.config import RunConfig, save_config
from lmforge.data.classify import ClassifyLoader, labels_of, val_examples
from lmforge.data.loader import BatchLoader, val_batches
from lmforge.data.mlm import Masker, add_mask_token
from lmforge.data.sft import SFTLoader, val_rows
from lmforge.data.tokenizer import load_tokenizer, save_tokenizer, special_ids
from lmforge.errors import ConfigError
from lmforge.models import FamilyConfig, build_model, family_spec
from lmforge.parallel.apply import layout_of, validate_layout
from lmforge.parallel.mesh import (
    ParallelDims,
    build_mesh,
    dp_rank,
    local_device,
    resolve_dims,
    world_size_from_env,
)
from lmforge.rundir import (
    check_model_section,
    data_dir_for,
    ensure_data,
    load_model_weights,
    run_model_config,
    sha256_file,
)
from lmforge.runtime import (
    PRECISION_NAMES,
    configure_backends,
    describe_precision,
    peak_flops,
    resolve_device,
    resolve_precision,
)
from lmforge.train.classify import Classification
from lmforge.train.distill import Distillation, adopt_teacher_tokenizer, load_teacher
from lmforge.train.distributed import on_rank0, process_group, rank
from lmforge.train.finetune import adopt_init
from lmforge.train.float8 import check_float8_device
from lmforge.train.guards import NonFiniteGuard, StopSignal
from lmforge.train.loop import TrainingRun, resolve_check_every, restore, train
from lmforge.train.metrics import BatchLog, MetricsLogger
from lmforge.train.mlm import MaskedLM
from lmforge.train.objective import CausalLM
from lmforge.train.resume import Resume, mark_job, start_checkpoint
from lmforge.train.sft import SupervisedFineTuning
from lmforge.train.step import build_train_step
from lmforge.train.transforms import compile_enabled


def pretrain(
    cfg: RunConfig, out: str | Path, resume: Resume = False, objective: type[CausalLM] = CausalLM
) -> dict:
    """Train and return the last evaluation ({"step", "val_loss", "val_ppl", "train_time_s"}) with
    the seconds spent evaluating and checkpointing ({"eval_time_s", "checkpoint_time_s"}), or
    {"step", "stopped_by"} when SIGTERM/SIGINT ended the run after a checkpoint.

    resume: True continues from the run's newest valid checkpoint, "auto" does so if there is one
    (else starts the run), a checkpoint directory continues from exactly that one (see
    lmforge.train.resume). Under torchrun every process calls this; the layout comes from `cfg.parallel`.
    objective: next-token prediction (CausalLM), or a subclass of it that changes what is learned
    from the same corpus (its loss, its metrics); the loop is the same.
    """
    if cfg.train.init is None:  # a fine-tune's model section is its init's (checked once adopted)
        check_model_section(cfg.model)
    run_dir = Path(out)
    dims = resolve_dims(cfg.parallel, world_size_from_env())
    device = local_device(resolve_device(cfg.train.device))
    with (
        process_group(dims, device, cfg.parallel.timeout_s),
        StopSignal() as stop_signal,
        ExitStack() as opened,
    ):
        # `opened` closes the data loader's workers and the log files however the run ends.
        run = _set_up(cfg, run_dir, resume, dims, device, stop_signal, objective, opened)
        result = train(run)
        run.log.close()  # and RUN/loss.png, for a run that ended normally
        return result


def _set_up(cfg: RunConfig, run_dir: Path, resume: Resume, dims: ParallelDims, device: torch.device,
            stop_signal: StopSignal, objective_cls: type[CausalLM], opened: ExitStack) -> TrainingRun:  # fmt: skip
    cfg = resolve_adapt_defaults(cfg)
    init_dir = None
    if cfg.train.init is not None:
        cfg, init_dir = adopt_init(cfg, run_dir)
        check_model_section(cfg.model)  # with the fine-tune's head settings (model.shape.pooling)
    if cfg.distill.teacher is not None:  # the student reads the teacher's token ids
        cfg = adopt_teacher_tokenizer(cfg)
    encoder = family_spec(cfg.model.family).encoder
    objective_cls = _objective_class(cfg, encoder, objective_cls)  # before any data is prepared
    ckpt_dir = start_checkpoint(run_dir, cfg, resume)
    if cfg.train.float8:  # before any data is prepared
        check_float8_device(device)
    dtype = resolve_precision(cfg.train.precision, device)
    precision = describe_precision(cfg.train.precision, device)
    # The run's config.yaml (and each checkpoint's) records the choice, so a resumed run keeps it.
    cfg = replace(cfg, train=replace(cfg.train, precision=PRECISION_NAMES[dtype]))
    configure_backends(device)
    accum_steps, tokens_per_step = batch_geometry(cfg, dims)
    on_rank0(prepare_run_dir, run_dir, cfg)
    if init_dir is not None and sha256_file(run_dir / "tokenizer.json") != sha256_file(
        init_dir / "tokenizer.json"
    ):
        raise ConfigError(
            f"data directory {data_dir_for(cfg.data, run_dir)} was prepared with another tokenizer than that of "
            f"config key 'train.init' ({init_dir}): fine-tuning data must use the model's tokenizer (another data.dir)"
        )
    if cfg.distill.teacher is not None and sha256_file(run_dir / "tokenizer.json") != sha256_file(
        Path(cfg.distill.teacher) / "tokenizer.json"
    ):
        raise ConfigError(
            f"data directory {data_dir_for(cfg.data, run_dir)} was prepared with another tokenizer than that of "
            f"config key 'distill.teacher' ({cfg.distill.teacher}): the student must read the teacher's token ids"
        )
    if encoder:  # masked LM needs a mask token; the corpus's ids stay as they are (it is appended)
        on_rank0(ensure_mask_token, run_dir / "tokenizer.json")
    if cfg.data.task == "classify":  # the head's size and the label names come from the data
        labels = labels_of(data_dir_for(cfg.data, run_dir))
        shape = {**(cfg.model.shape or {}), "n_classes": len(labels)}
        cfg = replace(cfg, data=replace(cfg.data, labels=labels), model=replace(cfg.model, shape=shape))
    tokenizer = load_tokenizer(run_dir / "tokenizer.json")
    model_cfg = run_model_config(cfg.model, cfg.data.seq_len, tokenizer.get_vocab_size())
    fused_loss = check_layout(cfg, model_cfg, dims, accum_steps, device, objective_cls)
    mesh = build_mesh(dims, device) if dims.distributed else None

    torch.manual_seed(cfg.train.seed)  # the same initial weights on every rank and in every layout
    step = build_train_step(
        model_cfg, cfg.train, cfg.parallel, cfg.optim, layout_of(dims, mesh), device, dtype,
        pp_mesh=mesh["pp"] if mesh is not None and dims.pp > 1 else None,
        pipeline_loss=objective_cls.pipeline_loss,
        meta_init=_meta_init(cfg, dims, model_cfg), freeze=cfg.freeze, lora=cfg.lora, sparsity=cfg.sparsity,
        qat=cfg.qat,
    )  # fmt: skip
    if ckpt_dir is None and init_dir is not None:
        # Fine-tuning: the base weights replace the seeded ones (adapters keep their init), in any layout.
        load_model_weights(step.parts, init_dir / "model", exclude=lambda name: is_adapter(name) or
                           name.startswith("classifier."))  # fmt: skip
    data_dir = data_dir_for(cfg.data, run_dir)
    data_rank = dp_rank(mesh, dims) if mesh is not None else 0
    objective: CausalLM | SupervisedFineTuning | MaskedLM | Classification
    if cfg.data.task == "classify":
        pad_id = special_ids(tokenizer)["pad"]
        objective = Classification(
            ClassifyLoader(
                data_dir,
                cfg.train.micro_batch_size,
                cfg.data.seq_len,
                cfg.train.seed,
                data_rank,
                dims.dp,
                pad_id,
            ),
            val_examples(
                data_dir, cfg.train.micro_batch_size, cfg.data.seq_len, cfg.train.eval_batches, pad_id
            ),
        )
    elif cfg.data.task == "sft":
        pad_id = special_ids(tokenizer)["pad"]
        sft_loader = SFTLoader(data_dir, cfg.train.micro_batch_size, cfg.data.seq_len, cfg.train.seed, data_rank,
                               dims.dp, cfg.data.packing, pad_id)  # fmt: skip
        val_rows_ = val_rows(data_dir, cfg.train.micro_batch_size, cfg.data.seq_len, cfg.train.eval_batches,
                             cfg.data.packing, pad_id)  # fmt: skip
        objective = SupervisedFineTuning(sft_loader, val_rows_, fused_loss, cfg.data.packing, tokenizer,
                                         cfg.train.sample_tokens)  # fmt: skip
    else:
        loader = BatchLoader(data_dir, "train", cfg.train.micro_batch_size, cfg.data.seq_len, cfg.train.seed,
                             data_rank, dims.dp, pin_memory=device.type == "cuda",
                             num_workers=cfg.data.loader_workers)  # fmt: skip
        opened.callback(loader.close)
        # Under pp a validation batch is split into the schedule's micro-batches like a training batch.
        val_batch = cfg.train.micro_batch_size * (accum_steps if dims.pp > 1 else 1)
        val_data = val_batches(data_dir, val_batch, cfg.data.seq_len, cfg.train.eval_batches)
        if encoder:
            # bert's head_gradient; an encoder family without it has every row's gradient
            gated = getattr(model_cfg, "head_gradient", "all") == "batch"
            objective = MaskedLM(loader, val_data, fused_loss, Masker(tokenizer, cfg.train.seed),
                                 model_cfg.vocab_size if gated else None)  # fmt: skip
        elif cfg.distill.teacher is not None:
            objective = Distillation(loader, val_data, load_teacher(cfg.distill.teacher, device), cfg.distill.alpha,
                                     cfg.distill.temperature, tokenizer.get_vocab_size(), tokenizer,
                                     cfg.train.sample_tokens)  # fmt: skip
        else:
            objective = objective_cls(loader, val_data, fused_loss, tokenizer, cfg.train.sample_tokens)
    opened.callback(objective.close)

    guard = NonFiniteGuard(cfg.train)
    start_step = 0
    if ckpt_dir is not None:
        start_step = restore(ckpt_dir, step, objective, guard)
        if rank() == 0:
            print(f"resuming from {ckpt_dir} (step {start_step})", flush=True)
    batch_log = BatchLog(run_dir, rank(), start_step, enabled=cfg.logging.batch_hashes)
    opened.callback(batch_log.close)
    on_rank0(save_config, cfg, run_dir / "config.yaml")
    meta = build_model(model_cfg, "meta")  # counts and FLOPs of the whole model, whatever this rank holds
    log = MetricsLogger(run_dir, cfg.logging, cfg.train.max_steps, start_step, enabled=rank() == 0)
    opened.callback(log.close, plot=False)
    log.print(
        f"model {cfg.model.family}-{cfg.model.flavor}: {meta.num_params() / 1e6:.2f}M params, "
        f"{device.type} {precision}, compile={compile_enabled(cfg.train, device, dims.pp > 1)}, "
        f"layout {dims}, {tokens_per_step:,} tokens/step ({accum_steps} micro-batches per rank), "
        f"fused_loss={fused_loss}, run directory {run_dir}"
    )
    if init_dir is not None:
        trainable, total = trainable_counts(step.parts)
        log.print(f"fine-tuning {init_dir}: {trainable / 1e6:.3f}M of {total / 1e6:.2f}M parameters train "
                  f"({100 * trainable / total:.2f}%)")  # fmt: skip
    peak, _ = peak_flops(device)
    return TrainingRun(
        cfg=cfg, run_dir=run_dir, step=step, objective=objective, log=log, batch_log=batch_log, guard=guard,
        stop_signal=stop_signal, start_step=start_step, accum_steps=accum_steps, tokens_per_step=tokens_per_step,
        flops_per_token=meta.flops_per_token(cfg.data.seq_len),
        peak_flops=peak * dims.world_size if peak else None, check_every=resolve_check_every(cfg, step),
    )  # fmt: skip


def resolve_adapt_defaults(cfg: RunConfig) -> RunConfig:
    """lora.embeddings resolved (on for SFT, whose chat tokens are new rows that must learn), and the
    freezing SFT cannot take refused."""
    if cfg.data.task == "sft" and (cfg.freeze.embeddings or cfg.freeze.all_but_head):
        raise ConfigError(
            "config keys 'freeze.embeddings' and 'freeze.all_but_head' freeze the embedding rows of the chat "
            "tokens that data.task sft adds: they could never learn (use freeze.first_blocks, or LoRA)"
        )
    if cfg.lora.rank and cfg.lora.embeddings is None:
        cfg = replace(cfg, lora=replace(cfg.lora, embeddings=cfg.data.task == "sft"))
    return cfg


def _objective_class(cfg: RunConfig, encoder: bool, causal: type[CausalLM]) -> type:
    """The objective the run trains: next-token prediction (`causal`, CausalLM or a subclass of it),
    masked LM for an encoder family, or SFT (data.task sft)."""
    if cfg.distill.teacher is not None:
        if encoder:
            raise ConfigError(
                f"config key 'distill.teacher': the student must be a decoder, not {cfg.model.family}"
            )
        return Distillation
    if cfg.data.task == "classify":
        return Classification
    if cfg.data.task == "sft":
        if encoder:
            raise ConfigError(
                f"config key 'data.task': sft needs a decoder, not model.family {cfg.model.family}"
            )
        return SupervisedFineTuning
    return MaskedLM if encoder else causal


def ensure_mask_token(tokenizer_path: Path) -> None:
    """Add the mask token to the run's tokenizer file unless it has it (rank 0)."""
    tokenizer = load_tokenizer(tokenizer_path)
    if add_mask_token(tokenizer):
        save_tokenizer(tokenizer, tokenizer_path)


def batch_geometry(cfg: RunConfig, dims: ParallelDims) -> tuple[int, int]:
    """(micro-batches per rank per optimizer step, tokens per optimizer step over all ranks)."""
    micro_tokens = cfg.train.micro_batch_size * cfg.data.seq_len * dims.dp
    tokens_per_step = cfg.train.global_batch_tokens or micro_tokens
    if tokens_per_step % micro_tokens:
        raise ConfigError(
            f"config key 'train.global_batch_tokens' ({tokens_per_step}) must be a multiple of "
            f"micro_batch_size * seq_len * data-parallel degree = {micro_tokens}"
        )
    return tokens_per_step // micro_tokens, tokens_per_step


def prepare_run_dir(run_dir: Path, cfg: RunConfig) -> None:
    """The run directory with its data and tokenizer (rank 0)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    mark_job(run_dir)
    data_dir = ensure_data(cfg.data, run_dir, cfg.train.seed)
    tokenizer_path = run_dir / "tokenizer.json"
    if tokenizer_path.resolve() != (data_dir / "tokenizer.json").resolve():
        shutil.copyfile(data_dir / "tokenizer.json", tokenizer_path)


def check_layout(cfg: RunConfig, model_cfg: FamilyConfig, dims: ParallelDims, accum_steps: int,
                 device: torch.device, objective_cls: type[CausalLM]) -> bool:  # fmt: skip
    """Refuse, in one line, what this layout cannot run; returns train.fused_loss resolved."""
    if dims.pp > 1 and objective_cls.pipeline_loss is None:
        raise ConfigError(
            f"parallel.pp={dims.pp}: the objective {objective_cls.__name__} has no pipeline_loss "
            "(the loss of the last stage's output): it cannot run as a pipeline"
        )
    if dims.distributed:
        validate_layout(
            model_cfg, dims, cfg.parallel, cfg.data.seq_len, cfg.train.micro_batch_size * accum_steps
        )
    if cfg.data.task == "sft" and cfg.data.packing and dims.tp > 1:
        raise ConfigError(
            f"config key 'data.packing' is not supported with parallel.tp={dims.tp} yet: set it false"
        )
    if cfg.data.task == "classify" and dims.tp > 1:
        raise ConfigError(f"config key 'data.task' classify is not supported with parallel.tp={dims.tp} yet")
    if family_spec(cfg.model.family).encoder and (dims.tp > 1 or dims.pp > 1):
        raise ConfigError(
            f"model.family {cfg.model.family} (an encoder) trains data-parallel only: parallel.tp and parallel.pp must be 1"
        )
    if cfg.lora.rank and dims.pp > 1:
        raise ConfigError(f"config key 'lora.rank': LoRA is not supported with parallel.pp={dims.pp} yet")
    if cfg.optim.name == "muon" and (dims.dp_shard > 1 or dims.tp > 1):
        raise ConfigError(
            "parallel layout: optim.name 'muon' orthogonalises whole matrices, which FSDP and TP shard "
            f"(parallel.dp_shard={dims.dp_shard}, parallel.tp={dims.tp}): use parallel.dp_replicate or parallel.pp"
        )
    if dims.pp > 1 and resolve_precision(cfg.train.precision, device) == torch.float16:
        raise ConfigError(
            "parallel.pp > 1 does not support train.precision fp16 (no GradScaler in the pipeline): use bf16"
        )
    fused_loss = cfg.train.fused_loss if cfg.train.fused_loss is not None else dims.tp == 1 and dims.pp == 1
    if fused_loss and (dims.tp > 1 or dims.pp > 1):
        raise ConfigError(
            "config key 'train.fused_loss' needs the whole output head: not with parallel.tp or pp > 1"
        )
    compile_mode = cfg.train.compile_mode
    if compile_enabled(cfg.train, device, dims.pp > 1) and compile_mode in ("reduce-overhead", "max-autotune") \
            and dims.distributed:  # fmt: skip
        # CUDA graphs replay fixed memory addresses and kernels; the gradient reduction and FSDP's
        # per-step all-gathers between them are not captured correctly by them yet.
        raise ConfigError(
            f"config key 'train.compile_mode' {compile_mode!r} records CUDA graphs, which are not "
            f"supported with several processes (layout {dims}) yet: use 'default' or 'max-autotune-no-cudagraphs'"
        )
    return fused_loss


def _meta_init(cfg: RunConfig, dims: ParallelDims, model_cfg: FamilyConfig) -> bool:
    """parallel.meta_init, resolved: by default, sharded layouts of models of >= 1B parameters."""
    sharded = dims.distributed and dims.pp == 1 and (dims.dp_shard > 1 or dims.tp > 1)
    if cfg.parallel.meta_init is None:
        return sharded and build_model(model_cfg, "meta").num_params() >= 1_000_000_000
    return cfg.parallel.meta_init and sharded
