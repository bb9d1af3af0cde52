"""Cross-entropy on target tokens only, in chunks, so the full [tokens, vocab] logits never exist at once.

Only positions whose next token carries a label are sent through the LM head: with the loss on assistant tokens,
that skips the prompt's share of the head's FLOPs and memory. Each chunk's logits are recomputed in backward
(checkpoint) instead of stored: at Qwen2.5's 152k vocabulary, 4k target tokens of fp32 logits are 2.5 GB. With a frozen
head (LoRA, QLoRA) `kernels.cross_entropy` does better: each chunk's gradient is computed in the forward pass.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import torch.utils.checkpoint

from lorafit.data.example import IGNORE_INDEX
from lorafit.kernels.cross_entropy import linear_cross_entropy_sum
from lorafit.kernels.nf4 import FORCE_REFERENCE

LOSS_CHUNK_TOKENS = 1024


def _chunk_loss_sum(lm_head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = lm_head(hidden).float()  # fp32 softmax: bf16 log-sum-exp over 150k entries loses the small terms
    return F.cross_entropy(logits, targets, reduction="sum")


def _head_kernel_applies(model, hidden: torch.Tensor) -> bool:
    """kernels.cross_entropy: a frozen head (LoRA, QLoRA), a gradient wanted, the fast kernels on."""
    return (torch.is_grad_enabled() and hidden.requires_grad and not model.lm_head.weight.requires_grad
            and not FORCE_REFERENCE)


def target_loss_sum(model, hidden: torch.Tensor, labels: torch.Tensor,
                    chunk_tokens: int = LOSS_CHUNK_TOKENS) -> tuple[torch.Tensor, int]:
    """Sum of next-token cross-entropy over labelled positions, and their count.

    Summing (not averaging) lets the caller divide by the target count of the whole accumulated batch, so that
    gradient accumulation gives exactly the large-batch loss.
    """
    targets = labels[:, 1:]
    keep = targets != IGNORE_INDEX
    hidden = hidden[:, :-1][keep]
    targets = targets[keep]
    count = targets.numel()
    if count == 0:
        return hidden.sum() * 0.0, 0
    if _head_kernel_applies(model, hidden):
        return linear_cross_entropy_sum(hidden, model.lm_head.weight, targets, chunk_tokens), count
    needs_grad = torch.is_grad_enabled() and hidden.requires_grad
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, count, chunk_tokens):
        h, t = hidden[start:start + chunk_tokens], targets[start:start + chunk_tokens]
        if needs_grad and count > chunk_tokens:
            total = total + torch.utils.checkpoint.checkpoint(_chunk_loss_sum, model.lm_head, h, t,
                                                              use_reentrant=False)
        else:
            total = total + _chunk_loss_sum(model.lm_head, h, t)
    return total, count


def every_position_loss_sum(model, hidden: torch.Tensor, labels: torch.Tensor,
                            chunk_tokens: int = LOSS_CHUNK_TOKENS) -> torch.Tensor:
    """`target_loss_sum`'s sum without selecting the labelled positions first: every position goes through the head
    and unlabelled ones add 0. Shapes then depend on the batch shape alone and nothing waits for the GPU (selecting
    positions needs their count on the host), which a captured CUDA graph requires (train/graphs.py). Costs the
    head's work on prompt positions."""
    hidden = hidden[:, :-1].reshape(-1, hidden.shape[-1])
    targets = labels[:, 1:].reshape(-1)
    if _head_kernel_applies(model, hidden):
        return linear_cross_entropy_sum(hidden, model.lm_head.weight, targets, chunk_tokens)
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, targets.numel(), chunk_tokens):
        total = total + _chunk_loss_sum(model.lm_head, hidden[start:start + chunk_tokens],
                                        targets[start:start + chunk_tokens])
    return total
