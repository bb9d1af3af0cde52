"""Examples into rows, rows into micro-batches: packing without cross-talk, and a deterministic order for resume.

A packed row holds several examples back to back. Each example's positions restart at 0 and its `seq_id` keeps
attention inside it, so a packed row computes exactly what the examples would compute one by one. The first token
of every example carries no label: unpacked, nothing predicts it; packed, only the previous example would.

The stream of rows is a pure function of (examples, seed, epoch), so a resumed run rebuilds the same batches
from the step number alone.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from lorafit.data.example import IGNORE_INDEX, Example


@dataclass
class Batch:
    input_ids: torch.Tensor  # [B, T]
    labels: torch.Tensor  # [B, T], IGNORE_INDEX where no loss
    position_ids: torch.Tensor  # [B, T]
    seq_ids: torch.Tensor | None  # [B, T] example index within the row (packed), None when one example per row
    num_targets: int
    num_tokens: int  # real (non-pad) tokens
    # packed: the same rows as segments of the flattened [B * T] tokens (kernels.varlen_attention), from the host
    cu_seqlens: torch.Tensor | None = None
    max_seqlen: int = 0

    def _map(self, fn) -> Batch:
        """The same batch with `fn` applied to each of its tensors."""
        each = lambda t: fn(t) if t is not None else None  # noqa: E731
        return Batch(each(self.input_ids), each(self.labels), each(self.position_ids), each(self.seq_ids),
                     self.num_targets, self.num_tokens, each(self.cu_seqlens), self.max_seqlen)

    def to(self, device) -> Batch:
        return self._map(lambda t: t.to(device, non_blocking=True))

    def pin_memory(self) -> Batch:
        """In pinned host memory, so that `to` a GPU copies asynchronously."""
        return self._map(torch.Tensor.pin_memory)


def pack_rows(lengths: list[int], order: list[int], max_length: int) -> list[list[int]]:
    """Next-fit packing in the given order: fill a row until the next example does not fit."""
    rows: list[list[int]] = []
    current: list[int] = []
    used = 0
    for i in order:
        if current and used + lengths[i] > max_length:
            rows.append(current)
            current, used = [], 0
        current.append(i)
        used += lengths[i]
    if current:
        rows.append(current)
    return rows


def epoch_rows(examples: list[Example], max_length: int, packing: bool, seed: int, epoch: int) -> list[list[int]]:
    order = list(range(len(examples)))
    random.Random(seed * 100_003 + epoch).shuffle(order)
    if not packing:
        return [[i] for i in order]
    return pack_rows([len(e) for e in examples], order, max_length)


def segment_bounds(seq_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """`cu_seqlens` (int32, [segments + 1]) and the longest segment of a packed batch's seq_ids [B, T]: a segment
    is a run of equal seq_ids inside one row (the padding tail, seq_id -1, is a segment of its own)."""
    B, T = seq_ids.shape
    starts = torch.ones(B, T, dtype=torch.bool)
    starts[:, 1:] = seq_ids[:, 1:] != seq_ids[:, :-1]
    ends = torch.cat([starts.reshape(-1).nonzero().squeeze(1), torch.tensor([B * T])])
    cu_seqlens = ends.to(torch.int32)
    return cu_seqlens, int((ends[1:] - ends[:-1]).max())


def collate(examples: list[Example], rows: list[list[int]], pad_id: int, packing: bool,
            width: int | None = None) -> Batch:
    """Rows of examples as one right-padded batch, `width` wide (default: the longest row)."""
    width = max([width or 0] + [sum(len(examples[i]) for i in row) for row in rows])
    B = len(rows)
    input_ids = torch.full((B, width), pad_id, dtype=torch.long)
    labels = torch.full((B, width), IGNORE_INDEX, dtype=torch.long)
    position_ids = torch.zeros((B, width), dtype=torch.long)
    seq_ids = torch.full((B, width), -1, dtype=torch.long)
    for b, row in enumerate(rows):
        start = 0
        for s, i in enumerate(row):
            ex = examples[i]
            n = len(ex)
            input_ids[b, start:start + n] = torch.tensor(ex.input_ids)
            labels[b, start:start + n] = torch.tensor(ex.labels)
            labels[b, start] = IGNORE_INDEX
            position_ids[b, start:start + n] = torch.arange(n)
            seq_ids[b, start:start + n] = s
            start += n
        position_ids[b, start:] = torch.arange(width - start)  # padding: any valid positions, never attended to
    num_targets = int((labels[:, 1:] != IGNORE_INDEX).sum())
    num_tokens = int((seq_ids >= 0).sum())
    if not (packing and any(len(row) > 1 for row in rows)):
        return Batch(input_ids, labels, position_ids, None, num_targets, num_tokens)
    cu_seqlens, max_seqlen = segment_bounds(seq_ids)
    return Batch(input_ids, labels, position_ids, seq_ids, num_targets, num_tokens, cu_seqlens, max_seqlen)


class BatchStream:
    """The run's rows in order, across epochs (epoch 0's rows, then epoch 1's, ...), addressed by row index.

    Addressing by row (not by micro-batch) lets the micro-batch size change mid-run (after an out-of-memory
    error) while each optimizer step still sees exactly the same rows.
    """

    def __init__(self, examples: list[Example], max_length: int, packing: bool, seed: int, pad_id: int):
        if not examples:
            raise ValueError("no training examples")
        self.examples, self.max_length, self.packing = examples, max_length, packing
        self.seed, self.pad_id = seed, pad_id
        self.pad_to: int | None = None  # every batch this wide (recorded CUDA graphs need one shape)
        self._epochs: dict[int, list[list[int]]] = {}
        self._lengths: dict[int, int] = {}  # rows per epoch, kept for all epochs (the rows only for the latest)

    def rows(self, epoch: int) -> list[list[int]]:
        if epoch not in self._epochs:
            self._epochs = {epoch: epoch_rows(self.examples, self.max_length, self.packing, self.seed, epoch)}
        return self._epochs[epoch]

    def rows_per_epoch(self) -> int:
        return len(self.rows(0))

    def batch(self, start: int, count: int) -> tuple[Batch, float]:
        """Rows start..start+count of the run as one batch, and the (fractional) epoch reached."""
        epoch, rows_before = 0, 0
        while rows_before + len(self.rows(epoch)) <= start:
            rows_before += len(self.rows(epoch))
            epoch += 1
        picked: list[list[int]] = []
        index = start - rows_before
        while len(picked) < count:
            rows = self.rows(epoch)
            take = rows[index:index + count - len(picked)]
            picked += take
            index += len(take)
            if index >= len(rows):
                epoch, index = epoch + 1, 0
        batch = collate(self.examples, picked, self.pad_id, self.packing, self.pad_to)
        return batch, epoch + index / max(len(self.rows(epoch)), 1)

    def locate(self, row: int) -> tuple[int, int]:
        """(epoch, index within the epoch) of the run's row number `row`."""
        epoch = 0
        while row >= self._length(epoch):
            row -= self._length(epoch)
            epoch += 1
        return epoch, row

    def _length(self, epoch: int) -> int:
        if epoch not in self._lengths:
            self._lengths[epoch] = len(self.rows(epoch))
        return self._lengths[epoch]

    def epoch_at(self, row: int) -> float:
        """The (fractional) epoch reached when the rows before `row` have been trained on."""
        epoch, index = self.locate(row)
        return epoch + index / self._length(epoch)

    def batch_of(self, rows: list[int]) -> tuple[Batch, float]:
        """The run's rows with these numbers as one batch (a rank's share of a step: every N-th row), and the
        epoch reached after the last of them."""
        picked = []
        for row in rows:
            epoch, index = self.locate(row)
            picked.append(self.rows(epoch)[index])
        return collate(self.examples, picked, self.pad_id, self.packing, self.pad_to), self.epoch_at(rows[-1] + 1)
