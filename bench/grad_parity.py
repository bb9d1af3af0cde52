"""Do the fast kernels compute the reference's gradients? The adapters' gradients on the bundled model's first
training micro-batches, through the fast kernels, through their plain-PyTorch twins (both bf16, as training runs),
and through the twins in fp32 (the "truth"), in one process (session 12).

    python bench/grad_parity.py [--model bundled|DIR] [--batches 8] [--b-scale 0.01]

Why: over 50 steps the bf16 fast path's last losses sat 1-5% above the twins' (session 11), while a bf16 rounding
of the twins' starting adapters moved them by under 2%. A curve mixes every step's roundings; a gradient at fixed
weights does not. Both bf16 paths round, so neither matches the truth: a fast kernel that computes what its twin
does has about the twin's error, with no direction of its own. Per adapter group (q_proj.A, ..., down_proj.B) and
over all, for each bf16 path: `err` = |g - g_truth| / |g_truth| and `scale` = <g, g_truth> / |g_truth|^2 (a
gradient systematically too small or too large shows as scale away from 1; rounding noise alone leaves it at 1);
and the same for the fast path against the bf16 twins (within bf16 tolerance: no farther from them than they are
from fp32). Inputs as train() sends them (eager: varlen rows, labelled positions) and as its CUDA graph's micro-step
does (padded to max_length, every position; the twins and fp32 take the same rows eagerly).
LoRA B is set to seeded random values (std --b-scale) so that A has a gradient too (a fresh B is zero).
Ends with `GRADS {json}`: each comparison's overall err and scale, and the fast path's worst group by its err
against fp32 over the twins'.
"""

from __future__ import annotations

import argparse
import json
import re
from collections import defaultdict

import torch
from fp8_first_step import all_twins, base_with_adapters, micro_step_loss_sum

from lorafit.data.batching import BatchStream
from lorafit.model.load import load_model
from lorafit.model.lora import apply_lora

GROUP = re.compile(r"\.(\w+)\.lora_([AB])\.weight$")


def gradients(model, batch, autocast: bool, graph_inputs: bool) -> tuple[dict[str, torch.Tensor], float]:
    """Every adapter's gradient (fp32) of the batch's mean target loss, and that loss; as train() runs a micro-step
    (eager inputs) or as its CUDA graph's micro-step computes (inputs padded to max_length, every position)."""
    model.zero_grad(set_to_none=True)
    on_gpu = batch.input_ids.is_cuda  # on the CPU every path runs in fp32: a smoke test of the script
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast and on_gpu):
        total = micro_step_loss_sum(model, vars(batch), graph_inputs)
    (total / batch.num_targets).backward()
    grads = {n: p.grad.detach().float().clone() for n, p in model.named_parameters() if p.grad is not None}
    return grads, float(total.detach()) / batch.num_targets


def add_comparison(sums: dict[str, list[float]], grads: dict[str, torch.Tensor],
                   truth: dict[str, torch.Tensor]) -> None:
    """Add (|g - t|^2, <g, t>, |t|^2) of each tensor to `sums` under its group and under "all"."""
    for name, t in truth.items():
        g = grads[name]
        group = "{}.{}".format(*GROUP.search(name).groups())
        for key in (group, "all"):
            sums[key][0] += float((g - t).pow(2).sum())
            sums[key][1] += float((g * t).sum())
            sums[key][2] += float(t.pow(2).sum())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="bundled")
    parser.add_argument("--batches", type=int, default=8)
    parser.add_argument("--b-scale", type=float, default=0.01)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)  # LoRA A's fresh init (session 12's H200 run was not seeded: its A was a fresh draw)
    cfg, model, tokenizer, examples = base_with_adapters(args.model, device)
    model.gradient_checkpointing, model.kept_layers = cfg.gradient_checkpointing, cfg.kept_layers
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lora_B.weight"):
                p.copy_(torch.randn(p.shape, generator=generator) * args.b_scale)
    exact = load_model(args.model if args.model != "bundled" else cfg.model.path, device, torch.float32,
                       quantize=True).model
    apply_lora(exact, cfg.lora)
    exact.gradient_checkpointing = False
    exact.load_state_dict({n: p for n, p in model.state_dict().items() if "lora_" in n}, strict=False)
    model.train(), exact.train()

    # (path, against): the paths' gradients against the fp32 twins' and the fast paths' against the bf16 twins'
    pairs = [("fast", "fp32"), ("twins", "fp32"), ("fast", "twins")]
    totals = {(inputs, path, against): defaultdict(lambda: [0.0, 0.0, 0.0])
              for inputs in ("eager", "graph") for path, against in pairs}
    for inputs in ("eager", "graph"):
        stream = BatchStream(examples, cfg.data.max_length, cfg.data.packing, cfg.seed, tokenizer.pad_token_id)
        stream.pad_to = cfg.data.max_length if inputs == "graph" else None
        for index in range(args.batches):
            batch = stream.batch(index * cfg.micro_batch_size, cfg.micro_batch_size)[0].to(device)
            all_twins(True)
            grads = {"fp32": gradients(exact, batch, autocast=False, graph_inputs=False),
                     "twins": gradients(model, batch, autocast=True, graph_inputs=False)}
            all_twins(False)
            grads["fast"] = gradients(model, batch, autocast=True, graph_inputs=inputs == "graph")
            for path, against in pairs:
                add_comparison(totals[inputs, path, against], grads[path][0], grads[against][0])
            print(f"BATCH {index} {inputs} inputs  loss fast {grads['fast'][1]:.5f}  twins {grads['twins'][1]:.5f}  "
                  f"fp32 {grads['fp32'][1]:.5f}", flush=True)

    result = {}
    for (inputs, path, against), sums in totals.items():
        for key in sorted(sums, key=lambda k: (k != "all", k)):
            sq_err, dot, sq_truth = sums[key]
            err, scale = (sq_err / sq_truth) ** 0.5, dot / sq_truth
            print(f"GROUP {inputs} inputs {path:5s} vs {against:5s} {key:12s} err {err:.5f}  scale {scale:.5f}",
                  flush=True)
            if key == "all":
                result[f"{inputs} {path} vs {against}"] = {"err": round(err, 5), "scale": round(scale, 5)}
    for inputs in ("eager", "graph"):
        fast, twins = totals[inputs, "fast", "fp32"], totals[inputs, "twins", "fp32"]
        ratios = {key: (fast[key][0] / max(twins[key][0], 1e-30)) ** 0.5 for key in fast}
        worst = max(ratios, key=ratios.get)
        result[f"{inputs} fast's worst group"] = {"group": worst, "err_vs_fp32_over_twins'": round(ratios[worst], 3)}
    print("GRADS " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
