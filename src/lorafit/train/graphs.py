"""CUDA graphs for the training micro-step: forward, loss and backward recorded once, replayed for every batch of
that shape.

Why: with NF4 dequantization, the fused LoRA Function, compiled norms and the CE kernel, a QLoRA micro-step of a
28-layer model is ~5,000 kernel launches, and where Python issues them more slowly than the GPU runs them the GPU
waits. A replay issues the whole recorded micro-step in one call. Measured on the H100 through train(): Qwen2.5-7B
at 2 x 2048 +30-47% (launch-bound: the eager row swings with the host), Qwen2.5-1.5B at 16 x 1024 +2% (already
GPU-bound). Config `cuda_graphs`: auto (the default) records micro-batches of up to AUTO_MAX_TOKENS.

The graph runs once reported wrong losses (2-4x, on a few steps of 50). The cause was the LM-head loss kernel, not
the recording: it read a row's target logit after a warp running ahead could have overwritten it with its gradient
(kernels/cross_entropy.py), and the every-position loss below made that likelier. bench/graph_check.py checks each
replay against an eager forward of the same inputs: 0 of 120 micro-steps differ since the fix.

What a recording needs, and how it gets it here:
- one shape and no host waits: packed micro-batches padded to `data.max_length`, and a loss over every position
  (`every_position_loss_sum`: selecting the labelled ones would need their count on the host); batches of any
  other shape run eagerly;
- packed rows attend through the seq_ids mask, not the varlen segments of the eager path (their number changes
  from batch to batch, which would change the recorded kernel's launch);
- fixed addresses: each batch is copied into the recording's input tensors; gradients stay allocated (zeroed in
  place, never set to None), so the recorded backward accumulates into the same buffers on every replay;
- nothing random to repeat (LoRA dropout 0): checkpoint recomputation need not save and restore RNG state, which
  cannot be read during a capture;
- the LoRA casts recorded instead of read from `cast_cached`'s cache (`invalidate_casts`);
- with an FP8 base, the e4m3 rows a kernel remembers for the next (kernels/fp8_rows.py) are found by tensor
  identity while recording, so the recording holds the pairing; the weights' scales were made by the eager run.

The first micro-batch of the shape runs eagerly on the capture stream (a real step: its loss and gradients count,
and lazy per-stream state such as cuBLAS workspaces is set up); the recording follows (recording runs nothing, so
the gradients stay as that run left them); every later micro-batch replays. The recording's activations live in
a private memory pool the size of one eager micro-step's; `release()` hands it back (before evaluation, and when
memory runs out). If recording fails for any reason, the run says so and continues eagerly.
"""

from __future__ import annotations

import torch

from lorafit.kernels.lora import invalidate_casts
from lorafit.kernels.nf4 import FORCE_REFERENCE
from lorafit.train.loss import every_position_loss_sum


def graphs_unavailable(cfg, device: torch.device, world: int, streaming: bool) -> str | None:
    """Why this run cannot record its micro-step (None: it can)."""
    reasons = {
        "the device is not a CUDA GPU": device.type != "cuda",
        "several processes (their gradient reductions are not recorded)": world > 1,
        "method full": cfg.method == "full",
        "lora.dropout > 0 (recomputation would need the RNG state)": cfg.lora.dropout > 0,
        "offload_checkpoints (pinned host copies)": cfg.offload_checkpoints,
        "offload_activations (pinned host copies)": cfg.offload_activations > 0,
        "mlp_chunk_tokens (its recomputation restores RNG state)": cfg.mlp_chunk_tokens > 0,
        "layer streaming": streaming,
        "LORAFIT_REFERENCE_KERNELS=1 (the plain-PyTorch twins run as they are)": FORCE_REFERENCE,
    }
    found = [reason for reason, applies in reasons.items() if applies]
    return ", ".join(found) if found else None


AUTO_MAX_TOKENS = 8192  # cuda_graphs auto: micro-batches up to this many tokens are recorded


def graphs_would_not_pay(cfg) -> str | None:
    """Why `cuda_graphs: auto` leaves this run eager (None: it records). A replay saves the host's time to issue
    the micro-step's kernels, which matters where each kernel has little work: Qwen2.5-7B at 2 x 2048 tokens +30-47%
    (H100), Qwen2.5-1.5B at 16 x 1024 +2%. Recording costs a memory pool of one micro-step's activations, and
    graphs run every position through the LM head: at large micro-batches they cost more than they save.
    A recording also needs one shape, so every batch is padded to max_length: packed rows are full anyway, but
    unpacked batches of short examples would pay for positions they do not have."""
    if not cfg.data.packing:
        return "unpacked batches vary in width, and a recording would pad every one to max_length"
    tokens = cfg.micro_batch_size * cfg.data.max_length
    if tokens > AUTO_MAX_TOKENS:
        return f"micro-batches of {tokens:,} tokens keep the GPU busy (auto records up to {AUTO_MAX_TOKENS:,})"
    return None


class _Recording:
    def __init__(self, inputs: dict[str, torch.Tensor], inv_targets: torch.Tensor):
        self.inputs, self.inv_targets = inputs, inv_targets
        self.graph = torch.cuda.CUDAGraph()
        self.loss: torch.Tensor | None = None


class GraphedMicroStep:
    """`run(batch, 1 / targets)`: forward, loss and backward of one micro-batch (gradients accumulate into
    `.grad`), through a recorded graph when the batch has the recorded shape."""

    def __init__(self, model: torch.nn.Module, params: list[torch.Tensor], dtype: torch.dtype, say=print):
        self.model, self.params, self.dtype, self.say = model, params, dtype, say
        self.recording: _Recording | None = None
        self.key = None  # (shape, packed) of the recording; None until the first micro-batch
        self.failed = False
        self.replays = 0  # micro-batches run through a recording so far (run.json reports it)
        self.stream = torch.cuda.Stream()

    def _forward_backward(self, inputs: dict[str, torch.Tensor], inv_targets: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cuda", dtype=self.dtype, cache_enabled=False):
            hidden = self.model(inputs["input_ids"], position_ids=inputs["position_ids"],
                                seq_ids=inputs.get("seq_ids"), inputs_embeds=inputs.get("inputs_embeds"))
            loss = every_position_loss_sum(self.model, hidden, inputs["labels"])
        (loss * inv_targets).backward()
        return loss.detach()

    def run(self, batch, inv_targets: float, embeds: torch.Tensor | None = None) -> torch.Tensor:
        """The micro-batch's summed loss (a GPU scalar, valid until the next call). `embeds`: its rows of a
        CPU-kept embedding table when already gathered on the host (train/staging.py)."""
        key = (tuple(batch.input_ids.shape), batch.seq_ids is not None)
        if self.key is None and not self.failed:
            self.key = key
            return self._run_then_record(batch, inv_targets, embeds)
        rec = self.recording
        if rec is None or key != self.key:
            return self._forward_backward(self._inputs(batch, embeds), self._scalar(inv_targets))
        host = self._host_inputs(batch, embeds)
        for name, tensor in rec.inputs.items():  # blocking: the inputs are small, and nothing may race the replay
            tensor.copy_(host[name])
        rec.inv_targets.fill_(inv_targets)
        rec.graph.replay()
        self.replays += 1
        return rec.loss

    def _host_inputs(self, batch, embeds: torch.Tensor | None) -> dict[str, torch.Tensor]:
        names = ("input_ids", "labels", "position_ids") + (("seq_ids",) if batch.seq_ids is not None else ())
        host = {name: getattr(batch, name) for name in names}
        table = self.model.model.embed_tokens.weight
        if table.device.type == "cpu":  # model.embeddings_on_cpu: the rows are looked up here, outside the graph
            if embeds is None:
                embeds = torch.nn.functional.embedding(batch.input_ids, table)
            host["inputs_embeds"] = embeds
        return host

    def _inputs(self, batch, embeds: torch.Tensor | None) -> dict[str, torch.Tensor]:
        return {name: t.to("cuda", non_blocking=True) for name, t in self._host_inputs(batch, embeds).items()}

    def _scalar(self, value: float) -> torch.Tensor:
        return torch.full((), value, dtype=torch.float32, device="cuda")

    def _run_then_record(self, batch, inv_targets: float, embeds: torch.Tensor | None) -> torch.Tensor:
        inputs, inv = self._inputs(batch, embeds), self._scalar(inv_targets)
        # blocks cached for the current stream cannot serve the capture stream: hand them back first, or this
        # micro-step's memory is reserved twice (7B at 2 x 2048: 9.0 GB reserved instead of 7.6)
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        self.stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self.stream):
            loss = self._forward_backward(inputs, inv)  # the real step for this micro-batch
        torch.cuda.current_stream().wait_stream(self.stream)
        for p in self.params:  # the recorded backward must accumulate into buffers that exist now
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        rec = _Recording(inputs, inv)
        try:
            invalidate_casts()
            with torch.cuda.graph(rec.graph, stream=self.stream):
                rec.loss = self._forward_backward(rec.inputs, rec.inv_targets)
            self.recording = rec
        except Exception as e:  # noqa: BLE001 - any failure to record leaves a working eager run
            self.failed = True
            self.say(f"CUDA graphs off for this run: recording the micro-step failed "
                     f"({type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''})")
            del rec
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
        finally:
            invalidate_casts()
        return loss

    def release(self) -> None:
        """Free the recording's memory pool; the next micro-batch of the shape records again."""
        if self.recording is not None:
            self.recording = None
            self.key = None
            torch.cuda.synchronize()
            torch.cuda.empty_cache()

    def disable(self) -> None:
        self.release()
        self.failed = True
