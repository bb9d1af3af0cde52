"""Several processes on CPU (gloo): 2 processes with micro-batch b train exactly like 1 process with micro-batch 2b.

Every 2-process run happens in one spawn of two workers (one process group, runs one after another) to keep the
suite quick on 2 cores; each test then compares one of them with the single-process reference.
"""

import json
import os
import shutil
import socket
import subprocess
import sys
from dataclasses import replace

import pytest
import torch
import yaml
from safetensors.torch import load_file

from lorafit.config import load_config
from lorafit.train.loop import train
from lorafit.train.progress import Progress
from tests.test_train import write_chat_data
from tests.tiny import make_tiny_checkpoint

STEPS, SAVE_AT = 6, 4
# measured: losses and gradient norms within 1e-6, adapters within 4e-7 (the same rows, summed in another order)
RTOL, ATOL = 1e-5, 1e-5


def settings(root, folder, method, name, micro_batch_size, **extra):
    out = {"model": {"path": str(folder)}, "method": method, "output_dir": str(root / name),
           "data": {"train": str(root / "train.jsonl"), "val": str(root / "val.jsonl"), "max_length": 64},
           "lora": {"r": 4, "alpha": 8, "dropout": 0.0}, "max_steps": STEPS, "micro_batch_size": micro_batch_size,
           "grad_accum": 2, "learning_rate": 1e-2, "val_every": 3, "device": "cpu",
           "eval": {"before_training": True}}
    out.update(extra)
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, jobs):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    try:
        for job in jobs:
            train(load_config(overrides=job), Progress(quiet=True))
    finally:
        torch.distributed.destroy_process_group()


def history(run_dir):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    val = [r["eval/val_loss"] for r in rows if "eval/val_loss" in r]
    return losses, val, rows


def adapter(run_dir):
    return load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))


def assert_same_run(run_dir, reference_dir):
    losses, val, rows = history(run_dir)
    ref_losses, ref_val, ref_rows = history(reference_dir)
    assert len(losses) == len(ref_losses) and len(val) == len(ref_val) == 3  # before, step 3, after
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref_losses), rtol=RTOL, atol=ATOL)
    # Adam hides a gradient off by a constant factor (FSDP2 averages by default): the norms show it
    norms, ref_norms = ([r["grad_norm"] for r in h if "grad_norm" in r] for h in (rows, ref_rows))
    torch.testing.assert_close(torch.tensor(norms), torch.tensor(ref_norms), rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(torch.tensor(val), torch.tensor(ref_val), rtol=RTOL, atol=ATOL)
    a, b = adapter(run_dir), adapter(reference_dir)
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=RTOL, atol=ATOL)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Single-process references (micro-batch 4) and the 2-process runs (micro-batch 2 each), for LoRA on an fp32
    base and QLoRA, data parallel and FSDP2."""
    root = tmp_path_factory.mktemp("dist")
    folder, _ = make_tiny_checkpoint(root, "llama")
    write_chat_data(root / "train.jsonl", 40)
    write_chat_data(root / "val.jsonl", 6, seed=1)
    for method in ("lora", "qlora"):
        job = settings(root, folder, method, f"single-{method}", 4, save_every=SAVE_AT)
        train(load_config(overrides=job), Progress(quiet=True))
    jobs = [settings(root, folder, method, f"{strategy}-{method}", 2, distributed=strategy, save_every=SAVE_AT)
            for strategy in ("ddp", "fsdp") for method in ("lora", "qlora")]
    # generation metrics too on one run: every rank decodes, and they must stop together
    jobs[-1]["eval"] = {"before_training": True, "metrics": ["exact_match"], "max_new_tokens": 4}
    # and the other way round: a 1-process checkpoint continued by 2 processes (FSDP: whole states sharded on load)
    checkpoint = root / "single-lora" / "checkpoints" / f"step-{SAVE_AT:06d}"
    shutil.copytree(checkpoint, root / "resumed-on-2" / "checkpoints" / checkpoint.name)
    jobs.append(settings(root, folder, "lora", "resumed-on-2", 2, distributed="fsdp", resume="auto"))
    torch.multiprocessing.spawn(_worker, args=(2, free_port(), jobs), nprocs=2)
    return root, folder


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_two_processes_equal_one_with_twice_the_micro_batch(runs, strategy, method):
    root, _ = runs
    assert_same_run(root / f"{strategy}-{method}", root / f"single-{method}")
    run = json.loads((root / f"{strategy}-{method}" / "run.json").read_text())
    assert run["steps"] == STEPS
    # only rank 0 writes: one metrics line per step and evaluation, no duplicates
    _, _, rows = history(root / f"{strategy}-{method}")
    assert [r["step"] for r in rows if "loss" in r] == list(range(1, STEPS + 1))


def test_generation_metrics_under_fsdp(runs):
    root, _ = runs
    scores = json.loads((root / "fsdp-qlora" / "eval" / "after_scores.json").read_text())
    assert "exact_match" in scores
    assert len((root / "fsdp-qlora" / "eval" / "after_predictions.jsonl").read_text().splitlines()) == 6


def test_fsdp_checkpoint_resumes_on_one_process(runs, tmp_path):
    """2 processes (FSDP, sharded optimizer state) saved at step 4; 1 process continues to the same adapter."""
    root, folder = runs
    checkpoint = root / "fsdp-qlora" / "checkpoints" / f"step-{SAVE_AT:06d}"
    meta = json.loads((checkpoint / "meta.json").read_text())
    assert meta["world_size"] == 2 and meta["rows"] == SAVE_AT * 8  # 2 processes x micro-batch 2 x accumulation 2
    resumed_dir = tmp_path / "resumed"
    shutil.copytree(checkpoint, resumed_dir / "checkpoints" / checkpoint.name)
    job = settings(root, folder, "qlora", "unused", 4, resume="auto", output_dir=str(resumed_dir))
    result = train(load_config(overrides=job), Progress(quiet=True))
    ref_losses, _, _ = history(root / "single-qlora")
    resumed = [r["loss"] for r in result.history if "loss" in r]
    torch.testing.assert_close(torch.tensor(resumed), torch.tensor(ref_losses[SAVE_AT:]), rtol=RTOL, atol=ATOL)
    a, b = adapter(resumed_dir), adapter(root / "single-qlora")
    for key in b:
        torch.testing.assert_close(a[key], b[key], rtol=RTOL, atol=ATOL)


def test_one_process_checkpoint_resumes_on_two(runs):
    root, _ = runs
    losses, _, _ = history(root / "resumed-on-2")
    ref_losses, _, _ = history(root / "single-lora")
    assert len(losses) == STEPS - SAVE_AT  # only the checkpoint was copied, not the first run's metrics
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref_losses[SAVE_AT:]), rtol=RTOL, atol=ATOL)
    a, b = adapter(root / "resumed-on-2"), adapter(root / "single-lora")
    for key in b:
        torch.testing.assert_close(a[key], b[key], rtol=RTOL, atol=ATOL)


def test_row_sharding_covers_the_global_batch_once():
    from lorafit.train.distributed import Dist

    shares = [Dist(rank, 3).local_rows(12, 9) for rank in range(3)]
    assert shares == [[12, 15, 18], [13, 16, 19], [14, 17, 20]]
    assert sorted(sum(shares, [])) == list(range(12, 21))


def test_gpus_flag_builds_the_torchrun_command():
    from lorafit.train.distributed import torchrun_command

    command = torchrun_command(4, ["run.yaml", "--lora.r", "8"])
    assert command[1:] == ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "4", "-m", "lorafit",
                           "train", "run.yaml", "--lora.r", "8"]


def test_gpus_flag_launches_two_cpu_processes(tmp_path):
    """`lorafit train CONFIG --gpus 2` with device cpu: torchrun starts two gloo processes; one adapter comes out."""
    folder, _ = make_tiny_checkpoint(tmp_path, "qwen2")
    write_chat_data(tmp_path / "train.jsonl", 16)
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({"model": {"path": str(folder)}, "method": "qlora", "max_steps": 2,
                                      "data": {"train": str(tmp_path / "train.jsonl"), "max_length": 64},
                                      "lora": {"r": 2, "alpha": 4}, "output_dir": str(tmp_path / "out"),
                                      "micro_batch_size": 1, "device": "cpu", "eval": {"before_training": False}}))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "lorafit", "train", str(config), "--gpus", "2"],
                            capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2 processes, data parallel" in result.stdout
    assert (tmp_path / "out" / "adapter" / "adapter_model.safetensors").is_file()
    rows = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2]
    assert all(r["tokens"] > 0 for r in rows if "loss" in r)


def test_planner_per_gpu_memory_under_sharding():
    from lorafit.plan.memory import Run, estimate
    from lorafit.plan.presets import resolve_card, shape_from_preset
    from lorafit.plan.shard import choose, make_shard_plan, parts, shard_estimate

    card, run = resolve_card("24GB"), Run("qlora", 2048, 1, True)
    big, small = shape_from_preset("qwen2.5-32b"), shape_from_preset("qwen2.5-7b")
    # data parallel holds the whole model: one GPU's peak plus the gradient bucket at the optimizer step
    one = estimate(small, run, card)
    ddp = shard_estimate(small, run, card, 2, "ddp")
    assert ddp.moments["loss"] == one.moments["loss"] and ddp.moments["optimizer"] > one.moments["optimizer"]
    # FSDP: 32B NF4 (15 GiB of codes) does not fit a 24 GB card whole, but does at 1/2 per GPU, less at 1/4
    assert choose(big, run, card, 2)[0] == "fsdp" and choose(small, run, card, 2)[0] == "ddp"
    two, four = (make_shard_plan(big, run, card, n, "fsdp") for n in (2, 4))
    assert two.fits and not make_shard_plan(big, run, card, 2, "ddp").fits
    assert four.lorafit.allocated < two.lorafit.allocated
    # what 2 -> 4 GPUs saves is a quarter of the sharded state (decoder layers, LoRA, AdamW) and of the root shard
    p = parts(big, replace(run, optimizer="adamw"))  # FSDP steps with torch AdamW
    saved = (big.layers * p.layer_sharded + p.lora + p.optimizer + p.root) // 4
    assert abs((two.lorafit.moments["loss"] - four.lorafit.moments["loss"]) - saved) < 2**20


def test_plan_command_with_gpus():
    from rich.console import Console

    from lorafit.plan import plan_command

    console = Console(record=True, width=160)
    out = plan_command("qwen2.5-32b", gpu="24GB", gpus=2, console=console)
    text = console.export_text()
    assert out["strategy"] == "fsdp" and out["per_gpu"]["fsdp"]["fits"] and not out["per_gpu"]["ddp"]["fits"]
    assert "per GPU, 2 GPUs, FSDP2" in text and "two decoder layers all-gathered" in text
