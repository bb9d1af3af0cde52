"""Real training subprocesses killed at random moments (SIGKILL, SIGINT, SIGTERM), then resumed: the final adapter
must equal an uninterrupted run's, bit for bit (CPU, dropout on, a checkpoint after every step)."""

import random
import signal
import subprocess
import sys

import pytest
import torch
import yaml
from safetensors.torch import load_file

from lorafit.train.checkpoint import list_checkpoints
from tests.test_train import write_chat_data
from tests.tiny import make_tiny_checkpoint

KILLS = 20
STEPS = 120  # each kill lets at most ~4 steps through, so 20 kills fit however fast the machine is


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("kill")
    folder, _ = make_tiny_checkpoint(tmp, "llama")
    data = write_chat_data(tmp / "train.jsonl", 60)

    def config(name):
        path = tmp / f"{name}.yaml"
        path.write_text(yaml.safe_dump({
            "model": {"path": str(folder)}, "method": "lora", "data": {"train": str(data), "max_length": 64},
            "lora": {"r": 4, "alpha": 8, "dropout": 0.1}, "output_dir": str(tmp / name), "max_steps": STEPS,
            "micro_batch_size": 2, "grad_accum": 2, "learning_rate": 1e-2, "save_every": 1, "keep_checkpoints": 2,
            "eval": {"before_training": False}, "device": "cpu", "log_every": 1}))
        return path

    reference = subprocess.run([sys.executable, "-m", "lorafit.cli", "train", str(config("reference"))],
                               capture_output=True, text=True, timeout=600)
    assert reference.returncode == 0, reference.stderr
    return tmp, config


def start(config_path):
    return subprocess.Popen([sys.executable, "-m", "lorafit.cli", "train", str(config_path), "--resume", "auto"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def adapter(folder):
    return load_file(str(folder / "adapter" / "adapter_model.safetensors"))


def assert_same_adapter(a, b):
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_sigkill_at_random_moments_then_resume(setup):
    tmp, config = setup
    path = config("killed")
    rng = random.Random(0)
    kills = 0
    while kills < KILLS:
        process = start(path)
        wait_steps = rng.randint(1, 3)
        seen = 0
        for line in process.stdout:  # the plain progress lines: "step N/120 ..."
            if line.startswith("step "):
                seen += 1
                if seen == wait_steps:
                    break
        if process.poll() is not None:  # finished before the kill: nothing left to interrupt
            break
        # land anywhere in the next step, checkpoint write included (a step with its checkpoint takes ~60 ms)
        subprocess.run(["sleep", f"{rng.uniform(0, 0.08):.3f}"])
        process.send_signal(signal.SIGKILL)
        process.wait()
        kills += 1
        found = list_checkpoints(tmp / "killed")
        if found:  # the newest complete checkpoint always loads
            assert load_file(str(found[-1] / "trainable.safetensors"))
    final = start(path)
    out, err = final.communicate(timeout=600)
    assert final.returncode == 0, err
    assert kills >= KILLS
    assert_same_adapter(adapter(tmp / "killed"), adapter(tmp / "reference"))


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_interrupt_saves_a_checkpoint_and_exits_cleanly(setup, sig):
    tmp, config = setup
    name = f"signal{int(sig)}"
    path = config(name)
    process = start(path)
    for line in process.stdout:
        if line.startswith("step 3/"):
            break
    process.send_signal(sig)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 130, err
    assert "checkpoint saved at step" in err and "--resume auto" in err and "Traceback" not in err
    resumed = start(path)
    _, err = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, err
    assert_same_adapter(adapter(tmp / name), adapter(tmp / "reference"))
