"""Peak GPU memory of one lorafit training step, as plain arithmetic over the model's shapes.

Everything here models lorafit's own CUDA path: `model/load.py` + `model/quantize.py` (NF4 quantized by
bitsandbytes, blocksize 64, double quantization, kept as plain tensors), `kernels/lora.py` (one autograd Function
per adapted linear: the frozen weight dequantized by `kernels/nf4.py` in forward and again in backward, bf16 casts
of the fp32 A/B cached for the optimizer step), `kernels/fused.py` (RMSNorm, RoPE, SwiGLU compiled by Inductor),
`model/llama.py` (flash sdpa, one torch.utils.checkpoint per decoder layer), `train/loss.py` +
`kernels/cross_entropy.py` (a frozen head's loss gradient computed in the forward pass, 1024-token chunks of bf16
logits overwritten by their gradient) and `train/loop.py` (bf16 weights on GPU, paged AdamW 8-bit). Sizes are in
bytes, each tensor rounded up to the caching allocator's 512-byte block, so `allocated` predicts
torch.cuda.max_memory_allocated.

The step's peak is at one of a few moments, and `estimate` returns the largest:
- `loss`: the LM head's forward, one chunk of logits alive next to the gathered target states and their gradient,
  on top of everything the forward left alive (full fine-tuning: backward of the first recomputed loss chunk,
  three fp32 [chunk, vocab] tensors);
- `layer`: backward of the last decoder layer, where the checkpointed layer has been recomputed and the MLP's
  gradients are being formed (with checkpointing, the saved layer inputs of every layer are alive);
- `optimizer`: clip + optimizer step, with every LoRA gradient alive;
- `eval` (only with validation data): the validation loss without gradient, whose chunks hold fp32 logits and
  their log-softmax, eight times the training loss's bf16 chunk: for small runs the peak of the whole run.
`plan.trace` runs lorafit's real model and loss code on the meta device, with stand-ins that allocate and save
what the CUDA kernels do, to check these formulas tensor by tensor. Full fine-tuning (fp32 master weights under
bf16 autocast) is modelled from the same reading but is approximate: autocast does not run on meta, so it is
neither traced nor yet measured.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from lorafit.plan.presets import ALL_LINEAR, Card, Shape

LOSS_CHUNK_TOKENS = 1024  # lorafit.train.loss.LOSS_CHUNK_TOKENS
PAGED_MIN_NUMEL = 100_000  # bitsandbytes pages a state buffer only from 1e5 elements (Optimizer8bit.get_state_buffer)
MIN_8BIT_NUMEL = 4096  # below this, bitsandbytes keeps 32-bit states (min_8bit_size)
METHODS = ("qlora", "lora", "full")


def blk(n: int | float) -> int:
    """Bytes the CUDA caching allocator counts for a tensor of n bytes: a multiple of 512 (at least 512); a tensor of
    10 MiB or more gets its own segment rounded up to 2 MiB, and when that leaves 1 MiB or less the block is not
    split, so the whole segment counts as allocated."""
    n = int(n)
    if n <= 0:
        return 0
    b = max(512, -(-n // 512) * 512)
    whole = -(-b // (2 * 2**20)) * 2 * 2**20
    return whole if b >= 10 * 2**20 and whole - b <= 2**20 else b


@dataclass(frozen=True)
class Run:
    """What the planner needs of a training run."""

    method: str = "qlora"
    seq: int = 2048  # tokens per row (data.max_length)
    batch: int = 1  # rows per micro-batch (micro_batch_size)
    checkpointing: bool = True
    grad_accum: int = 1  # micro-batches per optimizer step: from the second on, every gradient is already alive
    lora_r: int = 16
    lora_targets: tuple[str, ...] = ALL_LINEAR
    packed: bool = False  # rows hold several examples (segments through varlen flash attention: no extra memory)
    optimizer: str = "paged_adamw_8bit"
    targets: int | None = None  # tokens carrying loss per micro-batch; None: all (B * (T - 1)), the worst case
    resident_layers: int | None = None  # QLoRA layer streaming: decoder layers kept on the GPU (None: all)
    eval: bool = False  # validation loss computed (data.val or data.val_ratio): a no-grad pass with fp32 logits
    embeddings_on_cpu: bool = False  # the untied input embedding table stays in CPU memory (model.embeddings_on_cpu)
    kept_layers: int = 0  # with checkpointing, the last N layers keep their activations (config kept_layers)
    offloaded_layers: int = 0  # with checkpointing, the first N layers' activations wait in CPU memory
    # long rows (config offload_checkpoints, mlp_chunk_tokens): modelled by the trace only (plan/fit.long_rows)
    offload_checkpoints: bool = False
    mlp_chunk: int = 0
    fp8_base: bool = False  # QLoRA with the base's matmuls in FP8 (model.fp8_base): e4m3 rows beside bf16 tensors

    @property
    def tokens(self) -> int:
        return self.seq * self.batch

    @property
    def target_tokens(self) -> int:
        return self.targets if self.targets is not None else self.batch * (self.seq - 1)


@dataclass
class Line:
    group: str  # weights | trainable | activations | loss | runtime
    what: str
    bytes: int
    why: str = ""


@dataclass
class Estimate:
    lines: list[Line]  # what is alive at the peak moment
    moment: str  # loss | layer | optimizer
    allocated: int  # predicted torch.cuda.max_memory_allocated
    reserved: int = 0  # predicted torch.cuda.max_memory_reserved (filled by plan.allocator)
    outside: list[Line] = field(default_factory=list)  # on the card but outside the allocator
    moments: dict[str, int] = field(default_factory=dict)

    @property
    def card_bytes(self) -> int:
        """What the card must hold: the allocator's reservation plus what lives outside it."""
        return self.reserved + sum(x.bytes for x in self.outside)


# --- persistent: weights, adapters, optimizer ----------------------------------------------------------------------


def nf4_bytes(n: int) -> tuple[int, int]:
    """(packed codes, quantization constants) of one NF4 weight of n elements, as bitsandbytes allocates them.

    Codes: two 4-bit values per byte. Constants (double quantization): one uint8 absmax per 64-weight block, one
    fp32 absmax per 256 of those, the fp32 offset, the 16-entry NF4 code and the 256-entry dynamic code of the
    second level: 0.127 bits per weight plus ~2.5 KiB per matrix.
    """
    blocks = -(-n // 64)
    return blk(-(-n // 2)), blk(blocks) + blk(4 * -(-blocks // 256)) + blk(4) + blk(64) + blk(1024)


def stream_layer_bytes(shape: Shape) -> int:
    """Bytes of one decoder layer's NF4 tensors as model/stream.py lays them out in one buffer (each tensor aligned
    to 64 bytes): what one slot holds and one copy moves."""
    total = 0
    for _, i, o, _ in shape.linears():
        n = i * o
        blocks = -(-n // 64)
        total += sum(-(-b // 64) * 64 for b in (-(-n // 2), blocks, 1024, 4 * -(-blocks // 256), 4, 64))
    return total


def stream_slots(shape: Shape, resident: int | None) -> int:
    """GPU slot buffers of layer streaming: two (double buffering), fewer when fewer layers stream."""
    return 0 if resident is None else min(2, max(0, shape.layers - resident))


def layers_offloaded(shape: Shape, run: Run) -> int:
    """Decoder layers neither recomputed nor kept: what they save waits in CPU memory (config offload_activations,
    model/offload_activations.py); the first layers, kept ones excepted."""
    return 0 if not run.checkpointing else max(0, min(run.offloaded_layers, shape.layers - layers_kept(shape, run)))


def layers_kept(shape: Shape, run: Run) -> int:
    """Decoder layers whose activations stay alive to the backward: all without checkpointing, else the kept ones."""
    return shape.layers if not run.checkpointing else min(run.kept_layers, shape.layers)


def weight_lines(shape: Shape, method: str, resident: int | None = None, embeddings_on_cpu: bool = False) -> list[Line]:
    """The frozen (or, for full, trained) model: decoder linears, embeddings/head, norms and biases. With layer
    streaming (`resident` layers of NF4 on the GPU) the other layers' NF4 tensors live in CPU memory and two slot
    buffers of one layer each take their place."""
    wb = 4 if method == "full" else 2  # full fine-tuning keeps fp32 master weights; LoRA/QLoRA a bf16 base
    codes = consts = dense = bias = 0
    for _, i, o, has_bias in shape.linears():
        if method == "qlora":
            c, k = nf4_bytes(i * o)
            codes, consts = codes + c, consts + k
        else:
            dense += blk(wb * i * o)
        bias += blk(wb * o) if has_bias else 0
    L, H = shape.layers, shape.hidden
    emb = blk(wb * shape.vocab * H) * (1 if shape.tied or embeddings_on_cpu else 2)
    norms = (2 * L + 1) * blk(wb * H) + (2 * L * blk(wb * shape.head_dim) if shape.qk_norm else 0)
    lines = []
    if method == "qlora":
        on_gpu = L if resident is None else min(L, resident)
        where = "" if resident is None else f" ({on_gpu} of {L} layers resident)"
        lines += [Line("weights", f"decoder linears, NF4 codes{where}", on_gpu * codes, "4 bits per weight"),
                  Line("weights", "NF4 constants (double-quantized absmax)", on_gpu * consts, "0.127 bits per weight")]
        slots = stream_slots(shape, resident)
        if slots:
            lines.append(Line("weights", f"stream slots: {slots} x one layer's NF4",
                              slots * blk(stream_layer_bytes(shape)),
                              f"the other {L - on_gpu} layers copied in from pinned CPU memory as they run"))
    else:
        lines.append(Line("weights", f"decoder linears, {'fp32' if wb == 4 else 'bf16'}", L * dense,
                          f"{wb} bytes per weight"))
    head = ("embedding (tied to the head)" if shape.tied else
            "LM head (the embedding table stays in CPU memory)" if embeddings_on_cpu else "embedding + LM head")
    lines.append(Line("weights", f"{head}, {'fp32' if wb == 4 else 'bf16'}", emb,
                      "trained, fp32 master" if wb == 4 else "kept 16-bit, never quantized"))
    lines.append(Line("weights", "norms and biases", norms + L * bias, ""))
    return lines


def trainable_tensors(shape: Shape, run: Run) -> list[int]:
    """Element counts of the trained tensors: LoRA A [r, in] and B [out, r] per targeted linear, or every weight."""
    if run.method == "full":
        out = [i * o for _, i, o, _ in shape.linears()] * shape.layers
        return out + [shape.vocab * shape.hidden] * (1 if shape.tied else 2)
    r = run.lora_r
    per_layer = [n for name, i, o, _ in shape.linears() if name in run.lora_targets for n in (r * i, r * o)]
    return per_layer * shape.layers


def optimizer_bytes(tensors: list[int], optimizer: str) -> tuple[int, int]:
    """(inside the allocator, paged outside it) of the optimizer states, once the first step has made them.

    bitsandbytes AdamW 8-bit: two uint8 states per element plus two fp32 absmax per 256-element block, and two shared
    256-entry maps; tensors under 4096 elements keep two fp32 states. The paged variant puts state buffers of >= 1e5
    elements in CUDA unified memory (cudaMallocManaged): on the card while there is room, but invisible to PyTorch's
    allocator.
    torch AdamW: two fp32 states per element.
    """
    inside = paged = 0
    if optimizer != "adamw" and any(n >= MIN_8BIT_NUMEL for n in tensors):
        inside += 2 * blk(4 * 256)  # the two 256-entry quantization maps, shared by every tensor
    for n in tensors:
        if optimizer == "adamw":
            inside += 2 * blk(4 * n)
            continue
        if n < MIN_8BIT_NUMEL:
            inside += 2 * blk(4 * n)
            continue
        states = 2 * blk(n)
        if optimizer == "paged_adamw_8bit" and n >= PAGED_MIN_NUMEL:
            paged += 2 * n
        else:
            inside += states
        inside += 2 * blk(4 * -(-n // 256))
    return inside, paged


# --- activations ---------------------------------------------------------------------------------------------------


def layer_saved_per_token(shape: Shape, run: Run, act: int, recomputed: bool = False) -> dict[str, list[int]]:
    """Bytes per token of each tensor one decoder layer keeps for its backward (what a checkpointed layer
    recomputes: `recomputed`), grouped for the table; the first entry is the layer input.

    The compiled RMSNorm saves its input as it is and an fp32 1/rms per token (no fp32 copy: listed by
    saved_tensors_hooks around the compiled function), so the layer input x and the mid-layer residual h are saved
    by the norms. The norms' outputs are saved by the projections' LoRA (A's gradient needs the input; the frozen
    path shares it). The compiled RoPE saves only cos/sin, so q and k after rope are new tensors, saved by flash
    attention with v as projected, its output and an fp32 log-sum-exp per head (never a T x T matrix). Each LoRA
    saves its rank-r middle (x A^T). The MLP keeps gate and up: in a layer that is not recomputed, with a LoRA
    down_proj, the product silu(gate) * up is made again in its backward (kernels/swiglu_lora.py); otherwise the
    compiled SwiGLU saves gate and up and down_proj its input, the product (three [tokens, I] tensors). Qwen3's q/k
    norms save q and k as projected.
    Full fine-tuning (approximate): x and h are fp32, and autocast saves one bf16 cast of the norm output per
    projection (q, k, v; gate, up) instead of the shared output.
    """
    H, inter, res = shape.hidden, shape.intermediate, 4 if run.method == "full" else act
    q, kv = shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim
    lora = sum(1 for name, *_ in shape.linears() if name in run.lora_targets) if run.method != "full" else 0
    outputs = [act * H] * (5 if run.method == "full" else 2)
    free = product_free_mlp(run) and not recomputed
    saved = {
        "layer input and mid residual (saved by the norms), 1/rms": [res * H, res * H, 4, 4],
        "norm outputs (saved by the projections)": outputs,
        "attention q, k, v, output, log-sum-exp": [act * q, act * kv, act * kv, act * q, 4 * shape.heads],
        "LoRA middles (x A^T)": [act * run.lora_r] * lora,
        "MLP gate, up" + ("" if free else ", product"): [act * inter] * (2 if free else 3),
    }
    if shape.qk_norm:
        saved["q/k norm inputs and 1/rms"] = [act * q, act * kv, 4 * shape.heads, 4 * shape.kv_heads]
    return saved


def product_free_mlp(run: Run) -> bool:
    """Whether a layer that is not recomputed keeps no SwiGLU product for backward: down_proj is a LoRA linear
    (kernels/swiglu_lora.py; a recomputed layer keeps it, its saved tensors living one layer's backward only)."""
    return run.method != "full" and "down_proj" in run.lora_targets


def saved_bytes(saved: dict[str, list[int]], tokens: int) -> int:
    """One layer's saved tensors for `tokens` tokens, each rounded as the allocator counts it."""
    return sum(blk(per_token * tokens) for sizes in saved.values() for per_token in sizes)


def lora_casts(shape: Shape, run: Run, act: int) -> int:
    """Bytes of the bf16 casts of every LoRA A and B: `kernels.lora.cast_cached` keeps one per parameter, a stacked
    group one per group, from the first forward on (made again after each optimizer step), shared by forward,
    recomputation and backward."""
    if run.method == "full":
        return 0
    r, targets = run.lora_r, run.lora_targets
    linears = {name: (i, o) for name, i, o, _ in shape.linears() if name in targets}
    per_layer = 0
    if run.method == "qlora":  # q/k/v and gate/up stacked (kernels/lora_siblings.py): one stacked A, one block-
        for group in (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj")):  # diagonal B per group instead
            if all(name in linears for name in group):  # (dropout > 0 stacks nothing: counted high by ~1%)
                width = sum(linears.pop(name)[1] for name in group)
                per_layer += blk(act * r * len(group) * shape.hidden) + blk(act * width * r * len(group))
    per_layer += sum(blk(act * r * i) + blk(act * r * o) for i, o in linears.values())
    return shape.layers * per_layer


def estimate(shape: Shape, run: Run, card: Card | None = None) -> Estimate:
    """Predicted peak allocated bytes of a training step (step 2 onwards: optimizer states exist)."""
    if run.method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {run.method!r}")
    act = 2  # bf16 activations (autocast); full fine-tuning's fp32 residual stream is handled below
    H, inter, L, V = shape.hidden, shape.intermediate, shape.layers, shape.vocab
    M, N = run.tokens, run.target_tokens
    full = run.method == "full"
    res = 4 if full else act  # full: fp32 embedding output, so the residual stream is fp32
    ws = 2 * (card.cublas_workspace if card else 32 * 2**20)  # one cuBLAS workspace per thread: forward, autograd

    persistent = weight_lines(shape, run.method, run.resident_layers if run.method == "qlora" else None,
                              run.embeddings_on_cpu and not shape.tied)
    tensors = trainable_tensors(shape, run)
    p_bytes = sum(blk(4 * n) for n in tensors)
    opt_in, opt_paged = optimizer_bytes(tensors, run.optimizer)
    if not full:
        persistent.append(Line("trainable", f"LoRA A/B (r={run.lora_r}), fp32", p_bytes,
                               f"{sum(tensors):,} parameters x 4 bytes"))
        persistent.append(Line("trainable", "LoRA A/B bf16 casts", lora_casts(shape, run, act),
                               "cast once per optimizer step, kept for forward, recomputation and backward"))
    persistent.append(Line("trainable", "optimizer states in the allocator", opt_in, "8-bit states of small tensors, "
                                                                                      "absmax; paged ones below"))
    persistent.append(Line("runtime", "cuBLAS workspaces", ws, "one per thread (forward, autograd backward)"))
    base = sum(x.bytes for x in persistent)

    saved = layer_saved_per_token(shape, run, act)
    saved_tok = sum(sum(v) for v in saved.values())
    saved_layer = saved_bytes(saved, M)
    layer_input = blk(res * H * M)
    rope = 2 * blk(act * M * shape.head_dim)  # cos and sin [B, T, head_dim], shared by every layer
    batch_ints = 3 * blk(8 * M)  # input ids, labels, positions (int64)
    # alive through the whole backward, unlike the layer lines inserted before it
    to_the_end = [Line("activations", "rope cos/sin, token ids, labels, positions", rope + batch_ints, "")]
    common = list(to_the_end)
    K = layers_kept(shape, run)
    if K:
        # the first layer's input norm saves nothing: with a frozen embedding its input needs no gradient
        first = 0 if full or K < L else layer_input + blk(4 * M)
        which = "no checkpointing" if K == L else "the last ones, not recomputed"
        common.insert(0, Line("activations", f"saved activations ({K} layers, {which})",
                              K * saved_layer - first, f"{saved_tok:,} bytes per token per layer"))
    off = layers_offloaded(shape, run)
    if K + off < L:
        common.insert(0, Line("activations", f"checkpointed layer inputs ({L - K - off} layers)",
                              (L - K - off) * layer_input, f"{res} x hidden bytes per token per layer"))
    if off:
        common.insert(0, Line("activations", f"offloaded layers' activations ({off} layers)", 0,
                              f"in pinned CPU memory: {off * saved_layer / 2**30:.2f} GiB of host memory"))
    if full and K:  # autocast's bf16 weight copies, saved by every linear for its backward
        common.append(Line("activations", "bf16 casts of every linear weight (autocast)",
                           K * sum(blk(2 * i * o) for _, i, o, _ in shape.linears()), ""))
    grads = sum(blk(4 * n) for n in tensors)
    if run.grad_accum > 1:  # the earlier micro-batches' gradients wait for the optimizer step
        to_the_end.append(Line("trainable", "gradients of earlier micro-batches (fp32)", grads, "accumulation"))
        common.append(to_the_end[-1])
    common_bytes = sum(x.bytes for x in common)

    # moment 1: the LM head and loss
    C = min(N, LOSS_CHUNK_TOKENS)
    chunks = -(-N // LOSS_CHUNK_TOKENS)
    loss_lines = [Line("loss", "final norm input and 1/rms", layer_input + blk(4 * M), "saved by the final RMSNorm"),
                  Line("loss", "final hidden state", blk(act * H * M), "the loop drops it before the backward")]
    if full:  # the head is trained: chunks of fp32 logits, recomputed in backward (train/loss.py)
        loss_lines += [Line("loss", f"fp32 logits: 3 x [{C}, {V}]", 3 * blk(4 * C * V),
                            "log-softmax output, its gradient, and log-softmax backward's output"),
                       Line("loss", "LM head weight gradient + bf16 cast", blk(4 * V * H) + blk(2 * V * H), "")]
        if chunks > 1:
            loss_lines.append(Line("loss", "gathered target states + their gradient", 2 * blk(act * H * N),
                                   "kept for the chunk recomputes; gradient accumulated over chunks"))
    else:  # frozen head: kernels/cross_entropy.py, the gradient computed chunk by chunk in the forward pass
        loss_lines += [Line("loss", f"bf16 logits: [{C}, {V}]", blk(act * C * V),
                            "overwritten in place by softmax - onehot, then multiplied into the state gradient"),
                       Line("loss", "gathered target states + their gradient", 2 * blk(act * H * N),
                            "the gradient is filled chunk by chunk and kept for backward")]
    loss_lines.append(Line("loss", "target mask, target ids, chunk loss", blk(run.batch * (run.seq - 1))
                           + blk(8 * N) + blk(4 * C) + 2 * blk(4), "bool mask saved by the gather; int64; fp32"))
    loss_peak = base + common_bytes + sum(x.bytes for x in loss_lines)

    # moment 2: backward of the last decoder layer, at the MLP. The compiled SwiGLU's backward allocates the gate and
    # up gradients while gate, up and the product's gradient are alive (down_proj's saved product and LoRA middle are
    # freed): +2 [tokens, I] over the saved set. Earlier, down_proj's input gradient is formed against its
    # dequantized weight (+1 and W), which is larger only when tokens < hidden.
    mlp = blk(act * inter * M)
    wq = blk(2 * H * inter) if run.method == "qlora" else 0  # dequantized down_proj (the kernel allocates no more)
    what = "MLP backward: gradients of [tokens, I]" + (" + dequantized W" if wq else "")
    why = "SwiGLU's backward: product, gate and up gradients while gate and up live"
    # product kept (a recomputed layer): it and down_proj's middle are freed before SwiGLU's gradients come
    mlp_backward = Line("activations", what, max(2 * mlp - (blk(act * run.lora_r * M) if not full else 0), mlp + wq),
                        why)
    # product made again (a kept or offloaded layer): the product's gradient, then SwiGLU's two gradients
    mlp_backward_free = (Line("activations", what, max(3 * mlp, mlp + wq), why) if product_free_mlp(run)
                         else mlp_backward)
    if run.fp8_base and run.method == "qlora":  # SwiGLU's backward also makes e4m3 rows of both gradients
        # (kernels/fp8_rows.py: 2 x [tokens, I] x 1 byte, one more `mlp`); measured at Qwen2.5-7B 8 x 2048, 1 kept
        # layer: +0.78 GiB peak allocated against the bf16 base (BENCHMARKS.md, session 6)
        mlp_backward, mlp_backward_free = (Line("activations", line.what + " + their e4m3 rows", line.bytes + mlp,
                                                line.why) for line in (mlp_backward, mlp_backward_free))
    flowing = Line("activations", "gradient flowing back", blk(res * H * M), "")
    recomputed = layer_saved_per_token(shape, run, act, recomputed=True)
    layer_lines = [Line("activations", "recomputed last layer (saved for backward)",
                        saved_bytes(recomputed, M) - layer_input,
                        ", ".join(f"{k} {sum(v):,}" for k, v in recomputed.items()) + " bytes per token"),
                   mlp_backward, flowing]
    if K:  # the first layer backward reaches keeps its activations (they are in `common`): nothing recomputed yet
        layer_lines = [mlp_backward_free, flowing]
    elif full:  # the recomputed layer casts its weights to bf16 again
        layer_lines.append(Line("activations", "bf16 casts of the layer's weights (autocast)",
                                sum(blk(2 * i * o) for _, i, o, _ in shape.linears()), ""))
    layer_peak = base + common_bytes + sum(x.bytes for x in layer_lines)

    # moment 3: optimizer step: every gradient alive, and the last micro-batch's hidden state and token ids
    opt_lines = [Line("trainable", "gradients (fp32)", grads, ""),
                 Line("trainable", "optimizer step temporaries", 2 * grads if run.optimizer == "adamw" else 0, ""),
                 Line("activations", "token ids", batch_ints, "")]
    opt_peak = base + sum(x.bytes for x in opt_lines)

    moments = {"loss": loss_peak, "layer": layer_peak, "optimizer": opt_peak}
    at = {"loss": common + loss_lines, "layer": common + layer_lines, "optimizer": opt_lines}
    if off:  # an offloaded layer's backward: its activations back, and the layer before's on their way
        at["offloaded"] = [*to_the_end,
                           Line("activations", "an offloaded layer and the one before it, back on the GPU",
                                2 * saved_layer, "copied back one layer ahead of its backward"), mlp_backward_free,
                           flowing]
        moments["offloaded"] = base + sum(x.bytes for x in at["offloaded"])
    if run.eval:  # moment 4: validation loss (eval/likelihood.py), before and after training, without gradient
        at["eval"] = [Line("activations", "final hidden state, gathered target states, token ids",
                           blk(act * H * M) + blk(act * H * N) + batch_ints, "nothing of the forward is saved"),
                      Line("loss", f"fp32 logits and their log-softmax: 2 x [{C}, {V}]", 2 * blk(4 * C * V),
                           "no gradient, so train/loss.py's plain chunks: 4x the bf16 logits of training")]
        moments["eval"] = base + sum(x.bytes for x in at["eval"])
    moment = max(moments, key=moments.get)
    lines = persistent + at[moment]
    outside = [Line("runtime", "paged optimizer states (unified memory)", opt_paged,
                    "outside the allocator; evicted to CPU when the card is full")] if opt_paged else []
    return Estimate(lines, moment, moments[moment], outside=outside, moments=moments)
