"""FP8 base (kernels/fp8.py): the twins against exact arithmetic on CPU, the fast kernels against the twins on a GPU,
and a model with `model.fp8_base` against the same model in full precision."""

import pytest
import torch

from lorafit.config import ConfigError
from lorafit.kernels import fp8, fp8_rows
from lorafit.kernels.lora import lora_linear
from lorafit.model import lora as lora_module
from lorafit.model.quantize import use_fp8_base
from lorafit.train.loss import target_loss_sum
from tests.test_graphs import random_batch, tiny_lora_model
from tests.test_kernels import nf4_linear
from tests.test_train import tiny_config, write_chat_data

fp8_gpu = pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (9, 0),
                             reason="needs a GPU with row-wise scaled FP8 GEMMs (Hopper)")
E4M3_STEP = 2 ** -3  # relative spacing of e4m3 values: rounding to nearest is off by at most half of it


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def test_quantized_rows_round_trip_within_half_a_step_and_use_the_whole_range():
    x = torch.randn(64, 256) * torch.logspace(-3, 3, 64)[:, None]  # rows six orders of magnitude apart
    q, scale = fp8_rows.quantize_rows_reference(x)
    assert q.dtype == fp8_rows.E4M3 and scale.shape == (64, 1)
    assert torch.equal(q.float().abs().amax(-1), torch.full((64,), fp8_rows.E4M3_MAX))  # each row's max maps to 448
    back = q.float() * scale
    normal = x.abs() >= scale * 2 ** -6  # e4m3's smallest normal value; below it the spacing is absolute
    assert ((back - x).abs() <= x.abs() * E4M3_STEP / 2 + 1e-12)[normal].all()
    assert ((back - x).abs() <= scale * 2 ** -10)[~normal].all()


def test_the_twin_gemm_is_exact_fp32_arithmetic_even_under_autocast():
    """The reference path calls the twin inside the training step's autocast region; there it once ran in bf16 on
    bf16-rounded operands, so the FP8 twin run was not what the fast GEMM computes (session 11)."""
    torch.manual_seed(0)
    a_q, a_scale = fp8_rows.quantize_rows_reference(torch.randn(32, 256))
    b_q, b_scale = fp8_rows.quantize_rows_reference(torch.randn(48, 256))
    exact = (a_q.double() @ b_q.double().t()) * a_scale.double() * b_scale.double().t()
    plain = fp8._scaled_matmul(a_q, a_scale, b_q, b_scale[:, 0], torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        autocast = fp8._scaled_matmul(a_q, a_scale, b_q, b_scale[:, 0], torch.float32)
    assert torch.equal(plain, autocast)
    assert relative_error(plain, exact) < 1e-6


@pytest.mark.parametrize("transpose", [False, True])
def test_nf4_to_fp8_reference_is_the_weight_over_its_channel_scales(transpose):
    _, module = nf4_linear(48, 320)
    dense = module.dequantize(torch.float32)
    rows, cols = fp8.channel_scales(dense)
    q = fp8.nf4_to_fp8_reference(module.nf4_tensors(), (48, 320), 1 / (cols if transpose else rows), transpose)
    assert q.shape == ((320, 48) if transpose else (48, 320))
    back = q.float().t() * cols[None, :] if transpose else q.float() * rows[:, None]
    assert relative_error(back, dense) < 0.03 and (back - dense).abs().max() <= dense.abs().max() * E4M3_STEP


@pytest.mark.parametrize("bias", [False, True])
def test_fp8_lora_linear_is_close_to_full_precision_and_trains_the_same_adapter(bias):
    """The fp8 base changes the frozen product by ~3% (e4m3 rounding of both operands), nothing else: the adapter's
    gradients differ by as much, and the input gradient too."""
    torch.manual_seed(0)
    _, base = nf4_linear(96, 128)
    if bias:
        base.bias = torch.nn.Parameter(torch.randn(96), requires_grad=False)
    a = torch.randn(8, 128, requires_grad=True)
    b = (torch.randn(96, 8) * 0.1).requires_grad_(True)
    x = torch.randn(4, 10, 128)
    results = []
    for on in (False, True):
        base.fp8 = on
        xi = x.clone().requires_grad_(True)
        y = lora_linear(xi, xi, a, b, base, 2.0)
        y.pow(2).sum().backward()  # dL/dy depends on y: every gradient sees the base
        results.append((y.detach(), xi.grad, a.grad.clone(), b.grad.clone()))
        a.grad = b.grad = None
    for full, in_fp8 in zip(*results):
        assert 1e-4 < relative_error(in_fp8, full) < 0.06  # changed, and by e4m3's rounding only


def test_fp8_model_loss_and_adapter_gradients_stay_close(tmp_path):
    model = tiny_lora_model(tmp_path)
    batch = random_batch(0)
    runs = []
    for mark in (False, True):
        if mark:
            assert use_fp8_base(model) == 14  # 2 layers x 7 linears, all sides multiples of 16
        model.zero_grad()
        loss = target_loss_sum(model, model(batch.input_ids, batch.position_ids, None), batch.labels)[0]
        loss.backward()
        grads = torch.cat([p.grad.flatten() for n, p in model.named_parameters() if "lora_" in n])
        runs.append((float(loss), grads))
    (loss_full, grad_full), (loss_fp8, grad_fp8) = runs
    assert loss_fp8 != loss_full and abs(loss_fp8 - loss_full) < 0.01 * loss_full
    assert torch.nn.functional.cosine_similarity(grad_fp8, grad_full, dim=0) > 0.99


def test_fp8_base_needs_qlora(tmp_path):
    with pytest.raises(ConfigError, match="fp8_base.*qlora"):
        tiny_config(tmp_path, tmp_path, tmp_path / "x.jsonl", model={"path": "x", "fp8_base": True})


def test_training_with_an_fp8_base_lowers_the_loss(tmp_path):
    from lorafit.train.loop import train
    from lorafit.train.progress import Progress
    from tests.tiny import make_tiny_checkpoint

    folder, _ = make_tiny_checkpoint(tmp_path, "qwen2")
    data = write_chat_data(tmp_path / "train.jsonl", 40)
    cfg = tiny_config(tmp_path, folder, data, max_steps=30, method="qlora",
                      model={"path": str(folder), "fp8_base": True})
    losses = [r["loss"] for r in train(cfg, Progress(quiet=True)).history if "loss" in r]
    assert losses[-1] < losses[0] - 0.5  # as the full-precision run in test_train (5.56 -> 4.58)


@pytest.mark.gpu
@fp8_gpu
@pytest.mark.parametrize("shape", [(96, 128), (80, 336), (3584, 512), (1536, 8960)])
@pytest.mark.parametrize("transpose", [False, True])
def test_nf4_to_fp8_triton_equals_reference(shape, transpose):
    _, module = nf4_linear(*shape, device="cuda", dtype=torch.bfloat16)
    rows, cols = fp8.channel_scales(module.dequantize(torch.float32))
    inverse = 1 / (cols if transpose else rows)
    fast = fp8.nf4_to_fp8_triton(module.nf4_tensors(), shape, inverse, transpose)
    reference = fp8.nf4_to_fp8_reference(module.nf4_tensors(), shape, inverse, transpose)
    differ = fast.view(torch.uint8) != reference.view(torch.uint8)
    assert float(differ.float().mean()) < 1e-3  # ties rounded after a fused multiply-add, at most
    assert relative_error(fast[differ], reference[differ]) <= E4M3_STEP if differ.any() else True


@pytest.mark.gpu
@fp8_gpu
@pytest.mark.parametrize("tokens", [4096, 1000])
def test_fp8_gemms_equal_the_twins_on_fresh_inputs(tokens):
    torch.manual_seed(tokens)
    _, base = nf4_linear(512, 1536, device="cuda", dtype=torch.bfloat16)
    x = torch.randn(tokens, 1536, device="cuda", dtype=torch.bfloat16)
    g = torch.randn(tokens, 512, device="cuda", dtype=torch.bfloat16)
    q, scale = fp8_rows.quantize_rows(x)
    q_ref, scale_ref = fp8_rows.quantize_rows_reference(x)
    torch.testing.assert_close(scale, scale_ref)
    assert float((q.view(torch.uint8) != q_ref.view(torch.uint8)).float().mean()) < 1e-3
    rows, cols = fp8.channel_scales(base.dequantize(torch.float32))
    w_ref = fp8.nf4_to_fp8_reference(base.nf4_tensors(), (512, 1536), 1 / rows, False)
    wt_ref = fp8.nf4_to_fp8_reference(base.nf4_tensors(), (512, 1536), 1 / cols, True)
    forward_twin = (q_ref.float() * scale_ref) @ (w_ref.float() * rows[:, None]).t()
    backward_twin = fp8_rows.quantize_rows_reference(g)
    backward_twin = (backward_twin[0].float() * backward_twin[1]) @ (wt_ref.float() * cols[:, None]).t()
    assert relative_error(fp8.fp8_linear(x, base), forward_twin) < 5e-3  # bf16 output rounding and accumulation
    assert relative_error(fp8.fp8_linear_input_grad(g, base), backward_twin) < 5e-3
    exact = x.float() @ base.dequantize(torch.float32).t()
    assert relative_error(fp8.fp8_linear(x, base), exact) < 0.05


@pytest.mark.gpu
@fp8_gpu
def test_fp8_model_on_gpu_trains_the_adapter_like_bf16(tmp_path):
    model = tiny_lora_model(tmp_path, device="cuda", dtype=torch.bfloat16)
    batch = random_batch(0).to(torch.device("cuda"))
    runs = []
    for mark in (False, True):
        if mark:
            use_fp8_base(model)
        model.zero_grad()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = target_loss_sum(model, model(batch.input_ids, batch.position_ids, None), batch.labels)[0]
        loss.backward()
        runs.append((float(loss), torch.cat([p.grad.flatten() for n, p in model.named_parameters() if "lora_" in n])))
    assert abs(runs[1][0] - runs[0][0]) < 0.01 * runs[0][0]
    assert torch.nn.functional.cosine_similarity(runs[1][1], runs[0][1], dim=0) > 0.98


def test_an_activation_is_quantized_once_while_it_lives_unchanged(monkeypatch):
    calls = []
    quantize = fp8_rows.quantize_rows
    monkeypatch.setattr(fp8_rows, "quantize_rows", lambda x: calls.append(x.shape) or quantize(x))
    x = torch.randn(4, 3, 64)
    first = fp8_rows.quantize_activation(x)
    assert fp8_rows.quantize_activation(x)[0] is first[0] and len(calls) == 1
    x.mul_(2)  # changed in place: its version moves on
    again = fp8_rows.quantize_activation(x)
    assert len(calls) == 2 and torch.allclose(again[1], 2 * first[1])
    fp8_rows.quantize_activation(x.clone())  # equal values, another tensor
    assert len(calls) == 3


def test_fp8_model_quantizes_each_layer_input_once(tmp_path, monkeypatch):
    """Per layer: the attention input (shared by q, k, v), the attention output and the MLP input (shared by gate and
    up); down_proj's input comes quantized out of the SwiGLU pass."""
    model = tiny_lora_model(tmp_path)
    use_fp8_base(model)
    calls = []
    quantize = fp8_rows.quantize_rows
    monkeypatch.setattr(fp8_rows, "quantize_rows", lambda x: calls.append(x.shape) or quantize(x))
    batch = random_batch(0)
    with torch.no_grad():
        model(batch.input_ids, batch.position_ids, None)
    assert calls == [(48, 64)] * 3 * 2  # 2 rows x 24 tokens, hidden 64; 2 layers


@pytest.mark.gpu
@fp8_gpu
@pytest.mark.parametrize("width", [1536, 8960, 1000])
def test_swiglu_quantized_kernel_equals_reference(width):
    torch.manual_seed(width)
    gate, up = (torch.randn(300, width, device="cuda", dtype=torch.bfloat16) * 3 for _ in range(2))
    stacked = torch.cat([gate, up], dim=1)  # the halves of a stacked gate/up output: rows 2 x width apart
    for inputs in ((gate, up), (stacked[:, :width], stacked[:, width:])):
        product, q, scale = fp8_rows.swiglu_quantized(*inputs)
        product_ref, q_ref, scale_ref = fp8_rows.swiglu_quantized_reference(*inputs)
        torch.testing.assert_close(product, product_ref)
        torch.testing.assert_close(scale, scale_ref)
        assert float((q.view(torch.uint8) != q_ref.view(torch.uint8)).float().mean()) < 1e-3


def test_swiglu_remembered_has_swiglus_gradient_and_remembers_its_rows():
    gate, up = (torch.randn(2, 5, 64, requires_grad=True) for _ in range(2))
    product = fp8_rows.swiglu_remembered(gate, up)
    assert fp8_rows.quantize_activation(product)[0].shape == (10, 64)  # the remembered rows, not quantized again
    product.pow(2).sum().backward()
    gate2, up2 = (t.detach().clone().requires_grad_(True) for t in (gate, up))
    (torch.nn.functional.silu(gate2) * up2).pow(2).sum().backward()
    torch.testing.assert_close(gate.grad, gate2.grad)
    torch.testing.assert_close(up.grad, up2.grad)


@pytest.mark.parametrize("checkpointing", [True, False])
@pytest.mark.parametrize("stacked", [True, False])
def test_intermediate_rows_are_never_quantized_on_their_own(tmp_path, monkeypatch, checkpointing, stacked):
    """[tokens, intermediate] tensors get their e4m3 rows where they are made: the SwiGLU product in its forward,
    gate's and up's output gradients in SwiGLU's backward (as one [tokens, 2 x intermediate] tensor for the stacked
    gate/up). Only hidden-wide tensors and q/k/v's gradients are quantized on their own; with the remembered rows
    lost, the intermediate ones would be too (the test would fail)."""
    monkeypatch.setattr(lora_module, "STACK_SIBLINGS", stacked)
    # hidden 64; q 32 (so o_proj's input is 32 wide), k/v 16, q+k+v 64; intermediate 128 (stacked gate/up 256)
    model = tiny_lora_model(tmp_path, family="mistral")
    model.gradient_checkpointing = checkpointing
    use_fp8_base(model)
    widths = []
    quantize = fp8_rows.quantize_rows
    monkeypatch.setattr(fp8_rows, "quantize_rows", lambda x: widths.append(x.shape[-1]) or quantize(x))
    batch = random_batch(0)
    target_loss_sum(model, model(batch.input_ids, batch.position_ids, None), batch.labels)[0].backward()
    assert set(widths) == ({64, 32} if stacked else {64, 32, 16})
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for n, p in model.named_parameters() if "lora_B" in n)


@pytest.mark.gpu
@fp8_gpu
@pytest.mark.parametrize("width", [1536, 8960, 1000])
def test_swiglu_backward_quantized_kernel_equals_reference(width):
    torch.manual_seed(width)
    gate, up, grad = (torch.randn(300, width, device="cuda", dtype=torch.bfloat16) * 3 for _ in range(3))
    stacked = torch.randn(300, 2 * width, device="cuda", dtype=torch.bfloat16) * 3  # a stacked gate/up output
    for stack in (False, True):
        inputs = (stacked[:, :width], stacked[:, width:], grad) if stack else (gate, up, grad)
        fast = fp8_rows.swiglu_backward_quantized(*inputs, stacked=stack)
        reference = fp8_rows.swiglu_backward_quantized_reference(*inputs, stacked=stack)
        for made, expected in zip(fast[:2], reference[:2]):
            torch.testing.assert_close(made, expected)
        assert (fast[0]._base is fast[1]._base is not None) == stack
        for (q, scale), (q_ref, scale_ref) in ([fast[2], reference[2]],) if stack else zip(fast[2], reference[2]):
            torch.testing.assert_close(scale, scale_ref)
            assert float((q.view(torch.uint8) != q_ref.view(torch.uint8)).float().mean()) < 1e-3


def test_an_fp8_run_is_evaluated_with_the_base_in_bf16(tmp_path):
    """Scores describe the model as it is served: the base model's score before training is the bf16 base's,
    bit for bit, although the run trains in FP8."""
    from lorafit.train.loop import train
    from lorafit.train.progress import Progress
    from tests.tiny import make_tiny_checkpoint

    folder, _ = make_tiny_checkpoint(tmp_path, "qwen2")
    data = write_chat_data(tmp_path / "train.jsonl", 20)
    before = []
    for fp8_base in (False, True):
        cfg = tiny_config(tmp_path / str(fp8_base), folder, data, max_steps=1, method="qlora",
                          model={"path": str(folder), "fp8_base": fp8_base},
                          data={"train": str(data), "max_length": 64, "val_ratio": 0.25},
                          eval={"before_training": True})
        before.append(train(cfg, Progress(quiet=True)).before)
    assert before[0] and before[0] == before[1]
