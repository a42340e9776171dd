"""Knowledge distillation (Hinton et al. 2015, "Distilling the Knowledge in a Neural Network"): the
student learns the corpus's next tokens and, at the same time, the teacher's whole distribution over
them, which carries more per token than the one-hot target:

    loss = (1 - alpha) * CE(student, targets) + alpha * T^2 * KL(softmax(teacher / T) || softmax(student / T))

The T^2 keeps the soft term's gradients at the scale of the hard term's as T grows (the paper's
section 2). The KL is the mean over the micro-batch's tokens, like the cross-entropy.

It is an objective on the one loop: the teacher is held here, in inference, never updated and never
saved with the student, so checkpoints, exact resume and torchrun are those of any run. The teacher
may be another family or size; it must share the student's tokenizer (the run adopts it).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F
from tokenizers import Tokenizer
from torch import Tensor, nn

from lmforge.adapt.lora import merge_lora
from lmforge.config import RunConfig, load_config
from lmforge.data.loader import BatchLoader
from lmforge.errors import ConfigError
from lmforge.models import FamilyModel, spec_of
from lmforge.ops.cross_entropy import cross_entropy
from lmforge.rundir import load_model_weights, meta_model, resolve_checkpoint, sha256_file
from lmforge.train.objective import Batch, CausalLM


def distillation_loss(
    student_logits: Tensor, teacher_logits: Tensor, targets: Tensor, alpha: float, temperature: float
) -> Tensor:
    """(1 - alpha) * cross-entropy + alpha * T^2 * KL(teacher || student), each a mean over tokens.

    student_logits, teacher_logits: (B, T, V) over the same vocabulary; targets: (B, T).
    The KL is computed in fp32 (log-softmax of both at temperature T): under autocast the logits may
    be bf16, whose 8 bits of mantissa would make a small KL mostly rounding.
    """
    hard = cross_entropy(student_logits, targets) if alpha < 1.0 else student_logits.new_zeros(())
    if alpha == 0.0:
        return hard
    vocab = student_logits.size(-1)
    student_log_probs = F.log_softmax(student_logits.float().reshape(-1, vocab) / temperature, dim=-1)
    teacher_log_probs = F.log_softmax(teacher_logits.float().reshape(-1, vocab) / temperature, dim=-1)
    # kl_div(input=log q, target=log p, log_target=True) sums p * (log p - log q): KL(p || q) per
    # token; "batchmean" divides by the number of tokens (the rows).
    soft = F.kl_div(student_log_probs, teacher_log_probs, reduction="batchmean", log_target=True)
    return (1.0 - alpha) * hard + alpha * temperature**2 * soft


def load_teacher(path: str | Path, device: torch.device) -> FamilyModel:
    """The teacher model of a run or checkpoint, in eval mode, its parameters frozen (fp32: the
    training step's autocast sets its compute dtype)."""
    ckpt_dir = resolve_checkpoint(path)
    cfg = load_config(ckpt_dir / "config.yaml")
    if cfg.compress.quantize:
        raise ConfigError(
            f"config key 'distill.teacher': {ckpt_dir} is quantized ({cfg.compress.quantize}): "
            "distill from the model it was quantized from"
        )
    model = meta_model(ckpt_dir)
    if spec_of(model).encoder or model.cfg.n_classes:
        raise ConfigError(
            f"config key 'distill.teacher': {ckpt_dir} is not a language model that predicts next tokens "
            f"(family {spec_of(model).name}, n_classes {model.cfg.n_classes})"
        )
    model.to_empty(device=device)
    model.init_weights()  # the buffers that are not saved (RoPE tables)
    load_model_weights(model, ckpt_dir / "model")
    merge_lora(model)
    model.requires_grad_(False)
    return model.eval()


def adopt_teacher_tokenizer(cfg: RunConfig) -> RunConfig:
    """`cfg` with the teacher's tokenizer as data.tokenizer (the student must read the teacher's ids);
    a different tokenizer of the config's own is refused."""
    assert cfg.distill.teacher is not None
    teacher_dir = resolve_checkpoint(cfg.distill.teacher).resolve()
    tokenizer = teacher_dir / "tokenizer.json"
    if cfg.data.tokenizer is not None and (
        not Path(cfg.data.tokenizer).is_file()
        or sha256_file(Path(cfg.data.tokenizer)) != sha256_file(tokenizer)
    ):
        raise ConfigError(
            f"config key 'data.tokenizer' ({cfg.data.tokenizer}) differs from the tokenizer of config key "
            f"'distill.teacher' ({tokenizer}): the student must use the teacher's tokenizer"
        )
    if cfg.data.task != "lm":
        raise ConfigError(
            f"config key 'distill.teacher': distillation trains data.task lm, not {cfg.data.task}"
        )
    return replace(
        cfg,
        data=replace(cfg.data, tokenizer=cfg.data.tokenizer or str(tokenizer)),
        distill=replace(cfg.distill, teacher=str(teacher_dir)),
    )


class Distillation(CausalLM):
    """Causal-LM training of the student against the corpus and the teacher's distributions.

    Validation reports the student's plain next-token loss (val_loss, val_ppl), so a distilled run
    compares with one trained without a teacher."""

    # The loss needs the teacher's logits of the same micro-batch: it cannot be a pipeline stage's.
    pipeline_loss = None

    def __init__(
        self,
        loader: BatchLoader,
        val_data: list[Batch],
        teacher: FamilyModel,
        alpha: float,
        temperature: float,
        vocab_size: int,
        tokenizer: Tokenizer | None = None,
        sample_tokens: int = 0,
    ):
        """vocab_size: the tokenizer's; both models' logits are compared over these ids (a model's
        vocabulary may be padded beyond them, with rows no target ever uses)."""
        super().__init__(loader, val_data, False, tokenizer, sample_tokens)
        self.teacher = teacher
        self.alpha = alpha
        self.temperature = temperature
        self.vocab_size = vocab_size

    def loss(self, model: nn.Module, batch: Batch) -> Tensor:
        inputs, targets = batch
        with torch.no_grad():  # no_grad, not inference_mode: its tensors may not enter the student's graph
            teacher_logits = self.teacher(inputs)[..., : self.vocab_size]  # (B, T, V)
        student_logits = model(inputs)[..., : self.vocab_size]  # (B, T, V)
        return distillation_loss(student_logits, teacher_logits, targets, self.alpha, self.temperature)
