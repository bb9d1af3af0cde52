"""The command line on a tiny model: files written, lines printed, and user errors without tracebacks."""

import json
import subprocess
import sys

import pytest
import yaml

from lorafit.cli import COMMANDS, app, main
from tests.test_train import ANSWER, write_chat_data
from tests.tiny import make_tiny_checkpoint


def run_cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "lorafit.cli", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=600)


def test_command_table_matches_the_parser():
    registered = {c.name or c.callback.__name__ for c in app.registered_commands}
    assert registered == set(COMMANDS)


@pytest.fixture
def tiny_run(tmp_path):
    folder, _ = make_tiny_checkpoint(tmp_path, "qwen2")
    data = write_chat_data(tmp_path / "train.jsonl", 24)
    val = write_chat_data(tmp_path / "val.jsonl", 6, seed=1)
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({
        "model": {"path": str(folder)}, "method": "qlora", "data": {"train": str(data), "val": str(val),
                                                                  "max_length": 64},
        "lora": {"r": 4, "alpha": 8}, "eval": {"metrics": ["exact_match"], "max_new_tokens": 8},
        "output_dir": str(tmp_path / "out"), "max_steps": 4, "micro_batch_size": 2, "device": "cpu"}))
    return tmp_path, config


def test_train_then_generate_through_the_cli(tiny_run):
    tmp_path, config = tiny_run
    result = run_cli("train", str(config), "--lora.r", "2", "--learning-rate=5e-3", "--save-every", "2")
    assert result.returncode == 0, result.stderr
    out = tmp_path / "out"
    assert "adapter:" in result.stdout and "base model:" in result.stdout and "fine-tuned:" in result.stdout
    adapter_config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert adapter_config["r"] == 2 and adapter_config["peft_type"] == "LORA"
    run = json.loads((out / "run.json").read_text())
    assert run["config"]["learning_rate"] == 5e-3 and "exact_match" in run["metrics"]["after"]
    assert (out / "eval" / "before_predictions.jsonl").is_file() and (out / "checkpoints" / "step-000002").is_dir()
    generated = run_cli("generate", "--adapter", str(out / "adapter"), "--max-new-tokens", "4", "hello world")
    assert generated.returncode == 0, generated.stderr
    assert isinstance(generated.stdout, str) and ANSWER  # runs end to end; the tiny model's text is noise


@pytest.mark.parametrize("extra, message", [
    (["--lora.r", "0"], "lora.r must be >= 1"),
    (["--method", "dora"], "method: 'dora' is not one of qlora, lora, full"),
    (["--learning_rat", "1e-4"], "unknown field 'learning_rat'"),
    (["--micro-batch-size", "two"], "micro_batch_size: expected an integer"),
])
def test_bad_flags_are_named(tiny_run, extra, message):
    _, config = tiny_run
    result = run_cli("train", str(config), *extra)
    assert result.returncode == 2
    assert message in result.stderr and "Traceback" not in result.stderr


def test_bad_data_line_is_named_without_traceback(tiny_run):
    tmp_path, config = tiny_run
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "a", "completion": }\n')
    result = run_cli("train", str(config), "--data.train", str(bad))
    assert result.returncode == 2 and f"{bad}:2: not valid JSON" in result.stderr
    assert "Traceback" not in result.stderr


def test_missing_model_folder_and_bad_yaml(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--model.path", str(tmp_path / "nope"), "--data.train", "x.jsonl"])
    assert exit_info.value.code == 2 and "model folder not found" in capsys.readouterr().err
    broken = tmp_path / "broken.yaml"
    broken.write_text("lora: {r: 8\n")
    with pytest.raises(SystemExit):
        main(["train", str(broken)])
    assert "broken.yaml" in capsys.readouterr().err


def test_fields_help_lists_every_field():
    result = run_cli("train", "--fields")
    assert result.returncode == 0
    for flag in ("--lora.r", "--data.max_length", "--micro_batch_size", "--eval.metrics"):
        assert flag in result.stdout


def test_plan_command_prints_breakdown_and_verdict():
    result = run_cli("plan", "--model", "qwen2.5-7b", "--seq", "2048", "--batch", "2", "--gpu", "rtx4090")
    assert result.returncode == 0, result.stderr
    for text in ("NF4", "LoRA A/B", "reserved", "fits"):
        assert text in result.stdout
    unknown = run_cli("plan", "--gpu", "voodoo5")
    assert unknown.returncode == 2 and "voodoo5" in unknown.stderr


def test_plan_for_long_rows_offloads_checkpoints_and_tiles_the_mlp_where_that_fits():
    """Qwen2.5-7B at 65,536 tokens on a 16 GB card: nothing the table models fits (it would shorten the row to 21,760),
    offloaded checkpoints with the MLP in tiles do (traced; on an H100 it trains there at 11.5 GiB allocated).
    131,072 tokens do not fit even so: the row is shortened."""
    result = run_cli("plan", "--model", "qwen2.5-7b", "--seq", "65536", "--gpu", "16GB")
    assert result.returncode == 0, result.stderr
    out = " ".join(result.stdout.split())
    assert "--offload-checkpoints true --mlp-chunk-tokens 8192" in out and "--data.max-length" not in out
    longer = run_cli("plan", "--model", "qwen2.5-7b", "--seq", "131072", "--gpu", "16GB")
    out = " ".join(longer.stdout.split())
    assert "--offload-checkpoints" not in out and "--data.max-length" in out
    short = run_cli("plan", "--model", "qwen2.5-7b", "--seq", "2048", "--gpu", "16GB")
    assert "--offload-checkpoints" not in " ".join(short.stdout.split())


def test_gpu_memory_budget_picks_the_settings(tiny_run):
    tmp_path, config = tiny_run
    result = run_cli("train", str(config), "--gpu-memory", "12GB", "--max-steps", "1", "--eval.metrics", "[]")
    assert result.returncode == 0, result.stderr
    assert "gpu memory 12GB" in result.stdout and "no GPU: the budget only chose the settings" in result.stdout
    run = json.loads((tmp_path / "out" / "run.json").read_text())
    assert run["config"]["micro_batch_size"] * run["config"]["grad_accum"] == 2  # effective batch kept


def test_merge_and_export_through_the_cli(tiny_run):
    tmp_path, config = tiny_run
    assert run_cli("train", str(config), "--eval.metrics", "[]").returncode == 0
    merged = run_cli("merge", str(tmp_path / "out" / "adapter"), str(tmp_path / "merged"), "--dtype", "fp32")
    assert merged.returncode == 0, merged.stderr
    assert "nf4 base" in merged.stdout  # the adapter was trained with qlora
    assert (tmp_path / "merged" / "config.json").is_file()
    exported = run_cli("export", str(tmp_path / "merged"), str(tmp_path / "m.gguf"), "--type", "q8_0")
    assert exported.returncode == 0, exported.stderr
    assert (tmp_path / "m.gguf").stat().st_size > 0
