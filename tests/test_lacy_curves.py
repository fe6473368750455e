"""Call-rate curves (interpolation, area, people bootstrap) and calibration metrics on hand-made cases."""
import math

import numpy as np
import pytest

from train.lacy.calibration import auroc, ece, reliability, summarize
from train.lacy.curves import Sweep, area, at_rate, matched, matched_diff


# ---- curves ------------------------------------------------------------------------------------------
def test_at_rate_interpolates_and_never_extrapolates():
    rates, fs = [0.0, 0.1, 0.3], [0.4, 0.6, 0.9]
    assert at_rate(rates, fs, 0.05) == pytest.approx(0.5)
    assert at_rate(rates, fs, 0.2) == pytest.approx(0.75)
    assert at_rate(rates, fs, 0.1) == pytest.approx(0.6)
    assert at_rate(list(reversed(rates)), list(reversed(fs)), 0.2) == pytest.approx(0.75)  # order-free
    assert math.isnan(at_rate(rates, fs, 0.31)) and math.isnan(at_rate([0.05, 0.2], [1, 1], 0.0))
    # equal rates are merged (mean), NaN points ignored
    assert at_rate([0.0, 0.1, 0.1, 0.2, 0.15], [0.0, 0.4, 0.6, 1.0, float("nan")], 0.1) == pytest.approx(0.5)


def test_area_is_mean_of_curve():
    # a line from (0, 0.2) to (0.2, 0.6): mean over [0, 0.2] = 0.4, over [0.1, 0.2] = 0.5
    assert area([0.0, 0.2], [0.2, 0.6], 0.0, 0.2) == pytest.approx(0.4)
    assert area([0.0, 0.2], [0.2, 0.6], 0.1, 0.2) == pytest.approx(0.5)
    # a tent: (0,0) (0.1,1) (0.2,0): area 0.1 over width 0.2 -> 0.5
    assert area([0.0, 0.1, 0.2], [0.0, 1.0, 0.0], 0.0, 0.2) == pytest.approx(0.5)
    assert math.isnan(area([0.0, 0.15], [0.5, 0.5], 0.0, 0.2))  # the curve does not reach 0.2
    with pytest.raises(ValueError):
        area([0, 1], [0, 1], 0.2, 0.2)


def _sweep(seed=0, n=40, shift=0.0):
    """Two thresholds; person j states 4 facts, the cascade at tau 0 calls 30% of 10 decisions."""
    rng = np.random.default_rng(seed)
    rows = []
    for j in range(n):
        for tau, calls, p in ((1.1, 0, 0.5 + shift), (0.0, 3, 0.8 + shift)):
            rows.append({"person": j, "tau": tau, "correct": rng.binomial(4, min(p, 1)), "stated": 4,
                         "calls": calls, "decisions": 10})
    return Sweep.from_rows(rows, [1.1, 0.0], list(range(n)))


def test_sweep_pooling_and_matched_intervals():
    sw = _sweep()
    c = sw.curve()
    assert c["rate"].tolist() == pytest.approx([0.0, 0.3]) and c["facts_per_bio"].tolist() == [4.0, 4.0]
    exp = (c["factscore"][0] + c["factscore"][1]) / 2  # halfway in rate -> halfway in FactScore
    m = matched(sw, 0.15, n_boot=300)
    assert m.point == pytest.approx(exp) and m.lo < m.point < m.hi and m.hi - m.lo < 0.2
    assert matched(sw, 0.15, what="facts_per_bio", n_boot=50).point == pytest.approx(4.0)
    # paired difference of a sweep with itself is exactly 0; a clearly better sweep is above 0
    d0 = matched_diff(sw, sw, 0.15, n_boot=100)
    assert d0.point == 0 and d0.lo == 0 and d0.hi == 0
    d = matched_diff(_sweep(shift=0.15), sw, 0.15, n_boot=300)
    assert d.point > 0.05 and d.lo > 0
    assert math.isnan(matched(sw, 0.5, n_boot=20).point)  # beyond the sweep


# ---- calibration -------------------------------------------------------------------------------------
def test_auroc_hand_made():
    assert auroc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == pytest.approx(0.75)  # sklearn's docstring example
    assert auroc([0.5, 0.5], [0, 1]) == pytest.approx(0.5)  # a tie counts one half
    assert auroc([0.9, 0.8, 0.1], [1, 1, 0]) == 1.0 and auroc([0.1, 0.2, 0.9], [1, 1, 0]) == 0.0
    assert math.isnan(auroc([0.1, 0.2], [1, 1]))


def test_auroc_matches_sklearn_with_ties():
    sk = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(0)
    s = np.round(rng.random(500), 1)  # many ties
    y = rng.random(500) < s
    assert auroc(s, y) == pytest.approx(sk.roc_auc_score(y, s), abs=1e-12)


def test_ece_hand_made():
    # bins 0.1 and 0.9 (10 bins): |0.1 - 0.5| * 2/4 + |0.9 - 1.0| * 2/4 = 0.25
    assert ece([0.1, 0.1, 0.9, 0.9], [0, 1, 1, 1]) == pytest.approx(0.25)
    assert ece([0.0, 1.0], [0, 1]) == 0.0  # p = 1.0 falls in the last bin
    assert ece([0.3] * 10, [1] * 3 + [0] * 7) == pytest.approx(0.0)  # calibrated in its bin
    mp, fy, n = reliability([0.1, 0.1, 0.9, 0.9], [0, 1, 1, 1])
    assert n[1] == 2 and fy[1] == 0.5 and mp[9] == pytest.approx(0.9) and np.isnan(mp[5])


def test_summarize_split_by_factual():
    rng = np.random.default_rng(1)
    n = 4000
    factual = rng.random(n) < 0.3
    wrong = np.where(factual, rng.random(n) < 0.7, rng.random(n) < 0.2)
    # informative on factual positions only
    p = np.where(factual, np.where(wrong, 0.8, 0.2), 0.3) + rng.normal(0, 0.01, n)
    out = summarize({"p_call": np.clip(p, 0, 1), "wrong": wrong, "factual": factual,
                     "window": np.arange(n) // 20}, n_boot=50)
    assert out["factual"]["auroc"]["point"] > 0.95 and abs(out["non_factual"]["auroc"]["point"] - 0.5) < 0.1
    f = out["factual"]["auroc"]
    assert f["lo"] <= f["point"] <= f["hi"]
    assert out["all"]["n"] == n and out["factual"]["n"] + out["non_factual"]["n"] == n
