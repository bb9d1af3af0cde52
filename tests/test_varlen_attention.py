"""Packed rows as segments (kernels/varlen_attention.py): the segment bounds, the plain-PyTorch twin against the
masked sdpa the model uses as its reference, the model wired through segments, and (GPU) flash attention's varlen
kernel against both, gradients included."""

import pytest
import torch
import torch.nn.functional as F

from lorafit.data.batching import collate, segment_bounds
from lorafit.data.example import Example
from lorafit.kernels.varlen_attention import (
    Segments,
    flash_supported,
    varlen_attention,
    varlen_attention_reference,
)
from lorafit.model import llama
from lorafit.model.llama import build_mask
from lorafit.model.load import load_model
from tests.tiny import assert_close_at_scale, make_tiny_checkpoint

CUDA = torch.cuda.is_available()


def test_segment_bounds_cut_at_examples_padding_and_rows():
    seq_ids = torch.tensor([[0, 0, 0, 1, 1, -1], [0, 0, 0, 0, 0, 0], [0, 1, 2, 2, -1, -1]])
    cu_seqlens, longest = segment_bounds(seq_ids)
    assert cu_seqlens.dtype == torch.int32
    assert cu_seqlens.tolist() == [0, 3, 5, 6, 12, 13, 14, 16, 18]
    assert longest == 6


def test_packed_batch_carries_its_segments_and_unpacked_none():
    examples = [Example(list(range(1, n + 1)), list(range(1, n + 1))) for n in (4, 3, 5)]
    packed = collate(examples, [[0, 1], [2]], pad_id=0, packing=True)
    assert packed.cu_seqlens.tolist() == [0, 4, 7, 12, 14]  # width 7: [4, 3] and [5, padding 2]
    assert packed.max_seqlen == 5
    assert packed.to("cpu").cu_seqlens.tolist() == packed.cu_seqlens.tolist()
    single = collate(examples, [[0], [2]], pad_id=0, packing=True)
    assert single.seq_ids is None and single.cu_seqlens is None


def _packed_qkv(B, T, heads, kv_heads, d, dtype=torch.float32, device="cpu", seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    q, k, v = (torch.randn(B, h, T, d, generator=g, dtype=dtype, device=device).requires_grad_(True)
               for h in (heads, kv_heads, kv_heads))
    lengths = [[5, 9, 2], [16]] if T == 16 else None
    seq_ids = torch.full((B, T), -1, dtype=torch.long)
    for b, row in enumerate(lengths or [[T]] * B):
        start = 0
        for s, n in enumerate(row):
            seq_ids[b, start:start + n] = s
            start += n
    return q, k, v, seq_ids


def _masked(q, k, v, seq_ids, window):
    positions = torch.arange(q.shape[2]).expand(q.shape[0], -1)
    mask = build_mask(positions, seq_ids.cpu(), None, 0, window).to(q.device)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=q.shape[1] != k.shape[1])


def _as_segments(q, k, v, seq_ids, window, fn):
    B, _, T, d = q.shape
    cu_seqlens, longest = segment_bounds(seq_ids.cpu())
    flat = [t.transpose(1, 2).reshape(B * T, t.shape[1], d) for t in (q, k, v)]
    out = fn(*flat, Segments(cu_seqlens.to(q.device), longest, window))
    return out.view(B, T, q.shape[1], d).transpose(1, 2)


def _outputs_and_grads(fn, q, k, v):
    out = fn(q, k, v)
    grads = torch.autograd.grad((out * torch.linspace(-1, 1, out.numel(), device=out.device).view_as(out)).sum(),
                                (q, k, v))
    return out, grads


@pytest.mark.parametrize("kv_heads,window", [(4, None), (1, None), (2, 3)])
def test_reference_equals_masked_sdpa(kv_heads, window):
    q, k, v, seq_ids = _packed_qkv(2, 16, 4, kv_heads, 8)
    want = _outputs_and_grads(lambda *t: _masked(*t, seq_ids, window), q, k, v)
    got = _outputs_and_grads(lambda *t: _as_segments(*t, seq_ids, window, varlen_attention_reference), q, k, v)
    real = (seq_ids >= 0)[:, None, :, None]  # padding rows differ in what they attend to; nothing reads them
    torch.testing.assert_close(got[0] * real, want[0] * real, atol=1e-5, rtol=1e-5)
    for a, b in zip(got[1], want[1]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_the_check_can_fail():
    """One segment for the whole row (attention across examples) gives other outputs than the mask."""
    q, k, v, seq_ids = _packed_qkv(2, 16, 4, 2, 8)
    merged = torch.where(seq_ids >= 0, 0, seq_ids)
    got = _as_segments(q, k, v, merged, None, varlen_attention_reference)
    assert not torch.allclose(got, _masked(q, k, v, seq_ids, None), atol=1e-3)


def test_model_through_segments_equals_the_mask(tmp_path, monkeypatch):
    """The model's packed forward and LoRA-free input gradients through the segments path (the CPU twin, forced)
    equal its masked path; what the CUDA run takes."""
    folder, _ = make_tiny_checkpoint(tmp_path, "qwen2")
    model = load_model(str(folder)).model.eval()
    examples = [Example(torch.randint(1, 256, (n,)).tolist(), [1] * n) for n in (7, 5, 9, 3)]
    batch = collate(examples, [[0, 1], [2, 3]], pad_id=0, packing=True)
    real = (batch.seq_ids >= 0)[..., None]

    def run(segments: bool):
        monkeypatch.setattr(llama, "use_varlen", lambda x: segments)
        embeds = model.embed(batch.input_ids).detach().requires_grad_(True)
        hidden = model(batch.input_ids, position_ids=batch.position_ids, seq_ids=batch.seq_ids,
                       inputs_embeds=embeds, cu_seqlens=batch.cu_seqlens, max_seqlen=batch.max_seqlen)
        (hidden * real).square().sum().backward()
        return hidden * real, embeds.grad

    masked, segmented = run(False), run(True)
    assert_close_at_scale(segmented[0], masked[0])
    assert_close_at_scale(segmented[1], masked[1])


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("heads,kv_heads,d,window", [(28, 4, 128, None), (9, 3, 64, None), (8, 8, 64, 5)])
def test_flash_varlen_equals_reference_and_mask(heads, kv_heads, d, window):
    """bf16 on the GPU: flash attention's varlen kernel against the twin (fp32) and the masked sdpa, gradients
    included, on real packed shapes (GQA 28/4 with head_dim 128 as Qwen2.5-7B, 9/3 with 64 as SmolLM2-135M)."""
    q, k, v, seq_ids = _packed_qkv(2, 16, heads, kv_heads, d, torch.bfloat16, "cuda")
    assert flash_supported(q)  # else both sides below would be the twin
    fast = _outputs_and_grads(lambda *t: _as_segments(*t, seq_ids, window, varlen_attention), q, k, v)
    q32, k32, v32 = (t.detach().float().requires_grad_(True) for t in (q, k, v))
    twin = _outputs_and_grads(lambda *t: _as_segments(*t, seq_ids, window, varlen_attention_reference), q32, k32, v32)
    masked = _outputs_and_grads(lambda *t: _masked(*t, seq_ids, window), q32, k32, v32)
    real = (seq_ids >= 0).cuda()[:, None, :, None]
    for want in (twin, masked):
        torch.testing.assert_close((fast[0] * real).float(), want[0] * real, atol=2e-2, rtol=2e-2)
        for a, b in zip(fast[1], want[1]):
            torch.testing.assert_close(a.float(), b, atol=3e-2, rtol=3e-2)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_flash_varlen_long_packed_row_keeps_no_scores():
    """Qwen2.5-7B's attention shape, one row of 8,192 tokens packed with 8 examples: the forward keeps what flash
    keeps (q, k, v, output, log-sum-exp), not the masked path's [heads, T, T] scores (3.8 GB here)."""
    T, heads, kv_heads, d = 8192, 28, 4, 128
    q, k, v = (torch.randn(T, h, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
               for h in (heads, kv_heads, kv_heads))
    cu_seqlens = torch.arange(0, T + 1, T // 8, dtype=torch.int32, device="cuda")
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    out = varlen_attention(q, k, v, Segments(cu_seqlens, T // 8))
    kept = torch.cuda.memory_allocated() - before
    assert kept < 2 * out.numel() * out.element_size() + 2**20
    out.float().square().sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_packed_rows_train_under_checkpointing_from_a_fresh_probe(tmp_path, monkeypatch):
    """The flash probe runs once per device, the first time packed rows meet the model. Run inside a checkpointed
    layer, its saved tensors counted in the forward but not in the recomputation and backward failed; the model
    now probes before its layers."""
    from lorafit.kernels import varlen_attention as module

    monkeypatch.setattr(module, "_probed", {})
    folder, _ = make_tiny_checkpoint(tmp_path, "qwen2")
    model = load_model(str(folder), device="cuda").model.train()
    model.gradient_checkpointing = True
    examples = [Example(torch.randint(1, 256, (n,)).tolist(), [1] * n) for n in (7, 5, 9, 3)]
    batch = collate(examples, [[0, 1], [2, 3]], pad_id=0, packing=True).to("cuda")
    embeds = model.embed(batch.input_ids).detach().requires_grad_(True)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        hidden = model(batch.input_ids, position_ids=batch.position_ids, seq_ids=batch.seq_ids,
                       inputs_embeds=embeds, cu_seqlens=batch.cu_seqlens, max_seqlen=batch.max_seqlen)
    hidden.float().square().sum().backward()
    assert module._probed == {torch.device("cuda", 0): True} or module._probed == {torch.device("cuda"): True}
    assert torch.isfinite(embeds.grad).all()
