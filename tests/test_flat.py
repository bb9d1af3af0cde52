"""train/flat.py: the adapters as views of one buffer train exactly as separate tensors do."""

import pytest
import torch
from safetensors.torch import load_file

from lorafit.config import LoraConfig
from lorafit.model.load import load_model
from lorafit.model.lora import apply_lora
from lorafit.train import loop
from lorafit.train.flat import flatten_trainable
from lorafit.train.loop import train
from lorafit.train.progress import Progress
from tests.test_train import tiny_config, write_chat_data
from tests.tiny import make_tiny_checkpoint


def _loss(model, ids):
    return model(ids).float().square().mean()


def test_views_keep_the_values_and_gradients_accumulate_into_the_buffer(tmp_path):
    folder, _ = make_tiny_checkpoint(tmp_path, "qwen2")
    model = load_model(str(folder)).model
    apply_lora(model, LoraConfig(r=4, alpha=8))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)  # so that A has a gradient too
    params = [p for p in model.parameters() if p.requires_grad]
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    values = [p.detach().clone() for p in params]
    _loss(model, ids).backward()
    grads = [p.grad.clone() for p in params]
    for p in params:
        p.grad = None

    flat = flatten_trainable(params)
    assert flat.numel() == sum(p.numel() for p in params)
    size = flat.numel() * flat.element_size()
    inside = lambda t, buffer: buffer.data_ptr() <= t.data_ptr() < buffer.data_ptr() + size  # noqa: E731
    assert all(inside(p, flat) and inside(p.grad, flat.grad) for p in params)
    assert all(torch.equal(p, v) for p, v in zip(params, values))
    _loss(model, ids).backward()
    _loss(model, ids).backward()  # accumulation, as over micro-batches
    torch.testing.assert_close(flat.grad, 2 * torch.cat([g.reshape(-1) for g in grads]), rtol=1e-5, atol=1e-7)
    assert all(inside(p.grad, flat.grad) for p in params)  # still the views: added in place
    with torch.no_grad():
        flat.add_(1.0)  # what an optimizer step on the buffer does to the modules' weights
    assert all(torch.equal(p, v + 1.0) for p, v in zip(params, values))


def test_tensors_of_different_dtypes_are_left_as_they_are():
    a, b = torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(3, dtype=torch.float64))
    assert flatten_trainable([a, b]) is None and a.grad is None


def test_a_run_with_one_buffer_equals_a_run_with_separate_tensors(tmp_path, monkeypatch):
    folder, _ = make_tiny_checkpoint(tmp_path, "qwen2")
    data = write_chat_data(tmp_path / "train.jsonl", 24)
    flat_run = train(tiny_config(tmp_path / "flat", folder, data, max_steps=5), Progress(quiet=True))
    monkeypatch.setattr(loop, "flatten_trainable", lambda params: None)
    separate = train(tiny_config(tmp_path / "separate", folder, data, max_steps=5), Progress(quiet=True))
    losses = [r["loss"] for r in flat_run.history if "loss" in r]
    assert losses == pytest.approx([r["loss"] for r in separate.history if "loss" in r], rel=1e-5)
    assert losses[-1] < losses[0]  # it trained
    a = load_file(str(flat_run.artifact_dir / "adapter_model.safetensors"))
    b = load_file(str(separate.artifact_dir / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-6) for k in a)
