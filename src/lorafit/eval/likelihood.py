"""Loss and perplexity on target tokens, weighted by token count (a batch of 3 targets weighs less than one of 300)."""

from __future__ import annotations

import math

import torch

from lorafit.data.batching import collate
from lorafit.data.example import Example
from lorafit.train.loss import target_loss_sum


@torch.no_grad()
def evaluate_loss(model, examples: list[Example], pad_id: int, batch_size: int = 8, autocast=None) -> dict:
    """{'loss': mean CE over all target tokens, 'perplexity': exp(loss), 'tokens': count}; one example per row."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    order = sorted(range(len(examples)), key=lambda i: len(examples[i]))  # similar lengths: less padding
    for start in range(0, len(order), batch_size):
        rows = [[i] for i in order[start:start + batch_size]]
        batch = collate(examples, rows, pad_id, packing=False).to(device)
        with autocast() if autocast else torch.autocast("cpu", enabled=False):
            hidden = model(batch.input_ids, position_ids=batch.position_ids)
            loss_sum, n = target_loss_sum(model, hidden, batch.labels)
        total += float(loss_sum)
        count += n
    model.train(was_training)
    loss = total / max(count, 1)
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "tokens": count}
