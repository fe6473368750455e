"""FactScore of cascades on the bios knowledge base: τ sweeps, curves at matched call rates, speed.

- `evaluate(gen_fn, people, ...)`: one bio per person with `gen_fn(prompts) -> [[CascadeOutput] per tau]`,
  parsed against the knowledge base (data/factscore.py); one row per (person, τ) with the counts the
  curves need (correct, stated, calls, decisions).
- `curves(rows, ...)`: per label, the τ sweep as points (generation call rate, FactScore, facts per bio),
  the curve at matched call rates and its area with 95% intervals over people, and paired differences
  between labels (train/lacy/curves.py).
- `speed_check(cascade, prompts, taus)`: prompts/s of the one-prompt reference loop and of the batched
  cascade on the same prompts, and whether they wrote the same texts.
"""
from __future__ import annotations

import os
import time

from train.lacy.curves import compare as curves, tau_name  # noqa: F401  (re-exported)


def parse_slm(spec: str) -> tuple[str, str]:
    """"LABEL=RUN" or "RUN" (label = the run's directory name)."""
    if "=" in spec and not os.path.exists(spec):
        label, path = spec.split("=", 1)
        return label, path
    return os.path.basename(spec.rstrip("/")), spec


def check_slm_labels(specs: list[str]) -> None:
    """ConfigError naming --slm when a label is empty or two SLMs share one (results are keyed by label:
    the second would silently replace the first)."""
    from model.errors import ConfigError

    seen = {}
    for spec in specs:
        label, path = parse_slm(spec)
        if not label or not path:
            raise ConfigError(f"--slm {spec!r}: give LABEL=RUN or RUN (an empty label or run is not allowed)")
        if label in seen:
            raise ConfigError(f"--slm {spec!r}: label {label!r} is already used by --slm {seen[label]!r}; give each "
                              "SLM its own label (LABEL=RUN)")
        seen[label] = spec


def evaluate(gen_fn, people, parser, prompt_fmt: str, label: str, taus: list, forced_call_rate=None,
             log=print) -> list[dict]:
    """Rows (one per person and τ) of gen_fn(prompts) -> outputs[i][j] for person i at taus[j]."""
    from data.factscore import fact_dicts

    t0 = time.time()
    prompts = [prompt_fmt.format(name=p["name"]) for p, _ in people]
    outs = gen_fn(prompts)
    rows = []
    for (person, bucket), prompt, per_tau in zip(people, prompts, outs):
        for tau, out in zip(taus, per_tau):
            facts = parser.facts(out.text, person, start=len(prompt), spans=out.spans)
            rows.append({"label": label, "tau": tau, "person": person["id"], "name": person["name"],
                         "bucket": bucket, "text": out.marked(), "calls": out.calls, "slm_tokens": out.slm_tokens,
                         "decisions": out.calls + out.slm_tokens, "large_tokens": out.large_tokens,
                         "slm_seconds": out.slm_seconds, "large_seconds": out.large_seconds,
                         "facts": fact_dicts(facts), "stated": len(facts), "correct": sum(f.correct for f in facts),
                         "forced_call_rate": forced_call_rate})
    log(f"  {label}: {len(people)} bios x {len(taus)} thresholds in {time.time() - t0:.0f}s")
    return rows


def speed_check(cascade, prompts: list[str], taus: list, max_new_tokens: int, stop: str | None = None,
                batch_size: int = 64) -> dict:
    """Generations/s of `Cascade.generate` (one prompt and one τ at a time) and of `generate_batch` (all
    prompts and taus at once), same prompts, same run; `identical` = share of equal outputs."""
    t = time.perf_counter()
    ref = []
    for p in prompts:
        row = []
        for tau in taus:
            cascade.tau = tau
            row.append(cascade.generate(p, max_new_tokens, stop=stop))
        ref.append(row)
    before = time.perf_counter() - t
    t = time.perf_counter()
    fast = cascade.generate_batch(prompts, max_new_tokens, stop=stop, taus=taus, batch_size=batch_size)
    after = time.perf_counter() - t
    pairs = [(a, b) for ra, rb in zip(ref, fast) for a, b in zip(ra, rb)]
    same = sum(a.text == b.text and a.spans == b.spans for a, b in pairs)
    n = len(pairs)
    return {"prompts": len(prompts), "taus": [tau_name(t) for t in taus], "generations": n,
            "one_prompt_seconds": before, "batched_seconds": after,
            "one_prompt_per_s": n / before, "batched_per_s": n / after, "speedup": before / after,
            "identical": same / n}


def plot_curves(curve: dict, path: str, title: str = "FactScore vs generation-time call rate",
                rates: list[float] = (), ylabel: str = "FactScore (precision of stated facts)",
                second: tuple[str, str] = ("facts_per_bio", "facts stated per bio")) -> str:
    """Two panels against the generation call rate, one line per label: FactScore (or `ylabel`'s metric)
    with the matched-rate intervals as error bars, and the `second` metric (key, label)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from train.experiments.report import save_figure

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for i, (label, c) in enumerate(curve.items()):
        col = f"C{i % 10}"
        pts = sorted((r, f, n) for r, f, n in zip(c["rate"], c["factscore"], c.get(second[0], c["factscore"]))
                     if f is not None and n is not None)
        ax1.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=3, color=col, label=label)
        ax2.plot([p[0] for p in pts], [p[2] for p in pts], marker="o", ms=3, color=col, label=label)
        for r, m in c["matched"].items():
            iv = m["factscore"]
            if iv["point"] == iv["point"] and iv["lo"] == iv["lo"]:
                ax1.errorbar(float(r), iv["point"], yerr=[[iv["point"] - iv["lo"]], [iv["hi"] - iv["point"]]],
                             color=col, capsize=3, lw=1)
    for r in rates:
        ax1.axvline(r, color="gray", lw=0.5, ls=":")
    ax1.set(xlabel="call rate at generation (share of SLM decisions that were <CALL>)", ylabel=ylabel, title=title)
    ax2.set(xlabel="call rate at generation", ylabel=second[1], title=second[1])
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
    ax1.legend(fontsize=7)
    return save_figure(fig, path)


def table(results: dict) -> str:
    fmt = lambda v: "n/a" if v is None else f"{v:.3f}"  # noqa: E731
    lines = ["| run | FactScore | facts/bio | call rate | leakage | leaked/bio | delegated precision | bios |",
             "|---|---|---|---|---|---|---|---|"]
    for label, r in results.items():
        lines.append(f"| {label} | {fmt(r['factscore'])} | {r['facts_per_bio']:.2f} | {r['call_rate']:.3f} | "
                     f"{fmt(r['leakage'])} | {r['leaked_per_bio']:.2f} | {fmt(r['delegated_precision'])} | "
                     f"{r['bios']} |")
    return "\n".join(lines)
