"""Optimizer and learning-rate schedule."""

from __future__ import annotations

import math

import torch


def build_optimizer(params: list[torch.nn.Parameter], name: str, lr: float, weight_decay: float, device: torch.device):
    """auto: paged 8-bit AdamW on GPU (states in 8 bits, paged to CPU under memory pressure), plain AdamW on CPU."""
    if name == "auto":
        name = "paged_adamw_8bit" if device.type == "cuda" else "adamw"
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, betas=(0.9, 0.999), eps=1e-8)
    from lorafit.model.quantize import import_bitsandbytes

    bnb = import_bitsandbytes()
    cls = bnb.optim.PagedAdamW8bit if name == "paged_adamw_8bit" else bnb.optim.AdamW8bit
    return _without_per_parameter_syncs(cls)(params, lr=lr, weight_decay=weight_decay, betas=(0.9, 0.999), eps=1e-8)


def _without_per_parameter_syncs(cls):
    """bitsandbytes' optimizer class whose step does not wait for the GPU after every parameter.

    bitsandbytes (0.50) calls torch.cuda.synchronize() after each parameter's update: 392 waits per step for a
    28-layer model with LoRA on all seven projections. The first wait holds the host until the whole backward has
    run, and each later one until a tiny kernel has; meanwhile the GPU has nothing queued. Measured on the H100
    (bench/profile_step.py, Qwen2.5-7B 2 x 2048): 26.6 ms of a 420 ms step inside the optimizer, of which 2.5 ms are
    its kernels. Its kernels and its paged-state prefetches go to CUDA's legacy default stream, which is the stream
    the training loop runs on, so stream order alone keeps them after the gradients and before the next forward;
    on any other stream the original step runs, waits included (on the CPU there is nothing to wait for)."""

    def step(self, closure=None):
        device = self.param_groups[0]["params"][0].device
        in_order = device.type == "cpu" or (device.type == "cuda" and torch.cuda.current_stream(device)
                                             == torch.cuda.default_stream(device))
        if closure is not None or not in_order:
            return cls.step(self, closure)
        if not self.initialized:
            self.check_overrides()
            self.to_gpu()
            self.initialized = True
        with torch.no_grad():
            for group_index, group in enumerate(self.param_groups):
                for param_index, param in enumerate(group["params"]):
                    if param.grad is None:
                        continue
                    if not self.state[param]:
                        self.init_state(group, param, group_index, param_index)
                    self.prefetch_state(param)
                    self.update_step(group, param, group_index, param_index)
        return None

    return type(cls.__name__, (cls,), {"step": step, "__doc__": cls.__doc__})


def lr_lambda(schedule: str, warmup_steps: int, total_steps: int):
    """Multiplier of the peak rate at each step: linear warmup, then cosine or linear decay to zero."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        if schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        if schedule == "linear":
            return 1.0 - progress
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def build_scheduler(optimizer, schedule: str, warmup_steps: int, total_steps: int):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(schedule, warmup_steps, total_steps))
