"""Freeze a model's decoder linears in 4-bit NF4 with double quantization, through bitsandbytes.

This is the QLoRA base: weights stored as 4-bit NormalFloat codes with one absmax per 64 weights, the absmaxes
themselves quantized to 8 bits (double quantization: ~0.37 bits/param of constants instead of 0.5), and every
matmul run in `compute_dtype` on weights dequantized on the fly. Embeddings, norms and the LM head stay 16-bit,
as in the reference recipe. bitsandbytes is imported here only, so LoRA on a 16-bit base never needs it.
"""

from __future__ import annotations

import torch
from torch import nn

NF4_BLOCKSIZE = 64


def import_bitsandbytes():
    """bitsandbytes, without its warning about an optional CPU kernel package we do not use."""
    import logging

    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    import bitsandbytes

    return bitsandbytes


def is_quantizable(name: str, module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) and ".layers." in f".{name}"


class NF4Linear(nn.Module):
    """A frozen linear whose weight is NF4 (bitsandbytes Params4bit); y = x W^T + b with W dequantized on the fly.

    Our own module rather than bitsandbytes' Linear4bit: on CPUs with AVX512-BF16, Linear4bit repacks its weight
    the first time it runs in eval mode, and from then on backward runs through a kernel without autograd, so
    the gradients are silently wrong. Evaluating the base model before training triggered exactly that.
    """

    def __init__(self, weight, bias: torch.Tensor | None, compute_dtype: torch.dtype):
        super().__init__()
        self.weight = weight
        self.bias = nn.Parameter(bias, requires_grad=False) if bias is not None else None
        self.compute_dtype = compute_dtype
        self.out_features, self.in_features = weight.quant_state.shape

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bnb = import_bitsandbytes()
        dtype = x.dtype
        bias = self.bias.to(self.compute_dtype) if self.bias is not None else None
        y = bnb.matmul_4bit(x.to(self.compute_dtype), self.weight, bias=bias, quant_state=self.weight.quant_state)
        return y.to(dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, nf4, compute={self.compute_dtype}"


def quantize_nf4(model: nn.Module, device: torch.device | str, compute_dtype: torch.dtype) -> nn.Module:
    """Replace every decoder nn.Linear by a frozen NF4Linear on `device`, one layer at a time.

    Layer by layer keeps peak memory at one 16-bit matrix beyond the quantized model, so a model whose 16-bit
    weights would not fit the card still loads.
    """
    bnb = import_bitsandbytes()
    for parent_name, parent in list(model.named_modules()):
        for child_name, child in list(parent.named_children()):
            name = f"{parent_name}.{child_name}" if parent_name else child_name
            if not is_quantizable(name, child):
                continue
            weight = bnb.nn.Params4bit(child.weight.data.to(device=device, dtype=compute_dtype), requires_grad=False,
                                       compress_statistics=True, quant_type="nf4", blocksize=NF4_BLOCKSIZE)
            weight = weight.to(device)  # Params4bit quantizes when it reaches a device
            bias = child.bias.data.to(device, compute_dtype) if child.bias is not None else None
            setattr(parent, child_name, NF4Linear(weight, bias, compute_dtype))
    return model


def dequantize_weight(module: nn.Module) -> torch.Tensor:
    """The dense weight a (possibly NF4) linear computes with: what a QLoRA adapter was trained against."""
    if isinstance(module, nn.Linear):
        return module.weight.data
    import bitsandbytes as bnb

    return bnb.functional.dequantize_4bit(module.weight.data, module.weight.quant_state)


def is_nf4(module: nn.Module) -> bool:
    return isinstance(module, NF4Linear)
