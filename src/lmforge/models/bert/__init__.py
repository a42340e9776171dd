"""The BERT-style encoder: model.py (the model), flavors.py (named sizes), parallelize.py (its
modules as the parallel code needs them), memory.py (what its forward saves). SPEC is the family's
entry in lmforge.models.FAMILIES. It has no Hugging Face map yet."""

from __future__ import annotations

from lmforge.models.bert import memory, parallelize
from lmforge.models.bert.flavors import FLAVORS
from lmforge.models.bert.model import Bert, BertConfig
from lmforge.models.spec import FamilySpec

SPEC = FamilySpec(
    name="bert",
    config=BertConfig,
    model=Bert,
    flavors=FLAVORS,
    blocks=parallelize.BLOCKS,
    stages=parallelize.STAGES,
    tp_plan=parallelize.TP_PLAN,
    tp_divisible=parallelize.TP_DIVISIBLE,
    saved_bytes=memory.saved_bytes,
    lora_groups=parallelize.LORA_GROUPS,
    encoder=True,
)
