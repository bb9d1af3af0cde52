"""The memory planner: presets against built models, bytes per format against real tensors, the arithmetic against
lorafit's own code traced on the meta device, and the totals against peaks measured on an H100."""

from dataclasses import replace

import pytest
import torch

from lorafit.config import load_config
from lorafit.plan.fit import fit_to_budget, make_plan, need, run_from_config
from lorafit.plan.memory import Run, blk, estimate, nf4_bytes, optimizer_bytes
from lorafit.plan.presets import (
    ALL_LINEAR,
    Card,
    PlanError,
    Shape,
    budget_bytes,
    card_presets,
    hf_config,
    model_presets,
    resolve_card,
    shape_from_preset,
)
from lorafit.plan.recipe import recipe_estimate
from lorafit.plan.report import plan_command

GIB = 2**30
H100 = card_presets()["h100"]


@pytest.mark.parametrize("name", sorted(model_presets()))
def test_preset_parameter_counts_equal_the_built_model(name):
    from lorafit.model.llama import CausalLM, ModelArgs

    hf = hf_config(name)
    args = ModelArgs.from_hf(hf)
    with torch.device("meta"):
        model = CausalLM(args, hf)
    shape = shape_from_preset(name)
    assert Shape.from_args(name, args) == shape
    assert sum(p.numel() for p in model.parameters()) == shape.params()  # parameters() counts a tied head once


def test_preset_sizes_are_the_published_ones():
    assert shape_from_preset("qwen2.5-7b").params() == 7_615_616_512  # Qwen2.5-7B's model card: 7.61B
    assert shape_from_preset("llama3.1-8b").params() == 8_030_261_248
    assert shape_from_preset("smollm2-135m").params() == 134_515_008


@pytest.mark.parametrize("shape", [(256, 64), (128, 320), (100, 70)])
def test_nf4_bytes_equal_what_bitsandbytes_allocates(shape):
    import bitsandbytes as bnb

    w = bnb.nn.Params4bit(torch.randn(*shape, dtype=torch.bfloat16), requires_grad=False, compress_statistics=True,
                          quant_type="nf4", blocksize=64).to("cpu")
    qs = w.quant_state
    codes, consts = nf4_bytes(shape[0] * shape[1])
    assert codes == blk(w.data.nbytes)
    real = [qs.absmax, qs.code, qs.offset, qs.state2.absmax, qs.state2.code]
    assert consts == sum(blk(t.nbytes) for t in real)


def test_lora_parameters_equal_peft_and_lorafit(tmp_path):
    from peft import LoraConfig, get_peft_model

    from lorafit.config import LoraConfig as OurLora
    from lorafit.model.llama import ModelArgs
    from lorafit.model.load import load_model
    from lorafit.model.lora import apply_lora
    from tests.tiny import make_tiny_checkpoint

    folder, hf_model = make_tiny_checkpoint(tmp_path, "qwen2")
    peft = get_peft_model(hf_model, LoraConfig(r=4, target_modules=list(ALL_LINEAR)))
    peft_bytes = sum(p.numel() * p.element_size() for n, p in peft.named_parameters() if "lora_" in n)
    ours = load_model(str(folder)).model
    apply_lora(ours, OurLora(r=4))
    our_bytes = sum(p.numel() * p.element_size() for p in ours.parameters() if p.requires_grad)
    shape = Shape.from_args("tiny", ModelArgs.from_hf(hf_model.config))
    assert peft_bytes == our_bytes == 4 * shape.lora_params(4)


def test_adamw_8bit_states_equal_what_bitsandbytes_allocates():
    import bitsandbytes as bnb

    sizes = [4095, 4096, 20_000, 150_000]
    params = [torch.nn.Parameter(torch.randn(n)) for n in sizes]
    opt = bnb.optim.AdamW8bit(params, lr=1e-3)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    unique = {t.data_ptr(): t for p in params for t in opt.state[p].values() if torch.is_tensor(t)}
    inside, paged = optimizer_bytes(sizes, "adamw_8bit")
    assert paged == 0 and inside == sum(blk(t.nbytes) for t in unique.values())
    # the paged variant moves the two uint8 states of tensors of >= 1e5 elements to unified memory
    assert optimizer_bytes(sizes, "paged_adamw_8bit") == (inside - 2 * blk(150_000), 2 * 150_000)


ODD = Shape("odd", vocab=1000, hidden=320, intermediate=864, layers=2, heads=5, kv_heads=1, head_dim=64, tied=False,
            qkv_bias=True)


@pytest.mark.parametrize("method", ["qlora", "lora"])
@pytest.mark.parametrize("seq,batch,ckpt", [(600, 2, True), (600, 2, False), (300, 3, True), (2100, 1, True)])
def test_arithmetic_equals_lorafit_traced_on_meta(method, seq, batch, ckpt):
    """Every tensor lorafit's model, LoRA and chunked loss allocate, on an odd shape: the formulas match the trace."""
    from lorafit.plan.trace import trace_step

    run = Run(method, seq, batch, ckpt)
    traced = trace_step(ODD, run).peak + 2 * 32 * 2**20  # the two cuBLAS workspaces are not tensors
    assert estimate(ODD, run).allocated == pytest.approx(traced, rel=0.005)


@pytest.mark.parametrize("method", ["qlora", "lora"])
def test_kept_layers_in_formulas_and_trace(method):
    """kept_layers: the last layers keep their activations (no recomputation). Formulas equal the trace of the real
    code; keeping one layer costs almost nothing at the peak (the recomputed last layer holds nearly as much), each
    more one costs a layer's saved activations, and keeping all equals checkpointing off."""
    from lorafit.plan.trace import trace_step

    shape = replace(ODD, layers=3)
    peaks = []
    for kept in (0, 1, 2, 3):
        run = Run(method, 600, 2, True, kept_layers=kept)
        traced = trace_step(shape, run).peak + 2 * 32 * 2**20
        peaks.append(estimate(shape, run).allocated)
        assert peaks[-1] == pytest.approx(traced, rel=0.005)
    assert peaks[0] <= peaks[1] <= 1.01 * peaks[0] < peaks[2] < peaks[3]
    assert peaks[3] == estimate(shape, Run(method, 600, 2, False)).allocated


def test_fastest_spends_spare_memory_on_kept_layers():
    """Qwen2.5-1.5B at 16 x 1024 in a 12 GiB budget: checkpointing with some of the last layers kept, as many as
    fit (one more does not), and faster than keeping none."""
    from lorafit.plan.fit import fastest, speed

    shape, budget = shape_from_preset("qwen2.5-1.5b"), Card("b", "12 GiB", 12 * 2**30, "sm90", context_bytes=0)
    choice = fastest(shape, Run("qlora", 1024, 16, True), budget, 16)
    assert choice.run.checkpointing and 1 <= choice.run.kept_layers < shape.layers and choice.plan.fits
    assert not make_plan(shape, replace(choice.run, kept_layers=choice.run.kept_layers + 1), budget).fits
    assert speed(choice.run, shape.layers) > speed(replace(choice.run, kept_layers=0), shape.layers)


def test_offloaded_layers_leave_the_gpu_plan():
    """offload_activations: the first layers keep neither a checkpointed input nor their activations on the GPU; the
    plan's peak is the later of the recomputed-layer moment and an offloaded layer's backward (two layers' saved
    activations back), no layer counts as recomputed in the speed model, and the config's value reaches the plan."""
    from lorafit.plan.fit import speed
    from lorafit.plan.memory import layer_saved_per_token, saved_bytes

    shape = shape_from_preset("qwen2.5-7b")
    plain, offloaded = Run("qlora", 2048, 4, True), Run("qlora", 2048, 4, True, offloaded_layers=12)
    a, b = estimate(shape, plain), estimate(shape, offloaded)
    inputs = blk(2 * shape.hidden * plain.tokens)
    assert a.moments["loss"] - b.moments["loss"] == 12 * inputs
    two_layers = 2 * saved_bytes(layer_saved_per_token(shape, offloaded, 2), offloaded.tokens)
    assert b.moments["offloaded"] > two_layers and b.allocated == max(b.moments.values())
    everything = estimate(shape, replace(offloaded, offloaded_layers=28))
    assert a.moments["loss"] - everything.moments["loss"] == 28 * inputs
    assert speed(offloaded, 28) > speed(plain, 28) and speed(replace(offloaded, offloaded_layers=28), 28) == speed(
        replace(plain, checkpointing=False), 28)
    cfg = load_config(overrides={"model": {"path": "qwen2.5-7b"}, "data": {"train": "x.jsonl"},
                                 "offload_activations": 5})
    assert run_from_config(cfg)[1].offloaded_layers == 5


def test_embedding_table_in_cpu_memory_leaves_the_gpu_plan_and_trace():
    """model.embeddings_on_cpu: the untied table (vocab x hidden bf16) is gone from both the formulas and the trace;
    a tied table (it is the LM head) stays."""
    from lorafit.plan.trace import trace_step

    on_gpu, on_cpu = Run("qlora", 600, 2), Run("qlora", 600, 2, embeddings_on_cpu=True)
    traced = trace_step(ODD, on_cpu).peak + 2 * 32 * 2**20
    assert estimate(ODD, on_cpu).allocated == pytest.approx(traced, rel=0.005)
    saved = estimate(ODD, on_gpu).allocated - estimate(ODD, on_cpu).allocated
    assert saved == blk(2 * ODD.vocab * ODD.hidden)
    tied = replace(ODD, tied=True)
    assert estimate(tied, on_cpu).allocated == estimate(tied, on_gpu).allocated


def _saved(fn, *args) -> list[tuple]:
    """(shape, dtype, origin) of every tensor `fn` saves for backward; origin: the argument's index, or 'new'."""
    found = []

    def pack(t):
        origin = next((i for i, a in enumerate(args) if isinstance(a, torch.Tensor)
                       and a.untyped_storage().data_ptr() == t.untyped_storage().data_ptr()), "new")
        found.append((tuple(t.shape), t.dtype, origin))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(*args)
    return sorted(found, key=str)


@pytest.mark.parametrize("device,backend", [
    ("cpu", "aot_eager_decomp_partition"),  # Inductor's decompositions and min-cut partitioner, no code generation
    pytest.param("cuda", "inductor", marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(),
                                                                               reason="needs a CUDA GPU")]),
])
def test_trace_stand_ins_save_what_the_compiled_kernels_save(device, backend):
    """The trace's stand-ins for kernels/fused.py's compiled RMSNorm, RoPE and SwiGLU save the same tensors as the
    compiled functions (RMSNorm: its input and an fp32 [..., 1] 1/rms; RoPE: cos and sin; SwiGLU: gate and up)."""
    from lorafit.kernels import fused
    from lorafit.plan import trace

    torch.manual_seed(0)
    bf16 = dict(device=device, dtype=torch.bfloat16)
    x = torch.randn(3, 37, 100, **bf16, requires_grad=True)
    q = torch.randn(3, 37, 7 * 16, **bf16, requires_grad=True).view(3, 37, 7, 16).transpose(1, 2)
    k = torch.randn(3, 37, 16, **bf16, requires_grad=True).view(3, 37, 1, 16).transpose(1, 2)
    cos, sin = torch.randn(3, 37, 16, **bf16), torch.randn(3, 37, 16, **bf16)
    gate, up = (torch.randn(3, 37, 300, **bf16, requires_grad=True) for _ in range(2))
    cases = [(fused.rms_norm_reference, trace.RMSNorm.apply, (x, torch.rand(100, **bf16), 1e-6)),
             (fused.rope_reference, trace.RoPE.apply, (q, k, cos, sin)),
             (fused.swiglu_reference, trace.SwiGLU.apply, (gate, up))]
    torch._dynamo.reset()
    for reference, stand_in, args in cases:
        compiled = torch.compile(reference, backend=backend)
        assert _saved(stand_in, *args) == _saved(compiled, *args), reference.__name__


# bench/bench_memory.py's configurations (shape, method, seq, batch, checkpointing): peaks at the loss and at the
# last layer's backward, LoRA and QLoRA, with and without checkpointing
BENCH_CONFIGS = [("qwen2.5-0.5b", "qlora", 1024, 4, True), ("qwen2.5-1.5b", "qlora", 1024, 8, True),
                 ("qwen2.5-1.5b", "qlora", 1024, 2, False), ("qwen2.5-1.5b", "lora", 2048, 1, False),
                 ("qwen2.5-0.5b", "lora", 1024, 4, False), ("qwen2.5-7b", "qlora", 2048, 2, True),
                 ("qwen2.5-7b", "lora", 512, 2, False)]


@pytest.mark.parametrize("name,method,seq,batch,ckpt", BENCH_CONFIGS)
def test_arithmetic_and_allocator_replay_agree_on_real_shapes(name, method, seq, batch, ckpt):
    """memory.py + allocator.py against lorafit's CUDA path traced on meta and replayed through the caching
    allocator: allocated within 1%, reserved within 5%, and the step runs under a cap of what the plan says it
    needs (`lorafit train --gpu-memory`)."""
    from lorafit.plan.allocator import replay
    from lorafit.plan.trace import trace_step

    shape, run = shape_from_preset(name), Run(method, seq, batch, ckpt)
    trace = trace_step(shape, run)
    alloc = replay(trace)
    plan = make_plan(shape, run, H100)
    assert plan.lorafit.allocated == pytest.approx(alloc.peak_allocated, rel=0.01)
    assert plan.lorafit.reserved == pytest.approx(alloc.peak_reserved, rel=0.05)
    replay(trace, cap=plan.needed)  # raises MemoryError if the allocator cannot stay under it


def test_validation_loss_is_the_peak_of_a_small_run():
    """Without gradient the loss takes train/loss.py's plain chunks (fp32 logits and their log-softmax): with
    validation data that is the peak of a small run, and the plan's need covers it."""
    from lorafit.plan.allocator import replay
    from lorafit.plan.trace import trace_step

    shape, run = shape_from_preset("qwen2.5-0.5b"), Run("qlora", 1024, 4, True, eval=True)
    trace = trace_step(shape, run)
    plan = make_plan(shape, run, H100)
    assert plan.lorafit.moment == "eval" and plan.lorafit.moments["eval"] > 1.5 * plan.lorafit.moments["loss"]
    assert plan.lorafit.allocated == pytest.approx(replay(trace).peak_allocated, rel=0.01)
    replay(trace, cap=plan.needed)
    cfg = load_config(overrides={"model": {"path": "qwen2.5-0.5b"}, "data": {"train": "x.jsonl", "val_ratio": 0.1}})
    assert run_from_config(cfg)[1].eval and not run_from_config(load_config(overrides={
        "model": {"path": "qwen2.5-0.5b"}, "data": {"train": "x.jsonl"}}))[1].eval


# H100 measurements of lorafit before the fused kernels (BENCHMARKS.md, 2026-11-23) no longer describe its step:
# bench/bench_memory.py measures the current one. The recipe's (GiB, max_memory_allocated): shared/anchors/README.md
RECIPE_MEASURED = [("qwen2.5-1.5b", 1024, 2, 6.64), ("qwen2.5-1.5b", 1024, 4, 11.61), ("qwen2.5-7b", 2048, 2, 18.34),
                   ("qwen2.5-7b", 2048, 1, 12.90)]


@pytest.mark.parametrize("name,seq,batch,allocated", RECIPE_MEASURED)
def test_recipe_prediction_matches_anchor_measurements(name, seq, batch, allocated):
    assert recipe_estimate(shape_from_preset(name), Run("qlora", seq, batch), H100).allocated / GIB == \
        pytest.approx(allocated, rel=0.02)


def test_cards_and_budgets():
    rtx4070 = card_presets()["rtx4070"]
    assert budget_bytes("rtx4070") == budget_bytes("RTX 4070") == rtx4070.total_bytes - rtx4070.context_bytes
    assert resolve_card("12GB").key == "rtx4070"  # a card sold as 12 GB: the smallest listed one
    assert budget_bytes("10GiB") == 10 * GIB  # an exact allocator budget: nothing subtracted
    assert resolve_card("h100").cublas_workspace == 32 * 2**20 and resolve_card("t4").cublas_workspace < 9 * 2**20
    for bad in ("a100", "potato", "12 parsecs"):  # a100 is ambiguous (40 or 80 GB)
        with pytest.raises(PlanError):
            resolve_card(bad)


def test_fit_to_budget_keeps_the_effective_batch_and_fits():
    cfg = load_config(overrides={"model": {"path": "qwen2.5-1.5b"}, "data": {"train": "x.jsonl", "max_length": 1024},
                                 "micro_batch_size": 16, "grad_accum": 2, "gradient_checkpointing": False})
    small = fit_to_budget(cfg, 6 * GIB)
    assert small["micro_batch_size"] * small["grad_accum"] == 32 and "data" not in small
    shape, run, _ = run_from_config(cfg)
    from dataclasses import replace

    chosen = replace(run, batch=small["micro_batch_size"], checkpointing=small["gradient_checkpointing"])
    assert need(make_plan(shape, chosen, H100).lorafit) <= 6 * GIB
    big = fit_to_budget(cfg, 70 * GIB)
    assert big["micro_batch_size"] >= small["micro_batch_size"]
    short = fit_to_budget(load_config(overrides={"model": {"path": "qwen2.5-7b"}, "method": "lora",
                                                 "data": {"train": "x.jsonl", "max_length": 4096}}), 16 * GIB)
    assert 0 < short["data"]["max_length"] < 4096 and short["micro_batch_size"] == 1
    with pytest.raises(PlanError):
        fit_to_budget(cfg, 1 * GIB)


def test_plan_command_prints_the_table_and_returns_it():
    from rich.console import Console

    console = Console(record=True, width=200)
    out = plan_command("qwen2.5-7b", "qlora", seq=2048, batch=2, gpu="rtx4090", console=console)
    text = console.export_text()
    assert "allocated at the peak" in text and "fits" in text and "transformers + PEFT" in text
    assert out["fits"] and out["allocated"] < out["reserved"] < out["recipe"]["reserved"]
    assert out["fastest"]["micro_batch_size"] * out["fastest"]["grad_accum"] == 2
    assert not out["fp8_base_available"] and "fp8_base" not in text  # an RTX 4090 (sm89): not enabled
    hopper = Console(record=True, width=200)
    assert plan_command("qwen2.5-7b", "qlora", seq=2048, batch=8, gpu="h100", console=hopper)["fp8_base_available"]
    assert "--model.fp8_base true" in hopper.export_text()
    fits = plan_command(gpu="24GB", fits=True, console=console)
    rows = {(r["model"], r["method"]): r for r in fits["rows"]}
    assert rows["qwen2.5-7b", "qlora"]["fits"] and not rows["qwen2.5-72b", "qlora"]["fits"]
    longest = {m: rows[m, "qlora"]["longest_seq"] for m in ("llama3.2-1b", "llama3.1-8b", "qwen2.5-14b")}
    assert longest["llama3.2-1b"] > longest["llama3.1-8b"] > longest["qwen2.5-14b"] > 0  # Qwen2.5 <= 7B: 32k, the limit


def test_accumulation_keeps_the_earlier_gradients_alive():
    shape = shape_from_preset("qwen2.5-7b")
    one, two = estimate(shape, Run("qlora", 1024, 2)), estimate(shape, Run("qlora", 1024, 2, grad_accum=2))
    assert two.allocated - one.allocated == 4 * shape.lora_params(16)  # fp32 LoRA gradients (512-byte blocks)


def test_live_bytes_can_say_what_is_alive_at_the_peak():
    """LiveBytes(labelled=True), behind bench/trace_peak.py: the live set at the peak, by op and shape."""
    from lorafit.plan.trace import LiveBytes

    tracker = LiveBytes(labelled=True)
    with tracker:
        a = torch.empty(1000, 1000, device="meta")
        b = torch.ones(10, device="meta")
        del a
        c = torch.zeros(500, device="meta")
    assert tracker.peak == blk(4 * 1000 * 1000) + blk(40)
    assert sorted(label for _, label in tracker.at_peak.values()) == [("empty.memory_format", (1000, 1000)),
                                                                       ("ones.default", (10,))]
    assert b is not None and c is not None


def test_fit_to_budget_takes_the_long_row_settings_where_only_they_fit():
    """Qwen2.5-7B QLoRA at 65,536 tokens on 14.25 GiB (a 16 GB card): the modelled settings would shorten the row to
    21,760; offloaded checkpoints and the MLP in tiles fit it (the trace: 13.3 GiB; measured on an H100: 11.5 GiB
    allocated)."""
    cfg = load_config(overrides={"model": {"path": "qwen2.5-7b"}, "data": {"train": "x.jsonl", "max_length": 65536},
                                 "micro_batch_size": 1, "grad_accum": 2})
    assert fit_to_budget(cfg, int(14.25 * GIB)) == {
        "micro_batch_size": 1, "grad_accum": 2, "gradient_checkpointing": True, "kept_layers": 0,
        "offload_checkpoints": True, "mlp_chunk_tokens": 8192}
    assert fit_to_budget(cfg, 10 * GIB)["data"]["max_length"] < 65536  # too little even so: the row is shortened


def test_fp8_base_plans_the_e4m3_rows_of_swiglus_gradients():
    """SwiGLU's backward with an FP8 base also holds e4m3 rows of gate's and up's gradients: 2 x [tokens, I] bytes
    more at the MLP backward (Qwen2.5-7B, 8 x 2048: 0.58 GiB; the H100 measured +0.78 GiB peak allocated)."""
    from lorafit.plan.presets import resolve_model

    shape = resolve_model("qwen2.5-7b")
    run = Run("qlora", 2048, 8, kept_layers=1, embeddings_on_cpu=True)
    plain, fp8 = estimate(shape, run), estimate(shape, replace(run, fp8_base=True))
    assert fp8.moment == plain.moment == "layer"
    assert fp8.allocated - plain.allocated == 2 * 2048 * 8 * shape.intermediate
    assert estimate(shape, replace(run, method="lora", fp8_base=True)).allocated == \
        estimate(shape, replace(run, method="lora")).allocated  # only the NF4 base runs in FP8
