"""The FP8 base's first-step loss, taken apart (session 10): the bundled model's first training micro-batch, LoRA's B
still zero (so the loss is the base model's), through the same forward as train(), in one process.

    python bench/fp8_first_step.py [--model bundled|DIR] [--device cuda|cpu] [--batches 16]

Rows: the base in bf16 or FP8, the FP8 GEMMs and row quantization as the fast kernels or as their plain-PyTorch twins
(kernels/fp8_rows.py's switch flipped in this process, everything else unchanged; "all twins": every module's switch,
as LORAFIT_REFERENCE_KERNELS=1 would), the eager path's inputs (varlen rows, labelled positions) or a CUDA graph's
(padded to max_length, seq_ids mask, every position), gradient on or off.
Each row prints the loss and how many FP8 GEMMs and row quantizations ran. Why: on the H100 the fp8graphs run's step 1
was 1.358 and the fp8reference run's 1.3249 (bf16: 1.32); on the CPU the twins give 1.36 against 1.33 in bf16.
Then `MEAN`: the base model's loss over the first --batches micro-batches (eager inputs, no gradient), bf16 base
against FP8 base (fast kernels where the device has them; "bf16" is fp32 on the CPU): what the FP8 base costs in
loss on this model.
"""

from __future__ import annotations

import argparse
import contextlib
import sys

import torch

from lorafit.data.batching import BatchStream
from lorafit.data.build import build_datasets
from lorafit.data.example import IGNORE_INDEX
from lorafit.data.tokenize import ensure_chat_template
from lorafit.demo import demo_config
from lorafit.kernels import fp8, fp8_rows
from lorafit.model.load import load_model
from lorafit.model.lora import apply_lora
from lorafit.model.quantize import fp8_base_off, use_fp8_base
from lorafit.train.loss import every_position_loss_sum, target_loss_sum


def all_twins(on: bool) -> None:
    """Every loaded lorafit module's copy of LORAFIT_REFERENCE_KERNELS' switch (each reads it at call time): all on
    is that variable's run."""
    for name, module in list(sys.modules.items()):
        if name.startswith("lorafit.") and hasattr(module, "FORCE_REFERENCE"):
            module.FORCE_REFERENCE = on


calls = {"gemm": 0, "rows": 0}
_gemm, _rows = fp8._scaled_matmul, fp8_rows.quantize_rows


def counted_gemm(*args, **kwargs):
    calls["gemm"] += 1
    return _gemm(*args, **kwargs)


def counted_rows(*args, **kwargs):
    calls["rows"] += 1
    return _rows(*args, **kwargs)


def base_with_adapters(model_path: str, device: torch.device):
    """(demo config, QLoRA model with fresh adapters, tokenizer, training examples) for the demo's medication task:
    LoRA's B is zero, so the model computes the base model. 16-bit base: bf16 on a GPU, fp32 on the CPU."""
    cfg = demo_config("/tmp/fp8_base_loss", "medication", max_steps=1)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    loaded = load_model(model_path if model_path != "bundled" else cfg.model.path, device, dtype, quantize=True)
    model, tokenizer = loaded.model, loaded.tokenizer
    ensure_chat_template(tokenizer)
    examples, *_ = build_datasets(cfg.data, tokenizer, cfg.seed)
    apply_lora(model, cfg.lora)
    return cfg, model, tokenizer, examples


def labelled_log_probs(model, batch, inputs_embeds: torch.Tensor | None = None) -> tuple[torch.Tensor, float]:
    """The next-token log-probabilities (fp32) at `batch`'s labelled positions, and their summed cross-entropy: what
    the FP8 loss scripts compare between versions of the base. Eager inputs (varlen rows), no gradient wanted."""
    hidden = model(batch.input_ids if inputs_embeds is None else None, position_ids=batch.position_ids,
                   seq_ids=batch.seq_ids, inputs_embeds=inputs_embeds, cu_seqlens=batch.cu_seqlens,
                   max_seqlen=batch.max_seqlen)
    keep = batch.labels[:, 1:] != IGNORE_INDEX
    logp = torch.log_softmax(model.lm_head(hidden[:, :-1][keep]).float(), -1)
    return logp, -float(logp.gather(1, batch.labels[:, 1:][keep][:, None]).sum())


def micro_step_loss_sum(model, b: dict, graph_inputs: bool) -> torch.Tensor:
    """The summed target loss of one micro-batch (`b`: a Batch's fields) as train() computes it: from eager inputs
    (varlen rows, labelled positions) or as its CUDA graph's micro-step does (padded to max_length, every position)."""
    if graph_inputs:
        hidden = model(b["input_ids"], position_ids=b["position_ids"], seq_ids=b["seq_ids"])
        return every_position_loss_sum(model, hidden, b["labels"])
    hidden = model(b["input_ids"], position_ids=b["position_ids"], seq_ids=b["seq_ids"],
                   cu_seqlens=b["cu_seqlens"], max_seqlen=b["max_seqlen"])
    return target_loss_sum(model, hidden, b["labels"])[0]


def mean_kl(p: list[torch.Tensor], q: list[torch.Tensor]) -> float:
    """KL(p || q) of log-probability rows, summed over the batches' rows and divided by their count (nats/token)."""
    return sum(float((a.exp() * (a - b)).sum()) for a, b in zip(p, q)) / sum(a.shape[0] for a in p)


def arguments() -> argparse.Namespace:
    """--model (bundled or a folder), --device, --batches: what both FP8 loss scripts take."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="bundled")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batches", type=int, default=16)
    return parser.parse_args()


def main() -> None:
    args = arguments()
    fp8._scaled_matmul, fp8_rows.quantize_rows = counted_gemm, counted_rows
    device = torch.device(args.device)
    cfg, model, tokenizer, examples = base_with_adapters(args.model, device)
    print(f"FP8 linears: {use_fp8_base(model)}", flush=True)
    model.train()
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if device.type == "cuda" \
        else contextlib.nullcontext

    streams = {}  # graph inputs or not: the same rows, padded to max_length or not
    for graph_inputs in (False, True):
        streams[graph_inputs] = BatchStream(examples, cfg.data.max_length, cfg.data.packing, cfg.seed,
                                            tokenizer.pad_token_id)
        streams[graph_inputs].pad_to = cfg.data.max_length if graph_inputs else None

    def loss(graph_inputs: bool, grad: bool, index: int = 0, summed: bool = False):
        batch, _ = streams[graph_inputs].batch(index, 1)
        b = vars(batch.to(device))
        with torch.set_grad_enabled(grad), autocast():
            total = micro_step_loss_sum(model, b, graph_inputs)
        return (float(total), batch.num_targets) if summed else float(total) / batch.num_targets

    for base in ("bf16", "bf16 all twins", "fp8 fast", "fp8 twins", "fp8 all twins"):
        all_twins(base.endswith("all twins"))
        fp8_rows.FORCE_REFERENCE = base.endswith("twins")
        off = fp8_base_off(model) if base.startswith("bf16") else contextlib.nullcontext()
        with off:
            for graph_inputs in (False, True):
                for grad in (True, False):
                    calls.update(gemm=0, rows=0)
                    value = loss(graph_inputs, grad)
                    print(f"ROW base {base:14s} inputs {'graph' if graph_inputs else 'eager'} grad {int(grad)}  "
                          f"loss {value:.4f}  fp8 gemms {calls['gemm']}  row quantizations {calls['rows']}",
                          flush=True)
    all_twins(False)
    sums = {}
    for base in ("bf16", "fp8"):
        with fp8_base_off(model) if base == "bf16" else contextlib.nullcontext():
            parts = [loss(False, False, i, summed=True) for i in range(args.batches)]
        sums[base] = sum(p[0] for p in parts) / sum(p[1] for p in parts)
        per_batch = [round(p[0] / p[1], 4) for p in parts]
        print(f"BATCHES base {base}: {per_batch}", flush=True)
    print(f"MEAN over {args.batches} batches: bf16 base {sums['bf16']:.4f}, FP8 base {sums['fp8']:.4f} "
          f"({100 * (sums['fp8'] / sums['bf16'] - 1):+.2f}%)", flush=True)


if __name__ == "__main__":
    main()
