"""Stacked sibling LoRA linears (kernels/lora_siblings.py): q/k/v and gate/up computed as one, against the same
model computing each linear on its own (the twin)."""

import pytest
import torch

from lorafit.kernels import fused
from lorafit.model import lora as lora_module
from lorafit.model.quantize import use_fp8_base
from lorafit.train.loss import target_loss_sum
from tests.test_graphs import random_batch, tiny_lora_model

fp8_gpu = pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (9, 0),
                             reason="needs a GPU with row-wise scaled FP8 GEMMs (Hopper)")


def _loss_and_grads(model, monkeypatch, stacked: bool, device="cpu", autocast=False):
    monkeypatch.setattr(lora_module, "STACK_SIBLINGS", stacked)
    calls = []
    stack = lora_module.lora_siblings
    monkeypatch.setattr(lora_module, "lora_siblings",
                        lambda x, group: calls.append(len(group.loras)) or stack(x, group))
    batch = random_batch(0).to(torch.device(device))
    model.zero_grad()
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
        loss = target_loss_sum(model, model(batch.input_ids, batch.position_ids, None), batch.labels)[0]
    loss.backward()
    grads = {n: p.grad.float().clone() for n, p in model.named_parameters() if "lora_" in n}
    return float(loss), grads, calls


@pytest.mark.parametrize("family", ["qwen2", "llama"])  # q/k/v biases, none
@pytest.mark.parametrize("checkpointing", [True, False])
def test_stacked_siblings_train_like_each_linear_on_its_own(tmp_path, monkeypatch, family, checkpointing):
    model = tiny_lora_model(tmp_path, family=family)
    model.gradient_checkpointing = checkpointing
    loss_one, grads_one, calls = _loss_and_grads(model, monkeypatch, stacked=False)
    assert calls == []
    loss_stacked, grads_stacked, calls = _loss_and_grads(model, monkeypatch, stacked=True)
    # 2 layers x (q/k/v, gate/up); a recomputed layer runs its forward twice
    assert sorted(calls) == sorted([3, 2] * 2 * (2 if checkpointing else 1))
    assert abs(loss_stacked - loss_one) < 1e-5 * abs(loss_one)
    assert grads_stacked.keys() == grads_one.keys() and len(grads_one) == 28
    for name, grad in grads_one.items():
        assert grad.abs().sum() > 0
        torch.testing.assert_close(grads_stacked[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_stacked_siblings_with_an_fp8_base_match_each_linear_in_fp8(tmp_path, monkeypatch):
    """Forward is the same arithmetic (each sibling's own channel scales); backward's scales span the stacked matrix
    and gradient, so gradients differ by e4m3 rounding only."""
    model = tiny_lora_model(tmp_path)
    use_fp8_base(model)
    loss_one, grads_one, _ = _loss_and_grads(model, monkeypatch, stacked=False)
    loss_stacked, grads_stacked, calls = _loss_and_grads(model, monkeypatch, stacked=True)
    assert calls
    assert abs(loss_stacked - loss_one) < 1e-5 * abs(loss_one)
    one, stacked = (torch.cat([g[n].flatten() for n in sorted(g)]) for g in (grads_one, grads_stacked))
    assert not torch.equal(one, stacked)
    assert torch.nn.functional.cosine_similarity(one, stacked, dim=0) > 0.999


def test_siblings_that_cannot_stack_run_one_by_one(tmp_path, monkeypatch):
    from lorafit.config import LoraConfig
    from lorafit.model.load import load_model
    from tests.tiny import make_tiny_checkpoint

    folder, _ = make_tiny_checkpoint(tmp_path, "qwen2")
    model = load_model(str(folder), torch.device("cpu"), torch.float32, quantize=True).model
    lora_module.apply_lora(model, LoraConfig(r=4, alpha=8, dropout=0.1))  # each sibling has its own dropout mask
    _, _, calls = _loss_and_grads(model.train(), monkeypatch, stacked=True)
    assert calls == []


def test_stacked_base_finds_side_by_side_blocks_only():
    both = torch.randn(2, 5, 12)
    q, k, v = both[..., :6], both[..., 6:9], both[..., 9:]
    assert fused.stacked_base((q, k, v)) is both
    assert fused.stacked_base((q, k, v), widths=[6, 3, 3]) is both
    assert fused.stacked_base((q, k, v), widths=[6, 2, 4]) is None
    assert fused.stacked_base((q, v)) is None  # a gap
    assert fused.stacked_base((k, q, v)) is None  # out of order
    assert fused.stacked_base((both[..., :6], both[..., 6:])) is both
    assert fused.stacked_base((torch.randn(2, 5, 6), torch.randn(2, 5, 6))) is None
    # a view saved for backward comes back without `_base`: found from memory, as a view of the same numbers
    saved = q.detach().as_strided(q.shape, q.stride())
    found = fused.stacked_base((saved, k.as_strided(k.shape, k.stride()), v))
    assert found is not None and found.data_ptr() == both.data_ptr() and torch.equal(found, both.view(10, 12))


def test_swiglu_gradients_of_a_stacked_gate_up_come_as_one_tensor():
    both = torch.randn(7, 16, requires_grad=True)
    gate, up = both[:, :8], both[:, 8:]
    grad = torch.randn(7, 8)
    grad_gate, grad_up = fused.swiglu_input_grads(gate.detach(), up.detach(), grad)
    assert fused.stacked_base((grad_gate, grad_up)) is grad_gate._base is not None
    expected = fused.swiglu_backward_reference(gate.detach(), up.detach(), grad)
    torch.testing.assert_close((grad_gate, grad_up), expected)
    fused.swiglu_trainable(gate, up).backward(grad)
    torch.testing.assert_close(both.grad, torch.cat(expected, dim=1))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("fp8", [False, True])
def test_stacked_siblings_on_gpu_train_like_each_linear_on_its_own(tmp_path, monkeypatch, fp8):
    if fp8 and torch.cuda.get_device_capability() < (9, 0):
        pytest.skip("FP8 needs Hopper")
    model = tiny_lora_model(tmp_path, device="cuda", dtype=torch.bfloat16)
    if fp8:
        use_fp8_base(model)
    loss_one, grads_one, _ = _loss_and_grads(model, monkeypatch, False, "cuda", autocast=True)
    loss_stacked, grads_stacked, calls = _loss_and_grads(model, monkeypatch, True, "cuda", autocast=True)
    assert calls
    assert abs(loss_stacked - loss_one) < 2e-3 * abs(loss_one)
    one, stacked = (torch.cat([g[n].flatten() for n in sorted(g)]) for g in (grads_one, grads_stacked))
    assert torch.nn.functional.cosine_similarity(one, stacked, dim=0) > (0.995 if fp8 else 0.999)
