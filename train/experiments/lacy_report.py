"""The LaCy reproduction report (scripts/reproduce_lacy.py): FactScore tables and plots.

Nothing here computes a result: every number is read from a file a command wrote.
"""
from __future__ import annotations

import json
import os

from train.experiments.memory_report import run_params
from train.experiments.report import _fmt, _save, machine_line, markdown_table, write_text
import matplotlib.pyplot as plt  # noqa: E402  (after report.py chose the Agg backend)


def factscore_table(results: dict, selections: dict | None = None) -> str:
    """Markdown: one row per factscore label (memlm factscore's results), with the training selection of
    the label's rule when `selections` ({label: calls_<rule>.json dict}) has it."""
    fmt = lambda v: "—" if v is None else f"{v:.3f}"  # noqa: E731
    rows = []
    for label, r in results.items():
        sel = (selections or {}).get(label)
        s = (sel or {}).get("splits", {}).get("train", {})
        rows.append([label, fmt(s.get("rate")) if sel else None,
                     fmt(s.get("factual_share_delegated")) if sel else None,
                     fmt(r["factscore"]), f"{r['facts_per_bio']:.2f}", f"{r['call_rate']:.3f}", fmt(r["leakage"]),
                     f"{r['leaked_per_bio']:.2f}", fmt(r["delegated_precision"]), r["bios"]])
    return markdown_table(["run", "train call rate", "factual share of calls", "FactScore", "facts/bio",
                           "call rate (generation)", "leakage", "leaked/bio", "delegated precision", "bios"], rows)


def plot_rule_factscore(results: dict, rules: list[str], out_png: str,
                        title: str = "LaCy: cascade FactScore per selection rule") -> str:
    """Bars: FactScore of each rule's cascade (and of the same SLM alone), with the large model alone as a line."""
    import math

    fig, ax = plt.subplots(figsize=(7, 4))
    xs = list(range(len(rules)))
    val = lambda lab: (results.get(lab) or {}).get("factscore")  # noqa: E731
    nan = lambda v: float("nan") if v is None else v  # noqa: E731
    casc = [nan(val(r)) for r in rules]
    alone = [nan(val(f"{r} alone")) for r in rules]
    ax.bar([x - 0.2 for x in xs], casc, width=0.4, color="tab:blue", label="cascade (SLM + large on <CALL>)")
    ax.bar([x + 0.2 for x in xs], alone, width=0.4, color="tab:gray", label="SLM alone (<CALL> suppressed)")
    for x, v in zip(xs, casc):
        if not math.isnan(v):
            ax.text(x - 0.2, v, f"{v:.2f}", ha="center", va="bottom", fontsize=8)
    large = val("large alone")
    if large is not None:
        ax.axhline(large, color="tab:red", ls="--", label=f"large alone ({large:.2f})")
    for x, r in zip(xs, rules):
        cr = (results.get(r) or {}).get("call_rate")
        if cr is not None:
            ax.text(x - 0.2, 0.01, f"calls\n{cr:.1%}", ha="center", va="bottom", fontsize=7, color="white")
    ax.set_xticks(xs, rules)
    ax.set_ylabel("FactScore (precision of stated facts)")
    ax.set_ylim(0, 1.05)
    ax.set_title(title)
    ax.legend(fontsize=8, loc="upper right")
    return _save(fig, out_png)


def write_lacy_report(out: str, data: str, runs: dict[str, str], rules: list[str], call_rate: float, size: dict,
                      size_name: str, command: str, stage_seconds: dict[str, float],
                      commands: list[str]) -> tuple[str, list[str]]:
    """<out>/report.md for scripts/reproduce_lacy.py, from DATA/selection/calls_<rule>.json and
    <out>/factscore/factscore.json (memlm factscore). Returns (path, PNGs)."""
    selections = {}
    for rule in rules:
        path = os.path.join(data, "selection", f"calls_{rule}.json")
        if os.path.isfile(path):
            with open(path) as f:
                selections[rule] = json.load(f)
    fs_path = os.path.join(out, "factscore", "factscore.json")
    results = {}
    if os.path.isfile(fs_path):
        with open(fs_path) as f:
            results = json.load(f)["results"]
    total = sum(stage_seconds.values())
    par = {k: run_params(v) for k, v in runs.items() if os.path.isdir(v)}
    desc = ", ".join(f"`{k}` {p['non_embedding'] / 1e6:.2f}M non-embedding ({p['total'] / 1e6:.2f}M total) params"
                     for k, p in par.items())
    md = ["# Reproduction: LaCy <CALL> selection (arXiv 2602.12005), small scale", "",
          f"- command: `{command}`", f"- machine, date: {machine_line()}",
          f"- size `{size_name}`: {json.dumps(size)}; target call rate {call_rate:.0%} for every rule",
          f"- models: {desc}", f"- wall time of the stages: {total / 60:.1f} min", "",
          f"Every SLM starts from the reference (`ref`, {size['ref_steps']} steps) and trains {size['slm_steps']} "
          "more steps with `<CALL>` as the target of the tokens its rule selected (same call rate for every rule; "
          "`none` delegates nothing). FactScore: each model writes a bio from '<Name> was born' for "
          f"{size['per_bucket']} people per frequency bucket; every stated attribute is checked against the "
          "knowledge base (precision of stated facts). Cascade: where the SLM emits `<CALL>`, the large model "
          "writes the next word. *leakage*: share of stated facts that are wrong and written by the SLM itself.", ""]
    figs = []
    if results:
        md += ["## FactScore", "", factscore_table(results, selections), ""]
        png = plot_rule_factscore(results, rules, os.path.join(out, "factscore_by_rule.png"))
        figs.append(png)
        md += [f"![FactScore by rule]({os.path.basename(png)})", ""]
        if os.path.isfile(os.path.join(out, "factscore", "factscore.png")):
            md += ["![FactScore vs call rate and by bucket](factscore/factscore.png)", ""]
        labels = [r for r in rules if r in results] + [f"{r} alone" for r in rules if f"{r} alone" in results]
        labels += ["large alone"] if "large alone" in results else []
        buckets = sorted({b for lab in labels for b in results[lab].get("by_bucket", {})}, key=int)
        rows = [[lab] + [_fmt((results[lab]["by_bucket"].get(b) or {}).get("factscore")) for b in buckets]
                for lab in labels]
        md += ["### FactScore per frequency bucket (0 = rarest people)", "",
               markdown_table(["run"] + [f"bucket {b}" for b in buckets], rows), ""]
        # The paper's claim: lacy gives the best cascade FactScore at a matched call rate.
        scored = {r: results[r]["factscore"] for r in rules if r in results and results[r]["factscore"] is not None}
        if "lacy" in scored and len(scored) > 1:
            best = max(scored, key=scored.get)
            others = ", ".join(f"{r} {v:.3f}" for r, v in scored.items() if r != "lacy")
            verdict = ("reproduced" if best == "lacy" and sum(v == scored["lacy"] for v in scored.values()) == 1
                       else f"NOT reproduced (best: {best})")
            rates = ", ".join(f"{r} {results[r]['call_rate']:.3f}" for r in scored)
            # Binomial standard error of a FactScore over its stated facts: margins below it are noise.
            se = {r: (v * (1 - v) / max(results[r]["facts"], 1)) ** 0.5 for r, v in scored.items()}
            runner_up = max((v for r, v in scored.items() if r != "lacy"), default=None)
            margin = "" if runner_up is None else (
                f" Margin over the best other rule: {scored['lacy'] - runner_up:+.3f}; standard error of lacy's FactScore "
                f"over its {results['lacy']['facts']} stated facts: {se['lacy']:.3f}"
                + (" (the margin is within it: not a significant difference)." if abs(scored['lacy'] - runner_up)
                   < se["lacy"] else "."))
            md += ["Claim of the paper, checked on these numbers:", "",
                   f"- lacy has the best cascade FactScore at a matched training call rate: lacy "
                   f"{scored['lacy']:.3f} vs {others} -> {verdict}.{margin} Call rates at generation (not matched, "
                   f"a consequence of training): {rates}.", ""]
    sel_rows = []
    for rule, sel in selections.items():
        s = sel["splits"].get("train", {})
        sel_rows.append([rule, f"{s.get('rate', 0):.3f}", s.get("n_delegated"), _fmt(s.get("threshold")),
                         _fmt(s.get("factual_share_delegated")), _fmt(s.get("mean_loss_delegated")), s.get("warning")])
    if sel_rows:
        md += ["## Selection (training split)", "",
               markdown_table(["rule", "call rate", "tokens delegated", "threshold", "factual share", "mean ref loss",
                               "warning"], sel_rows), ""]
    md += ["## Commands", "", "Every stage is one `memlm` command (re-run any by hand):", "", "```"]
    md += [c.replace(os.getcwd() + os.sep, "") for c in commands] + ["```", ""]
    path = write_text(os.path.join(out, "report.md"), "\n".join(md))
    return path, figs
