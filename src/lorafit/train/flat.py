"""The adapter weights in one flat buffer, and their gradients in another, so the step after the backward is a
handful of kernel launches instead of a few per tensor.

Why: bitsandbytes' 8-bit AdamW updates one tensor per launch, with Python around each. With LoRA on the seven
projections of a 28-layer model that is 392 updates per step; once the backward has run, the GPU has nothing
queued while the host issues them (and the gradient norm's and zeroing's launches), then the next forward. Over
one flat buffer the update is one launch, the gradient norm one reduction, zeroing one memset.

The model's parameters stay what they were (leaves with requires_grad, the same names and shapes): their storage
and their `.grad` become views into the two buffers, and autograd adds into a `.grad` that exists in place. So a
gradient must never be set to None: `zero_grad()` zeroes the buffer.

Each parameter starts on a multiple of bitsandbytes' 256-element state block, so every block of the 8-bit
optimizer states (and its absmax) belongs to one parameter, and the flat update is the per-tensor one
(tests/test_flat.py). One difference: bitsandbytes keeps 32-bit states for a tensor under 4,096 elements (such
as a small model's k/v LoRA B); here every adapter tensor gets 8-bit states.
"""

from __future__ import annotations

import torch
from torch import nn

STATE_BLOCK = 256  # bitsandbytes' blockwise 8-bit optimizer state


class FlatParameters:
    """`params` moved into one buffer: `.param` is what the optimizer, the gradient clip and the gradient sync
    take; the model's own parameters keep working as views of it."""

    def __init__(self, params: list[nn.Parameter]):
        first = params[0]
        offsets, total = [], 0
        for p in params:
            offsets.append(total)
            total += -(-p.numel() // STATE_BLOCK) * STATE_BLOCK
        self.param = nn.Parameter(torch.zeros(total, dtype=first.dtype, device=first.device))
        self.param.grad = torch.zeros_like(self.param)
        with torch.no_grad():
            for p, start in zip(params, offsets):
                piece = slice(start, start + p.numel())
                self.param.data[piece].copy_(p.detach().reshape(-1))
                p.data = self.param.data[piece].view(p.shape)
                p.grad = self.param.grad[piece].view(p.shape)
        self.params, self.offsets = params, offsets

    def zero_grad(self) -> None:
        self.param.grad.zero_()


def flatten(params: list[nn.Parameter]) -> FlatParameters | None:
    """One buffer for `params`, or None where they cannot share one: other dtypes or devices, or sharded
    (FSDP's DTensors)."""
    if not params or any(type(p.data) is not torch.Tensor for p in params):
        return None
    if len({(p.dtype, p.device) for p in params}) > 1:
        return None
    return FlatParameters(params)


# A checkpoint keeps the optimizer state tensor by tensor, as an optimizer over the separate parameters would
# (FSDP's, or a checkpoint from before the flat buffer): one layout on disk, whichever way a run steps.
# State values cut by key: per element (the flat buffer's length), per 256-element block (bitsandbytes' absmax),
# or shared (step counters, quantization maps).

def _kind(key: str, value, elements: int) -> str:
    """How a state value is cut: "block" (bitsandbytes' absmax), "element" (moments), or "shared" (the step
    count, bitsandbytes' quantization maps)."""
    if key.startswith("absmax"):
        return "block"
    if isinstance(value, torch.Tensor) and not key.startswith("qmap") and value.numel() == elements > 1:
        return "element"
    return "shared"


def _piece(key: str, value, total: int, start: int, p: torch.Tensor):
    """Parameter `p`'s part of a flat state value (bitsandbytes nests its quantized states in a dict)."""
    if isinstance(value, dict):
        return {k: _piece(k, v, total, start, p) for k, v in value.items()}
    kind = _kind(key, value, total)
    if kind == "block":
        return value[start // STATE_BLOCK:-(-(start + p.numel()) // STATE_BLOCK)].clone()
    if kind == "element":
        return value[start:start + p.numel()].reshape(p.shape).clone()
    return value.clone() if isinstance(value, torch.Tensor) else value


def _joined(key: str, values: list, flat: FlatParameters, where: str, padding: int = 0):
    """The flat state value from every parameter's, `padding` between them."""
    first = values[0]
    if isinstance(first, dict):
        if any(not isinstance(v, dict) or v.keys() != first.keys() for v in values):
            raise ValueError(f"{where}: optimizer state {key!r} differs in layout between tensors")
        # an 8-bit state's padding holds the code nearest zero, as the flat update leaves it: code 0 may stand for
        # -1, which would count in its block's absmax
        zero_codes = {k: int(first["qmap" + k[5:]].abs().argmin()) for k in first
                      if k.startswith("state") and isinstance(first.get("qmap" + k[5:]), torch.Tensor)}
        return {k: _joined(k, [v[k] for v in values], flat, where, zero_codes.get(k, 0)) for k in first}
    kind = _kind(key, first, flat.params[0].numel())
    if kind == "shared":
        return first
    if any(not isinstance(v, torch.Tensor) or v.dtype != first.dtype for v in values):
        raise ValueError(f"{where}: optimizer state {key!r} differs in kind between tensors (bitsandbytes keeps "
                         "32-bit states for tensors under 4,096 elements; this run keeps 8-bit for all)")
    if kind == "block":
        return torch.cat([v.reshape(-1) for v in values])
    buffer = torch.full((flat.param.numel(),), padding, dtype=first.dtype)
    for start, v in zip(flat.offsets, values):
        buffer[start:start + v.numel()] = v.reshape(-1)
    return buffer


def split_state(state: dict, flat: FlatParameters) -> dict:
    """A flat optimizer's state_dict as the per-tensor optimizer's."""
    flat_state = state["state"].get(0, {})
    pieces = {i: _piece("", flat_state, flat.param.numel(), start, p)
              for i, (start, p) in enumerate(zip(flat.offsets, flat.params))} if flat_state else {}
    (group,) = state["param_groups"]
    return {"state": pieces, "param_groups": [{**group, "params": list(range(len(flat.params)))}]}


def join_state(state: dict, flat: FlatParameters, where: str) -> dict:
    """A per-tensor state_dict as the flat optimizer's. `where` names the checkpoint in an error."""
    groups = state["param_groups"]
    if len(groups) != 1 or len(groups[0]["params"]) != len(flat.params):
        raise ValueError(f"{where}: {sum(len(g['params']) for g in groups)} parameters in the optimizer state, "
                         f"{len(flat.params)} trainable tensors in this run")
    per_tensor = [state["state"].get(index, {}) for index in groups[0]["params"]]
    joined = _joined("", per_tensor, flat, where) if all(per_tensor) else {}
    return {"state": {0: joined} if joined else {}, "param_groups": [{**groups[0], "params": [0]}]}
