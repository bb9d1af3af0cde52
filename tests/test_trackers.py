"""`report_to` trackers get what metrics.jsonl gets; a missing tracker package stops the run before the model loads.
And the progress display: one plain line per step, with everything a person watches, when output is not a terminal."""

import io
import json
import re
import sys

import pytest
from rich.console import Console

from lorafit.config import ConfigError
from lorafit.train.loop import train
from lorafit.train.progress import Progress
from lorafit.train.trackers import Trackers
from tests.test_train import tiny_config, write_chat_data
from tests.tiny import make_tiny_checkpoint


def test_tensorboard_gets_the_logged_scalars(tmp_path):
    pytest.importorskip("tensorboard", reason="report_to: [tensorboard] needs the tensorboard package")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    folder, _ = make_tiny_checkpoint(tmp_path, "llama")
    data = write_chat_data(tmp_path / "train.jsonl", 20)
    val = write_chat_data(tmp_path / "val.jsonl", 4, seed=1)
    cfg = tiny_config(tmp_path, folder, data, max_steps=4, val_every=2, report_to=["tensorboard"],
                      data={"train": str(data), "val": str(val), "max_length": 64}, eval={"before_training": True})
    result = train(cfg, Progress(quiet=True))
    events = EventAccumulator(str(result.output_dir / "tensorboard"))
    events.Reload()
    assert {"loss", "lr", "tokens_per_s", "grad_norm", "eval/val_loss"} <= set(events.Tags()["scalars"])
    rows = [json.loads(line) for line in (result.output_dir / "metrics.jsonl").read_text().splitlines()]
    logged = [(e.step, e.value) for e in events.Scalars("loss")]
    assert logged == [(r["step"], pytest.approx(r["loss"], rel=1e-6)) for r in rows if "loss" in r]
    val_loss = [(e.step, e.value) for e in events.Scalars("eval/val_loss")]
    assert [s for s, _ in val_loss] == [0, 2, 4]  # base model, step 2, final


@pytest.mark.parametrize("name", ["tensorboard", "wandb", "mlflow"])
def test_missing_tracker_package_is_named_before_the_model_loads(tmp_path, monkeypatch, name):
    monkeypatch.setitem(sys.modules, name, None)  # as if not installed: `import name` raises ImportError
    with pytest.raises(ConfigError, match=rf"report_to: {name} .* pip install {name}"):
        Trackers([name], tmp_path, {})
    cfg = tiny_config(tmp_path, tmp_path / "no-such-model", tmp_path / "train.jsonl", report_to=[name])
    with pytest.raises(ConfigError, match="report_to"):  # not "model folder not found": checked first
        train(cfg, Progress(quiet=True))


def test_trackers_get_numbers_only():
    class Fake:
        def __init__(self):
            self.logged = []

        def log(self, step, scalars):
            self.logged.append((step, scalars))

        def close(self):
            pass

    trackers = Trackers([], ".", {})
    fake = Fake()
    trackers.trackers = [fake]
    trackers.log(3, {"step": 3, "loss": 1.5, "tokens": 120, "note": "x", "flag": True})
    trackers.log(4, {"step": 4, "warning": "grad_spike", "message": "...", "spike_norm": 9.0})
    assert fake.logged == [(3, {"loss": 1.5, "tokens": 120.0})]


def test_progress_writes_plain_lines_when_not_a_terminal():
    out = io.StringIO()
    progress = Progress(console=Console(file=out, width=80))
    assert not progress.live  # a StringIO is no terminal: no live bar
    progress.start(total=10, first=0)
    progress.scores("step 0", {"val_loss": 2.5, "val_perplexity": 12.18, "accuracy": 0.25, "per_label": {}})
    long_row = {"step": 1, "loss": 2.34567, "lr": 1e-4, "tokens_per_s": 1234.5, "gpu_mem_gb": 3.21, "cpu_mem_gb": 1.0}
    progress.step(long_row)
    progress.step({"step": 2, "loss": 2.1, "lr": 9e-5, "tokens_per_s": 1300.0, "cpu_mem_gb": 1.04})
    progress.finish()
    text = out.getvalue()
    assert "\x1b[" not in text  # no colours, cursor moves or bar redraws in a log
    lines = text.splitlines()
    assert lines[0].startswith("lorafit step 0: val_loss 2.5, val_perplexity 12.18, accuracy 0.25")
    assert re.fullmatch(r"step 1/10  loss 2\.3457  val_loss 2\.5  accuracy 0\.25  lr 1\.00e-04  1,234 tok/s  "
                        r"gpu mem 3\.2 GB  eta \d+:\d\d:\d\d", lines[1])  # one line, though wider than 80
    assert re.fullmatch(r"step 2/10  loss 2\.1000 .* 1,300 tok/s  cpu mem 1\.0 GB  eta \d+:\d\d:\d\d", lines[2])
    assert len(lines) == 3


def test_progress_live_bar_on_a_terminal():
    out = io.StringIO()
    progress = Progress(console=Console(file=out, force_terminal=True, width=200), live=True)
    progress.start(total=4, first=0)
    progress.step({"step": 1, "loss": 2.5, "lr": 1e-4, "tokens_per_s": 100.0, "gpu_mem_gb": 3.0})
    progress.finish()
    text = out.getvalue()
    assert "loss 2.5000" in text and "gpu mem 3.0 GB" in text and "1/4" in text
