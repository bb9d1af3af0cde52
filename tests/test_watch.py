"""Training warnings on synthetic metric sequences: gradient-norm spikes and overfitting, once per occurrence."""

import math

from lorafit.train.watch import TrainingWatch


def feed(watch, records):
    return [w for r in records for w in watch.observe(r)]


def steps(norms, start=1, loss=1.0):
    return [{"step": start + i, "grad_norm": n, "loss": loss} for i, n in enumerate(norms)]


def test_spike_is_named_once_per_occurrence():
    # 10 calm steps, a 3-step spike (one warning), calm again, a second spike (a second warning)
    norms = [1.0, 1.2, 0.9, 1.1, 1.0, 0.8, 1.05, 1.0, 0.95, 1.1] + [9.0, 12.0, 8.0] + [1.0] * 5 + [20.0]
    warnings = feed(TrainingWatch(), steps(norms))
    assert [(w.kind, w.step) for w in warnings] == [("grad_spike", 11), ("grad_spike", 19)]
    first = warnings[0]
    assert first.values["spike_norm"] == 9.0 and first.values["median_norm"] == 1.0
    assert "9.0x the median" in first.message and "learning_rate" in first.message and "max-grad-norm" in first.message
    assert first.row == {"step": 11, "warning": "grad_spike", "message": first.message, "spike_norm": 9.0,
                         "median_norm": 1.0}


def test_no_spike_below_the_factor_or_before_enough_history():
    assert feed(TrainingWatch(), steps([1.0] * 10 + [4.9] + [1.0] * 3)) == []  # 4.9x: under 5x
    assert feed(TrainingWatch(), steps([1.0, 1.0, 1.0, 50.0])) == []  # 3 steps of history: too few to judge
    # a NaN norm (a skipped step never reaches the record, but a record could still carry one) changes nothing
    assert feed(TrainingWatch(), steps([1.0] * 6 + [math.nan, 1.0])) == []
    # a slow climb moves the median along with it: no warning for a steady trend
    assert feed(TrainingWatch(window=5), steps([1.5**i for i in range(20)])) == []


def evals(pairs, every=10):
    """Records: `every` training steps at loss t, then a validation loss v at the last of them, for each (t, v)."""
    out = []
    for k, (t, v) in enumerate(pairs):
        for i in range(every):
            out.append({"step": k * every + i + 1, "grad_norm": 1.0, "loss": t})
        out[-1]["eval/val_loss"] = v
    return out


def test_overfitting_after_two_rising_evaluations_while_training_loss_falls():
    pairs = [(2.0, 1.5), (1.5, 1.2), (1.2, 1.3), (1.0, 1.4), (0.8, 1.6), (0.7, 1.1), (0.6, 1.2), (0.5, 1.3)]
    warnings = feed(TrainingWatch(), evals(pairs))
    # rises at evals 3 and 4 -> warn at eval 4 (step 40); eval 5 keeps rising (same occurrence); eval 6 falls;
    # rises at 7 and 8 -> a second occurrence at step 80
    assert [(w.kind, w.step) for w in warnings] == [("overfitting", 40), ("overfitting", 80)]
    assert warnings[0].values == {"val_losses": [1.2, 1.3, 1.4], "train_losses": [1.5, 1.2, 1.0]}
    for remedy in ("fewer epochs", "early stopping", "more data", "dropout"):
        assert remedy in warnings[0].message


def test_no_overfitting_warning_when_training_loss_rises_too_or_val_rises_once():
    assert feed(TrainingWatch(), evals([(1.0, 1.0), (1.1, 1.1), (1.2, 1.2)])) == []  # both rise: diverging, not overfit
    assert feed(TrainingWatch(), evals([(1.0, 1.0), (0.9, 1.1), (0.8, 1.0), (0.7, 1.1)])) == []  # one rise at a time
    assert feed(TrainingWatch(rising_evals=3), evals([(1.0, 1.0), (0.9, 1.1), (0.8, 1.2)])) == []  # needs 3 rises


def test_training_loss_is_the_mean_since_the_previous_evaluation():
    watch = TrainingWatch()
    records = evals([(1.0, 1.0), (1.0, 1.1)], every=2)
    records[2]["loss"], records[3]["loss"] = 0.2, 1.6  # mean 0.9 over the second window, last step alone is 1.6
    records += [{"step": 5, "grad_norm": 1.0, "loss": 0.85, "eval/val_loss": 1.2}]
    (warning,) = feed(watch, records)
    assert warning.values["train_losses"] == [1.0, 0.9, 0.85]
