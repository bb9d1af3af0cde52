"""RMSNorm, rotary embedding and SwiGLU (and SwiGLU's backward, for `kernels.swiglu_lora`): plain PyTorch, compiled
into fused kernels on CUDA.

Eager PyTorch runs each of these as a chain of small memory-bound kernels (RMSNorm alone: cast, square, mean,
rsqrt, multiply, cast, multiply, and as many again in backward). `torch.compile` turns each function into one
Triton kernel per direction. The functions below are the references (CPU, tests, LORAFIT_REFERENCE_KERNELS=1);
the compiled versions are the same code, so the twin test compares Inductor's kernels with eager execution.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lorafit.kernels.nf4 import FORCE_REFERENCE


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # Normalise in fp32, as the reference implementations do: bf16 variance loses ~2 digits.
    dtype = x.dtype
    x = x.float()
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x.to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rope_reference(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """q, k: [B, heads, T, d]; cos, sin: [B, T, d]."""
    cos, sin = cos[:, None], sin[:, None]
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


def swiglu_reference(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up


def swiglu_backward_reference(gate: torch.Tensor, up: torch.Tensor, grad: torch.Tensor):
    """Gradients of silu(gate) * up for the product's gradient `grad`, in fp32 and cast back (silu' = s (1 + g (1 -
    s)) with s = sigmoid(g)): what autograd gives through `swiglu_reference`, without keeping its graph."""
    g, u, d = gate.float(), up.float(), grad.float()
    s = torch.sigmoid(g)
    return (d * u * s * (1 + g * (1 - s))).to(gate.dtype), (d * g * s).to(up.dtype)


def swiglu_backward_stacked_reference(gate: torch.Tensor, up: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """`swiglu_backward_reference`'s two gradients side by side in one [..., 2K] tensor (compiled, one kernel writes
    both halves)."""
    return torch.cat(swiglu_backward_reference(gate, up, grad), dim=-1)


def stacked_base(parts, widths=None) -> torch.Tensor | None:
    """The tensor [..., sum w_i] whose last-dimension blocks `parts` ([..., w_i]) are, side by side and in order, as a
    stacked projection returns them (kernels/lora_siblings.py); None if they are not. Found from where the parts lie
    in memory, since a tensor saved for backward comes back without its view's `_base`; `_base` itself when it is
    that tensor (its identity is what remembered e4m3 rows are found by)."""
    first = parts[0]
    total, size = sum(p.shape[-1] for p in parts), first.element_size()
    rows = first.numel() // max(1, first.shape[-1])
    offset = 0
    for i, part in enumerate(parts):
        width = part.shape[-1]
        if ((widths is not None and widths[i] != width) or part.dtype != first.dtype or part.numel() != rows * width
                or part.untyped_storage().data_ptr() != first.untyped_storage().data_ptr()
                or part.data_ptr() != first.data_ptr() + offset * size):
            return None
        try:
            flat = part.view(rows, width)
        except RuntimeError:
            return None
        if flat.stride(1) != 1 or (rows > 1 and flat.stride(0) != total):
            return None
        offset += width
    base = first._base
    if (base is not None and base.is_contiguous() and base.data_ptr() == first.data_ptr()
            and base.numel() == rows * total):
        return base
    return first.as_strided((rows, total), (total, 1))


_compiled: dict = {}


def _fast(reference):
    """The compiled twin of `reference`, built on first use (compiling costs seconds; CPU runs never pay it)."""
    fn = _compiled.get(reference)
    if fn is None:
        fn = _compiled[reference] = torch.compile(reference, dynamic=None)
    return fn


def _use_fast(x: torch.Tensor) -> bool:
    return x.is_cuda and not FORCE_REFERENCE


def rms_norm(x, weight, eps):
    return (_fast(rms_norm_reference) if _use_fast(x) else rms_norm_reference)(x, weight, eps)


def rope(q, k, cos, sin):
    return (_fast(rope_reference) if _use_fast(q) else rope_reference)(q, k, cos, sin)


def swiglu(gate, up):
    return (_fast(swiglu_reference) if _use_fast(gate) else swiglu_reference)(gate, up)


def swiglu_backward(gate, up, grad):
    return (_fast(swiglu_backward_reference) if _use_fast(gate) else swiglu_backward_reference)(gate, up, grad)


def swiglu_input_grads(gate, up, grad):
    """SwiGLU's input gradients; when gate and up are the two halves of one stacked projection's output, written as
    the two halves of one tensor, which that projection's backward then reads without a copy."""
    if stacked_base((gate, up)) is None:
        return swiglu_backward(gate, up, grad)
    fn = _fast(swiglu_backward_stacked_reference) if _use_fast(gate) else swiglu_backward_stacked_reference
    both = fn(gate, up, grad)
    width = gate.shape[-1]
    return both[..., :width], both[..., width:]


class _SwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate, up):
        ctx.save_for_backward(gate, up)
        return swiglu(gate, up)

    @staticmethod
    def backward(ctx, grad):
        return swiglu_input_grads(*ctx.saved_tensors, grad)


def swiglu_trainable(gate, up):
    """silu(gate) * up with autograd, its backward through `swiglu_input_grads`."""
    return _SwiGLU.apply(gate, up)
