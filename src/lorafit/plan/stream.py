r"""Layer streaming in the plan: how many decoder layers stay on the GPU, what crosses PCIe, and the step time.

When a QLoRA model's 4-bit base does not fit the budget, model/stream.py keeps the NF4 weights of decoder layers
K..L-1 in pinned CPU memory and copies each onto the GPU while the layer before it computes. The planner takes the
most resident layers K that still fit (memory.weight_lines counts K layers of NF4 plus two one-layer slots), over
the micro-batch settings `fit.fastest` tries, and keeps the setting with the best predicted tokens/s:

    compute of a layer pass   c_f = (2 M n + 2 B T^2 q) / MATMUL + deq        forward
                              c_b = (2 M n + 5 B T^2 q) / MATMUL + deq (+ c_f with checkpointing: recomputation)
    copy of a layer           x   = layer NF4 bytes / PCIE
    step                      L (c_f + c_b) + (L - K - 2) (max(c_f, x) - c_f + max(c_b, x) - c_b) + head

for M = B T tokens, n weights per layer, q = heads x head_dim, deq = one dequantization's memory traffic. The base
needs only its input gradient (it is frozen), so backward costs one matmul per linear; attention backward about
2.5 forwards. A steady step copies 2 (L - K) - 4 layers: each streamed layer once per direction, less the two that
are still in their slots at each turn (model/stream.py), each copy overlapped with the compute of the layer before,
hence the max. LoRA's rank-r matmuls (under 1% of the FLOPs at r=16 on 8k-wide layers) are left out.

The rates are a priori numbers for an H100 host, to be replaced by bench/bench_stream.py's measurements:
PCIE_BYTES_PER_S is host-to-device from pinned memory on a PCIe Gen5 x16 host as commonly measured (~25 GB/s of the
link's 64), MATMUL_FLOPS_PER_S 40% of the H100's 989 TFLOP/s dense bf16 (lorafit's whole step reached ~210 on
Qwen2.5-1.5B at 16k tokens, BENCHMARKS.md, where small matrices and per-layer overheads dominate; 70B's 8k x 28k
matrices run closer to peak), HBM_BYTES_PER_S 90% of the H100 SXM's 3.35 TB/s.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from lorafit.plan.fit import Choice, candidate_runs, make_plan
from lorafit.plan.memory import Run, stream_layer_bytes
from lorafit.plan.presets import Card, Shape

PCIE_BYTES_PER_S = 25e9
MATMUL_FLOPS_PER_S = 400e12
HBM_BYTES_PER_S = 3.0e12
DEQUANT_BYTES_PER_WEIGHT = 4.5  # read 0.5 + write 2 + the GEMM's read 2 (kernels/nf4.py)


@dataclass
class StreamTime:
    """Predicted time and traffic of one optimizer step with layer streaming."""

    resident: int  # decoder layers whose NF4 weights stay on the GPU
    layers: int
    layer_bytes: int  # one streamed layer's NF4 tensors
    copies_per_step: int  # layer copies of a steady step (all micro-batches)
    compute_s: float  # the step's compute alone (what it would take with every layer resident)
    copy_s: float  # the step's copies alone, at PCIE_BYTES_PER_S
    step_s: float  # both, overlapped layer by layer

    @property
    def streamed_bytes_per_step(self) -> int:
        return self.copies_per_step * self.layer_bytes

    def as_dict(self, run: Run) -> dict:
        return {"resident_layers": self.resident, "layers": self.layers, "layer_bytes": self.layer_bytes,
                "copies_per_step": self.copies_per_step, "streamed_bytes_per_step": self.streamed_bytes_per_step,
                "compute_s": self.compute_s, "copy_s": self.copy_s, "step_s": self.step_s,
                "tokens_per_s": run.tokens * run.grad_accum / self.step_s, "pcie_bytes_per_s": PCIE_BYTES_PER_S,
                "matmul_flops_per_s": MATMUL_FLOPS_PER_S}


def layer_seconds(shape: Shape, run: Run) -> tuple[float, float]:
    """(forward, backward) compute seconds of one decoder layer on one micro-batch; backward includes the
    checkpoint's recomputation."""
    n = sum(i * o for _, i, o, _ in shape.linears())
    q = shape.heads * shape.head_dim
    attention = 2 * run.batch * run.seq ** 2 * q  # causal: half of QK^T and PV
    deq = n * DEQUANT_BYTES_PER_WEIGHT / HBM_BYTES_PER_S
    forward = (2 * run.tokens * n + attention) / MATMUL_FLOPS_PER_S + deq
    backward = (2 * run.tokens * n + 2.5 * attention) / MATMUL_FLOPS_PER_S + deq
    return forward, backward + (forward if run.checkpointing else 0.0)


def stream_time(shape: Shape, run: Run, resident: int) -> StreamTime:
    """Step time of `run` with decoder layers `resident..` streamed (see the module docstring)."""
    L = shape.layers
    streamed = max(0, L - resident)
    forward, backward = layer_seconds(shape, run)
    copy = stream_layer_bytes(shape) / PCIE_BYTES_PER_S
    overlapped = max(0, streamed - 2)  # steady state: two layers per direction are still in their slots
    head = 4 * run.target_tokens * shape.vocab * shape.hidden / MATMUL_FLOPS_PER_S  # forward + input gradient
    compute = L * (forward + backward) + head
    stall = overlapped * (max(forward, copy) - forward + max(backward, copy) - backward)
    return StreamTime(resident, L, stream_layer_bytes(shape), 2 * overlapped * run.grad_accum,
                      compute * run.grad_accum, 2 * overlapped * copy * run.grad_accum,
                      (compute + stall) * run.grad_accum)


def most_resident(shape: Shape, run: Run, card: Card) -> int | None:
    """The most decoder layers that can stay on the GPU while the rest stream; None if even 0 does not fit."""
    if not make_plan(shape, replace(run, resident_layers=0), card).fits:
        return None
    lo, hi = 0, shape.layers
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if make_plan(shape, replace(run, resident_layers=mid), card).fits:
            lo = mid
        else:
            hi = mid - 1
    return lo


def fastest_streaming(shape: Shape, run: Run, card: Card, effective_batch: int | None = None,
                      resident: int | None = None) -> tuple[Choice, StreamTime] | None:
    """The streaming setting (micro-batch, checkpointing, resident layers) with the best predicted tokens/s that
    fits at run.seq; `resident` fixes the number of resident layers. None if nothing fits (QLoRA only)."""
    if run.method != "qlora":
        return None
    best = None
    for candidate in candidate_runs(run, effective_batch or run.batch):
        k = resident if resident is not None else most_resident(shape, candidate, card)
        if k is None:
            continue
        candidate = replace(candidate, resident_layers=k)
        plan = make_plan(shape, candidate, card)
        if resident is not None and not plan.fits:
            continue
        timing = stream_time(shape, candidate, k)
        if best is None or timing.step_s < best[1].step_s:
            best = (Choice(candidate, candidate.grad_accum, plan), timing)
    return best
