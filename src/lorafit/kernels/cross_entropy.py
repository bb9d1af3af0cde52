r"""LM head + cross-entropy with the gradient computed in the forward pass, chunk by chunk.

For hidden states h: [N, H] (target positions only), a frozen head W: [V, H] and targets t:

    z = h W^T,   loss = sum_i (logsumexp(z_i) - z_i[t_i]),   dloss/dz = softmax(z) - onehot(t),   dloss/dh = dz W

Each chunk of rows is pushed through the head, its loss and dloss/dz computed in one pass (the kernel overwrites the
bf16 logits with their gradient), and dloss/dh = dz W stored. Backward only scales the stored [N, H] gradient.
Against the checkpointed chunks of `train.loss` this saves the recomputed head GEMM, the fp32 copy of the logits
and the separate softmax backward (Qwen2.5-1.5B, 16 x 1024 tokens on an H100: ~45 ms of a 450 ms step).
Only for a frozen head (LoRA, QLoRA); full fine-tuning takes the reference path.

`cross_entropy_grad_reference` is the twin of the Triton kernel (CPU, tests, LORAFIT_REFERENCE_KERNELS=1).
"""

from __future__ import annotations

import torch

from lorafit.kernels import autocast_device
from lorafit.kernels.nf4 import FORCE_REFERENCE


def cross_entropy_grad_reference(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-row loss (fp32); `logits` is overwritten with softmax - onehot (in its own dtype). A row whose target is
    negative (IGNORE_INDEX) has loss 0 and gradient 0: static-shape callers (CUDA graphs) send every position."""
    z = logits.float()
    valid = targets >= 0
    safe = targets.clamp(min=0)[:, None]
    lse = torch.logsumexp(z, dim=-1)
    loss = (lse - z.gather(1, safe).squeeze(1)) * valid
    grad = torch.exp(z - lse[:, None])
    grad.scatter_add_(1, safe, -torch.ones_like(lse)[:, None])
    logits.copy_(grad * valid[:, None])
    return loss


_kernel = None


def _build_kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def cross_entropy_grad_kernel(logits_ptr, targets_ptr, loss_ptr, stride, V, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        base = logits_ptr + row * stride
        cols = tl.arange(0, BLOCK)
        # online log-sum-exp, per lane, then combined. Lanes past V read -1e30, not -inf: a lane that never sees a
        # real logit (V < BLOCK) would otherwise compute exp(-inf - -inf) = NaN; this way it adds terms that the
        # final rescaling by exp(-1e30 - row_max) sends to zero.
        target = tl.load(targets_ptr + row)
        valid = target >= 0  # IGNORE_INDEX rows: loss 0, gradient 0
        running_max = tl.full([BLOCK], -1e30, tl.float32)
        running_sum = tl.zeros([BLOCK], tl.float32)
        # The target's logit is picked out of the blocks this loop reads, not loaded on its own after it: the loop
        # below overwrites the row in place, and a warp that is ahead may already have written the gradient there
        # (nothing orders one warp's global loads after another's stores). Measured on an H100 with that load: 2-5
        # micro-batches of 60 (SmolLM2, 512 tokens) reported a 2-4x loss (bench/graph_check.py); gradients were right.
        target_hits = tl.zeros([BLOCK], tl.float32)
        for start in range(0, V, BLOCK):
            x = tl.load(base + start + cols, mask=start + cols < V, other=-1e30).to(tl.float32)
            new_max = tl.maximum(running_max, x)
            running_sum = running_sum * tl.exp(running_max - new_max) + tl.exp(x - new_max)
            running_max = new_max
            target_hits += tl.where(start + cols == target, x, 0.0)
        row_max = tl.max(running_max, 0)
        total = tl.sum(running_sum * tl.exp(running_max - row_max), 0)
        lse = row_max + tl.log(total)
        target_logit = tl.sum(target_hits, 0)
        tl.store(loss_ptr + row, tl.where(valid, lse - target_logit, 0.0))
        for start in range(0, V, BLOCK):
            offs = start + cols
            x = tl.load(base + offs, mask=offs < V, other=0.0).to(tl.float32)
            grad = tl.exp(x - lse) - tl.where(offs == target, 1.0, 0.0)
            grad = tl.where(valid, grad, 0.0)
            tl.store(base + offs, grad.to(logits_ptr.dtype.element_ty), mask=offs < V)

    return cross_entropy_grad_kernel


def cross_entropy_grad(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    global _kernel
    if logits.is_meta:  # the planner's trace: what the CUDA kernel allocates, the per-row loss (logits in place)
        return torch.empty(logits.shape[0], dtype=torch.float32, device="meta")
    if not logits.is_cuda or FORCE_REFERENCE:
        return cross_entropy_grad_reference(logits, targets)
    if _kernel is None:
        _kernel = _build_kernel()
    loss = torch.empty(logits.shape[0], dtype=torch.float32, device=logits.device)
    _kernel[(logits.shape[0],)](logits, targets, loss, logits.stride(0), logits.shape[1], BLOCK=4096, num_warps=16)
    return loss


class LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk_tokens: int):
        w = weight.to(hidden.dtype)
        grad_hidden = torch.empty_like(hidden)
        total = hidden.new_zeros((), dtype=torch.float32)
        for start in range(0, hidden.shape[0], chunk_tokens):
            h = hidden[start:start + chunk_tokens]
            logits = h @ w.t()
            total += cross_entropy_grad(logits, targets[start:start + chunk_tokens]).sum()
            torch.mm(logits, w, out=grad_hidden[start:start + chunk_tokens])
            del logits
        ctx.save_for_backward(grad_hidden)
        return total

    @staticmethod
    def backward(ctx, grad):
        (grad_hidden,) = ctx.saved_tensors
        return grad_hidden * grad.to(grad_hidden.dtype), None, None, None


def linear_cross_entropy_sum(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                             chunk_tokens: int) -> torch.Tensor:
    """Summed cross-entropy of (hidden W^T) against targets, the head frozen; gradient flows to `hidden` only."""
    with torch.autocast(autocast_device(hidden), enabled=False):
        return LinearCrossEntropy.apply(hidden, weight, targets, chunk_tokens)
