"""The memory planner against the GPU: predicted vs measured peak memory of lorafit's real training step.

    python bench/bench_memory.py [--jobs 3] [--budget-s 400] [--steps 3] [--only 7b]      (on the GPU machine)

Each configuration runs in its own process through bench/bench_train.py (random weights of real shapes, rows of
exactly SEQ tokens, loss on every token), which prints max_memory_allocated / max_memory_reserved; the planner's
arithmetic (lorafit.plan) predicts both before anything runs. Configurations marked `tight` run under an allocator
cap equal to the memory the planner says the run needs (its verdict "fits"): none may run out of memory. The others
run uncapped (the card's 80 GB), so that reserved memory is the allocator's own choice.

Several processes share the GPU at once (`--jobs`), started only while the planner's predicted reservations of the
running ones fit the card; each process's peaks are its own. The first call builds the random checkpoints under
/tmp/models (Qwen2.5-7B: 15 GB, 1-2 minutes). Prints a markdown table and one `SUMMARY {...}` line; with $OUT set,
also writes $OUT/bench_memory.json.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from lorafit.plan.fit import make_plan  # noqa: E402
from lorafit.plan.memory import Run  # noqa: E402
from lorafit.plan.presets import Shape, card_presets  # noqa: E402

GIB = 2**30
# (shape, method, seq, batch, checkpointing, tight): two or more shapes x methods x lengths x batches x checkpointing
CONFIGS = [
    ("qwen2.5-1.5b", "qlora", 1024, 2, True, False),  # BENCHMARKS.md: 3.16 / 3.67
    ("qwen2.5-1.5b", "qlora", 1024, 8, True, False),  # BENCHMARKS.md: 3.74 / 5.36
    ("qwen2.5-1.5b", "qlora", 2048, 4, True, False),
    ("qwen2.5-1.5b", "qlora", 512, 8, True, False),
    ("qwen2.5-1.5b", "qlora", 1024, 2, False, False),
    ("qwen2.5-1.5b", "qlora", 512, 4, False, False),
    ("qwen2.5-1.5b", "lora", 1024, 4, True, False),
    ("qwen2.5-1.5b", "lora", 2048, 1, False, False),
    ("qwen2.5-1.5b", "lora", 512, 8, True, False),
    ("qwen2.5-7b", "qlora", 2048, 2, True, False),
    ("qwen2.5-7b", "qlora", 1024, 8, True, False),
    ("qwen2.5-7b", "qlora", 1024, 1, False, False),
    ("qwen2.5-7b", "lora", 1024, 2, True, False),
    ("qwen2.5-7b", "lora", 512, 2, False, False),
    ("qwen2.5-0.5b", "qlora", 2048, 8, True, False),
    ("qwen2.5-0.5b", "lora", 1024, 4, False, False),
    ("qwen2.5-1.5b", "qlora", 1024, 16, True, True),  # BENCHMARKS.md: 4.67 / 6.80; the peak is in a layer's backward
    ("qwen2.5-7b", "qlora", 2048, 4, True, True),
    ("qwen2.5-0.5b", "lora", 1024, 8, True, True),  # the most fragmented in allocator replays
    ("qwen2.5-1.5b", "lora", 1024, 2, False, True),
]


def shape_of(name: str, shapes: dict) -> Shape:
    s = shapes[name]
    heads = s["num_attention_heads"]
    return Shape(name, s["vocab_size"], s["hidden_size"], s["intermediate_size"], s["num_hidden_layers"], heads,
                 s["num_key_value_heads"], s["hidden_size"] // heads, s["tie_word_embeddings"],
                 qkv_bias=s["model_type"] == "qwen2")


def predict(config, shapes: dict, card) -> dict:
    name, method, seq, batch, ckpt, tight = config
    plan = make_plan(shape_of(name, shapes), Run(method, seq, batch, ckpt), card)
    cap = round(plan.needed / GIB + 0.005, 2) if tight else 0.0
    return {"allocated": plan.lorafit.allocated / GIB, "reserved": plan.lorafit.reserved / GIB,
            "needed": plan.needed / GIB, "moment": plan.lorafit.moment, "cap_gb": cap}


def gpu_total_gib() -> float:
    out = subprocess.run(["nvidia-smi", "--query-gpu=memory.total", "--format=csv,noheader,nounits"],
                         capture_output=True, text=True, check=True).stdout
    return float(out.split()[0]) / 1024


CONTEXT_PROBE = """
import torch, bitsandbytes as bnb
x = torch.randn(256, 256, device="cuda", dtype=torch.bfloat16, requires_grad=True)
w = bnb.nn.Params4bit(torch.randn(256, 256, dtype=torch.bfloat16), requires_grad=False, quant_type="nf4").to("cuda")
(bnb.matmul_4bit(x, w.t(), quant_state=w.quant_state).sum() + (x @ x).sum()).backward()
torch.cuda.synchronize()
free, total = torch.cuda.mem_get_info()
print("CONTEXT", (total - free - torch.cuda.memory_reserved()) / 2**30)
# packed rows: which sdpa kernels take a boolean mask with GQA (the planner assumes only the math path does)
from torch.nn.attention import SDPBackend, sdpa_kernel
q = torch.randn(1, 8, 256, 64, device="cuda", dtype=torch.bfloat16)
kv = torch.randn(1, 2, 256, 64, device="cuda", dtype=torch.bfloat16)
mask = torch.ones(256, 256, device="cuda", dtype=torch.bool).tril()
for name in ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION"):
    try:
        with sdpa_kernel(getattr(SDPBackend, name)):
            torch.nn.functional.scaled_dot_product_attention(q, kv, kv, attn_mask=mask, enable_gqa=True)
        print("SDPA", name, "takes mask+gqa")
    except Exception as e:
        print("SDPA", name, "refuses mask+gqa:", str(e).splitlines()[0][:80])
"""


def measure_context(env) -> tuple[float | None, list[str]]:
    """GiB the process holds outside the allocator (CUDA context, cuBLAS, kernels) after a 4-bit forward/backward,
    and which attention kernels accept packed rows' mask with GQA."""
    out = subprocess.run([sys.executable, "-c", CONTEXT_PROBE], capture_output=True, text=True, env=env, cwd=ROOT)
    m = re.search(r"CONTEXT ([0-9.]+)", out.stdout)
    return (float(m.group(1)) if m else None), re.findall(r"SDPA .*", out.stdout)


def main() -> None:
    import yaml

    parser = argparse.ArgumentParser()
    parser.add_argument("--jobs", type=int, default=3, help="processes sharing the GPU at once")
    parser.add_argument("--budget-s", type=float, default=400, help="start no configuration after this many seconds")
    parser.add_argument("--steps", type=int, default=3, help="training steps per run (peaks appear in step 2)")
    parser.add_argument("--only", default="", help="regex over 'shape method seq batch' to run a subset")
    parser.add_argument("--dry-run", action="store_true", help="print the predictions only (no GPU needed)")
    args = parser.parse_args()
    t0 = time.time()
    shapes = yaml.safe_load((ROOT / "bench" / "shapes.yaml").read_text())
    card = card_presets()["h100"]
    configs = [c for c in CONFIGS if re.search(args.only, " ".join(map(str, c[:4])))]
    rows = [dict(zip(("model", "method", "seq", "batch", "checkpointing", "tight"), c), pred=predict(c, shapes, card))
            for c in configs]
    if args.dry_run:
        return report(rows, None, time.time() - t0)
    rows.sort(key=lambda r: r["model"] != "qwen2.5-7b")  # the slow loads first, while the time budget is fresh
    env = dict(os.environ, PYTHONPATH=f"{ROOT / 'src'}:{ROOT}", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    context, sdpa = measure_context(env)
    for name in dict.fromkeys(r["model"] for r in rows):  # build each random checkpoint once, before any run
        subprocess.run([sys.executable, "-c", f"import bench_train; bench_train.make_checkpoint({name!r})"],
                       cwd=ROOT / "bench", env=env, check=True, capture_output=True)
    total, pending, running = gpu_total_gib() * 0.9, list(range(len(rows))), {}
    while pending or running:
        for i, (proc, _) in list(running.items()):
            if proc.poll() is not None:
                proc.log.seek(0)
                out = proc.log.read()
                proc.log.close()
                m = re.search(r"RESULT (\{.*\})", out)
                rows[i]["measured"] = json.loads(m.group(1)) if m else {"status": "failed: " + out.strip()[-300:]}
                del running[i]
        in_use = sum(need for _, need in running.values())
        while pending and len(running) < args.jobs and time.time() - t0 < args.budget_s:
            i = pending[0]
            p = rows[i]["pred"]
            need = (p["cap_gb"] or p["reserved"] * 1.1) + (context or 0.6) + 1.0
            if running and in_use + need > total:
                break
            pending.pop(0)
            r = rows[i]
            cmd = [sys.executable, "bench/bench_train.py", r["model"], str(r["seq"]), str(r["batch"]), "--method",
                   r["method"], "--steps", str(args.steps)] + (["--cap-gb", str(p["cap_gb"])] if p["cap_gb"] else [])
            cmd += [] if r["checkpointing"] else ["--no-checkpointing"]
            job_env = dict(env, BENCH_WORK=f"/tmp/bench_work/memory_{i}")
            Path(job_env["BENCH_WORK"]).mkdir(parents=True, exist_ok=True)
            log = open(Path(job_env["BENCH_WORK"]) / "log.txt", "w+")  # noqa: SIM115 - a file, not a pipe (it fills)
            proc = subprocess.Popen(cmd, cwd=ROOT, env=job_env, stdout=log, stderr=subprocess.STDOUT, text=True)
            proc.log = log
            running[i] = (proc, need)
            in_use += need
        if pending and not running and time.time() - t0 >= args.budget_s:
            for i in pending:
                rows[i]["measured"] = {"status": "skipped (time budget)"}
            pending = []
        time.sleep(1)
    report(rows, context, time.time() - t0, sdpa)


def report(rows: list[dict], context: float | None, seconds: float, sdpa: list[str] | None = None) -> None:
    print("| shape | method | seq × batch | ckpt | cap GB | peak at | alloc pred | alloc meas | err | reserved pred | "
          "reserved meas | err | status |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    errs_a, errs_r, oom_when_fit = [], [], []
    for r in rows:
        p, m = r["pred"], r.get("measured", {"status": "not run"})
        a, rs = m.get("peak_alloc_gb"), m.get("peak_reserved_gb")
        ea = f"{(p['allocated'] / a - 1) * 100:+.1f}%" if a and m.get("status") == "ok" else ""
        er = f"{(p['reserved'] / rs - 1) * 100:+.1f}%" if rs and m.get("status") == "ok" and not r["tight"] else ""
        if ea:
            errs_a.append(abs(p["allocated"] / a - 1))
        if er:
            errs_r.append(abs(p["reserved"] / rs - 1))
        if "out of memory" in str(m.get("status")):
            oom_when_fit.append(f"{r['model']} {r['method']} {r['seq']}x{r['batch']}")
        print(f"| {r['model']} | {r['method']} | {r['seq']} × {r['batch']} | {'on' if r['checkpointing'] else 'off'} "
              f"| {p['cap_gb'] or '-'} | {p['moment']} | {p['allocated']:.2f} | {a if a is not None else '-'} | {ea} "
              f"| {p['reserved']:.2f} | {rs if rs is not None else '-'} | {er} | {m.get('status')} |")
    summary = {
        "configs": len(rows), "measured": len(errs_a), "alloc_max_err": max(errs_a, default=None),
        "alloc_median_err": statistics.median(errs_a) if errs_a else None,
        "reserved_max_err": max(errs_r, default=None),
        "reserved_median_err": statistics.median(errs_r) if errs_r else None,
        "oom_under_predicted_fit": oom_when_fit, "cuda_context_gib": context, "seconds": round(seconds),
        "sdpa_mask_gqa": sdpa or [],
    }
    print("SUMMARY", json.dumps(summary))
    if os.environ.get("OUT"):
        Path(os.environ["OUT"]).mkdir(parents=True, exist_ok=True)
        (Path(os.environ["OUT"]) / "bench_memory.json").write_text(json.dumps({"rows": rows, "summary": summary},
                                                                              indent=1))


if __name__ == "__main__":
    main()
