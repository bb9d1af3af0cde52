r"""LoRA linears that read one input (q, k and v; gate and up), computed as one stacked linear.

For siblings i with frozen W_i: [n_i, in], adapters A_i: [r_i, in], B_i: [n_i, r_i] and scales s_i:

    W  = [W_1; W_2; ...]                 [sum n, in]    NF4 dequantized straight into its row blocks
    A  = [A_1; A_2; ...]                 [sum r, in]
    Bs = blockdiag(s_1 B_1, s_2 B_2 ...) [sum n, sum r]
    y  = x W^T;  xa = x A^T;  y += xa Bs^T;  the outputs are y's column blocks (views: no copy)

Backward, for g = [g_1 g_2 ...] (the consumers' gradients side by side):

    gb    = g Bs                         [N, sum r]    (= s_i g_i B_i per block)
    dL/dA = gb^T x, split by rows;  dL/dB_i = s_i g_i^T xa_i, the diagonal blocks of g^T xa
    dL/dx = g W + gb A

Against one LoRA Function per sibling this reads x once instead of 3 (or 2) times for the adapters, runs one frozen
GEMM per direction on a wider matrix (k and v alone are 512-wide at Qwen2.5-7B: half the GEMM rate of q's), and
returns one input gradient instead of three that autograd then adds. The off-diagonal zeros of Bs and of g^T xa cost
a rank-48 GEMM where three rank-16 ones were, nothing next to the frozen GEMMs. The consumers can write g as one
tensor: SwiGLU's backward does (kernels/fused.py `swiglu_input_grads`, kernels/fp8_rows.py), so gate's and up's
gradients arrive as the halves of one [tokens, 2 x intermediate] tensor; q, k and v's gradients come from attention
and RoPE separately and are concatenated.

With an FP8 base (kernels/fp8.py), forward scales W per output channel (each sibling's own), backward per input
channel over the stacked matrix (one scale for all siblings' columns of an input channel), and the gradient per
token over all siblings' columns: a scale can be coarser than one sibling's alone, never too small to hold a value.
The twin is the siblings' own LoRA linears, one by one (tests/test_lora_siblings.py compares the two).
"""

from __future__ import annotations

import torch

from lorafit.kernels import fp8, fused, lora
from lorafit.kernels.fp8_rows import quantize_activation, quantize_gradient


class SiblingGroup:
    """The stacked view of sibling LoRA linears (model.lora.LoRALinear on NF4 bases, no dropout)."""

    def __init__(self, loras):
        self.loras = list(loras)
        self.bases = [m.base_layer for m in self.loras]
        self.widths = [b.out_features for b in self.bases]
        self.ranks = [m.lora_A.weight.shape[0] for m in self.loras]
        self.offsets = [sum(self.widths[:i]) for i in range(len(self.widths))]
        self.rank_offsets = [sum(self.ranks[:i]) for i in range(len(self.ranks))]
        self.width, self.rank = sum(self.widths), sum(self.ranks)
        self.in_features = self.bases[0].in_features
        self._adapters = None
        self._fp8_scales = None

    @property
    def fp8(self) -> bool:
        return self.bases[0].fp8

    def usable(self) -> bool:
        """The bases agree now (an FP8 base is switched off for evaluation as a whole, but check) and are whole
        tensors (not FSDP shards between layer calls)."""
        return (len({b.fp8 for b in self.bases}) == 1
                and not any(hasattr(b.packed, "device_mesh") for b in self.bases))

    def adapters(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(A stacked, s-scaled block-diagonal B) in `dtype`, made once per optimizer step (as `lora.cast_cached`)."""
        masters = [w for m in self.loras for w in (m.lora_A.weight, m.lora_B.weight)]
        key = lora.cast_key(masters, dtype)
        if self._adapters is None or self._adapters[0] != key:
            a = torch.cat([m.lora_A.weight.detach() for m in self.loras]).to(dtype)
            b = torch.zeros((self.width, self.rank), dtype=dtype, device=a.device)
            for m, off, roff, n, r in zip(self.loras, self.offsets, self.rank_offsets, self.widths, self.ranks):
                b[off:off + n, roff:roff + r] = m.lora_B.weight.detach() * m.scaling
            self._adapters = (key, a, b)
        return self._adapters[1], self._adapters[2]

    def bias(self, dtype: torch.dtype) -> torch.Tensor | None:
        if self.bases[0].bias is None:
            return None
        return torch.cat([b.bias for b in self.bases]).to(dtype)

    def weight(self, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """The stacked frozen weight [sum n, in], each block dequantized in place."""
        out = torch.empty((self.width, self.in_features), dtype=dtype, device=device)
        for base, off, n in zip(self.bases, self.offsets, self.widths):
            base.dequantize(dtype, out=out[off:off + n])
        return out

    def fp8_weight(self, transpose: bool, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """The stacked weight in e4m3, [sum n, in] (scaled per output channel) or [in, sum n] (per input channel,
        over all siblings), and its fp32 scales."""
        if self._fp8_scales is None:  # once: the bases never change
            per_base = [fp8.weight_scales(b) for b in self.bases]
            cols = torch.stack([s[1] for s in per_base]).amax(0)
            self._fp8_scales = (torch.cat([s[0] for s in per_base]), cols, [s[2] for s in per_base], 1.0 / cols)
        rows, cols, row_inverses, col_inverse = self._fp8_scales
        if transpose:
            out = torch.empty((self.in_features, self.width), dtype=fp8.E4M3, device=device)
            for base, off, n in zip(self.bases, self.offsets, self.widths):
                fp8.nf4_weight_to_fp8(base, col_inverse, True, out=out[:, off:off + n])
            return out, cols
        out = torch.empty((self.width, self.in_features), dtype=fp8.E4M3, device=device)
        for base, inverse, off, n in zip(self.bases, row_inverses, self.offsets, self.widths):
            fp8.nf4_weight_to_fp8(base, inverse, False, out=out[off:off + n])
        return out, rows

    def frozen_matmul(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., in] @ W^T (+ bias) as [tokens, sum n] in x's dtype."""
        x2 = x.reshape(-1, x.shape[-1])
        bias = self.bias(x.dtype)
        if self.fp8:
            x_q, x_scale = quantize_activation(x)  # x itself: the rows may be remembered for it
            w_q, w_scale = self.fp8_weight(False, x.device)
            y = fp8._scaled_matmul(x_q, x_scale, w_q, w_scale, x.dtype)
            return y.add_(bias) if bias is not None else y
        weight = self.weight(x.dtype, x.device)
        return torch.addmm(bias, x2, weight.t()) if bias is not None else x2 @ weight.t()

    def frozen_input_grad(self, grad: torch.Tensor) -> torch.Tensor:
        """grad [..., sum n] @ W as [tokens, in] (grad as made: its e4m3 rows may be remembered for it)."""
        if self.fp8:
            g_q, g_scale = quantize_gradient(grad)
            wt_q, wt_scale = self.fp8_weight(True, grad.device)
            return fp8._scaled_matmul(g_q, g_scale, wt_q, wt_scale, grad.dtype)
        return grad.reshape(-1, grad.shape[-1]) @ self.weight(grad.dtype, grad.device)


class LoRASiblingsFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group: SiblingGroup, *masters):
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        a, b = group.adapters(x.dtype)
        y = group.frozen_matmul(x)
        xa = x2 @ a.t()
        y.addmm_(xa, b.t())
        ctx.save_for_backward(x2, xa, a, b)
        ctx.group, ctx.shape, ctx.master_dtypes = group, shape, [m.dtype for m in masters]
        y = y.view(*shape[:-1], group.width)
        return tuple(y[..., off:off + n] for off, n in zip(group.offsets, group.widths))

    @staticmethod
    def backward(ctx, *grads):
        x2, xa, a, b = ctx.saved_tensors
        group = ctx.group
        g = fused.stacked_base(grads, group.widths)  # written as one tensor by its consumers (SwiGLU's backward)
        if g is None or g.dtype != xa.dtype:
            g = torch.cat([gr.to(xa.dtype) for gr in grads], dim=-1)
        g2 = g.reshape(-1, group.width)
        gb = g2 @ b
        grad_b = g2.t() @ xa
        grad_a = gb.t() @ x2
        masters = []
        for m, off, roff, n, r, dtypes in zip(group.loras, group.offsets, group.rank_offsets, group.widths,
                                              group.ranks, zip(ctx.master_dtypes[::2], ctx.master_dtypes[1::2])):
            masters += [grad_a[roff:roff + r].to(dtypes[0]),
                        grad_b[off:off + n, roff:roff + r].mul(m.scaling).to(dtypes[1])]
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = group.frozen_input_grad(g)
            grad_x.addmm_(gb, a)
            grad_x = grad_x.view(ctx.shape)
        return (grad_x, None, *masters)


def lora_siblings(x: torch.Tensor, group: SiblingGroup) -> tuple[torch.Tensor, ...]:
    """Each sibling's output (base(x) + s x A^T B^T), computed as one, in x's dtype (autocast's when it is on)."""
    device, dtype = lora.autocast_state(x)
    if dtype is not None:
        x = x.to(dtype)
    masters = [w for m in group.loras for w in (m.lora_A.weight, m.lora_B.weight)]
    with torch.autocast(device, enabled=False):
        return LoRASiblingsFunction.apply(x, group, *masters)
