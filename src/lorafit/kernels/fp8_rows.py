r"""Rows to e4m3 for the FP8 base (kernels/fp8.py): per-row quantization, fused where the rows are made, and
remembered for the matmuls that read them. Each kernel beside its plain-PyTorch twin.

An FP8 GEMM takes both operands in e4m3 with one scale per row (max |row| / 448, e4m3's largest value). Quantizing
an activation on its own reads it twice and writes a copy; at Qwen2.5-7B, 8 x 2048 tokens, a [tokens, 18944] tensor
takes ~0.5 ms, a quarter of the FP8 GEMM that follows. So:

- the SwiGLU product (down_proj's input) and SwiGLU's two input gradients (gate_proj's and up_proj's output
  gradients) get their e4m3 rows in the same pass that makes them;
- an input read by several projections (q, k and v; gate and up) is quantized once.

Both go through `Remembered`: a few (tensor, e4m3 rows, scales) entries, found by the tensor's identity and version.
The entry holds the tensor weakly, so a hit is always the same live, unchanged tensor (its memory cannot have been
reused), and the copy goes when the tensor does. A miss only costs a quantization.
"""

from __future__ import annotations

import weakref

import torch

from lorafit.kernels import fused
from lorafit.kernels.nf4 import FORCE_REFERENCE

E4M3 = torch.float8_e4m3fn
E4M3_MAX = 448.0


def quantize_rows_reference(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (e4m3 [M, K], fp32 scale [M, 1]) with x ~= q * scale."""
    x = x.float()
    scale = x.abs().amax(-1, keepdim=True).clamp(min=1e-12) / E4M3_MAX
    return (x / scale).to(E4M3), scale


def _rows(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1])


def swiglu_quantized_reference(gate: torch.Tensor, up: torch.Tensor):
    """silu(gate) * up in gate's dtype ([..., K]), and that product's rows quantized ([M, K], [M, 1])."""
    product = (torch.nn.functional.silu(gate.float()) * up.float()).to(gate.dtype)
    return (product, *quantize_rows_reference(_rows(product)))


def swiglu_backward_quantized_reference(gate: torch.Tensor, up: torch.Tensor, grad: torch.Tensor,
                                        stacked: bool = False):
    """SwiGLU's input gradients (kernels/fused.py) and each one's rows quantized; `stacked`: the two gradients side
    by side as one tensor [..., 2K] (returned as its halves), and that tensor's rows quantized (one scale per row)."""
    if stacked:
        both = fused.swiglu_backward_stacked_reference(gate, up, grad)
        width = gate.shape[-1]
        return both[..., :width], both[..., width:], quantize_rows_reference(_rows(both))
    grad_gate, grad_up = fused.swiglu_backward_reference(gate, up, grad)
    return grad_gate, grad_up, (quantize_rows_reference(_rows(grad_gate)), quantize_rows_reference(_rows(grad_up)))


_kernels: dict = {}


def _build_row_kernels():
    import triton
    import triton.language as tl

    @triton.jit
    def quantize_rows_kernel(x_ptr, q_ptr, scale_ptr, K, BLOCK: tl.constexpr, MAX: tl.constexpr):
        row = tl.program_id(0).to(tl.int64) * K
        amax = tl.zeros((BLOCK,), dtype=tl.float32)
        for start in range(0, K, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            amax = tl.maximum(amax, tl.abs(tl.load(x_ptr + row + cols, mask=cols < K, other=0.0).to(tl.float32)))
        scale = tl.maximum(tl.max(amax, 0), 1e-12) / MAX
        tl.store(scale_ptr + tl.program_id(0), scale)
        for start in range(0, K, BLOCK):  # the row again, from L2: a row is at most ~40 KB
            cols = start + tl.arange(0, BLOCK)
            x = tl.load(x_ptr + row + cols, mask=cols < K, other=0.0).to(tl.float32)
            tl.store(q_ptr + row + cols, (x / scale).to(q_ptr.dtype.element_ty), mask=cols < K)

    @triton.jit
    def swiglu_quantized_kernel(gate_ptr, up_ptr, product_ptr, q_ptr, scale_ptr, K, IN_STRIDE,
                                BLOCK: tl.constexpr, MAX: tl.constexpr):
        # gate and up rows IN_STRIDE apart (halves of a stacked gate/up output); the product and q are [M, K]
        row = tl.program_id(0).to(tl.int64) * K
        in_row = tl.program_id(0).to(tl.int64) * IN_STRIDE
        amax = tl.zeros((BLOCK,), dtype=tl.float32)
        for start in range(0, K, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            g = tl.load(gate_ptr + in_row + cols, mask=cols < K, other=0.0).to(tl.float32)
            u = tl.load(up_ptr + in_row + cols, mask=cols < K, other=0.0).to(tl.float32)
            p = (g * tl.sigmoid(g) * u).to(product_ptr.dtype.element_ty)
            tl.store(product_ptr + row + cols, p, mask=cols < K)
            amax = tl.maximum(amax, tl.abs(p.to(tl.float32)))
        scale = tl.maximum(tl.max(amax, 0), 1e-12) / MAX
        tl.store(scale_ptr + tl.program_id(0), scale)
        for start in range(0, K, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            p = tl.load(product_ptr + row + cols, mask=cols < K, other=0.0).to(tl.float32)
            tl.store(q_ptr + row + cols, (p / scale).to(q_ptr.dtype.element_ty), mask=cols < K)

    @triton.jit
    def swiglu_backward_quantized_kernel(gate_ptr, up_ptr, grad_ptr, grad_gate_ptr, grad_up_ptr, q_gate_ptr,
                                         q_up_ptr, scale_gate_ptr, scale_up_ptr, K, IN_STRIDE, OUT_STRIDE,
                                         BLOCK: tl.constexpr, MAX: tl.constexpr, STACKED: tl.constexpr):
        # gate and up rows IN_STRIDE apart, grad [M, K]; both gradients and their e4m3 rows OUT_STRIDE apart.
        # STACKED: the gradients are the halves of one [M, 2K] row and share its one scale.
        in_row = tl.program_id(0).to(tl.int64) * IN_STRIDE
        row = tl.program_id(0).to(tl.int64) * K
        out_row = tl.program_id(0).to(tl.int64) * OUT_STRIDE
        amax_gate = tl.zeros((BLOCK,), dtype=tl.float32)
        amax_up = tl.zeros((BLOCK,), dtype=tl.float32)
        for start in range(0, K, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            inside = cols < K
            g = tl.load(gate_ptr + in_row + cols, mask=inside, other=0.0).to(tl.float32)
            u = tl.load(up_ptr + in_row + cols, mask=inside, other=0.0).to(tl.float32)
            d = tl.load(grad_ptr + row + cols, mask=inside, other=0.0).to(tl.float32)
            s = tl.sigmoid(g)
            grad_gate = (d * u * s * (1 + g * (1 - s))).to(grad_gate_ptr.dtype.element_ty)
            grad_up = (d * g * s).to(grad_up_ptr.dtype.element_ty)
            tl.store(grad_gate_ptr + out_row + cols, grad_gate, mask=inside)
            tl.store(grad_up_ptr + out_row + cols, grad_up, mask=inside)
            amax_gate = tl.maximum(amax_gate, tl.abs(grad_gate.to(tl.float32)))
            amax_up = tl.maximum(amax_up, tl.abs(grad_up.to(tl.float32)))
        scale_gate = tl.maximum(tl.max(amax_gate, 0), 1e-12) / MAX
        scale_up = tl.maximum(tl.max(amax_up, 0), 1e-12) / MAX
        if STACKED:
            scale_gate = tl.maximum(scale_gate, scale_up)
            scale_up = scale_gate
        tl.store(scale_gate_ptr + tl.program_id(0), scale_gate)
        tl.store(scale_up_ptr + tl.program_id(0), scale_up)
        for start in range(0, K, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            inside = cols < K
            grad_gate = tl.load(grad_gate_ptr + out_row + cols, mask=inside, other=0.0).to(tl.float32)
            grad_up = tl.load(grad_up_ptr + out_row + cols, mask=inside, other=0.0).to(tl.float32)
            tl.store(q_gate_ptr + out_row + cols, (grad_gate / scale_gate).to(q_gate_ptr.dtype.element_ty),
                     mask=inside)
            tl.store(q_up_ptr + out_row + cols, (grad_up / scale_up).to(q_up_ptr.dtype.element_ty), mask=inside)

    return quantize_rows_kernel, swiglu_quantized_kernel, swiglu_backward_quantized_kernel


def _row_kernels():
    if "rows" not in _kernels:
        _kernels["rows"] = _build_row_kernels()
    return _kernels["rows"]


def _fast(x: torch.Tensor) -> bool:
    return x.is_cuda and not FORCE_REFERENCE


def _empty_rows(like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    width = like.shape[-1]
    rows = like.numel() // width
    return (torch.empty((rows, width), dtype=E4M3, device=like.device),
            torch.empty((rows, 1), dtype=torch.float32, device=like.device))


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if not _fast(x):
        return quantize_rows_reference(x)
    x = x.contiguous()
    q, scale = _empty_rows(x)
    _row_kernels()[0][(q.shape[0],)](x, q, scale, x.shape[1], BLOCK=1024, MAX=E4M3_MAX)
    return q, scale


def _row_strided(gate: torch.Tensor, up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """gate and up as [M, K] views sharing one row stride (halves of a stacked output stay where they are)."""
    k = gate.shape[-1]
    try:
        g2, u2 = gate.view(-1, k), up.view(-1, k)
    except RuntimeError:
        g2, u2 = gate.reshape(-1, k), up.reshape(-1, k)
    if g2.stride(1) != 1 or u2.stride(1) != 1 or g2.stride(0) != u2.stride(0):
        g2, u2 = g2.contiguous(), u2.contiguous()
    return g2, u2


def swiglu_quantized(gate: torch.Tensor, up: torch.Tensor):
    """(silu(gate) * up, its e4m3 rows, their scales) for gate, up [..., K], in one pass over gate and up."""
    if not _fast(gate):
        return swiglu_quantized_reference(gate, up)
    g2, u2 = _row_strided(gate, up)
    product = torch.empty(gate.shape, dtype=gate.dtype, device=gate.device)
    q, scale = _empty_rows(gate)
    _row_kernels()[1][(q.shape[0],)](g2, u2, product, q, scale, g2.shape[1], g2.stride(0), BLOCK=1024,
                                     MAX=E4M3_MAX)
    return product, q, scale


def swiglu_backward_quantized(gate: torch.Tensor, up: torch.Tensor, grad: torch.Tensor, stacked: bool = False):
    """(dL/dgate, dL/dup, rows) for gate, up, grad [..., K], in one pass over the three. rows: (e4m3, scales) of
    each gradient; with `stacked`, the two gradients are the halves of one [..., 2K] tensor and rows are that
    tensor's (one scale per row: what a stacked gate/up projection's backward GEMM takes)."""
    if not _fast(gate):
        return swiglu_backward_quantized_reference(gate, up, grad, stacked)
    g2, u2 = _row_strided(gate, up)
    grad = grad.reshape(-1, grad.shape[-1]).contiguous()
    rows, width = g2.shape[0], g2.shape[1]
    if stacked:
        both = torch.empty((*gate.shape[:-1], 2 * width), dtype=gate.dtype, device=gate.device)
        grad_gate, grad_up = both[..., :width], both[..., width:]
        q, scale = _empty_rows(both)
        q_gate, q_up, scale_gate, scale_up, out_stride = q[:, :width], q[:, width:], scale, scale, 2 * width
    else:
        grad_gate, grad_up = (torch.empty(gate.shape, dtype=gate.dtype, device=gate.device) for _ in range(2))
        (q_gate, scale_gate), (q_up, scale_up) = _empty_rows(gate), _empty_rows(up)
        out_stride = width
    _row_kernels()[2][(rows,)](g2, u2, grad, grad_gate, grad_up, q_gate, q_up, scale_gate, scale_up, width,
                               g2.stride(0), out_stride, BLOCK=1024, MAX=E4M3_MAX, STACKED=stacked)
    if stacked:
        return grad_gate, grad_up, (q, scale)
    return grad_gate, grad_up, ((q_gate, scale_gate), (q_up, scale_up))


class Remembered:
    """The e4m3 rows of the last `size` tensors quantized, found by identity and version (see the module text)."""

    def __init__(self, size: int):
        self.size, self.entries = size, []

    def find(self, x: torch.Tensor):
        for ref, version, rows in self.entries:
            if ref() is x and version == x._version:
                return rows
        return None

    def add(self, x: torch.Tensor, rows: tuple[torch.Tensor, torch.Tensor]) -> None:
        self.entries = [*self.entries, (weakref.ref(x, self._forget), x._version, rows)][-self.size:]

    def _forget(self, ref) -> None:
        self.entries = [entry for entry in self.entries if entry[0] is not ref]


ACTIVATIONS = Remembered(1)  # q, k and v run one after another on one input (gate and up too)
GRADIENTS = Remembered(2)  # gate's and up's output gradients, made together, taken by their two backwards


def quantize_activation(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`quantize_rows` of x [..., K] as [M, K], or the rows remembered for x."""
    rows = ACTIVATIONS.find(x)
    if rows is None:
        rows = quantize_rows(_rows(x))
        ACTIVATIONS.add(x, rows)
    return rows


def quantize_gradient(grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`quantize_rows` of an output gradient [..., N] as [M, N], or the rows its maker remembered."""
    return GRADIENTS.find(grad) or quantize_rows(_rows(grad))


class _SwiGLUQuantized(torch.autograd.Function):
    """silu(gate) * up, with e4m3 rows for the product in forward and for both input gradients in backward."""

    @staticmethod
    def forward(ctx, gate, up):
        product, q, scale = swiglu_quantized(gate, up)
        ctx.save_for_backward(gate, up)
        ctx.mark_non_differentiable(q, scale)
        ctx.set_materialize_grads(False)  # else backward gets a zero-filled [tokens, K] e4m3 "gradient" of q
        return product, q, scale

    @staticmethod
    def backward(ctx, grad, _grad_q, _grad_scale):
        gate, up = ctx.saved_tensors
        return swiglu_backward_remembered(gate, up, grad)


def swiglu_remembered(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up, its e4m3 rows made in the same pass and remembered for the down_proj it goes into."""
    product, q, scale = _SwiGLUQuantized.apply(gate, up)
    ACTIVATIONS.add(product, (q, scale))
    return product


def swiglu_backward_remembered(gate: torch.Tensor, up: torch.Tensor, grad: torch.Tensor):
    """SwiGLU's input gradients, their e4m3 rows made in the same pass and remembered for gate_proj's and
    up_proj's backward; for a stacked gate/up projection (gate and up the halves of its output), the gradients are
    the halves of one tensor, remembered with its rows for that projection's one backward GEMM."""
    stacked = fused.stacked_base((gate, up)) is not None
    grad_gate, grad_up, rows = swiglu_backward_quantized(gate, up, grad, stacked)
    if stacked:
        GRADIENTS.add(grad_gate._base, rows)
    else:
        GRADIENTS.add(grad_gate, rows[0])
        GRADIENTS.add(grad_up, rows[1])
    return grad_gate, grad_up
