"""Injected faults: out-of-memory, NaN losses, a full disk, and pickle weights."""

import errno
import io

import pytest
import torch
from rich.console import Console

import lorafit.train.checkpoint as checkpoint_module
import lorafit.train.loop as loop_module
from lorafit.errors import LorafitError, ModelError
from lorafit.model.load import load_model
from lorafit.train.checkpoint import list_checkpoints, load_checkpoint
from lorafit.train.loop import train
from lorafit.train.progress import Progress
from tests.test_train import tiny_config, write_chat_data
from tests.tiny import make_tiny_checkpoint


@pytest.fixture
def tiny(tmp_path):
    folder, _ = make_tiny_checkpoint(tmp_path, "llama")
    return tmp_path, folder, write_chat_data(tmp_path / "train.jsonl", 40)


def captured_progress():
    buffer = io.StringIO()
    return Progress(console=Console(file=buffer, width=200), live=False), buffer


def losses(result):
    return [r["loss"] for r in result.history if "loss" in r]


def test_out_of_memory_halves_the_micro_batch_and_keeps_the_effective_batch(tiny, monkeypatch):
    tmp, folder, data = tiny
    no_dropout = {"r": 4, "alpha": 8, "dropout": 0.0}  # dropout masks depend on micro-batch shapes
    reference = train(tiny_config(tmp / "ref", folder, data, micro_batch_size=1, grad_accum=4, max_steps=6,
                                  lora=no_dropout), Progress(quiet=True))
    real_loss = loop_module.target_loss_sum

    def out_of_memory_above_one_row(model, hidden, labels, *args):
        if hidden.shape[0] > 1:
            raise torch.OutOfMemoryError("CUDA out of memory (injected)")
        return real_loss(model, hidden, labels, *args)

    monkeypatch.setattr(loop_module, "target_loss_sum", out_of_memory_above_one_row)
    progress, output = captured_progress()
    result = train(tiny_config(tmp / "oom", folder, data, micro_batch_size=4, grad_accum=1, max_steps=6,
                               lora=no_dropout), progress)
    text = output.getvalue()
    assert "micro-batch now 2" in text and "micro-batch now 1" in text and "effective batch unchanged" in text
    assert len(losses(result)) == 6
    torch.testing.assert_close(torch.tensor(losses(result)), torch.tensor(losses(reference)), rtol=1e-5, atol=1e-6)


def test_out_of_memory_first_gives_back_the_kept_layers(tiny, monkeypatch):
    """kept_layers (chosen from the plan's spare memory): an out-of-memory step first recomputes every layer again,
    keeping the micro-batch, and trains exactly as a run that never kept any."""
    tmp, folder, data = tiny
    settings = dict(micro_batch_size=2, grad_accum=1, max_steps=4, gradient_checkpointing=True,
                    lora={"r": 4, "alpha": 8, "dropout": 0.0})  # the failed attempt would draw dropout masks
    reference = train(tiny_config(tmp / "ref", folder, data, **settings), Progress(quiet=True))
    real_loss = loop_module.target_loss_sum

    def out_of_memory_while_layers_are_kept(model, hidden, labels, *args):
        if model.kept_layers:
            raise torch.OutOfMemoryError("CUDA out of memory (injected)")
        return real_loss(model, hidden, labels, *args)

    monkeypatch.setattr(loop_module, "target_loss_sum", out_of_memory_while_layers_are_kept)
    progress, output = captured_progress()
    result = train(tiny_config(tmp / "kept", folder, data, kept_layers=2, **settings), progress)
    text = output.getvalue()
    assert "kept_layers 2 -> 0" in text and "micro-batch now" not in text
    torch.testing.assert_close(torch.tensor(losses(result)), torch.tensor(losses(reference)), rtol=1e-6, atol=1e-7)


def test_out_of_memory_at_one_row_is_a_clear_error(tiny, monkeypatch):
    tmp, folder, data = tiny

    def always_out_of_memory(*args):
        raise torch.OutOfMemoryError("CUDA out of memory (injected)")

    monkeypatch.setattr(loop_module, "target_loss_sum", always_out_of_memory)
    with pytest.raises(LorafitError, match="out of GPU memory at micro-batch 1"):
        train(tiny_config(tmp, folder, data, micro_batch_size=2, grad_accum=1), Progress(quiet=True))


def test_nan_steps_are_skipped_then_stop(tiny, monkeypatch):
    tmp, folder, data = tiny
    real_loss = loop_module.target_loss_sum
    calls = {"n": 0}

    def nan_on_third_call(model, hidden, labels, *args):
        calls["n"] += 1
        total, count = real_loss(model, hidden, labels, *args)
        return (total * float("nan"), count) if calls["n"] == 3 else (total, count)

    monkeypatch.setattr(loop_module, "target_loss_sum", nan_on_third_call)
    progress, output = captured_progress()
    result = train(tiny_config(tmp / "one", folder, data, grad_accum=1, max_steps=6), progress)
    assert "step 3: loss or gradient is NaN/Inf, step skipped (1 so far)" in output.getvalue()
    assert len(losses(result)) == 5 and all(torch.isfinite(torch.tensor(losses(result))))

    monkeypatch.setattr(loop_module, "target_loss_sum",
                        lambda model, hidden, labels, *a: (real_loss(model, hidden, labels)[0] * float("inf"), 1))
    with pytest.raises(LorafitError, match="3 steps in a row had NaN/Inf"):
        train(tiny_config(tmp / "all", folder, data, max_bad_steps=3), Progress(quiet=True))


def test_disk_full_keeps_the_previous_checkpoint(tiny, monkeypatch):
    tmp, folder, data = tiny
    real_save = checkpoint_module.save_file
    calls = {"n": 0}

    def full_on_second(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(*args, **kwargs)

    monkeypatch.setattr(checkpoint_module, "save_file", full_on_second)
    cfg = tiny_config(tmp, folder, data, save_every=2, max_steps=8)
    with pytest.raises(LorafitError, match=r"No space left on device; the previous checkpoint .*step-000002 is intact"):
        train(cfg, Progress(quiet=True))
    (kept,) = list_checkpoints(cfg.output_dir)
    assert kept.name == "step-000002" and not list((kept.parent).glob("*.tmp"))
    model = load_model(str(folder)).model
    from lorafit.model.lora import apply_lora

    apply_lora(model, cfg.lora)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])  # per tensor, as on disk
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    assert load_checkpoint(kept, model, optimizer, scheduler)["step"] == 2


def test_pickle_weights_are_refused(tmp_path):
    folder, _ = make_tiny_checkpoint(tmp_path, "llama")
    (folder / "model.safetensors").unlink()
    torch.save({"x": torch.zeros(1)}, folder / "pytorch_model.bin")
    with pytest.raises(ModelError, match="pickle"):
        load_model(str(folder))
    hf_state = torch.load(folder / "pytorch_model.bin", weights_only=True)
    assert "x" in hf_state  # the opt-in path reads through the restricted unpickler


def test_allow_pickle_reads_a_bin_checkpoint(tmp_path):
    from safetensors.torch import load_file

    folder, hf_model = make_tiny_checkpoint(tmp_path, "llama")
    state = load_file(str(folder / "model.safetensors"))
    (folder / "model.safetensors").unlink()
    torch.save(state, folder / "pytorch_model.bin")
    model = load_model(str(folder), allow_pickle=True).model.eval()
    ids = torch.randint(0, 256, (1, 9))
    with torch.no_grad():
        torch.testing.assert_close(model.logits(model(ids)), hf_model(input_ids=ids).logits, atol=2e-5, rtol=1e-4)
