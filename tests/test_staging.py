"""train/staging.py: a step's inputs prepared on the host ahead of time are the inputs the step would build itself."""

import pytest
import torch
import torch.nn.functional as F

from lorafit.data.batching import collate
from lorafit.data.example import Example
from lorafit.train.staging import Lookahead, host_inputs


def _batch():
    examples = [Example(list(range(1, n + 1)), list(range(1, n + 1))) for n in (4, 3, 5)]
    return collate(examples, [[0, 1], [2]], pad_id=0, packing=True)


def test_host_inputs_gather_the_rows_of_a_cpu_table():
    batch = _batch()
    table = torch.randn(16, 8)
    inputs = host_inputs(batch, table, pin=False)
    assert inputs.embeds.shape == (*batch.input_ids.shape, 8)
    torch.testing.assert_close(inputs.embeds, F.embedding(batch.input_ids, table), rtol=0, atol=0)
    device_batch, embeds = inputs.to(torch.device("cpu"))
    assert torch.equal(device_batch.cu_seqlens, batch.cu_seqlens) and torch.equal(embeds, inputs.embeds)
    assert host_inputs(batch, None, pin=False).embeds is None  # the table is on the GPU: the model looks up there


def test_lookahead_hands_out_what_it_prepared_and_rebuilds_for_another_key():
    built = []

    def build(step, micro_batch_size):
        built.append((step, micro_batch_size))
        return [f"{step}/{micro_batch_size}"]

    ahead = Lookahead(build)
    assert ahead.take(0, 4) == ["0/4"]  # nothing prepared: built on the spot
    ahead.prepare(1, 4)
    assert ahead.take(1, 4) == ["1/4"] and built == [(0, 4), (1, 4)]  # not built twice
    ahead.prepare(2, 4)
    assert ahead.take(2, 2) == ["2/2"]  # an out-of-memory retry halved the micro-batch: other inputs
    assert ahead.take(2, 2) == ["2/2"] and built[-2:] == [(2, 2), (2, 2)]  # taken inputs are not handed out again


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_pinned_inputs_arrive_on_the_gpu_unchanged():
    """On CUDA runs the host inputs are pinned (so their copies are asynchronous) and reach the GPU as they were."""
    batch = _batch()
    table = torch.randn(16, 8, dtype=torch.bfloat16)
    inputs = host_inputs(batch, table, pin=True)
    assert inputs.embeds.is_pinned() and inputs.batch.input_ids.is_pinned() and inputs.batch.cu_seqlens.is_pinned()
    device_batch, embeds = inputs.to(torch.device("cuda"))
    torch.cuda.synchronize()
    assert torch.equal(embeds.cpu(), F.embedding(batch.input_ids, table))
    assert torch.equal(device_batch.labels.cpu(), batch.labels) and device_batch.seq_ids.is_cuda
