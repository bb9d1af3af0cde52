r"""Causal attention inside each example of packed rows: flash attention's variable-length kernel, no mask.

A packed row holds several examples; each token may attend only to earlier tokens of its own example. Written as a
boolean mask [B, 1, T, T], that rules out sdpa's flash kernel, and with grouped-query attention (fewer kv heads) its
memory-efficient kernel too, so sdpa falls back to its math path: it materialises the scores [B, heads, T, T] and
saves them for backward (Qwen2.5-7B at 2048 tokens: 0.23 GB per row per layer, quadratic in T), and it computes
every cross-example block only to mask it out.

Here the row's tokens are cut into segments instead, one per example (and one per row's padding tail), described by
`cu_seqlens` = [0, end of segment 1, end of segment 2, ...] over the flattened [B * T] tokens. Flash attention's
varlen kernel runs causal attention inside each segment: no mask, no scores kept (only a log-sum-exp per token and
head), GQA native, and no work on cross-example blocks. The segments come from the collated batch on the host
(`data.batching.segment_bounds`), so nothing waits for the GPU.

`varlen_attention_reference` is the twin in plain PyTorch (CPU, tests, LORAFIT_REFERENCE_KERNELS=1): causal sdpa on
each segment in turn. The model's own reference for packed rows stays the masked sdpa of `model.llama.build_mask`;
tests/test_varlen_attention.py checks all three against each other, gradients included.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from lorafit.kernels.nf4 import FORCE_REFERENCE


@dataclass(frozen=True)
class Segments:
    """What a packed batch's attention needs instead of a mask: segment ends over the flattened [B * T] tokens
    (int32, on the model's device), the longest segment, and the sliding window (None: unlimited)."""

    cu_seqlens: torch.Tensor
    max_len: int
    window: int | None = None


def _segment_mask(length: int, window: int | None, device) -> torch.Tensor | None:
    if window is None or window >= length:
        return None
    i = torch.arange(length, device=device)
    distance = i[:, None] - i[None, :]
    return (distance >= 0) & (distance < window)


def varlen_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seg: Segments) -> torch.Tensor:
    """q [N, heads, d], k and v [N, kv_heads, d] (N = B * T, segments back to back) -> [N, heads, d]."""
    gqa = q.shape[1] != k.shape[1]
    pieces = []
    for start, end in zip(seg.cu_seqlens[:-1].tolist(), seg.cu_seqlens[1:].tolist()):
        qs, ks, vs = (t[start:end].transpose(0, 1)[None] for t in (q, k, v))  # [1, heads, L, d]
        mask = _segment_mask(end - start, seg.window, q.device)
        out = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask, is_causal=mask is None, enable_gqa=gqa)
        pieces.append(out[0].transpose(0, 1))
    return torch.cat(pieces)


class FlashVarlenAttention(torch.autograd.Function):
    """PyTorch's flash-attention varlen kernels (aten._flash_attention_forward/_backward, the ones sdpa runs for
    nested tensors), called directly. Saves q, k, v, the output and the log-sum-exp, as sdpa's flash path does."""

    @staticmethod
    def forward(ctx, q, k, v, seg: Segments):
        # the window only when there is one: older PyTorch builds have no window arguments
        window = {} if seg.window is None else {"window_size_left": seg.window - 1, "window_size_right": 0}
        out, lse, rng_state, unused, _ = torch.ops.aten._flash_attention_forward(
            q, k, v, seg.cu_seqlens, seg.cu_seqlens, seg.max_len, seg.max_len, 0.0, True, False, **window)
        ctx.save_for_backward(q, k, v, out, lse, rng_state, unused)
        ctx.seg, ctx.window = seg, window
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k, v, out, lse, rng_state, unused = ctx.saved_tensors
        seg = ctx.seg
        dq, dk, dv = torch.ops.aten._flash_attention_backward(
            grad.contiguous(), q, k, v, out, lse, seg.cu_seqlens, seg.cu_seqlens, seg.max_len, seg.max_len, 0.0,
            True, rng_state, unused, **ctx.window)
        return dq, dk, dv, None


_probed: dict = {}


def _probe(device: torch.device) -> None:
    q = torch.randn(16, 4, 64, device=device, dtype=torch.bfloat16, requires_grad=True)
    kv = torch.randn(16, 2, 64, device=device, dtype=torch.bfloat16, requires_grad=True)
    seg = Segments(torch.tensor([0, 9, 16], dtype=torch.int32, device=device), 9)
    FlashVarlenAttention.apply(q, kv, kv, seg).float().sum().backward()


def _flash_varlen_runs(device: torch.device) -> bool:
    """Once per device: forward and backward of a two-segment GQA problem, so that a PyTorch build whose varlen
    kernels are missing or differ costs a warning and the twin, not a failed run."""
    if device not in _probed:
        try:
            with torch.enable_grad():  # the caller may run without gradient (evaluation)
                _probe(device)
            _probed[device] = True
        except RuntimeError as e:
            warnings.warn(f"flash attention's varlen kernel does not run here ({str(e).splitlines()[0][:120]}): "
                          "packed rows take the per-segment sdpa instead", stacklevel=2)
            _probed[device] = False
    return _probed[device]


def flash_supported(q: torch.Tensor) -> bool:
    """PyTorch's flash kernels: Ampere or newer, fp16/bf16, head_dim a multiple of 8 up to 256, and they run."""
    return (q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and q.shape[-1] % 8 == 0
            and q.shape[-1] <= 256 and torch.cuda.get_device_capability(q.device) >= (8, 0)
            and _flash_varlen_runs(q.device))


def varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seg: Segments) -> torch.Tensor:
    """Causal attention inside each segment: q [N, heads, d], k and v [N, kv_heads, d] -> [N, heads, d]. Where
    flash cannot run (older GPUs, fp32) the twin runs: per segment, still without a mask or scores across them."""
    if not FORCE_REFERENCE and flash_supported(q):
        return FlashVarlenAttention.apply(q.contiguous(), k.contiguous(), v.contiguous(), seg)
    return varlen_attention_reference(q, k, v, seg)


def use_varlen(x: torch.Tensor) -> bool:
    """Whether packed rows take the varlen kernel (CUDA fast path) rather than the masked sdpa (the reference).
    Called by the model before its layers, so the one-time probe runs here: inside a checkpointed layer its saved
    tensors would count in the first forward and not in the recomputation, which checkpoint refuses."""
    if not x.is_cuda or FORCE_REFERENCE:
        return False
    _flash_varlen_runs(x.device)
    return True
