"""The adapter weights and gradients in one flat buffer each (train/flat.py): the same gradients, norm and
bitsandbytes 8-bit AdamW update as tensor by tensor, and adapters that still save as separate tensors."""

from __future__ import annotations

import copy

import pytest
import torch

from lorafit.train.flat import STATE_BLOCK, flatten
from lorafit.train.loss import target_loss_sum
from lorafit.train.optim import build_optimizer
from tests.test_graphs import random_batch, tiny_lora_model

bnb = pytest.importorskip("bitsandbytes")


def _trainable(model):
    return [p for p in model.parameters() if p.requires_grad]


def _backward(model, seed: int) -> torch.Tensor:
    batch = random_batch(seed)
    loss, count = target_loss_sum(model, model(batch.input_ids, batch.position_ids, None), batch.labels)
    (loss / count).backward()
    return loss.detach()


def _covered(flat) -> torch.Tensor:
    """The flat buffer's elements that belong to a parameter (the rest is padding)."""
    covered = torch.zeros(flat.param.numel(), dtype=torch.bool)
    for p in flat.params:
        start = (p.data_ptr() - flat.param.data_ptr()) // p.element_size()
        covered[start:start + p.numel()] = True
    return covered


def _train(model, optimizer, zero_grad, stepped, max_norm=float("inf"), steps: int = 3) -> list[torch.Tensor]:
    norms = []
    for step in range(steps):
        _backward(model, step)
        norms.append(torch.nn.utils.clip_grad_norm_(stepped, max_norm))
        optimizer.step()
        zero_grad()
    return norms


def test_the_flat_step_equals_bitsandbytes_tensor_by_tensor(tmp_path):
    per_tensor = tiny_lora_model(tmp_path)
    flat_model = copy.deepcopy(per_tensor)
    initial = {n: p.detach().clone() for n, p in per_tensor.named_parameters() if p.requires_grad}
    # no clipping: a norm over one tensor and over many differ in the last bit
    # min_8bit_size 0: 8-bit states for every tensor on both sides (bitsandbytes keeps 32-bit under 4,096 elements)
    reference = bnb.optim.AdamW8bit(_trainable(per_tensor), lr=1e-2, weight_decay=0.01, min_8bit_size=0)
    norms_reference = _train(per_tensor, reference, lambda: reference.zero_grad(set_to_none=True),
                             _trainable(per_tensor))

    flat = flatten(_trainable(flat_model))
    assert flat is not None and flat.param.numel() % STATE_BLOCK == 0
    assert any(p.numel() % STATE_BLOCK for p in flat.params)  # padding between tensors is exercised
    optimizer = bnb.optim.AdamW8bit([flat.param], lr=1e-2, weight_decay=0.01, min_8bit_size=0)
    norms_flat = _train(flat_model, optimizer, flat.zero_grad, [flat.param])

    torch.testing.assert_close(torch.stack(norms_flat), torch.stack(norms_reference))
    moved = 0
    for (name, a), b in zip(per_tensor.named_parameters(), flat_model.parameters()):
        if a.requires_grad:
            assert torch.equal(a, b), (name, (a - b).abs().max())
            moved += int(not torch.equal(a, initial[name]))
    assert moved == len(initial)
    # the gradient's padding stays zero, so it adds nothing to the norm (the padding's weights are never read)
    _backward(flat_model, 9)
    covered = _covered(flat)
    assert torch.count_nonzero(flat.param.grad[~covered]) == 0 and (~covered).any()


def test_gradients_land_in_the_flat_buffer_and_survive_zeroing(tmp_path):
    model = tiny_lora_model(tmp_path)
    twin = copy.deepcopy(model)
    flat = flatten(_trainable(model))
    for _ in range(2):  # twice: the second backward accumulates into the zeroed buffer, not into new tensors
        flat.zero_grad()
        twin.zero_grad(set_to_none=True)
        _backward(model, 0)
        _backward(twin, 0)
    base, end = flat.param.grad.data_ptr(), flat.param.grad.data_ptr() + flat.param.grad.nbytes
    for (name, p), q in zip(model.named_parameters(), twin.parameters()):
        if p.requires_grad:
            assert base <= p.grad.data_ptr() < end, name
            torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=0)
    assert torch.count_nonzero(flat.param.grad) > 0


def test_a_flat_run_trains_and_saves_separate_tensors(tmp_path):
    from safetensors.torch import load_file

    from lorafit.config import LoraConfig
    from lorafit.model.lora import save_adapter
    from lorafit.train.checkpoint import trainable_state

    model = tiny_lora_model(tmp_path)
    flat = flatten(_trainable(model))
    optimizer = build_optimizer([flat.param], "paged_adamw_8bit", 1e-2, 0.0, torch.device("cpu"))
    losses = []
    for _ in range(4):
        losses.append(float(_backward(model, 0)))
        optimizer.step()
        flat.zero_grad()
    assert losses[-1] < losses[0]
    save_adapter(model, tmp_path / "adapter", LoraConfig(r=4, alpha=8), base_model="tiny")  # no shared storage
    saved = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    assert len(saved) == len(flat.params)
    state = trainable_state(model)
    assert all(t.untyped_storage().data_ptr() != flat.param.data_ptr() for t in state.values())


def test_tensors_that_cannot_share_a_buffer_are_left_alone():
    assert flatten([]) is None
    mixed = [torch.nn.Parameter(torch.zeros(4)), torch.nn.Parameter(torch.zeros(4, dtype=torch.bfloat16))]
    assert flatten(mixed) is None


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_on_the_gpu_the_paged_flat_step_equals_the_per_tensor_step():
    shapes = [(16, 3584), (512, 16), (16, 18944), (3584, 16), (16, 100)]  # the last one is padded
    results = []
    for flat_run in (False, True):
        torch.manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(s, device="cuda") * 0.02) for s in shapes]
        flat = flatten(params) if flat_run else None
        # 8-bit states for every tensor on both sides, as in the CPU test
        optimizer = build_optimizer([flat.param] if flat_run else params, "paged_adamw_8bit", 1e-3, 0.01,
                                    torch.device("cuda"))
        optimizer.args.min_8bit_size = 0
        for _ in range(4):
            for p in params:
                grad = torch.randn_like(p)
                if flat_run:
                    p.grad.copy_(grad)  # a view of the flat gradient
                else:
                    p.grad = grad
            optimizer.step()
        results.append([p.detach().cpu() for p in params])
    assert all(torch.equal(a, b) for a, b in zip(*results))


@pytest.mark.parametrize("make", [
    lambda ps: bnb.optim.AdamW8bit(ps, lr=1e-2, weight_decay=0.01, min_8bit_size=0),
    lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.01),
], ids=["bitsandbytes_8bit", "torch_adamw"])
def test_checkpoints_keep_the_optimizer_state_tensor_by_tensor(tmp_path, make):
    from lorafit.train.flat import join_state, split_state

    model = tiny_lora_model(tmp_path)
    twin = copy.deepcopy(model)
    flat = flatten(_trainable(model))
    optimizer = make([flat.param])
    _train(model, optimizer, flat.zero_grad, [flat.param], steps=2)
    per_tensor_state = split_state(optimizer.state_dict(), flat)
    # the per-tensor optimizer takes it and steps on exactly as the flat one does
    with torch.no_grad():
        for p, q in zip(_trainable(twin), flat.params):
            p.copy_(q)
    per_tensor = make(_trainable(twin))
    per_tensor.load_state_dict(per_tensor_state)
    _train(model, optimizer, flat.zero_grad, [flat.param], steps=1)
    _train(twin, per_tensor, lambda: per_tensor.zero_grad(set_to_none=True), _trainable(twin), steps=1)
    for p, q in zip(_trainable(twin), flat.params):
        assert torch.equal(p, q)
    # and back: a flat optimizer resumes from the per-tensor layout with the state it had
    joined = join_state(split_state(optimizer.state_dict(), flat), flat, "checkpoint")
    def leaves(state: dict, prefix: str = "") -> dict:
        found = {}
        for key, value in state.items():
            found.update(leaves(value, prefix + key + ".") if isinstance(value, dict) else {prefix + key: value})
        return found

    expected = leaves(optimizer.state_dict()["state"][0])
    got = leaves(joined["state"][0])
    assert got.keys() == expected.keys()
    covered = _covered(flat)
    for key, value in expected.items():
        value, joined_value = torch.as_tensor(value), torch.as_tensor(got[key])
        if value.numel() == covered.numel():  # per element: the padding is the joined state's own (zero codes)
            value, joined_value = value[covered], joined_value[covered]
        assert torch.equal(joined_value, value), key
    fresh = make([flat.param])
    fresh.load_state_dict(joined)
    with pytest.raises(ValueError, match="checkpoint: 28 parameters"):
        join_state({"state": {}, "param_groups": [{"params": list(range(28))}]},
                   flatten([torch.nn.Parameter(torch.zeros(4))]), "checkpoint")
