"""Where the GPU waits inside `train()`: the idle time between its kernels, step by step.

Used by `bench/bench_train.py --gaps`: train() runs under the profiler (GPU activity only, so the host is not
slowed by it), steps are cut at the optimizer's kernel, and for each step after the first two this prints the
step's length, the GPU's busy time and the longest idle stretches with the kernels on either side.
"""

from __future__ import annotations

import json

OPTIMIZER_KERNEL = "Optimizer"  # bitsandbytes' update kernels: kOptimizer..., one launch per step over a flat buffer


def _intervals(prof) -> list[tuple[float, float, str]]:
    spans = []
    for e in prof.events():
        if e.device_type.name == "CUDA" and e.time_range.elapsed_us() > 0:
            spans.append((e.time_range.start / 1e3, e.time_range.end / 1e3, e.name))
    return sorted(spans)


def step_gaps(prof, top: int = 6) -> list[dict]:
    """One dict per step (optimizer kernel to optimizer kernel): ms of wall, busy and idle, and the longest gaps."""
    spans = _intervals(prof)
    marks = [i for i, (_, _, name) in enumerate(spans) if OPTIMIZER_KERNEL in name]
    # several launches in a row (a per-tensor optimizer) count as one mark: the last of each run
    ends = [i for j, i in enumerate(marks) if j + 1 == len(marks) or marks[j + 1] != i + 1]
    steps = []
    for a, b in zip(ends, ends[1:]):
        window = spans[a + 1:b + 1]
        start, busy, reach, gaps, previous = spans[a][1], 0.0, spans[a][1], [], spans[a][2]
        for s, e, name in window:
            if s > reach:
                gaps.append((s - reach, previous, name))
            busy += max(0.0, e - max(s, reach))
            reach = max(reach, e)
            previous = name
        wall = reach - start
        gaps.sort(reverse=True)
        steps.append({"wall_ms": round(wall, 1), "busy_ms": round(busy, 1), "idle_ms": round(wall - busy, 1),
                      "gaps": [(round(g, 2), p[:60], n[:60]) for g, p, n in gaps[:top]]})
    return steps


def print_gaps(prof) -> None:
    for i, step in enumerate(step_gaps(prof)):
        if i >= 2:
            print("GAPS", json.dumps(step), flush=True)
