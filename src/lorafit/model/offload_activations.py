"""Decoder layers whose saved activations wait in pinned CPU memory, neither recomputed nor kept on the GPU.

With checkpointing every layer runs its forward twice: a third of a step's matmuls at Qwen2.5-7B. Keeping a layer's
activations instead (config kept_layers) costs GPU memory: 111 KB per token per layer at 7B. This is the third way:
a layer runs as usual, but each tensor it saves for backward goes to pinned host memory, copied on a side stream
while the following layers compute, and comes back on that stream one layer ahead of the backward that needs it.
The copies run on the GPU's copy engines, so a layer costs no time as long as its copies take no longer than the
compute they overlap (PCIe: 25-55 GB/s each way); GPU memory holds only the copies in flight. That bounds what it
can win: a layer's saved bytes take ~4x longer to cross PCIe each way than its forward takes to recompute (7B: 111
KB/token at ~40 GB/s vs ~0.7 us/token of matmuls), so only the few layers whose copies fit in the compute around
them pay. Measured on the H100 at Qwen2.5-7B 4 x 2048 with 12 layers offloaded: 7.5% slower than recomputing them
(BENCHMARKS.md, session 5). Experimental; the planner does not choose it.

Config `offload_activations: N` (with gradient checkpointing): the first N layers. Their backward comes last, which
leaves their copies to the host the whole rest of the forward, and the copies back the backward of every later layer.
Tensors under 1 MiB stay on the GPU (LoRA middles, log-sum-exps), as do the ones every layer shares (rope tables,
masks: `keep`). A storage saved through several views (the norm output that q, k and v's LoRA save) moves once.
On the CPU the same bookkeeping runs with plain copies, which is what the tests compare against no offloading.
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass

import torch

MIN_BYTES = 2**20


@dataclass(frozen=True)
class _Offloaded:
    """A saved tensor whose storage went to the host: enough to view it again once the storage is back."""

    layer: int
    key: int  # the storage's device address at save time
    dtype: torch.dtype
    offset: int
    size: torch.Size
    stride: tuple[int, ...]


def _bytes_of(storage: torch.UntypedStorage) -> torch.Tensor:
    return torch.empty(0, dtype=torch.uint8, device=storage.device).set_(storage)


class ActivationOffload:
    def __init__(self, device: torch.device):
        self.device = device
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self.kept: set[int] = set()
        self.host: dict[int, dict[int, tuple[torch.Tensor, torch.cuda.Event | None]]] = {}
        self.back: dict[int, dict[int, list]] = {}  # layer -> key -> [device bytes, arrival event, waited]
        self.alive: list[torch.UntypedStorage] = []
        self.current: int | None = None  # the layer whose backward is running

    def keep(self, *tensors: torch.Tensor | None) -> None:
        """Tensors that every layer shares: saved as they are, never copied."""
        self.kept.update(t.untyped_storage().data_ptr() for t in tensors if isinstance(t, torch.Tensor))

    @contextlib.contextmanager
    def layer(self, i: int):
        """Run layer `i`'s forward inside: what it saves for backward is offloaded."""
        self.host[i] = {}
        self.alive = []  # till the layer ends, so that no other storage can take a saved one's address (its key)
        try:
            with torch.autograd.graph.saved_tensors_hooks(functools.partial(self._pack, i), self._unpack):
                yield
        finally:
            self.alive = []

    def _pack(self, layer: int, t: torch.Tensor):
        storage = t.untyped_storage()
        if (t.device != self.device or isinstance(t, torch.nn.Parameter) or storage.nbytes() < MIN_BYTES
                or storage.data_ptr() in self.kept):
            return t
        key = storage.data_ptr()
        if key not in self.host[layer]:
            self.host[layer][key] = self._to_host(storage)
            self.alive.append(storage)
        return _Offloaded(layer, key, t.dtype, t.storage_offset(), t.size(), t.stride())

    def _to_host(self, storage: torch.UntypedStorage) -> tuple[torch.Tensor, torch.cuda.Event | None]:
        source = _bytes_of(storage)
        if self.stream is None:
            return source.clone(), None
        self.stream.wait_stream(torch.cuda.current_stream(self.device))  # the values as computed so far
        with torch.cuda.stream(self.stream):
            host = torch.empty(source.shape, dtype=torch.uint8, pin_memory=True)
            host.copy_(source, non_blocking=True)
            copied = torch.cuda.Event()
            copied.record(self.stream)
        source.record_stream(self.stream)  # the allocator must not hand the block out before the copy has read it
        return host, copied

    def _to_device(self, layer: int) -> dict[int, list]:
        back = {}
        for key, (host, copied) in self.host.pop(layer).items():
            if self.stream is None:
                back[key] = [host.clone(), None, True]
                continue
            # allocated for the compute stream (no separate pool for the side stream), so the copy into it waits
            # until that stream is done with the block's earlier tenant: up to here, i.e. from the start of the
            # backward of the layer after, which it overlaps
            device_bytes = torch.empty(host.shape, dtype=torch.uint8, device=self.device)
            self.stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(self.stream):
                self.stream.wait_event(copied)
                device_bytes.copy_(host, non_blocking=True)
                arrived = torch.cuda.Event()
                arrived.record(self.stream)
            device_bytes.record_stream(self.stream)
            back[key] = [device_bytes, arrived, False]
        return back

    def bring_back(self, layer: int) -> None:
        """Start copying `layer`'s activations back (if still on the host), to overlap the backward in progress."""
        if layer in self.host:
            self.back[layer] = self._to_device(layer)

    def bring_back_on_gradient(self, x: torch.Tensor, layer: int) -> None:
        """When x's gradient arrives (x: the output of the layer after `layer`, whose backward then begins), bring
        `layer` back, so even the first offloaded layer of the backward finds its activations there."""
        if x.requires_grad:
            x.register_hook(lambda grad: self.bring_back(layer))

    def _unpack(self, saved):
        if not isinstance(saved, _Offloaded):
            return saved
        layer = saved.layer
        if layer != self.current:  # the backward has reached this layer: the one after it is done
            self.back.pop(self.current, None)
            self.current = layer
            self.bring_back(layer)  # unless it came back already
            self.bring_back(layer - 1)  # the layer before comes back while this one computes
        entry = self.back[layer][saved.key]
        if not entry[2]:
            torch.cuda.current_stream(self.device).wait_event(entry[1])
            entry[2] = True
        storage = entry[0].untyped_storage()
        return torch.empty(0, dtype=saved.dtype, device=entry[0].device).set_(storage, saved.offset, saved.size,
                                                                                saved.stride)
