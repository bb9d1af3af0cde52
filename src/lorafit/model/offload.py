"""Activation checkpointing whose saved layer inputs wait in pinned CPU memory instead of on the GPU.

Plain checkpointing keeps one [tokens, hidden] input per decoder layer on the GPU: for Qwen2.5-7B at 2 x 2048 tokens
that is 28 x 29 MB = 0.8 GB, and at 65,536 tokens 13 GB, more than a 16 GB card has left after the weights. Here
each layer's input is copied to the host on a side stream while the next layers compute; in backward the input of
the layer before is copied back while this one recomputes and backpropagates, so the copies (~25 GB/s each way)
hide behind compute, which takes longer at every size that needs this.

The layer's recomputation runs inside this Function's backward (the reentrant form of checkpointing), with the
random-number state and autocast setting of its forward, so dropout masks and precisions repeat exactly.
"""

from __future__ import annotations

import contextlib

import torch


def _remember_forward_state(ctx, x: torch.Tensor) -> None:
    """RNG states and autocast setting of this forward, for a recomputation in backward that must repeat it."""
    ctx.cpu_rng = torch.get_rng_state()
    ctx.cuda_rng = torch.cuda.get_rng_state(x.device) if x.is_cuda else None
    kind = x.device.type
    ctx.autocast = (kind, torch.get_autocast_dtype(kind), torch.is_autocast_enabled(kind))


@contextlib.contextmanager
def _as_in_forward(ctx, x: torch.Tensor):
    """Grad enabled, with the RNG states and autocast setting `_remember_forward_state` saved; RNG restored after."""
    kind, dtype, enabled = ctx.autocast
    devices = [x.device] if x.is_cuda else []
    with torch.random.fork_rng(devices=devices), torch.enable_grad(), torch.autocast(kind, dtype, enabled):
        torch.set_rng_state(ctx.cpu_rng)
        if ctx.cuda_rng is not None:
            torch.cuda.set_rng_state(ctx.cuda_rng, x.device)
        yield


class OffloadState:
    """The host copies of one forward pass's layer inputs, and the prefetches of backward."""

    def __init__(self, device: torch.device):
        self.device = device
        self.host: dict[int, tuple[torch.Tensor, torch.cuda.Event | None]] = {}
        self.prefetched: dict[int, tuple[torch.Tensor, torch.cuda.Event | None]] = {}
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None

    def save(self, i: int, x: torch.Tensor) -> None:
        if self.stream is None:
            self.host[i] = (x.detach().clone(), None)
            return
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.stream):
            host = torch.empty(x.shape, dtype=x.dtype, pin_memory=True)
            host.copy_(x.detach(), non_blocking=True)
            done = torch.cuda.Event()
            done.record(self.stream)
        x.record_stream(self.stream)  # the allocator must not reuse x until the copy has read it
        self.host[i] = (host, done)

    def _to_device(self, i: int) -> tuple[torch.Tensor, torch.cuda.Event | None]:
        host, saved = self.host.pop(i)
        if self.stream is None:
            return host, None
        with torch.cuda.stream(self.stream):
            self.stream.wait_event(saved)
            x = host.to(self.device, non_blocking=True)
            done = torch.cuda.Event()
            done.record(self.stream)
        return x, done

    def load(self, i: int) -> torch.Tensor:
        x, done = self.prefetched.pop(i) if i in self.prefetched else self._to_device(i)
        if done is not None:
            torch.cuda.current_stream(self.device).wait_event(done)
            x.record_stream(torch.cuda.current_stream(self.device))
        if i - 1 in self.host:
            self.prefetched[i - 1] = self._to_device(i - 1)
        return x


class OffloadedCheckpoint(torch.autograd.Function):
    @staticmethod
    def forward(ctx, layer, index, state, x, *args):
        ctx.layer, ctx.index, ctx.state, ctx.args = layer, index, state, args
        _remember_forward_state(ctx, x)
        state.save(index, x)
        with torch.no_grad():
            return ctx.layer(x, *args)

    @staticmethod
    def backward(ctx, grad):
        x = ctx.state.load(ctx.index).detach().requires_grad_(True)
        with _as_in_forward(ctx, x):
            out = ctx.layer(x, *ctx.args)
        torch.autograd.backward(out, grad)
        return (None, None, None, x.grad) + (None,) * len(ctx.args)


class TiledMLP(torch.autograd.Function):
    """The MLP over `chunk` tokens at a time, keeping only its input: at 65,536 tokens Qwen2.5-7B's gate, up and
    product are 2.5 GB each, a chunk of 8,192 tokens makes them 0.3 GB. Backward recomputes each chunk and
    backpropagates it before the next (one extra MLP forward: worth it only when memory is what limits)."""

    @staticmethod
    def forward(ctx, mlp, chunk, x):
        ctx.mlp, ctx.chunk = mlp, chunk
        _remember_forward_state(ctx, x)
        ctx.save_for_backward(x)
        flat = x.reshape(-1, x.shape[-1])
        with torch.no_grad():
            return torch.cat([mlp.plain_forward(flat[i:i + chunk]) for i in range(0, flat.shape[0], chunk)]
                             ).view(*x.shape[:-1], -1)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        flat, grad = x.detach().reshape(-1, x.shape[-1]), grad.reshape(-1, grad.shape[-1])
        grad_x = torch.empty_like(flat)
        with _as_in_forward(ctx, x):
            for i in range(0, flat.shape[0], ctx.chunk):
                piece = flat[i:i + ctx.chunk].detach().requires_grad_(True)
                torch.autograd.backward(ctx.mlp.plain_forward(piece), grad[i:i + ctx.chunk])
                grad_x[i:i + ctx.chunk] = piece.grad
        return None, None, grad_x.view(x.shape)
