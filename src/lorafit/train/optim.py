"""Optimizer and learning-rate schedule."""

from __future__ import annotations

import math

import torch


def build_optimizer(params: list[torch.nn.Parameter], name: str, lr: float, weight_decay: float, device: torch.device):
    """auto: paged 8-bit AdamW on GPU (states in 8 bits, paged to CPU under memory pressure), plain AdamW on CPU."""
    if name == "auto":
        name = "paged_adamw_8bit" if device.type == "cuda" else "adamw"
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, betas=(0.9, 0.999), eps=1e-8)
    from lorafit.model.quantize import import_bitsandbytes

    bnb = import_bitsandbytes()
    cls = bnb.optim.PagedAdamW8bit if name == "paged_adamw_8bit" else bnb.optim.AdamW8bit
    return cls(params, lr=lr, weight_decay=weight_decay, betas=(0.9, 0.999), eps=1e-8)


def lr_lambda(schedule: str, warmup_steps: int, total_steps: int):
    """Multiplier of the peak rate at each step: linear warmup, then cosine or linear decay to zero."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        if schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        if schedule == "linear":
            return 1.0 - progress
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def build_scheduler(optimizer, schedule: str, warmup_steps: int, total_steps: int):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(schedule, warmup_steps, total_steps))
