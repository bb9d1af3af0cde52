"""Several GPUs: one process per GPU (torchrun), data parallel or FSDP2, and the rank-aware helpers the loop uses.

Both strategies train exactly like one process: N processes with micro-batch b equal one with micro-batch N*b.
- `ddp`: every rank holds the whole (NF4) model; after the accumulated backward the trainable gradients (LoRA's:
  40M fp32 numbers for a 7B model at r=16) are summed across ranks with all_reduce, in flat buckets. No
  DistributedDataParallel wrapper: with a frozen base there is little to overlap, and a plain all_reduce after the
  last micro-batch leaves gradient checkpointing and accumulation as they are.
- `fsdp`: `fully_shard` on every decoder layer and on the root (embeddings, final norm, LM head), so each rank
  keeps 1/N of the NF4 codes, norms, LoRA weights, gradients and optimizer states and all-gathers a layer when it
  runs. For models whose NF4 weights do not fit one card beside the activations (Qwen2.5-32B on 24 GB cards).

Loss: each rank divides its target-token loss sum by the target count of the whole global batch (one all_reduce),
and gradients are summed, not averaged, across ranks: the gradient of the global batch. Data: step s covers global
rows s*G ... s*G+G-1 (G = micro_batch_size * grad_accum * N, BatchStream addresses rows by index); rank r takes
rows s*G + r, s*G + r + N, ...: no overlap, and the same rows as one process. Rank 0 alone writes files; every rank
runs the same evaluation (FSDP needs every rank in every forward) and rank 0's scores are broadcast.

FSDP2 with lorafit's NF4 storage, found by experiment (torch 2.13, CPU + gloo, tiny Qwen2 and Llama):
- the frozen uint8 `packed` Parameter, fp32 LoRA A/B and fp32/bf16 norms shard together in one unit per layer as
  they are: when a unit's params differ in dtype FSDP2 all-gathers them through one uint8 buffer
  (_fsdp_collectives.py), and it reduce-scatters only gradients, here all fp32 LoRA gradients. Viewing the codes
  as bf16, or sharding the LoRA separately, is not needed. Gradients match one process to 2e-8.
- no MixedPrecisionPolicy: LoRALinear casts A and B to the activation dtype itself. (It would not harm the codes:
  FSDP2 casts floating-point params only.)
- the NF4 constants (absmax_q, ...) are buffers: FSDP2 leaves them replicated (1/32 of the codes' bytes).
- FSDP2 averages gradients (ReduceOp.AVG) and `set_gradient_divide_factor` sets one FSDP module's groups only;
  without factor 1.0 on every unit the gradients came out 0.5x. Sum-only comms because gloo has no PREMUL_SUM.
- the root unit stays unsharded after forward (FSDP2's rule for the root), which is what lets train/loss.py call
  `model.lm_head` after the forward. It also means embeddings + head are whole on every rank during a step.
- torch.utils.checkpoint around an FSDP layer (CausalLM.forward) works: in backward the recompute's pre-forward
  unshards and its post-forward leaves the params for the layer's backward.
- bitsandbytes' 8-bit optimizers read raw pointers and cannot step DTensor params: FSDP runs use torch AdamW.
"""

from __future__ import annotations

import contextlib
import os
import sys
from dataclasses import dataclass, replace

import torch
import torch.distributed as dist
from torch import nn

from lorafit.errors import LorafitError

BUCKET_NUMEL = 2**24  # gradients summed 64 MB (fp32) at a time: few collectives, a bounded extra buffer
_owned = False  # whether setup() created the process group (and teardown() should destroy it)


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    strategy: str = "single"  # single | ddp | fsdp

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    def local_rows(self, start: int, count: int) -> list[int]:
        """This rank's rows of the global rows start..start+count: every N-th, starting at its rank."""
        return list(range(start + self.rank, start + count, self.world))

    def sum(self, values: list[float]) -> list[float]:
        """Sum of each value over the ranks (the values themselves in one process)."""
        if not self.enabled:
            return [float(v) for v in values]
        t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=_comm_device())
        dist.all_reduce(t)
        return t.tolist()


# --- module-level helpers, usable where no Dist is at hand (checkpoints, generation) ---------------------------------


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_main() -> bool:
    return world_size() == 1 or dist.get_rank() == 0


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


def any_rank(flag: bool) -> bool:
    """True if `flag` is true on any rank: a decision every rank must take together (stop generating, stop)."""
    if world_size() == 1:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=_comm_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def all_ranks(flag: bool) -> bool:
    return not any_rank(not flag)


def broadcast(obj):
    """Rank 0's `obj` on every rank."""
    if world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _comm_device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def launched() -> bool:
    """Inside a torchrun launch of several processes."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def torchrun_command(processes: int, train_args: list[str]) -> list[str]:
    """`lorafit train ARGS` as N processes on this machine through torchrun (a free port found by itself)."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(processes),
            "-m", "lorafit", "train", *train_args]


def launch(processes: int, train_args: list[str], device: str) -> int:
    """Run `lorafit train` as one process per GPU and wait; returns torchrun's exit code. SIGTERM is passed on
    (torchrun hands it to every worker, which saves a checkpoint and stops)."""
    import signal
    import subprocess

    if device != "cpu":
        count = torch.cuda.device_count()
        if count < processes:
            raise LorafitError(f"--gpus {processes}: {count} CUDA GPU(s) visible" +
                               ("; --device cpu runs CPU processes (slow, for testing)" if count == 0 else ""))
    proc = subprocess.Popen(torchrun_command(processes, train_args))
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: proc.send_signal(signum))
    try:
        while True:
            try:
                return proc.wait()
            except KeyboardInterrupt:  # the workers got Ctrl-C too (same terminal); wait for their checkpoint
                continue
    finally:
        signal.signal(signal.SIGTERM, previous)


def env_rank() -> int:
    """This process's rank as torchrun set it (0 outside a launch), valid also after teardown."""
    return int(os.environ.get("RANK", "0"))


# --- setup, strategy, wrapping ---------------------------------------------------------------------------------------


def setup(device: torch.device) -> tuple[Dist, torch.device]:
    """Join the process group torchrun described in the environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_*).

    One process: nothing happens. On GPUs each process takes cuda:LOCAL_RANK and NCCL; on CPU, gloo.
    """
    global _owned
    if not launched():
        return Dist(), device
    rank, world, local = (int(os.environ[k]) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
    if device.type == "cuda":
        if local >= torch.cuda.device_count():
            raise LorafitError(f"process {rank} wants GPU {local}, but only {torch.cuda.device_count()} are visible")
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                device_id=device if device.type == "cuda" else None)
        _owned = True
    return Dist(rank, world, local), device


def teardown() -> None:
    global _owned
    if _owned and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    _owned = False


def choose_strategy(cfg, world: int, device: torch.device) -> tuple[str, str]:
    """(strategy, reason). `distributed: auto` asks the memory planner whether the whole model fits one GPU beside
    the run's activations (then data parallel, the faster) or must be sharded (FSDP)."""
    if cfg.distributed != "auto":
        return cfg.distributed, "set by the config"
    if device.type != "cuda":
        return "ddp", "no GPU memory to save"
    from lorafit.plan import budget_bytes
    from lorafit.plan.fit import run_from_config
    from lorafit.plan.presets import CUDA_CONTEXT_BYTES, Card, PlanError
    from lorafit.plan.shard import make_shard_plan

    try:
        shape, run, _ = run_from_config(cfg)
    except PlanError as e:
        return "ddp", f"the planner cannot read this model ({e})"
    if cfg.method == "full":
        return "ddp", "the multi-GPU plan covers LoRA and QLoRA; set distributed: fsdp to shard full fine-tuning"
    total = budget_bytes(cfg.gpu_memory) if cfg.gpu_memory else torch.cuda.get_device_properties(device).total_memory
    card = Card("this GPU", "this GPU", int(total), context_bytes=0 if cfg.gpu_memory else CUDA_CONTEXT_BYTES)
    plan = make_shard_plan(shape, run, card, world, "ddp")
    gib = plan.needed / 2**30
    if plan.fits:
        return "ddp", f"the whole model fits one GPU ({gib:.1f} of {card.budget / 2**30:.1f} GiB)"
    return "fsdp", f"the whole model needs {gib:.1f} GiB on each GPU, {card.budget / 2**30:.1f} are free: sharded"


def optimizer_name(name: str, strategy: str) -> str:
    """FSDP steps DTensor params, which bitsandbytes' 8-bit optimizers cannot (they read raw pointers)."""
    if strategy != "fsdp":
        return name
    if name in ("adamw_8bit", "paged_adamw_8bit"):
        raise LorafitError(f"optimizer {name} cannot step FSDP's sharded parameters: use optimizer adamw (or auto) "
                           "with distributed fsdp, or distributed ddp")
    return "adamw"


def shard_model(model: nn.Module, d: Dist, device: torch.device) -> nn.Module:
    """FSDP2: one unit per decoder layer, and the root for embeddings, final norm and LM head; gradients summed."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FSDPModule, fully_shard

    mesh = init_device_mesh(device.type, (d.world,))
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_gradient_divide_factor(1.0)  # sum: the loss is already divided by the global target count
            module.set_force_sum_reduction_for_comms(True)
    return model


def prepare(model: nn.Module, cfg, d: Dist, device: torch.device, say) -> Dist:
    """Pick the strategy and wrap the model for it (after LoRA is applied, before the optimizer is built)."""
    if not d.enabled:
        return d
    strategy, why = choose_strategy(cfg, d.world, device)
    say(f"{d.world} processes, {'FSDP2 (sharded)' if strategy == 'fsdp' else 'data parallel'}: {why}")
    if strategy == "fsdp":
        shard_model(model, d, device)
    return replace(d, strategy=strategy)


def set_grad_sync(model: nn.Module, d: Dist, enabled: bool) -> None:
    """FSDP: reduce-scatter only after the last micro-batch of a step (gradients accumulate unsharded until then)."""
    if d.strategy == "fsdp":
        model.set_requires_gradient_sync(enabled)


def sync_grads(params: list[nn.Parameter], d: Dist) -> None:
    """Data parallel: sum the trainable gradients over ranks, a bucket at a time (FSDP has already reduced them)."""
    if d.strategy != "ddp":
        return
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    grads = [p.grad for p in params]
    start = 0
    while start < len(grads):
        end, numel = start, 0
        while end < len(grads) and (end == start or numel + grads[end].numel() <= BUCKET_NUMEL):
            numel += grads[end].numel()
            end += 1
        flat = torch.cat([g.reshape(-1) for g in grads[start:end]])
        dist.all_reduce(flat)
        offset = 0
        for g in grads[start:end]:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()
        start = end


def to_float(value) -> float:
    """A scalar that may be a DTensor (clip_grad_norm_ over FSDP gradients returns one)."""
    return float(value.full_tensor() if hasattr(value, "full_tensor") else value)


# --- full tensors in, full tensors out: checkpoints and adapters hold unsharded weights ------------------------------


def _is_dtensor(t) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


@contextlib.contextmanager
def full_trainable(model: nn.Module):
    """Inside, the model's trainable parameters are whole (all-gathered) tensors, so `named_parameters`,
    `save_adapter` and `trainable_state` see what one process would; the shards come back on exit. Every rank must
    enter (the all-gathers are collective); outside FSDP it does nothing."""
    swapped = []
    for module in model.modules():
        for name, p in list(module._parameters.items()):
            if p is not None and p.requires_grad and _is_dtensor(p):
                module._parameters[name] = nn.Parameter(p.detach().full_tensor(), requires_grad=True)
                swapped.append((module, name, p))
    try:
        yield model
    finally:
        for module, name, p in swapped:
            module._parameters[name] = p


def full_optimizer_state(optimizer) -> dict:
    """optimizer.state_dict() with every sharded state tensor all-gathered to a whole CPU tensor (collective)."""
    state = optimizer.state_dict()  # its per-parameter dicts are the optimizer's own: build new ones
    state["state"] = {index: {key: value.full_tensor().cpu() if _is_dtensor(value) else value
                              for key, value in state["state"][index].items()} for index in sorted(state["state"])}
    return state


def shard_like(full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """`full` cut as `like` is sharded (this rank's piece, no communication); `full` itself for a plain tensor."""
    if not _is_dtensor(like):
        return full
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(full.to(like.device, like.dtype), like.device_mesh, like.placements, src_data_rank=None)


def shard_optimizer_state(optimizer, state: dict) -> dict:
    """A saved (whole-tensor) optimizer state, each per-parameter tensor sharded like its parameter."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    for index, entry in state["state"].items():
        p = params[int(index)]
        for key, value in entry.items():
            if torch.is_tensor(value) and value.shape == p.shape and value.dim() > 0:
                entry[key] = shard_like(value, p)
    return state


class RankLog:
    """What MetricsLog offers the loop, kept in memory: ranks other than 0 write no files."""

    def __init__(self):
        self.history: list[dict] = []

    def write(self, row: dict) -> None:
        self.history.append(row)

    @property
    def last_loss(self) -> float | None:
        losses = [r["loss"] for r in self.history if "loss" in r]
        return losses[-1] if losses else None
