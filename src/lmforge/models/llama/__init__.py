"""Llama: model.py (the model), flavors.py (named sizes), parallelize.py (its modules as the
parallel code needs them), hf.py (its Hugging Face transformers names). SPEC is the family's entry
in lmforge.models.FAMILIES."""

from __future__ import annotations

from lmforge.models.llama import fused, hf, memory, parallelize
from lmforge.models.llama.flavors import FLAVORS
from lmforge.models.llama.model import Llama, LlamaConfig
from lmforge.models.spec import FamilySpec

SPEC = FamilySpec(
    name="llama",
    config=LlamaConfig,
    model=Llama,
    flavors=FLAVORS,
    blocks=parallelize.BLOCKS,
    stages=parallelize.STAGES,
    tp_plan=parallelize.TP_PLAN,
    tp_divisible=parallelize.TP_DIVISIBLE,
    saved_bytes=memory.saved_bytes,
    hf=hf.HF,
    lora_groups=parallelize.LORA_GROUPS,
    fused_modules=fused.FUSED,
    stacked_modules=fused.STACKED,
)
