"""Layer streaming on the GPU: a Llama-3-70B-shaped QLoRA model trained under a 24 GB (or 16 GB) allocator cap.

    python bench/bench_stream.py llama3.1-70b --gpu 24GB            # direct: build in memory, time the split
    python bench/bench_stream.py llama3.1-70b --gpu 16GB
    python bench/bench_stream.py qwen2.5-32b --gpu 16GB
    python bench/bench_stream.py llama3.1-70b --gpu 24GB --via-train /tmp/models/llama3.1-70b-nf4   # end to end

Direct mode builds the model without any 16-bit checkpoint: on the meta device from the preset's shape, then each
decoder linear from a random bf16 matrix (std 0.02) quantized on the GPU one at a time, its NF4 tensors moved to
CPU memory when the layer is streamed (peak: one bf16 matrix). The planner (plan/stream.py) picks the resident
layers for the budget; the run trains QLoRA r=16 on all linears, paged AdamW 8-bit, checkpointing, seq 2048 x 1,
with the allocator capped as `lorafit train --gpu-memory` caps it, and prints `RESULT {json}` lines:
- `stream`: step time and tokens/s (median of the measured steps), copies per step, the time the copies took on
  the side stream (CUDA events), peak GPU allocated/reserved, host RSS, and the planner's prediction;
- `compute_only`: the same steps with the copies skipped (stale weights, same work): the step's compute alone, so
  step_s - compute_only.step_s is the copy time left exposed by the overlap;
- `copy_only`: every streamed layer copied back to back with no compute: the pinned host-to-device bandwidth.
`--via-train DIR` writes the model once in the pre-quantized format (lorafit quantize's layout, ~40 GB for 70B)
and runs lorafit's real `train()` on it with --gpu-memory, so the planner, the loader and the loop choose and do
the streaming; it prints one `RESULT` line with the loop's tokens/s. Expected: 70B direct about 2 minutes on an
H100 host (build ~1 minute), --via-train 5-7 minutes (writing and reading ~40 GB).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "src"), str(ROOT)]  # `python bench/bench_stream.py` from anywhere: lorafit and bench

from bench.bench_train import save_small_tokenizer  # noqa: E402

GIB = 2**30


def host_rss_gb() -> tuple[float, float]:
    """(current, peak) resident memory of this process."""
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    return int(fields["VmRSS"].split()[0]) / 2**20, int(fields["VmHWM"].split()[0]) / 2**20


def choose_resident(name: str, budget: int, seq: int) -> tuple[int, dict]:
    from lorafit.plan.memory import Run
    from lorafit.plan.presets import Card, shape_from_preset
    from lorafit.plan.stream import most_resident, stream_time

    shape = shape_from_preset(name)
    run = Run("qlora", seq, 1, True)
    card = Card("cap", "cap", budget, "sm90", context_bytes=0)
    k = most_resident(shape, run, card)
    if k is None:
        raise SystemExit(f"{name} does not fit {budget / GIB:.1f} GiB even with every layer streamed")
    t = stream_time(shape, run, k)
    return k, {"step_s": round(t.step_s, 3), "compute_s": round(t.compute_s, 3), "copy_s": round(t.copy_s, 3)}


def build_random_nf4(name: str, resident: int, device: torch.device, save: Path | None = None):
    """A random NF4 model of the preset's shape; layers `resident..` get their NF4 tensors in CPU memory. With
    `save`, also written as a pre-quantized folder (one shard per decoder layer)."""
    from safetensors.torch import save_file

    from lorafit.model.llama import CausalLM, ModelArgs
    from lorafit.model.load import NF4_MARKER, QUANTIZATION_KEY, layer_index
    from lorafit.model.quantize import NF4_TENSORS, NF4Linear, is_quantizable
    from lorafit.plan.presets import hf_config

    cfg = hf_config(name)
    args = ModelArgs.from_hf(cfg)
    with torch.device("meta"):
        model = CausalLM(args, cfg)
    torch.manual_seed(0)
    shard: dict[str, torch.Tensor] = {}
    index: dict[str, str] = {}

    def emit(key: str, tensor: torch.Tensor):
        if save is not None:
            shard[key] = tensor.detach().cpu().contiguous()

    linears = [(n, m) for n, m in model.named_modules() if is_quantizable(n, m)]
    for k, (module_name, module) in enumerate(linears):
        weight = torch.randn(module.out_features, module.in_features, dtype=torch.bfloat16, device=device) * 0.02
        linear = torch.nn.Linear(module.in_features, module.out_features, bias=False, device="meta")
        linear.weight = torch.nn.Parameter(weight, requires_grad=False)
        nf4 = NF4Linear.from_linear(linear, device, torch.bfloat16)
        del linear, weight
        if module.bias is not None:
            nf4.bias = torch.nn.Parameter(torch.zeros(module.out_features, dtype=torch.bfloat16, device=device),
                                          requires_grad=False)
            emit(f"{module_name}.bias", nf4.bias)
        layer = layer_index(module_name)
        for tensor_name in NF4_TENSORS:
            emit(f"{module_name}.{tensor_name}", getattr(nf4, tensor_name))
            if layer >= resident:
                value = getattr(nf4, tensor_name).cpu()
                setattr(nf4, tensor_name, torch.nn.Parameter(value, requires_grad=False)
                        if tensor_name == "packed" else value)
        parent, _, child = module_name.rpartition(".")
        setattr(model.get_submodule(parent), child, nf4)
        last_of_layer = k + 1 == len(linears) or layer_index(linears[k + 1][0]) != layer
        if save is not None and last_of_layer:
            file = f"model-layer{layer:03d}.safetensors"
            save.mkdir(parents=True, exist_ok=True)
            save_file(shard, str(save / file), metadata={"format": "pt"})
            index.update(dict.fromkeys(shard, file))
            shard.clear()
    for key, p in list(model.named_parameters()):  # embeddings, head, norms: bf16 on the GPU
        if not p.is_meta:
            continue
        module_name, _, leaf = key.rpartition(".")
        if "norm" in module_name:
            value = torch.ones(p.shape, dtype=torch.bfloat16, device=device)
        else:
            value = torch.randn(p.shape, dtype=torch.bfloat16, device=device) * 0.02
        module = model.get_submodule(module_name)
        module._parameters[leaf] = torch.nn.Parameter(value, requires_grad=False)
        emit(key, value)
    if args.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.model.rotary_emb.inv_freq = model.model.rotary_emb.inv_freq.to(device)
    if save is not None:
        save_file(shard, str(save / "model-rest.safetensors"), metadata={"format": "pt"})
        index.update(dict.fromkeys(shard, "model-rest.safetensors"))
        (save / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": index}))
        config = {**cfg.to_dict(), QUANTIZATION_KEY: {**NF4_MARKER, "compute_dtype": "bfloat16", "source": "random"}}
        (save / "config.json").write_text(json.dumps(config, indent=2))
        save_small_tokenizer(save)
        (save / "done").write_text("1")
    return model


def train_steps(model, optimizer, trainable, vocab: int, seq: int, steps: int, streamer=None) -> list[dict]:
    from lorafit.train.loss import target_loss_sum

    out = []
    for _ in range(steps):
        ids = torch.randint(0, vocab, (1, seq), device="cuda")
        fetches, copied = (streamer.fetches, streamer.bytes_copied) if streamer else (0, 0)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            hidden = model(ids)
            loss, count = target_loss_sum(model, hidden, ids)
        (loss / count).backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        row = {"step_s": time.perf_counter() - t0, "loss": float(loss.detach()) / count}
        if streamer:
            row.update(fetches=streamer.fetches - fetches, bytes=streamer.bytes_copied - copied,
                       copy_s=streamer.copy_seconds())
        out.append(row)
        del hidden, loss
    return out


def copy_only(streamer) -> dict:
    """Every streamed layer copied forward then backward, nothing else on the GPU: the pinned H2D bandwidth."""
    order = [*streamer.streamed, *reversed(streamer.streamed)]
    before = streamer.bytes_copied
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for i in order:
        streamer.use(i)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    streamer.copy_seconds()
    moved = streamer.bytes_copied - before
    return {"bytes": moved, "seconds": round(seconds, 3), "gb_per_s": round(moved / seconds / 1e9, 2)}


def direct(args, budget: int) -> None:
    from lorafit.config import LoraConfig
    from lorafit.model.lora import apply_lora
    from lorafit.model.stream import stream_layers
    from lorafit.train.optim import build_optimizer

    device = torch.device("cuda")
    resident, predicted = choose_resident(args.model, budget, args.seq)
    if args.resident is not None:
        resident = args.resident
    t0 = time.perf_counter()
    model = build_random_nf4(args.model, resident, device)
    streamer = stream_layers(model, device, resident)
    build_s = time.perf_counter() - t0
    apply_lora(model, LoraConfig(r=16, alpha=32))
    model.gradient_checkpointing = True
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_optimizer(trainable, "paged_adamw_8bit", 2e-4, 0.0, device)
    streamer.timing = True
    base = {"model": args.model, "gpu": args.gpu, "budget_gb": round(budget / GIB, 2), "seq": args.seq, "bs": 1,
            "layers": len(model.model.layers), "resident_layers": resident,
            "layer_mb": round(streamer.layer_bytes() / 2**20, 1),
            "pinned_gb": round(sum(h.numel() for h in streamer.host.values()) / GIB, 2), "build_s": round(build_s, 1)}
    status = "ok"
    try:
        rows = train_steps(model, optimizer, trainable, model.args.vocab_size, args.seq, args.steps + 1, streamer)
        measured = rows[1:]
        streamer.skip_copies = True
        compute = train_steps(model, optimizer, trainable, model.args.vocab_size, args.seq, 2, streamer)
        streamer.skip_copies = False
        copies = copy_only(streamer)
    except torch.OutOfMemoryError:
        status, measured, compute, copies = "out of memory", [], [], {}
    rss, peak_rss = host_rss_gb()
    memory = {"peak_alloc_gb": round(torch.cuda.max_memory_allocated() / GIB, 2),
              "peak_reserved_gb": round(torch.cuda.max_memory_reserved() / GIB, 2),
              "host_rss_gb": round(rss, 1), "host_peak_rss_gb": round(peak_rss, 1)}
    if not measured:
        print("RESULT", json.dumps({"bench": "stream", **base, "status": status, **memory}), flush=True)
        return
    step = statistics.median(r["step_s"] for r in measured)
    compute_step = statistics.median(r["step_s"] for r in compute[1:] or compute)
    print("RESULT", json.dumps({
        "bench": "stream", **base, "status": status, "step_s": round(step, 3), "tok_s": round(args.seq / step),
        "fetches_per_step": measured[-1]["fetches"], "streamed_gb_per_step": round(measured[-1]["bytes"] / 1e9, 2),
        "copy_s_per_step": round(statistics.median(r["copy_s"] for r in measured), 3),
        "exposed_copy_s": round(step - compute_step, 3), "loss": round(measured[-1]["loss"], 3), **memory,
        "predicted": predicted, "steps": [round(r["step_s"], 3) for r in rows]}), flush=True)
    print("RESULT", json.dumps({"bench": "compute_only", **base, "step_s": round(compute_step, 3),
                                "tok_s": round(args.seq / compute_step)}), flush=True)
    print("RESULT", json.dumps({"bench": "copy_only", **base, **copies}), flush=True)


def via_train(args, budget: int) -> None:
    sys.path.insert(0, str(Path(__file__).parent))
    from bench_train import write_documents

    from lorafit.config import load_config
    from lorafit.train.loop import train
    from lorafit.train.progress import Progress

    folder = Path(args.via_train)
    t0 = time.perf_counter()
    if not (folder / "done").is_file():
        model = build_random_nf4(args.model, 0, torch.device("cuda"), save=folder)
        del model
        torch.cuda.empty_cache()
    build_s = time.perf_counter() - t0
    work = Path("/tmp/bench_stream")
    work.mkdir(parents=True, exist_ok=True)
    data = write_documents(work / f"docs_{args.seq}.jsonl", args.steps + 4, args.seq)
    cfg = load_config(overrides={
        "model": {"path": str(folder)}, "method": "qlora", "gpu_memory": args.gpu,
        "data": {"train": str(data), "format": "text", "max_length": args.seq, "packing": False},
        "lora": {"r": 16, "alpha": 32}, "eval": {"before_training": False}, "output_dir": str(work / "run"),
        "max_steps": args.steps, "micro_batch_size": 1, "optimizer": "paged_adamw_8bit", "warmup_ratio": 0.0})
    status, step_s = "ok", None
    try:
        result = train(cfg, Progress(live=False, quiet=not args.log))
        history = [r for r in result.history if "tokens_per_s" in r]
        step_s = statistics.median([r["tokens"] / r["tokens_per_s"] for r in history[2:] or history])
    except torch.OutOfMemoryError:
        status = "out of memory"
    rss, peak_rss = host_rss_gb()
    print("RESULT", json.dumps({
        "bench": "stream_train", "model": args.model, "gpu": args.gpu, "budget_gb": round(budget / GIB, 2),
        "seq": args.seq, "status": status, "build_and_save_s": round(build_s, 1),
        "step_s": round(step_s, 3) if step_s else None, "tok_s": round(args.seq / step_s) if step_s else None,
        "peak_alloc_gb": round(torch.cuda.max_memory_allocated() / GIB, 2),
        "peak_reserved_gb": round(torch.cuda.max_memory_reserved() / GIB, 2), "host_peak_rss_gb": round(peak_rss, 1),
        "disk_gb": round(sum(f.stat().st_size for f in folder.glob("*.safetensors")) / 1e9, 1)}), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model", help="plan preset: llama3.1-70b, qwen2.5-32b, ...")
    parser.add_argument("--gpu", default="24GB", help="budget as `lorafit train --gpu-memory` takes it")
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=3, help="measured steps (after one warm-up)")
    parser.add_argument("--resident", type=int, default=None, help="override the planner's resident layers")
    parser.add_argument("--via-train", default=None, help="folder for the pre-quantized model; run lorafit train()")
    parser.add_argument("--log", action="store_true")
    args = parser.parse_args()

    from lorafit.plan.presets import budget_bytes

    budget = budget_bytes(args.gpu)
    if args.via_train:
        via_train(args, budget)  # train() caps the allocator itself
        return
    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, budget / total))
    direct(args, budget)


if __name__ == "__main__":
    main()
