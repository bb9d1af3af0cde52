"""Experiment trackers named in `report_to`: TensorBoard, Weights & Biases, MLflow.

Each gets the scalars metrics.jsonl gets (training loss, learning rate, tokens/s, evaluations), at the same steps.
A tracker's package is imported only when the config asks for it; a missing one stops the run before the model
loads, with the pip command that fixes it.
"""

from __future__ import annotations

import importlib
from pathlib import Path

from lorafit.config import ConfigError

TRACKERS = ("tensorboard", "wandb", "mlflow")
PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}


def _require(name: str):
    try:
        return importlib.import_module(name)
    except ImportError:
        raise ConfigError(f"report_to: {name} asked for, but the {PACKAGES[name]} package is not installed: "
                          f"pip install {PACKAGES[name]} (or remove {name} from report_to)") from None


class TensorBoardTracker:
    """Event files in OUT/tensorboard: `tensorboard --logdir OUT/tensorboard`."""

    def __init__(self, output_dir: Path, config: dict):
        _require("tensorboard")
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(Path(output_dir) / "tensorboard"))

    def log(self, step: int, scalars: dict) -> None:
        for key, value in scalars.items():
            self.writer.add_scalar(key, value, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandbTracker:
    """A W&B run in the project named by WANDB_PROJECT (default "lorafit"), named after the output folder."""

    def __init__(self, output_dir: Path, config: dict):
        import os

        self.wandb = _require("wandb")
        self.run = self.wandb.init(project=os.environ.get("WANDB_PROJECT", "lorafit"), name=Path(output_dir).name,
                                   dir=str(output_dir), config=config)

    def log(self, step: int, scalars: dict) -> None:
        self.run.log(scalars, step=step)

    def close(self) -> None:
        self.run.finish()


class MlflowTracker:
    """An MLflow run (MLFLOW_TRACKING_URI and MLFLOW_EXPERIMENT_NAME as usual) with the config as flat params."""

    def __init__(self, output_dir: Path, config: dict):
        self.mlflow = _require("mlflow")
        self.mlflow.start_run(run_name=Path(output_dir).name)
        self.mlflow.log_params(dict(_flatten(config)))

    def log(self, step: int, scalars: dict) -> None:
        self.mlflow.log_metrics(scalars, step=step)

    def close(self) -> None:
        self.mlflow.end_run()


def _flatten(config: dict, prefix: str = ""):
    for key, value in config.items():
        if isinstance(value, dict):
            yield from _flatten(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", str(value)[:500]  # MLflow caps a param value's length


CLASSES = {"tensorboard": TensorBoardTracker, "wandb": WandbTracker, "mlflow": MlflowTracker}


class Trackers:
    """The trackers of one run behind one `log(step, scalars)` / `close()`; empty when report_to is."""

    def __init__(self, names: list[str], output_dir: str | Path, config: dict):
        unknown = [n for n in names if n not in CLASSES]
        if unknown:
            raise ConfigError(f"report_to: unknown tracker '{unknown[0]}' (known: {', '.join(TRACKERS)})")
        for name in names:  # every package checked before any tracker starts a run
            _require(name)
        self.trackers = [CLASSES[name](Path(output_dir), config) for name in dict.fromkeys(names)]

    def log(self, step: int, row: dict) -> None:
        if "warning" in row:  # a training warning's row (train/watch.py): text, not a metric
            return
        scalars = {k: float(v) for k, v in row.items()
                   if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}
        if scalars:
            for tracker in self.trackers:
                tracker.log(step, scalars)

    def close(self) -> None:
        for tracker in self.trackers:
            tracker.close()
        self.trackers = []
