"""`lorafit sweep`: parameter parsing, the grid, optuna's TPE over lists and ranges, failed trials, and a real
two-trial sweep on the bundled SmolLM2-135M-Instruct that must pick the learning rate that learns."""

import json

import pytest
import yaml

from lorafit.cli import main
from lorafit.config import ConfigError, load_config
from lorafit.sweep import grid, parse_params, run_sweep
from lorafit.train.progress import Progress
from tests.test_bundled import needs_bundled
from tests.test_train import write_chat_data
from tests.tiny import make_tiny_checkpoint


def test_params_parse_into_a_grid_and_ranges():
    params = parse_params(["learning_rate=1e-4,2e-4", "--lora.r=8,16", "lr-schedule=cosine,constant"])
    assert [(p.key, p.values) for p in params] == [("learning_rate", [1e-4, 2e-4]), ("lora.r", [8, 16]),
                                                   ("lr_schedule", ["cosine", "constant"])]
    combos = grid(params)
    assert len(combos) == 8 and combos[0] == {"learning_rate": 1e-4, "lora.r": 8, "lr_schedule": "cosine"}
    assert combos[-1] == {"learning_rate": 2e-4, "lora.r": 16, "lr_schedule": "constant"}
    lr, r = parse_params(["learning_rate=1e-5:1e-3", "lora.r=4:32"])
    assert (lr.low, lr.high, lr.values) == (1e-5, 1e-3, []) and (r.low, r.high) == (4, 32)
    assert isinstance(r.low, int) and isinstance(lr.low, float)
    for spec, message in [("learning_rat=1,2", "unknown config field 'learning_rat'"), ("lora.r", "KEY=V1,V2"),
                          ("learning_rate=1e-3:1e-5", "LO < HI")]:
        with pytest.raises(ConfigError, match=message):
            parse_params([spec])
    with pytest.raises(ConfigError, match="ranges need --trials"):
        grid([lr])


@pytest.fixture
def tiny_setup(tmp_path):
    folder, _ = make_tiny_checkpoint(tmp_path, "llama")
    data = write_chat_data(tmp_path / "train.jsonl", 20)
    val = write_chat_data(tmp_path / "val.jsonl", 4, seed=1)
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({
        "model": {"path": str(folder)}, "method": "lora", "data": {"train": str(data), "val": str(val),
                                                                 "max_length": 64},
        "lora": {"r": 4, "alpha": 8}, "eval": {"before_training": False}, "output_dir": str(tmp_path / "out"),
        "max_steps": 2, "micro_batch_size": 2, "device": "cpu"}))
    return tmp_path, config


def test_grid_sweep_through_the_cli_records_a_failed_trial_and_goes_on(tiny_setup):
    tmp_path, config = tiny_setup
    main(["sweep", str(config), "--param", "lora.r=0,2", "--param", "learning_rate=1e-2", "--max-steps", "3"])
    out = tmp_path / "out"  # the config's output_dir
    summary = json.loads((out / "sweep.json").read_text())
    assert summary["mode"] == "grid" and summary["metric"] == "val_loss" and summary["direction"] == "minimize"
    failed, ok = summary["trials"]
    assert failed["status"] == "failed" and "lora.r must be >= 1" in failed["error"]
    assert ok["status"] == "ok" and ok["params"] == {"lora.r": 2, "learning_rate": 0.01} and ok["value"] > 0
    assert summary["best"]["number"] == 1 and (out / "trial-001" / "adapter").is_dir()
    run = json.loads((out / "trial-001" / "run.json").read_text())
    assert run["steps"] == 3 and run["config"]["lora"]["r"] == 2  # the extra flag reached every trial
    best = load_config(out / "best_config.yaml")
    assert best.lora.r == 2 and best.max_steps == 3 and best.output_dir == str(out / "best")


def test_optuna_sweep_samples_lists_and_log_ranges(tiny_setup):
    pytest.importorskip("optuna", reason="--trials needs optuna (pip install 'lorafit[sweep]')")
    tmp_path, config = tiny_setup
    result = run_sweep(config, ["learning_rate=1e-4:1e-1", "lora.r=2,4"], trials=3, output_dir=tmp_path / "sw",
                       progress=Progress(quiet=True))
    assert len(result.trials) == 3 and all(t.status in ("ok", "repeat") for t in result.trials)
    for trial in result.trials:
        assert 1e-4 <= trial.params["learning_rate"] <= 1e-1 and trial.params["lora.r"] in (2, 4)
    assert result.best.value == min(t.value for t in result.trials)
    summary = json.loads((tmp_path / "sw" / "sweep.json").read_text())
    assert summary["mode"] == "optuna" and summary["params"][0] == {"key": "learning_rate", "low": 1e-4, "high": 0.1}
    assert yaml.safe_load((tmp_path / "sw" / "best_config.yaml").read_text())["learning_rate"] == \
        result.best.params["learning_rate"]


def test_metric_must_be_one_the_trials_report(tiny_setup):
    _, config = tiny_setup
    with pytest.raises(ConfigError, match="set eval.metrics"):
        run_sweep(config, ["lora.r=2,4"], metric="json_f1", progress=Progress(quiet=True))
    with pytest.raises(ConfigError, match="needs validation data"):
        run_sweep(config, ["lora.r=2,4"], overrides=["--data.val", "null"], progress=Progress(quiet=True))


@needs_bundled
def test_bundled_sweep_picks_the_learning_rate_that_learns(tmp_path):
    """Two trials on the real 135M model and the intents task (16 examples, 4 steps; ~10 s on 2 cores with LoRA):
    1e-3 learns the answer format, 1e-7 leaves the model where it was (measured val loss 0.58 vs 3.5)."""
    from lorafit.data.tasks import intents

    train_path, val_path = intents.write_task_files(tmp_path / "data", n_train=16, n_test=6, seed=0)
    settings = {"model": {"path": "bundled"}, "method": "lora", "lora": {"r": 8, "alpha": 16},
                "data": {"train": str(train_path), "val": str(val_path), "max_length": 128},
                "eval": {"before_training": False}, "max_steps": 4, "micro_batch_size": 1, "warmup_ratio": 0.0,
                "lr_schedule": "constant", "gradient_checkpointing": False, "device": "cpu"}
    result = run_sweep(None, ["learning_rate=1e-7,1e-3"], overrides=settings, output_dir=tmp_path / "sweep",
                       progress=Progress(quiet=True))
    slow, fast = result.trials
    assert slow.status == fast.status == "ok" and result.metric == "val_loss"
    assert result.best.number == fast.number and fast.value < slow.value - 1.0
    assert load_config(tmp_path / "sweep" / "best_config.yaml").learning_rate == 1e-3
    assert json.loads((tmp_path / "sweep" / "sweep.json").read_text())["best"]["params"] == {"learning_rate": 1e-3}
