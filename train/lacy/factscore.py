"""`memlm factscore --slm RUN --large PATH --data DATA`: FactScore of the cascade on the bios knowledge base.

For people of every frequency bucket (--per-bucket each), prompt "<Name> was born" and generate; parse
the stated attributes against DATA/bios/kb.json (data/factscore.py) and report the precision of stated
facts (FactScore), facts stated per bio, call rate, and fact leakage (wrong facts the SLM stated itself,
outside delegated spans), overall and per bucket. --slm is repeatable as LABEL=RUN (e.g. one run per
selection rule at the same call rate); --slm-alone adds each SLM without calls, --large-alone the large
model writing everything. Writes OUT/factscore.json, OUT/samples.jsonl and OUT/factscore.png.
"""
from __future__ import annotations

import os
import time



def _parse_slm(spec: str) -> tuple[str, str]:
    if "=" in spec and not os.path.exists(spec):
        label, path = spec.split("=", 1)
        return label, path
    return os.path.basename(spec.rstrip("/")), spec


def evaluate(gen_fn, people, parser, prompt_fmt: str, label: str, forced_call_rate=None, log=print) -> list[dict]:
    """Run gen_fn(prompt) -> CascadeOutput for each (person, bucket); one row per bio."""
    from data.factscore import fact_dicts

    rows = []
    t0 = time.time()
    for i, (person, bucket) in enumerate(people):
        prompt = prompt_fmt.format(name=person["name"])
        out = gen_fn(prompt)
        facts = parser.facts(out.text, person, start=len(prompt), spans=out.spans)
        rows.append({"label": label, "person": person["id"], "name": person["name"], "bucket": bucket,
                     "text": out.marked(), "calls": out.calls, "slm_tokens": out.slm_tokens,
                     "large_tokens": out.large_tokens, "slm_seconds": out.slm_seconds,
                     "large_seconds": out.large_seconds, "facts": fact_dicts(facts),
                     "forced_call_rate": forced_call_rate})
        if (i + 1) % 10 == 0 or i + 1 == len(people):
            log(f"  {label}: {i + 1}/{len(people)} bios ({time.time() - t0:.0f}s)")
    return rows


def plot(results: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for label, r in results.items():
        if r["factscore"] is None:
            continue
        ax1.scatter(r["call_rate"], r["factscore"], s=40)
        ax1.annotate(label, (r["call_rate"], r["factscore"]), textcoords="offset points", xytext=(4, 4), fontsize=8)
        bs = sorted(r["by_bucket"], key=int)
        ys = [r["by_bucket"][b]["factscore"] for b in bs]
        ax2.plot([int(b) for b in bs], [float("nan") if y is None else y for y in ys], marker="o", label=label)
    ax1.set_xlabel("call rate (share of SLM decisions that were <CALL>)")
    ax1.set_ylabel("FactScore (precision of stated facts)")
    ax1.set_title("FactScore vs call rate")
    ax1.grid(alpha=0.3)
    ax2.set_xlabel("frequency bucket (0 = rarest)")
    ax2.set_ylabel("FactScore")
    ax2.set_title("FactScore by frequency bucket")
    ax2.grid(alpha=0.3)
    if ax2.get_legend_handles_labels()[0]:
        ax2.legend(fontsize=7)
    fig.tight_layout()
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, path)


def _table(results: dict) -> str:
    fmt = lambda v: "n/a" if v is None else f"{v:.3f}"  # noqa: E731
    lines = ["| run | FactScore | facts/bio | call rate | leakage | leaked/bio | delegated precision | bios |",
             "|---|---|---|---|---|---|---|---|"]
    for label, r in results.items():
        lines.append(f"| {label} | {fmt(r['factscore'])} | {r['facts_per_bio']:.2f} | {r['call_rate']:.3f} | "
                     f"{fmt(r['leakage'])} | {r['leaked_per_bio']:.2f} | {fmt(r['delegated_precision'])} | {r['bios']} |")
    return "\n".join(lines)
