"""Pool the curves of several `bench_parity.py --self-noise` logs: is the first variant as close to the second as the
second's own runs are to each other?

    python bench/parity_pool.py LOG [LOG ...]

Each LOG is the whole output of one bench_parity.py run with --self-noise: its training runs print `step k/N  loss`
lines in order, the first variant's run first, then the second variant's plain run and its perturbed runs. Over all
logs this compares every (first, second) pair of curves with every pair of the second variant's distinct curves, by
bench_parity.distance's three measures, and prints the median and range of each. `VERDICT` says, per measure,
whether the median first-to-second distance is at most the median second-to-second one: a fast path that computes
what its twin does up to bf16 roundings is one more member of the twin's own spread.
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


def main() -> None:
    firsts, seconds = [], []
    for path in sys.argv[1:]:
        runs = curves(Path(path).read_text())
        firsts.append(runs[0])
        seconds += [r for r in runs[1:] if r not in seconds]  # a deterministic rerun adds nothing
    across = [distance(a, b) for a in firsts for b in seconds]
    within = [distance(a, b) for a, b in itertools.combinations(seconds, 2)]
    print(f"first variant: {len(firsts)} runs; second: {len(seconds)} distinct runs; "
          f"{len(across)} pairs across, {len(within)} within")
    verdict = {}
    for measure in ("max_abs", "last10_rel", "median_rel"):
        a, w = [d[measure] for d in across], [d[measure] for d in within]
        verdict[measure] = statistics.median(a) <= statistics.median(w)
        print(f"{measure:10s} first vs second: median {statistics.median(a):.4f}, range {min(a):.4f}-{max(a):.4f}  |  "
              f"second vs second: median {statistics.median(w):.4f}, range {min(w):.4f}-{max(w):.4f}")
    print("VERDICT", verdict, "within the second's own spread:", all(verdict.values()))


if __name__ == "__main__":
    main()
