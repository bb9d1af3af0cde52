"""Each fast kernel against its plain-PyTorch twin (GPU parts skipped on CPU), and the twins against known values."""

import contextlib

import pytest
import torch

from lorafit.kernels.nf4 import dequantize_nf4_reference, dequantize_nf4_triton
from lorafit.model.quantize import NF4_TENSORS, NF4Linear
from tests.tiny import assert_close_at_scale

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def nf4_linear(out_features, in_features, device="cpu", dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    linear = torch.nn.Linear(in_features, out_features, bias=False)
    return linear, NF4Linear.from_linear(linear, device, dtype)


@pytest.mark.parametrize("shape", [(96, 128), (7, 322), (300, 1000), (64, 16384 + 64)])
def test_nf4_reference_equals_bitsandbytes(shape):
    """Bit for bit what bitsandbytes dequantizes (for matrices at least one 64-block wide: narrower ones it gets
    wrong on the CPU, see export.merge.nf4_round_trip), and within one NF4 step of the original weight."""
    import bitsandbytes as bnb

    linear, module = nf4_linear(*shape)
    packed, state = bnb.functional.quantize_4bit(linear.weight.data, blocksize=64, compress_statistics=True,
                                                 quant_type="nf4")
    assert torch.equal(module.dequantize(), bnb.functional.dequantize_4bit(packed, state))
    step = linear.weight.abs().max() * 0.33  # the widest gap between NF4 codes is ~0.32 of the block's absmax
    assert (module.dequantize() - linear.weight).abs().max() < step


def test_nf4_reference_known_values():
    """One block by hand: codes 0..15 twice with absmax 2 come back as 2 x the NF4 code table."""
    code = torch.linspace(-1, 1, 16)
    packed = torch.tensor([(2 * i << 4) % 256 | (2 * i + 1) % 16 for i in range(8)] * 4, dtype=torch.uint8)
    out = dequantize_nf4_reference(packed, torch.tensor([255], dtype=torch.uint8), torch.linspace(0, 1, 256),
                                   torch.tensor([2.0]), torch.tensor(0.0), code, (1, 64), torch.float32)
    assert torch.allclose(out.view(-1), 2 * code[torch.arange(64) % 16])


def test_nf4_linear_gradient_is_the_dense_gradient():
    _, module = nf4_linear(48, 128)
    x = torch.randn(3, 5, 128, requires_grad=True)
    module(x).pow(2).sum().backward()
    dense = module.dequantize().clone()
    x2 = x.detach().clone().requires_grad_(True)
    (x2 @ dense.t()).pow(2).sum().backward()
    torch.testing.assert_close(x.grad, x2.grad)


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("shape", [(96, 128), (7, 322), (3584, 18944), (151936 // 64, 1536)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_nf4_triton_equals_reference(shape, dtype):
    _, module = nf4_linear(*shape, device="cuda", dtype=torch.bfloat16)
    tensors = [getattr(module, name) for name in NF4_TENSORS]
    fast = dequantize_nf4_triton(*tensors, shape=shape, dtype=dtype)
    # fp32: the kernel's fused multiply-add may round once where PyTorch rounds twice
    torch.testing.assert_close(fast, dequantize_nf4_reference(*tensors, shape=shape, dtype=dtype),
                               rtol=2 * torch.finfo(dtype).eps, atol=0)


@pytest.mark.parametrize("quantized", [False, True])
@pytest.mark.parametrize("dropout", [0.0, 0.3])
@pytest.mark.parametrize("bias", [False, True])
def test_fused_lora_equals_plain_composition(quantized, dropout, bias):
    """kernels.lora.LoRAFunction against autograd through LoRALinear.reference_forward: output, input gradient and
    both adapter gradients, on odd shapes."""
    from lorafit.model.lora import LoRALinear

    torch.manual_seed(0)
    base = torch.nn.Linear(67, 45, bias=bias)
    if quantized:
        base = NF4Linear.from_linear(base, "cpu", torch.float32)
    layer = LoRALinear(base, r=5, alpha=7, dropout=dropout)
    torch.nn.init.normal_(layer.lora_B.weight)
    x = torch.randn(3, 11, 67)
    results = []
    for forward in (layer.forward, layer.reference_forward):
        torch.manual_seed(1)  # the same dropout mask
        xi = x.clone().requires_grad_(True)
        y = forward(xi)
        (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
        results.append((y.detach(), xi.grad, layer.lora_A.weight.grad.clone(), layer.lora_B.weight.grad.clone()))
        layer.zero_grad(set_to_none=True)
    for fused, plain in zip(*results):
        assert_close_at_scale(fused, plain)


def _swiglu_lora_runs(layer, gate, up, autocast=None):
    """(output, gate and up gradients, A and B gradients) of the product-free Function and of the plain composition."""
    from lorafit.kernels.fused import swiglu_reference

    results = []
    for forward in (layer.forward_swiglu, lambda g, u: layer.reference_forward(swiglu_reference(g, u))):
        g, u = gate.clone().requires_grad_(True), up.clone().requires_grad_(True)
        with autocast or contextlib.nullcontext():
            y = forward(g, u)
        (y.float() * torch.linspace(-1, 1, y.numel(), device=y.device).view_as(y)).sum().backward()
        results.append((y.float(), g.grad, u.grad, layer.lora_A.weight.grad.clone(), layer.lora_B.weight.grad.clone()))
        layer.zero_grad(set_to_none=True)
    return results


@pytest.mark.parametrize("quantized", [False, True])
@pytest.mark.parametrize("bias", [False, True])
def test_swiglu_lora_equals_plain_composition_and_keeps_no_product(quantized, bias):
    """kernels.swiglu_lora (down_proj over silu(gate) * up, the product made again in backward) against autograd
    through the plain composition: output and all four gradients; and it keeps two [tokens, intermediate] tensors
    for backward where the composition keeps three."""
    from lorafit.model.lora import LoRALinear

    torch.manual_seed(0)
    base = torch.nn.Linear(67, 45, bias=bias)
    if quantized:
        base = NF4Linear.from_linear(base, "cpu", torch.float32)
    layer = LoRALinear(base, r=5, alpha=7)
    torch.nn.init.normal_(layer.lora_B.weight)
    gate, up = torch.randn(3, 11, 67), torch.randn(3, 11, 67)
    fast, plain = _swiglu_lora_runs(layer, gate, up)
    for a, b in zip(fast, plain):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert all(t is not None and t.abs().sum() > 0 for t in fast)

    def wide_tensors_saved(forward):
        wide = []
        hooks = (lambda t: wide.append(t.untyped_storage().data_ptr()) if t.shape[-1] == 67 and t.dim() > 1
                 and t.numel() >= 33 * 67 else None, lambda t: t)
        g, u = gate.clone().requires_grad_(True), up.clone().requires_grad_(True)
        with torch.autograd.graph.saved_tensors_hooks(lambda t: (hooks[0](t), t)[1], hooks[1]):
            forward(g, u)
        return len(set(wide))

    from lorafit.kernels.fused import swiglu_reference

    assert wide_tensors_saved(layer.forward_swiglu) == 2
    # eager: gate, silu(gate), up and the product (the compiled SwiGLU on CUDA saves gate and up: three in all)
    assert wide_tensors_saved(lambda g, u: layer(swiglu_reference(g, u))) == 4


def _grads(fn, *inputs):
    inputs = [t.detach().clone().requires_grad_(True) for t in inputs]
    out = fn(*inputs)
    out = out if isinstance(out, tuple) else (out,)
    torch.manual_seed(3)
    sum((o.float() * torch.randn_like(o, dtype=torch.float32)).sum() for o in out).backward()
    return [o.detach().float() for o in out] + [t.grad.float() for t in inputs]


@pytest.mark.gpu
@cuda
def test_compiled_elementwise_kernels_equal_eager():
    """RMSNorm, RoPE and SwiGLU compiled by Inductor against eager PyTorch, outputs and gradients, bf16, odd sizes."""
    from lorafit.kernels import fused

    torch.manual_seed(0)
    bf16 = dict(device="cuda", dtype=torch.bfloat16)
    cases = [
        (fused.rms_norm_reference, (torch.randn(3, 37, 1000, **bf16), torch.rand(1000, **bf16) + 0.5), (1e-6,)),
        (fused.rope_reference, (torch.randn(2, 7, 37, 64, **bf16), torch.randn(2, 3, 37, 64, **bf16),
                                torch.randn(2, 37, 64, **bf16), torch.randn(2, 37, 64, **bf16)), ()),
        (fused.swiglu_reference, (torch.randn(5, 37, 300, **bf16), torch.randn(5, 37, 300, **bf16)), ()),
    ]
    for reference, tensors, extra in cases:
        eager = _grads(lambda *t, reference=reference, extra=extra: reference(*t, *extra), *tensors)
        fast = _grads(lambda *t, reference=reference, extra=extra: fused._fast(reference)(*t, *extra), *tensors)
        for a, b in zip(fast, eager):  # Inductor keeps fp32 between ops where eager rounds to bf16
            assert ((a - b).norm() / b.norm()).item() < 1e-2, reference.__name__


@pytest.mark.gpu
@cuda
def test_fused_lora_equals_plain_composition_on_gpu_bf16():
    from lorafit.model.lora import LoRALinear

    _, base = nf4_linear(1000, 1536, device="cuda", dtype=torch.bfloat16)
    layer = LoRALinear(base, r=16, alpha=32)
    torch.nn.init.normal_(layer.lora_B.weight, std=0.02)
    x = torch.randn(4, 129, 1536, device="cuda")
    results = []
    for forward in (layer.forward, layer.reference_forward):
        xi = x.clone().requires_grad_(True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y = forward(xi)
        (y.float() * torch.linspace(-1, 1, y.numel(), device="cuda").view_as(y)).sum().backward()
        results.append((y.float(), xi.grad, layer.lora_A.weight.grad.clone(), layer.lora_B.weight.grad.clone()))
        layer.zero_grad(set_to_none=True)
    for fused, plain in zip(*results):
        assert ((fused - plain).norm() / plain.norm()).item() < 1e-2


def test_cross_entropy_grad_reference_known_values():
    logits = torch.tensor([[0.0, 0.0, 0.0, 0.0], [2.0, 0.0, 0.0, 0.0]])
    loss = __import__("lorafit.kernels.cross_entropy", fromlist=["x"]).cross_entropy_grad_reference(
        logits, torch.tensor([1, 0]))
    e = torch.exp(torch.tensor(2.0))
    torch.testing.assert_close(loss, torch.stack([torch.log(torch.tensor(4.0)), torch.log(e + 3) - 2]))
    torch.testing.assert_close(logits[0], torch.tensor([0.25, -0.75, 0.25, 0.25]))
    torch.testing.assert_close(logits[1], torch.stack([e / (e + 3) - 1] + [1 / (e + 3)] * 3))


def test_fused_linear_cross_entropy_equals_autograd():
    """Loss and dL/dhidden of the gradient-in-forward head against F.cross_entropy through autograd, with a chunk
    size that does not divide the row count, and ignored rows (IGNORE_INDEX: no loss, no gradient)."""
    from lorafit.kernels.cross_entropy import linear_cross_entropy_sum

    torch.manual_seed(0)
    hidden, weight = torch.randn(37, 24), torch.randn(101, 24)
    targets = torch.randint(0, 101, (37,))
    targets[::4] = -100
    h1, h2 = hidden.clone().requires_grad_(True), hidden.clone().requires_grad_(True)
    fused = linear_cross_entropy_sum(h1, weight, targets, chunk_tokens=10)
    (fused * 0.5).backward()
    plain = torch.nn.functional.cross_entropy(h2 @ weight.t(), targets, reduction="sum")
    (plain * 0.5).backward()
    torch.testing.assert_close(fused, plain)
    torch.testing.assert_close(h1.grad, h2.grad)
    assert h1.grad[::4].abs().max() == 0 and h1.grad[1::4].abs().min() > 0


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("vocab", [320, 151936 - 5])  # smaller than one 4,096 block (tiny models), and Qwen's
def test_cross_entropy_kernel_equals_reference(vocab):
    from lorafit.kernels.cross_entropy import cross_entropy_grad, cross_entropy_grad_reference

    torch.manual_seed(0)
    logits = torch.randn(67, vocab, device="cuda", dtype=torch.bfloat16) * 4
    targets = torch.randint(0, logits.shape[1], (67,), device="cuda")
    targets[::5] = -100  # ignored rows: loss 0, gradient 0
    fast_logits, ref_logits = logits.clone(), logits.clone()
    fast, ref = cross_entropy_grad(fast_logits, targets), cross_entropy_grad_reference(ref_logits, targets)
    torch.testing.assert_close(fast, ref, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(fast_logits.float(), ref_logits.float(), rtol=1e-2, atol=1e-5)


@pytest.mark.gpu
@cuda
def test_cross_entropy_kernel_loss_holds_while_the_row_is_overwritten():
    """The kernel overwrites each row with its gradient in place; the loss must come from the logits as they were.
    Targets in the first 4,096-wide block are the ones a warp running ahead overwrites first. Many rows and repeats:
    a kernel that read the target's logit after the reductions got 2-4x losses on a few rows of some calls."""
    from lorafit.kernels.cross_entropy import cross_entropy_grad, cross_entropy_grad_reference

    torch.manual_seed(0)
    logits = torch.randn(4096, 49152, device="cuda", dtype=torch.bfloat16) * 3
    targets = torch.randint(0, 4096, (4096,), device="cuda")
    logits[torch.arange(4096), targets] += 8  # confident rows: a wrong target logit moves the loss by ~8
    expected = cross_entropy_grad_reference(logits.clone(), targets)
    for _ in range(20):
        loss = cross_entropy_grad(logits.clone(), targets)
        assert (loss - expected).abs().max().item() < 1e-2


def test_dense_weights_on_cpu_are_the_dequantized_weights_and_go_away():
    from lorafit.model.quantize import dense_weights_on_cpu

    _, module = nf4_linear(48, 128)
    model = torch.nn.Sequential(module)
    with dense_weights_on_cpu(model):
        assert module.dequantize() is module.dequantize()  # cached, not recomputed
        cached = module.dequantize()
    assert torch.equal(cached, module.dequantize()) and module.dequantize() is not module.dequantize()


@pytest.mark.gpu
@cuda
def test_swiglu_lora_equals_plain_composition_on_gpu_bf16():
    """The product-free down_proj with the compiled SwiGLU and its compiled backward, NF4, under autocast, against
    the plain composition: relative error of bf16."""
    from lorafit.model.lora import LoRALinear

    _, base = nf4_linear(1536, 4480, device="cuda", dtype=torch.bfloat16)
    layer = LoRALinear(base, r=16, alpha=32)
    torch.nn.init.normal_(layer.lora_B.weight, std=0.02)
    gate, up = (torch.randn(4, 129, 4480, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    fast, plain = _swiglu_lora_runs(layer, gate, up, torch.autocast("cuda", dtype=torch.bfloat16))
    for a, b in zip(fast, plain):
        assert ((a.float() - b.float()).norm() / b.float().norm()).item() < 1e-2
