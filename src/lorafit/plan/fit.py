"""Verdicts and choices: does a run fit a card, and which settings that fit train fastest.

A run fits when the memory it needs under an allocator cap stays within the card's budget (the card less the CUDA
context). Under a cap (`lorafit train --gpu-memory`, or simply a full card) the caching allocator frees its cached
segments before failing, so a run needs less than its uncapped reservation, but more than its live tensors: blocks
freed inside segments that long-lived tensors still pin cannot be handed back. Replaying the allocator under caps
(plan.trace + plan.allocator.replay; 72 configurations of Qwen2.5 0.5B/1.5B/7B, QLoRA/LoRA, checkpointing on and
off, 512-16k tokens) put the smallest cap that does not fail at 0.1-15% above the allocated peak, and at 89-100% of
the uncapped reservation (mostly 97-100%): with the fused kernels few cached segments are ever wholly free (the
recomputed fp32 loss chunks, which were, are gone). So `need` is the predicted reservation plus `NEED_MARGIN` for
the arithmetic's own error, which puts it at least 1.1% above each of those smallest caps.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from lorafit.model.llama import wants_cpu_embeddings
from lorafit.plan.allocator import reserved
from lorafit.plan.memory import Estimate, Run, estimate
from lorafit.plan.presets import Card, PlanError, Shape, model_presets, resolve_model, shape_from_preset
from lorafit.plan.recipe import recipe_estimate

NEED_MARGIN = (1.02, 64 * 2**20)  # x1.02 + 64 MiB
# Step time of a micro-batch of M tokens is about a + b*M (BENCHMARKS.md, Qwen2.5-1.5B QLoRA on an H100: 0.47 s at
# 2,048 tokens, 0.72 s at 16,384): tokens/s rises as M / (M + a/b), saturating around 25k tokens. Recomputing the
# checkpointed layers costs about a third more compute.
SATURATION_TOKENS = 25_000
CHECKPOINT_SPEED = 0.77
BATCHES = (1, 2, 4, 8, 16, 32, 64, 128)
# Micro-batches above this many tokens are only chosen when asked for: throughput has about saturated, and the
# allocator-slack estimate was only checked against replays up to 64k tokens (within 8% there, 2% up to 16k).
MAX_CHOSEN_TOKENS = 32_768


@dataclass
class Plan:
    shape: Shape
    run: Run
    card: Card
    lorafit: Estimate
    recipe: Estimate | None  # the transformers + PEFT + bitsandbytes recipe (QLoRA only, as it ships)

    @property
    def needed(self) -> int:
        return need(self.lorafit)

    @property
    def fits(self) -> bool:
        """Needed memory plus the paged optimizer states (outside the allocator, but on the card unless evicted to
        the CPU, which slows every step) within the budget."""
        return self.needed + sum(x.bytes for x in self.lorafit.outside) <= self.card.budget


def need(est: Estimate) -> int:
    """Bytes the run needs under an allocator cap (see the module docstring)."""
    return int(max(est.reserved, est.allocated) * NEED_MARGIN[0] + NEED_MARGIN[1])


def make_plan(shape: Shape, run: Run, card: Card) -> Plan:
    est = estimate(shape, run, card)
    est.reserved = reserved(shape, run, est)
    recipe = recipe_estimate(shape, run, card) if run.method == "qlora" else None
    return Plan(shape, run, card, est, recipe)


def speed(run: Run, layers: int) -> float:
    """Relative training throughput (tokens/s up to a constant) of a micro-batch setting; see SATURATION_TOKENS.
    Each recomputed layer adds its share of CHECKPOINT_SPEED's cost (kept and offloaded layers are not recomputed;
    offloaded ones are assumed to hide their copies)."""
    recomputed = 0 if not run.checkpointing else max(0, layers - run.kept_layers - run.offloaded_layers) / layers
    return run.tokens / (run.tokens + SATURATION_TOKENS) / (1 + (1 / CHECKPOINT_SPEED - 1) * recomputed)


def most_kept_layers(shape: Shape, run: Run, card: Card) -> Plan | None:
    """The plan of `run` (checkpointing on) with as many of the last layers kept, not recomputed, as fit; None if
    nothing fits. Memory grows with every kept layer, so a bisection finds the most."""
    lo, hi = -1, shape.layers - 1  # kept_layers == layers is checkpointing off: its own candidate
    plans = {}
    while lo < hi:
        mid = (lo + hi + 1) // 2
        plans[mid] = make_plan(shape, replace(run, kept_layers=mid), card)
        lo, hi = (mid, hi) if plans[mid].fits else (lo, mid - 1)
    return plans.get(lo)  # computed whenever lo >= 0: lo only moves to a plan that fits


@dataclass
class Choice:
    run: Run
    grad_accum: int
    plan: Plan


def candidate_runs(run: Run, effective: int):
    """Every (micro-batch, checkpointing) setting at run.seq whose micro-batch x accumulation is `effective`."""
    for b in BATCHES:
        if b > effective or effective % b or (b * run.seq > max(MAX_CHOSEN_TOKENS, run.tokens)):
            continue
        for ckpt in (False, True):
            yield replace(run, batch=b, checkpointing=ckpt, grad_accum=effective // b, kept_layers=0)


def fastest(shape: Shape, run: Run, card: Card, effective_batch: int | None = None) -> Choice | None:
    """The fastest (micro-batch, checkpointing) that fits at run.seq, keeping micro-batch x accumulation equal to
    the effective batch; None if nothing fits at this sequence length."""
    best = None
    for candidate in candidate_runs(run, effective_batch or run.batch):
        plan = most_kept_layers(shape, candidate, card) if candidate.checkpointing else make_plan(shape, candidate,
                                                                                                  card)
        if plan is not None and plan.fits and (best is None or speed(plan.run, shape.layers) > speed(
                best.run, shape.layers)):
            best = Choice(plan.run, plan.run.grad_accum, plan)
    return best


def longest_seq(shape: Shape, run: Run, card: Card, limit: int = 131_072, step: int = 256) -> int:
    """Longest sequence (a multiple of `step`) that fits at run.batch with checkpointing; 0 if none."""
    run = replace(run, checkpointing=True)
    lo, hi = 0, limit // step
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if make_plan(shape, replace(run, seq=mid * step), card).fits:
            lo = mid
        else:
            hi = mid - 1
    return lo * step


LONG_ROW_CHUNK = 8192  # mlp_chunk_tokens of the long-row settings (measured: Qwen2.5-7B, 98,304 tokens, 16 GiB cap)


def long_rows(shape: Shape, run: Run, card: Card, effective: int) -> tuple[Run, int] | None:
    """Rows too long for any setting the arithmetic models: micro-batch 1 (the effective batch accumulated) with
    offloaded checkpoints and the MLP tiled by LONG_ROW_CHUNK tokens, and the bytes it needs, if that fits. The
    arithmetic does not model these two; the trace of lorafit's real code on the meta device, replayed through the
    allocator model, does (seconds at 65,536 tokens, so only for rows longer than a chunk)."""
    if run.method == "full" or run.seq <= LONG_ROW_CHUNK:
        return None
    from lorafit.plan.allocator import replay
    from lorafit.plan.trace import trace_step

    candidate = replace(run, batch=1, grad_accum=effective, checkpointing=True, kept_layers=0, offloaded_layers=0,
                        offload_checkpoints=True, mlp_chunk=LONG_ROW_CHUNK)
    alloc = replay(trace_step(shape, candidate), workspace=2 * card.cublas_workspace)
    needed = int(max(alloc.peak_reserved, alloc.peak_allocated) * NEED_MARGIN[0] + NEED_MARGIN[1])
    paged = sum(x.bytes for x in estimate(shape, candidate, card).outside)  # paged optimizer states, off the allocator
    return (candidate, needed) if needed + paged <= card.budget else None


def run_from_config(cfg) -> tuple[Shape, Run, int]:
    """(shape, run, effective batch) of a lorafit Config."""
    shape = resolve_model(cfg.model.path)
    optimizer = "paged_adamw_8bit" if cfg.optimizer == "auto" else cfg.optimizer
    run = Run(cfg.method, cfg.data.max_length, cfg.micro_batch_size, cfg.gradient_checkpointing, cfg.grad_accum,
              cfg.lora.r, tuple(cfg.lora.target_modules), cfg.data.packing, optimizer, kept_layers=cfg.kept_layers,
              offloaded_layers=cfg.offload_activations,
              eval=bool(cfg.data.val or cfg.data.val_ratio > 0),  # train() then evaluates the loss before and after
              embeddings_on_cpu=wants_cpu_embeddings(cfg.model.embeddings_on_cpu, shape.tied, cfg.method),
              fp8_base=cfg.model.fp8_base)
    return shape, run, cfg.micro_batch_size * cfg.grad_accum


def fit_to_budget(cfg, budget_bytes: int) -> dict:
    """Overrides (load_config's nested-dict form) that make `cfg` fit an allocator budget and train fastest.

    Keeps the effective batch (micro_batch_size x grad_accum) and the sequence length when anything fits at it;
    rows longer than LONG_ROW_CHUNK that fit no other way take offloaded checkpoints and the tiled MLP (`long_rows`);
    a QLoRA model that does not fit resident streams its decoder layers from CPU memory instead (model.stream_layers
    auto; `on` always streams), with as many layers resident as fit (plan/stream.py); otherwise shortens
    data.max_length to the longest that fits at micro-batch 1. Raises PlanError if even 256 tokens do not fit.
    """
    shape, run, effective = run_from_config(cfg)
    card = Card("budget", f"{budget_bytes / 2**30:.2f} GiB budget", int(budget_bytes), "sm90", context_bytes=0)
    choice = fastest(shape, run, card, effective)
    long = long_rows(shape, run, card, effective) if choice is None and cfg.model.stream_layers != "on" else None
    if long is not None:
        return {"micro_batch_size": 1, "grad_accum": effective, "gradient_checkpointing": True, "kept_layers": 0,
                "offload_checkpoints": True, "mlp_chunk_tokens": LONG_ROW_CHUNK}
    stream = cfg.model.stream_layers if run.method == "qlora" else "off"
    if stream == "on" or (stream == "auto" and choice is None):
        from lorafit.plan.stream import fastest_streaming

        streaming = fastest_streaming(shape, run, card, effective, cfg.model.resident_layers)
        if streaming is not None:
            picked, timing = streaming
            return {"micro_batch_size": picked.run.batch, "grad_accum": picked.grad_accum,
                    "gradient_checkpointing": picked.run.checkpointing,
                    "model": {"stream_layers": "on", "resident_layers": timing.resident}}
        if stream == "on":
            fixed = cfg.model.resident_layers
            how = "every layer streamed" if fixed is None else f"{fixed} layers resident (model.resident_layers)"
            raise PlanError(f"{shape.name} does not fit {card.name} at {run.seq} tokens per row with {how}; "
                            "shorten data.max_length")
    seq = run.seq
    if choice is None:
        # at micro-batch 1 the whole effective batch is accumulated: its gradient buffer counts too
        seq = longest_seq(shape, replace(run, batch=1, grad_accum=effective), card, limit=run.seq)
        if seq == 0:
            raise PlanError(f"{shape.name} ({run.method}) does not fit {card.name} even at 256 tokens per row")
        choice = fastest(shape, replace(run, seq=seq), card, effective)
    out = {"micro_batch_size": choice.run.batch, "grad_accum": choice.grad_accum,
           "gradient_checkpointing": choice.run.checkpointing, "kept_layers": choice.run.kept_layers}
    if seq != run.seq:
        out["data"] = {"max_length": seq}
    return out


def fits_table(card: Card, methods=("qlora", "lora", "full"), seq: int = 2048) -> list[dict]:
    """For every model preset and method: fits at `seq` x 1 (checkpointing on), and the longest sequence at batch 1."""
    rows = []
    for name in model_presets():
        shape = shape_from_preset(name)
        limit = int(model_presets()[name].get("max_position_embeddings", 131_072))
        for method in methods:
            run = Run(method, seq, 1, True)
            plan = make_plan(shape, run, card)
            rows.append({"model": name, "method": method, "fits": plan.fits, "needed": plan.needed,
                         "longest_seq": longest_seq(shape, run, card, limit=limit)})
    return rows
