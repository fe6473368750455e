"""The LaCy reproduction report (scripts/reproduce_lacy.py): knowledge gap, call-rate curves, matched-rate
tables with intervals, memory + delegation, the wiki-leads cascade with its diagnosis, and calibration.

Nothing here computes a result: every number is read from a file a command wrote (factscore.json,
wiki_cascade.json, calibration.json, DATA/selection/*.json, the stage markers).
"""
from __future__ import annotations

import json
import os

from train.experiments.memory_report import run_params
from train.experiments.report import machine_line, markdown_table, write_text


def _read(path: str) -> dict:
    if not os.path.isfile(path):
        return {}
    with open(path) as f:
        return json.load(f)


def iv(d: dict | None, spec: str = ".3f", signed: bool = False) -> str:
    """An interval dict {point, lo, hi} as "0.712 [0.650, 0.770]" ("n/a" when the curve does not reach)."""
    if not d or d.get("point") is None or d["point"] != d["point"]:
        return "n/a"
    s = "+" if signed else ""
    if d.get("lo") is None or d["lo"] != d["lo"]:
        return f"{d['point']:{s}{spec}} [n/a]"
    return f"{d['point']:{s}{spec}} [{d['lo']:{s}{spec}}, {d['hi']:{s}{spec}}]"


def rate_name(r: str) -> str:
    return f"{float(r):.0%}"


def knowledge_table(fs: dict) -> tuple[str, list[str]]:
    """Large model alone vs each SLM alone (the τ > 1 point of its sweep: it never calls)."""
    res = fs.get("results", {})
    large = res.get("large alone", {})
    rows, notes = [["large alone", iv(large.get("factscore_ci")), f"{large.get('facts_per_bio', 0):.2f}", "—"]], []
    never = [t for t in fs.get("taus", []) if t not in ("argmax",) and float(t) > 1]
    for label in fs.get("curves", {}):
        r = res.get(f"{label} tau={never[0]}") if never else None
        if not r:
            continue
        gap = None if large.get("factscore") is None or r["factscore"] is None else large["factscore"] - r["factscore"]
        rows.append([f"{label} SLM alone", iv(r.get("factscore_ci")), f"{r['facts_per_bio']:.2f}",
                     "n/a" if gap is None else f"{gap:+.3f}"])
        if gap is not None and gap < 0.3:
            notes.append(label)
    return markdown_table(["model", "FactScore [95% CI over people]", "facts/bio", "large − SLM"], rows), notes


def matched_table(curves: dict, labels: list[str], metric: str = "factscore", spec: str = ".3f",
                  with_area: bool = True, name: str | None = None) -> str:
    rates = sorted({r for lab in labels for r in curves[lab]["matched"]}, key=float)
    rows = []
    for lab in labels:
        c = curves[lab]
        row = [lab] + [iv(c["matched"][r].get(metric), spec) for r in rates]
        if with_area:
            row.append(iv(c.get("area")))
        rows.append(row)
    head = ["run"] + [f"{name or metric} @ {rate_name(r)} calls" for r in rates]
    if with_area:
        a = curves[labels[0]].get("area", {})
        lo, hi = a.get("range", [0, 0])
        head.append(f"mean {name or 'FactScore'} over {lo:.0%}–{hi:.0%} calls (area)")
    return markdown_table(head, rows)


def diff_rows(diffs: dict, a: str, others: list[str]) -> list[list]:
    rows = []
    for b in others:
        d = diffs.get(f"{a} - {b}")
        sign = 1
        if d is None:
            d, sign = diffs.get(f"{b} - {a}"), -1
        if d is None:
            continue
        cells = []
        for r in sorted(d, key=float):
            x = d[r]
            x = x if sign == 1 else {"point": -x["point"], "lo": -x["hi"], "hi": -x["lo"]}
            cells.append(iv(x, signed=True) + _mark(x))
        rows.append([f"{a} − {b}"] + cells)
    return rows


def diff_table(diffs: dict, a: str, others: list[str]) -> str:
    """Markdown of the paired differences a − b at every matched rate (empty if none)."""
    rows = diff_rows(diffs, a, others)
    if not rows:
        return ""
    d = next((diffs.get(f"{a} - {b}") or diffs.get(f"{b} - {a}") for b in others
              if diffs.get(f"{a} - {b}") or diffs.get(f"{b} - {a}")), {})
    return markdown_table(["pair"] + [f"@ {rate_name(x)}" for x in sorted(d, key=float)], rows)


def _mark(x: dict) -> str:
    if x.get("lo") is None or x["lo"] != x["lo"]:
        return ""
    return " ↑" if x["lo"] > 0 else (" ↓" if x["hi"] < 0 else "")


def verdicts(diffs: dict, a: str, others: list[str]) -> list[str]:
    """One line per matched rate: which paired differences of `a` exclude zero."""
    out = []
    for b in others:
        d = diffs.get(f"{a} - {b}")
        if not d:
            continue
        for r, x in sorted(d.items(), key=lambda kv: float(kv[0])):
            if float(r) == 0 or x["point"] != x["point"] or x["lo"] != x["lo"]:
                continue
            word = "better" if x["lo"] > 0 else ("worse" if x["hi"] < 0 else "no significant difference")
            out.append(f"{a} vs {b} at {rate_name(r)} calls: {word} ({iv(x, signed=True)})")
    return out


def calibration_table(cal: dict) -> str:
    rows = []
    for label, r in cal.get("results", {}).items():
        row = [label]
        for part in ("factual", "non_factual"):
            p = r.get(part, {})
            row += [iv(p.get("auroc")), iv(p.get("ece")), f"{p.get('wrong_rate', float('nan')):.2f}",
                    f"{p.get('mean_p_call', float('nan')):.3f}", p.get("n", 0)]
        rows.append(row)
    head = ["SLM"] + [f"{part}: {x}" for part in ("factual", "non-factual")
                      for x in ("AUROC", "ECE", "share wrong", "mean P(<CALL>)", "positions")]
    return markdown_table(head, rows)


def selection_rows(data: str, names: list[str]) -> list[list]:
    rows = []
    for name in names:
        sel = _read(os.path.join(data, "selection", f"{name}.json"))
        s = sel.get("splits", {}).get("train")
        if s:
            fs = s.get("factual_share_delegated")
            rows.append([name, f"{s['rate']:.3f}", s["n_delegated"], "n/a" if fs is None else f"{fs:.3f}",
                         "n/a" if fs is None else f"{1 - fs:.3f}", s.get("warning") or ""])
    return rows


def _plot(curves: dict, labels: list[str], path: str, title: str, rates) -> str | None:
    from train.lacy.factscore import plot_curves

    sub = {lab: curves[lab] for lab in labels if lab in curves}
    return plot_curves(sub, path, title, rates=rates) if sub else None


def write_lacy_report(out: str, rules: list[str], rates: list[float], size: dict, size_name: str, command: str,
                      stage_seconds: dict[str, float], commands: list[str]) -> tuple[str, list[str]]:
    """<out>/report.md from what the stages wrote. Returns (path, PNGs)."""
    pct = lambda r: f"{r * 100:g}"  # noqa: E731
    lab = lambda rule, r: "none" if rule == "none" else f"{rule} {pct(r)}%"  # noqa: E731
    fs = _read(os.path.join(out, "factscore", "factscore.json"))
    wk = _read(os.path.join(out, "wiki-cascade", "wiki_cascade.json"))
    total = sum(stage_seconds.values())
    par = {k: run_params(os.path.join(out, "runs", k)) for k in ("bios-ref", "bios-large", "wiki-ref", "wiki-large")
           if os.path.isdir(os.path.join(out, "runs", k))}
    md = ["# Reproduction: LaCy <CALL> delegation (arXiv 2602.12005), small scale", "",
          f"- command: `{command}`", f"- machine, date: {machine_line()}",
          f"- size `{size_name}`: {json.dumps(size)}; training call rates {', '.join(f'{r:.0%}' for r in rates)}",
          "- models: " + ", ".join(f"`{k}` {p['non_embedding'] / 1e6:.2f}M non-embedding params"
                                   for k, p in par.items()),
          f"- wall time of the stages: {total / 60:.1f} min "
          f"({', '.join(f'{k} {v / 60:.1f}' for k, v in stage_seconds.items() if v >= 60)} min)", "",
          "Every SLM starts from the same reference and trains the same further steps; only its `<CALL>` targets "
          "differ (its rule at its training call rate). In the cascade the SLM calls when P(`<CALL>`) ≥ τ; sweeping "
          "τ gives a curve of FactScore against the share of the SLM's decisions that were calls *at generation*. "
          "Rules are compared at matched generation call rates (linear interpolation between sweep points, never "
          "extrapolated) with 95% intervals from resampling people (leads on wiki); differences are paired (same "
          "people). ↑/↓: the interval of a difference excludes 0.", ""]
    figs = []
    if fs:
        curves, diffs = fs.get("curves", {}), fs.get("diffs", {})
        md += ["## 1. Does the large model know the bios?", "",
               "FactScore of each model writing alone (precision of the attributes stated in '<Name> was born…', "
               f"{fs.get('per_bucket')} people per frequency bucket). The cascade can only gain what the large model "
               "knows beyond the SLM.", ""]
        table, small_gap = knowledge_table(fs)
        md += [table, ""]
        if small_gap:
            md += [f"**Gap below 0.3** for: {', '.join(small_gap)}.", ""]
        md += ["## 2. FactScore against the generation call rate", ""]
        for r in rates:
            labels = [lab(rule, r) for rule in rules if lab(rule, r) in curves]
            if not labels:
                continue
            png = _plot(curves, labels, os.path.join(out, f"curves_bios_{pct(r)}.png"),
                        f"bios, SLMs trained at {r:.0%} calls", [float(x) for x in fs.get("match_rates", [])])
            figs.append(png)
            md += [f"### SLMs trained at a {r:.0%} call rate", "", f"![curves]({os.path.basename(png)})", "",
                   matched_table(curves, labels), "", "Facts stated per bio at the same rates (saying less is not "
                   "rewarded):", "", matched_table(curves, labels, "facts_per_bio", ".2f", with_area=False), ""]
            if f"lacy {pct(r)}%" in labels:
                others = [x for x in labels if x != f"lacy {pct(r)}%"]
                md += ["Paired differences of FactScore (lacy − other):", "",
                       diff_table(diffs, f"lacy {pct(r)}%", others), ""]
                md += [f"- {v}" for v in verdicts(diffs, f"lacy {pct(r)}%", others)] + [""]
        mem = [x for x in curves if x.startswith("memory")]
        if mem:
            labels = [x for x in mem if "+lacy" in x] + [lab("lacy", rates[0])] + [x for x in mem if "no calls" in x]
            labels = [x for x in labels if x in curves]
            png = _plot(curves, labels, os.path.join(out, "curves_memory.png"), "bios: memory and delegation",
                        [float(x) for x in fs.get("match_rates", [])])
            figs.append(png)
            md += ["## 3. Memory and delegation in one model", "",
                   "The reference + hierarchical memories co-trained with lacy's `<CALL>` targets (memory+lacy), the "
                   "lacy SLM without memory, and the memory SLM trained without `<CALL>` (it has no calls to make: "
                   "its curve sits at 0%).", "", f"![memory]({os.path.basename(png)})", "",
                   matched_table(curves, labels), ""]
            md += [diff_table(diffs, labels[0], labels[1:]), ""]
        sp = fs.get("speed")
        if sp:
            md += ["## Cascade speed", "",
                   f"{sp['generations']} generations ({sp['prompts']} prompts × {len(sp['taus'])} thresholds, SLM "
                   f"`{sp['slm']}`), same run: one prompt at a time {sp['one_prompt_per_s']:.2f}/s "
                   f"({sp['one_prompt_seconds']:.1f} s), batched {sp['batched_per_s']:.2f}/s "
                   f"({sp['batched_seconds']:.1f} s): **{sp['speedup']:.1f}×**; identical outputs "
                   f"{sp['identical']:.1%}.", ""]
        sel = selection_rows(os.path.join(out, "data-bios"),
                             [f"calls_{rule}_{pct(r)}" for r in rates for rule in rules if rule != "none"])
        if sel:
            md += ["## Selection on bios (training split)", "",
                   markdown_table(["array", "rate", "tokens", "factual share", "non-factual share", "warning"],
                                  sel), ""]
    if wk:
        md += _wiki_section(out, wk, rules, rates)
        figs += [p for p in [os.path.join(out, "wiki-cascade", "curves.png")] if os.path.isfile(p)]
    for corpus in ("bios", "wiki"):
        cal = _read(os.path.join(out, f"calibration-{corpus}", "calibration.json"))
        if cal:
            md += [f"## Calibration of P(<CALL>) on {corpus} (held-out windows)", "",
                   "Does P(`<CALL>`) predict that the SLM's own greedy token is wrong? AUROC 0.5 = no ranking; "
                   "ECE reads P(`<CALL>`) as P(wrong). 95% intervals over windows.", "",
                   calibration_table(cal), "", f"![calibration](calibration-{corpus}/calibration.png)", ""]
    md += ["## Commands", "", "Every stage is one `memlm` command (re-run any by hand):", "", "```"]
    md += [c.replace(os.getcwd() + os.sep, "") for c in commands] + ["```", ""]
    path = write_text(os.path.join(out, "report.md"), "\n".join(md))
    return path, [f for f in figs if f]


def _wiki_section(out: str, wk: dict, rules: list[str], rates: list[float]) -> list[str]:
    curves, diffs = wk.get("curves", {}), wk.get("diffs", {})
    labels = [r for r in rules if r in curves]
    md = ["## 4. Real text: the cascade on wiki-leads", "",
          f"{wk.get('clozes')} cloze prompts from {wk.get('leads')} held-out leads (the lead up to an exact fact: "
          f"{', '.join(f'{k} {n}' for k, n in wk.get('kind_counts', {}).items() if n)}); large model "
          f"`{wk.get('large')}`; SLMs trained on wiki-leads with each rule's `<CALL>` targets at "
          f"{rates[0]:.0%}. *exact*: the completion starts with the fact's answer. Fluency: NLL per token of the "
          f"text the SLM wrote itself under `{wk.get('judge') or wk.get('large')}` (lower is more fluent).", ""]
    la = wk.get("large_alone") or {}
    if la:
        md += [f"Large model alone: exact {la['exact']:.3f} (n={la['n']}).", ""]
    if labels:
        md += ["![wiki curves](wiki-cascade/curves.png)", "", matched_table(curves, labels, name="exact"), ""]
        if all("nll" in curves[x]["matched"][next(iter(curves[x]["matched"]))] for x in labels):
            md += ["Fluency (NLL per token of the SLM's own text) at the same rates:", "",
                   matched_table(curves, labels, "nll", ".2f", with_area=False, name="NLL/token"), ""]
        if "lacy" in labels:
            others = [x for x in labels if x != "lacy"]
            md += ["Paired differences of exact-match rate (lacy − other):", "",
                   diff_table(diffs, "lacy", others), ""]
            md += [f"- {v}" for v in verdicts(diffs, "lacy", others)] + [""]
    diag, gen = wk.get("diagnosis", {}), wk.get("generation_calls", {})
    sel = {r[0]: r for r in selection_rows(os.path.join(out, "data-wiki"), [f"calls_{x}" for x in rules])}
    rows = []
    for rule in rules:
        s, d, g = sel.get(f"calls_{rule}"), diag.get(rule, {}), gen.get(rule, {})
        nf, fa = d.get("non_factual", {}), d.get("factual", {})
        f = lambda x, k: "n/a" if k not in x else f"{x[k]:.2f}"  # noqa: E731
        rows.append([rule, s[4] if s else "n/a",
                     "n/a" if g.get("factual_share") is None else f"{1 - g['factual_share']:.2f}",
                     nf.get("n", 0), f(nf, "slm_right"), f(nf, "large_right"), fa.get("n", 0), f(fa, "slm_right"),
                     f(fa, "large_right")])
    md += ["### Diagnosis: where each rule calls", "",
           "Training calls on non-factual tokens (selection), generation-time calls whose span is not a spaCy-factual "
           "word, and, at held-out positions the rule's selection delegates, how often the SLM's own next word and the "
           "large model's word equal the text's (a call helps where the large model is right and the SLM is not).", "",
           markdown_table(["rule", "non-factual share of training calls", "non-factual share of generation calls",
                           "non-factual sites", "SLM right", "large right", "factual sites", "SLM right",
                           "large right"], rows), ""]
    for rule in rules:
        ex = diag.get(rule, {}).get("non_factual", {}).get("examples", [])[:3]
        if ex:
            md += [f"{rule}, non-factual call sites: " + "; ".join(
                f"…{e['prefix'][-40:]!r} → text {e['true']!r}, SLM {e['slm']!r}, large {e['large']!r}"
                for e in ex), ""]
    return md
