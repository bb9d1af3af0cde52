"""Offloaded checkpointing and the tiled MLP give plain training's loss and gradients (dropout included)."""

import pytest
import torch

from lorafit.config import LoraConfig
from lorafit.model.load import load_model
from lorafit.model.lora import apply_lora
from lorafit.train.loss import target_loss_sum
from tests.tiny import make_tiny_checkpoint


def loss_and_grads(model, ids, seed):
    torch.manual_seed(seed)
    model.zero_grad(set_to_none=True)
    loss, count = target_loss_sum(model, model(ids), ids)
    (loss / count).backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_offloaded_checkpoint_equals_plain_and_checkpointed(tmp_path, dropout):
    """With dropout, tiling draws its masks chunk by chunk (other masks than one draw over all tokens), so the
    tiled runs are compared without dropout only."""
    folder, _ = make_tiny_checkpoint(tmp_path, "qwen2")
    model = load_model(str(folder), quantize=True).model
    apply_lora(model, LoraConfig(r=4, alpha=8, dropout=dropout))
    model.train()
    ids = torch.randint(0, 256, (2, 19), generator=torch.Generator().manual_seed(0))
    runs = {}
    for name, checkpointing, offload, tile in (("plain", False, False, 0), ("checkpoint", True, False, 0),
                                               ("offload", True, True, 0), ("offload+tiled", True, True, 7),
                                               ("tiled", False, False, 5)):
        model.gradient_checkpointing, model.offload_checkpoints = checkpointing, offload
        for layer in model.model.layers:
            layer.mlp.chunk_tokens = tile
        runs[name] = loss_and_grads(model, ids, seed=5)
    plain_loss, plain_grads = runs["plain"]
    assert len(plain_grads) == 2 * 7 * 2  # every adapter of both layers got a gradient
    for name in ("checkpoint", "offload") + (("offload+tiled", "tiled") if dropout == 0 else ()):
        loss, grads = runs[name]
        torch.testing.assert_close(loss, plain_loss)
        for key, grad in grads.items():
            torch.testing.assert_close(grad, plain_grads[key], rtol=1e-5, atol=1e-6)
    if dropout:  # dropout was live: another seed gives other gradients
        other = loss_and_grads(model, ids, seed=6)[1]
        assert any(not torch.allclose(other[k], plain_grads[k]) for k in plain_grads)


def test_kept_layers_train_like_checkpointed_ones(tmp_path):
    """kept_layers: the last layers skip checkpointing (with and without offloaded checkpoints for the others):
    same loss and gradients as checkpointing every layer."""
    folder, _ = make_tiny_checkpoint(tmp_path, "qwen2", num_hidden_layers=3)
    model = load_model(str(folder), quantize=True).model
    apply_lora(model, LoraConfig(r=4, alpha=8))
    model.train()
    ids = torch.randint(0, 256, (2, 17), generator=torch.Generator().manual_seed(1))
    calls = [0, 0, 0]  # forward passes per layer: 2 when recomputed in backward, 1 when kept
    for i, layer in enumerate(model.model.layers):
        layer.register_forward_pre_hook(lambda *_, i=i: calls.__setitem__(i, calls[i] + 1))
    runs, counted = {}, {}
    for name, offload, kept in (("all", False, 0), ("kept1", False, 1), ("kept2+offload", True, 2)):
        model.gradient_checkpointing, model.offload_checkpoints, model.kept_layers = True, offload, kept
        calls[:] = [0, 0, 0]
        runs[name] = loss_and_grads(model, ids, seed=3)
        counted[name] = list(calls)
    assert counted == {"all": [2, 2, 2], "kept1": [2, 2, 1], "kept2+offload": [2, 1, 1]}
    loss, grads = runs["all"]
    assert len(grads) == 3 * 7 * 2
    for name in ("kept1", "kept2+offload"):
        torch.testing.assert_close(runs[name][0], loss)
        for key, grad in grads.items():
            torch.testing.assert_close(runs[name][1][key], grad, rtol=1e-5, atol=1e-6)


def test_tiled_mlp_also_tiles_without_gradient(tmp_path):
    """An offloaded checkpoint runs its layer's forward without gradient: the MLP must be tiled there too (untiled,
    Qwen2.5-7B at 65,536 tokens held 7 GiB of [tokens, intermediate] tensors: the out-of-memory of issue 8's run).
    No op may produce a [all tokens, intermediate] tensor, and the output equals the untiled one."""
    from torch.utils._python_dispatch import TorchDispatchMode

    folder, _ = make_tiny_checkpoint(tmp_path, "qwen2")
    model = load_model(str(folder), quantize=False).model
    mlp = model.model.layers[0].mlp
    x = torch.randn(1, 40, 64)
    with torch.no_grad():
        plain = mlp.plain_forward(x)

    class Shapes(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.seen = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if isinstance(out, torch.Tensor):
                self.seen.append(tuple(out.shape))
            return out

    mlp.chunk_tokens = 8
    shapes = Shapes()
    with torch.no_grad(), shapes:
        tiled = mlp(x)
    intermediate = mlp.gate_proj.out_features
    assert (8, intermediate) in shapes.seen
    assert not any(s[-1] == intermediate and 40 in s for s in shapes.seen)
    torch.testing.assert_close(tiled, plain)
