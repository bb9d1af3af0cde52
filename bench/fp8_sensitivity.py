"""Which of the base's linears the FP8 base's loss cost comes from (session 10), on the bundled model.

    python bench/fp8_sensitivity.py [--model bundled|DIR] [--device cpu|cuda] [--batches 16]

Runs the first --batches micro-batches of the demo's training data through the base model (LoRA's B is zero) with
the FP8 base on a chosen set of linears and the rest in 16-bit, and prints the mean loss on labelled tokens and the
mean KL divergence of the next-token distribution from the all-16-bit one (nats per labelled token). The KL is the
measure of fidelity: the loss alone moves either way under noise (some sets lower it).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "src"), str(ROOT)]  # `python bench/fp8_sensitivity.py` from anywhere: lorafit and bench

from bench.fp8_first_step import arguments, base_with_adapters, labelled_log_probs, mean_kl  # noqa: E402

from lorafit.data.batching import BatchStream  # noqa: E402
from lorafit.model.quantize import NF4Linear  # noqa: E402


def main() -> None:
    args = arguments()
    device = torch.device(args.device)
    cfg, model, tokenizer, examples = base_with_adapters(args.model, device)
    stream = BatchStream(examples, cfg.data.max_length, cfg.data.packing, cfg.seed, tokenizer.pad_token_id)
    batches = [stream.batch(i, 1)[0].to(device) for i in range(args.batches)]
    linears = [(name, m) for name, m in model.named_modules() if isinstance(m, NF4Linear)]
    last = len(model.model.layers) - 1

    def layer(name: str) -> int:
        return int(name.split(".layers.")[1].split(".")[0])

    def kind(name: str) -> str:
        return name.split(".")[-2]  # ...<kind>.base_layer

    def run(reference: list[torch.Tensor] | None):
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            outputs, losses = zip(*(labelled_log_probs(model, b) for b in batches))
        loss = sum(losses) / sum(logp.shape[0] for logp in outputs)
        return loss, 0.0 if reference is None else mean_kl(reference, outputs), outputs

    choices = {
        "none": lambda n: False,
        "all": lambda n: True,
        "all but down_proj": lambda n: kind(n) != "down_proj",
        "all but gate_proj, up_proj": lambda n: kind(n) not in ("gate_proj", "up_proj"),
        "all but attention (q, k, v, o)": lambda n: kind(n) not in ("q_proj", "k_proj", "v_proj", "o_proj"),
        "all but the first layer": lambda n: layer(n) != 0,
        "all but the last layer": lambda n: layer(n) != last,
        "all but the first and last layers": lambda n: layer(n) not in (0, last),
        "all but the first two and last two": lambda n: layer(n) not in (0, 1, last - 1, last),
    }
    reference = base_loss = None
    for label, picked in choices.items():
        for name, module in linears:
            module.fp8 = picked(name)
        loss, kl, outputs = run(reference)
        if reference is None:
            reference, base_loss = outputs, loss
        print(f"SET {label:34s} FP8 linears {sum(m.fp8 for _, m in linears):3d}  loss {loss:.4f} "
              f"({100 * (loss / base_loss - 1):+.2f}%)  KL {kl:.4f} nats/token", flush=True)


if __name__ == "__main__":
    main()
