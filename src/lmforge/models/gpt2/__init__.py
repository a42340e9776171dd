"""GPT-2: model.py (the model), flavors.py (named sizes), parallelize.py (its modules as the
parallel code needs them), hf.py (its Hugging Face transformers names). SPEC is the family's entry
in lmforge.models.FAMILIES."""

from __future__ import annotations

from lmforge.models.gpt2 import hf, memory, parallelize
from lmforge.models.gpt2.flavors import FLAVORS
from lmforge.models.gpt2.model import GPT2, GPT2Config
from lmforge.models.spec import FamilySpec

SPEC = FamilySpec(
    name="gpt2",
    config=GPT2Config,
    model=GPT2,
    flavors=FLAVORS,
    blocks=parallelize.BLOCKS,
    stages=parallelize.STAGES,
    tp_plan=parallelize.TP_PLAN,
    tp_divisible=parallelize.TP_DIVISIBLE,
    saved_bytes=memory.saved_bytes,
    hf=hf.HF,
    lora_groups=parallelize.LORA_GROUPS,
)
