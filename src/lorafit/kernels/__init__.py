import torch


def autocast_device(x: torch.Tensor) -> str:
    """The autocast device type that governs x's ops, for turning autocast off around a kernel or twin that picks
    its own precision. Meta tensors (the planner's trace) count as the CPU."""
    return x.device.type if torch.amp.is_autocast_available(x.device.type) else "cpu"
