"""What is alive at a training step's memory peak, on the meta device (no GPU, no memory): lorafit's real model,
LoRA and loss code on a random-free model of a real shape, with the CUDA kernels' stand-ins of the planner's trace.
It runs the long-context settings the planner's arithmetic does not model: offloaded checkpoints (their host
copies are not counted; each load allocates the layer input again, as the GPU copy does) and the tiled MLP;
`lorafit plan` and `--gpu-memory` trace them the same way (plan/fit.long_rows) when a row fits no other way.

    python bench/trace_peak.py qwen2.5-7b 65536 [--batch 1] [--offload] [--mlp-chunk 8192] [--top 15]

Prints the weights' bytes, the step's peak over them, and the largest groups of live
tensors at that moment (op, shape, count). LoRA gradients and optimizer states are not included (~0.2 GiB at 7B).
Found with it: an offloaded checkpoint's no-grad forward ran the MLP untiled (7 GiB at 7B x 65,536 tokens).
"""

from __future__ import annotations

import argparse
import collections

import torch

GIB = 2**30


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    parser.add_argument("seq", type=int)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--offload", action="store_true")
    parser.add_argument("--mlp-chunk", type=int, default=0)
    parser.add_argument("--top", type=int, default=15)
    args = parser.parse_args()
    from lorafit.plan.memory import Run, blk
    from lorafit.plan.presets import shape_from_preset
    from lorafit.plan.trace import LiveBytes, _loss_sum, cuda_kernels, host_offload, meta_model

    shape = shape_from_preset(args.model)
    cpu_table = not shape.tied  # model.embeddings_on_cpu (auto) on one GPU
    model = meta_model(shape, Run("qlora", args.seq, args.batch, True, embeddings_on_cpu=cpu_table))
    model.gradient_checkpointing, model.offload_checkpoints = True, args.offload
    for layer in model.model.layers:
        layer.mlp.chunk_tokens = args.mlp_chunk
    model.train()
    tracker = LiveBytes(labelled=True)
    for t in list(model.parameters()) + list(model.buffers()):  # counted below as weights (or not on the GPU)
        tracker.seen[t.untyped_storage()] = -1
    weights = sum(blk(t.numel() * t.element_size()) for name, t in model.named_parameters()
                  if not (cpu_table and "embed_tokens" in name))
    B, T = args.batch, args.seq
    with cuda_kernels(), host_offload(), tracker:
        ids = torch.zeros(B, T, dtype=torch.long, device="meta")
        positions = torch.arange(T, device="meta").expand(B, T).contiguous()
        embeds = torch.empty(B, T, shape.hidden, dtype=torch.bfloat16, device="meta")
        hidden = model(ids, position_ids=positions, inputs_embeds=embeds)
        loss = _loss_sum(model, hidden, torch.zeros_like(ids), B * (T - 1))
        del hidden  # as the training loop does before the backward
        (loss / 100).backward()
    print(f"{args.model} {B} x {T}, offload {args.offload}, mlp chunk {args.mlp_chunk}: weights {weights / GIB:.2f} "
          f"GiB + step peak {tracker.peak / GIB:.2f} GiB = {(weights + tracker.peak) / GIB:.2f} GiB allocated")
    groups, counts = collections.Counter(), collections.Counter()
    for size, (op, shape_) in tracker.at_peak.values():
        groups[(op, shape_)] += size
        counts[(op, shape_)] += 1
    for (op, shape_), size in groups.most_common(args.top):
        print(f"  {size / GIB:7.3f} GiB  x{counts[(op, shape_)]:<4d} {op} {shape_}")


if __name__ == "__main__":
    main()
