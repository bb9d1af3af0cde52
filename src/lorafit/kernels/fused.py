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
