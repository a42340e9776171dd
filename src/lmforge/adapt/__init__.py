"""Model transforms for fine-tuning, torch only: freezing parameters (freeze.py) and low-rank
adapters (lora.py). The trainer applies them at their place in lmforge.train.transforms; the
run-directory code (lmforge.rundir) applies LoRA to a model it rebuilds from a checkpoint, so that
the adapters' weights have somewhere to load."""
