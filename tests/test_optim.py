"""The optimizer lorafit builds: bitsandbytes' 8-bit AdamW without its per-parameter GPU waits (train/optim.py)."""

from __future__ import annotations

import pytest
import torch

from lorafit.train.optim import build_optimizer

bnb = pytest.importorskip("bitsandbytes")


def _train(optimizer_for, steps: int = 4) -> list[torch.Tensor]:
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(300, 500)), torch.nn.Parameter(torch.randn(16, 64))]
    optimizer = optimizer_for(params)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn_like(p)
        optimizer.step()
    return [p.detach().clone() for p in params]


@pytest.mark.parametrize("name", ["paged_adamw_8bit", "adamw_8bit"])
def test_the_step_updates_as_bitsandbytes_does_without_waiting_per_parameter(monkeypatch, name):
    reference_cls = bnb.optim.PagedAdamW8bit if name == "paged_adamw_8bit" else bnb.optim.AdamW8bit
    expected = _train(lambda ps: reference_cls(ps, lr=1e-2, weight_decay=0.01, betas=(0.9, 0.999), eps=1e-8))
    waits = []
    monkeypatch.setattr(bnb.optim.optimizer, "sync_gpu", lambda t: waits.append(t))
    got = _train(lambda ps: build_optimizer(ps, name, 1e-2, 0.01, torch.device("cpu")))
    assert waits == []
    assert all(torch.equal(a, b) for a, b in zip(got, expected))
    _train(lambda ps: reference_cls(ps, lr=1e-2, weight_decay=0.01))
    assert len(waits) > 4  # bitsandbytes' own step waits after every parameter: what the test guards against


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_on_the_gpu_the_step_updates_as_bitsandbytes_does():
    def on_gpu(cls_or_name):
        def make(params):
            params = [torch.nn.Parameter(p.detach().cuda()) for p in params]
            make.params = params
            if isinstance(cls_or_name, str):
                return build_optimizer(params, cls_or_name, 1e-2, 0.01, torch.device("cuda"))
            return cls_or_name(params, lr=1e-2, weight_decay=0.01, betas=(0.9, 0.999), eps=1e-8)
        return make

    results = []
    for maker in (on_gpu(bnb.optim.PagedAdamW8bit), on_gpu("paged_adamw_8bit")):
        torch.manual_seed(0)
        host = [torch.randn(300, 5000), torch.randn(16, 64)]
        optimizer = maker(host)
        for _ in range(4):
            for p in maker.params:
                p.grad = torch.randn_like(p)
            optimizer.step()
        results.append([p.detach().cpu() for p in maker.params])
    assert all(torch.equal(a, b) for a, b in zip(*results))
