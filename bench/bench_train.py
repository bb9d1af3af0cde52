"""Training throughput and peak memory of lorafit's real `train()` path on random weights of real shapes.

    python bench/bench_train.py qwen2.5-1.5b 1024 2 [--cap-gb 12] [--method qlora] [--steps 7]
    python bench/bench_train.py qwen2.5-7b 1024 16 --gpu-memory 12GB    # BATCH is the effective batch; the plan
                                                                         # picks micro-batch, accumulation, ...

Prints one `RESULT {...}` line in the format of shared/anchors/anchor_step.py (tokens/s = median of steps 3..N,
peak allocated and reserved GPU memory), so both land in one table. Speed and memory do not depend on weight
values, so the checkpoint is random; it is built once under /tmp/models (GPU machine) from bench/shapes.yaml.
Every row is a full document of exactly SEQ tokens and every token carries loss, as in the anchor script.
`--gpu-memory` runs `train()` as `lorafit train --gpu-memory` does (fit_to_gpu_budget chooses the settings and caps
the allocator) and adds the chosen settings and the cap to RESULT. `--segments FILE` records the allocator's history
and writes every segment it created (size, and the innermost lorafit frame of the request that created it).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import statistics
import sys
from pathlib import Path

import torch
import yaml

SHAPES = yaml.safe_load((Path(__file__).parent / "shapes.yaml").read_text())


def save_small_tokenizer(path: Path) -> None:
    """A 300-token byte-level BPE with ChatML's special tokens: all a random-weight checkpoint needs to be loaded."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel()
    tok.train_from_iterator(["hello world fine tuning with low rank adapters"] * 10, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<unk>", "<|endoftext|>", "<|im_start|>", "<|im_end|>"]))
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                            unk_token="<unk>").save_pretrained(path)


def make_checkpoint(name: str, root: Path = Path("/tmp/models")) -> Path:
    path = root / name
    if (path / "done").exists():
        return path
    from transformers import AutoConfig, AutoModelForCausalLM

    shape = dict(SHAPES[name])
    config = AutoConfig.for_model(shape.pop("model_type"), **shape)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(path)
    save_small_tokenizer(path)
    (path / "done").write_text("1")
    del model
    torch.cuda.empty_cache()
    return path


def write_documents(path: Path, n: int, seq: int, per_row: int = 1) -> Path:
    """Text documents longer than SEQ tokens (truncated to SEQ by the data pipeline): every row is full. With
    `per_row` > 1, documents of about SEQ / per_row tokens (a word is a token of the small tokenizer), so packing
    puts `per_row` of them in each row and attention runs per example (varlen segments)."""
    rng = random.Random(0)
    words = ["hello", "world", "fine", "tuning", "with", "low", "rank", "adapters"]
    length = seq + 16 if per_row == 1 else seq // per_row - 16
    with open(path, "w") as f:
        for _ in range(n):
            f.write(json.dumps({"text": " ".join(rng.choices(words, k=length))}) + "\n")
    return path


def write_segments(path: Path) -> None:
    """Every segment the caching allocator created (cudaMalloc), in order: its size and the innermost frames of
    lorafit code (or bench code) of the request that created it; compared with plan.allocator's replay."""
    snapshot = torch.cuda.memory._snapshot()
    segments = []
    for event in (e for trace in snapshot["device_traces"] for e in trace):
        if event["action"] != "segment_alloc":
            continue
        frames = [f"{Path(f['filename']).name}:{f['line']} {f['name']}" for f in event.get("frames", [])
                  if "lorafit" in f["filename"] or "bench" in f["filename"]][:3]
        segments.append({"bytes": event["size"], "frames": frames})
    frees = sum(1 for trace in snapshot["device_traces"] for e in trace if e["action"] == "segment_free")
    path.write_text(json.dumps({"segments": segments, "segment_frees": frees}))
    torch.cuda.memory._record_memory_history(enabled=None)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    parser.add_argument("seq", type=int)
    parser.add_argument("batch", type=int)
    parser.add_argument("--cap-gb", type=float, default=0.0, help="cap the allocator to emulate a smaller card")
    parser.add_argument("--method", default="qlora")
    parser.add_argument("--steps", type=int, default=7)
    parser.add_argument("--no-checkpointing", action="store_true")
    parser.add_argument("--offload", action="store_true", help="offload checkpointed layer inputs to CPU memory")
    parser.add_argument("--mlp-chunk", type=int, default=0, help="tile the MLP over this many tokens")
    parser.add_argument("--docs-per-row", type=int, default=1, help="pack this many documents into each row")
    parser.add_argument("--masked-packing", action="store_true",
                        help="packed rows through the seq_ids mask (sdpa) instead of varlen segments, to compare")
    parser.add_argument("--offload-activations", type=int, default=0,
                        help="the first N layers' activations go to pinned CPU memory instead of being recomputed")
    parser.add_argument("--kept-layers", type=int, default=0, help="the last N layers are not checkpointed")
    parser.add_argument("--cuda-graphs", default="auto", choices=["auto", "on", "off"],
                        help="record the micro-step as a CUDA graph (config cuda_graphs)")
    parser.add_argument("--fp8", action="store_true", help="the frozen base's matmuls in FP8 (model.fp8_base)")
    parser.add_argument("--unstacked", action="store_true",
                        help="q/k/v and gate/up one linear at a time, as before kernels/lora_siblings.py (to compare)")
    parser.add_argument("--gaps", action="store_true", help="the GPU's idle stretches in each step (bench/gaps.py)")
    parser.add_argument("--per-tensor", action="store_true",
                        help="the optimizer, clip and zeroing over each adapter tensor (before train/flat.py)")
    parser.add_argument("--log", action="store_true", help="print lorafit's progress lines (OOM recovery shows there)")
    parser.add_argument("--gpu-memory", default=None, help="fit the run to this budget as `lorafit train` does")
    parser.add_argument("--segments", default=None, help="write the allocator's segments (JSON) to this file")
    args = parser.parse_args()

    from lorafit.config import load_config
    from lorafit.errors import LorafitError
    from lorafit.train.loop import train
    from lorafit.train.progress import Progress

    if args.masked_packing:  # what packed rows ran through before kernels/varlen_attention.py
        from lorafit.model import llama

        llama.use_varlen = lambda x: False
    if args.unstacked:
        from lorafit.model import lora

        lora.STACK_SIBLINGS = False
    if args.per_tensor:
        from lorafit.train import loop

        loop.flatten = lambda params: None
    ckpt = make_checkpoint(args.model)
    if args.cap_gb:
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(args.cap_gb * 2**30 / total)
    torch.cuda.reset_peak_memory_stats()
    if args.segments:
        torch.cuda.memory._record_memory_history(max_entries=2_000_000, stacks="python")
    work = Path(os.environ.get("BENCH_WORK", "/tmp/bench_work"))
    work.mkdir(parents=True, exist_ok=True)
    data = write_documents(work / f"docs_{args.seq}_{args.docs_per_row}.jsonl",
                           (args.batch * args.steps + 4) * args.docs_per_row, args.seq, args.docs_per_row)
    cfg = load_config(overrides={
        "model": {"path": str(ckpt), "fp8_base": args.fp8}, "method": args.method,
        "data": {"train": str(data), "format": "text", "max_length": args.seq, "packing": True},
        "lora": {"r": 16, "alpha": 32, "dropout": 0.0}, "eval": {"before_training": False},
        "output_dir": str(work / "run"), "max_steps": args.steps, "micro_batch_size": args.batch,
        "learning_rate": 2e-4, "gradient_checkpointing": not args.no_checkpointing,
        "offload_checkpoints": args.offload, "mlp_chunk_tokens": args.mlp_chunk,
        "kept_layers": args.kept_layers, "offload_activations": args.offload_activations,
        "optimizer": "paged_adamw_8bit",
        "warmup_ratio": 0.0, "gpu_memory": args.gpu_memory, "cuda_graphs": args.cuda_graphs,
    })
    status = "ok"
    try:
        with contextlib.ExitStack() as stack:
            if args.gaps:
                from torch.profiler import ProfilerActivity, profile

                prof = stack.enter_context(profile(activities=[ProfilerActivity.CUDA]))
            result = train(cfg, Progress(live=False, quiet=not args.log))
        if args.gaps:
            from bench.gaps import print_gaps

            print_gaps(prof)
        history = [r for r in result.history if "tokens_per_s" in r]
        step_s = statistics.median([r["tokens"] / r["tokens_per_s"] for r in history[2:] or history])
        tok_s, loss = args.batch * args.seq / step_s, history[-1]["loss"]
        real_tok_s = statistics.median([r["tokens_per_s"] for r in history[2:] or history])  # padding left out
    except (torch.OutOfMemoryError, LorafitError) as e:  # train() says so at micro-batch 1
        status, step_s, tok_s, loss, real_tok_s = f"out of memory ({str(e)[:60]})", None, None, None, None
    extra = {}
    run_json = work / "run" / "run.json"
    if run_json.is_file():  # whether the micro-step really replayed (auto decides; a failed recording runs eagerly)
        extra["graph_replays"] = json.loads(run_json.read_text()).get("cuda_graph_replays")
    if args.gpu_memory:  # what fit_to_gpu_budget chose (run.json holds the config train() ran with) and its cap
        from lorafit.plan import budget_bytes

        extra["budget_gb"] = round(budget_bytes(args.gpu_memory) / 2**30, 2)
        if run_json.is_file():
            c = json.loads(run_json.read_text())["config"]
            extra["chosen"] = {"micro_batch_size": c["micro_batch_size"], "grad_accum": c["grad_accum"],
                               "gradient_checkpointing": c["gradient_checkpointing"], "kept_layers": c["kept_layers"],
                               "max_length": c["data"]["max_length"], "stream_layers": c["model"]["stream_layers"],
                               "resident_layers": c["model"]["resident_layers"]}
    if args.segments:
        write_segments(Path(args.segments))
    print("RESULT", json.dumps(dict(
        cap_gb=args.cap_gb, stack="lorafit", offload=args.offload, mlp_chunk=args.mlp_chunk, method=args.method,
        cuda_graphs=args.cuda_graphs, fp8=args.fp8, stacked=not args.unstacked, flat=not args.per_tensor,
        kept_layers=args.kept_layers,
        docs_per_row=args.docs_per_row,
        masked_packing=args.masked_packing, offload_activations=args.offload_activations,
        real_tok_s=round(real_tok_s) if real_tok_s else None, model=args.model, seq=args.seq, bs=args.batch,
        status=status, peak_alloc_gb=round(torch.cuda.max_memory_allocated() / 2**30, 2),
        peak_reserved_gb=round(torch.cuda.max_memory_reserved() / 2**30, 2),
        step_s=round(step_s, 3) if step_s else None, tok_s=round(tok_s) if tok_s else None,
        loss=round(loss, 3) if loss else None, **extra)), flush=True)
    sys.exit(0)


if __name__ == "__main__":
    main()
