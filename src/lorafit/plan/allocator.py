"""What PyTorch's CUDA caching allocator reserves around lorafit's allocations (max_memory_reserved).

The allocator never returns memory by itself: a freed block stays cached in its segment, and a later request reuses
it only if it fits (best fit, split when more than 1 MiB is left over). Reserved memory is therefore the sum of the
segments ever created: everything allocated at the peak, plus blocks freed earlier that the peak's requests could not
use. Segment sizes follow PyTorch's CUDACachingAllocator.cpp: requests up to 1 MiB share 2 MiB segments, requests
up to 10 MiB share 20 MiB segments, larger ones get a segment of their own rounded up to 2 MiB.

For a lorafit step the cached-but-useless blocks are (checked by replaying the allocator on `plan.trace`):
- the loss chunk's segments: bf16 logits [chunk, vocab] (freed before the three fp32 tensors of the peak exist, and
  too small for them), and, when the last chunk is shorter and its fp32 tensors round to a smaller segment, one more
  fp32 segment that the full chunks cannot use;
- the forward pass's temporaries of one decoder layer: [tokens, intermediate] tensors, of which about six are cached
  (four live at once at the LoRA add of up_proj; the allocator's best fit strands one or two more);
- rounding of the persistent tensors into segments, and, for QLoRA, the bf16 copy of the largest linear made while
  quantizing at load time.
During the layers' backward the free loss segments are split for the MLP's gradients, so a peak there reserves the
larger of the two working sets.
"""

from __future__ import annotations

from lorafit.plan.memory import LOSS_CHUNK_TOKENS, Estimate, Run, blk, stream_layer_bytes, stream_slots
from lorafit.plan.presets import Shape

MIB = 2**20
SMALL, LARGE_MIN, SEG_SMALL, SEG_MID, ROUND = MIB, 10 * MIB, 2 * MIB, 20 * MIB, 2 * MIB
# Cached forward temporaries of one layer, in [tokens, intermediate] bf16 tensors: fitted to allocator replays of
# lorafit's step on Qwen2.5 0.5B/1.5B at 1k-16k tokens per micro-batch (4.4-6.3 with checkpointing; without it the
# saved activations take most freed blocks over: 1.2-5, mostly ~3).
FORWARD_CACHED = {True: 5.0, False: 3.0}


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


def reserved(shape: Shape, run: Run, est: Estimate) -> int:
    """Predicted torch.cuda.max_memory_reserved of the step, from the allocated estimate and the segments above."""
    M, N, V, inter = run.tokens, run.target_tokens, shape.vocab, shape.intermediate
    C = min(N, LOSS_CHUNK_TOKENS)
    chunks = -(-N // LOSS_CHUNK_TOKENS)
    last = N - (chunks - 1) * LOSS_CHUNK_TOKENS
    fp32_chunk = segment(4 * C * V)
    loss_segments = segment(2 * C * V) + 3 * fp32_chunk
    if chunks > 1 and segment(4 * last * V) < fp32_chunk:
        loss_segments += segment(4 * last * V)
    sizes = persistent_sizes(shape, run)
    slack = max(0, packed(sizes) - sum(blk(s) for s in sizes))
    loss_alloc = est.moments["loss"] - 3 * blk(4 * C * V)  # the loss moment without its three fp32 chunk tensors
    forward = FORWARD_CACHED[run.checkpointing] * segment(2 * inter * M)
    if run.method == "qlora":  # the bf16 copy of the largest linear made while quantizing, unless reused later
        slack += max(0, segment(2 * max(i * o for _, i, o, _ in shape.linears())) - forward)
    at_loss = loss_alloc + slack + forward + loss_segments
    # the layers' backward splits the free loss and forward segments for its gradients; when it needs more than they
    # hold, the bf16-logits segment and the short last chunk's segment stay stranded on top of it
    stranded = loss_segments - 3 * fp32_chunk
    at_layer = est.moments["layer"] + slack + stranded
    return int(max(at_loss, at_layer, est.allocated))
