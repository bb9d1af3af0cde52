"""Warnings while a run goes: gradient-norm spikes and overfitting, each said once per occurrence with its remedies.

Pure bookkeeping over the numbers the loop already has (no torch): `TrainingWatch.observe(record)` takes each step's
metrics record and returns the warnings that record starts. The loop prints them and writes them to metrics.jsonl
as rows `{"step", "warning", "message", ...}` for `lorafit runs` and reports; their numbers have keys of their own
(spike_norm, not grad_norm), so a reader plotting grad_norm or loss from the log gets no extra points.

- spike: the step's gradient norm (before clipping) is more than `spike_factor` times the median of the previous
  `window` steps' norms. A run of spiking steps is one occurrence; the next normal step ends it.
- overfitting: validation loss rose at `rising_evals` evaluations in a row while the training loss (the mean over
  the steps since the previous evaluation) fell over the same evaluations. It is one occurrence until validation
  loss stops rising.
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from dataclasses import dataclass, field

SPIKE_REMEDIES = ("lower learning_rate (e.g. halve it)", "keep clipping on (--max-grad-norm 1.0)",
                  "raise warmup_ratio", "look for odd examples near this step (lorafit data stats / preview)")
OVERFIT_REMEDIES = ("fewer epochs", "early stopping (--eval.patience 2; the best adapter is kept in OUT/best)",
                    "more data", "adapter dropout (--lora.dropout 0.05)", "a lower learning_rate or lora.r")


@dataclass
class TrainingWarning:
    kind: str  # "grad_spike" or "overfitting"
    step: int
    message: str
    values: dict = field(default_factory=dict)

    @property
    def row(self) -> dict:
        """The metrics.jsonl row for this warning."""
        return {"step": self.step, "warning": self.kind, "message": self.message, **self.values}


class TrainingWatch:
    def __init__(self, spike_factor: float = 5.0, window: int = 20, min_history: int = 5, rising_evals: int = 2):
        self.spike_factor, self.min_history, self.rising_evals = spike_factor, min_history, rising_evals
        self.norms: deque[float] = deque(maxlen=window)
        self.in_spike = False
        self.train_since_eval: list[float] = []
        self.evals: list[tuple[int, float, float]] = []  # (step, val_loss, mean train loss since the previous eval)
        self.overfitting = False

    def observe(self, record: dict) -> list[TrainingWarning]:
        """Warnings started by this step's record (keys used: step, grad_norm, loss, eval/val_loss)."""
        warnings = []
        step = record["step"]
        if (norm := record.get("grad_norm")) is not None and (w := self._grad_norm(step, float(norm))):
            warnings.append(w)
        if (loss := record.get("loss")) is not None and math.isfinite(loss):
            self.train_since_eval.append(float(loss))
        if (val := record.get("eval/val_loss")) is not None and (w := self._eval(step, float(val))):
            warnings.append(w)
        return warnings

    def _grad_norm(self, step: int, norm: float) -> TrainingWarning | None:
        if not math.isfinite(norm):
            return None
        median = statistics.median(self.norms) if len(self.norms) >= self.min_history else None
        self.norms.append(norm)
        spiking = median is not None and norm > self.spike_factor * median
        started, self.in_spike = spiking and not self.in_spike, spiking
        if not started:
            return None
        ratio = norm / median if median > 0 else math.inf
        message = (f"step {step}: gradient norm {norm:.3g} is {ratio:.1f}x the median of the last "
                   f"{len(self.norms) - 1} steps ({median:.3g}). Remedies: {'; '.join(SPIKE_REMEDIES)}")
        return TrainingWarning("grad_spike", step, message, {"spike_norm": norm, "median_norm": median})

    def _eval(self, step: int, val_loss: float) -> TrainingWarning | None:
        train_loss = statistics.fmean(self.train_since_eval) if self.train_since_eval else math.nan
        self.train_since_eval = []
        self.evals.append((step, val_loss, train_loss))
        recent = self.evals[-(self.rising_evals + 1):]
        if len(recent) <= self.rising_evals:
            return None
        vals, trains = [v for _, v, _ in recent], [t for _, _, t in recent]
        rising = all(b > a for a, b in zip(vals, vals[1:]))
        falling = trains[-1] < trains[0]  # NaN (no train loss seen) compares False: no claim without evidence
        if not rising:
            self.overfitting = False
        if not (rising and falling) or self.overfitting:
            return None
        self.overfitting = True
        arrow = lambda xs: " -> ".join(f"{x:.4g}" for x in xs)  # noqa: E731
        message = (f"step {step}: validation loss rose {self.rising_evals} evaluations in a row ({arrow(vals)}) while "
                   f"training loss fell ({arrow(trains)}): the model is starting to memorise the training data. "
                   f"Remedies: {'; '.join(OVERFIT_REMEDIES)}")
        return TrainingWarning("overfitting", step, message, {"val_losses": vals, "train_losses": trains})
