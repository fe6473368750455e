"""Is P(<CALL>) a calibrated confidence? Scores of P(<CALL>) as a predictor of "the SLM's own greedy token
is wrong" on held-out text.

At every position of a held-out window the SLM gives P(<CALL>) and its greedy token with <CALL> excluded
(what it would write itself); the event is `wrong` = that token differs from the text's next token.
- `auroc(scores, labels)`: the probability that a random wrong position gets a higher P(<CALL>) than a
  random right one (ties count 1/2) — ranking quality, independent of scale;
- `ece(probs, labels, n_bins)`: expected calibration error of P(<CALL>) read as P(wrong): the
  token-weighted mean |mean P(<CALL>) - share wrong| over equal-width bins of P(<CALL>).
Both are reported on factual and non-factual positions (spaCy flags of the next token, `memlm tag`), with
95% intervals from resampling whole windows (`train.evaluation.stats.bootstrap_ci`).
"""
from __future__ import annotations

import numpy as np
import torch

from train.evaluation.stats import Interval, bootstrap_ci


def auroc(scores, labels) -> float:
    """Area under the ROC curve of `scores` for binary `labels` (Mann-Whitney U with average ranks for
    ties). NaN when only one class is present."""
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(labels).astype(bool)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(s, kind="mergesort")
    ranks = np.empty(len(s), dtype=np.float64)
    sorted_s = s[order]
    # average rank (1-based) of each run of equal scores
    starts = np.flatnonzero(np.r_[True, sorted_s[1:] != sorted_s[:-1]])
    ends = np.r_[starts[1:], len(s)]
    avg = (starts + ends + 1) / 2.0
    ranks[order] = np.repeat(avg, ends - starts)
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def ece(probs, labels, n_bins: int = 10) -> float:
    """Expected calibration error of probabilities `probs` for binary outcomes `labels`: sum over equal-width
    bins of [0, 1] (the last one closed) of (tokens in bin / tokens) * |mean prob - mean outcome|."""
    p = np.asarray(probs, dtype=np.float64)
    y = np.asarray(labels, dtype=np.float64)
    if len(p) == 0:
        return float("nan")
    b = np.minimum((p * n_bins).astype(np.int64), n_bins - 1)
    n = np.bincount(b, minlength=n_bins)
    sp = np.bincount(b, weights=p, minlength=n_bins)
    sy = np.bincount(b, weights=y, minlength=n_bins)
    nz = n > 0
    return float(np.sum(np.abs(sp[nz] - sy[nz])) / len(p))


def reliability(probs, labels, n_bins: int = 10) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(mean prob, share of outcomes, count) per equal-width bin (NaN for empty bins), for a diagram."""
    p, y = np.asarray(probs, dtype=np.float64), np.asarray(labels, dtype=np.float64)
    b = np.minimum((p * n_bins).astype(np.int64), n_bins - 1)
    n = np.bincount(b, minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        return (np.bincount(b, weights=p, minlength=n_bins) / n, np.bincount(b, weights=y, minlength=n_bins) / n, n)


@torch.no_grad()
def positions(scorer, tokens: np.ndarray, windows: np.ndarray, factual: np.ndarray, call_id: int,
              paths: np.ndarray | None = None, batch_size: int = 32, max_windows: int | None = None) -> dict:
    """Per predicted position of each window (not its first token): p_call (float32), wrong (bool),
    factual (bool: the next token is factual), window (int64). `scorer`: train.lacy.score.Scorer."""
    n_win = len(windows) - 1 if max_windows is None else min(len(windows) - 1, max_windows)
    out = {"p_call": [], "wrong": [], "factual": [], "window": []}
    for w0 in range(0, n_win, batch_size):
        ws = list(range(w0, min(w0 + batch_size, n_win)))
        spans = [(int(windows[w]), min(int(windows[w + 1]), int(windows[w]) + scorer.max_len)) for w in ws]
        T = max(e - s for s, e in spans)
        ids = np.zeros((len(ws), T), dtype=np.int64)
        for r, (s, e) in enumerate(spans):
            ids[r, :e - s] = tokens[s:e]
        mp = None if paths is None else torch.from_numpy(np.asarray(paths[ws], dtype=np.int64)).to(scorer.device)
        logits = scorer.logits(torch.from_numpy(ids).to(scorer.device), mp)[:, :-1].float()
        p_call = logits.softmax(-1)[..., call_id]
        logits[..., call_id] = float("-inf")
        greedy = logits.argmax(-1).cpu().numpy()
        p_call = p_call.cpu().numpy()
        for r, (s, e) in enumerate(spans):
            n = e - s - 1
            if n <= 0:
                continue
            out["p_call"].append(p_call[r, :n])
            out["wrong"].append(greedy[r, :n] != tokens[s + 1:e])
            out["factual"].append(np.asarray(factual[s + 1:e], dtype=bool))
            out["window"].append(np.full(n, ws[r], dtype=np.int64))
    return {k: np.concatenate(v) if v else np.zeros(0) for k, v in out.items()}


def summarize(pos: dict, n_bins: int = 10, n_boot: int = 200, seed: int = 0) -> dict:
    """AUROC and ECE (with 95% intervals over windows), share wrong, mean P(<CALL>) and a reliability
    table, on all / factual / non-factual positions."""
    out = {}
    for name, keep in (("all", np.ones(len(pos["p_call"]), dtype=bool)), ("factual", pos["factual"]),
                       ("non_factual", ~pos["factual"])):
        p, y, w = pos["p_call"][keep], pos["wrong"][keep], pos["window"][keep]
        if len(p) == 0:
            out[name] = {"n": 0}
            continue
        wins, inv = np.unique(w, return_inverse=True)
        groups = [np.flatnonzero(inv == g) for g in range(len(wins))]

        def on(idx, fn):
            sel = np.concatenate([groups[int(i)] for i in idx])
            return fn(p[sel], y[sel])

        items = np.arange(len(groups), dtype=np.float64)
        a = bootstrap_ci(items, stat=lambda i: on(i, auroc), n_boot=n_boot, seed=seed)
        e = bootstrap_ci(items, stat=lambda i: on(i, lambda pp, yy: ece(pp, yy, n_bins)), n_boot=n_boot, seed=seed)
        mp, fy, cnt = reliability(p, y, n_bins)
        out[name] = {"n": int(len(p)), "windows": len(groups), "auroc": a.to_dict(), "ece": e.to_dict(),
                     "wrong_rate": float(y.mean()), "mean_p_call": float(p.mean()),
                     "reliability": {"mean_p": _list(mp), "wrong": _list(fy), "n": cnt.tolist()}}
    return out


def _list(a) -> list:
    return [None if not np.isfinite(x) else float(x) for x in a]


def interval(d: dict) -> Interval:
    return Interval(d["point"], d["lo"], d["hi"])
