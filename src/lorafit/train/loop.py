"""The training loop: one function, read top to bottom. QLoRA, LoRA and full fine-tuning share it; they differ
only in how the model is wrapped before the loop starts."""

from __future__ import annotations

import contextlib
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lorafit.config import Config, config_to_dict, load_config, merge_settings
from lorafit.data.batching import BatchStream
from lorafit.data.build import build_datasets
from lorafit.data.tokenize import ensure_chat_template
from lorafit.errors import LorafitError
from lorafit.eval.evaluate import evaluate_run, load_eval_conversations
from lorafit.export.readme import write_adapter_readme
from lorafit.kernels.fp8 import fp8_supported
from lorafit.model.llama import wants_cpu_embeddings
from lorafit.model.load import load_model, model_identity
from lorafit.model.lora import apply_lora, save_adapter
from lorafit.model.quantize import fp8_base_off, use_fp8_base
from lorafit.train import distributed
from lorafit.train.checkpoint import (
    find_resume_checkpoint,
    list_checkpoints,
    load_checkpoint,
    read_meta,
    save_checkpoint,
)
from lorafit.train.faults import Interrupted, StopRequest
from lorafit.train.flat import flatten
from lorafit.train.graphs import GraphedMicroStep, graphs_unavailable, graphs_would_not_pay
from lorafit.train.loss import target_loss_sum
from lorafit.train.optim import build_optimizer, build_scheduler
from lorafit.train.progress import Progress
from lorafit.train.record import MetricsLog, data_fingerprint, library_versions, peak_cpu_memory_gb, write_json_atomic
from lorafit.train.staging import Lookahead, MicroInputs, host_inputs
from lorafit.train.trackers import Trackers
from lorafit.train.watch import TrainingWatch


@dataclass
class RunResult:
    output_dir: Path
    artifact_dir: Path  # adapter/ (qlora, lora) or model/ (full)
    before: dict = field(default_factory=dict)
    after: dict = field(default_factory=dict)
    history: list[dict] = field(default_factory=list)
    best: dict = field(default_factory=dict)  # scores of the best evaluation during training, with its "step"
    stopped_early: bool = False


def lower_is_better(metric: str) -> bool:
    return "loss" in metric or "perplexity" in metric


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise LorafitError(f"device '{name}' asked for, but no CUDA GPU is visible")
    return torch.device(name)


def fit_to_gpu_budget(cfg: Config, device: torch.device, progress: Progress) -> Config:
    """Settings from the memory plan for `cfg.gpu_memory`, and the allocator capped there (so the run behaves as
    on that card). The effective batch stays; the plan picks micro-batch, accumulation and checkpointing."""
    from lorafit.plan import budget_bytes, fit_to_budget

    budget = budget_bytes(cfg.gpu_memory)
    overrides = fit_to_budget(cfg, budget)
    cfg = load_config(overrides=merge_settings(config_to_dict(cfg), overrides))
    streaming = f", {cfg.model.resident_layers} decoder layers resident, the rest streamed from CPU memory"
    progress.say(f"gpu memory {cfg.gpu_memory} ({budget / 2**30:.1f} GiB): micro_batch_size {cfg.micro_batch_size}, "
                 f"grad_accum {cfg.grad_accum}, gradient_checkpointing {cfg.gradient_checkpointing}, "
                 f"kept_layers {cfg.kept_layers}, max_length {cfg.data.max_length}"
                 + (streaming if cfg.model.stream_layers == "on" else "")
                 + (f", offload_checkpoints on, mlp_chunk_tokens {cfg.mlp_chunk_tokens} (long rows)"
                    if overrides.get("offload_checkpoints") else ""))
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()  # "cuda" has no index
        total = torch.cuda.get_device_properties(index).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, budget / total), index)
    else:
        progress.say("no GPU: the budget only chose the settings")
    return cfg


def train(cfg: Config, progress: Progress | None = None) -> RunResult:
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    progress = progress or Progress()
    device = resolve_device(cfg.device)
    d, device = distributed.setup(device)  # under torchrun: one process per GPU; otherwise d.world == 1
    if not d.main:
        progress = Progress(quiet=True)  # rank 0 speaks and writes for all
    if d.world > 1 and cfg.model.stream_layers == "auto":
        cfg.model.stream_layers = "off"  # several GPUs shard the base (distributed) rather than stream it
    if cfg.gpu_memory:
        cfg = fit_to_gpu_budget(cfg, device, progress)
    # report_to (rank 0's); a missing package stops us here
    trackers = Trackers(cfg.report_to if d.main else [], out, config_to_dict(cfg))
    # GPU: bf16 weights and compute (fp32 LoRA masters under autocast); CPU: fp32 throughout (bf16 is slow there).
    dtype = torch.bfloat16 if device.type == "cuda" and cfg.method != "full" else torch.float32
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if device.type == "cuda" else None
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)

    if cfg.model.fp8_base and not fp8_supported(device):  # before minutes of loading
        raise LorafitError(f"model.fp8_base: {device} cannot run row-wise scaled FP8 GEMMs (they need compute "
                           "capability 9.0 or newer: H100, H200); set model.fp8_base false")

    # 1. model and data
    progress.say(f"loading {cfg.model.path} ({cfg.method}) on {device}")
    stream_resident = (cfg.model.resident_layers or 0) if cfg.model.stream_layers == "on" else None
    if stream_resident is not None and d.world > 1:
        raise LorafitError("model.stream_layers on is for one GPU; with several, distributed fsdp shards the base")
    loaded = load_model(cfg.model.path, device, dtype, quantize=cfg.method == "qlora",
                        trust_remote_code=cfg.model.trust_remote_code, allow_pickle=cfg.model.allow_pickle,
                        stream_resident=stream_resident)
    model, tokenizer = loaded.model, loaded.tokenizer
    if cfg.model.fp8_base:
        progress.say(f"frozen base in FP8: {use_fp8_base(model)} NF4 linears compute in e4m3"
                     + (" (CPU: the plain-PyTorch twin, slow)" if device.type == "cpu" else ""))
    if loaded.streamer is not None:  # model/stream.py
        s = loaded.streamer
        progress.say(f"streaming decoder layers {s.first}-{len(s.layers) - 1} from pinned CPU memory "
                     f"({len(s.streamed) * s.layer_bytes() / 2**30:.1f} GiB), {s.first} resident")
    ensure_chat_template(tokenizer)
    train_examples, val_examples, train_report, val_report = build_datasets(cfg.data, tokenizer, cfg.seed)
    progress.data_report(train_report, val_report)
    eval_conversations = load_eval_conversations(cfg, val_report) if cfg.eval.metrics else []

    # 2. wrap: adapters on a frozen base, or everything trainable
    if cfg.method in ("qlora", "lora"):
        apply_lora(model, cfg.lora)
    else:
        model.requires_grad_(True)
    model.gradient_checkpointing = cfg.gradient_checkpointing
    model.offload_checkpoints = cfg.offload_checkpoints
    model.kept_layers = cfg.kept_layers
    model.offloaded_layers = cfg.offload_activations
    for layer in model.model.layers:
        layer.mlp.chunk_tokens = cfg.mlp_chunk_tokens
    d = distributed.prepare(model, cfg, d, device, progress.say)  # several processes: data parallel or FSDP2
    tied = model.lm_head.weight is model.model.embed_tokens.weight
    cpu_embeddings = device.type == "cuda" and wants_cpu_embeddings(cfg.model.embeddings_on_cpu, tied, cfg.method,
                                                                    d.world)
    if cpu_embeddings:
        table = model.model.embed_tokens.to("cpu").weight
        progress.say(f"input embedding table kept in CPU memory ({table.nbytes / 2**30:.2f} GiB off the GPU)")
    elif cfg.model.embeddings_on_cpu == "on":
        progress.say("model.embeddings_on_cpu on, but not for this run: it needs one GPU, lora or qlora, and a table "
                     "that is not tied to the LM head")
    trainable = [p for p in model.parameters() if p.requires_grad]
    progress.say(f"trainable parameters: {sum(p.numel() for p in trainable):,} "
                 f"of {sum(p.numel() for p in model.parameters()):,}")

    # 3. schedule, optimizer, resume. A step is one global batch (micro-batch x accumulation x processes); the
    # data position is the global row reached, so a resume on another number of processes continues from there.
    pad_id = tokenizer.pad_token_id
    stream = BatchStream(train_examples, cfg.data.max_length, cfg.data.packing, cfg.seed, pad_id)
    graphed = graphs_used = None  # the micro-step as a recorded CUDA graph (train/graphs.py)
    if cfg.cuda_graphs != "off":
        why_not = graphs_unavailable(cfg, device, d.world, loaded.streamer is not None)
        if why_not is None and cfg.cuda_graphs == "auto":
            why_not = graphs_would_not_pay(cfg)
        if why_not is None:
            graphed = graphs_used = GraphedMicroStep(model, trainable, torch.bfloat16, progress.say)
            stream.pad_to = cfg.data.max_length  # one shape to record
            progress.say(f"CUDA graphs: each micro-step of {cfg.micro_batch_size} x {cfg.data.max_length} "
                         "tokens recorded once, then replayed")
        elif cfg.cuda_graphs == "on":
            progress.say(f"cuda_graphs on, but not for this run: {why_not}")
    rows_per_step = cfg.micro_batch_size * cfg.grad_accum * d.world
    checkpoint = find_resume_checkpoint(out, cfg.resume) if cfg.resume else None
    meta = read_meta(checkpoint) if checkpoint else {}
    start_step = meta.get("step", 0)
    start_row = meta.get("rows", start_step * rows_per_step)
    total_steps = cfg.max_steps or max(1, start_step + math.ceil(
        (cfg.epochs * stream.rows_per_epoch() - start_row) / rows_per_step))
    host_table = model.model.embed_tokens.weight if cpu_embeddings else None

    def first_row(step: int) -> int:
        """The global row a step starts at."""
        return start_row + (step - start_step) * rows_per_step

    def step_inputs(step: int, micro_batch_size: int) -> list[MicroInputs]:
        """This process's micro-batches of a step (its share of the rows: every d.world-th), ready on the host."""
        rows = d.local_rows(first_row(step), rows_per_step)
        return [host_inputs(stream.batch_of(rows[j:j + micro_batch_size])[0], host_table, device.type == "cuda")
                for j in range(0, len(rows), micro_batch_size)]

    lookahead = Lookahead(step_inputs)
    # the adapters in one buffer: the optimizer, gradient clip and gradient sync take one tensor (train/flat.py)
    flat = flatten(trainable) if cfg.method != "full" and d.strategy != "fsdp" else None
    stepped = [flat.param] if flat is not None else trainable
    optimizer = build_optimizer(stepped, distributed.optimizer_name(cfg.optimizer, d.strategy), cfg.learning_rate,
                                cfg.weight_decay, device)

    def zero_grads() -> None:
        if flat is not None:  # the model's .grad are views of the flat buffer: zeroed, never set to None
            flat.zero_grad()
        else:
            optimizer.zero_grad(set_to_none=graphed is None)

    scheduler = build_scheduler(optimizer, cfg.lr_schedule, int(cfg.warmup_ratio * total_steps), total_steps)
    before, best, evals_since_best, stopped_early = {}, {}, 0, False
    if checkpoint:
        meta = load_checkpoint(checkpoint, model, optimizer, scheduler, flat)
        before, best = meta.get("before", {}), meta.get("best", {})
        progress.say(f"resumed from {checkpoint} at step {start_step}")
    log = MetricsLog(out, keep_until_step=start_step, trackers=trackers) if d.main else distributed.RankLog()

    def evaluate(tag: str, generation: bool) -> dict:
        if graphed is not None:
            graphed.release()  # its memory pool; the next micro-batch records again
        # every rank evaluates (FSDP needs all in each forward); rank 0 writes, and its scores decide for all.
        # An FP8 base trains in FP8 but is scored as it will be served: in bf16.
        with fp8_base_off(model):
            scores = evaluate_run(model, tokenizer, val_examples, eval_conversations if generation else [], cfg, tag,
                                  out if d.main else None, autocast)
        return distributed.broadcast(scores)

    # 4. the base model before any step (LoRA's B starts at zero, so this is the base exactly)
    if cfg.eval.before_training and start_step == 0:
        before = evaluate("before", generation=True)
        progress.scores("base model", before)
        log.write({"step": 0, **{f"eval/{k}": v for k, v in before.items() if isinstance(v, (int, float))}})

    # 5. train. Each step covers the same rows whatever the micro-batch size, so an out-of-memory retry with
    # half the micro-batch and twice the accumulation trains on exactly the same effective batch.
    same_world = meta.get("world_size", 1) == d.world
    micro_batch_size = meta.get("micro_batch_size", cfg.micro_batch_size) if same_world else cfg.micro_batch_size
    bad_steps_in_a_row, skipped_steps = 0, 0
    watch = TrainingWatch()  # gradient spikes and overfitting, said once each with remedies
    stop = StopRequest()
    model.train()
    progress.start(total_steps, start_step)
    step = start_step
    try:
        while step < total_steps:
            t0 = time.perf_counter()
            row = first_row(step)
            micro = lookahead.take(step, micro_batch_size)
            # the targets of the whole global batch, so N processes train exactly like one
            num_targets = max(1, int(d.sum([sum(m.batch.num_targets for m in micro)])[0]))
            hidden = batch_loss = None
            loss_total, out_of_memory, graphs_dropped = torch.zeros((), device=device), False, False
            try:
                for i, inputs in enumerate(micro):
                    distributed.set_grad_sync(model, d, i == len(micro) - 1)
                    if graphed is not None:
                        batch_loss = graphed.run(inputs.batch, 1.0 / num_targets, inputs.embeds)
                    else:
                        batch, embeds = inputs.to(device)
                        with autocast() if autocast else contextlib.nullcontext():
                            hidden = model(batch.input_ids, position_ids=batch.position_ids, seq_ids=batch.seq_ids,
                                           inputs_embeds=embeds, cu_seqlens=batch.cu_seqlens,
                                           max_seqlen=batch.max_seqlen)
                            batch_loss, _ = target_loss_sum(model, hidden, batch.labels)
                        hidden = None  # nothing saved for backward refers to it: [tokens, hidden] less there
                        # divide by the targets of the whole accumulated batch: accumulation equals one large batch
                        (batch_loss / num_targets).backward()
                    loss_total += batch_loss.detach()  # on the device: no wait for the GPU per micro-batch
                if step + 1 < total_steps:  # while the GPU finishes this step (train/staging.py)
                    lookahead.prepare(step + 1, micro_batch_size)
                loss_sum = float(loss_total)
            except torch.OutOfMemoryError:
                hidden = batch_loss = loss_total = None  # they hold the failed step's activations
                if graphed is not None:  # the recording's memory pool comes on top of the eager step's
                    graphed.disable()
                    graphed, graphs_dropped, stream.pad_to = None, True, None
                    progress.say(f"out of GPU memory at step {step + 1} with CUDA graphs: they are off for the rest "
                                 "of the run; retrying the step")
                torch.cuda.empty_cache()
                if d.strategy == "fsdp":  # the other ranks wait inside a collective: no coming back from here
                    raise LorafitError("out of GPU memory under FSDP: lower micro_batch_size or data.max_length "
                                       "(see `lorafit plan --gpus N --strategy fsdp`)") from None
                out_of_memory = True
            loss_sum, tokens, oom_ranks, stop_ranks = d.sum([0.0 if out_of_memory else loss_sum,
                                                             sum(m.batch.num_tokens for m in micro),
                                                             out_of_memory, stop.requested])
            if oom_ranks:  # every rank retries the step together
                zero_grads()
                if graphs_dropped:  # one process (graphs need it): first retry as the eager run would have gone
                    continue
                if model.kept_layers and model.gradient_checkpointing:  # first give back the memory they keep
                    progress.say(f"out of GPU memory at step {step + 1}: every layer recomputed now (kept_layers "
                                 f"{model.kept_layers} -> 0); retrying the step")
                    model.kept_layers = 0
                    continue
                if micro_batch_size == 1:
                    raise LorafitError("out of GPU memory at micro-batch 1: shorten data.max_length, turn on "
                                       "gradient_checkpointing, or use method qlora (see `lorafit plan`)") from None
                micro_batch_size //= 2
                progress.say(f"out of GPU memory at step {step + 1}: micro-batch now {micro_batch_size}, accumulation "
                             f"{len(micro) * 2} (effective batch unchanged); retrying the step")
                continue
            distributed.sync_grads(stepped, d)  # data parallel: sum the LoRA gradients over ranks
            grad_norm = torch.nn.utils.clip_grad_norm_(stepped,
                                                       cfg.max_grad_norm if cfg.max_grad_norm > 0 else math.inf)
            grad_norm = distributed.to_float(grad_norm)
            if not (math.isfinite(loss_sum) and math.isfinite(grad_norm)):
                # a NaN/Inf step must not reach the weights; skip it, and stop if it keeps happening
                zero_grads()
                bad_steps_in_a_row, skipped_steps = bad_steps_in_a_row + 1, skipped_steps + 1
                progress.say(f"step {step + 1}: loss or gradient is NaN/Inf, step skipped ({skipped_steps} so far)")
                if bad_steps_in_a_row >= cfg.max_bad_steps:
                    raise LorafitError(f"{bad_steps_in_a_row} steps in a row had NaN/Inf loss or gradients; stopped. "
                                       "Lower learning_rate or check the data; the last checkpoint is kept"
                                       + (f" ({list_checkpoints(out)[-1]})" if list_checkpoints(out) else ""))
                scheduler.step()
                step += 1
                continue
            bad_steps_in_a_row = 0
            optimizer.step()
            scheduler.step()
            zero_grads()
            # no wait for the optimizer here: the next step's copies and forward queue behind it. A step's time is
            # then launch to launch, which over steps is the same as start to finish.
            seconds = time.perf_counter() - t0
            record = {"step": step + 1, "loss": loss_sum / num_targets, "lr": scheduler.get_last_lr()[0],
                      "grad_norm": grad_norm, "tokens": int(tokens), "tokens_per_s": tokens / seconds,
                      "epoch": round(stream.epoch_at(row + rows_per_step), 4), "targets": num_targets,
                      "cpu_mem_gb": peak_cpu_memory_gb()}
            if device.type == "cuda":
                record["gpu_mem_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
            last = step + 1 == total_steps
            if cfg.val_every and (step + 1) % cfg.val_every == 0 and not last and val_examples:
                scores = evaluate(f"step{step + 1}",
                                  generation=bool(cfg.eval.every) and (step + 1) % cfg.eval.every == 0)
                record.update({f"eval/{k}": v for k, v in scores.items() if isinstance(v, (int, float))})
                progress.scores(f"step {step + 1}", scores)
                value = scores.get(cfg.eval.best_metric)
                if value is not None:
                    sign = 1 if lower_is_better(cfg.eval.best_metric) else -1
                    if not best or sign * value < sign * best[cfg.eval.best_metric]:
                        best, evals_since_best = {"step": step + 1, **scores}, 0
                        if cfg.method != "full":
                            with distributed.full_trainable(model):
                                if d.main:
                                    save_adapter(model, out / "best", cfg.lora, base_model=str(loaded.path))
                    else:
                        evals_since_best += 1
                    if cfg.eval.patience and evals_since_best >= cfg.eval.patience:
                        stopped_early = True
                        progress.say(f"early stop at step {step + 1}: {cfg.eval.best_metric} has not improved for "
                                     f"{evals_since_best} evaluations (best {best[cfg.eval.best_metric]:.4g} at step "
                                     f"{best['step']}); the best adapter is in {out / 'best'}")
            for warning in watch.observe(record):
                progress.say(f"[yellow]warning[/yellow] {warning.message}")
                log.write(warning.row)
            if (step + 1) % cfg.log_every == 0 or last:
                log.write(record)
            progress.step(record)
            step += 1
            meta_out = {"before": before, "best": best, "micro_batch_size": micro_batch_size,
                        "rows": row + rows_per_step, "world_size": d.world}
            if (stop_ranks if d.enabled else stop.requested) and not last:  # several processes stop together
                path = save_checkpoint(out, step, model, optimizer, scheduler, meta_out, cfg.keep_checkpoints, flat)
                progress.finish()
                raise Interrupted(f"{stop.signal_name or 'stop'}: checkpoint saved at step {step} in {path}; "
                                  f"continue with `lorafit train ... --output-dir {out} --resume auto`")
            if cfg.save_every and step % cfg.save_every == 0 and not last:
                save_checkpoint(out, step, model, optimizer, scheduler, meta_out, cfg.keep_checkpoints, flat)
            if stopped_early:
                break
    finally:
        stop.restore()
    progress.finish()

    # 6. artifacts, then the fine-tuned model's scores
    artifact = out / ("adapter" if cfg.method != "full" else "model")
    with distributed.full_trainable(model):  # FSDP: the whole adapter on rank 0, one PEFT folder
        if cfg.method == "full" and d.main:
            from lorafit.export.full import save_full_model

            save_full_model(model, tokenizer, artifact)
        elif d.main:
            save_adapter(model, artifact, cfg.lora, base_model=str(loaded.path))
    after = evaluate("after", generation=True)
    progress.scores("fine-tuned", after)
    last_step = step
    log.write({"step": last_step, **{f"eval/{k}": v for k, v in after.items() if isinstance(v, (int, float))}})
    run = {
        "config": config_to_dict(cfg), "base_model": model_identity(loaded.path),
        "data": {"train": data_fingerprint(cfg.data.train), "val": data_fingerprint(cfg.data.val) if cfg.data.val
                 else None, "train_report": train_report.__dict__, "val_report": val_report.__dict__},
        "versions": library_versions(), "device": str(device), "compute_dtype": str(dtype).replace("torch.", ""),
        "steps": last_step, "stopped_early": stopped_early,
        "cuda_graph_replays": graphs_used.replays if graphs_used is not None else 0,
        "metrics": {"before": before, "best": best, "after": after},
        "final_train_loss": log.last_loss,
    }
    if d.main:
        write_json_atomic(out / "run.json", run)
        if cfg.method != "full":
            write_adapter_readme(artifact, run)  # what vLLM/SGLang users and the Hub read first
    trackers.close()
    distributed.teardown()
    progress.summary(before, best, after)
    return RunResult(out, artifact, before, after, log.history, best, stopped_early)
