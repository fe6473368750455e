"""95% intervals for every reported number and every difference (DESIGN: "Evidence").

- `bootstrap_ci(values)`: percentile bootstrap of a statistic over independent items (probes, tokens).
- `paired_diff_ci(a, b)`: the difference of means of two models scored on the *same* items, resampling
  items jointly (a paired bootstrap), so shared item difficulty cancels out.
- `ratio_ci(num, den, groups)`: a ratio of sums (FactScore = correct / stated facts) with whole groups
  (people) resampled, because facts of one person are not independent.
- `seed_ci(values)`: mean and Student-t interval over runs with different seeds (headline rows).

All inputs are 1-D array-likes of equal length; results are `Interval(point, lo, hi)`. Resampling is
seeded (`seed=0` by default), so a report is reproducible.
"""
from __future__ import annotations

import math
from typing import Callable, NamedTuple, Sequence

import numpy as np

N_BOOT = 2000
# two-sided 95% Student-t critical values by degrees of freedom (1..30); 1.96 beyond
_T95 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
        2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
        2.045, 2.042]


class Interval(NamedTuple):
    """A point estimate with its 95% interval [lo, hi]."""
    point: float
    lo: float
    hi: float

    def excludes_zero(self) -> bool:
        return self.lo > 0 or self.hi < 0

    def fmt(self, spec: str = ".3f", signed: bool = False) -> str:
        s = "+" if signed else ""
        return f"{self.point:{s}{spec}} [{self.lo:{s}{spec}}, {self.hi:{s}{spec}}]"

    def to_dict(self) -> dict:
        return {"point": self.point, "lo": self.lo, "hi": self.hi}


def _check(*arrays) -> list[np.ndarray]:
    out = [np.asarray(a, dtype=np.float64).reshape(-1) for a in arrays]
    n = len(out[0])
    if n == 0:
        raise ValueError("no items to compute an interval over")
    if any(len(a) != n for a in out):
        raise ValueError(f"arrays of different lengths: {[len(a) for a in out]}")
    return out


def bootstrap_ci(values: Sequence[float], stat: Callable[[np.ndarray], float] = np.mean,
                 n_boot: int = N_BOOT, seed: int = 0, alpha: float = 0.05) -> Interval:
    """Percentile bootstrap interval of `stat` over independent items (e.g. probe correctness 0/1)."""
    (x,) = _check(values)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(x), size=(n_boot, len(x)))
    boots = np.array([stat(x[i]) for i in idx]) if stat is not np.mean else x[idx].mean(axis=1)
    lo, hi = np.quantile(boots, [alpha / 2, 1 - alpha / 2])
    return Interval(float(stat(x)), float(lo), float(hi))


def paired_diff_ci(a: Sequence[float], b: Sequence[float], n_boot: int = N_BOOT, seed: int = 0,
                   alpha: float = 0.05) -> Interval:
    """Interval of mean(a) - mean(b) for two models scored on the same items (paired bootstrap)."""
    a, b = _check(a, b)
    return bootstrap_ci(a - b, n_boot=n_boot, seed=seed, alpha=alpha)


def ratio_ci(num: Sequence[float], den: Sequence[float], groups: Sequence | None = None, n_boot: int = N_BOOT,
             seed: int = 0, alpha: float = 0.05) -> Interval:
    """Interval of sum(num) / sum(den), resampling whole groups (e.g. the facts of one person) when given,
    else items. Items are rows: num[i], den[i] belong to group groups[i]."""
    num, den = _check(num, den)
    if groups is None:
        gnum, gden = num, den
    else:
        keys, inv = np.unique(np.asarray(groups), return_inverse=True)
        gnum = np.bincount(inv, weights=num, minlength=len(keys))
        gden = np.bincount(inv, weights=den, minlength=len(keys))
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(gnum), size=(n_boot, len(gnum)))
    bn, bd = gnum[idx].sum(axis=1), gden[idx].sum(axis=1)
    ok = bd > 0
    point = float(gnum.sum() / gden.sum()) if gden.sum() > 0 else float("nan")
    if not ok.any():
        return Interval(point, float("nan"), float("nan"))
    lo, hi = np.quantile(bn[ok] / bd[ok], [alpha / 2, 1 - alpha / 2])
    return Interval(point, float(lo), float(hi))


def paired_ratio_diff_ci(num_a, den_a, num_b, den_b, groups: Sequence, n_boot: int = N_BOOT, seed: int = 0,
                         alpha: float = 0.05) -> Interval:
    """Interval of sum(num_a)/sum(den_a) - sum(num_b)/sum(den_b) with the same groups resampled for both
    (e.g. FactScore of two cascades on the same people)."""
    num_a, den_a, num_b, den_b = _check(num_a, den_a, num_b, den_b)
    keys, inv = np.unique(np.asarray(groups), return_inverse=True)
    g = [np.bincount(inv, weights=v, minlength=len(keys)) for v in (num_a, den_a, num_b, den_b)]
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(keys), size=(n_boot, len(keys)))
    na, da, nb, db = (x[idx].sum(axis=1) for x in g)
    ok = (da > 0) & (db > 0)
    point = float(g[0].sum() / g[1].sum() - g[2].sum() / g[3].sum())
    lo, hi = np.quantile(na[ok] / da[ok] - nb[ok] / db[ok], [alpha / 2, 1 - alpha / 2])
    return Interval(point, float(lo), float(hi))


def seed_ci(values: Sequence[float]) -> Interval:
    """Mean over seeds with a 95% Student-t interval (NaN bounds for a single seed: its spread is unknown)."""
    (x,) = _check(values)
    m = float(x.mean())
    if len(x) < 2:
        return Interval(m, float("nan"), float("nan"))
    t = _T95[len(x) - 2] if len(x) - 1 <= len(_T95) else 1.96
    half = t * float(x.std(ddof=1)) / math.sqrt(len(x))
    return Interval(m, m - half, m + half)
