"""The recorded (CUDA graph) micro-step: its static-shape loss equals the trainer's loss on CPU, and on a GPU its
replays give eager training's loss and gradients, across optimizer steps (the LoRA casts must be re-recorded, not
frozen at their first values)."""

import pytest
import torch

from lorafit.config import ConfigError, LoraConfig, load_config
from lorafit.data.batching import Batch, collate
from lorafit.data.example import IGNORE_INDEX, Example
from lorafit.model.load import load_model
from lorafit.model.lora import apply_lora
from lorafit.model.quantize import use_fp8_base
from lorafit.train.graphs import graphs_unavailable
from lorafit.train.loss import every_position_loss_sum, target_loss_sum
from tests.tiny import make_tiny_checkpoint

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
fp8_gpu = pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (9, 0),
                             reason="needs a GPU with row-wise scaled FP8 GEMMs (Hopper)")


def tiny_lora_model(tmp_path, device="cpu", dtype=torch.float32, family="qwen2"):
    folder, _ = make_tiny_checkpoint(tmp_path, family)
    model = load_model(str(folder), torch.device(device), dtype, quantize=True).model
    apply_lora(model, LoraConfig(r=4, alpha=8))
    with torch.no_grad():  # B starts at zero; random B makes every gradient path carry signal
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    model.gradient_checkpointing = True
    return model.train()


def random_batch(seed: int, rows: int = 2, width: int = 24) -> Batch:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 256, (rows, width), generator=g)
    labels = ids.clone()
    labels[:, : width // 3] = IGNORE_INDEX  # a prompt that carries no loss
    positions = torch.arange(width).expand(rows, width).clone()
    return Batch(ids, labels, positions, None, int((labels[:, 1:] != IGNORE_INDEX).sum()), rows * width)


def test_every_position_loss_equals_target_loss_with_gradients(tmp_path):
    model = tiny_lora_model(tmp_path)
    batch = random_batch(0)
    results = []
    for loss_fn in (lambda h: target_loss_sum(model, h, batch.labels)[0],
                    lambda h: every_position_loss_sum(model, h, batch.labels)):
        model.zero_grad(set_to_none=True)
        loss = loss_fn(model(batch.input_ids, position_ids=batch.position_ids))
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}))
    (loss_a, grads_a), (loss_b, grads_b) = results
    torch.testing.assert_close(loss_b, loss_a)
    assert loss_a > 0 and len(grads_a) == 2 * 7 * 2
    for name, grad in grads_a.items():
        assert grad.abs().max() > 0, name
        torch.testing.assert_close(grads_b[name], grad, rtol=1e-5, atol=1e-7)


def test_collate_pads_to_the_asked_width():
    examples = [Example(input_ids=[5, 6, 7], labels=[5, 6, 7]), Example(input_ids=[8, 9], labels=[8, 9])]
    batch = collate(examples, [[0], [1]], pad_id=0, packing=True, width=10)
    assert batch.input_ids.shape == (2, 10) and batch.num_targets == 3 and batch.num_tokens == 5
    assert (batch.labels[:, 3:] == IGNORE_INDEX).all() and batch.input_ids[1, 2:].eq(0).all()


def test_graphs_say_why_not_and_on_rejects_what_cannot_be_recorded():
    cfg = load_config(overrides={"lora": {"dropout": 0.1}, "offload_checkpoints": True, "model": {"fp8_base": True}})
    reason = graphs_unavailable(cfg, torch.device("cpu"), world=1, streaming=False)
    assert "not a CUDA GPU" in reason and "lora.dropout" in reason and "offload_checkpoints" in reason
    assert "model.fp8_base" not in reason  # an FP8 base records (test below)
    with pytest.raises(ConfigError, match="lora.dropout > 0, offload_checkpoints"):
        load_config(overrides={"cuda_graphs": "on", "lora": {"dropout": 0.1}, "offload_checkpoints": True})
    assert load_config(overrides={"cuda_graphs": "on"}).cuda_graphs == "on"


def test_auto_records_small_packed_micro_batches_only_and_never_refuses_a_config():
    from lorafit.train.graphs import AUTO_MAX_TOKENS, graphs_would_not_pay

    assert load_config().cuda_graphs == "auto"
    small = load_config(overrides={"micro_batch_size": 2, "data": {"max_length": 2048}})
    assert graphs_would_not_pay(small) is None
    large = load_config(overrides={"micro_batch_size": 8, "data": {"max_length": 2048}})
    assert "16,384 tokens" in graphs_would_not_pay(large) and AUTO_MAX_TOKENS < 16384
    unpacked = load_config(overrides={"micro_batch_size": 2, "data": {"max_length": 2048, "packing": False}})
    assert "pad every one to max_length" in graphs_would_not_pay(unpacked)
    # auto leaves a run it cannot record eager instead of refusing it, as `on` does
    assert load_config(overrides={"lora": {"dropout": 0.1}, "offload_checkpoints": True}).cuda_graphs == "auto"


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("family,cpu_table,fp8", [("qwen2", False, False), ("llama", True, False),
                                                  pytest.param("qwen2", False, True, marks=fp8_gpu)])
def test_recorded_micro_steps_equal_eager_ones_across_optimizer_steps(tmp_path, family, cpu_table, fp8):
    """Two identical models: one runs every micro-batch eagerly, the other through GraphedMicroStep (first batch
    eager + recording, then replays). Three steps of two micro-batches with an optimizer step between: equal losses,
    gradients and adapter weights; a replay after the weights changed must use the new weights. With `cpu_table`
    the graphed model's (untied) embedding table sits in CPU memory (model.embeddings_on_cpu)."""
    from lorafit.train.graphs import GraphedMicroStep

    models = [tiny_lora_model(tmp_path / str(i), "cuda", torch.bfloat16, family) for i in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    if fp8:
        for m in models:
            use_fp8_base(m)
    if cpu_table:
        models[1].model.embed_tokens.to("cpu")
        ids = torch.randint(0, 256, (2, 9))
        with torch.no_grad():  # the CPU lookup gives the GPU lookup's hidden states, from CPU or GPU ids
            for where in ("cpu", "cuda"):
                torch.testing.assert_close(models[1](ids.to(where)), models[0](ids.cuda()), rtol=0, atol=0)
    params = [[p for p in m.parameters() if p.requires_grad] for m in models]
    optimizers = [torch.optim.AdamW(ps, lr=1e-2) for ps in params]
    graphed = GraphedMicroStep(models[1], params[1], torch.bfloat16, say=pytest.fail)
    for step in range(3):
        batches = [random_batch(10 * step + i) for i in range(2)]
        targets = sum(b.num_targets for b in batches)
        losses = [0.0, 0.0]
        for batch in batches:
            with torch.autocast("cuda", dtype=torch.bfloat16):
                hidden = models[0](batch.input_ids.cuda(), position_ids=batch.position_ids.cuda())
                loss = every_position_loss_sum(models[0], hidden, batch.labels.cuda())
            (loss / targets).backward()
            losses[0] += loss.item()
            losses[1] += graphed.run(batch, 1.0 / targets).item()
        assert graphed.recording is not None and not graphed.failed
        assert losses[1] == pytest.approx(losses[0], rel=1e-5)
        for a, b in zip(*params):
            torch.testing.assert_close(b.grad, a.grad, rtol=1e-5, atol=1e-7)
        for opt in optimizers:
            opt.step()
            opt.zero_grad(set_to_none=False)
    for a, b in zip(*params):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-7)
    graphed.release()
    assert graphed.recording is None


def packed_batch(seed: int, rows: int, width: int) -> Batch:
    """`random_batch` with 2-4 examples per row: seq_ids and positions restart at each example's start."""
    batch = random_batch(seed, rows, width)
    g = torch.Generator().manual_seed(seed)
    seq_ids = torch.zeros(rows, width, dtype=torch.long)
    for r in range(rows):
        for start in sorted(torch.randperm(width - 2, generator=g)[:int(torch.randint(1, 4, (1,), generator=g))] + 1):
            seq_ids[r, start:] += 1
    starts = torch.cat([torch.ones(rows, 1, dtype=torch.bool), seq_ids[:, 1:] != seq_ids[:, :-1]], dim=1)
    index = torch.arange(width).expand(rows, width)
    positions = index - torch.cummax(torch.where(starts, index, 0), dim=1).values
    return Batch(batch.input_ids, batch.labels, positions, seq_ids, batch.num_targets, batch.num_tokens)


def test_packed_batches_restart_positions_at_each_example():
    batch = packed_batch(3, rows=4, width=64)
    for r in range(4):
        for seq in batch.seq_ids[r].unique():
            members = batch.seq_ids[r] == seq
            assert batch.position_ids[r][members].tolist() == list(range(int(members.sum())))
    assert (batch.seq_ids.amax(1) >= 1).all()


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("fp8,packed", [(False, False), (False, True), pytest.param(True, True, marks=fp8_gpu)])
def test_many_replays_report_the_eager_loss(tmp_path, fp8, packed):
    """The symptom seen on the H100 (a wrong loss on a few steps of 50, at different steps each run) as a test: 60
    micro-batches of fresh data (packed: attention masked per example, as the demo's rows), no optimizer step, so
    every replay must give the eager loss."""
    from lorafit.train.graphs import GraphedMicroStep

    folder, _ = make_tiny_checkpoint(tmp_path, "qwen2", hidden_size=256, intermediate_size=704, num_hidden_layers=4)
    model = load_model(str(folder), torch.device("cuda"), torch.bfloat16, quantize=True).model
    apply_lora(model, LoraConfig(r=8, alpha=16))
    if fp8:
        use_fp8_base(model)
    model.gradient_checkpointing = True
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    graphed = GraphedMicroStep(model, params, torch.bfloat16, say=pytest.fail)
    wrong = []
    for i in range(60):
        batch = (packed_batch if packed else random_batch)(100 + i, rows=4, width=256)
        replayed = graphed.run(batch, 1.0).item()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            seq_ids = batch.seq_ids.cuda() if packed else None
            hidden = model(batch.input_ids.cuda(), position_ids=batch.position_ids.cuda(), seq_ids=seq_ids)
            eager = every_position_loss_sum(model, hidden, batch.labels.cuda()).item()
        # FP8: a last-bit difference between the recorded and the eager GEMMs can flip an e4m3 rounding (3
        # mantissa bits); measured up to 1.6e-4 of the loss on the H100. The symptom looked for is 3-4x.
        if replayed != pytest.approx(eager, rel=1e-3 if fp8 else 1e-4):
            wrong.append((i, replayed, eager))
    assert graphed.recording is not None and not wrong
