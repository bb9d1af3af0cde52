"""Peak GPU memory of the usual transformers + PEFT + bitsandbytes QLoRA recipe, for comparison with lorafit.

The recipe is the one in shared/anchors/anchor_step.py: `from_pretrained(quantization_config=nf4 + double quant,
dtype=bf16)`, `prepare_model_for_kbit_training` (which upcasts every parameter that is not 4-bit, embeddings and
head included, to fp32, and turns on Hugging Face gradient checkpointing), `get_peft_model` with fp32 adapters,
paged AdamW 8-bit, and `model(input_ids, labels=...)`, whose loss materialises the full fp32 logits.

What that costs beyond lorafit:
- fp32 embedding and head: 4 bytes per vocabulary x hidden entry instead of 2;
- an fp32 residual stream (the fp32 embedding output flows through fp32 norms; Linear4bit casts its output back
  to the input dtype), so every checkpointed layer input is 4 x hidden bytes per token;
- the loss over all tokens at once: logits [tokens, vocab] fp32, kept by the output object during backward, plus
  log-softmax output, its gradient and log-softmax backward's output: four fp32 [tokens, vocab] tensors at the
  peak, where lorafit holds three of [1024, vocab].
Checked against the anchor measurements on an H100 (anchors/README.md, BENCHMARKS.md): Qwen2.5-1.5B 1024x2 6.64 GB,
1024x4 11.61 GB, Qwen2.5-7B 2048x2 18.34 GB, 2048x1 12.90 GB (GiB, max_memory_allocated).
"""

from __future__ import annotations

from lorafit.plan.memory import Estimate, Line, Run, blk, nf4_bytes, optimizer_bytes, trainable_tensors
from lorafit.plan.presets import Card, Shape

# Reserved over allocated for the recipe: cached fp32 [tokens, intermediate] forward temporaries, about seven of
# them (BENCHMARKS.md: 7.13 - 6.64 GB at 1024x2 and 12.56 - 11.61 GB at 1024x4 on Qwen2.5-1.5B).
RECIPE_FORWARD_CACHED = 7.0


def recipe_estimate(shape: Shape, run: Run, card: Card | None = None) -> Estimate:
    """Peak allocated and reserved bytes of one step of the recipe (QLoRA, checkpointing on, as it ships)."""
    H, L, V, M = shape.hidden, shape.layers, shape.vocab, run.tokens
    codes = consts = 0
    for _, i, o, _ in shape.linears():
        c, k = nf4_bytes(i * o)
        codes, consts = codes + c, consts + k
    bias = sum(blk(4 * o) for _, i, o, b in shape.linears() if b)
    tensors = trainable_tensors(shape, Run("qlora", lora_r=run.lora_r, lora_targets=run.lora_targets))
    opt_in, opt_paged = optimizer_bytes(tensors, run.optimizer)
    ws = 2 * (card.cublas_workspace if card else 32 * 2**20)
    lines = [
        Line("weights", "decoder linears, NF4 codes + constants", L * (codes + consts), "same as lorafit"),
        Line("weights", "embedding/head upcast to fp32", blk(4 * V * H) * (1 if shape.tied else 2),
             "prepare_model_for_kbit_training upcasts every non-4-bit parameter"),
        Line("weights", "norms and biases, fp32", (2 * L + 1) * blk(4 * H) + L * bias, ""),
        Line("trainable", f"LoRA A/B (r={run.lora_r}), fp32", sum(blk(4 * n) for n in tensors), ""),
        Line("trainable", "optimizer states in the allocator", opt_in, ""),
        Line("runtime", "cuBLAS workspaces", ws, ""),
        Line("activations", f"checkpointed layer inputs, fp32 ({L} layers)", L * blk(4 * H * M), "fp32 residual"),
        Line("activations", "final norm input and output, rope cos/sin (fp32)",
             2 * blk(4 * H * M) + 2 * blk(4 * M * shape.head_dim), ""),
        Line("loss", f"fp32 logits: 4 x [{M}, {V}]", 4 * blk(4 * M * V),
             "logits (held by the output), log-softmax, its gradient, log-softmax backward"),
    ]
    allocated = sum(x.bytes for x in lines)
    reserved = allocated + int(RECIPE_FORWARD_CACHED * blk(4 * shape.intermediate * M))
    outside = [Line("runtime", "paged optimizer states (unified memory)", opt_paged, "")] if opt_paged else []
    return Estimate(lines, "loss", allocated, reserved, outside, {"loss": allocated})
