r"""NF4 dequantization: a Triton kernel for CUDA and its plain-PyTorch twin.

Storage is bitsandbytes' NF4 layout with double quantization, kept as plain tensors so that sharding, streaming and
`torch.compile` see ordinary buffers rather than a tensor subclass:

    packed      uint8 [ceil(n/2)]   two 4-bit codes per byte, the first element in the high nibble
    absmax_q    uint8 [n/64]        each 64-weight block's absmax, itself quantized to 8 bits ...
    absmax_map  fp32  [256]         ... as an index into bitsandbytes' dynamic 8-bit map,
    absmax_scale fp32 [n/64/256]    scaled per block of 256 absmaxes,
    absmax_offset fp32 []           plus the mean that was subtracted before quantizing them
    nf4_code    fp32  [16]          the NormalFloat code values

    w[i] = nf4_code[code(i)] * (absmax_map[absmax_q[i // 64]] * absmax_scale[i // 16384] + absmax_offset)

The reference is exactly what `bitsandbytes.functional.dequantize_4bit` returns (tested bit for bit on CPU); the
kernel is tested against the reference on the GPU. Dequantizing the whole matrix and then calling cuBLAS costs
~4.5 bytes of memory traffic per weight: for a 7B model about 10 ms per pass on an H100, against ~400 ms of matmuls
per pass at 8 x 2048 tokens, so a dequantize-inside-the-GEMM kernel is not worth its complexity here.
"""

from __future__ import annotations

import os

import torch

BLOCKSIZE = 64
ABSMAX_BLOCKSIZE = 256
FORCE_REFERENCE = os.environ.get("LORAFIT_REFERENCE_KERNELS", "") not in ("", "0")


def dequantize_nf4_reference(packed, absmax_q, absmax_map, absmax_scale, absmax_offset, nf4_code,
                             shape: tuple[int, int], dtype: torch.dtype) -> torch.Tensor:
    n = shape[0] * shape[1]
    absmax = absmax_map[absmax_q.long()] * absmax_scale.repeat_interleave(ABSMAX_BLOCKSIZE)[: absmax_q.numel()]
    absmax = absmax + absmax_offset
    codes = torch.stack((packed.view(-1) >> 4, packed.view(-1) & 15), dim=-1).view(-1)[:n]
    values = nf4_code[codes.long()]
    blocks = -(-n // BLOCKSIZE)
    values = torch.nn.functional.pad(values, (0, blocks * BLOCKSIZE - n)).view(blocks, BLOCKSIZE)
    return (values * absmax[:, None]).view(-1)[:n].to(dtype).view(shape)


_triton_kernel = None


def _build_triton_kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def nf4_dequantize_kernel(packed_ptr, absmax_q_ptr, absmax_map_ptr, absmax_scale_ptr, offset_ptr, code_ptr,
                              out_ptr, n, BLOCK: tl.constexpr):
        idx = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        inside = idx < n
        byte = tl.load(packed_ptr + idx // 2, mask=inside, other=0).to(tl.int32)
        nibble = tl.where(idx % 2 == 0, byte >> 4, byte & 15)
        value = tl.load(code_ptr + nibble, mask=inside, other=0.0)
        block = idx // 64
        q = tl.load(absmax_q_ptr + block, mask=inside, other=0).to(tl.int32)
        absmax = tl.load(absmax_map_ptr + q, mask=inside, other=0.0) * tl.load(
            absmax_scale_ptr + block // 256, mask=inside, other=0.0) + tl.load(offset_ptr)
        tl.store(out_ptr + idx, (value * absmax).to(out_ptr.dtype.element_ty), mask=inside)

    return nf4_dequantize_kernel


def dequantize_nf4_triton(packed, absmax_q, absmax_map, absmax_scale, absmax_offset, nf4_code,
                          shape: tuple[int, int], dtype: torch.dtype, out: torch.Tensor | None = None) -> torch.Tensor:
    global _triton_kernel
    if _triton_kernel is None:
        _triton_kernel = _build_triton_kernel()
    n = shape[0] * shape[1]
    if out is None:
        out = torch.empty(shape, dtype=dtype, device=packed.device)
    block = 2048
    _triton_kernel[(-(-n // block),)](packed, absmax_q, absmax_map, absmax_scale, absmax_offset, nf4_code, out, n,
                                      BLOCK=block)
    return out


def dequantize_nf4(*tensors, shape: tuple[int, int], dtype: torch.dtype, out: torch.Tensor | None = None
                   ) -> torch.Tensor:
    """The dense weight in `dtype`; the Triton kernel on CUDA unless LORAFIT_REFERENCE_KERNELS=1. `out`: written
    there instead (contiguous, of `shape`: rows of a stacked weight)."""
    if tensors[0].is_meta:  # the planner's trace: what the CUDA kernel allocates, the output only
        return torch.empty(shape, dtype=dtype, device="meta") if out is None else out
    if tensors[0].is_cuda and not FORCE_REFERENCE:
        return dequantize_nf4_triton(*tensors, shape=shape, dtype=dtype, out=out)
    dense = dequantize_nf4_reference(*tensors, shape=shape, dtype=dtype)
    return dense if out is None else out.copy_(dense)
