r"""down_proj's LoRA linear over the SwiGLU product, keeping gate and up but not the product.

The MLP computes p = silu(gate) * up, then down_proj(p) = p W^T + s (p A^T) B^T. Composed of the compiled SwiGLU and
the LoRA Function (`kernels.lora`), three [tokens, intermediate] tensors stay alive to the backward: gate and up
(SwiGLU's backward needs them) and p (down_proj's LoRA needs it for dL/dA). p is one elementwise kernel away from
gate and up, so this Function keeps only those two and makes p again in backward:

    forward:   p = silu(gate) * up;  y = p W^T (+ bias);  pa = p A^T;  y += s pa B^T        saved: gate, up, pa
    backward:  gb = g B;  dL/dB = s g^T pa;  p again;  dL/dA = s gb^T p;  dL/dp = g W + s gb A;
               dL/dgate, dL/dup = SwiGLU's backward of dL/dp

Saved per token and layer: 2 x intermediate instead of 3 (Qwen2.5-7B: 111 instead of 148 KB per token, a quarter
less). That pays where saved tensors wait: layers that are not recomputed (kept, offloaded, or no checkpointing).
A recomputed layer's saved tensors live for its own backward only, whose peak is the same either way (gate, up,
dL/dp and the two gradients), so it keeps the product and skips the extra kernel (`MLP.keep_product`). Used when
down_proj is a LoRA linear without dropout (dropout would need its mask); the twin is the plain composition
`down_proj(swiglu(gate, up))`, tests/test_kernels.py compares the two.
"""

from __future__ import annotations

import torch

from lorafit.kernels import fp8_rows, fused
from lorafit.kernels.lora import autocast_state, cast_cached, frozen_input_grad, frozen_matmul


class SwiGLULoRAFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate, up, lora_a, lora_b, base, scaling):
        shape, dtype = gate.shape, gate.dtype
        g2, u2 = gate.reshape(-1, shape[-1]), up.reshape(-1, shape[-1])
        # an FP8 base: the product's e4m3 rows made in the same pass (kernels/fp8_rows.py)
        product = fp8_rows.swiglu_remembered(g2, u2) if getattr(base, "fp8", False) else fused.swiglu(g2, u2)
        y = frozen_matmul(product, base)
        a, b = cast_cached(lora_a, dtype), cast_cached(lora_b, dtype)
        pa = product @ a.t()
        del product
        y.addmm_(pa, b.t(), alpha=scaling)
        ctx.save_for_backward(g2, u2, pa, a, b)
        ctx.base, ctx.scaling, ctx.shape = base, scaling, shape
        ctx.master_dtypes = (lora_a.dtype, lora_b.dtype)
        return y.view(*shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, grad):
        g2, u2, pa, a, b = ctx.saved_tensors
        s = ctx.scaling
        g = grad.reshape(-1, grad.shape[-1]).to(pa.dtype)
        gb = g @ b
        grad_b = (g.t() @ pa).mul_(s).to(ctx.master_dtypes[1])
        product = fused.swiglu(g2, u2)
        grad_a = (gb.t() @ product).mul_(s).to(ctx.master_dtypes[0])
        del product
        grad_gate = grad_up = None
        if ctx.needs_input_grad[0] or ctx.needs_input_grad[1]:
            grad_product = frozen_input_grad(grad if grad.dtype == g.dtype else g, ctx.base)
            grad_product.addmm_(gb, a, alpha=s)
            if getattr(ctx.base, "fp8", False):  # gate_proj's and up_proj's e4m3 gradient rows in the same pass
                shape = ctx.shape
                grad_gate, grad_up = fp8_rows.swiglu_backward_remembered(g2.view(shape), u2.view(shape),
                                                                    grad_product.view(shape))
            else:
                grad_gate, grad_up = fused.swiglu_input_grads(g2, u2, grad_product)
                grad_gate, grad_up = grad_gate.view(ctx.shape), grad_up.view(ctx.shape)
            del grad_product
        return grad_gate, grad_up, grad_a, grad_b, None, None


def swiglu_lora(gate: torch.Tensor, up: torch.Tensor, down) -> torch.Tensor:
    """`down(silu(gate) * up)` for a LoRA linear `down` (model.lora.LoRALinear, no dropout), computed in gate's dtype
    (autocast's, when it is on: gate and up come out of autocast'ed LoRA linears already in it)."""
    device, dtype = autocast_state(gate)
    if dtype is not None:
        gate, up = gate.to(dtype), up.to(dtype)
    with torch.autocast(device, enabled=False):
        return SwiGLULoRAFunction.apply(gate, up, down.lora_A.weight, down.lora_B.weight, down.base_layer,
                                        down.scaling)
