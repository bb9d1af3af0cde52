"""Issue 8's comparison in one table: lorafit against the transformers + PEFT + bitsandbytes recipe (`hf`), that
recipe with Liger kernels (`liger`) and Unsloth, on the same shapes, tokens and LoRA settings (r 16, alpha 32, all
seven projections, paged AdamW 8-bit, random weights of real shapes from bench/shapes.yaml).

    python bench/bench_peers.py [--stacks lorafit,unsloth,hf,liger] [--only fixed,7b16,15b12,long] [--steps N]
        [--timeout 300] [--out DIR] [--dry-run] [--cands CONFIG.STACK=V1,V2] [--lorafit-flags CONFIG=FLAGS]

Every measurement is its own process: lorafit's through bench/bench_train.py, the peers' through the anchor script
(.cache/anchor/anchor_step.py, else shared/anchors/anchor_step.py); both cache the random checkpoint in /tmp/models.
The peers' wheels (.wheels/peers) go into /tmp/peers_site, first on the peers' PYTHONPATH only, unseen by lorafit's
runs (`--install-peers`: by default when a peer is asked for and that folder is absent).

Configurations (`--only`):
  fixed  Qwen2.5-7B, seq 2048, batch 2, no cap.
  7b16   Qwen2.5-7B, seq 2048, allocator capped at 16 GB: the best batch among the candidates.
  15b12  Qwen2.5-1.5B, seq 1024, capped at 12 GB: the best batch among the candidates.
  long   Qwen2.5-7B, batch 1, capped at 16 GB: the longest sequence among the candidates that trains (4 steps).
A search tries its candidates in increasing order and stops at the first out of memory (or timeout); the row reports
the fastest (`long`: the longest) of those that ran. `--cands 7b16.lorafit=8,12,16,20` replaces one candidate list
(an empty list skips the stack there); `--lorafit-flags "long=--offload --mlp-chunk 4096"` replaces lorafit's extra
bench_train.py flags in one configuration and `--lorafit-flags "all=--cuda-graphs"` appends to every one. Both
options repeat. `--merge earlier/peers.json` adds another call's rows to the table.
`--steps` overrides every configuration's step count (7, `long` 4); tok/s: median of steps 3..N.

MFU = tok/s × FLOPs per token / the bf16 matmul rate measured on the same GPU at the start (8192³ matmuls over three
rotating input pairs, median of CUDA-event timings, in a child process so this one never holds GPU memory).
FLOPs per trained token = 4 × matmul parameters (the 7 projections of every layer and the LM head, embeddings
excluded: forward 2, input gradient 2, no weight gradient for frozen weights; recomputation not counted)
+ 6 × layers × seq × heads × head_dim for attention (forward QK^T and PV are 2·seq·d each, halved by causality;
backward twice forward). Output: each run's RESULT as it ends, then $OUT/peers.json (every run with its command)
and $OUT/peers.md (the table; lorafit rows carry their tok/s ratio to Unsloth's in the same run).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import shlex
import signal
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PEERS_SITE = "/tmp/peers_site"
STACKS = ("lorafit", "unsloth", "hf", "liger")
CONFIGS = {
    "fixed": dict(title="7B 2048 × 2, no cap", model="qwen2.5-7b", cap=0, vary="bs", seq=2048, steps=7,
                  flags=[], cands={s: [2] for s in STACKS}),
    "7b16": dict(title="7B 2048, 16 GB: best batch", model="qwen2.5-7b", cap=16, vary="bs", seq=2048, steps=7,
                 flags=[], cands=dict(lorafit=[8, 12, 16], unsloth=[8, 12], hf=[1, 2], liger=[2, 4])),
    "15b12": dict(title="1.5B 1024, 12 GB: best batch", model="qwen2.5-1.5b", cap=12, vary="bs", seq=1024, steps=7,
                  flags=[], cands=dict(lorafit=[16, 32, 48], unsloth=[16, 32], hf=[4, 8], liger=[8, 16])),
    "long": dict(title="7B batch 1, 16 GB: longest seq", model="qwen2.5-7b", cap=16, vary="seq", bs=1, steps=4,
                 flags=["--offload", "--mlp-chunk", "8192"],
                 # few, huge tensors of many sizes: at 65,536 tokens the default allocator held 15.84 GiB for 13.25
                 lorafit_env={"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"},
                 cands=dict(lorafit=[65536, 98304], unsloth=[32768, 49152], hf=[2048, 4096], liger=[])),
}


def shapes() -> dict:
    import yaml

    return yaml.safe_load((ROOT / "bench" / "shapes.yaml").read_text())


def matmul_params(model: str) -> int:
    s = shapes()[model]
    h, inter, layers = s["hidden_size"], s["intermediate_size"], s["num_hidden_layers"]
    kv = s["num_key_value_heads"] * (h // s["num_attention_heads"])
    return layers * (2 * h * h + 2 * h * kv + 3 * h * inter) + h * s["vocab_size"]


def flops_per_token(model: str, seq: int) -> int:
    s = shapes()[model]
    head_dim = s["hidden_size"] // s["num_attention_heads"]
    return 4 * matmul_params(model) + 6 * s["num_hidden_layers"] * seq * s["num_attention_heads"] * head_dim


def parse_result(output: str) -> dict | None:
    """The last `RESULT {json}` line of a run's output, or None."""
    for line in reversed(output.splitlines()):
        if line.startswith("RESULT "):
            try:
                return json.loads(line[len("RESULT "):])
            except json.JSONDecodeError:
                return None
    return None


def classify(rc: int | None, output: str, timed_out: bool = False) -> dict:
    """The run's RESULT with a status: "ok", "out of memory ...", "timeout" or "failed: <last line>"."""
    result = parse_result(output)
    if result is not None:
        result.setdefault("status", "ok")
        return result
    if timed_out:
        return {"status": "timeout"}
    if "outofmemory" in output.lower() or "out of memory" in output.lower():
        return {"status": "out of memory"}
    last = next((line.strip() for line in reversed(output.splitlines()) if line.strip()), f"exit {rc}")
    return {"status": f"failed: {last[:160]}"}


def search(cands: list[int], run) -> list[dict]:
    """run(value) -> record, for candidates in increasing order, stopping after the first out of memory/timeout."""
    records = []
    for value in sorted(cands):
        records.append(run(value))
        if records[-1]["status"].startswith("out of memory") or records[-1]["status"] == "timeout":
            break
    return records


def pick(records: list[dict], vary: str) -> dict | None:
    """The fastest run that trained (vary "seq": the longest one, ties by speed), or None."""
    ok = [r for r in records if r.get("status") == "ok" and r.get("tok_s")]
    return max(ok, key=lambda r: (r["seq"], r["tok_s"]) if vary == "seq" else r["tok_s"]) if ok else None


def anchor_path() -> Path:
    options = [ROOT / ".cache/anchor/anchor_step.py", ROOT / "shared/anchors/anchor_step.py",
               ROOT.parent / "shared/anchors/anchor_step.py"]
    return next((p for p in options if p.exists()), options[0])


def anchor_shown() -> str:
    """The anchor script as the printed commands name it: relative to the repo where it lies inside it."""
    anchor = anchor_path()
    return str(anchor.relative_to(ROOT) if anchor.is_relative_to(ROOT) else anchor)


def seq_bs(cfg: dict, value: int) -> tuple[int, int]:
    return (value, cfg["bs"]) if cfg["vary"] == "seq" else (cfg["seq"], value)


def command(cfg: dict, stack: str, value: int, steps: int) -> tuple[list[str], dict]:
    """argv (without the interpreter) and the extra environment of one run."""
    seq, bs = seq_bs(cfg, value)
    if stack == "lorafit":
        cap = ["--cap-gb", f"{cfg['cap']:g}"] if cfg["cap"] else []
        return ["bench/bench_train.py", cfg["model"], str(seq), str(bs), *cap, "--steps", str(steps),
                *cfg["flags"]], dict(cfg.get("lorafit_env", {}))
    env = {"CAP_GB": f"{cfg['cap']:g}", "STEPS": str(steps), "PYTHONPATH": f"{PEERS_SITE}:$PYTHONPATH"}
    return [anchor_shown(), stack, cfg["model"], str(seq), str(bs)], env


def show(argv: list[str], env: dict) -> str:
    return " ".join([*(f"{k}={v}" for k, v in env.items()), "python", shlex.join(argv)])


def base_env() -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", UNSLOTH_DISABLE_STATISTICS="1", TOKENIZERS_PARALLELISM="false")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), str(ROOT / "src"), os.environ.get("PYTHONPATH")]))
    return env


def execute(argv: list[str], env: dict, timeout: float) -> tuple[int | None, str, bool]:
    base = base_env()
    full = dict(base, **{k: v.replace("$PYTHONPATH", base["PYTHONPATH"]) for k, v in env.items()})
    proc = subprocess.Popen([sys.executable, *argv], cwd=ROOT, env=full, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, errors="replace", start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
        return proc.returncode, out, False
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        return proc.returncode, out, True


def measure_matmul_rate(n: int = 8192, pairs: int = 3, reps: int = 12, trials: int = 7) -> dict:
    """bf16 FLOP/s of n³ matmuls over rotating input pairs (median of CUDA-event timings) and the GPU's name."""
    import torch

    bf = dict(device="cuda", dtype=torch.bfloat16)
    xs, out, times = [(torch.randn(n, n, **bf), torch.randn(n, n, **bf)) for _ in range(pairs)], torch.empty(
        n, n, **bf), []
    for trial in range(trials + 1):  # the first one warms up
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for i in range(reps):
            torch.matmul(*xs[i % pairs], out=out)
        end.record()
        end.synchronize()
        times += [start.elapsed_time(end) / 1e3 / reps] if trial else []
    return {"flops": 2 * n**3 / statistics.median(times), "device": torch.cuda.get_device_name()}


def fmt(x) -> str:
    return "-" if x is None else f"{x:,.0f}"


def table(rows: list[dict], rate: float | None) -> str:
    lines = ["| configuration | stack | seq × batch | tok/s | peak alloc / reserved GB | MFU | vs Unsloth | tried |",
             "|---|---|---|---|---|---|---|---|"]
    best = {(r["config"], r["stack"]): r["best"] for r in rows}
    for r in rows:
        cfg, b = CONFIGS[r["config"]], r["best"]
        stack = r["stack"] + (f" ({' '.join(r['flags'])})" if r["stack"] == "lorafit" and r["flags"] else "")
        tried = "; ".join(f"{v}: {fmt(tok_s) if tok_s else status[:40]}" for v, status, tok_s in r["tried"])
        if b is None:
            lines.append(f"| {cfg['title']} | {stack} | - | {r['tried'][-1][1][:40] if r['tried'] else '-'}"
                         f" | | | | {tried or 'skipped'} |")
            continue
        mfu = f"{100 * b['tok_s'] * flops_per_token(cfg['model'], b['seq']) / rate:.1f}%" if rate else "-"
        vs, u = "", best.get((r["config"], "unsloth"))
        if r["stack"] == "lorafit" and u:
            vs = f"{b['tok_s'] / u['tok_s']:.2f}×"
            if r["config"] == "fixed":
                vs += f", alloc {b['peak_alloc_gb']} vs {u['peak_alloc_gb']} GB"
            if cfg["vary"] == "seq":
                vs += f", seq {b['seq']:,} vs {u['seq']:,}"
        lines.append(f"| {cfg['title']} | {stack} | {b['seq']:,} × {b['bs']} | {fmt(b['tok_s'])} | "
                     f"{b.get('peak_alloc_gb')} / {b.get('peak_reserved_gb')} | {mfu} | {vs} | {tried} |")
    return "\n".join(lines)


def parse_overrides(args) -> None:
    for key, _, values in (spec.partition("=") for spec in args.cands):
        name, _, stack = key.partition(".")
        CONFIGS[name]["cands"][stack] = [int(v) for v in values.split(",") if v.strip()]
    for name, _, flags in (spec.partition("=") for spec in args.lorafit_flags):
        for n in CONFIGS if name == "all" else [name]:
            CONFIGS[n]["flags"] = (CONFIGS[n]["flags"] if name == "all" else []) + shlex.split(flags)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--stacks", default="lorafit,unsloth")
    p.add_argument("--only", default=",".join(CONFIGS))
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--timeout", type=float, default=300)
    p.add_argument("--out", default=os.environ.get("OUT") or "/tmp/out")
    p.add_argument("--dry-run", action="store_true")
    p.add_argument("--install-peers", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("--cands", action="append", default=[], metavar="CONFIG.STACK=V1,V2")
    p.add_argument("--lorafit-flags", action="append", default=[], metavar="CONFIG=FLAGS")
    p.add_argument("--merge", action="append", default=[], help="add the rows of an earlier peers.json (another call "
                   "on the same machine) to the table")
    p.add_argument("--measure-rate", action="store_true", help=argparse.SUPPRESS)  # the child process
    args = p.parse_args()
    if args.measure_rate:
        return print("RATE", json.dumps(measure_matmul_rate()), flush=True)
    parse_overrides(args)
    stacks, only = args.stacks.split(","), args.only.split(",")
    if bad := [s for s in stacks if s not in STACKS] + [c for c in only if c not in CONFIGS]:
        p.error(f"unknown stack or configuration: {bad}")
    say = lambda *a: print(*a, flush=True)
    if args.install_peers or args.install_peers is None and set(stacks) - {"lorafit"} and not Path(PEERS_SITE).exists():
        pip = ["-m", "pip", "install", "-q", "--no-index", "--no-deps", "--upgrade", "--target", PEERS_SITE]
        say("INSTALL", "python", shlex.join(pip), ".wheels/peers/*.whl")
        pip += sorted(glob.glob(str(ROOT / ".wheels/peers/*.whl")))
        if not args.dry_run:
            rc, out, _ = execute(pip, {}, 600)
            say(out.strip()[-2000:] if rc else "installed the peers into " + PEERS_SITE)
    rate = device = None
    say("RATE", show([str(Path(__file__).resolve().relative_to(ROOT)), "--measure-rate"], {}))
    if not args.dry_run:
        rc, out, _ = execute([str(Path(__file__).resolve()), "--measure-rate"], {}, 180)
        if line := next((x for x in out.splitlines() if x.startswith("RATE ")), None):
            rate, device = json.loads(line[5:]).values()
        say(f"bf16 matmul rate: {rate / 1e12:.1f} TFLOP/s on {device}" if rate else f"no matmul rate: {out[-500:]}")
    out_dir = Path(args.out)
    rows, runs = [], []
    for earlier in map(json.loads, map(Path.read_text, map(Path, args.merge))):
        rows, runs = rows + earlier["rows"], runs + earlier["runs"]
        rate, device = rate or earlier["matmul_flops"], device or earlier["device"]

    def save():
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "peers.json").write_text(json.dumps(dict(matmul_flops=rate, device=device, runs=runs, rows=rows)))

    for name in only:
        cfg = CONFIGS[name]
        for stack in stacks:
            steps = args.steps or cfg["steps"]

            def run(value, cfg=cfg, stack=stack, steps=steps, name=name):
                argv, env = command(cfg, stack, value, steps)
                say(f"[{name} {stack}] {show(argv, env)}")
                if args.dry_run:
                    return {"status": "dry-run"}
                rc, out, timed_out = execute(argv, env, args.timeout)
                rec = dict(classify(rc, out, timed_out), config=name, stack=stack, cmd=show(argv, env), rc=rc)
                seq, bs = seq_bs(cfg, value)
                rec.update(seq=rec.get("seq") or seq, bs=rec.get("bs") or bs, tok_s=rec.get("tok_s"))
                if rec["status"] != "ok":
                    rec["log_tail"] = out[-1500:]
                runs.append(rec)
                say("RESULT", json.dumps({k: v for k, v in rec.items() if k != "log_tail"}))
                save()
                return rec

            records = search(cfg["cands"].get(stack, []), run)
            rows.append(dict(config=name, stack=stack, flags=cfg["flags"] if stack == "lorafit" else [],
                             best=pick(records, cfg["vary"]),
                             tried=[(r.get(cfg["vary"]), r["status"], r.get("tok_s")) for r in records]))
            args.dry_run or save()
    if not args.dry_run:
        md = (f"bf16 matmul rate {rate / 1e12:.1f} TFLOP/s on {device}\n\n" if rate else "") + table(rows, rate)
        (out_dir / "peers.md").write_text(md + "\n")
        say(md)


if __name__ == "__main__":
    main()
