"""FactScore against the *generation-time* call rate: one curve per SLM from a sweep of the threshold τ.

A sweep holds, per τ and per person (or per lead on real text), the facts stated and correct, the calls
and the SLM's decisions. A curve point pools them: call rate = calls / decisions, FactScore = correct /
stated, facts per bio = stated / bios. Rules are compared where their budgets are equal:

- `at_rate(rates, values, r)`: the curve at call rate r by linear interpolation between its two nearest
  points (NaN outside the range the sweep reached: never extrapolated);
- `area(rates, values, lo, hi)`: the mean of the curve over [lo, hi] (area / width; NaN if not covered).

Intervals (`matched`, `matched_diff`) resample whole people with `train.evaluation.stats.bootstrap_ci`:
the same resample for every τ, and for both SLMs of a difference (the same people were prompted).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from train.evaluation.stats import Interval, bootstrap_ci


def _sorted_curve(rates, values) -> tuple[np.ndarray, np.ndarray]:
    """Points sorted by rate, NaN values dropped, equal rates merged (mean value)."""
    r, v = np.asarray(rates, dtype=np.float64), np.asarray(values, dtype=np.float64)
    ok = np.isfinite(r) & np.isfinite(v)
    r, v = r[ok], v[ok]
    if len(r) == 0:
        return r, v
    uniq, inv = np.unique(r, return_inverse=True)
    return uniq, np.bincount(inv, weights=v) / np.bincount(inv)


def at_rate(rates, values, target: float) -> float:
    """Value of the piecewise-linear curve through (rates[i], values[i]) at `target`; NaN when `target`
    lies outside [min(rates), max(rates)]."""
    r, v = _sorted_curve(rates, values)
    if len(r) == 0 or target < r[0] - 1e-12 or target > r[-1] + 1e-12:
        return float("nan")
    return float(np.interp(target, r, v))


def area(rates, values, lo: float, hi: float) -> float:
    """Mean of the piecewise-linear curve over [lo, hi] (its area divided by hi - lo); NaN when the curve
    does not cover [lo, hi]."""
    if not hi > lo:
        raise ValueError(f"area: need hi > lo, got [{lo}, {hi}]")
    r, v = _sorted_curve(rates, values)
    if len(r) == 0 or r[0] > lo + 1e-12 or r[-1] < hi - 1e-12:
        return float("nan")
    inner = (r > lo) & (r < hi)
    xs = np.concatenate([[lo], r[inner], [hi]])
    ys = np.interp(xs, r, v)
    return float(np.sum((xs[1:] - xs[:-1]) * (ys[1:] + ys[:-1]) / 2) / (hi - lo))


@dataclass
class Sweep:
    """Per-person sums of one SLM's τ sweep: `sums[name]` arrays [n_tau, n_people] for correct, stated,
    calls, decisions (and optionally nll, nll_tokens: a fluency measure), people in a fixed order shared
    by every SLM compared; `bios` [n_people] = generations per person (1 for bios; clozes per lead)."""
    taus: list
    sums: dict
    bios: np.ndarray

    KEYS = ("correct", "stated", "calls", "decisions")
    OPTIONAL = ("nll", "nll_tokens")

    @classmethod
    def from_rows(cls, rows: list[dict], taus: list, people: list) -> "Sweep":
        """From per-generation rows with keys person, tau, correct, stated, calls, decisions (and nll,
        nll_tokens when every row has them)."""
        ti = {t: i for i, t in enumerate(taus)}
        pi = {p: i for i, p in enumerate(people)}
        keys = list(cls.KEYS) + [k for k in cls.OPTIONAL if rows and all(k in r for r in rows)]
        sums = {k: np.zeros((len(taus), len(people))) for k in keys}
        n = np.zeros((len(taus), len(people)))
        for r in rows:
            i, j = ti[r["tau"]], pi[r["person"]]
            for k in keys:
                sums[k][i, j] += r[k]
            n[i, j] += 1
        return cls(list(taus), sums, n.max(axis=0))

    def curve(self, idx=None) -> dict[str, np.ndarray]:
        """Pooled points over people `idx` (all by default), per τ: rate, factscore, facts_per_bio (and
        nll = mean negative log-likelihood per token when the sweep has it)."""
        idx = slice(None) if idx is None else np.asarray(idx, dtype=np.int64)
        s = {k: v[:, idx].sum(axis=1) for k, v in self.sums.items()}
        ratio = lambda a, b: np.where(b > 0, a / np.maximum(b, 1e-300), np.nan)  # noqa: E731
        out = {"rate": s["calls"] / np.maximum(s["decisions"], 1), "factscore": ratio(s["correct"], s["stated"]),
               "facts_per_bio": s["stated"] / max(self.bios[idx].sum(), 1)}
        if "nll" in s:
            out["nll"] = ratio(s["nll"], s["nll_tokens"])
        return out

    def at(self, target: float, what: str = "factscore", idx=None) -> float:
        c = self.curve(idx)
        return at_rate(c["rate"], c[what], target)

    def area(self, lo: float, hi: float, idx=None) -> float:
        c = self.curve(idx)
        return area(c["rate"], c["factscore"], lo, hi)

    @property
    def n_people(self) -> int:
        return self.bios.shape[0]


def _people(sweep: Sweep) -> np.ndarray:
    return np.arange(sweep.n_people, dtype=np.float64)


def matched(sweep: Sweep, target: float, what: str = "factscore", n_boot: int = 1000, seed: int = 0) -> Interval:
    """`what` (factscore | facts_per_bio | nll) at generation call rate `target`, 95% interval over people."""
    return bootstrap_ci(_people(sweep), stat=lambda i: sweep.at(target, what, i), n_boot=n_boot, seed=seed)


def area_ci(sweep: Sweep, lo: float, hi: float, n_boot: int = 1000, seed: int = 0) -> Interval:
    return bootstrap_ci(_people(sweep), stat=lambda i: sweep.area(lo, hi, i), n_boot=n_boot, seed=seed)


def matched_diff(a: Sweep, b: Sweep, target: float, n_boot: int = 1000, seed: int = 0) -> Interval:
    """FactScore(a) - FactScore(b) at call rate `target`, people resampled jointly (paired)."""
    if a.n_people != b.n_people:
        raise ValueError(f"matched_diff: sweeps over different people ({a.n_people} vs {b.n_people})")
    return bootstrap_ci(_people(a), stat=lambda i: a.at(target, idx=i) - b.at(target, idx=i), n_boot=n_boot,
                        seed=seed)


def tau_name(tau) -> str:
    return "argmax" if tau is None else f"{tau:g}"


def _num(v) -> float | None:
    return None if v != v else float(v)


def compare(rows: list[dict], labels: list[str], rates: list[float], span: tuple[float, float],
            n_boot: int = 1000, seed: int = 0) -> tuple[dict, dict]:
    """({label: curve}, {"a - b": {rate: interval}}) for labels with a τ sweep. Rows: one per generation
    with label, tau, person and the Sweep counts. People = every person of the rows in sorted order, so
    paired differences resample the same people. A curve: its points (taus, rate, factscore, facts_per_bio
    [, nll]), every metric at the matched rates and the FactScore area over `span`, with intervals."""
    people = sorted({r["person"] for r in rows})
    out, sweeps = {}, {}
    for label in labels:
        mine = [r for r in rows if r["label"] == label]
        taus = list(dict.fromkeys(r["tau"] for r in mine))
        sw = sweeps[label] = Sweep.from_rows(mine, taus, people)
        c = sw.curve()
        metrics = [m for m in ("factscore", "facts_per_bio", "nll") if m in c]
        out[label] = {"taus": [tau_name(t) for t in taus], "rate": c["rate"].tolist(),
                      **{m: [_num(v) for v in c[m]] for m in metrics},
                      "matched": {f"{r:g}": {m: matched(sw, r, m, n_boot=n_boot, seed=seed).to_dict() for m in metrics}
                                  for r in rates},
                      "area": {"range": list(span),
                               **area_ci(sw, span[0], span[1], n_boot=n_boot, seed=seed).to_dict()}}
    diffs = {}
    for i, a in enumerate(labels):
        for b in labels[i + 1:]:
            diffs[f"{a} - {b}"] = {f"{r:g}": matched_diff(sweeps[a], sweeps[b], r, n_boot=n_boot, seed=seed).to_dict()
                                   for r in rates}
    return out, diffs
