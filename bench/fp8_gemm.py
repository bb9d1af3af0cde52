"""FP8 against bf16 for the frozen base's matmuls, one linear at a time, on a GPU (carry .wheels/core).

For each shape (tokens, in, out) of issue 8's runs: milliseconds of the forward (dequantize + GEMM) and of the
input-gradient pass (dequantize + GEMM), bf16 and FP8, plus the parts alone (activation quantization, NF4 -> e4m3
in both layouts), and the FP8 output's error against an fp32 product of the same NF4 weight.

    python bench/fp8_gemm.py            # prints one RESULT line per shape
"""

from __future__ import annotations

import json

import torch

from lorafit.kernels import fp8, fp8_rows, fused
from lorafit.kernels.lora import frozen_weight
from lorafit.model.quantize import NF4Linear

SHAPES = {  # name: (tokens, in, out)
    "7b-q/o 16k": (16384, 3584, 3584), "7b-k/v 16k": (16384, 3584, 512), "7b-gate/up 16k": (16384, 3584, 18944),
    "7b-down 16k": (16384, 18944, 3584), "7b-gate/up 4k": (4096, 3584, 18944), "7b-down 4k": (4096, 18944, 3584),
    "1.5b-q/o 32k": (32768, 1536, 1536), "1.5b-gate/up 32k": (32768, 1536, 8960), "1.5b-down 32k": (32768, 8960, 1536),
}


def timed(fn, repeats: int = 20) -> float:
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / repeats


def measure(name: str, m: int, k: int, n: int) -> dict:
    linear = torch.nn.Linear(k, n, bias=False, dtype=torch.bfloat16, device="cuda")
    torch.nn.init.normal_(linear.weight, std=k ** -0.5)
    base = NF4Linear.from_linear(linear, "cuda", torch.bfloat16)
    del linear
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    g = torch.randn(m, n, device="cuda", dtype=torch.bfloat16)
    row = {"shape": name, "tokens": m, "in": k, "out": n}
    row["bf16_fwd_ms"] = timed(lambda: x @ frozen_weight(base, torch.bfloat16).t())
    row["bf16_bwd_ms"] = timed(lambda: g @ frozen_weight(base, torch.bfloat16))
    row["fp8_fwd_ms"] = timed(lambda: fp8.fp8_linear(x, base))
    row["fp8_bwd_ms"] = timed(lambda: fp8.fp8_linear_input_grad(g, base))
    row["quantize_x_ms"] = timed(lambda: fp8_rows.quantize_rows(x))
    row["quantize_g_ms"] = timed(lambda: fp8_rows.quantize_rows(g))
    row["nf4_bf16_ms"] = timed(lambda: frozen_weight(base, torch.bfloat16))
    row["nf4_fp8_ms"] = timed(lambda: fp8._weight_fp8(base, False))
    row["nf4_fp8_t_ms"] = timed(lambda: fp8._weight_fp8(base, True))
    w_q, w_scale = fp8._weight_fp8(base, False)
    x_q, x_scale = fp8_rows.quantize_rows(x)
    row["gemm_fp8_ms"] = timed(lambda: torch._scaled_mm(x_q, w_q.t(), scale_a=x_scale,
                                                        scale_b=w_scale.view(1, -1), out_dtype=torch.bfloat16))
    w = frozen_weight(base, torch.bfloat16)
    row["gemm_bf16_ms"] = timed(lambda: x @ w.t())
    flops = 2 * m * k * n
    row["gemm_bf16_tflops"] = round(flops / row["gemm_bf16_ms"] / 1e9, 1)
    row["gemm_fp8_tflops"] = round(flops / row["gemm_fp8_ms"] / 1e9, 1)
    exact = (x[:2048].float() @ base.dequantize(torch.float32).t())
    for label, y in (("bf16", x[:2048] @ w.t()), ("fp8", fp8.fp8_linear(x[:2048], base))):
        row[f"{label}_rel_err"] = round(float((y.float() - exact).norm() / exact.norm()), 5)
    exact = g[:2048].float() @ base.dequantize(torch.float32)
    for label, y in (("bf16_bwd", g[:2048] @ w), ("fp8_bwd", fp8.fp8_linear_input_grad(g[:2048], base))):
        row[f"{label}_rel_err"] = round(float((y.float() - exact).norm() / exact.norm()), 5)
    for transpose in (False, True):
        ref_w = fp8.nf4_to_fp8_reference(base.nf4_tensors(), (n, k), base._fp8_scales[3 if transpose else 2],
                                         transpose)
        fast_w = fp8._weight_fp8(base, transpose)[0]
        row[f"weight_mismatch{'_t' if transpose else ''}"] = float((fast_w.view(torch.uint8)
                                                                   != ref_w.view(torch.uint8)).float().mean())
    x_q_ref = fp8_rows.quantize_rows_reference(x)[0]
    row["quantize_mismatch"] = float((x_q.view(torch.uint8) != x_q_ref.view(torch.uint8)).float().mean())
    if k == 3584 or k == 1536:  # down_proj's input: the product of gate and up rows as wide as `out`
        up = torch.randn(m, n, device="cuda", dtype=torch.bfloat16)
        row["swiglu_quantized_ms"] = timed(lambda: fp8_rows.swiglu_quantized(g, up))
        row["swiglu_bf16_ms"] = timed(lambda: fused.swiglu(g, up))
    return row


def main() -> None:
    torch.manual_seed(0)
    for name, (m, k, n) in SHAPES.items():
        row = measure(name, m, k, n)
        print("RESULT", json.dumps({key: round(v, 3) if isinstance(v, float) else v for key, v in row.items()}),
              flush=True)
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
