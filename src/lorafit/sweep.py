"""`lorafit sweep`: train the same config with different settings and keep the best.

    lorafit sweep run.yaml --param learning_rate=1e-4,2e-4 --param lora.r=8,16          # grid: 4 runs
    lorafit sweep run.yaml --param learning_rate=1e-5:1e-3 --param lora.r=8,16 --trials 6   # optuna TPE

Each trial is an ordinary `train()` run of CONFIG with the trial's values as overrides (the keys `lorafit train`
accepts as flags), in OUT/trial-NNN. Without --trials every combination of the listed values runs; with it,
optuna's TPE sampler picks values from the lists (categorical) and from `lo:hi` ranges (log-uniform for learning
rates, uniform otherwise; integers when both ends are). A trial's score is the best value of the metric over its
evaluations (during training and at the end); lower is better for losses and perplexity, higher otherwise. A trial
that fails (bad value, out of memory, diverged) is recorded as failed and the sweep goes on. sweep.json holds every
trial and is rewritten after each; best_config.yaml is the best trial's resolved config, ready for `lorafit train`.
"""

from __future__ import annotations

import dataclasses
import gc
import itertools
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from lorafit.config import ConfigError, config_to_dict, field_help, load_config, merge_settings, parse_overrides
from lorafit.train.faults import Interrupted
from lorafit.train.loop import lower_is_better, train
from lorafit.train.progress import Progress
from lorafit.train.record import write_json_atomic


@dataclass
class Param:
    key: str  # dotted config field, e.g. lora.r
    values: list = field(default_factory=list)  # listed values (a grid axis, or optuna's categorical choices)
    low: float | None = None  # a lo:hi range (optuna only)
    high: float | None = None

    def suggest(self, trial) -> Any:
        """This parameter's value for an optuna trial."""
        if self.values:
            return trial.suggest_categorical(self.key, self.values)
        log = self.key.split(".")[-1] == "learning_rate" and self.low > 0
        if isinstance(self.low, int) and isinstance(self.high, int):
            return trial.suggest_int(self.key, self.low, self.high, log=log)
        return trial.suggest_float(self.key, float(self.low), float(self.high), log=log)


@dataclass
class Trial:
    number: int
    params: dict
    status: str = "ok"  # ok, failed, or repeat (same values as an earlier trial: its result is reused)
    value: float | None = None
    error: str | None = None
    output_dir: str = ""
    seconds: float = 0.0
    scores: dict = field(default_factory=dict)  # the final evaluation's numeric scores
    config: dict | None = field(default=None, repr=False)


@dataclass
class SweepResult:
    output_dir: Path
    metric: str
    direction: str  # minimize or maximize
    trials: list[Trial]
    best: Trial | None


def _scalar(text: str) -> Any:
    text = text.strip()
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return yaml.safe_load(text) if text else ""


def parse_params(specs: list[str]) -> list[Param]:
    """`KEY=V1,V2,...` (listed values) or `KEY=LO:HI` (a range) for each spec; keys checked against the config."""
    known = {name for name, _, _ in field_help()}
    params = []
    for spec in specs:
        key, eq, text = spec.removeprefix("--").partition("=")
        key = key.strip().replace("-", "_")
        if not eq or not text.strip():
            raise ConfigError(f"--param {spec!r}: write KEY=V1,V2 (values) or KEY=LO:HI (a range)")
        if key not in known:
            raise ConfigError(f"--param {spec!r}: unknown config field '{key}' (lorafit train --fields lists them)")
        if key in {p.key for p in params}:
            raise ConfigError(f"--param {key} given twice: list all its values in one --param")
        low, colon, high = text.partition(":")
        ends = [_scalar(low), _scalar(high)] if colon and "," not in text else None
        if ends and all(isinstance(e, (int, float)) and not isinstance(e, bool) for e in ends):
            if ends[0] >= ends[1]:
                raise ConfigError(f"--param {spec!r}: a range is LO:HI with LO < HI")
            params.append(Param(key, low=ends[0], high=ends[1]))
        else:
            params.append(Param(key, values=[_scalar(v) for v in text.split(",")]))
    return params


def grid(params: list[Param]) -> list[dict]:
    """Every combination of the listed values, the first parameter varying slowest."""
    ranged = [p.key for p in params if not p.values]
    if ranged:
        raise ConfigError(f"--param {ranged[0]} is a range: ranges need --trials N (optuna samples them); "
                          "list values (KEY=V1,V2) for a grid")
    return [dict(zip([p.key for p in params], combo)) for combo in itertools.product(*[p.values for p in params])]


def _nested(params: dict) -> dict:
    out: dict = {}
    for key, value in params.items():
        node = out
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return out


def _check_metric(cfg, metric: str) -> None:
    if metric in ("val_loss", "val_perplexity"):
        if not cfg.data.val and not cfg.data.val_ratio:
            raise ConfigError(f"sweep metric {metric} needs validation data: set data.val or data.val_ratio")
    elif not cfg.eval.metrics:
        raise ConfigError(f"sweep metric {metric} is not a validation loss, so it must come from generation "
                          "metrics: set eval.metrics (e.g. json, classification, exact_match)")


def run_trial(number: int, params: dict, config, overrides: dict, out: Path, metric: str, progress: Progress) -> Trial:
    """One training run with `params` over CONFIG + overrides in OUT/trial-NNN; failures are caught and recorded."""
    folder = out / f"trial-{number:03d}"
    trial = Trial(number, params, output_dir=str(folder))
    started = time.perf_counter()
    try:
        cfg = load_config(config, merge_settings(merge_settings(overrides, _nested(params)),
                                                 {"output_dir": str(folder)}))
        trial.config = config_to_dict(cfg)
        result = train(cfg, progress)
        trial.scores = {k: v for k, v in result.after.items() if isinstance(v, (int, float))}
        values = [s[metric] for s in (result.best, result.after) if isinstance(s.get(metric), (int, float))]
        values = [v for v in values if math.isfinite(v)]
        if not values:
            raise ConfigError(f"metric {metric} is not among the trial's scores ({', '.join(trial.scores) or 'none'})")
        trial.value = min(values) if lower_is_better(metric) else max(values)
    except Interrupted:
        raise
    except Exception as e:  # any failure of one trial (bad value, out of memory, NaN) must not end the sweep
        trial.status, trial.error = "failed", f"{type(e).__name__}: {e}"[:1000]
        progress.say(f"[red]trial {number} failed[/red]: {trial.error}")
    finally:
        trial.seconds = round(time.perf_counter() - started, 2)
        gc.collect()  # the trial's model and optimizer go before the next one loads
        _empty_cuda_cache()
    return trial


def _empty_cuda_cache() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _best(trials: list[Trial], metric: str) -> Trial | None:
    scored = [t for t in trials if t.status == "ok"]
    if not scored:
        return None
    return (min if lower_is_better(metric) else max)(scored, key=lambda t: t.value)


def _write(out: Path, result: SweepResult, params: list[Param], mode: str) -> None:
    best = result.best
    summary = {"metric": result.metric, "direction": result.direction, "mode": mode,
               "params": [{k: v for k, v in dataclasses.asdict(p).items() if v not in (None, [])} for p in params],
               "trials": [{k: v for k, v in dataclasses.asdict(t).items() if k != "config"} for t in result.trials],
               "best": None if best is None else {"number": best.number, "params": best.params, "value": best.value,
                                                  "output_dir": best.output_dir}}
    write_json_atomic(out / "sweep.json", summary)
    if best is not None and best.config is not None:
        config = dict(best.config, output_dir=str(out / "best"))
        header = (f"# best of the sweep in {out}: trial {best.number} ({best.output_dir}), {result.metric} "
                  f"{best.value:.6g}, with {', '.join(f'{k}={v}' for k, v in best.params.items())}\n"
                  "# lorafit train this file to repeat it (output in output_dir below)\n")
        (out / "best_config.yaml").write_text(header + yaml.safe_dump(config, sort_keys=False))


def print_results(result: SweepResult, progress: Progress) -> None:
    from rich.table import Table

    if progress.quiet:
        return
    keys = list(dict.fromkeys(k for t in result.trials for k in t.params))
    table = Table(title=f"sweep: {result.metric} ({'lower' if result.direction == 'minimize' else 'higher'} "
                        "is better)")
    for column in ["trial", *keys, result.metric, "status", "time", "folder"]:
        table.add_column(column)
    for t in result.trials:
        is_best = result.best is not None and t.number == result.best.number
        status = "best" if is_best else t.status if t.status == "ok" else f"{t.status}: {t.error or ''}"[:70]
        style = "bold green" if is_best else ("red" if t.status == "failed" else None)
        table.add_row(str(t.number), *[f"{t.params.get(k)}" for k in keys],
                      f"{t.value:.4g}" if t.value is not None else "-", status, f"{t.seconds:.0f} s",
                      Path(t.output_dir).name, style=style)
    progress.console.print(table)


def run_sweep(config: str | Path | None, params: list[str] | list[Param], trials: int = 0, metric: str | None = None,
              output_dir: str | Path | None = None, overrides: list[str] | dict | None = None,
              progress: Progress | None = None) -> SweepResult:
    """Run the sweep and write OUT/sweep.json and OUT/best_config.yaml; OUT defaults to the config's output_dir.

    `params`: `KEY=V1,V2` / `KEY=LO:HI` strings (as on the command line) or Param objects; `trials` 0 runs the
    grid, N > 0 runs N optuna trials; `overrides` apply to every trial (like `lorafit train` flags).
    """
    progress = progress or Progress()
    params = [p if isinstance(p, Param) else parse_params([p])[0] for p in params]
    if not params:
        raise ConfigError("a sweep needs at least one --param KEY=V1,V2")
    overrides = parse_overrides(overrides) if isinstance(overrides, list) else dict(overrides or {})
    base = load_config(config, overrides)  # a bad base config fails here, before any trial
    metric = metric or base.eval.best_metric or "val_loss"
    _check_metric(base, metric)
    out = Path(output_dir or base.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    direction = "minimize" if lower_is_better(metric) else "maximize"
    result = SweepResult(out, metric, direction, [], None)
    mode = "optuna" if trials else "grid"

    def record(trial: Trial) -> None:
        result.trials.append(trial)
        result.best = _best(result.trials, metric)
        _write(out, result, params, mode)
        shown = f"{metric} {trial.value:.4g}" if trial.value is not None else "failed"
        progress.say(f"trial {trial.number}: {shown} ({trial.seconds:.0f} s)")

    def announce(number: int, total: int, values: dict) -> None:
        progress.say(f"[bold]trial {number} ({number + 1} of {total})[/bold]: "
                     + ", ".join(f"{k}={v}" for k, v in values.items()))

    if not trials:
        combos = grid(params)
        for number, values in enumerate(combos):
            announce(number, len(combos), values)
            record(run_trial(number, values, config, overrides, out, metric, progress))
    else:
        optuna = _import_optuna()
        study = optuna.create_study(direction=direction, sampler=optuna.samplers.TPESampler(seed=base.seed))
        for number in range(trials):
            suggestion = study.ask()
            values = {p.key: p.suggest(suggestion) for p in params}
            announce(number, trials, values)
            earlier = next((t for t in result.trials if t.params == values and t.status == "ok"), None)
            if earlier is not None:  # training is deterministic for a seed: the same values give the same score
                trial = dataclasses.replace(earlier, number=number, status="repeat", seconds=0.0,
                                            error=f"same values as trial {earlier.number}")
            else:
                trial = run_trial(number, values, config, overrides, out, metric, progress)
            if trial.value is None:
                study.tell(suggestion, state=optuna.trial.TrialState.FAIL)
            else:
                study.tell(suggestion, trial.value)
            record(trial)
    print_results(result, progress)
    if result.best is not None:
        progress.say(f"best: trial {result.best.number} ({metric} {result.best.value:.4g}); config in "
                     f"{out / 'best_config.yaml'}, all trials in {out / 'sweep.json'}")
    else:
        progress.say(f"every trial failed; see {out / 'sweep.json'}")
    return result


def _import_optuna():
    try:
        import optuna
    except ImportError:
        raise ConfigError("--trials samples with optuna: pip install optuna (or pip install 'lorafit[sweep]'); "
                          "without --trials the sweep runs the grid of listed values") from None
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna
