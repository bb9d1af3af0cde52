"""QLoRA over several GPUs: throughput and peak memory per GPU of lorafit's real `train()`, one GPU against two
(data parallel and FSDP2), on random weights of Qwen2.5-7B and Qwen2.5-32B shapes, each GPU capped at --cap-gb.

    python bench/bench_distributed.py --cap-gb 24                 # every configuration this machine's GPUs allow
    python bench/bench_distributed.py --cap-gb 24 --only 32b      # one model (each run is 1-2 minutes)

Each configuration runs as its own torchrun job (`--worker` below), so memory starts clean. No checkpoint is written:
the loader's tensor iterator is replaced by one that makes each random bf16 tensor on the GPU as the loader asks for
it, so lorafit's own load path quantizes the 32B model to NF4 one matrix at a time (a 64 GB bf16 checkpoint never
exists). Speed and memory do not depend on weight values. Every row is one document of exactly SEQ tokens, all of them
carrying loss. Prints one `RESULT {...}` line per configuration: tokens/s (median of steps 3..N, all GPUs together
and per GPU), peak allocated/reserved GiB per GPU during training and while loading, and the planner's per-GPU
prediction (lorafit.plan.shard) for the same run. A failed run prints its status and the end of its log.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "src"), str(ROOT)]

import torch  # noqa: E402
import yaml  # noqa: E402
from bench.bench_train import save_small_tokenizer, write_documents  # noqa: E402

SHAPES = yaml.safe_load((Path(__file__).parent / "shapes.yaml").read_text())
GIB = 2**30
# (model, GPUs, strategy, seq, micro-batch per GPU); strategy "single" is one process
CONFIGS = [
    ("qwen2.5-7b", 1, "single", 2048, 2),
    ("qwen2.5-7b", 2, "ddp", 2048, 2),
    ("qwen2.5-7b", 2, "fsdp", 2048, 2),
    ("qwen2.5-32b", 1, "single", 2048, 1),  # 15 GiB of NF4 codes + 3 GiB of embeddings: tight on a 24 GB card
    ("qwen2.5-32b", 2, "ddp", 2048, 1),
    ("qwen2.5-32b", 2, "fsdp", 2048, 1),
]


def model_folder(name: str, root: Path) -> Path:
    """config.json and a small tokenizer: all of a model folder lorafit reads once the weights are random."""
    from transformers import AutoConfig

    path = root / name
    if (path / "done").exists():
        return path
    shape = dict(SHAPES[name])
    AutoConfig.for_model(shape.pop("model_type"), **shape).save_pretrained(path)
    save_small_tokenizer(path)
    (path / "done").write_text("1")
    return path


def predicted(name: str, gpus: int, strategy: str, seq: int, batch: int, cap_gb: float) -> dict:
    from lorafit.plan.memory import Run
    from lorafit.plan.presets import Card, resolve_model
    from lorafit.plan.shard import make_shard_plan

    card = Card("cap", f"{cap_gb} GiB cap", int(cap_gb * GIB), "sm90", context_bytes=0)
    plan = make_shard_plan(resolve_model(name), Run("qlora", seq, batch, True), card, gpus,
                           "ddp" if strategy == "single" else strategy)
    est = plan.lorafit
    return {"allocated_gb": round(est.allocated / GIB, 2), "reserved_gb": round(est.reserved / GIB, 2),
            "needed_gb": round(plan.needed / GIB, 2), "fits": plan.fits}


# --- one configuration, inside torchrun ----------------------------------------------------------------------------


def random_weights(folder: Path, allow_pickle: bool = False):
    """Stands in for lorafit.model.load.iter_weights: every tensor of the model, random, made on this GPU on demand."""
    from lorafit.model.llama import CausalLM, ModelArgs
    from lorafit.model.load import read_hf_config

    hf = read_hf_config(folder)
    args = ModelArgs.from_hf(hf)
    with torch.device("meta"):
        model = CausalLM(args, hf)
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    generator = torch.Generator(device).manual_seed(0)
    for key, meta in model.state_dict().items():
        if key == "lm_head.weight" and args.tie_word_embeddings:
            continue
        if "norm" in key:
            yield key, torch.ones(meta.shape, dtype=torch.bfloat16, device=device)
        else:
            tensor = torch.empty(meta.shape, dtype=torch.bfloat16, device=device)
            yield key, tensor.normal_(0.0, 0.02, generator=generator)


def worker(args) -> None:
    from datetime import timedelta

    import lorafit.model.load as load_module
    import lorafit.train.loop as loop_module
    from lorafit.config import load_config
    from lorafit.errors import LorafitError
    from lorafit.train.progress import Progress

    rank, world, local = (int(os.environ.get(k, d)) for k, d in (("RANK", 0), ("WORLD_SIZE", 1), ("LOCAL_RANK", 0)))
    device = torch.device("cuda", local)
    torch.cuda.set_device(device)
    if world > 1:  # our own group (not train's), so it outlives train() for the per-GPU report below
        torch.distributed.init_process_group("nccl", device_id=device, timeout=timedelta(minutes=5))
    if args.cap_gb:
        torch.cuda.set_per_process_memory_fraction(args.cap_gb * GIB / torch.cuda.get_device_properties(device)
                                                   .total_memory, device)
    load_module.iter_weights = random_weights
    loop_module.model_identity = lambda folder: {"path": str(folder), "weights": "random"}
    load_peak = {}
    real_load = loop_module.load_model

    def load_and_measure(*a, **kw):
        loaded = real_load(*a, **kw)
        load_peak.update(alloc=torch.cuda.max_memory_allocated(device), reserved=torch.cuda.max_memory_reserved(device))
        torch.cuda.reset_peak_memory_stats(device)  # what follows is sharding (FSDP) and training
        return loaded

    loop_module.load_model = load_and_measure
    cfg = load_config(overrides={
        "model": {"path": args.folder, "stream_layers": "off"}, "method": "qlora", "device": "cuda",
        "data": {"train": args.data, "format": "text", "max_length": args.seq, "packing": False},
        "lora": {"r": 16, "alpha": 32, "dropout": 0.0}, "eval": {"before_training": False},
        "output_dir": args.output_dir, "max_steps": args.steps, "micro_batch_size": args.batch, "grad_accum": 1,
        "learning_rate": 2e-4, "warmup_ratio": 0.0, "gradient_checkpointing": True,
        "distributed": args.strategy if args.strategy != "single" else "auto",
    })
    result = dict(model=args.model, gpus=world, strategy=args.strategy, seq=args.seq, bs_per_gpu=args.batch,
                  cap_gb=args.cap_gb, device=torch.cuda.get_device_name(device))
    try:
        run = loop_module.train(cfg, Progress(live=False, quiet=not args.log))
    except (torch.OutOfMemoryError, LorafitError) as e:
        status = "out of memory" if "out of" in str(e) and "memory" in str(e) else f"error: {e}"[:300]
        print("RESULT", json.dumps({**result, "status": status, "rank": rank,
                                    "peak_alloc_gb": round(torch.cuda.max_memory_allocated(device) / GIB, 2)}),
              flush=True)
        os._exit(1)  # torchrun stops the other ranks, which may be waiting inside a collective
    mine = {"alloc": torch.cuda.max_memory_allocated(device), "reserved": torch.cuda.max_memory_reserved(device),
            "load_alloc": load_peak.get("alloc", 0), "load_reserved": load_peak.get("reserved", 0)}
    every = [mine] * world
    if world > 1:
        every = [None] * world
        torch.distributed.all_gather_object(every, mine)
    if rank == 0:
        steps = [r for r in run.history if "tokens_per_s" in r]
        step_s = statistics.median([r["tokens"] / r["tokens_per_s"] for r in steps[2:] or steps])
        tokens = steps[-1]["tokens"]
        gb = lambda key: [round(m[key] / GIB, 2) for m in every]  # noqa: E731
        print("RESULT", json.dumps({
            **result, "status": "ok", "step_s": round(step_s, 3), "tok_s": round(tokens / step_s),
            "tok_s_per_gpu": round(tokens / step_s / world), "loss": round(steps[-1]["loss"], 3),
            "peak_alloc_gb": gb("alloc"), "peak_reserved_gb": gb("reserved"), "load_peak_alloc_gb": gb("load_alloc"),
            "load_peak_reserved_gb": gb("load_reserved"), "predicted": json.loads(args.predicted)}), flush=True)
    if world > 1:
        torch.distributed.destroy_process_group()


# --- the driver: one torchrun job per configuration -----------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cap-gb", type=float, default=24.0, help="allocator cap on every GPU (0: the whole card)")
    parser.add_argument("--only", default="", help="run configurations whose model name contains this (7b, 32b)")
    parser.add_argument("--strategies", default="single,ddp,fsdp")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--seq", type=int, default=0, help="override every configuration's sequence length")
    parser.add_argument("--batch", type=int, default=0, help="override every configuration's micro-batch per GPU")
    parser.add_argument("--log", action="store_true", help="show lorafit's progress lines")
    parser.add_argument("--timeout", type=int, default=900, help="seconds per configuration")
    # worker arguments (set by the driver)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    for flag in ("--model", "--strategy", "--folder", "--data", "--output-dir", "--predicted"):
        parser.add_argument(flag, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)

    gpus_here = torch.cuda.device_count()
    if gpus_here == 0:
        sys.exit("bench_distributed needs CUDA GPUs")
    work = Path(os.environ.get("BENCH_WORK", "/tmp/bench_distributed"))
    work.mkdir(parents=True, exist_ok=True)
    for name, gpus, strategy, seq, batch in CONFIGS:
        seq, batch = args.seq or seq, args.batch or batch
        if args.only not in name or strategy not in args.strategies.split(","):
            continue
        if gpus > gpus_here:
            print(f"skip {name} {strategy} x{gpus}: {gpus_here} GPU(s) here", flush=True)
            continue
        folder = model_folder(name, work / "models")
        data = write_documents(work / f"docs_{seq}.jsonl", batch * gpus * args.steps + 8, seq)
        plan = predicted(name, gpus, strategy, seq, batch, args.cap_gb) if args.cap_gb else {}
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(gpus),
                   __file__, "--worker", "--model", name, "--strategy", strategy, "--folder", str(folder),
                   "--data", str(data), "--output-dir", str(work / f"run-{name}-{strategy}-{gpus}"),
                   "--predicted", json.dumps(plan), "--seq", str(seq), "--batch", str(batch),
                   "--steps", str(args.steps), "--cap-gb", str(args.cap_gb)] + (["--log"] if args.log else [])
        try:
            proc = subprocess.run(command, capture_output=True, text=True, timeout=args.timeout)
            output, code = proc.stdout + proc.stderr, proc.returncode
        except subprocess.TimeoutExpired as e:
            output, code = f"{e.stdout or ''}{e.stderr or ''}", "timeout"
        output = output if isinstance(output, str) else output.decode(errors="replace")
        results = re.findall(r"^RESULT (.*)$", output, flags=re.M)
        if args.log:
            print(output, flush=True)
        for line in results[:1]:  # a failing run may print one line per rank: the first says it
            print("RESULT", line, flush=True)
        if not results:
            print("RESULT", json.dumps({"model": name, "gpus": gpus, "strategy": strategy, "seq": seq,
                                        "bs_per_gpu": batch, "cap_gb": args.cap_gb, "status": f"failed ({code})",
                                        "predicted": plan, "log_tail": output[-1500:]}), flush=True)


if __name__ == "__main__":
    main()
