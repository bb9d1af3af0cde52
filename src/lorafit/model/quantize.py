"""Freeze a model's decoder linears in 4-bit NF4 with double quantization.

This is the QLoRA base: weights stored as 4-bit NormalFloat codes with one absmax per 64 weights, the absmaxes
themselves quantized to 8 bits (double quantization: ~0.127 bits/param of constants instead of 0.5), and every
matmul run in `compute_dtype` on weights dequantized on the fly. Embeddings, norms and the LM head stay 16-bit,
as in the reference recipe. bitsandbytes quantizes (its `quantize_4bit`, so the codes are the ones every QLoRA
tool produces); the stored tensors are plain buffers, dequantized by `lorafit.kernels.nf4`.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from lorafit.kernels.fp8 import fp8_linear, fp8_linear_input_grad
from lorafit.kernels.nf4 import BLOCKSIZE, dequantize_nf4

NF4_BLOCKSIZE = BLOCKSIZE
NF4_TENSORS = ("packed", "absmax_q", "absmax_map", "absmax_scale", "absmax_offset", "nf4_code")


def import_bitsandbytes():
    """bitsandbytes, without its warning about an optional CPU kernel package we do not use."""
    import logging

    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    import bitsandbytes

    return bitsandbytes


def is_quantizable(name: str, module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) and ".layers." in f".{name}"


class _NF4Matmul(torch.autograd.Function):
    """y = x W^T with W dequantized in forward and again in backward: nothing of the weight is kept in between.
    In e4m3 when the module is marked `fp8` (kernels/fp8.py)."""

    @staticmethod
    def forward(ctx, x, module):
        ctx.module = module
        return fp8_linear(x, module) if module.fp8 else x @ module.dequantize().t()

    @staticmethod
    def backward(ctx, grad):
        module = ctx.module
        return (fp8_linear_input_grad(grad, module) if module.fp8 else grad @ module.dequantize()), None


class NF4Linear(nn.Module):
    """A frozen linear whose weight is NF4: y = x W^T + b with W dequantized on the fly (see kernels/nf4.py).

    `packed` is a frozen Parameter (so FSDP can shard it and `parameters()` finds the module's device); the
    quantization constants are buffers. Not bitsandbytes' Linear4bit: on CPUs with AVX512-BF16 that layer repacks
    its weight the first time it runs in eval mode, and from then on backward silently returns wrong gradients.
    """

    def __init__(self, out_features: int, in_features: int, bias: torch.Tensor | None, compute_dtype: torch.dtype,
                 device: torch.device | str = "meta"):
        super().__init__()
        n = out_features * in_features
        blocks = -(-n // BLOCKSIZE)
        self.packed = nn.Parameter(torch.empty((n + 1) // 2, dtype=torch.uint8, device=device), requires_grad=False)
        self.register_buffer("absmax_q", torch.empty(blocks, dtype=torch.uint8, device=device))
        self.register_buffer("absmax_map", torch.empty(256, device=device))
        self.register_buffer("absmax_scale", torch.empty(-(-blocks // 256), device=device))
        self.register_buffer("absmax_offset", torch.empty((), device=device))
        self.register_buffer("nf4_code", torch.empty(16, device=device))
        self.bias = nn.Parameter(bias, requires_grad=False) if bias is not None else None
        self.compute_dtype = compute_dtype
        self.out_features, self.in_features = out_features, in_features
        self.fp8 = False  # run the matmuls in e4m3 (`model.fp8_base`, kernels/fp8.py)

    @classmethod
    def from_linear(cls, linear: nn.Linear, device, compute_dtype: torch.dtype) -> NF4Linear:
        bnb = import_bitsandbytes()
        weight = linear.weight.data.to(device=device, dtype=compute_dtype).contiguous()  # bnb reads raw memory
        packed, state = bnb.functional.quantize_4bit(weight, blocksize=BLOCKSIZE, compress_statistics=True,
                                                     quant_type="nf4")
        bias = linear.bias.data.to(device, compute_dtype) if linear.bias is not None else None
        module = cls(*weight.shape, bias, compute_dtype, device="meta")
        del weight
        # bitsandbytes' own tensors become the buffers (no copies, so loading peaks at one 16-bit matrix)
        module.packed = nn.Parameter(packed.view(-1), requires_grad=False)
        for name, tensor in zip(NF4_TENSORS[1:], (state.absmax, state.state2.code, state.state2.absmax,
                                                   state.offset, state.code)):
            setattr(module, name, tensor.to(device))
        return module

    def nf4_tensors(self) -> tuple[torch.Tensor, ...]:
        return tuple(getattr(self, name) for name in NF4_TENSORS)

    def dequantize(self, dtype: torch.dtype | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
        """The dense weight [out, in]; written into `out` when given (rows of a stacked weight)."""
        dense = self.__dict__.get("_dense")
        if dense is not None and dense.dtype == (dtype or self.compute_dtype):
            return dense if out is None else out.copy_(dense)
        if self.absmax_q.is_meta and not self.packed.is_meta:  # model/stream.py's mark of a layer not fetched
            raise RuntimeError("NF4 weights of a streamed layer used while they are not on the device: run the "
                               "layer through its module call (the streaming hooks fetch them)")
        return dequantize_nf4(*self.nf4_tensors(), shape=(self.out_features, self.in_features),
                              dtype=dtype or self.compute_dtype, out=out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        y = _NF4Matmul.apply(x.to(self.compute_dtype), self)
        if self.bias is not None:
            y = y + self.bias.to(self.compute_dtype)
        return y.to(dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, nf4, compute={self.compute_dtype}"


def quantize_nf4(model: nn.Module, device: torch.device | str, compute_dtype: torch.dtype) -> nn.Module:
    """Replace every decoder nn.Linear by a frozen NF4Linear on `device`, one layer at a time.

    Layer by layer keeps peak memory at one 16-bit matrix beyond the quantized model, so a model whose 16-bit
    weights would not fit the card still loads.
    """
    for parent_name, parent in list(model.named_modules()):
        for child_name, child in list(parent.named_children()):
            name = f"{parent_name}.{child_name}" if parent_name else child_name
            if is_quantizable(name, child):
                setattr(parent, child_name, NF4Linear.from_linear(child, device, compute_dtype))
    return model


def use_fp8_base(model: nn.Module) -> int:
    """Mark every NF4 linear whose sides are multiples of 16 (what FP8 GEMMs take) to compute in e4m3; returns how
    many were marked."""
    marked = [m for m in model.modules() if isinstance(m, NF4Linear)
              and m.in_features % 16 == 0 and m.out_features % 16 == 0]
    for module in marked:
        module.fp8 = True
    return len(marked)


@contextlib.contextmanager
def fp8_base_off(model: nn.Module):
    """The marked NF4 linears compute in bf16 again inside the block (evaluation scores the model as it is served)."""
    marked = [m for m in model.modules() if isinstance(m, NF4Linear) and m.fp8]
    for module in marked:
        module.fp8 = False
    try:
        yield
    finally:
        for module in marked:
            module.fp8 = True


@contextlib.contextmanager
def dense_weights_on_cpu(model: nn.Module):
    """While decoding on the CPU, keep every NF4 weight dequantized: one decode step per token would otherwise
    dequantize the whole model each time (bundled 135M model, 8 prompts x 48 tokens on 2 cores: 13.5 s -> 3.4 s, the
    same text). On a GPU the Triton kernel is cheap next to the memory dense copies would cost: nothing changes."""
    # not for FSDP-sharded weights (DTensors, whole only inside forward) or streamed layers not fetched (meta)
    modules = [m for m in model.modules() if isinstance(m, NF4Linear) and m.packed.device.type == "cpu"
               and not m.absmax_q.is_meta and not hasattr(m.packed, "device_mesh")]
    for m in modules:
        m._dense = m.dequantize()
    try:
        yield
    finally:
        for m in modules:
            m._dense = None


def dequantize_weight(module: nn.Module) -> torch.Tensor:
    """The dense weight a (possibly NF4) linear computes with: what a QLoRA adapter was trained against."""
    if isinstance(module, nn.Linear):
        return module.weight.data
    return module.dequantize()


def is_nf4(module: nn.Module) -> bool:
    return isinstance(module, NF4Linear)
