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
