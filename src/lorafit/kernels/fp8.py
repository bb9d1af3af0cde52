r"""FP8 matmuls for the frozen NF4 base (opt-in: `model.fp8_base`), with their plain-PyTorch twins.

An H100 multiplies float8 (e4m3) matrices at twice its bf16 rate. QLoRA's frozen base is already 4-bit, so running
its matmuls on e4m3 copies of the weight and of the activations costs little precision next to the NF4 codes
themselves, while the LoRA branch, its gradients and the optimizer stay as they are (bf16 activations, fp32
masters). Scales are per row of each operand (cuBLAS' "rowwise" scaling), the finest a single FP8 GEMM applies:

    forward   y   = x W^T:  x per token,       W per output channel   (W as [out, in], in-major)
    backward  g W        :  g per token,       W per input channel    (W as [in, out], out-major: its transpose)

FP8 GEMMs need both operands contiguous along the summed dimension, so backward dequantizes NF4 straight into the
transposed layout (one Triton kernel, either layout). A weight's channel scales are its max |w| per row and per
column, computed once (the base is frozen). An activation's scale is its row's max |x| over 448, e4m3's largest
value, so nothing saturates.

The twins quantize and dequantize in plain PyTorch and multiply in fp32: they round every element exactly as the
fast path does, so the tests compare the GEMMs' accumulation only. On the CPU the twins are the computation.
"""

from __future__ import annotations

import weakref

import torch

from lorafit.kernels import fused
from lorafit.kernels.nf4 import ABSMAX_BLOCKSIZE, BLOCKSIZE, FORCE_REFERENCE, dequantize_nf4_reference

E4M3 = torch.float8_e4m3fn
E4M3_MAX = 448.0


def quantize_rows_reference(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (e4m3 [M, K], fp32 scale [M, 1]) with x ~= q * scale."""
    x = x.float()
    scale = x.abs().amax(-1, keepdim=True).clamp(min=1e-12) / E4M3_MAX
    return (x / scale).to(E4M3), scale


def swiglu_quantized_reference(gate: torch.Tensor, up: torch.Tensor):
    """silu(gate) * up in gate's dtype ([..., K]), and that product's rows quantized ([M, K], [M, 1]): down_proj's
    input, both ways."""
    product = (torch.nn.functional.silu(gate.float()) * up.float()).to(gate.dtype)
    return (product, *quantize_rows_reference(product.reshape(-1, product.shape[-1])))


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
            x = tl.load(x_ptr + row + cols, mask=cols < K, other=0.0).to(tl.float32)
            amax = tl.maximum(amax, tl.abs(x))
        scale = tl.maximum(tl.max(amax, 0), 1e-12) / MAX
        tl.store(scale_ptr + tl.program_id(0), scale)
        for start in range(0, K, BLOCK):  # the row again, from L2: a row is at most ~40 KB
            cols = start + tl.arange(0, BLOCK)
            x = tl.load(x_ptr + row + cols, mask=cols < K, other=0.0).to(tl.float32)
            tl.store(q_ptr + row + cols, (x / scale).to(q_ptr.dtype.element_ty), mask=cols < K)

    @triton.jit
    def swiglu_quantized_kernel(gate_ptr, up_ptr, product_ptr, q_ptr, scale_ptr, K, BLOCK: tl.constexpr,
                                MAX: tl.constexpr):
        row = tl.program_id(0).to(tl.int64) * K
        amax = tl.zeros((BLOCK,), dtype=tl.float32)
        for start in range(0, K, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            g = tl.load(gate_ptr + row + cols, mask=cols < K, other=0.0).to(tl.float32)
            u = tl.load(up_ptr + row + cols, mask=cols < K, other=0.0).to(tl.float32)
            p = (g * tl.sigmoid(g) * u).to(product_ptr.dtype.element_ty)
            tl.store(product_ptr + row + cols, p, mask=cols < K)
            amax = tl.maximum(amax, tl.abs(p.to(tl.float32)))
        scale = tl.maximum(tl.max(amax, 0), 1e-12) / MAX
        tl.store(scale_ptr + tl.program_id(0), scale)
        for start in range(0, K, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            p = tl.load(product_ptr + row + cols, mask=cols < K, other=0.0).to(tl.float32)
            tl.store(q_ptr + row + cols, (p / scale).to(q_ptr.dtype.element_ty), mask=cols < K)

    return quantize_rows_kernel, swiglu_quantized_kernel


def _row_kernels():
    if "rows" not in _kernels:
        _kernels["rows"] = _build_row_kernels()
    return _kernels["rows"]


def _fast(x: torch.Tensor) -> bool:
    return x.is_cuda and not FORCE_REFERENCE


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if not _fast(x):
        return quantize_rows_reference(x)
    x = x.contiguous()
    q = torch.empty(x.shape, dtype=E4M3, device=x.device)
    scale = torch.empty((x.shape[0], 1), dtype=torch.float32, device=x.device)
    _row_kernels()[0][(x.shape[0],)](x, q, scale, x.shape[1], BLOCK=1024, MAX=E4M3_MAX)
    return q, scale


def swiglu_quantized(gate: torch.Tensor, up: torch.Tensor):
    """(silu(gate) * up, its e4m3 rows, their scales) for gate, up [..., K], in one pass over gate and up."""
    if not _fast(gate):
        return swiglu_quantized_reference(gate, up)
    gate, up = gate.contiguous(), up.contiguous()
    width = gate.shape[-1]
    rows = gate.numel() // width
    product = torch.empty_like(gate)
    q = torch.empty((rows, width), dtype=E4M3, device=gate.device)
    scale = torch.empty((rows, 1), dtype=torch.float32, device=gate.device)
    _row_kernels()[1][(rows,)](gate, up, product, q, scale, width, BLOCK=1024, MAX=E4M3_MAX)
    return product, q, scale


class _SwiGLUQuantized(torch.autograd.Function):
    """`swiglu_quantized` with the product's gradient (SwiGLU's backward, kernels/fused.py); the e4m3 copy has none."""

    @staticmethod
    def forward(ctx, gate, up):
        product, q, scale = swiglu_quantized(gate, up)
        ctx.save_for_backward(gate, up)
        ctx.mark_non_differentiable(q, scale)
        return product, q, scale

    @staticmethod
    def backward(ctx, grad, _grad_q, _grad_scale):
        gate, up = ctx.saved_tensors
        return fused.swiglu_backward(gate, up, grad)


_last_input: list = [None]  # (weak reference to an activation, its version, its e4m3 rows, their scales)


def quantize_activation(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`quantize_rows` of x [..., K] as [M, K], remembered while x lives and is unchanged: q, k and v read one
    input, as do gate and up, so each is quantized once. The weak reference makes a stale hit impossible (a live
    tensor's memory is not reused) and lets the copy go with x."""
    last = _last_input[0]
    if last is not None and last[0]() is x and last[1] == x._version:
        return last[2], last[3]
    q, scale = quantize_rows(x.reshape(-1, x.shape[-1]))
    _remember(x, q, scale)
    return q, scale


def _remember(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> None:
    _last_input[0] = (weakref.ref(x, lambda _: _last_input.__setitem__(0, None)), x._version, q, scale)


def swiglu_remembered(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up, its e4m3 rows made in the same pass and remembered for the down_proj it goes into."""
    product, q, scale = _SwiGLUQuantized.apply(gate, up)
    _remember(product, q, scale)
    return product


def channel_scales(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-output-channel and per-input-channel scales of a dense weight [out, in], fp32."""
    magnitude = weight.float().abs()
    return (magnitude.amax(1).clamp(min=1e-12) / E4M3_MAX, magnitude.amax(0).clamp(min=1e-12) / E4M3_MAX)


def nf4_to_fp8_reference(tensors, shape: tuple[int, int], inverse_scale: torch.Tensor,
                         transpose: bool) -> torch.Tensor:
    """The NF4 weight [out, in] in e4m3, times `inverse_scale` per output channel ([out, in] layout) or per input
    channel ([in, out] layout, `transpose`)."""
    dense = dequantize_nf4_reference(*tensors, shape=shape, dtype=torch.float32)
    if transpose:
        return (dense * inverse_scale[None, :]).t().contiguous().to(E4M3)
    return (dense * inverse_scale[:, None]).to(E4M3)


def _build_weight_kernels():
    import triton
    import triton.language as tl

    @triton.jit
    def nf4_values(packed_ptr, absmax_q_ptr, absmax_map_ptr, absmax_scale_ptr, offset_ptr, code_ptr, idx, inside,
                   BLOCKSIZE: tl.constexpr, ABSMAX_BLOCKSIZE: tl.constexpr):
        byte = tl.load(packed_ptr + idx // 2, mask=inside, other=0).to(tl.int32)
        nibble = tl.where(idx % 2 == 0, byte >> 4, byte & 15)
        value = tl.load(code_ptr + nibble, mask=inside, other=0.0)
        block = idx // BLOCKSIZE
        q = tl.load(absmax_q_ptr + block, mask=inside, other=0).to(tl.int32)
        absmax = tl.load(absmax_map_ptr + q, mask=inside, other=0.0) * tl.load(
            absmax_scale_ptr + block // ABSMAX_BLOCKSIZE, mask=inside, other=0.0) + tl.load(offset_ptr)
        return value * absmax

    @triton.jit
    def nf4_to_fp8_rows_kernel(packed_ptr, absmax_q_ptr, absmax_map_ptr, absmax_scale_ptr, offset_ptr, code_ptr,
                               inv_scale_ptr, out_ptr, n, K, BLOCK: tl.constexpr, BLOCKSIZE: tl.constexpr,
                               ABSMAX_BLOCKSIZE: tl.constexpr):
        idx = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        inside = idx < n
        value = nf4_values(packed_ptr, absmax_q_ptr, absmax_map_ptr, absmax_scale_ptr, offset_ptr, code_ptr, idx,
                           inside, BLOCKSIZE, ABSMAX_BLOCKSIZE)
        inv = tl.load(inv_scale_ptr + idx // K, mask=inside, other=0.0)
        tl.store(out_ptr + idx, (value * inv).to(out_ptr.dtype.element_ty), mask=inside)

    @triton.jit
    def nf4_to_fp8_transposed_kernel(packed_ptr, absmax_q_ptr, absmax_map_ptr, absmax_scale_ptr, offset_ptr,
                                     code_ptr, inv_scale_ptr, out_ptr, N, K, BN: tl.constexpr, BK: tl.constexpr,
                                     BLOCKSIZE: tl.constexpr, ABSMAX_BLOCKSIZE: tl.constexpr):
        n = tl.program_id(0) * BN + tl.arange(0, BN)
        k = tl.program_id(1) * BK + tl.arange(0, BK)
        inside = (n[:, None] < N) & (k[None, :] < K)
        idx = n[:, None].to(tl.int64) * K + k[None, :]
        value = nf4_values(packed_ptr, absmax_q_ptr, absmax_map_ptr, absmax_scale_ptr, offset_ptr, code_ptr, idx,
                           inside, BLOCKSIZE, ABSMAX_BLOCKSIZE)
        inv = tl.load(inv_scale_ptr + k, mask=k < K, other=0.0)
        out = (value * inv[None, :]).to(out_ptr.dtype.element_ty)
        tl.store(out_ptr + k[None, :].to(tl.int64) * N + n[:, None], out, mask=inside)

    return nf4_to_fp8_rows_kernel, nf4_to_fp8_transposed_kernel


def nf4_to_fp8_triton(tensors, shape: tuple[int, int], inverse_scale: torch.Tensor,
                      transpose: bool) -> torch.Tensor:
    if "weights" not in _kernels:
        _kernels["weights"] = _build_weight_kernels()
    rows_kernel, transposed_kernel = _kernels["weights"]
    n, k = shape
    out = torch.empty((k, n) if transpose else (n, k), dtype=E4M3, device=tensors[0].device)
    constants = dict(BLOCKSIZE=BLOCKSIZE, ABSMAX_BLOCKSIZE=ABSMAX_BLOCKSIZE)
    if transpose:
        transposed_kernel[(-(-n // 64), -(-k // 64))](*tensors, inverse_scale, out, n, k, BN=64, BK=64, **constants)
    else:
        rows_kernel[(-(-n * k // 2048),)](*tensors, inverse_scale, out, n * k, k, BLOCK=2048, **constants)
    return out


def _weight_fp8(base, transpose: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The frozen weight in e4m3 ([out, in], or [in, out] with `transpose`) and its fp32 channel scales."""
    scales = base.__dict__.get("_fp8_scales")
    if scales is None:  # once per module (the base never changes): per output channel, per input channel, inverses
        rows, cols = channel_scales(base.dequantize(torch.float32))
        scales = base.__dict__["_fp8_scales"] = (rows, cols, 1.0 / rows, 1.0 / cols)
    scale, inverse = (scales[1], scales[3]) if transpose else (scales[0], scales[2])
    tensors = base.nf4_tensors()
    shape = (base.out_features, base.in_features)
    return (nf4_to_fp8_triton if _fast(tensors[0]) else nf4_to_fp8_reference)(tensors, shape, inverse,
                                                                              transpose), scale


def _scaled_matmul(a_q, a_scale, b_q_t, b_scale, out_dtype):
    """(a_q * a_scale) @ (b_q_t * b_scale)^T: the fast GEMM on CUDA, fp32 arithmetic on dequantized values else."""
    if a_q.is_cuda and not FORCE_REFERENCE:
        return torch._scaled_mm(a_q, b_q_t.t(), scale_a=a_scale, scale_b=b_scale.view(1, -1), out_dtype=out_dtype)
    a = a_q.float() * a_scale
    b = b_q_t.float() * b_scale[:, None]
    return (a @ b.t()).to(out_dtype)


def fp8_linear(x: torch.Tensor, base) -> torch.Tensor:
    """x [..., in] @ W^T in e4m3, returned in x's dtype (no bias)."""
    x_q, x_scale = quantize_activation(x)
    w_q, w_scale = _weight_fp8(base, transpose=False)
    return _scaled_matmul(x_q, x_scale, w_q, w_scale, x.dtype).view(*x.shape[:-1], -1)


def fp8_linear_input_grad(grad: torch.Tensor, base) -> torch.Tensor:
    """grad [..., out] @ W in e4m3, returned in grad's dtype."""
    g_q, g_scale = quantize_rows(grad.reshape(-1, grad.shape[-1]))
    wt_q, wt_scale = _weight_fp8(base, transpose=True)
    return _scaled_matmul(g_q, g_scale, wt_q, wt_scale, grad.dtype).view(*grad.shape[:-1], -1)


def fp8_supported(device: torch.device) -> bool:
    """FP8 tensor cores: compute capability 8.9 (Ada) or 9.0+ (Hopper). The CPU runs the twins (for tests)."""
    if device.type != "cuda":
        return device.type == "cpu"
    return torch.cuda.get_device_capability(device) >= (8, 9)
