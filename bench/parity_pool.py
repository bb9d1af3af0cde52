"""Pool the curves of several `bench_parity.py --self-noise` logs: is the first variant as close to the second as the
second's own runs are to each other?

    python bench/parity_pool.py LOG [LOG ...]

Each LOG is the whole output of one bench_parity.py run with --self-noise: its training runs print `step k/N  loss`
lines in order, the first variant's run first, then the second variant's plain run and its perturbed runs. Over all
logs this compares every (first, second) pair of curves with every pair of the second variant's distinct curves, by
bench_parity.distance's three measures, and prints the median and range of each. `VERDICT` says, per measure,
whether the median first-to-second distance is at most the median second-to-second one: a fast path that computes
what its twin does up to bf16 roundings is one more member of the twin's own spread.

That verdict is strict: if the first variant's curves were drawn exactly as the second's are, each measure's median
across would still exceed its median within about half the time. `PERMUTATION` is the test for the question asked:
with the labels shuffled over all the curves (every way of calling k of them "first", k the first variant's count),
how often is median across - median within at least what the real labels give? A small p (under 0.05) on a measure
says the first variant's curves sit apart from the second's; a large one, that they cannot be told from them.
"""

from __future__ import annotations

import itertools
import re
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_parity import distance  # noqa: E402

STEP = re.compile(r"^step +\d+/(\d+)  loss ([\d.]+)", re.M)


def curves(log: str) -> list[list[float]]:
    """The log's training curves, in the order they ran."""
    found = [(int(steps), float(loss)) for steps, loss in STEP.findall(log)]
    steps = found[0][0]
    losses = [loss for _, loss in found]
    return [losses[i:i + steps] for i in range(0, len(losses) - steps + 1, steps)]


MEASURES = ("max_abs", "last10_rel", "median_rel")


def permutation_p_values(curves: list[list[float]], firsts: int) -> dict[str, float]:
    """Per measure: the share of the ways of labelling `firsts` of `curves` as the first variant whose median
    across - median within is at least that of the real labelling (the first `firsts` curves). Exact: every
    labelling is tried (a few hundred for a dozen curves). Distances are symmetric, so each pair is measured once."""
    n = len(curves)
    pair = {(i, j): distance(curves[i], curves[j], None) for i, j in itertools.combinations(range(n), 2)}

    def gap(first: set[int], measure: str) -> float:
        across = [pair[min(i, j), max(i, j)][measure] for i in first for j in range(n) if j not in first]
        within = [pair[i, j][measure] for i, j in pair if i not in first and j not in first]
        return statistics.median(across) - statistics.median(within)

    labellings = [set(c) for c in itertools.combinations(range(n), firsts)]
    observed = {m: gap(set(range(firsts)), m) for m in MEASURES}
    return {m: sum(gap(f, m) >= observed[m] - 1e-12 for f in labellings) / len(labellings) for m in MEASURES}


def main() -> None:
    firsts, seconds = [], []
    for path in sys.argv[1:]:
        runs = curves(Path(path).read_text())
        firsts.append(runs[0])
        seconds += [r for r in runs[1:] if r not in seconds]  # a deterministic rerun adds nothing
    across = [distance(a, b) for a in firsts for b in seconds]
    within = [distance(a, b) for a, b in itertools.combinations(seconds, 2)]
    p_values = permutation_p_values(firsts + seconds, len(firsts))
    print(f"first variant: {len(firsts)} runs; second: {len(seconds)} distinct runs; "
          f"{len(across)} pairs across, {len(within)} within")
    verdict = {}
    for measure in MEASURES:
        a, w = [d[measure] for d in across], [d[measure] for d in within]
        verdict[measure] = statistics.median(a) <= statistics.median(w)
        print(f"{measure:10s} first vs second: median {statistics.median(a):.4f}, range {min(a):.4f}-{max(a):.4f}  |  "
              f"second vs second: median {statistics.median(w):.4f}, range {min(w):.4f}-{max(w):.4f}")
    print("VERDICT", verdict, "within the second's own spread:", all(verdict.values()))
    print("PERMUTATION p", {m: round(p, 3) for m, p in p_values.items()}, "told apart (p < 0.05):",
          any(p < 0.05 for p in p_values.values()))


if __name__ == "__main__":
    main()
