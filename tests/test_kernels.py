"""Each fast kernel against its plain-PyTorch twin (GPU parts skipped on CPU), and the twins against known values."""

import pytest
import torch

from lorafit.kernels.nf4 import dequantize_nf4_reference, dequantize_nf4_triton
from lorafit.model.quantize import NF4_TENSORS, NF4Linear

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
    assert torch.equal(fast, dequantize_nf4_reference(*tensors, shape=shape, dtype=dtype))
