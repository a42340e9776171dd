"""lmforge: train language models efficiently, end to end.

model, tokenizer = lmforge.load("runs/quickstart")   # a run or checkpoint directory
logits = model(ids)                                   # (batch, seq) -> (batch, seq, vocab)
"""

from lmforge.api import load

__all__ = ["load"]
__version__ = "0.1.0"
