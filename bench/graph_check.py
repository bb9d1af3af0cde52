"""Where the CUDA-graph runs' wrong losses come from (train/graphs.py, BENCHMARKS.md session 8).

    python bench/graph_check.py --model DIR [--steps 50] [--modes check,dry] [--workdir /tmp/graph_check]

Trains bench_parity's run (the demo's medication task, QLoRA r=16) once per mode, in this process:
- check: CUDA graphs on; after every replay the same device inputs go through the model again eagerly (no grad,
  same weights, before the optimizer step) and both losses are printed, with whether the recording's input tensors
  still hold this micro-batch. A replay that computes a wrong forward shows here as `CHECK ... MISMATCH`.
- dry: the graphs' inputs (rows padded to data.max_length, the seq_ids mask, the every-position loss) run eagerly,
  never recorded: the same numerics as the graphs without the recording.
- graphs: CUDA graphs on, nothing added.
- fast: CUDA graphs off (the default path: varlen attention, the loss on labelled positions only).
A mode may carry options after colons: `nocudnn` (SDPA without cuDNN's kernel), `math` (SDPA's plain kernel only),
`refce` (the loss through the plain-PyTorch chunks, not the Triton head kernel), `fp8` (the FP8 base: model.fp8_base),
e.g. `dry:nocudnn`, `check:fp8`. In check and
dry modes every eager micro-step is checked the same way as replays (`CHECK eager ...`). The checking forward runs
SDPA's plain kernel and the plain loss, so it is independent of the kernels under test.
Each mode's loss curve is printed (`CURVE mode [...]`) for comparison with bench_parity's fast and reference runs.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import yaml

from lorafit.config import config_to_dict, load_config
from lorafit.demo import demo_config
from lorafit.train import graphs, loss
from lorafit.train.loop import train
from lorafit.train.loss import every_position_loss_sum

_original_run = graphs.GraphedMicroStep.run
_original_init = graphs.GraphedMicroStep.__init__
_original_forward_backward = graphs.GraphedMicroStep._forward_backward
_original_head_applies = loss._head_kernel_applies
counter = {"checked": 0, "mismatches": 0}


def plain_loss(model, inputs: dict[str, torch.Tensor]) -> float:
    """The micro-batch's summed loss through SDPA's plain kernel and the plain loss, no gradient."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False), \
            sdpa_kernel(SDPBackend.MATH):
        hidden = model(inputs["input_ids"], position_ids=inputs["position_ids"], seq_ids=inputs.get("seq_ids"))
        return float(every_position_loss_sum(model, hidden, inputs["labels"]))


def report(kind: str, got: float, want: float, extra: str = "") -> None:
    n = counter["checked"]
    counter["checked"] += 1
    bad = abs(got - want) > 0.1 * abs(want) + 1e-3  # bf16 noise against the plain kernel stays under ~5%
    counter["mismatches"] += bad
    print(f"CHECK {kind} {n} run {got:.4f} plain {want:.4f}{extra}" + (" MISMATCH" if bad else ""), flush=True)


def checked_run(self, batch, inv_targets, embeds=None):
    replaying = self.recording is not None and (tuple(batch.input_ids.shape), batch.seq_ids is not None) == self.key
    result = _original_run(self, batch, inv_targets, embeds)
    if replaying:
        rec = self.recording
        host = self._host_inputs(batch, embeds)
        same = all(torch.equal(rec.inputs[name].cpu(), host[name]) for name in host)
        report("replay", float(result), plain_loss(self.model, rec.inputs), f" inputs_same {same}")
    return result


def checked_forward_backward(self, inputs, inv_targets):
    result = _original_forward_backward(self, inputs, inv_targets)
    if not torch.cuda.is_current_stream_capturing():
        report("eager", float(result), plain_loss(self.model, inputs))
    return result


def dry_init(self, *args, **kwargs):
    _original_init(self, *args, **kwargs)
    self.failed = True  # never records: every micro-batch takes _forward_backward eagerly


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--modes", default="check,dry")
    parser.add_argument("--workdir", default="/tmp/graph_check")
    args = parser.parse_args()
    for spec in args.modes.split(","):
        mode, *options = spec.split(":")
        checking = mode in ("check", "dry")
        graphs.GraphedMicroStep.run = checked_run if checking else _original_run
        graphs.GraphedMicroStep._forward_backward = checked_forward_backward if checking else _original_forward_backward
        graphs.GraphedMicroStep.__init__ = dry_init if mode == "dry" else _original_init
        loss._head_kernel_applies = (lambda *_: False) if "refce" in options else _original_head_applies
        torch.backends.cuda.enable_cudnn_sdp("nocudnn" not in options and "math" not in options)
        torch.backends.cuda.enable_mem_efficient_sdp("math" not in options)
        torch.backends.cuda.enable_flash_sdp("math" not in options)
        counter.update(checked=0, mismatches=0)
        out = Path(args.workdir) / spec.replace(":", "_")
        cfg = config_to_dict(demo_config(out, "medication", max_steps=args.steps))
        cfg["model"]["path"] = args.model
        cfg["cuda_graphs"] = "off" if mode == "fast" else "on"
        cfg["model"]["fp8_base"] = "fp8" in options
        cfg["eval"].update({"before_training": False, "metrics": [], "every": 0})
        cfg["val_every"] = 0
        (out / "graph_check.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
        train(load_config(overrides=cfg))
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
        curve = [round(r["loss"], 4) for r in rows if "loss" in r and "step" in r]
        print(f"CURVE {spec} {json.dumps(curve)}", flush=True)
        if checking:
            print(f"CHECKED {spec}: {counter['checked']} micro-steps, {counter['mismatches']} mismatches", flush=True)


if __name__ == "__main__":
    main()
