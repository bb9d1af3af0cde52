"""A step's inputs made ready on the host while the GPU still runs the step before, so it never waits for them.

A step ends with values the host must read (the loss and gradient norm, so that a NaN step is skipped before it
reaches the weights): the GPU runs the step's backward while the host, its kernels launched, has nothing to do;
after the read the GPU waits while the host gets the next step going. That host work is collating the rows and,
with the input embedding table in CPU memory (`model.embeddings_on_cpu`), gathering every token's row there
(Qwen2.5-7B at 2 x 2048: 29 MB) for the copy to the GPU. The loop asks for the next step's inputs before the read
(`Lookahead`), gathered straight into pinned memory, so that at the step's start only asynchronous copies remain.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from lorafit.data.batching import Batch


@dataclass
class MicroInputs:
    """One micro-batch on the host: its tensors and, for a CPU-kept embedding table, its rows of it."""

    batch: Batch
    embeds: torch.Tensor | None = None

    def to(self, device: torch.device) -> tuple[Batch, torch.Tensor | None]:
        embeds = self.embeds.to(device, non_blocking=True) if self.embeds is not None else None
        return self.batch.to(device), embeds


def host_inputs(batch: Batch, table: torch.Tensor | None, pin: bool) -> MicroInputs:
    """`batch` ready to travel: pinned (on CUDA runs, so the copies are asynchronous), with its embedding rows
    gathered from `table` when the table is in CPU memory (None: it is on the GPU, the model looks up there)."""
    embeds = None
    if table is not None:
        ids = batch.input_ids.reshape(-1)
        embeds = torch.empty((ids.numel(), table.shape[1]), dtype=table.dtype, pin_memory=pin)
        torch.index_select(table, 0, ids, out=embeds)
        embeds = embeds.view(*batch.input_ids.shape, table.shape[1])
    return MicroInputs(batch.pin_memory() if pin else batch, embeds)


class Lookahead:
    """The inputs of one future step, keyed by what they depend on (step, micro-batch size): a retry with a smaller
    micro-batch after running out of memory asks for another key and gets them built afresh."""

    def __init__(self, build: Callable[[int, int], list]):
        self.build = build
        self.key: tuple[int, int] | None = None
        self.inputs: list | None = None

    def prepare(self, step: int, micro_batch_size: int) -> None:
        self.key, self.inputs = (step, micro_batch_size), self.build(step, micro_batch_size)

    def take(self, step: int, micro_batch_size: int) -> list:
        if self.key != (step, micro_batch_size):
            self.prepare(step, micro_batch_size)
        inputs, self.key, self.inputs = self.inputs, None, None
        return inputs
