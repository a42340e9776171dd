"""Classification metrics: accuracy and macro-F1 (the unweighted mean over classes of each class's
F1, so a rare class counts as much as a frequent one; over the classes that occur in the gold labels
or the predictions, as scikit-learn's f1_score(average="macro") does)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.runtime import autocast


def accuracy_and_macro_f1(predicted: torch.Tensor, gold: torch.Tensor) -> tuple[float, float]:
    """predicted, gold: (N,) int64 class ids -> (accuracy, macro-F1)."""
    accuracy = float((predicted == gold).float().mean())
    scores = []
    for label in torch.cat([predicted, gold]).unique().tolist():
        tp = int(((predicted == label) & (gold == label)).sum())
        fp = int(((predicted == label) & (gold != label)).sum())
        fn = int(((predicted != label) & (gold == label)).sum())
        scores.append(2 * tp / (2 * tp + fp + fn) if tp else 0.0)
    return accuracy, sum(scores) / len(scores)


@torch.no_grad()
def evaluate_classifier(
    model: nn.Module, batches, device: torch.device, dtype: torch.dtype = torch.float32
) -> dict:
    """{"val_loss", "val_ppl", "val_accuracy", "val_macro_f1", "val_examples"} of a classification
    model over batches of (inputs, labels, pad_mask)."""
    was_training = model.training
    model.eval()
    predicted, gold, loss_sum = [], [], 0.0
    for inputs, labels, pad_mask in batches:
        with autocast(device, dtype):
            logits = model(inputs.to(device), pad_mask=pad_mask.to(device)).float()
        loss_sum += float(F.cross_entropy(logits, labels.to(device), reduction="sum"))
        predicted.append(logits.argmax(-1).cpu())
        gold.append(labels)
    model.train(was_training)
    if not gold:
        raise ValueError("no evaluation examples")
    accuracy, macro_f1 = accuracy_and_macro_f1(torch.cat(predicted), torch.cat(gold))
    n = sum(len(g) for g in gold)
    loss = loss_sum / n
    return {"val_loss": loss, "val_ppl": math.exp(min(loss, 700.0)), "val_accuracy": accuracy,
            "val_macro_f1": macro_f1, "val_examples": n}  # fmt: skip
