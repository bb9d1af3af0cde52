r"""LoRA: a frozen linear plus a trainable low-rank update, stored in PEFT's on-disk format.

For a frozen weight W (16-bit or NF4) and input x, LoRA computes

    y = x W^T + s * dropout(x) A^T B^T,   A: [r, in], B: [out, r],   s = alpha / r   (rsLoRA: alpha / sqrt(r))

A starts Kaiming-uniform and B at zero, so training starts from the base model exactly. Only A and B receive
gradients: dy/dx adds s * B A to the frozen path, dL/dB = s * g^T (x A^T), dL/dA = s * (g B)^T x.

Module and parameter names follow PEFT (`q_proj.base_layer`, `q_proj.lora_A.weight`), so `save_adapter` writes
`base_model.model.<module>.lora_A.weight` keys that `PeftModel.from_pretrained`, vLLM and SGLang read as they are.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from lorafit.config import LoraConfig
from lorafit.errors import ModelError
from lorafit.kernels import fp8_rows, fused
from lorafit.kernels.lora import lora_linear
from lorafit.kernels.lora_siblings import SiblingGroup, lora_siblings
from lorafit.kernels.nf4 import FORCE_REFERENCE
from lorafit.kernels.swiglu_lora import swiglu_lora

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
PEFT_PREFIX = "base_model.model."


class LoRALinear(nn.Module):
    def __init__(self, base_layer: nn.Module, r: int, alpha: float, dropout: float = 0.0, use_rslora: bool = False):
        super().__init__()
        self.base_layer = base_layer
        in_features, out_features = base_layer.in_features, base_layer.out_features
        device = next(base_layer.parameters()).device
        self.lora_A = nn.Linear(in_features, r, bias=False, device=device, dtype=torch.float32)
        self.lora_B = nn.Linear(r, out_features, bias=False, device=device, dtype=torch.float32)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))  # PEFT's default init
        nn.init.zeros_(self.lora_B.weight)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.scaling = alpha / math.sqrt(r) if use_rslora else alpha / r
        self.in_features, self.out_features = in_features, out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if FORCE_REFERENCE:
            return self.reference_forward(x)
        x_lora = self.lora_dropout(x)
        return lora_linear(x, x_lora, self.lora_A.weight, self.lora_B.weight, self.base_layer, self.scaling)

    def forward_swiglu(self, gate: torch.Tensor, up: torch.Tensor, keep_product: bool = False) -> torch.Tensor:
        """self(silu(gate) * up): the MLP's down_proj. The product is not kept for backward (kernels/swiglu_lora.py)
        unless `keep_product` (model.llama.MLP says when that pays) or dropout (it needs the product and its mask)."""
        if FORCE_REFERENCE or keep_product or not isinstance(self.lora_dropout, nn.Identity):
            fp8_base = getattr(self.base_layer, "fp8", False)  # then its e4m3 rows come in the same pass
            return self(fp8_rows.swiglu_remembered(gate, up) if fp8_base else fused.swiglu_trainable(gate, up))
        return swiglu_lora(gate, up, self)

    def reference_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The plain composition, autograd through every op: the twin of kernels.lora.LoRAFunction."""
        y = self.base_layer(x)
        # A and B stay fp32 (they are the trained master weights); the update runs in the activations' dtype.
        a = self.lora_A.weight.to(x.dtype)
        b = self.lora_B.weight.to(x.dtype)
        return y + (self.lora_dropout(x) @ a.t() @ b.t()) * self.scaling


STACK_SIBLINGS = True  # q/k/v and gate/up as one stacked LoRA linear each (kernels/lora_siblings.py)


def stacked_outputs(parent: nn.Module, names: tuple[str, ...], x: torch.Tensor) -> tuple[torch.Tensor, ...] | None:
    """The outputs of `parent`'s linears `names` for their one input x, computed as one stacked LoRA linear; None
    where they cannot be (not all LoRA linears on NF4 bases without dropout, biases on some only, the plain-PyTorch
    twins forced, or STACK_SIBLINGS off): the caller then calls each."""
    if not STACK_SIBLINGS or FORCE_REFERENCE:
        return None
    modules = tuple(getattr(parent, name) for name in names)
    cache = parent.__dict__.get("_lorafit_stacked", {})
    entry = cache.get(names)
    if entry is None or any(a is not b for a, b in zip(entry[0], modules)):
        entry = (modules, _sibling_group(modules))
        parent.__dict__["_lorafit_stacked"] = {**cache, names: entry}
    group = entry[1]
    return lora_siblings(x, group) if group is not None and group.usable() else None


def _sibling_group(modules) -> SiblingGroup | None:
    from lorafit.model.quantize import is_nf4

    if not all(isinstance(m, LoRALinear) and isinstance(m.lora_dropout, nn.Identity) and is_nf4(m.base_layer)
               for m in modules):
        return None
    bases = [m.base_layer for m in modules]
    if len({b.bias is None for b in bases}) > 1 or len({b.in_features for b in bases}) > 1:
        return None
    return SiblingGroup(modules)


def apply_lora(model: nn.Module, cfg: LoraConfig) -> list[str]:
    """Freeze the model and wrap every linear whose name ends in a target; returns the wrapped module names."""
    for p in model.parameters():
        p.requires_grad_(False)
    wrapped = []
    for parent_name, parent in list(model.named_modules()):
        for child_name, child in list(parent.named_children()):
            name = f"{parent_name}.{child_name}" if parent_name else child_name
            if child_name in cfg.target_modules and hasattr(child, "in_features") and not isinstance(child, LoRALinear):
                setattr(parent, child_name, LoRALinear(child, cfg.r, cfg.alpha, cfg.dropout, cfg.use_rslora))
                wrapped.append(name)
    if not wrapped:
        raise ModelError(f"lora.target_modules {cfg.target_modules} matched no linear layer of this model")
    return wrapped


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Adapter weights under PEFT's saved names (adapter name dropped, `base_model.model.` prefix added)."""
    return {PEFT_PREFIX + name: p.detach().contiguous() for name, p in model.named_parameters() if ".lora_" in name}


def save_adapter(model: nn.Module, folder: str | Path, cfg: LoraConfig, base_model: str, dtype=torch.float32):
    """Write adapter_model.safetensors + adapter_config.json (PEFT's LoraConfig, so its loader takes it as is)."""
    from peft import LoraConfig as PeftLoraConfig

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    targets = sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, LoRALinear)})
    peft_cfg = PeftLoraConfig(
        r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=targets, use_rslora=cfg.use_rslora,
        bias="none", task_type="CAUSAL_LM", base_model_name_or_path=str(base_model),
    )
    peft_cfg.save_pretrained(str(folder))
    # copies: the weights may be views of one flat buffer (train/flat.py), which safetensors will not save
    tensors = {k: v.to("cpu", dtype, copy=True) for k, v in lora_state_dict(model).items()}
    save_file(tensors, str(folder / ADAPTER_WEIGHTS), metadata={"format": "pt"})


def read_adapter_config(folder: str | Path) -> dict:
    path = Path(folder) / ADAPTER_CONFIG
    if not path.is_file():
        raise ModelError(f"{folder}: not an adapter folder (no {ADAPTER_CONFIG})")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ModelError(f"{path}: not valid JSON ({e})") from None
    if data.get("peft_type", "LORA") != "LORA":
        raise ModelError(f"{path}: peft_type {data.get('peft_type')!r} is not LORA")
    return data


def load_adapter(model: nn.Module, folder: str | Path) -> LoraConfig:
    """Wrap `model` as the adapter's config says and load its weights (safetensors only: no code, no pickle)."""
    data = read_adapter_config(folder)
    targets = data.get("target_modules") or []
    if isinstance(targets, str):
        raise ModelError(f"{folder}: regex target_modules ({targets!r}) are not supported; list module names")
    cfg = LoraConfig(r=int(data["r"]), alpha=float(data["lora_alpha"]), dropout=float(data.get("lora_dropout", 0.0)),
                     target_modules=list(targets), use_rslora=bool(data.get("use_rslora", False)))
    apply_lora(model, cfg)
    weights_path = Path(folder) / ADAPTER_WEIGHTS
    if not weights_path.is_file():
        raise ModelError(f"{folder}: missing {ADAPTER_WEIGHTS}")
    saved = load_file(str(weights_path))
    params = dict(model.named_parameters())
    expected = {k for k in lora_state_dict(model)}
    missing, unexpected = expected - set(saved), set(saved) - expected
    if missing or unexpected:
        raise ModelError(f"{weights_path}: adapter does not fit this model "
                         f"(missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]})")
    with torch.no_grad():
        for key, tensor in saved.items():
            params[key[len(PEFT_PREFIX):]].copy_(tensor)
    return cfg
