r"""FP8 matmuls for the frozen NF4 base (opt-in: `model.fp8_base`), with their plain-PyTorch twins.

An H100 multiplies float8 (e4m3) matrices at twice its bf16 rate. QLoRA's frozen base is already 4-bit, so running
its matmuls on e4m3 copies of the weight and of the activations costs little precision next to the NF4 codes
themselves, while the LoRA branch, its gradients and the optimizer stay as they are (bf16 activations, fp32
masters). Scales are per row of each operand (cuBLAS' "rowwise" scaling), the finest a single FP8 GEMM applies:

    forward   y   = x W^T:  x per token,       W per output channel   (W as [out, in], in-major)
    backward  g W        :  g per token,       W per input channel    (W as [in, out], out-major: its transpose)

FP8 GEMMs need both operands contiguous along the summed dimension, so backward dequantizes NF4 straight into the
transposed layout (a Triton kernel for each layout). A weight's channel scales are its max |w| per row and per
column, computed once (the base is frozen). An activation's scale is its row's max |x| over 448, e4m3's largest
value, so nothing saturates.

Activations and gradients become e4m3 rows in kernels/fp8_rows.py, fused into the kernels that make them where that
pays. The twins quantize and dequantize in plain PyTorch and multiply in fp32: they round every element exactly as the
fast path does, so the tests compare the GEMMs' accumulation only. On the CPU the twins are the computation.
"""

from __future__ import annotations

import torch

from lorafit.kernels import autocast_device
from lorafit.kernels.fp8_rows import E4M3, E4M3_MAX, _fast, quantize_activation, quantize_gradient
from lorafit.kernels.nf4 import ABSMAX_BLOCKSIZE, BLOCKSIZE, dequantize_nf4_reference


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
                                     code_ptr, inv_scale_ptr, out_ptr, N, K, LD, BN: tl.constexpr, BK: tl.constexpr,
                                     BLOCKSIZE: tl.constexpr, ABSMAX_BLOCKSIZE: tl.constexpr):
        n = tl.program_id(0) * BN + tl.arange(0, BN)
        k = tl.program_id(1) * BK + tl.arange(0, BK)
        inside = (n[:, None] < N) & (k[None, :] < K)
        idx = n[:, None].to(tl.int64) * K + k[None, :]
        value = nf4_values(packed_ptr, absmax_q_ptr, absmax_map_ptr, absmax_scale_ptr, offset_ptr, code_ptr, idx,
                           inside, BLOCKSIZE, ABSMAX_BLOCKSIZE)
        inv = tl.load(inv_scale_ptr + k, mask=k < K, other=0.0)
        out = (value * inv[None, :]).to(out_ptr.dtype.element_ty)
        tl.store(out_ptr + k[None, :].to(tl.int64) * LD + n[:, None], out, mask=inside)

    return nf4_to_fp8_rows_kernel, nf4_to_fp8_transposed_kernel


_kernels: dict = {}


def nf4_to_fp8_triton(tensors, shape: tuple[int, int], inverse_scale: torch.Tensor, transpose: bool,
                      out: torch.Tensor | None = None) -> torch.Tensor:
    """`out`: where to write (rows of a stacked weight, or in the transposed layout its columns: a view whose rows
    may be longer than `shape[0]`)."""
    if "weights" not in _kernels:
        _kernels["weights"] = _build_weight_kernels()
    rows_kernel, transposed_kernel = _kernels["weights"]
    n, k = shape
    if out is None:
        out = torch.empty((k, n) if transpose else (n, k), dtype=E4M3, device=tensors[0].device)
    constants = dict(BLOCKSIZE=BLOCKSIZE, ABSMAX_BLOCKSIZE=ABSMAX_BLOCKSIZE)
    if transpose:
        transposed_kernel[(-(-n // 64), -(-k // 64))](*tensors, inverse_scale, out, n, k, out.stride(0), BN=64, BK=64,
                                                      **constants)
    else:
        rows_kernel[(-(-n * k // 2048),)](*tensors, inverse_scale, out, n * k, k, BLOCK=2048, **constants)
    return out


def weight_scales(base) -> tuple[torch.Tensor, ...]:
    """A frozen NF4 weight's fp32 scales per output channel and per input channel, and their inverses: computed
    once per module (the base never changes)."""
    scales = base.__dict__.get("_fp8_scales")
    if scales is None:
        rows, cols = channel_scales(base.dequantize(torch.float32))
        scales = base.__dict__["_fp8_scales"] = (rows, cols, 1.0 / rows, 1.0 / cols)
    return scales


def nf4_weight_to_fp8(base, inverse_scale: torch.Tensor, transpose: bool,
                      out: torch.Tensor | None = None) -> torch.Tensor:
    """The NF4 weight of `base` in e4m3, times `inverse_scale` per channel (see nf4_to_fp8_triton for `out`)."""
    tensors = base.nf4_tensors()
    shape = (base.out_features, base.in_features)
    if _fast(tensors[0]):
        return nf4_to_fp8_triton(tensors, shape, inverse_scale, transpose, out)
    q = nf4_to_fp8_reference(tensors, shape, inverse_scale, transpose)
    return q if out is None else out.copy_(q)


def _weight_fp8(base, transpose: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The frozen weight in e4m3 ([out, in], or [in, out] with `transpose`) and its fp32 channel scales."""
    scales = weight_scales(base)
    scale, inverse = (scales[1], scales[3]) if transpose else (scales[0], scales[2])
    return nf4_weight_to_fp8(base, inverse, transpose), scale


def _scaled_matmul(a_q, a_scale, b_q_t, b_scale, out_dtype):
    """(a_q * a_scale) @ (b_q_t * b_scale)^T: the fast GEMM on CUDA; else what it computes, in fp32: the exact
    products of the e4m3 values summed, then scaled. Autocast stays off: under it the twin's product ran in bf16 on
    bf16-rounded operands (the reference path calls this inside an autocast region)."""
    if _fast(a_q):
        return torch._scaled_mm(a_q, b_q_t.t(), scale_a=a_scale, scale_b=b_scale.view(1, -1), out_dtype=out_dtype)
    with torch.autocast(autocast_device(a_q), enabled=False):
        return ((a_q.float() @ b_q_t.float().t()) * a_scale * b_scale[None, :]).to(out_dtype)


def fp8_linear(x: torch.Tensor, base) -> torch.Tensor:
    """x [..., in] @ W^T in e4m3, returned in x's dtype (no bias)."""
    x_q, x_scale = quantize_activation(x)
    w_q, w_scale = _weight_fp8(base, transpose=False)
    return _scaled_matmul(x_q, x_scale, w_q, w_scale, x.dtype).view(*x.shape[:-1], -1)


def fp8_linear_input_grad(grad: torch.Tensor, base) -> torch.Tensor:
    """grad [..., out] @ W in e4m3, returned in grad's dtype."""
    g_q, g_scale = quantize_gradient(grad)
    wt_q, wt_scale = _weight_fp8(base, transpose=True)
    return _scaled_matmul(g_q, g_scale, wt_q, wt_scale, grad.dtype).view(*grad.shape[:-1], -1)


FP8_MIN_CAPABILITY = (9, 0)  # row-wise scaled FP8 GEMMs: Hopper and newer; Ada's FP8 is not enabled (untested here)


def fp8_supported(device: torch.device) -> bool:
    """Whether `device` runs the FP8 base: a GPU of FP8_MIN_CAPABILITY, or the CPU (the twins, for tests)."""
    if device.type != "cuda":
        return device.type == "cpu"
    return torch.cuda.get_device_capability(device) >= FP8_MIN_CAPABILITY
