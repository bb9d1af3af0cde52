"""`lorafit plan`: the memory table, the verdict against a card, and the fastest settings that fit, printed with rich.

Each command is a plain function that prints and returns its data, so the CLI stays a thin table:

    plan_command("qwen2.5-7b", "qlora", seq=2048, batch=4, gpu="rtx4090")
    plan_command(fits=True, gpu="24GB")
"""

from __future__ import annotations

from dataclasses import replace

from lorafit.kernels.fp8 import FP8_MIN_CAPABILITY
from lorafit.model.llama import wants_cpu_embeddings
from lorafit.plan.fit import Plan, fastest, fits_table, long_rows, longest_seq, make_plan
from lorafit.plan.memory import Run
from lorafit.plan.presets import ALL_LINEAR, resolve_card, resolve_model

GIB = 2**30


def gib(n: int | float) -> str:
    return f"{n / GIB:.2f}"


def _console(console=None):
    from rich.console import Console

    return console or Console()


def plan_table(plan: Plan):
    """Where the memory goes at the peak moment, then the totals the allocator and the card will see."""
    from rich.markup import escape
    from rich.table import Table

    est, run = plan.lorafit, plan.run
    table = Table(title=f"{plan.shape.name} · {run.method} r={run.lora_r} · {run.seq} tokens × {run.batch} rows · "
                        f"checkpointing {'on' if run.checkpointing else 'off'} · peak at the {est.moment} moment",
                  title_justify="left")
    for col, kw in (("", {"style": "dim"}), ("what", {}), ("GiB", {"justify": "right"}), ("why", {"style": "dim"})):
        table.add_column(col, **kw)
    for line in est.lines:
        table.add_row(line.group, escape(line.what), gib(line.bytes), escape(line.why))
    table.add_section()
    table.add_row("", "[b]allocated at the peak[/b] (max_memory_allocated)", f"[b]{gib(est.allocated)}[/b]", "")
    table.add_row("runtime", "allocator slack (cached free blocks)", gib(est.reserved - est.allocated),
                  "freed blocks the peak's requests cannot reuse")
    table.add_row("", "[b]reserved[/b] (max_memory_reserved)", f"[b]{gib(est.reserved)}[/b]", "")
    table.add_row("runtime", "CUDA context", gib(plan.card.context_bytes), "driver, cuBLAS, kernels: outside the "
                                                                          "allocator")
    for line in est.outside:
        table.add_row(line.group, escape(line.what), gib(line.bytes), escape(line.why))
    table.add_section()
    table.add_row("", "needed under a memory cap", gib(plan.needed), "reserved + 2% + 64 MiB: little is freeable")
    return table


def _verdict(plan: Plan) -> str:
    card = plan.card
    room = card.budget - plan.needed - sum(x.bytes for x in plan.lorafit.outside)
    word = "[green]fits[/green]" if plan.fits else "[red]does not fit[/red]"
    margin = f"{gib(room)} GiB to spare" if room >= 0 else f"short by {gib(-room)} GiB"
    return f"{card.name} ({gib(card.total_bytes)} GiB, {gib(card.budget)} for PyTorch): {word} ({margin})"


def plan_command(model: str = "qwen2.5-7b", method: str = "qlora", seq: int = 2048, batch: int = 1,
                 gpu: str = "24GB", fits: bool = False, checkpointing: bool = True, grad_accum: int = 1,
                 lora_r: int = 16, packed: bool = False, stream: str = "auto", gpus: int = 1, strategy: str = "auto",
                 console=None) -> dict:
    """Print the memory plan of one run on one card (or, with fits=True, the table over every preset) and return it.

    The returned dict holds bytes: allocated, reserved, needed, card budget, the recipe's numbers when it applies,
    and the fastest settings that fit (micro_batch_size, grad_accum, gradient_checkpointing, max_length). A QLoRA
    run that fits no setting resident (or any, with stream="on") gets a layer-streaming plan under "stream"
    (plan/stream.py: resident layers, bytes streamed per step, predicted step time); "off" never streams. With
    gpus > 1 the table is per GPU (plan/shard.py: data parallel or FSDP2, `strategy` auto picks as training does).
    """
    console = _console(console)
    card = resolve_card(gpu)
    if fits:
        return fits_command(card, console)
    shape = resolve_model(model)
    run = Run(method, seq, batch, checkpointing, grad_accum, lora_r, ALL_LINEAR, packed,
              embeddings_on_cpu=wants_cpu_embeddings("auto", shape.tied, method, gpus))
    if gpus > 1:
        from lorafit.plan.shard import shard_command

        return shard_command(shape, run, card, gpus, strategy, console)
    plan = make_plan(shape, run, card)
    console.print(plan_table(plan))
    if method == "full":
        console.print("[yellow]full fine-tuning is estimated, not yet checked against a trace or a GPU[/yellow]")
    console.print(_verdict(plan))
    other = make_plan(shape, replace(run, checkpointing=not checkpointing), card)
    console.print(f"checkpointing {'off' if checkpointing else 'on'}: allocated {gib(other.lorafit.allocated)}, "
                  f"reserved {gib(other.lorafit.reserved)} GiB ({'fits' if other.fits else 'does not fit'})")
    out = {"model": shape.name, "method": method, "seq": seq, "batch": batch, "checkpointing": checkpointing,
           "card": card.key, "budget": card.budget, "allocated": plan.lorafit.allocated,
           "reserved": plan.lorafit.reserved, "needed": plan.needed, "fits": plan.fits, "moment": plan.lorafit.moment,
           "lines": [(x.group, x.what, x.bytes) for x in plan.lorafit.lines],
           "other_checkpointing": {"allocated": other.lorafit.allocated, "reserved": other.lorafit.reserved}}
    if plan.recipe is not None:
        r = plan.recipe
        console.print(f"transformers + PEFT + bitsandbytes recipe at the same shape: allocated {gib(r.allocated)}, "
                      f"reserved {gib(r.reserved)} GiB: lorafit saves {gib(r.reserved - plan.lorafit.reserved)} GiB")
        out["recipe"] = {"allocated": r.allocated, "reserved": r.reserved}
    choice = fastest(shape, run, card, batch * grad_accum)
    out["stream"] = None
    long = long_rows(shape, run, card, batch * grad_accum) if choice is None and stream != "on" else None
    if long is not None:
        c, needed = long
        console.print(f"fits with the long-row settings: --micro-batch-size 1 --grad-accum {c.grad_accum} "
                      f"--gradient-checkpointing true --offload-checkpoints true --mlp-chunk-tokens {c.mlp_chunk} "
                      f"(each checkpointed layer's input in CPU memory, the MLP in tiles; the table above does not "
                      f"model them, lorafit's code traced on the meta device needs {gib(needed)} of "
                      f"{gib(card.budget)} GiB)")
        out["fastest"] = {"micro_batch_size": 1, "grad_accum": c.grad_accum, "gradient_checkpointing": True,
                          "kept_layers": 0, "max_length": seq, "offload_checkpoints": True,
                          "mlp_chunk_tokens": c.mlp_chunk}
        return out
    if method == "qlora" and (stream == "on" or (stream == "auto" and choice is None)):
        from lorafit.plan.stream import fastest_streaming

        streaming = fastest_streaming(shape, run, card, batch * grad_accum)
        if streaming is not None:
            out["stream"] = print_streaming(*streaming, card, console)
            out["fastest"] = out["stream"]["settings"]
            return out
    max_length = seq
    if choice is None:
        max_length = longest_seq(shape, replace(run, batch=1), card, limit=seq)
        choice = fastest(shape, replace(run, seq=max_length), card, batch * grad_accum) if max_length else None
    if choice is None:
        hint = "--stream auto" if method == "qlora" else "--method qlora"
        console.print(f"[red]nothing fits {card.name}[/red]: try a smaller model or {hint}")
        out["fastest"] = None
        return out
    c = choice.run
    kept = f" --kept-layers {c.kept_layers}" if c.checkpointing else ""
    console.print(f"fastest that fits: --micro-batch-size {c.batch} --grad-accum {choice.grad_accum} "
                  f"--gradient-checkpointing {str(c.checkpointing).lower()}{kept} --data.max-length {c.seq} "
                  f"(needs {gib(choice.plan.needed)} of {gib(card.budget)} GiB)")
    out["fastest"] = {"micro_batch_size": c.batch, "grad_accum": choice.grad_accum,
                      "gradient_checkpointing": c.checkpointing, "kept_layers": c.kept_layers,
                      "max_length": max_length}
    out["fp8_base_available"] = method == "qlora" and card.capability >= FP8_MIN_CAPABILITY
    if out["fp8_base_available"]:
        console.print("faster on this card, opt-in: --model.fp8_base true runs the frozen base's matmuls in FP8 "
                      "(H100, Qwen2.5-7B 8 x 2048 in 16 GB: about +20% tok/s; a slightly noisier base, see "
                      "BENCHMARKS.md)")
    return out


def print_streaming(choice, timing, card, console) -> dict:
    """The layer-streaming plan: its memory table, what crosses PCIe per step and the predicted step time."""
    c, t = choice.run, timing
    console.print(f"[yellow]does not fit resident[/yellow]: stream decoder layers from pinned CPU memory "
                  f"(model/stream.py), {t.resident} of {t.layers} resident")
    console.print(plan_table(choice.plan))
    console.print(f"streamed per step: {gib(t.streamed_bytes_per_step)} GiB ({t.copies_per_step} copies of "
                  f"{t.layer_bytes / 2**20:.0f} MiB); CPU memory for the streamed layers: "
                  f"{gib((t.layers - t.resident) * t.layer_bytes)} GiB pinned")
    d = t.as_dict(c)
    console.print(f"predicted step: {t.step_s:.2f} s ({d['tokens_per_s']:,.0f} tokens/s): compute {t.compute_s:.2f} s, "
                  f"copies {t.copy_s:.2f} s at {d['pcie_bytes_per_s'] / 1e9:.0f} GB/s, overlapped layer by layer "
                  f"(matmuls at {d['matmul_flops_per_s'] / 1e12:.0f} TFLOP/s)")
    settings = {"micro_batch_size": c.batch, "grad_accum": choice.grad_accum, "gradient_checkpointing": c.checkpointing,
                "max_length": c.seq, "stream_layers": "on", "resident_layers": t.resident}
    console.print(f"settings: --micro-batch-size {c.batch} --grad-accum {choice.grad_accum} --gradient-checkpointing "
                  f"{str(c.checkpointing).lower()} --model.stream-layers on --model.resident-layers {t.resident} "
                  f"(needs {gib(choice.plan.needed)} of {gib(card.budget)} GiB)")
    return {**d, "needed": choice.plan.needed, "fits": choice.plan.fits, "settings": settings}


def fits_command(card, console=None, seq: int = 2048) -> dict:
    """Every preset x method on one card: fits at seq x 1, and the longest sequence at batch 1."""
    from rich.table import Table

    console = _console(console)
    rows = fits_table(card, seq=seq)
    table = Table(title=f"{card.name}: {gib(card.budget)} GiB for PyTorch (checkpointing on)", title_justify="left")
    for col in ("model", "method", f"fits {seq}×1", "needs GiB", "longest seq at batch 1"):
        table.add_column(col, justify="left" if col in ("model", "method") else "right")
    for r in rows:
        table.add_row(r["model"], r["method"], "[green]yes[/green]" if r["fits"] else "[red]no[/red]",
                      gib(r["needed"]), f"{r['longest_seq']:,}" if r["longest_seq"] else "-")
    console.print(table)
    return {"card": card.key, "budget": card.budget, "rows": rows}
