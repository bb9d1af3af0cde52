r"""Layer streaming: train a QLoRA model whose 4-bit base does not fit the GPU, its decoder layers kept in CPU memory.

The first K decoder layers stay on the GPU; the NF4 tensors of every later layer live in one pinned CPU buffer per
layer and are copied into one of two GPU slot buffers just before the layer runs. Everything else (LoRA A/B and
their optimizer states, norms, biases, embeddings, the head, activations) stays on the GPU: per step only the
frozen 4-bit weights cross PCIe.

Schedule, for streamed layers i = K..L-1 (layer i always uses slot (i - K) % 2, so consecutive layers alternate):

    forward (and forward-only passes)    before layer i runs: wait for i's copy, start copying i+1 into the other slot
    backward (checkpointed or not)       when dL/d(output of i) is ready: wait for i, start copying i-1
    checkpoint recomputation of i        runs inside i's backward, on the copy already there

Copies run on a side CUDA stream: before a copy overwrites a slot, the side stream waits on an event recorded on
the compute stream after the slot's previous user was enqueued, and the compute stream waits on the copy's event
before the layer that needs it. The slots are owned here (allocated once), so the caching allocator never hands
their memory to anything else. A layer already in its slot is not copied again: at the turn from forward to
backward the last two layers are still there, and so are the first two at the turn to the next step's forward,
so a steady step copies 2 (L - K) - 4 layers, with or without checkpointing.

A streamed layer's NF4 tensors are bound to views of its slot only while it is there; otherwise `packed` is a
1-byte placeholder on the GPU (so `parameters()` still names the device) and the other tensors are meta, so a
forward that bypassed the hooks fails loudly instead of computing with another layer's weights. On the CPU (tests)
host and device are both the CPU and the copies are synchronous, but the schedule is the same.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
from torch import nn

from lorafit.model.quantize import NF4_TENSORS, is_nf4

ALIGN = 64  # bytes: every tensor in a layer's buffer starts aligned, so fp32 constants view the uint8 buffer


@dataclass
class _Piece:
    module: nn.Module
    name: str
    offset: int
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n * self.dtype.itemsize


def _pinned(nbytes: int) -> torch.Tensor:
    """A uint8 CPU buffer the GPU copies from asynchronously. Registered in place (cudaHostRegister) rather than
    taken from PyTorch's pinned allocator, which rounds every block up to a power of two (a 70B layer's 421 MiB
    would take 512 MiB)."""
    buffer = torch.empty(nbytes, dtype=torch.uint8)
    if not torch.cuda.is_available() or not nbytes:
        return buffer
    cudart = torch.cuda.cudart()
    if int(cudart.cudaHostRegister(buffer.data_ptr(), nbytes, 0)) != 0:  # 0: cudaSuccess
        return buffer.pin_memory()
    weakref.finalize(buffer, cudart.cudaHostUnregister, buffer.data_ptr())
    return buffer


class LayerStreamer:
    """Streams the NF4 weights of decoder layers `resident..` from CPU memory; see the module docstring.

    `fetches` and `bytes_copied` count the copies (what the planner predicts); with `timing` each CUDA copy is
    bracketed by events (`copy_seconds()`); `skip_copies` leaves the slots as they are (compute-only timing:
    wrong weights, same work).
    """

    def __init__(self, model: nn.Module, device: torch.device | str, resident: int):
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        layers = model.model.layers
        self.first = max(0, min(resident, len(layers)))
        self.streamed = range(self.first, len(layers))
        self.layers = layers
        self.stub = torch.zeros(1, dtype=torch.uint8, device=self.device)  # what an absent layer's `packed` views
        self.layout: dict[int, list[_Piece]] = {}
        self.host: dict[int, torch.Tensor] = {}
        for i in self.streamed:
            self._offload(i)
        largest = max((self.host[i].numel() for i in self.streamed), default=0)
        self.slots = [torch.empty(largest, dtype=torch.uint8, device=self.device)
                      for _ in range(min(2, len(self.streamed)))]
        self.slot_layer: list[int | None] = [None] * len(self.slots)
        self.ready: list[torch.cuda.Event | None] = [None] * len(self.slots)
        self.copy_stream = torch.cuda.Stream(self.device) if self.cuda else None
        self.fetches = self.bytes_copied = 0
        self.timing, self.skip_copies = False, False
        self.copy_events: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []
        self.handles = []
        for i in self.streamed:
            layer = layers[i]
            self.handles.append(layer.register_forward_pre_hook(lambda m, args, i=i: self._before_forward(i)))
            self.handles.append(layer.register_forward_hook(lambda m, args, out, i=i: self._after_forward(i, out)))

    # --- placement ---------------------------------------------------------------------------------------------

    def _offload(self, i: int) -> None:
        """Gather layer i's NF4 tensors into one pinned CPU buffer and unbind them from the modules."""
        pieces, offset = [], 0
        for module in self.layers[i].modules():
            if not is_nf4(module):
                continue
            for name in NF4_TENSORS:
                t = getattr(module, name)
                pieces.append(_Piece(module, name, offset, tuple(t.shape), t.dtype))
                offset += -(-pieces[-1].nbytes // ALIGN) * ALIGN
        host = _pinned(offset)
        for piece in pieces:
            t = getattr(piece.module, piece.name)
            self._view(host, piece).copy_(t)
        self.layout[i], self.host[i] = pieces, host
        self._unbind(i)

    @staticmethod
    def _view(buffer: torch.Tensor, piece: _Piece) -> torch.Tensor:
        return buffer[piece.offset: piece.offset + piece.nbytes].view(piece.dtype).view(piece.shape)

    def _bind(self, i: int, slot: torch.Tensor) -> None:
        for piece in self.layout[i]:
            view = self._view(slot, piece)
            setattr(piece.module, piece.name, nn.Parameter(view, requires_grad=False) if piece.name == "packed"
                    else view)

    def _unbind(self, i: int) -> None:
        for piece in self.layout[i]:
            if piece.name == "packed":
                piece.module.packed = nn.Parameter(self.stub.expand(piece.shape), requires_grad=False)
            else:
                setattr(piece.module, piece.name, torch.empty(piece.shape, dtype=piece.dtype, device="meta"))

    # --- schedule ----------------------------------------------------------------------------------------------

    def _slot(self, i: int) -> int:
        return (i - self.first) % len(self.slots)

    def fetch(self, i: int) -> None:
        """Start copying layer i into its slot (no-op if it is not streamed or already there)."""
        if i not in self.streamed:
            return
        s = self._slot(i)
        if self.slot_layer[s] == i:
            return
        if self.slot_layer[s] is not None:
            self._unbind(self.slot_layer[s])
        host, slot = self.host[i], self.slots[s][: self.host[i].numel()]
        if self.cuda:
            compute = torch.cuda.current_stream(self.device)
            freed = compute.record_event()  # everything that read this slot so far is enqueued before it
            with torch.cuda.stream(self.copy_stream):
                self.copy_stream.wait_event(freed)
                start = torch.cuda.Event(enable_timing=True) if self.timing else None
                if start is not None:
                    start.record()
                if not self.skip_copies:
                    slot.copy_(host, non_blocking=True)
                self.ready[s] = self.copy_stream.record_event(torch.cuda.Event(enable_timing=self.timing))
                if start is not None:
                    self.copy_events.append((start, self.ready[s]))
        elif not self.skip_copies:
            slot.copy_(host)
        self.slot_layer[s] = i
        self._bind(i, self.slots[s])
        self.fetches += 1
        self.bytes_copied += host.numel()

    def use(self, i: int) -> None:
        """Make layer i's weights usable by the work enqueued next on the current stream."""
        self.fetch(i)
        s = self._slot(i)
        if self.cuda and self.ready[s] is not None:
            torch.cuda.current_stream(self.device).wait_event(self.ready[s])

    def _before_forward(self, i: int) -> None:
        self.use(i)
        # inside backward this is a checkpoint's recomputation: the layer to come is the previous one
        self.fetch(i - 1 if torch._C._current_graph_task_id() != -1 else i + 1)

    def _after_forward(self, i: int, out) -> None:
        recompute = torch._C._current_graph_task_id() != -1  # its output is never backpropagated through
        if isinstance(out, torch.Tensor) and out.requires_grad and not recompute:
            out.register_hook(lambda grad: self._before_backward(i))

    def _before_backward(self, i: int) -> None:
        self.use(i)
        self.fetch(i - 1)

    # --- reports -----------------------------------------------------------------------------------------------

    def layer_bytes(self) -> int:
        """Bytes of one streamed layer's NF4 tensors (the largest)."""
        return max((h.numel() for h in self.host.values()), default=0)

    def copy_seconds(self) -> float:
        """Time the timed copies took on the side stream (synchronizes), and forget them."""
        if not self.copy_events:
            return 0.0
        torch.cuda.synchronize(self.device)
        seconds = sum(a.elapsed_time(b) for a, b in self.copy_events) / 1e3
        self.copy_events.clear()
        return seconds

    def remove(self) -> None:
        """Detach the hooks (the streamed layers stay unbound until fetched by hand)."""
        for handle in self.handles:
            handle.remove()
        self.handles.clear()


def stream_layers(model: nn.Module, device: torch.device | str, resident: int) -> LayerStreamer:
    """Keep decoder layers `resident..` of an NF4 model in CPU memory and stream them to `device` as they run.

    Their NF4 tensors may be anywhere when this is called (load_model leaves them on the CPU); the rest of the
    model should already be on `device`.
    """
    return LayerStreamer(model, device, resident)
