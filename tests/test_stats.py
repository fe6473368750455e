"""train/evaluation/stats.py on cases with known answers."""
import math

import numpy as np
import pytest

from train.evaluation.stats import bootstrap_ci, paired_diff_ci, paired_ratio_diff_ci, ratio_ci, seed_ci


def test_bootstrap_mean_matches_normal_theory():
    x = np.random.default_rng(1).normal(size=400)
    ci = bootstrap_ci(x)
    half = 1.96 * x.std(ddof=1) / math.sqrt(len(x))  # ~0.098
    assert ci.point == pytest.approx(x.mean())
    assert (ci.hi - ci.lo) / 2 == pytest.approx(half, rel=0.1)
    assert ci.lo < ci.point < ci.hi


def test_binary_accuracy_interval_and_reproducible():
    acc = np.array([1] * 90 + [0] * 10)
    ci = bootstrap_ci(acc)
    assert ci.point == 0.9
    assert 0.83 <= ci.lo <= 0.86 and 0.94 <= ci.hi <= 0.96  # Wald: 0.9 +- 0.059
    assert bootstrap_ci(acc) == ci  # seeded


def test_paired_diff_cancels_item_difficulty():
    rng = np.random.default_rng(0)
    difficulty = rng.normal(scale=5.0, size=300)
    a = difficulty + 0.2 + rng.normal(scale=0.1, size=300)
    b = difficulty + rng.normal(scale=0.1, size=300)
    paired = paired_diff_ci(a, b)
    assert paired.excludes_zero() and paired.point == pytest.approx(0.2, abs=0.03)
    # unpaired intervals of the two means overlap completely: the pairing is what shows the effect
    ia, ib = bootstrap_ci(a), bootstrap_ci(b)
    assert ia.lo < ib.hi and ib.lo < ia.hi
    same = paired_diff_ci(a, a)
    assert same == (0.0, 0.0, 0.0)


def test_ratio_ci_groups():
    # 10 people: 5 with 10/10 correct facts, 5 with 0/10: FactScore 0.5; resampling people (not facts)
    num = [1] * 50 + [0] * 50
    den = [1] * 100
    groups = np.repeat(np.arange(10), 10)
    by_person = ratio_ci(num, den, groups)
    by_fact = ratio_ci(num, den)
    assert by_person.point == by_fact.point == 0.5
    assert (by_person.hi - by_person.lo) > 2 * (by_fact.hi - by_fact.lo)  # correlated facts: wider
    d = paired_ratio_diff_ci(num, den, num, den, groups)
    assert d == (0.0, 0.0, 0.0)


def test_seed_ci_student_t():
    ci = seed_ci([1.0, 2.0, 3.0])
    assert ci.point == 2.0
    assert ci.hi - 2.0 == pytest.approx(4.303 * 1.0 / math.sqrt(3), rel=1e-6)
    assert math.isnan(seed_ci([1.0]).lo)
    with pytest.raises(ValueError):
        bootstrap_ci([])
