"""The planner's check: run lorafit's real model, LoRA and loss code on the meta device and record every tensor.

`trace_step` builds the model on the meta device (no memory, no compute), wraps it the way `train()` does (NF4,
LoRA, checkpointing), runs the loop body (forward, loss, backward, clip, optimizer states, zero_grad) for a few
steps, with `run.eval` also the validation loss without gradient before and after them, under a dispatch mode that
sees each new tensor storage and, through a weak reference, its release.
On the GPU several kernels take a fast path that meta cannot run; what they allocate and save is stood in for:
- flash attention (`FlashAttention`: saves q, k, v, output, log-sum-exp; backward allocates the gradients, an fp32
  dq accumulator and, for GQA, k/v gradients expanded to all heads);
- RMSNorm, RoPE and SwiGLU compiled by Inductor (`RMSNorm`, `RoPE`, `SwiGLU`: their outputs, and the tensors the
  compiled functions save, which `tests/test_plan.py` checks against torch.compile);
- NF4 dequantization and the cross-entropy kernel model themselves on meta (`kernels.nf4` returns the bf16 weight
  only, `kernels.cross_entropy` the per-row loss, its logits overwritten in place);
- the boolean gather of target positions (`Gather`: meta cannot count a mask's true entries).
Every token is a target unless `run.targets` says otherwise.

`plan.allocator.replay` feeds the allocation stream, preceded by what loading allocates, to a model of PyTorch's
CUDA caching allocator (same block rounding, segment sizes, best-fit splitting and merging), giving the allocated
and reserved peaks the GPU would report. Slow-ish (seconds per configuration); the arithmetic in `memory.py` is what
`plan` uses.
"""

from __future__ import annotations

import contextlib
import functools
import weakref
from dataclasses import dataclass, field

import torch
import torch.utils.checkpoint
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from lorafit.plan.memory import LOSS_CHUNK_TOKENS, MIN_8BIT_NUMEL, PAGED_MIN_NUMEL, Run, blk
from lorafit.plan.presets import Shape


def request(n: int) -> int:
    """The size the caching allocator is asked for: n rounded up to 512 bytes."""
    return max(512, -(-n // 512) * 512)


class LiveBytes(TorchDispatchMode):
    """Allocation events ('a'/'f', storage id, requested bytes) of every storage an op creates; `peak` counts live
    bytes as the allocator's statistics do (`blk`). `labelled`: also what is alive at the peak, as
    {key: (bytes, (op, shape))} in `at_peak` (bench/trace_peak.py)."""

    def __init__(self, labelled: bool = False):
        super().__init__()
        self.seen: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self.events: list[tuple[str, int, int]] = []
        self.live = self.peak = self.count = 0
        self.labelled, self.labels, self.at_peak = labelled, {}, {}

    def add(self, storage, label=None) -> None:
        if storage in self.seen or storage.nbytes() == 0:
            return
        self.count += 1
        key, size, stat = self.count, request(storage.nbytes()), blk(storage.nbytes())
        self.seen[storage] = key
        self.events.append(("a", key, size))
        self.live += stat
        if self.labelled:
            self.labels[key] = (stat, label)
            if self.live > self.peak:
                self.at_peak = dict(self.labels)
        self.peak = max(self.peak, self.live)
        weakref.finalize(storage, self._free, key, size, stat)

    def _free(self, key: int, size: int, stat: int) -> None:
        self.live -= stat
        self.labels.pop(key, None)
        self.events.append(("f", key, size))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self.add(t.untyped_storage(), (func.__name__, tuple(t.shape)) if self.labelled else None)
        return out


class FlashAttention(torch.autograd.Function):
    """What PyTorch's CUDA flash-attention kernel allocates and saves (causal, no mask, GQA native)."""

    @staticmethod
    def forward(ctx, q, k, v):
        B, h, T, d = q.shape
        out = torch.empty(B, T, h, d, dtype=q.dtype, device=q.device).transpose(1, 2)
        lse = torch.empty(B, h, T, dtype=torch.float32, device=q.device)
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k, v, _, _ = ctx.saved_tensors
        B, h, T, d = q.shape
        Tr = -(-T // 128) * 128
        dq, dk, dv = (torch.empty(B, T, x.shape[1], d, dtype=q.dtype, device=q.device) for x in (q, k, v))
        work = [torch.empty(B, h, Tr, device=q.device), torch.empty(B, Tr, h, d, device=q.device)]
        if k.shape[1] != h:
            work += [torch.empty(B, T, h, d, dtype=q.dtype, device=q.device) for _ in range(2)]
        del work
        return dq.transpose(1, 2), dk.transpose(1, 2), dv.transpose(1, 2)


class RMSNorm(torch.autograd.Function):
    """Inductor's compiled `rms_norm`: saves its input as it is and an fp32 1/rms per row (no fp32 copy of the
    input); backward allocates the input gradient and an fp32 per-row sum."""

    @staticmethod
    def forward(ctx, x, weight, eps):
        rstd = torch.empty(*x.shape[:-1], 1, dtype=torch.float32, device=x.device)
        ctx.save_for_backward(x, weight, rstd)
        return torch.empty(x.shape, dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)

    @staticmethod
    def backward(ctx, grad):
        x, weight, rstd = ctx.saved_tensors
        rows = torch.empty_like(rstd)
        gx, gw = (torch.empty_like(t) if need else None for t, need in zip((x, weight), ctx.needs_input_grad))
        del rows
        return gx, gw, None


class RoPE(torch.autograd.Function):
    """Inductor's compiled `rope`: outputs in the inputs' layout, saves only cos and sin (shared by every layer);
    backward allocates contiguous [B, heads, T, d] gradients."""

    @staticmethod
    def forward(ctx, q, k, cos, sin):
        ctx.save_for_backward(cos, sin)
        ctx.shapes = q.shape, k.shape
        return torch.empty_like(q), torch.empty_like(k)

    @staticmethod
    def backward(ctx, gq, gk):
        return (*(torch.empty(s, dtype=gq.dtype, device=gq.device) for s in ctx.shapes), None, None)


class SwiGLU(torch.autograd.Function):
    """Inductor's compiled `swiglu`: saves gate and up (silu(gate) is recomputed in backward)."""

    @staticmethod
    def forward(ctx, gate, up):
        ctx.save_for_backward(gate, up)
        return torch.empty_like(gate)

    @staticmethod
    def backward(ctx, grad):
        gate, up = ctx.saved_tensors
        return torch.empty_like(gate), torch.empty_like(up)


class Gather(torch.autograd.Function):
    """`hidden[:, :-1][keep]` (train.loss) for `n` targets: meta cannot count the mask's true entries. Indexing turns
    the mask into [n, 2] int64 indices (nonzero) and saves the mask; backward scatters into zeros of the input's
    shape, sorting the indices (three [n] int64 work tensors)."""

    @staticmethod
    def forward(ctx, x, keep, n):
        work = torch.empty(n, 2, dtype=torch.long, device=x.device)
        ctx.save_for_backward(keep)
        ctx.shape, ctx.n = x.shape, n
        del work
        return torch.empty(n, *x.shape[keep.dim():], dtype=x.dtype, device=x.device)

    @staticmethod
    def backward(ctx, grad):
        out = grad.new_zeros(ctx.shape)
        work = [torch.empty(ctx.n, 2, dtype=torch.long, device=grad.device)]
        work += [torch.empty(ctx.n, dtype=torch.long, device=grad.device) for _ in range(3)]
        del work
        return out, None, None


def _swiglu_backward(gate, up, grad):
    """The compiled SwiGLU backward: the two gradients, nothing else."""
    return torch.empty_like(gate), torch.empty_like(up)


def _swiglu_input_grads(gate, up, grad):
    """`fused.swiglu_input_grads`: the two gradients, as the halves of one tensor for a stacked gate/up."""
    from lorafit.kernels import fused

    if fused.stacked_base((gate, up)) is None:
        return _swiglu_backward(gate, up, grad)
    both = torch.empty((*gate.shape[:-1], 2 * gate.shape[-1]), dtype=gate.dtype, device=gate.device)
    return both[..., :gate.shape[-1]], both[..., gate.shape[-1]:]


def _sdpa(q, k, v, attn_mask=None, is_causal=False, enable_gqa=False, **_):
    return FlashAttention.apply(q, k, v)


STAND_INS = {"scaled_dot_product_attention": _sdpa, "rms_norm": RMSNorm.apply, "rope": RoPE.apply,
             "swiglu": SwiGLU.apply}


@contextlib.contextmanager
def cuda_kernels():
    """lorafit's model code with the CUDA kernels' allocations: the stand-ins above for flash attention and the
    compiled RMSNorm, RoPE and SwiGLU (`kernels.nf4` and `kernels.cross_entropy` model their CUDA kernels on meta
    themselves), and checkpointing without the RNG state (meta has none)."""
    from lorafit.kernels import fused
    from lorafit.model import llama

    saved = {name: getattr(llama, name) for name in ("rms_norm", "rope", "swiglu")}
    in_fused = fused.swiglu, fused.swiglu_backward, fused.swiglu_input_grads
    sdpa, checkpoint = llama.F.scaled_dot_product_attention, torch.utils.checkpoint.checkpoint
    try:
        for name in saved:
            setattr(llama, name, STAND_INS[name])
        # as kernels.swiglu_lora and fused._SwiGLU call them
        fused.swiglu, fused.swiglu_backward = SwiGLU.apply, _swiglu_backward
        fused.swiglu_input_grads = _swiglu_input_grads
        llama.F.scaled_dot_product_attention = _sdpa
        torch.utils.checkpoint.checkpoint = functools.partial(checkpoint, preserve_rng_state=False)
        yield
    finally:
        for name, fn in saved.items():
            setattr(llama, name, fn)
        fused.swiglu, fused.swiglu_backward, fused.swiglu_input_grads = in_fused
        llama.F.scaled_dot_product_attention, torch.utils.checkpoint.checkpoint = sdpa, checkpoint


def _nf4(lin: torch.nn.Module):
    from lorafit.model.quantize import NF4Linear

    N, K = lin.weight.shape
    bias = lin.bias.detach() if lin.bias is not None else None
    return NF4Linear(N, K, bias, torch.bfloat16, device="meta")


def meta_model(shape: Shape, run: Run):
    """lorafit's CausalLM of this shape on the meta device, wrapped for `run.method` as `train()` wraps it."""
    from transformers import LlamaConfig

    from lorafit.config import LoraConfig
    from lorafit.model.llama import CausalLM, ModelArgs
    from lorafit.model.lora import apply_lora
    from lorafit.model.quantize import is_quantizable

    args = ModelArgs(shape.vocab, shape.hidden, shape.intermediate, shape.layers, shape.heads, shape.kv_heads,
                     shape.head_dim, 1e-6, shape.tied, shape.qkv_bias, shape.o_bias, shape.mlp_bias, shape.qk_norm)
    hf = LlamaConfig(hidden_size=shape.hidden, num_attention_heads=shape.heads, head_dim=shape.head_dim)
    with torch.device("meta"):
        model = CausalLM(args, hf).to(torch.float32 if run.method == "full" else torch.bfloat16)
    if run.method == "qlora":
        for pname, parent in list(model.named_modules()):
            for cname, child in list(parent.named_children()):
                if is_quantizable(f"{pname}.{cname}" if pname else cname, child):
                    setattr(parent, cname, _nf4(child))
    model.model.rotary_emb.inv_freq = torch.empty(shape.head_dim // 2, device="meta")
    if run.method == "full":
        model.requires_grad_(True)
    else:
        apply_lora(model, LoraConfig(r=run.lora_r, target_modules=list(run.lora_targets)))
    return model


def _loss_sum(model, hidden, labels, n: int):
    """train.loss.target_loss_sum for `n` targets, with the boolean gathers stood in for (`Gather`)."""
    from lorafit.data.example import IGNORE_INDEX
    from lorafit.train.loss import _chunk_loss_sum, linear_cross_entropy_sum

    targets = labels[:, 1:]
    keep = targets != IGNORE_INDEX
    hidden = Gather.apply(hidden[:, :-1], keep, n)
    targets = Gather.apply(targets, keep, n)
    if torch.is_grad_enabled() and not model.lm_head.weight.requires_grad:  # LoRA, QLoRA: gradient in forward
        return linear_cross_entropy_sum(hidden, model.lm_head.weight, targets, LOSS_CHUNK_TOKENS)
    total = hidden.new_zeros((), dtype=torch.float32)
    for s in range(0, n, LOSS_CHUNK_TOKENS):
        h, t = hidden[s:s + LOSS_CHUNK_TOKENS], targets[s:s + LOSS_CHUNK_TOKENS]
        if torch.is_grad_enabled() and n > LOSS_CHUNK_TOKENS:
            total = total + torch.utils.checkpoint.checkpoint(_chunk_loss_sum, model.lm_head, h, t, use_reentrant=False)
        else:
            total = total + _chunk_loss_sum(model.lm_head, h, t)
    return total


@dataclass
class Trace:
    load: list[tuple[str, int, int]] = field(default_factory=list)  # what loading allocates, in order
    step: list[tuple[str, int, int]] = field(default_factory=list)  # the training steps
    peak: int = 0  # live tensor bytes at the peak (load + steps)


def load_events(model, off_gpu: tuple[torch.Tensor, ...] = ()) -> list[tuple[str, int, int]]:
    """Loading, in order: NF4 quantization of each linear through a bf16 copy, then the dense rest, then LoRA.
    `off_gpu`: parameters kept in CPU memory (the embedding table with embeddings_on_cpu)."""
    from lorafit.model.quantize import NF4Linear

    events, seen = [], {id(p) for p in off_gpu}
    for _, m in model.named_modules():
        if isinstance(m, NF4Linear):
            n = m.in_features * m.out_features
            blocks = -(-n // 64)
            temp = [2 * n, 4 * blocks, 4 * blocks]  # bf16 weight, fp32 absmax, absmax - offset
            keep = [(n + 1) // 2, 64, 4, blocks, 4 * -(-blocks // 256), 1024]
            events += [("a", id(m) * 16 + i, request(s)) for i, s in enumerate(temp + keep)]
            events += [("f", id(m) * 16 + i, request(s)) for i, s in reversed(list(enumerate(temp)))]
            seen.add(id(m.packed))
    for p in model.parameters():
        if id(p) not in seen and p.numel():
            seen.add(id(p))
            events.append(("a", id(p), request(p.numel() * p.element_size())))
    return events


class HostCopies:
    """model.offload.OffloadState on meta: a saved layer input lives in host memory (not counted); loading it
    allocates the input again, as the copy back to the GPU does."""

    def __init__(self, device):
        self.saved = {}

    def save(self, i, x):
        self.saved[i] = (x.shape, x.dtype)

    def load(self, i):
        shape, dtype = self.saved.pop(i)
        return torch.empty(shape, dtype=dtype, device="meta")


def _remember_without_device_state(ctx, x):
    ctx.cpu_rng, ctx.cuda_rng, ctx.autocast = torch.get_rng_state(), None, ("cpu", torch.bfloat16, False)


@contextlib.contextmanager
def host_offload():
    """Offloaded checkpoints as the meta device can run them: host copies that cost no device memory, and no CUDA
    random state to remember."""
    from lorafit.model import llama, offload

    saved = offload.OffloadState, llama.OffloadState, offload._remember_forward_state
    offload.OffloadState = llama.OffloadState = HostCopies
    offload._remember_forward_state = _remember_without_device_state
    try:
        yield
    finally:
        offload.OffloadState, llama.OffloadState, offload._remember_forward_state = saved


def trace_step(shape: Shape, run: Run, steps: int = 2) -> Trace:
    """Allocation events of loading plus `steps` training steps of lorafit's real code, on the meta device."""
    model = meta_model(shape, run)
    model.gradient_checkpointing = run.checkpointing
    model.kept_layers = run.kept_layers
    model.offload_checkpoints = run.offload_checkpoints
    for layer in model.model.layers:
        layer.mlp.chunk_tokens = run.mlp_chunk
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    cpu_table = run.embeddings_on_cpu and not shape.tied  # its looked-up rows still land on the GPU, as here
    load = load_events(model, (model.model.embed_tokens.weight,) if cpu_table else ())
    tracker = LiveBytes()
    for p in model.parameters():  # known storages: loading already counted them
        tracker.seen[p.untyped_storage()] = -1
    from lorafit.kernels import lora

    def evaluate():  # eval/likelihood.evaluate_loss on one micro-batch, as train() runs it before and after
        with torch.no_grad():
            model.eval()
            _loss_sum(model, model(ids, position_ids=pos), labels, run.target_tokens)
            model.train()

    states: list[torch.Tensor] = []
    B, T = run.batch, run.seq
    with cuda_kernels(), host_offload(), tracker:
        for step in range(steps):
            ids = torch.zeros(B, T, dtype=torch.long, device="meta")
            labels = torch.zeros(B, T, dtype=torch.long, device="meta")
            pos = torch.arange(T, device="meta").expand(B, T).contiguous()  # collate makes [B, T] positions
            if run.eval and step == 0:
                evaluate()
            hidden = model(ids, position_ids=pos)
            loss = _loss_sum(model, hidden, labels, run.target_tokens)
            del hidden  # the loop drops it before the backward: nothing saved for backward refers to it
            (loss / 100).backward()
            torch.nn.utils.clip_grad_norm_(trainable, 1.0)
            if step == 0:  # bitsandbytes' 8-bit AdamW states, made at the first step (and its two maps)
                if run.optimizer != "adamw" and any(p.numel() >= MIN_8BIT_NUMEL for p in trainable):
                    states += [torch.zeros(256, device="meta") for _ in range(2)]
                for p in trainable:
                    n = p.numel()
                    fp32 = n < MIN_8BIT_NUMEL or run.optimizer == "adamw"
                    if fp32 or run.optimizer != "paged_adamw_8bit" or n < PAGED_MIN_NUMEL:
                        states += [torch.zeros_like(p, dtype=torch.float32 if fp32 else torch.uint8)
                                   for _ in range(2)]
                    if not fp32:
                        states += [torch.zeros(-(-n // 256), device="meta") for _ in range(2)]
            lora._count_optimizer_step()  # what optimizer.step() signals: the next forward casts A and B anew
            for p in trainable:
                p.grad = None
        if run.eval:
            evaluate()
    static = sum(blk(s) for k, _, s in load if k == "a") - sum(blk(s) for k, _, s in load if k == "f")
    return Trace(load, tracker.events, static + tracker.peak)
