"""What PyTorch's CUDA caching allocator reserves around lorafit's allocations (max_memory_reserved).

The allocator never returns memory by itself: a freed block stays cached in its segment, and a later request reuses
it only if it fits (best fit, split when more than 1 MiB is left over). Reserved memory is therefore the sum of the
segments ever created: everything allocated at the peak, plus blocks freed earlier that the peak's requests could not
use. Segment sizes follow PyTorch's CUDACachingAllocator.cpp: requests up to 1 MiB share 2 MiB segments, requests
up to 10 MiB share 20 MiB segments, larger ones get a segment of their own rounded up to 2 MiB.

For a lorafit step the cached-but-useless blocks are (checked by replaying the allocator on `plan.trace`):
- the forward pass's temporaries of one decoder layer: with checkpointing nothing of a layer is kept, so its whole
  working set (gate, up and their product, [tokens, intermediate] each, the dequantized weights, the attention
  tensors) is freed and cached after every layer, and best fit strands more: about 5.5 [tokens, intermediate]
  tensors in all. Without checkpointing the saved activations take most freed blocks over: about 3;
- the saved activations of every layer without checkpointing: tensors of 1-10 MiB share 20 MiB segments, and what a
  segment cannot fit stays empty (0.5B at 4k tokens: [tokens, hidden] is 7 MiB, two per segment, 0.4 GiB lost);
- rounding of the persistent tensors into segments, and, for QLoRA, the bf16 copy of the largest linear made while
  quantizing at load time. QLoRA without checkpointing also strands part of every layer's dequantized MLP weight
  block when one saved [tokens, intermediate] tensor fits in it but two do not (tokens between half the hidden
  size and the hidden size): the tensor takes the freed block, and the next weight needs a new segment;
- full fine-tuning only: the recomputed fp32 loss chunks' segments (the frozen head's loss of LoRA/QLoRA holds one
  chunk of bf16 logits, counted as allocated).
The bf16 logits' segment and the forward's are reused by the layers' backward, so a peak there reserves its
allocation plus the slack above. Over 72 replays (Qwen2.5 0.5B/1.5B/7B, QLoRA/LoRA, checkpointing on/off, 512-16k
tokens) `reserved` is within 5.2% of the replay, mean 1.5%.
"""

from __future__ import annotations

import bisect

from lorafit.plan.memory import (
    LOSS_CHUNK_TOKENS,
    Estimate,
    Run,
    blk,
    layer_saved_per_token,
    layers_kept,
    product_free_mlp,
    stream_layer_bytes,
    stream_slots,
)
from lorafit.plan.presets import Shape

MIB = 2**20
SMALL, LARGE_MIN, SEG_SMALL, SEG_MID, ROUND = MIB, 10 * MIB, 2 * MIB, 20 * MIB, 2 * MIB
# Cached forward temporaries of one layer, in [tokens, intermediate] bf16 tensors: fitted to allocator replays of
# lorafit's step (Qwen2.5 0.5B/1.5B/7B, 512-16k tokens per micro-batch; see the module docstring).
FORWARD_CACHED = {True: 5.5, False: 3.0}


def segment(n: int) -> int:
    """Bytes of the segment a lone request of n bytes creates."""
    n = blk(n)
    if n <= SMALL:
        return SEG_SMALL
    if n < LARGE_MIN:
        return SEG_MID
    return -(-n // ROUND) * ROUND


def packed(sizes: list[int]) -> int:
    """Segments holding long-lived tensors allocated one after another: small ones share 2 MiB segments, mid-size
    ones 20 MiB segments (filled best-fit), large ones take their own rounded segment."""
    small = sum(blk(s) for s in sizes if blk(s) <= SMALL)
    mid = sorted((blk(s) for s in sizes if SMALL < blk(s) < LARGE_MIN), reverse=True)
    large = sum(segment(s) for s in sizes if blk(s) >= LARGE_MIN)
    free: list[int] = []
    segments = 0
    for s in mid:
        fits = [i for i, f in enumerate(free) if f >= s]
        if fits:
            i = min(fits, key=lambda j: free[j])
            free[i] -= s
        else:
            segments += 1
            free.append(SEG_MID - s)
    return -(-small // SEG_SMALL) * SEG_SMALL + segments * SEG_MID + large


def persistent_sizes(shape: Shape, run: Run) -> list[int]:
    """Sizes of the tensors loaded once (weights, constants, adapters), for segment packing."""
    sizes = []
    nf4_layers = shape.layers if run.resident_layers is None else min(shape.layers, run.resident_layers)
    sizes += [stream_layer_bytes(shape)] * (stream_slots(shape, run.resident_layers) if run.method == "qlora" else 0)
    for _, i, o, _ in shape.linears():
        n = i * o
        if run.method == "qlora":
            sizes += [-(-n // 2), -(-n // 64)] * nf4_layers
        else:
            sizes += [(4 if run.method == "full" else 2) * n] * shape.layers
        if run.method != "full" and _ in run.lora_targets:
            sizes += [4 * run.lora_r * i, 4 * run.lora_r * o] * shape.layers
    wb = 4 if run.method == "full" else 2
    sizes += [wb * shape.vocab * shape.hidden] * (1 if shape.tied else 2)
    return sizes


def activation_slack(shape: Shape, run: Run) -> int:
    """Without checkpointing, every layer's saved tensors stay alive to the backward: those of 1-10 MiB are packed
    into 20 MiB segments like the persistent tensors, and what a segment cannot fit is lost until the backward."""
    kept = layers_kept(shape, run)
    if not kept:
        return 0
    saved = layer_saved_per_token(shape, run, 2)
    sizes = [per_token * run.tokens for group in saved.values() for per_token in group]
    product = blk(2 * shape.intermediate * run.tokens)
    if product_free_mlp(run) and product >= LARGE_MIN:
        # each layer's MLP frees its SwiGLU product ([tokens, I]) in the forward: the allocator splits that block
        # for the next layer's mid-size saved tensors, largest first, and only the rest needs 20 MiB segments
        room, rest = product, []
        for size in sorted(sizes, key=blk, reverse=True):
            if SMALL < blk(size) < LARGE_MIN and blk(size) <= room:
                room -= blk(size)
            else:
                rest.append(size)
        sizes = rest
    sizes = sizes * kept
    return max(0, packed(sizes) - sum(blk(s) for s in sizes))


def reserved(shape: Shape, run: Run, est: Estimate) -> int:
    """Predicted torch.cuda.max_memory_reserved of the step, from the allocated estimate and the segments above.

    With validation data (`run.eval`) this is what the run needs under a cap: the validation loss's chunk segments
    are wholly free once it is done, and a capped allocator hands them back (an uncapped one keeps them: up to two
    fp32 [1024, vocab] segments more)."""
    M, inter = run.tokens, shape.intermediate
    sizes = persistent_sizes(shape, run)
    slack = max(0, packed(sizes) - sum(blk(s) for s in sizes)) + activation_slack(shape, run)
    kept = layers_kept(shape, run)
    forward = int(FORWARD_CACHED[kept < shape.layers] * blk(2 * inter * M))
    if run.method == "qlora":  # the bf16 copy of the largest linear made while quantizing, unless reused later
        w = blk(2 * max(i * o for _, i, o, _ in shape.linears()))
        slack += max(0, segment(w) - forward)
        u = blk(2 * inter * M)
        if kept and u < w < 2 * u:  # a saved [tokens, I] takes each kept layer's freed dequantized MLP weight
            slack += kept * (w - u)  # block and strands the rest: the next weight needs a new segment
    at_loss = est.moments["loss"] + slack + forward
    if run.method == "full":  # the recomputed fp32 loss chunks (train/loss.py): their segments, and the bf16 logits'
        N = run.target_tokens
        C, chunks = min(N, LOSS_CHUNK_TOKENS), -(-N // LOSS_CHUNK_TOKENS)
        last = N - (chunks - 1) * LOSS_CHUNK_TOKENS
        extra = segment(2 * C * shape.vocab) + (segment(4 * last * shape.vocab) if chunks > 1 and segment(
            4 * last * shape.vocab) < segment(4 * C * shape.vocab) else 0)
        at_loss += extra
    at_layer = est.moments["layer"] + slack
    return int(max(at_loss, at_layer, est.allocated))


# --- the allocator itself, to replay a traced step (plan.trace) ------------------------------------------------


class CachingAllocator:
    """PyTorch's CUDA caching allocator, one stream, no expandable segments: sizes, pools, best fit, split, merge."""

    def __init__(self, cap: int | None = None):
        self.pools: dict[bool, list] = {True: [], False: []}
        self.cap, self.serial = cap, 0
        self.allocated = self.reserved = self.peak_allocated = self.peak_reserved = 0
        self.created: list[int] = []  # sizes of the segments made (cudaMalloc), in order

    def _put(self, b: dict) -> None:
        bisect.insort(self.pools[b["small"]], (b["size"], b["id"], b))

    def _take(self, b: dict) -> None:
        pool = self.pools[b["small"]]
        pool.pop(bisect.bisect_left(pool, (b["size"], b["id"])))

    def malloc(self, size: int) -> dict:
        small = size <= SMALL
        pool = self.pools[small]
        i = bisect.bisect_left(pool, (size, -1))
        if i < len(pool):
            b = pool.pop(i)[2]
        else:
            seg = SEG_SMALL if small else SEG_MID if size < LARGE_MIN else segment(size)
            if self.cap is not None and self.reserved + seg > self.cap:  # free every wholly free segment, retry
                for s in (True, False):
                    for item in [x for x in self.pools[s] if x[2]["prev"] is None and x[2]["next"] is None]:
                        self._take(item[2])
                        self.reserved -= item[2]["size"]
                if self.reserved + seg > self.cap:
                    raise MemoryError(f"out of memory under a cap of {self.cap} bytes")
            self.serial += 1
            b = {"id": self.serial, "size": seg, "small": small, "prev": None, "next": None}
            self.reserved += seg
            self.peak_reserved = max(self.peak_reserved, self.reserved)
            self.created.append(seg)
        rest = b["size"] - size
        if rest >= 512 if small else rest > SMALL:
            self.serial += 1
            r = {"id": self.serial, "size": rest, "small": small, "prev": b, "next": b["next"]}
            if b["next"]:
                b["next"]["prev"] = r
            b["next"], b["size"] = r, size
            self._put(r)
        b["free"] = False
        self.allocated += b["size"]
        self.peak_allocated = max(self.peak_allocated, self.allocated)
        return b

    def free(self, b: dict) -> None:
        self.allocated -= b["size"]
        for side in ("prev", "next"):
            n = b[side]
            if n is not None and n.get("free", True) and n is not b:
                self._take(n)
                first, second = (n, b) if side == "prev" else (b, n)
                first["size"] += second["size"]
                first["next"] = second["next"]
                if second["next"]:
                    second["next"]["prev"] = first
                b = first
        b["free"] = True
        self._put(b)


def replay(trace, workspace: int = 64 * 2**20, cap: int | None = None) -> CachingAllocator:
    """Run a `plan.trace.Trace`'s allocations through the caching allocator (cuBLAS workspaces first); raises
    MemoryError when a cap is given and the allocator cannot stay under it."""
    alloc = CachingAllocator(cap)
    live = {"ws": alloc.malloc(workspace)} if workspace else {}
    for kind, key, size in trace.load + trace.step:
        if kind == "a":
            live[key] = alloc.malloc(size)
        elif key in live:
            alloc.free(live.pop(key))
    return alloc
