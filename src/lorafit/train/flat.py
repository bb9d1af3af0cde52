"""The trainable tensors as views of one flat buffer, their gradients as views of another.

LoRA on all seven projections of a 28-layer model is 392 small tensors. Each optimizer step, each gradient clip and
each step's casts to the compute dtype then cost a kernel launch per tensor, and bitsandbytes' 8-bit AdamW adds
Python work per tensor on top: the GPU waits on the host for all of it, once per step. Laid out in one buffer, the
optimizer, the clipping and the cast (`kernels.lora.cast_cached`) see one tensor.

The modules keep their own parameters (names, shapes, PEFT's saved format unchanged); only their storage moves.
Gradients accumulate into their views in place (autograd adds into an existing `.grad`), so they must be zeroed in
place, never set to None. Every parameter keeps its own fp32 master values: this changes no arithmetic, only which
tensors a kernel covers (bitsandbytes' 8-bit states are quantized in blocks, which now may span two tensors).
"""

from __future__ import annotations

import torch
from torch import nn


def flatten_trainable(params: list[nn.Parameter]) -> nn.Parameter | None:
    """One Parameter holding every one of `params` (its `.grad` holding their gradients), each of them now a view of
    it; None, changing nothing, when they differ in dtype or device or are not plain tensors (FSDP's shards)."""
    if not params or any(type(p) is not nn.Parameter for p in params):
        return None
    dtype, device = params[0].dtype, params[0].device
    if any(p.dtype != dtype or p.device != device for p in params):
        return None
    total = sum(p.numel() for p in params)
    flat = nn.Parameter(torch.empty(total, dtype=dtype, device=device))
    flat.grad = torch.zeros_like(flat)
    offset = 0
    with torch.no_grad():
        for p in params:
            n = p.numel()
            flat[offset:offset + n].copy_(p.reshape(-1))
            p.data = flat.data[offset:offset + n].view_as(p)
            p.grad = flat.grad[offset:offset + n].view_as(p)
            p._lorafit_flat = (flat, offset)  # cast_cached casts the whole buffer once and hands out views
            offset += n
    return flat
