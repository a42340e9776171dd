"""Compression: offline transforms that write a run directory (quantize.py, prune.py), the load path
that rebuilds the runtime modules from it, and the trade-off report (report.py).

Distillation, quantization-aware training and the pruning recovery fine-tune are not here: they
are objectives and transforms of the one training loop (lmforge.train), which this package does not
import, and which does not import it.
"""
