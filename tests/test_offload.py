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


def test_offloaded_activations_train_like_recomputed_ones(tmp_path, monkeypatch):
    """offload_activations: the first layers run once, what they save goes to the host and comes back for their
    backward (every tensor here: the 1 MiB floor lowered to 0); loss and LoRA gradients equal checkpointing every
    layer, with kept layers too. Each layer's storages travel once however many views of them are saved."""
    from lorafit.model import offload_activations

    monkeypatch.setattr(offload_activations, "MIN_BYTES", 0)
    moved = []
    to_host = offload_activations.ActivationOffload._to_host
    monkeypatch.setattr(offload_activations.ActivationOffload, "_to_host",
                        lambda self, storage: moved.append(storage.data_ptr()) or to_host(self, storage))
    unpacked, events = [], []
    unpack = offload_activations.ActivationOffload._unpack
    on_gpu = []  # layers whose activations are back on the device, at each use

    def unpack_and_count(self, saved):
        unpacked.append(type(saved).__name__)
        events.append(("use", getattr(saved, "layer", None)))
        out = unpack(self, saved)
        on_gpu.append(len(self.back))
        return out

    monkeypatch.setattr(offload_activations.ActivationOffload, "_unpack", unpack_and_count)
    to_device = offload_activations.ActivationOffload._to_device
    monkeypatch.setattr(offload_activations.ActivationOffload, "_to_device",
                        lambda self, layer: events.append(("back", layer)) or to_device(self, layer))
    folder, _ = make_tiny_checkpoint(tmp_path, "qwen2", num_hidden_layers=4)
    model = load_model(str(folder), quantize=True).model
    apply_lora(model, LoraConfig(r=4, alpha=8))
    model.train()
    ids = torch.randint(0, 256, (2, 17), generator=torch.Generator().manual_seed(1))
    calls = [0] * 4
    for i, layer in enumerate(model.model.layers):
        layer.register_forward_pre_hook(lambda *_, i=i: calls.__setitem__(i, calls[i] + 1))
    runs, counted = {}, {}
    for name, offloaded, kept in (("all", 0, 0), ("offload3", 3, 0), ("offload2", 2, 0), ("offload1+kept1", 1, 1)):
        model.gradient_checkpointing, model.offloaded_layers, model.kept_layers = True, offloaded, kept
        calls[:] = [0] * 4
        events.clear()
        on_gpu.clear()
        runs[name] = loss_and_grads(model, ids, seed=3)
        counted[name] = list(calls)
        if name == "offload3":
            assert max(on_gpu) == 2  # the layer in backward and the one before it, never more
        if name == "offload2":  # each layer comes back once, before its first use: layer 1 when layer 2's
            moves = [e for e in events if e[0] == "back"]  # gradient arrives, layer 0 while layer 1 computes
            first_use = {layer: events.index(("use", layer)) for layer in (0, 1)}
            assert moves == [("back", 1), ("back", 0)]
            assert events.index(("back", 1)) < first_use[1] and events.index(("back", 0)) < first_use[0]
    assert counted == {"all": [2] * 4, "offload3": [1, 1, 1, 2], "offload2": [1, 1, 2, 2],
                       "offload1+kept1": [1, 2, 2, 1]}
    # only the recomputed layers keep their SwiGLU product (kernels/swiglu_lora.py)
    assert [layer.mlp.keep_product for layer in model.model.layers] == [False, True, True, False]
    assert moved and unpacked.count("_Offloaded") >= len(moved)  # every host copy was used in backward
    loss, grads = runs["all"]
    for name in ("offload3", "offload2", "offload1+kept1"):
        torch.testing.assert_close(runs[name][0], loss)
        for key, grad in grads.items():
            torch.testing.assert_close(runs[name][1][key], grad, rtol=1e-5, atol=1e-6)


def test_offloaded_views_share_one_host_copy():
    """Three views of one storage saved in one layer (as q, k and v's LoRA save the norm output) make one copy, and
    each comes back as its own view with its own values."""
    from lorafit.model import offload_activations

    mover = offload_activations.ActivationOffload(torch.device("cpu"))
    base = torch.randn(4, 2**18)  # 4 MiB
    views = [base, base[1:3], base.t()[5:9]]
    with mover.layer(0):
        packed = [mover._pack(0, v) for v in views]
    assert len(mover.host[0]) == 1
    base.zero_()  # the copy was taken at save time
    back = [mover._unpack(p) for p in packed]
    assert back[0].untyped_storage().data_ptr() == back[1].untyped_storage().data_ptr()
    assert [b.shape for b in back] == [v.shape for v in views] and [b.stride() for b in back] == [
        v.stride() for v in views]
    assert torch.equal(back[1], back[0][1:3]) and torch.equal(back[2], back[0].t()[5:9])
    assert back[0].abs().sum() > 0


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


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_offloaded_activations_on_gpu_equal_recomputation_and_hold_less(tmp_path):
    """On the GPU, with the side stream and pinned copies: three SGD steps of a QLoRA model (bf16 autocast, tensors
    well over the 1 MiB floor) give the losses, gradients and adapter weights of keeping every layer's activations
    (the same arithmetic: offloading only moves what is saved) and of checkpointing every layer, and the offloaded
    run's peak stays below keeping everything. SGD, not AdamW: Adam's first steps turn rounding-sized gradient
    differences into full-sized updates (bf16 flash backward is not bitwise deterministic), a copy race would not
    be rounding-sized."""
    folder, _ = make_tiny_checkpoint(tmp_path, "qwen2", num_hidden_layers=6, hidden_size=512, intermediate_size=1536,
                                     num_attention_heads=8, num_key_value_heads=2)
    ids = torch.randint(0, 256, (4, 1024), generator=torch.Generator().manual_seed(1)).cuda()
    results = {}
    for name, offloaded, checkpointing in (("recomputed", 0, True), ("offloaded", 5, True), ("kept", 0, False)):
        model = load_model(str(folder), quantize=True, device="cuda").model
        torch.manual_seed(0)  # lora_A's init too: the same adapter in every run
        apply_lora(model, LoraConfig(r=8, alpha=16))
        for module in model.modules():
            if hasattr(module, "lora_B"):
                torch.nn.init.normal_(module.lora_B.weight, std=0.02)
        model.train()
        model.gradient_checkpointing, model.offloaded_layers = checkpointing, offloaded
        trainable = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.SGD(trainable, lr=0.5)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        losses, first_grads = [], None
        for _ in range(3):
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss, count = target_loss_sum(model, model(ids), ids)
            (loss / count).backward()
            if first_grads is None:
                first_grads = torch.cat([p.grad.flatten() for p in trainable])
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(float(loss / count))
        results[name] = (losses, first_grads, torch.cat([p.detach().flatten() for p in trainable]),
                         torch.cuda.max_memory_allocated())
        del model, optimizer, trainable
        torch.cuda.empty_cache()
    losses, grads, weights, peak = results["offloaded"]
    assert grads.norm() > 0 and losses[-1] != losses[0]  # the steps change something for the comparison to see
    # recomputed layers keep the SwiGLU product and run down_proj as the plain LoRA linear: another bf16 rounding order
    for base, loss_rel, grad_rel in (("kept", 1e-3, 2e-2), ("recomputed", 2e-3, 5e-2)):
        base_losses, base_grads, base_weights, _ = results[base]
        assert losses == pytest.approx(base_losses, rel=loss_rel), base
        assert ((grads - base_grads).norm() / base_grads.norm()).item() < grad_rel, base
        assert ((weights - base_weights).norm() / base_weights.norm()).item() < loss_rel, base
    assert peak < results["kept"][3]


def test_offload_activations_config_is_checked_up_front():
    from lorafit.config import ConfigError, load_config

    base = {"model": {"path": "x"}, "data": {"train": "x.jsonl"}}
    assert load_config(overrides={**base, "offload_activations": 3}).offload_activations == 3
    with pytest.raises(ConfigError, match="offload_activations must be >= 0"):
        load_config(overrides={**base, "offload_activations": -1})
    with pytest.raises(ConfigError, match="gradient_checkpointing false"):
        load_config(overrides={**base, "offload_activations": 2, "gradient_checkpointing": False})
    with pytest.raises(ConfigError, match="offload_activations"):
        load_config(overrides={**base, "offload_activations": 2, "cuda_graphs": "on"})
