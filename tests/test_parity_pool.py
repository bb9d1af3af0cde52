"""bench/parity_pool.py's permutation test: curves drawn alike cannot be told apart; an offset can."""

import random

from bench import parity_pool


def noisy_curves(count: int, seed: int, offset: float = 0.0) -> list[list[float]]:
    """`count` 50-step curves falling from 1.3 to about 0.06, each step changed by a seeded 2% (a run's own spread),
    the last twenty steps raised by `offset` (relative)."""
    rng = random.Random(seed)
    base = [0.06 + 1.24 * 0.85 ** step for step in range(50)]
    return [[value * (1 + 0.02 * rng.gauss(0, 1)) * (1 + offset * (step >= 30)) for step, value in enumerate(base)]
            for _ in range(count)]


def test_curves_drawn_like_the_twins_are_not_told_apart():
    p = parity_pool.permutation_p_values(noisy_curves(3, seed=1) + noisy_curves(9, seed=2), firsts=3)
    assert set(p) == {"max_abs", "last10_rel", "median_rel"}
    assert all(value > 0.05 for value in p.values()), p


def test_a_tail_offset_is_told_apart():
    p = parity_pool.permutation_p_values(noisy_curves(3, seed=1, offset=0.08) + noisy_curves(9, seed=2), firsts=3)
    assert p["last10_rel"] < 0.05  # of 220 ways to call 3 of 12 curves "first", 3 give a gap this large
    assert p["max_abs"] > 0.05  # the offset is at the tail, where losses are small: max abs comes from early steps
