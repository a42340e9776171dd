"""lmforge: train language models efficiently, end to end.

model, tokenizer = lmforge.load("runs/quickstart")   # a run or checkpoint directory
logits = model(ids)                                   # (batch, seq) -> (batch, seq, vocab)
lmforge.evaluate_text("runs/quickstart", "notes.txt")  # loss, perplexity, bits per byte on any text
"""

from lmforge.api import evaluate_text, load

__all__ = ["evaluate_text", "load"]
__version__ = "0.1.0"
