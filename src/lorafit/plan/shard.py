"""Per-GPU memory of a run over several GPUs (train/distributed.py): data parallel or FSDP2.

Both start from the one-GPU estimate at the same per-GPU micro-batch (activations are per rank's micro-batch, so
they do not shrink) and change only what the strategy changes; the table shows the one-GPU lines, then the changes.

- ddp: every GPU holds what one GPU holds, plus the flat bucket the LoRA gradients are summed in
  (train.distributed.BUCKET_NUMEL fp32 numbers at most) at the optimizer step.
- fsdp: FSDP2 with one unit per decoder layer and one for the root (embeddings, final norm, LM head).
  * each GPU keeps 1/N of the decoder layers' codes (or 16-bit weights), norms and biases; the NF4 constants are
    buffers, which FSDP2 does not shard (1/32 of the codes);
  * 1/N of the LoRA weights and of the optimizer states, which are torch AdamW's two fp32 states (bitsandbytes'
    8-bit optimizers cannot step sharded parameters);
  * during forward and backward, two decoder layers are whole (the running one and the next one, all-gathered ahead
    of it), and the root is whole for the entire step: FSDP2 does not reshard the root after forward, and the loss
    calls the LM head after the forward. So the embeddings and head cost 1 + 1/N of their size until the backward
    ends, and only 1/N at the optimizer step;
  * gradients accumulate unsharded across micro-batches (they are reduce-scattered after the last one), so with
    grad_accum > 1 the earlier micro-batches' gradients stay whole; at the optimizer step they are 1/N.
  Each sharded parameter is padded to a multiple of N rows; ignored here (under 1 MiB for every preset).
Not yet checked against measured multi-GPU peaks (bench/bench_distributed.py measures them).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from lorafit.plan.fit import Plan
from lorafit.plan.memory import Estimate, Line, Run, blk, estimate, nf4_bytes, optimizer_bytes, trainable_tensors
from lorafit.plan.presets import Card, PlanError, Shape

BUCKET_BYTES = 4 * 2**24  # lorafit.train.distributed.BUCKET_NUMEL fp32 numbers
STRATEGIES = ("ddp", "fsdp")


@dataclass
class Parts:
    """Bytes of the pieces sharding moves, for one decoder layer and for the whole model."""

    layer_sharded: int  # one layer's codes / 16-bit weights, norms and biases
    layer_constants: int  # one layer's NF4 constants (buffers: replicated)
    layer_lora: int  # one layer's LoRA A/B, fp32
    root: int  # embeddings (+ head when untied) and final norm
    lora: int  # every LoRA A/B, fp32
    optimizer: int  # optimizer states in the allocator
    grads: int  # every LoRA gradient, fp32


def parts(shape: Shape, run: Run) -> Parts:
    wb = 2  # bf16 base on GPU for LoRA and QLoRA
    sharded = constants = 0
    for _, i, o, has_bias in shape.linears():
        if run.method == "qlora":
            codes, consts = nf4_bytes(i * o)
            sharded, constants = sharded + codes, constants + consts
        else:
            sharded += blk(wb * i * o)
        sharded += blk(wb * o) if has_bias else 0
    sharded += 2 * blk(wb * shape.hidden) + (2 * blk(wb * shape.head_dim) if shape.qk_norm else 0)
    tensors = trainable_tensors(shape, run)
    lora = sum(blk(4 * n) for n in tensors)
    root = blk(wb * shape.vocab * shape.hidden) * (1 if shape.tied else 2) + blk(wb * shape.hidden)
    return Parts(sharded, constants, lora // shape.layers, root, lora, optimizer_bytes(tensors, run.optimizer)[0], lora)


def shard_estimate(shape: Shape, run: Run, card: Card | None, gpus: int, strategy: str) -> Estimate:
    """Predicted peak allocated bytes on each of `gpus` GPUs; `run.batch` is each GPU's micro-batch."""
    if strategy not in STRATEGIES:
        raise PlanError(f"strategy must be one of {', '.join(STRATEGIES)}, got {strategy!r}")
    if run.method == "full":
        raise PlanError("the multi-GPU plan covers lora and qlora (full fine-tuning is not sharded by lorafit)")
    if strategy == "fsdp":
        run = replace(run, optimizer="adamw")
    one = estimate(shape, run, card)
    moments = dict(one.moments)
    changes: dict[str, list[Line]] = {m: [] for m in moments}
    if strategy == "ddp" or gpus == 1:
        bucket = min(BUCKET_BYTES, parts(shape, run).grads) if gpus > 1 else 0
        changes["optimizer"].append(Line("sharding", "all-reduce bucket of LoRA gradients (fp32)", bucket,
                                         "gradients summed over GPUs a bucket at a time"))
    else:
        p, n = parts(shape, run), gpus
        gone = lambda b: -(b - b // n)  # noqa: E731 -- what leaves this GPU when 1/n of b stays
        always = [Line("sharding", f"decoder layers: 1/{n} of codes, norms and biases here",
                       gone(shape.layers * p.layer_sharded), "NF4 constants are buffers: not sharded"),
                  Line("sharding", f"LoRA A/B: 1/{n} here", gone(p.lora), ""),
                  Line("sharding", f"AdamW states (2 x fp32): 1/{n} here", gone(p.optimizer),
                       "8-bit optimizers cannot step sharded params")]
        step = [Line("sharding", "embeddings/head/final norm: whole during the step (+ their 1/N shard)",
                     p.root // n, "the root unit is not resharded after forward; the loss uses the head"),
                Line("sharding", "two decoder layers all-gathered (running + prefetched)",
                     2 * (p.layer_sharded + p.layer_lora), "")]
        changes["loss"] = always + step
        changes["layer"] = always + step + [Line("sharding", "reduce-scatter input: one layer's LoRA gradients",
                                                 p.layer_lora, "")]
        changes["optimizer"] = always + [Line("sharding", f"embeddings/head/final norm: 1/{n} here", gone(p.root), ""),
                                         Line("sharding", f"gradients: 1/{n} here", gone(p.grads), "")]
    for m in moments:
        moments[m] += sum(x.bytes for x in changes[m])
    moment = max(moments, key=moments.get)
    note = [] if moment == one.moment else [Line("sharding", f"(one GPU peaks at the {one.moment} moment, "
                                                             f"each of {gpus} at the {moment} moment)", 0, "")]
    lines = one.lines + changes[one.moment] + note
    outside = [] if strategy == "fsdp" else one.outside
    return Estimate(lines, moment, moments[moment], outside=outside, moments=moments)


def make_shard_plan(shape: Shape, run: Run, card: Card, gpus: int, strategy: str) -> Plan:
    from lorafit.plan.allocator import reserved

    est = shard_estimate(shape, run, card, gpus, strategy)
    est.reserved = reserved(shape, run, est)
    return Plan(shape, run, card, est, None)


def choose(shape: Shape, run: Run, card: Card, gpus: int) -> tuple[str, Plan]:
    """Data parallel when the whole model fits each GPU (no all-gathers: faster), else FSDP."""
    ddp = make_shard_plan(shape, run, card, gpus, "ddp")
    return ("ddp", ddp) if ddp.fits else ("fsdp", make_shard_plan(shape, run, card, gpus, "fsdp"))


def shard_command(shape: Shape, run: Run, card: Card, gpus: int, strategy: str = "auto", console=None) -> dict:
    """`lorafit plan --gpus N [--strategy ddp|fsdp]`: the per-GPU table, the verdict, and both strategies' needs."""
    from lorafit.plan.report import _console, _verdict, gib, plan_table

    console = _console(console)
    plans = {s: make_shard_plan(shape, run, card, gpus, s) for s in STRATEGIES}
    chosen = choose(shape, run, card, gpus)[0] if strategy == "auto" else strategy
    plan = plans[chosen]
    name = "FSDP2 (sharded)" if chosen == "fsdp" else "data parallel"
    verdict = "fits" if chosen == "ddp" else "does not fit"
    why = f" (auto: the whole model {verdict} one GPU)" if strategy == "auto" else ""
    console.print(f"[b]per GPU, {gpus} GPUs, {name}[/b]{why}; micro-batch {run.batch} per GPU, global batch "
                  f"{run.batch * run.grad_accum * gpus} rows")
    console.print(plan_table(plan))
    console.print(_verdict(plan))
    for s, p in plans.items():
        console.print(f"{s}: needs {gib(p.needed)} GiB per GPU ({'fits' if p.fits else 'does not fit'})")
    return {"gpus": gpus, "strategy": chosen, "card": card.key, "budget": card.budget,
            "per_gpu": {s: {"allocated": p.lorafit.allocated, "reserved": p.lorafit.reserved, "needed": p.needed,
                            "fits": p.fits, "moment": p.lorafit.moment} for s, p in plans.items()},
            "lines": [(x.group, x.what, x.bytes) for x in plan.lorafit.lines]}
