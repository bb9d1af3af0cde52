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


def is_quantizable(name: str, module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) and ".layers." in f".{name}"


def quantize_nf4(model: nn.Module, device: torch.device | str, compute_dtype: torch.dtype) -> nn.Module:
    """Replace every decoder nn.Linear by a frozen bitsandbytes Linear4bit on `device`, one layer at a time.

    Layer by layer keeps peak memory at one 16-bit matrix beyond the quantized model, so a model whose 16-bit
    weights would not fit the card still loads.
    """
    import bitsandbytes as bnb

    for parent_name, parent in list(model.named_modules()):
        for child_name, child in list(parent.named_children()):
            name = f"{parent_name}.{child_name}" if parent_name else child_name
            if not is_quantizable(name, child):
                continue
            quantized = bnb.nn.Linear4bit(
                child.in_features, child.out_features, bias=child.bias is not None, compute_dtype=compute_dtype,
                compress_statistics=True, quant_type="nf4", quant_storage=torch.uint8, device="meta",
            )
            weight = child.weight.data.to(device=device, dtype=compute_dtype if compute_dtype != torch.float32
                                          else torch.float32)
            quantized.weight = bnb.nn.Params4bit(weight, requires_grad=False, compress_statistics=True,
                                                 quant_type="nf4", blocksize=NF4_BLOCKSIZE)
            if child.bias is not None:
                quantized.bias = nn.Parameter(child.bias.data.to(device, compute_dtype), requires_grad=False)
            quantized = quantized.to(device)  # Params4bit quantizes when it reaches the device
            setattr(parent, child_name, quantized)
            del weight
    return model


def dequantize_weight(module: nn.Module) -> torch.Tensor:
    """The dense weight a (possibly NF4) linear computes with: what a QLoRA adapter was trained against."""
    if isinstance(module, nn.Linear):
        return module.weight.data
    import bitsandbytes as bnb

    return bnb.functional.dequantize_4bit(module.weight.data, module.weight.quant_state)


def is_nf4(module: nn.Module) -> bool:
    return type(module).__name__ == "Linear4bit"
