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

import torch

from lorafit.kernels.nf4 import ABSMAX_BLOCKSIZE, BLOCKSIZE, FORCE_REFERENCE, dequantize_nf4_reference

E4M3 = torch.float8_e4m3fn
E4M3_MAX = 448.0


def quantize_rows_reference(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (e4m3 [M, K], fp32 scale [M, 1]) with x ~= q * scale."""
    x = x.float()
    scale = x.abs().amax(-1, keepdim=True).clamp(min=1e-12) / E4M3_MAX
    return (x / scale).to(E4M3), scale


_compiled_quantize = None


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    global _compiled_quantize
    if not x.is_cuda or FORCE_REFERENCE:
        return quantize_rows_reference(x)
    if _compiled_quantize is None:  # one fused Triton kernel (row max, divide, cast) instead of five passes
        _compiled_quantize = torch.compile(quantize_rows_reference, dynamic=None)
    return _compiled_quantize(x)


def channel_scales(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-output-channel and per-input-channel scales of a dense weight [out, in], fp32."""
    magnitude = weight.float().abs()
    return (magnitude.amax(1).clamp(min=1e-12) / E4M3_MAX, magnitude.amax(0).clamp(min=1e-12) / E4M3_MAX)


def nf4_to_fp8_reference(tensors, shape: tuple[int, int], scale: torch.Tensor, transpose: bool) -> torch.Tensor:
    """The NF4 weight [out, in] in e4m3, divided by `scale` per output channel ([out, in] layout) or per input
    channel ([in, out] layout, `transpose`)."""
    dense = dequantize_nf4_reference(*tensors, shape=shape, dtype=torch.float32)
    if transpose:
        return (dense * (1.0 / scale)[None, :]).t().contiguous().to(E4M3)
    return (dense * (1.0 / scale)[:, None]).to(E4M3)


_triton_kernel = None


def _build_triton_kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def nf4_to_fp8_kernel(packed_ptr, absmax_q_ptr, absmax_map_ptr, absmax_scale_ptr, offset_ptr, code_ptr,
                          inv_scale_ptr, out_ptr, N, K, TRANSPOSE: tl.constexpr, BN: tl.constexpr,
                          BK: tl.constexpr, BLOCKSIZE: tl.constexpr, ABSMAX_BLOCKSIZE: tl.constexpr):
        n = tl.program_id(0) * BN + tl.arange(0, BN)
        k = tl.program_id(1) * BK + tl.arange(0, BK)
        inside = (n[:, None] < N) & (k[None, :] < K)
        idx = n[:, None].to(tl.int64) * K + k[None, :]
        byte = tl.load(packed_ptr + idx // 2, mask=inside, other=0).to(tl.int32)
        nibble = tl.where(idx % 2 == 0, byte >> 4, byte & 15)
        value = tl.load(code_ptr + nibble, mask=inside, other=0.0)
        block = idx // BLOCKSIZE
        q = tl.load(absmax_q_ptr + block, mask=inside, other=0).to(tl.int32)
        absmax = tl.load(absmax_map_ptr + q, mask=inside, other=0.0) * tl.load(
            absmax_scale_ptr + block // ABSMAX_BLOCKSIZE, mask=inside, other=0.0) + tl.load(offset_ptr)
        value = value * absmax
        if TRANSPOSE:
            inv = tl.load(inv_scale_ptr + k, mask=k < K, other=0.0)
            out = (value * inv[None, :]).to(out_ptr.dtype.element_ty)
            tl.store(out_ptr + k[None, :].to(tl.int64) * N + n[:, None], out, mask=inside)
        else:
            inv = tl.load(inv_scale_ptr + n, mask=n < N, other=0.0)
            tl.store(out_ptr + idx, (value * inv[:, None]).to(out_ptr.dtype.element_ty), mask=inside)

    return nf4_to_fp8_kernel


def nf4_to_fp8_triton(tensors, shape: tuple[int, int], scale: torch.Tensor, transpose: bool) -> torch.Tensor:
    global _triton_kernel
    if _triton_kernel is None:
        _triton_kernel = _build_triton_kernel()
    n, k = shape
    out = torch.empty((k, n) if transpose else (n, k), dtype=E4M3, device=tensors[0].device)
    grid = (-(-n // 64), -(-k // 64))
    _triton_kernel[grid](*tensors, 1.0 / scale, out, n, k, TRANSPOSE=transpose, BN=64, BK=64, BLOCKSIZE=BLOCKSIZE,
                         ABSMAX_BLOCKSIZE=ABSMAX_BLOCKSIZE)
    return out


def _weight_fp8(base, transpose: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The frozen weight in e4m3 ([out, in], or [in, out] with `transpose`) and its fp32 channel scales."""
    scales = base.__dict__.get("_fp8_scales")
    if scales is None:  # once per module: the base never changes
        scales = base.__dict__["_fp8_scales"] = channel_scales(base.dequantize(torch.float32))
    scale = scales[1] if transpose else scales[0]
    tensors = base.nf4_tensors()
    fast = tensors[0].is_cuda and not FORCE_REFERENCE
    shape = (base.out_features, base.in_features)
    return (nf4_to_fp8_triton if fast else nf4_to_fp8_reference)(tensors, shape, scale, transpose), scale


def _scaled_matmul(a_q, a_scale, b_q_t, b_scale, out_dtype):
    """(a_q * a_scale) @ (b_q_t * b_scale)^T: the fast GEMM on CUDA, fp32 arithmetic on dequantized values else."""
    if a_q.is_cuda and not FORCE_REFERENCE:
        return torch._scaled_mm(a_q, b_q_t.t(), scale_a=a_scale, scale_b=b_scale.view(1, -1), out_dtype=out_dtype)
    a = a_q.float() * a_scale
    b = b_q_t.float() * b_scale[:, None]
    return (a @ b.t()).to(out_dtype)


def fp8_linear(x: torch.Tensor, base) -> torch.Tensor:
    """x [..., in] @ W^T in e4m3, returned in x's dtype (no bias)."""
    x_q, x_scale = quantize_rows(x.reshape(-1, x.shape[-1]))
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
