r"""A LoRA linear as one autograd Function: the frozen matmul and the low-rank update share buffers and launches.

Forward, for x: [N, in], frozen W: [out, in] (dequantized from NF4 on the fly), A: [r, in], B: [out, r], s = scale:

    xa = dropout(x) A^T                     [N, r]
    y  = x W^T (+ bias);  y += s * xa B^T   (one GEMM accumulating into y: no separate scale and add kernels)

Backward, for g = dL/dy:

    gb    = g B                             [N, r]
    dL/dB = s * g^T xa                      [out, r]
    dL/dA = s * gb^T dropout(x)             [r, in]
    dL/dx = g W  (+ s * gb A, when there is no dropout: accumulated into the same buffer)

Saved for backward: dropout(x) and xa only (the adapter's gradients need them; W's input gradient needs no
activation). W is dequantized again in backward rather than kept: 2 bytes per weight would cost more memory than
the Triton dequantize costs time (kernels/nf4.py). The A and B masters stay fp32; they are cast to the activations'
dtype once per optimizer step (`cast_cached`) and their gradients returned in fp32.

Measured on an H100, Qwen2.5-1.5B QLoRA 1024 x 16 (bench/profile_step.py): the plain composition spent 255 ms of a
650 ms step in elementwise kernels, most of it the LoRA branch's scale, add and cast kernels.
The plain composition in `model.lora.LoRALinear.reference_forward` is the twin (LORAFIT_REFERENCE_KERNELS=1).
"""

from __future__ import annotations

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

from lorafit.kernels import autocast_device, fp8

_optimizer_steps = [0]


def _count_optimizer_step(*_):
    _optimizer_steps[0] += 1


# Every torch optimizer (bitsandbytes' included) runs global step hooks. bitsandbytes' 8-bit update writes the
# parameter in a kernel that does not bump its version counter, so the version alone cannot tell a stale cast.
register_optimizer_step_post_hook(_count_optimizer_step)


def invalidate_casts() -> None:
    """Forget every cached cast, as an optimizer step does. CUDA graph capture calls it before recording (the casts
    must be in the graph, not read from an eager buffer) and after (a capture runs nothing: its outputs are empty)."""
    _count_optimizer_step()


def cast_key(weights, dtype: torch.dtype) -> tuple:
    """What a cast of `weights` to `dtype` stays valid for: no optimizer step and no in-place change since."""
    return _optimizer_steps[0], tuple(w._version for w in weights), dtype


def cast_cached(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`weight` in `dtype`, cast once per optimizer update: forward, recomputation and backward of a step share the
    cast; an optimizer step or any in-place change (version counter) invalidates it. Saves two cast kernels per
    adapted linear per pass: ~1,200 launches per step on a 28-layer model."""
    if weight.dtype == dtype:
        return weight
    key = cast_key((weight,), dtype)
    cached = getattr(weight, "_lorafit_cast", None)
    if cached is None or cached[0] != key:
        cached = (key, weight.detach().to(dtype))
        weight._lorafit_cast = cached
    return cached[1]


def frozen_weight(base: torch.nn.Module, dtype: torch.dtype) -> torch.Tensor:
    if hasattr(base, "dequantize"):
        return base.dequantize(dtype)
    return base.weight.to(dtype)


def frozen_matmul(x: torch.Tensor, base: torch.nn.Module) -> torch.Tensor:
    """x [..., in] @ W^T (+ bias) as [tokens, out] in x's dtype; in e4m3 when the base is marked `fp8`
    (kernels/fp8.py)."""
    if getattr(base, "fp8", False):
        y = fp8.fp8_linear(x, base).view(-1, base.out_features)
        return y.add_(base.bias.to(x.dtype)) if base.bias is not None else y
    x = x.reshape(-1, x.shape[-1])
    weight = frozen_weight(base, x.dtype)
    return torch.addmm(base.bias.to(x.dtype), x, weight.t()) if base.bias is not None else x @ weight.t()


def frozen_input_grad(grad: torch.Tensor, base: torch.nn.Module) -> torch.Tensor:
    """grad [..., out] @ W as [tokens, in]: the frozen matmul's input gradient, in e4m3 when the base is marked
    `fp8` (grad itself, not a reshaped view: its maker may have left its e4m3 rows, kernels/fp8_rows.py)."""
    if getattr(base, "fp8", False):
        return fp8.fp8_linear_input_grad(grad, base).view(-1, base.in_features)
    return grad.reshape(-1, grad.shape[-1]) @ frozen_weight(base, grad.dtype)


class LoRAFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, x_lora, lora_a, lora_b, base, scaling):
        shape = x.shape
        dtype = x.dtype
        xl2 = x_lora.reshape(-1, shape[-1])
        a, b = cast_cached(lora_a, dtype), cast_cached(lora_b, dtype)
        y = frozen_matmul(x, base)  # x itself: an FP8 base quantizes the input q, k and v share once
        xa = xl2 @ a.t()
        y.addmm_(xa, b.t(), alpha=scaling)
        ctx.save_for_backward(xl2, xa, a, b)
        ctx.base, ctx.scaling, ctx.shape, ctx.same_input = base, scaling, shape, x_lora is x
        ctx.master_dtypes = (lora_a.dtype, lora_b.dtype)
        return y.view(*shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, grad):
        xl2, xa, a, b = ctx.saved_tensors
        s = ctx.scaling
        g = grad.reshape(-1, grad.shape[-1]).to(xa.dtype)
        gb = g @ b
        grad_b = (g.t() @ xa).mul_(s).to(ctx.master_dtypes[1])
        grad_a = (gb.t() @ xl2).mul_(s).to(ctx.master_dtypes[0])
        grad_x = grad_x_lora = None
        if ctx.needs_input_grad[0]:
            grad_x = frozen_input_grad(grad if grad.dtype == g.dtype else g, ctx.base)
            if ctx.same_input:
                grad_x.addmm_(gb, a, alpha=s)
            else:
                grad_x_lora = (gb @ a).mul_(s).view(ctx.shape)
            grad_x = grad_x.view(ctx.shape)
        return grad_x, grad_x_lora, grad_a, grad_b, None, None


def autocast_state(x: torch.Tensor) -> tuple[str, torch.dtype | None]:
    """(the autocast device type of x's device, autocast's dtype there if it is on): what the Functions below cast
    their inputs to before running with autocast off. Meta tensors (the planner's trace) count as the CPU."""
    device = autocast_device(x)
    return device, torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None


def lora_linear(x: torch.Tensor, x_lora: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor,
                base: torch.nn.Module, scaling: float) -> torch.Tensor:
    """base(x) + scaling * x_lora A^T B^T, computed in x's dtype (cast first, as autocast would)."""
    device, dtype = autocast_state(x)
    if dtype is not None:
        same_input = x_lora is x
        x = x.to(dtype)
        x_lora = x if same_input else x_lora.to(dtype)
    with torch.autocast(device, enabled=False):
        return LoRAFunction.apply(x, x_lora, lora_a, lora_b, base, scaling)
