"""The memory planner against the GPU: predicted vs measured peak memory of lorafit's real training step.

    python -m pip install -q --no-index --no-deps .wheels/core/*.whl             (on the GPU machine, .wheels carried)
    python bench/bench_memory.py [--jobs 3] [--budget-s 400] [--steps 3] [--only 7b]
    python bench/bench_memory.py --dry-run        (anywhere: the arithmetic and the allocator replay, no GPU)

Each configuration runs in its own process through bench/bench_train.py (random weights of real shapes, rows of
exactly SEQ tokens, loss on every token), which prints max_memory_allocated / max_memory_reserved. Before anything
runs, the planner's arithmetic (lorafit.plan) predicts both, and `plan.trace` + `plan.allocator.replay` replay the
step through the caching allocator model (on the CPU, while the GPU runs): the table shows all three, so an error
is either the arithmetic's (pred vs replay) or the allocator model's (replay vs measured). Configurations marked
`tight` run under an allocator cap equal to the memory the planner says the run needs (its verdict "fits"): none
may run out of memory. The others run uncapped (the card's 80 GB), so that reserved memory is the allocator's own.
Configurations marked `segments` also record every segment the allocator creates, listed against the replay's.
One more run goes through `train()` as `lorafit train --gpu-memory 12GB` does: the plan chooses the settings and
caps the allocator; the table shows its choice and the measured peaks against the cap.

Several processes share the GPU at once (`--jobs`), started only while the planner's predicted reservations of the
running ones fit the card; each process's peaks are its own. The first call builds the random checkpoints under
/tmp/models (Qwen2.5-7B: 15 GB, 1-2 minutes). Prints markdown tables and one `SUMMARY {...}` line; with $OUT set,
also writes $OUT/bench_memory.json.
"""

from __future__ import annotations

import argparse
import collections
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
# (shape, method, seq, batch, checkpointing, tight): two or more shapes x methods x lengths x batches x checkpointing.
# The first 20 are BENCHMARKS.md's table of 2026-11-23 (the path before the fused kernels), for comparison.
CONFIGS = [
    ("qwen2.5-1.5b", "qlora", 1024, 2, True, False),
    ("qwen2.5-1.5b", "qlora", 1024, 8, True, False),
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
    ("qwen2.5-0.5b", "lora", 1024, 4, False, False),  # 2026-11-23: reserved -11.9% (replay -11.3%): segments
    ("qwen2.5-1.5b", "qlora", 1024, 16, True, True),
    ("qwen2.5-7b", "qlora", 2048, 4, True, True),
    ("qwen2.5-0.5b", "lora", 1024, 8, True, True),
    ("qwen2.5-1.5b", "lora", 1024, 2, False, True),
    ("qwen2.5-0.5b", "qlora", 1024, 4, True, False),  # tests/test_plan.py's real-shape replay
    ("qwen2.5-7b", "qlora", 1024, 1, True, False),  # the 7B at its smallest: weights dominate
]
SEGMENTS = {("qwen2.5-0.5b", "lora", 1024, 4, False), ("qwen2.5-1.5b", "qlora", 1024, 8, True)}
# `lorafit train --gpu-memory 12GB` on a 7B QLoRA run of effective batch 16: (shape, method, seq, batch, budget)
BUDGET_RUN = ("qwen2.5-7b", "qlora", 1024, 16, "12GB")


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


def replay_of(config, shapes: dict) -> dict:
    """The step traced on the meta device and replayed through the allocator model (seconds, CPU only)."""
    from lorafit.plan.allocator import replay
    from lorafit.plan.trace import trace_step

    name, method, seq, batch, ckpt, _ = config
    alloc = replay(trace_step(shape_of(name, shapes), Run(method, seq, batch, ckpt)))
    return {"allocated": alloc.peak_allocated / GIB, "reserved": alloc.peak_reserved / GIB, "segments": alloc.created}


def predict_budget(shapes: dict) -> dict:
    """What fit_to_budget chooses for BUDGET_RUN (the config bench_train builds, with the preset's shape)."""
    from lorafit.config import load_config
    from lorafit.plan import budget_bytes, fit_to_budget

    name, method, seq, batch, budget = BUDGET_RUN
    cfg = load_config(overrides={"model": {"path": name}, "method": method, "micro_batch_size": batch,
                                 "data": {"train": "x.jsonl", "max_length": seq, "packing": False},
                                 "optimizer": "paged_adamw_8bit"})
    return {"budget_gb": budget_bytes(budget) / GIB, "chosen": fit_to_budget(cfg, budget_bytes(budget))}


def gpu_total_gib() -> float:
    out = subprocess.run(["nvidia-smi", "--query-gpu=memory.total", "--format=csv,noheader,nounits"],
                         capture_output=True, text=True, check=True).stdout
    return float(out.split()[0]) / 1024


CONTEXT_PROBE = """
import torch
from lorafit.kernels import fused
from lorafit.kernels.cross_entropy import linear_cross_entropy_sum
from lorafit.model.lora import LoRALinear
from lorafit.model.quantize import NF4Linear
# every kind of kernel a step loads (Triton NF4 and cross-entropy, Inductor's fused kernels, cuBLAS, flash)
layer = LoRALinear(NF4Linear.from_linear(torch.nn.Linear(512, 512), "cuda", torch.bfloat16), r=16, alpha=32)
x = torch.randn(2, 256, 512, device="cuda", dtype=torch.bfloat16, requires_grad=True)
with torch.autocast("cuda", dtype=torch.bfloat16):
    h = fused.swiglu(layer(fused.rms_norm(x, torch.ones(512, device="cuda", dtype=torch.bfloat16), 1e-6)), x)
    q = h.view(2, 256, 8, 64).transpose(1, 2)
    q, k = fused.rope(q, q, torch.ones(2, 256, 64, device="cuda", dtype=torch.bfloat16), torch.zeros_like(q[:, 0]))
    out = torch.nn.functional.scaled_dot_product_attention(q, k, k, is_causal=True).transpose(1, 2).reshape(512, 512)
    head = torch.randn(1000, 512, device="cuda", dtype=torch.bfloat16)
    loss = linear_cross_entropy_sum(out, head, torch.zeros(512, dtype=torch.long, device="cuda"), 256)
loss.backward()
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
    """GiB the process holds outside the allocator (CUDA context, cuBLAS, Triton and Inductor kernels) after a
    small forward/backward through every kernel a step uses, and which attention kernels accept packed rows' mask
    with GQA."""
    out = subprocess.run([sys.executable, "-c", CONTEXT_PROBE], capture_output=True, text=True, env=env, cwd=ROOT)
    m = re.search(r"CONTEXT ([0-9.]+)", out.stdout)
    return (float(m.group(1)) if m else None), re.findall(r"SDPA .*", out.stdout) or [out.stderr.strip()[-300:]]


def launch(cmd: list[str], env: dict, work: str) -> subprocess.Popen:
    Path(work).mkdir(parents=True, exist_ok=True)
    log = open(Path(work) / "log.txt", "w+")  # noqa: SIM115 - a file, not a pipe (it fills)
    proc = subprocess.Popen(cmd, cwd=ROOT, env=dict(env, BENCH_WORK=work), stdout=log, stderr=subprocess.STDOUT,
                            text=True)
    proc.log = log
    return proc


def result_of(proc: subprocess.Popen) -> dict:
    proc.log.seek(0)
    out = proc.log.read()
    proc.log.close()
    m = re.search(r"RESULT (\{.*\})", out)
    return json.loads(m.group(1)) if m else {"status": "failed: " + out.strip()[-300:]}


def main() -> None:
    import yaml

    parser = argparse.ArgumentParser()
    parser.add_argument("--jobs", type=int, default=3, help="processes sharing the GPU at once")
    parser.add_argument("--budget-s", type=float, default=400, help="start no configuration after this many seconds")
    parser.add_argument("--steps", type=int, default=3, help="training steps per run (peaks appear in step 2)")
    parser.add_argument("--only", default="", help="regex over 'shape method seq batch' to run a subset")
    parser.add_argument("--dry-run", action="store_true", help="the arithmetic and the replay only (no GPU needed)")
    args = parser.parse_args()
    t0 = time.time()
    shapes = yaml.safe_load((ROOT / "bench" / "shapes.yaml").read_text())
    card = card_presets()["h100"]
    configs = [c for c in CONFIGS if re.search(args.only, " ".join(map(str, c[:4])))]
    rows = [dict(zip(("model", "method", "seq", "batch", "checkpointing", "tight"), c), config=c,
                 pred=predict(c, shapes, card)) for c in configs]
    budget = {"run": BUDGET_RUN, "pred": predict_budget(shapes)}
    if args.dry_run:
        for r in rows:
            r["replay"] = replay_of(r["config"], shapes)
        return report(rows, budget, None, time.time() - t0)
    rows.sort(key=lambda r: r["model"] != "qwen2.5-7b")  # the slow loads first, while the time budget is fresh
    env = dict(os.environ, PYTHONPATH=f"{ROOT / 'src'}:{ROOT}", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    context, sdpa = measure_context(env)
    for name in dict.fromkeys([r["model"] for r in rows] + [BUDGET_RUN[0]]):  # each random checkpoint once
        subprocess.run([sys.executable, "-c", f"import bench_train; bench_train.make_checkpoint({name!r})"],
                       cwd=ROOT / "bench", env=env, check=True, capture_output=True)
    total, running = gpu_total_gib() * 0.9, {}
    pending = list(range(len(rows)))
    if re.search(args.only, " ".join(map(str, BUDGET_RUN[:4]))):
        pending.insert(0, "budget")  # first: it is capped, so its need is known
    while pending or running:
        for i, (proc, _) in list(running.items()):
            if proc.poll() is not None:
                (budget if i == "budget" else rows[i])["measured"] = result_of(proc)
                del running[i]
                print(f"[{time.time() - t0:4.0f}s] {' '.join(proc.args[2:7])}: "  # a trail if the call is cut short
                      f"{(budget if i == 'budget' else rows[i])['measured']}", flush=True)
        in_use = sum(need for _, need in running.values())
        while pending and len(running) < args.jobs and time.time() - t0 < args.budget_s:
            i = pending[0]
            if i == "budget":
                name, method, seq, batch, gpu_memory = BUDGET_RUN
                need, extra = budget["pred"]["budget_gb"], ["--gpu-memory", gpu_memory]
            else:
                r = rows[i]
                name, method, seq, batch, p = r["model"], r["method"], r["seq"], r["batch"], r["pred"]
                need = p["cap_gb"] or p["reserved"] * 1.1
                extra = (["--cap-gb", str(p["cap_gb"])] if p["cap_gb"] else []) + \
                    ([] if r["checkpointing"] else ["--no-checkpointing"])
                if r["config"][:5] in SEGMENTS:
                    extra += ["--segments", f"/tmp/bench_work/memory_{i}/segments.json"]
            need += (context or 0.8) + 1.0
            if running and in_use + need > total:
                break
            pending.pop(0)
            cmd = [sys.executable, "bench/bench_train.py", name, str(seq), str(batch), "--method", method,
                   "--steps", str(args.steps)] + extra
            running[i] = (launch(cmd, env, f"/tmp/bench_work/memory_{i}"), need)
            in_use += need
        if pending and not running and time.time() - t0 >= args.budget_s:
            for i in pending:
                (budget if i == "budget" else rows[i])["measured"] = {"status": "skipped (time budget)"}
            pending = []
        todo = [r for r in rows if "replay" not in r]
        if todo:  # the CPU's share while the GPU runs
            todo[0]["replay"] = replay_of(todo[0]["config"], shapes)
        else:
            time.sleep(1)
    for i, r in enumerate(rows):
        if "replay" not in r:
            r["replay"] = replay_of(r["config"], shapes)
        seg_file = Path(f"/tmp/bench_work/memory_{i}/segments.json")
        if seg_file.is_file():
            r["measured_segments"] = json.loads(seg_file.read_text())
    report(rows, budget, context, time.time() - t0, sdpa)


def pct(pred: float, meas: float | None) -> str:
    return f"{(pred / meas - 1) * 100:+.1f}%" if meas else ""


def segment_lines(r: dict) -> list[str]:
    """Segments the GPU's allocator created against the replay's, counted by size (MiB); for sizes the GPU made
    more of, the lorafit frames of the requests that made them."""
    measured = collections.Counter(round(s["bytes"] / 2**20) for s in r["measured_segments"]["segments"])
    replayed = collections.Counter(round(s / 2**20) for s in r["replay"]["segments"])
    frames = collections.defaultdict(list)
    for s in r["measured_segments"]["segments"]:
        frames[round(s["bytes"] / 2**20)].append(" < ".join(s["frames"][:2]))
    lines = [f"segments of {r['model']} {r['method']} {r['seq']} x {r['batch']} "
             f"{'ckpt' if r['checkpointing'] else 'no ckpt'}: GPU {sum(measured.values())} "
             f"({sum(k * v for k, v in measured.items())} MiB), replay {sum(replayed.values())} "
             f"({sum(k * v for k, v in replayed.items())} MiB); sizes where they differ (MiB: GPU / replay):"]
    for size in sorted(set(measured) | set(replayed), reverse=True):
        if measured[size] != replayed[size]:
            why = collections.Counter(frames[size]).most_common(2) if measured[size] > replayed[size] else []
            lines.append(f"    {size:6d}: {measured[size]:3d} / {replayed[size]:3d}  " + "; ".join(
                f"{n} x {f}" for f, n in why))
    return lines


def report(rows: list[dict], budget: dict, context: float | None, seconds: float,
           sdpa: list[str] | None = None) -> None:
    print("| shape | method | seq × batch | ckpt | cap GB | peak at | alloc pred | replay | meas | err | "
          "reserved pred | replay | meas | err | status |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    errs_a, errs_r, oom_when_fit, arith_a, arith_r = [], [], [], [], []
    for r in rows:
        p, m, rp = r["pred"], r.get("measured", {"status": "not run"}), r.get("replay", {})
        a, rs = m.get("peak_alloc_gb"), m.get("peak_reserved_gb")
        ok = m.get("status") == "ok"
        ea, er = pct(p["allocated"], a) if ok else "", pct(p["reserved"], rs) if ok and not r["tight"] else ""
        if ea:
            errs_a.append(abs(p["allocated"] / a - 1))
        if er:
            errs_r.append(abs(p["reserved"] / rs - 1))
        if rp:
            arith_a.append(abs(p["allocated"] / rp["allocated"] - 1))
            arith_r.append(abs(p["reserved"] / rp["reserved"] - 1))
        if "out of memory" in str(m.get("status")):
            oom_when_fit.append(f"{r['model']} {r['method']} {r['seq']}x{r['batch']}")
        print(f"| {r['model']} | {r['method']} | {r['seq']} × {r['batch']} | {'on' if r['checkpointing'] else 'off'} "
              f"| {p['cap_gb'] or '-'} | {p['moment']} | {p['allocated']:.2f} | {rp.get('allocated', 0):.2f} "
              f"| {a if a is not None else '-'} | {ea} | {p['reserved']:.2f} | {rp.get('reserved', 0):.2f} "
              f"| {rs if rs is not None else '-'} | {er} | {m.get('status')} |")
    name, method, seq, batch, gpu_memory = budget["run"]
    bp, bm = budget["pred"], budget.get("measured", {"status": "not run"})
    chosen = bm.get("chosen", {})
    print(f"\n`--gpu-memory {gpu_memory}` ({bp['budget_gb']:.2f} GiB cap): {name} {method}, {seq} tokens, effective "
          f"batch {batch}. Plan's choice {bp['chosen']}; train() ran {chosen or '-'}; measured "
          f"{bm.get('peak_alloc_gb', '-')} allocated / {bm.get('peak_reserved_gb', '-')} reserved GiB "
          f"({bm.get('status')}, {bm.get('tok_s', '-')} tok/s)")
    for r in rows:
        if "measured_segments" in r and "replay" in r:
            print("\n" + "\n".join(segment_lines(r)))
    summary = {
        "configs": len(rows), "measured": len(errs_a), "alloc_max_err": max(errs_a, default=None),
        "alloc_median_err": statistics.median(errs_a) if errs_a else None,
        "reserved_max_err": max(errs_r, default=None),
        "reserved_median_err": statistics.median(errs_r) if errs_r else None,
        "arithmetic_vs_replay_max_err": {"allocated": max(arith_a, default=None),
                                         "reserved": max(arith_r, default=None)},
        "oom_under_predicted_fit": oom_when_fit, "budget_run": {"status": bm.get("status"), "chosen": chosen,
                                                                "peak_reserved_gb": bm.get("peak_reserved_gb"),
                                                                "cap_gb": round(bp["budget_gb"], 2)},
        "cuda_context_gib": context, "seconds": round(seconds), "sdpa_mask_gqa": sdpa or [],
    }
    print("SUMMARY", json.dumps(summary))
    if os.environ.get("OUT"):
        for r in rows:  # segment lists are long: keep the comparison only
            r.pop("config", None)
            if "measured_segments" in r:
                r["measured_segments"] = segment_lines(r) if "replay" in r else None
            r.get("replay", {}).pop("segments", None)
        Path(os.environ["OUT"]).mkdir(parents=True, exist_ok=True)
        (Path(os.environ["OUT"]) / "bench_memory.json").write_text(json.dumps(
            {"rows": rows, "budget": budget, "summary": summary}, indent=1, default=str))


if __name__ == "__main__":
    main()
