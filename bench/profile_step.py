"""Where a QLoRA training step's GPU time goes, next to the matmul floor it could reach.

    python bench/profile_step.py qwen2.5-1.5b 1024 16 [--no-checkpointing] [--kept-layers N] [--steps 3]

Builds the random checkpoint of bench/bench_train.py, runs lorafit's model, LoRA and loss code for a few warm-up
steps, profiles the next ones, and prints: the step time; the CUDA time by kernel family (GEMM, NF4 dequantize,
attention, elementwise, reductions...) and the top kernels; the measured bf16 matmul rate; and the time the step's
matmuls alone take on dense bf16 weights (forward, recomputation, input gradient and the LoRA products), which
is the floor every lever is measured against.
"""

from __future__ import annotations

import argparse
import collections
import json
import time

import torch
from bench.bench_train import make_checkpoint


def matmul_rate(n: int = 8192, reps: int = 20) -> float:
    a, b = (torch.randn(n, n, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    torch.cuda.synchronize()
    return 2 * n**3 * reps / (time.perf_counter() - t)


def timed(fn, reps: int = 5) -> float:
    fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / reps


def matmul_floor(model, tokens: int, checkpointing: bool) -> float:
    """Seconds of the step's linear-layer matmuls on dense bf16 weights (no dequantization, no LoRA)."""
    from lorafit.model.lora import LoRALinear

    total, shapes = 0.0, collections.Counter()
    for m in model.modules():
        if isinstance(m, LoRALinear):
            shapes[(m.in_features, m.out_features)] += 1
    x_cache = {}
    for (k, n), count in shapes.items():
        x = x_cache.setdefault(k, torch.randn(tokens, k, device="cuda", dtype=torch.bfloat16))
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
        g = torch.randn(tokens, n, device="cuda", dtype=torch.bfloat16)
        fwd = timed(lambda x=x, w=w: x @ w.t())
        bwd = timed(lambda g=g, w=w: g @ w)
        total += count * ((2 if checkpointing else 1) * fwd + bwd)
    return total


def kernel_family(name: str) -> str:
    n = name.lower()
    for key, family in (("gemm", "gemm"), ("cutlass", "gemm"), ("sm90", "gemm"), ("nvjet", "gemm"),
                        ("flash", "attention"), ("fmha", "attention"), ("attention", "attention"),
                        ("dequant", "nf4 dequantize"), ("nf4_to_fp8", "nf4 dequantize"),
                        ("quantize", "fp8 rows"), ("triton_", "triton fused"),
                        ("reduce", "reduction"), ("softmax", "softmax/loss"), ("nll", "softmax/loss"),
                        ("cross_entropy", "softmax/loss"), ("copy", "copy/cast"), ("cat", "copy/cast"),
                        ("elementwise", "elementwise"), ("vectorized", "elementwise"), ("optimizer", "optimizer"),
                        ("adam", "optimizer"), ("memset", "memset"), ("index", "index/gather")):
        if key in n:
            return family
    return "other"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    parser.add_argument("seq", type=int)
    parser.add_argument("batch", type=int)
    parser.add_argument("--no-checkpointing", action="store_true")
    parser.add_argument("--kept-layers", type=int, default=0, help="with checkpointing: the last N layers keep "
                        "their activations (config kept_layers)")
    parser.add_argument("--fp8", action="store_true", help="the frozen base's matmuls in e4m3 (model.fp8_base)")
    parser.add_argument("--per-tensor", action="store_true", help="the optimizer steps each adapter tensor on its "
                        "own (before train/flat.py)")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args()
    from lorafit.config import LoraConfig
    from lorafit.model.load import load_model
    from lorafit.model.lora import apply_lora
    from lorafit.train.flat import flatten
    from lorafit.train.loss import target_loss_sum
    from lorafit.train.optim import build_optimizer

    model = load_model(str(make_checkpoint(args.model)), torch.device("cuda"), torch.bfloat16, quantize=True).model
    apply_lora(model, LoraConfig(r=16, alpha=32, dropout=0.0))
    if args.fp8:
        from lorafit.model.quantize import use_fp8_base

        use_fp8_base(model)
    model.gradient_checkpointing = not args.no_checkpointing
    model.kept_layers = args.kept_layers
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    flat = None if args.per_tensor else flatten(trainable)  # as train() does
    stepped = [flat.param] if flat is not None else trainable
    optimizer = build_optimizer(stepped, "paged_adamw_8bit", 2e-4, 0.0, torch.device("cuda"))
    ids = torch.randint(0, 256, (args.batch, args.seq), device="cuda")

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss, count = target_loss_sum(model, model(ids), ids)
        (loss / count).backward()
        torch.nn.utils.clip_grad_norm_(stepped, 1.0)
        optimizer.step()
        flat.zero_grad() if flat is not None else optimizer.zero_grad(set_to_none=True)

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(args.steps):
        step()
    torch.cuda.synchronize()
    step_s = (time.perf_counter() - t) / args.steps
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        step()
        torch.cuda.synchronize()
    families: dict[str, float] = collections.Counter()
    kernels = []
    for evt in prof.key_averages():
        us = evt.device_time_total if hasattr(evt, "device_time_total") else evt.cuda_time_total
        if us <= 0 or evt.key.startswith("cuda") or evt.device_type != torch.autograd.DeviceType.CUDA:
            continue
        families[kernel_family(evt.key)] += us
        kernels.append((us, evt.count, evt.key[:110]))
    gpu_s = sum(families.values()) / 1e6
    rate = matmul_rate()
    floor = matmul_floor(model, args.batch * args.seq, not args.no_checkpointing)
    tokens = args.batch * args.seq
    print(f"step {step_s * 1e3:.0f} ms ({tokens / step_s:,.0f} tok/s); GPU kernel time {gpu_s * 1e3:.0f} ms "
          f"(the GPU idles {max(0.0, 1 - gpu_s / step_s):.0%} of the step); "
          f"bf16 matmul rate {rate / 1e12:.0f} TFLOP/s; dense matmul floor {floor * 1e3:.0f} ms; "
          f"peak {torch.cuda.max_memory_allocated() / 2**30:.2f} GB")
    for family, us in sorted(families.items(), key=lambda x: -x[1]):
        print(f"  {family:16s} {us / 1e3:8.1f} ms  {us / 1e4 / gpu_s:5.1f}%")
    for us, count, key in sorted(kernels, reverse=True)[: args.top]:
        print(f"  {us / 1e3:8.2f} ms  x{count:<5d} {key}")
    cpu = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:12]
    print("  CPU self time: " + ", ".join(f"{e.key[:40]} {e.self_cpu_time_total / 1e3:.0f} ms x{e.count}" for e in cpu))
    print("PROFILE", json.dumps(dict(model=args.model, seq=args.seq, bs=args.batch, fp8=args.fp8,
                                     step_ms=round(step_s * 1e3),
                                     tok_s=round(tokens / step_s), gpu_ms=round(gpu_s * 1e3),
                                     floor_ms=round(floor * 1e3), matmul_tflops=round(rate / 1e12),
                                     families={k: round(v / 1e3, 1) for k, v in families.items()})), flush=True)


if __name__ == "__main__":
    main()
