"""The memory evidence report (scripts/reproduce_memory.py): tables with 95% intervals, and PNGs.

Nothing here trains or scores a model: every number is read from the eval.json / harness.json files the
stages wrote (per-probe results included), and intervals are paired bootstraps over the same probes.
"""
from __future__ import annotations

import json
import os
import re

import numpy as np

from train.evaluation.stats import bootstrap_ci, paired_diff_ci, paired_ratio_diff_ci, seed_ci
from train.experiments.report import bucket_order, machine_line, markdown_table, save_figure, write_text
import matplotlib.pyplot as plt  # noqa: E402  (after report.py chose the Agg backend)

MECH_ROWS = [("fetched", "fetched (router)"), ("fetched_top2", "fetched (top-2 leaves, lowest prompt loss)"),
             ("fetched_oracle", "fetched (oracle: person's majority leaf)"), ("generic", "generic block"),
             ("anchor", "anchor only")]


def _load(path: str) -> dict | None:
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def ci_cell(d: dict | None, key: str = "acc", spec: str = ".3f") -> str:
    """'0.664 [0.63, 0.70]' from a {key, lo, hi} dict ('—' when missing)."""
    if not d or d.get(key) is None:
        return "—"
    v, lo, hi = d[key], d.get("lo"), d.get("hi")
    sign = "+" if key == "diff" else ""
    return f"{v:{sign}{spec}} [{lo:{sign}{spec}}, {hi:{sign}{spec}}]" if lo is not None else f"{v:{spec}}"


def run_params(run_dir: str) -> dict:
    """Parameters of a run from its config.yaml: non-embedding anchor, fetched memory and bank."""
    import torch

    from memory.config import bank_params, fetched_params
    from model.model import Anchor
    from train.config import load_config

    path = os.path.join(run_dir, "config.yaml")
    if not os.path.isfile(path):
        return {}
    cfg = load_config(path)
    with torch.device("meta"):
        anchor = Anchor(cfg.model)
    out = {"non_embedding": anchor.num_params("non_embedding"), "total": anchor.num_params("all"),
           "fetched": 0, "bank": 0}
    if cfg.memory is not None:
        out["fetched"], out["bank"] = fetched_params(cfg.memory, cfg.model), bank_params(cfg.memory, cfg.model)
    return out


def items_diff(a: dict, la: str, b: dict, lb: str) -> dict | None:
    """Paired difference of per-probe correctness between two eval.json (same probe sample, same order)."""
    ia, ib = (a or {}).get("probe_items") or {}, (b or {}).get("probe_items") or {}
    if la not in ia or lb not in ib or len(ia[la]) != len(ib[lb]) or ia.get("person") != ib.get("person"):
        return None
    ci = paired_diff_ci(ia[la], ib[lb])
    return {"diff": ci.point, "lo": ci.lo, "hi": ci.hi}


def gain_by_hit(a, b, hit) -> dict[str, dict | None]:
    """Paired mean(a) - mean(b) (per-probe 0/1) on the probes the router sent to the majority leaf ("hits")
    and on the others ("misses"): {"hits" | "misses": {"diff", "lo", "hi", "n"} or None when empty}. Knowledge
    stored in the memory of the leaf that saw it helps on hits only; a gain as large on misses is not
    leaf-local (any leaf's memory gives it), so no router can add to it."""
    a, b, hit = np.asarray(a, float), np.asarray(b, float), np.asarray(hit, bool)
    out = {}
    for name, m in (("hits", hit), ("misses", ~hit)):
        ci = paired_diff_ci(a[m], b[m]) if m.any() else None
        out[name] = {"diff": ci.point, "lo": ci.lo, "hi": ci.hi, "n": int(m.sum())} if ci else None
    return out


def gain_cells(g: dict[str, dict | None], which=("hits", "misses")) -> list[str]:
    return [f"{ci_cell(g[k], 'diff')} (n={g[k]['n']})" if g[k] else "—" for k in which]


def hit_split_cells(fetched, generic, oracle, hit) -> list[str]:
    """[fetched − generic on hits, on misses, oracle − fetched on misses (what a perfect router would add)]."""
    return gain_cells(gain_by_hit(fetched, generic, hit)) + gain_cells(gain_by_hit(oracle, fetched, hit), ("misses",))


HIT_SPLIT_HEADER = ["fetched − generic, hits", "fetched − generic, misses", "oracle − fetched, misses"]


def val_diff(a: dict | None, ma: str, b: dict | None, mb: str) -> dict | None:
    """Paired difference of validation loss (nats/token) between mode `ma` of eval.json `a` and mode `mb` of
    `b`, bootstrapped over the val rows; None unless both were evaluated on the same rows (same data,
    seq_len, batch size, seed and per-row token counts)."""
    ra, rb = (a or {}).get("val_rows") or {}, (b or {}).get("val_rows") or {}
    if ma not in ra or mb not in rb or a.get("data") != b.get("data"):
        return None
    if any(ra.get(k) != rb.get(k) for k in ("seq_len", "batch_size", "seed")) or ra[ma]["tokens"] != rb[mb]["tokens"]:
        return None
    ci = paired_ratio_diff_ci(ra[ma]["nats"], ra[ma]["tokens"], rb[mb]["nats"], rb[mb]["tokens"],
                              np.arange(len(ra[ma]["nats"])))
    return {"diff": ci.point, "lo": ci.lo, "hi": ci.hi}


def seed_cell(vals: list[float], spec: str = ".3f") -> str:
    """'mean [lo, hi] (n seeds)' with a 95% Student-t interval over seeds; the value alone for one seed."""
    ci = seed_ci(vals)
    if len(vals) < 2:
        return f"{ci.point:{spec}} (1 seed)"
    return f"{ci.point:{spec}} [{ci.lo:{spec}}, {ci.hi:{spec}}] ({len(vals)} seeds)"


# ---- 1. mechanism check ------------------------------------------------------------------------------
def mech_section(out: str, mech_runs: list[tuple[str, int]]) -> tuple[list[str], list[str]]:
    ev = {(v, s): _load(os.path.join(out, "mech", "eval", f"{v}-s{s}", "eval.json")) for v, s in mech_runs}
    base = {v: e for (v, s), e in ev.items() if s == mech_runs[0][1] and e}
    if not base:
        return ["## 1. Mechanism check: not run", ""], []
    md = ["## 1. Mechanism check (bios `uniform`: every person 12 documents; anchor trained on other people, frozen)",
          "", "Greedy probe accuracy on every fact of the training people (7 per person), with 95% bootstrap "
          "intervals; differences are paired over the same probes. *Consistency*: share of a person's training "
          "windows in the leaf holding most of them; *hit rate*: share of probe prompts the router sends to that leaf.", ""]
    variants = list(base)
    rows = []
    for label, name in MECH_ROWS:
        rows.append([name] + [ci_cell(((e.get("probes") or {}).get(label) or {}).get("all")) for e in base.values()])
    rows.append(["consistency (windows in the majority leaf)"] +
                [f"{(e.get('probe_routing') or {}).get('consistency', float('nan')):.3f}" for e in base.values()])
    for label, name in (("fetched", "router hit rate"), ("fetched_top2", "top-2 hit rate")):
        rows.append([name] + [ci_cell((((e.get("probe_routing") or {}).get("hit") or {}).get(label) or {}).get("all"),
                                      "share") for e in base.values()])
    for pair, name in (("fetched - generic", "fetched (router) - generic"),
                       ("fetched_oracle - generic", "fetched (oracle) - generic"),
                       ("fetched_oracle - fetched", "**router gap** (oracle - router)"),
                       ("fetched_top2 - fetched", "top-2 - router")):
        rows.append([name] + [ci_cell(((e.get("probe_diffs") or {}).get(pair) or {}).get("all"), "diff")
                              for e in base.values()])
    md += [markdown_table(["probe accuracy (all facts)"] + [f"leaves: `{v}`" for v in variants], rows), ""]
    grows = [[f"`{v}`"] + hit_split_cells(*(e["probe_items"][m] for m in ("fetched", "generic", "fetched_oracle", "hit")))
             for v, e in base.items()
             if all(m in (e.get("probe_items") or {}) for m in ("fetched", "generic", "fetched_oracle", "hit"))]
    if grows:
        md += ["Where the memory's gain sits: fetched (router) − generic on the probes routed to the person's "
               "majority leaf (hits) and on the others (misses), and what the oracle leaf adds on the misses. "
               "Knowledge stored in the memory of the leaf that saw it helps on hits far more than on misses.", "",
               markdown_table(["leaves"] + HIT_SPLIT_HEADER, grows), ""]
    png = plot_mech(base, os.path.join(out, "mech_accuracy.png"))
    md += ["![mechanism check](mech_accuracy.png)", ""]
    # seeds: headline variants
    seeds = sorted({s for _, s in mech_runs})
    if len(seeds) > 1:
        srows = []
        for v in ("minilm", "entity"):
            got = [ev.get((v, s)) for s in seeds if ev.get((v, s))]
            if len(got) < 2:
                continue
            cell = []
            for key in ("fetched", "fetched_oracle", "generic"):
                vals = [e["probes"][key]["all"]["acc"] for e in got]
                ci = seed_ci(vals)
                cell.append(f"{ci.point:.3f} [{ci.lo:.3f}, {ci.hi:.3f}]")
            gaps = [e["probes"]["fetched_oracle"]["all"]["acc"] - e["probes"]["fetched"]["all"]["acc"] for e in got]
            ci = seed_ci(gaps)
            srows.append([f"`{v}`", str(len(got))] + cell + [f"{ci.point:+.3f} [{ci.lo:+.3f}, {ci.hi:+.3f}]"])
        if srows:
            md += [f"Over seeds (memory training and probe-order seed; mean with a 95% t interval):", "",
                   markdown_table(["leaves", "seeds", "fetched (router)", "fetched (oracle)", "generic",
                                   "router gap"], srows), ""]
    return md, [png]


def plot_mech(base: dict[str, dict], out_png: str) -> str:
    """Grouped bars: per leaf assignment, accuracy of each routing (with 95% intervals)."""
    fig, ax = plt.subplots(figsize=(8, 4))
    width = 0.8 / len(MECH_ROWS)
    for j, (label, name) in enumerate(MECH_ROWS):
        cells = [((e.get("probes") or {}).get(label) or {}).get("all") or {} for e in base.values()]
        ys = [c.get("acc", np.nan) for c in cells]
        err = [[max(y - c.get("lo", y), 0) for y, c in zip(ys, cells)], [max(c.get("hi", y) - y, 0) for y, c in zip(ys, cells)]]
        xs = np.arange(len(base)) + (j - (len(MECH_ROWS) - 1) / 2) * width
        ax.bar(xs, ys, width=width, yerr=err, capsize=2, color=f"C{j}", label=name)
    ax.set_xticks(range(len(base)), [f"leaves: {v}" for v in base])
    ax.set_ylabel("probe accuracy (all facts)")
    ax.set_ylim(0, 1)
    ax.set_title("Mechanism check: memories hold what their leaf saw; routing decides the rest")
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=7, loc="upper left")
    return save_figure(fig, out_png)


# ---- 2. capacity-bound bios --------------------------------------------------------------------------
def plot_lines(xs, series: dict[str, list[dict]], xlabel: str, ylabel: str, title: str, out_png: str,
               key: str = "diff", logx: bool = False) -> str:
    fig, ax = plt.subplots(figsize=(6, 4))
    for i, (label, pts) in enumerate(series.items()):
        ys = [p.get(key, np.nan) if p else np.nan for p in pts]
        lo = [p.get("lo", np.nan) if p else np.nan for p in pts]
        hi = [p.get("hi", np.nan) if p else np.nan for p in pts]
        ax.plot(xs, ys, marker="o", color=f"C{i}", label=label)
        ax.fill_between(xs, lo, hi, color=f"C{i}", alpha=0.2)
    if logx:  # ticks at the measured points, plain numbers (no 3x10^1 minor labels)
        ax.set_xscale("log")
        ax.set_xticks(list(xs), [f"{x:g}" for x in xs])
        ax.xaxis.set_minor_locator(plt.NullLocator())
    ax.axhline(0, color="k", lw=0.5)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return save_figure(fig, out_png)


def plot_buckets(curves: dict[str, dict], out_png: str, title: str) -> str:
    """Figure-1 analogue with 95% intervals: accuracy per frequency bucket, one line per model."""
    buckets = [b for b in bucket_order(b for p in curves.values() for b in p) if b != "all"]
    fig, ax = plt.subplots(figsize=(7, 4))
    xs = np.arange(len(buckets))
    for i, (label, probes) in enumerate(curves.items()):
        cells = [probes.get(b) or {} for b in buckets]
        ys = [c.get("acc", np.nan) for c in cells]
        err = [[max(y - c.get("lo", y), 0) for y, c in zip(ys, cells)], [max(c.get("hi", y) - y, 0) for y, c in zip(ys, cells)]]
        ax.errorbar(xs + (i - len(curves) / 2) * 0.04, ys, yerr=err, marker="o", capsize=3, color=f"C{i}", label=label)
    n = [next(((p.get(b) or {}).get("n") for p in curves.values() if b in p), None) for b in buckets]
    ax.set_xticks(xs, [f"{b}\n(n={k})" for b, k in zip(buckets, n)], fontsize=8)
    ax.set_xlabel("frequency bucket of the answer in training (0 = rarest)")
    ax.set_ylabel("probe accuracy (greedy, exact answer)")
    ax.set_ylim(bottom=0)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return save_figure(fig, out_png)


def cap_section(out: str, size: dict) -> tuple[list[str], list[str]]:
    from data.bios import knowledge_bits

    d = os.path.join(out, "cap")
    ev = {name: _load(os.path.join(d, "eval", name, "eval.json")) for name in
          ["anchor-cont", "dense-2x", "memory-1", "memory-2", "memory-3", "memory-4", "memory-first1", "memory-last1"]
          + [f"memory-k{k}" for k in size["bank_ks"]]}
    mem = ev.get("memory-4")
    if not mem:
        return ["## 2. Capacity-bound bios: not run", ""], []
    kb = _load(os.path.join(d, "data", "bios", "kb.json")) or {}
    n_people = len(kb.get("people", [])) or size["cap_people"]
    par = {n: run_params(os.path.join(d, "runs", n)) for n in ("anchor", "memory", "dense-2x")}
    bits, p_anchor = knowledge_bits(n_people), par["anchor"].get("non_embedding", 0)
    tok = lambda n: size["batch_size"] * size["seq_len"] * n  # noqa: E731
    md = ["## 2. Capacity-bound bios (`capacity` preset: >= 12 documents per person, Zipf tail)", "",
          f"- knowledge: {n_people:,} people x 46.5 bits = **{bits / 1e3:,.0f}k bits**; the anchor has "
          f"{p_anchor / 1e3:,.0f}k non-embedding parameters ({par['anchor'].get('total', 0) / 1e3:,.0f}k with "
          f"embeddings): at ~2 bits/parameter (Physics of LMs 3.3) it can hold ~{2 * p_anchor / 1e3:,.0f}k bits "
          f"(ratio knowledge / capacity = {bits / max(2 * p_anchor, 1):.2f}); the bank has "
          f"{par['memory'].get('bank', 0) / 1e3:,.0f}k parameters, a fetched block {par['memory'].get('fetched', 0) / 1e3:,.1f}k.",
          f"- same training tokens for every row: anchor A = {size['cap_anchor_steps']} steps "
          f"({tok(size['cap_anchor_steps']) / 1e6:.1f}M tokens) then anchor-only continued / memories (anchor frozen) "
          f"M = {size['cap_memory_steps']} steps; dense 2x A+M steps. Memory leaves and prompt routing: entity keys.",
          ""]
    labels = [("anchor-cont", "anchor", "anchor only, A+M steps"), ("memory-4", "anchor", "memory run, memory off (A steps)"),
              ("memory-4", "generic", "anchor + generic block"), ("memory-4", "fetched", "anchor + fetched (router)"),
              ("memory-4", "fetched_oracle", "anchor + fetched (oracle leaf)"), ("dense-2x", "anchor", "dense 2x, A+M steps")]
    buckets = bucket_order(b for e in ev.values() if e for p in (e.get("probes") or {}).values() for b in p)
    rows, curves = [], {}
    for name, label, title in labels:
        e = ev.get(name) or {}
        p = (e.get("probes") or {}).get(label)
        v = (e.get("val") or {}).get(label if label in ("anchor", "generic", "fetched") else "fetched")
        if p is None:
            continue
        rows.append([title, f"{v['loss']:.4f}" if v and label != "fetched_oracle" else "—"] + [ci_cell(p.get(b)) for b in buckets])
        if name != "memory-4" or label != "anchor":
            curves[title] = p
    md += [markdown_table(["model", "val loss"] + [f"acc {b}" for b in buckets], rows), ""]
    hit = ((mem.get("probe_routing") or {}).get("hit") or {}).get("fetched") or {}
    md += ["Router hit rate per bucket (prompt routed to the person's majority leaf): " +
           ", ".join(f"{b} {ci_cell(hit.get(b), 'share')}" for b in buckets if b in hit) +
           f"; windows in the majority leaf {((mem.get('probe_routing') or {}).get('consistency') or float('nan')):.3f}.", ""]
    diffs = [("fetched - generic", mem, "fetched", mem, "generic"), ("fetched (oracle) - generic", mem, "fetched_oracle", mem, "generic"),
             ("fetched - anchor-only (same tokens)", mem, "fetched", ev.get("anchor-cont"), "anchor"),
             ("fetched - dense 2x", mem, "fetched", ev.get("dense-2x"), "anchor")]
    drows = [[n, ci_cell(items_diff(a, la, b, lb), "diff")] for n, a, la, b, lb in diffs]
    vd = mem.get("val_diffs") or {}
    drows.append(["val loss fetched - generic (nats, paired over rows)", ci_cell(vd.get("fetched - generic"), "diff", ".4f")])
    for other, title in (("anchor-cont", "anchor-only (same tokens)"), ("dense-2x", "dense 2x")):
        drows.append([f"val loss fetched - {title} (nats, paired over rows)",
                      ci_cell(val_diff(mem, "fetched", ev.get(other), "anchor"), "diff", ".4f")])
    md += [markdown_table(["difference (all probes)", "95% interval"], drows), ""]
    figs = [plot_buckets(curves, os.path.join(out, "cap_accuracy_by_bucket.png"),
                         "capacity-bound bios: accuracy by answer frequency")]
    md += ["![capacity-bound bios](cap_accuracy_by_bucket.png)", ""]
    # trends
    M = size["cap_memory_steps"]
    steps = [i * max(M // 4, 1) for i in range(1, 5)]
    pts = [((ev.get(f"memory-{i}") or {}).get("probe_diffs") or {}).get("fetched - generic", {}).get("all") for i in range(1, 5)]
    orc = [((ev.get(f"memory-{i}") or {}).get("probe_diffs") or {}).get("fetched_oracle - generic", {}).get("all") for i in range(1, 5)]
    tx = [tok(size["cap_anchor_steps"] + s) / 1e6 for s in steps]
    figs.append(plot_lines(tx, {"fetched (router) - generic": pts, "fetched (oracle) - generic": orc},
                           "training tokens (M, anchor + memory phase)", "accuracy difference", "gap vs training tokens",
                           os.path.join(out, "cap_gap_vs_tokens.png")))
    gap = lambda e: e["probes"]["fetched"]["all"]["acc"] - e["probes"]["generic"]["all"]["acc"]  # noqa: E731
    over = [[gap(e) for e in seed_evals(d, f"memory-{i}", "memory", suffix=f"-{i}" if i < 4 else "")]
            for i in range(1, 5)]
    over = [seed_cell(v, "+.3f") if v else "—" for v in over]
    md += ["Fetched - generic vs training tokens (memory checkpoints; base seed paired over the same probes, and the "
           "mean over seeds with a 95% t interval):", "",
           markdown_table(["memory steps", "fetched - generic", "oracle - generic", "fetched - generic, over seeds"],
                          [[str(s), ci_cell(a, "diff"), ci_cell(b, "diff"), o]
                           for s, a, b, o in zip(steps, pts, orc, over)]),
           "", "![gap vs tokens](cap_gap_vs_tokens.png)", ""]
    ks = sorted([size["cap_k"]] + list(size["bank_ks"]))
    kev = {k: (mem if k == size["cap_k"] else ev.get(f"memory-k{k}")) for k in ks}
    kpar = {k: run_params(os.path.join(d, "runs", "memory" if k == size["cap_k"] else f"memory-k{k}")) for k in ks}
    kpts = [((kev[k] or {}).get("probe_diffs") or {}).get("fetched - generic", {}).get("all") for k in ks]
    kanc = [items_diff(kev[k], "fetched", ev.get("anchor-cont"), "anchor") for k in ks]
    kden = [items_diff(kev[k], "fetched", ev.get("dense-2x"), "anchor") for k in ks]
    base = lambda name, k: ev.get(name) if k == size["cap_k"] else _load(os.path.join(d, "eval", f"{name}-k{k}", "eval.json"))  # noqa: E731
    kval = [val_diff(kev[k], "fetched", base("anchor-cont", k), "anchor") for k in ks]
    figs.append(plot_lines(ks, {"fetched - generic": kpts, "fetched - anchor-only continued": kanc,
                                "fetched - dense 2x": kden}, "k (leaves; fetched size fixed)", "accuracy difference",
                           "gap vs bank size", os.path.join(out, "cap_gap_vs_bank.png"), logx=True))
    md += ["Bank size at a fixed fetched size (one level, k leaves of the same width; base seed, paired over the same "
           "probes; val loss paired over the same rows, the baselines evaluated on each bank's leaf packing):", "",
           markdown_table(["k", "bank params", "fetched params", "fetched - generic", "fetched - anchor-only continued",
                           "fetched - dense 2x", "val loss fetched - anchor-only"],
                          [[str(k), f"{kpar[k].get('bank', 0) / 1e3:,.0f}k", f"{kpar[k].get('fetched', 0) / 1e3:,.1f}k",
                            ci_cell(p, "diff"), ci_cell(a, "diff"), ci_cell(b, "diff"), ci_cell(v, "diff", ".4f")]
                           for k, p, a, b, v in zip(ks, kpts, kanc, kden, kval)]), "",
           "![gap vs bank](cap_gap_vs_bank.png)", ""]
    md += cap_seeds(d, ks, size["cap_k"])
    prow, place = [], {}
    for name, title in (("memory-first1", "first layer"), ("memory-last1", "last layer")):
        e = ev.get(name)
        if e:
            place[title] = by_seed(d, name)
            prow.append([title, ci_cell(e["probes"]["fetched"].get("all")), ci_cell(e["probes"]["generic"].get("all")),
                         ci_cell(e["probe_diffs"].get("fetched - generic", {}).get("all"), "diff"),
                         seed_cell([gap(x) for x in place[title].values()], "+.3f"), f"{e['val']['fetched']['loss']:.4f}"])
    if prow:
        md += ["Placement (memory in one of the two layers, twice the width: the same fetched size; base seed with "
               "bootstrap intervals, and fetched - generic over seeds):", "",
               markdown_table(["memory layer", "fetched", "generic", "fetched - generic", "fetched - generic, over seeds",
                               "val loss fetched"], prow), ""]
        first, last = place.get("first layer") or {}, place.get("last layer") or {}
        both = [sd for sd in first if sd in last]  # seed i with seed i, never two different seeds
        if len(both) > 1:
            acc = lambda e: e["probes"]["fetched"]["all"]["acc"]  # noqa: E731
            md += [f"- first - last layer, fetched accuracy (seed i with seed i): "
                   f"{seed_cell([acc(first[sd]) - acc(last[sd]) for sd in both], '+.3f')}.", ""]
    return md, figs


def by_seed(d: str, base: str) -> dict[str, dict]:
    """{"" (the base seed) | "-s<seed>": eval.json} of eval/<base> and eval/<base>-s<seed>, in seed order."""
    ev_dir = os.path.join(d, "eval")
    names = seed_runs(os.listdir(ev_dir), base)
    got = {n.removeprefix(base): _load(os.path.join(ev_dir, n, "eval.json")) for n in names}
    return {k: e for k, e in got.items() if e}


def seed_evals(d: str, base: str, prefix: str, suffix: str = "") -> list[dict]:
    """One cap row over its seeds: eval/<base> (the base seed) then eval/<prefix>-s<seed><suffix>, in seed
    order (suffix "-i": the i-th checkpoint of each seed's run)."""
    ev_dir = os.path.join(d, "eval")
    names = os.listdir(ev_dir)
    seeds = seed_runs({n.removesuffix(suffix) for n in names if n.endswith(suffix)}, prefix)[1:]
    names = [base] + [n + suffix for n in seeds]
    return [e for e in (_load(os.path.join(ev_dir, n, "eval.json")) for n in names) if e]


def cap_seeds(d: str, ks: list[int], cap_k: int) -> list[str]:
    """Every row of the comparison over its seeds; memory seed i is paired with baseline seed i (the same
    probes and validation rows), and the differences are averaged over seeds with a Student-t interval."""
    anchor, dense = seed_evals(d, "anchor-cont", "anchor-cont"), seed_evals(d, "dense-2x", "dense-2x")
    mems = {k: seed_evals(d, "memory-4", "memory") if k == cap_k else seed_evals(d, f"memory-k{k}", f"memory-k{k}")
            for k in ks}
    if max(len(anchor), len(dense), *(len(m) for m in mems.values())) < 2:
        return []
    acc = lambda e, m: e["probes"][m]["all"]["acc"]  # noqa: E731
    rows = []
    for k, got in mems.items():
        if not got:
            continue
        rows.append([f"k = {k}", seed_cell([acc(e, "fetched") for e in got]),
                     seed_cell([acc(e, "fetched") - acc(e, "generic") for e in got], "+.3f"),
                     seed_cell([acc(e, "fetched") - acc(b, "anchor") for e, b in zip(got, anchor)], "+.3f"),
                     seed_cell([acc(e, "fetched") - acc(b, "anchor") for e, b in zip(got, dense)], "+.3f")])
    md = ["Over seeds (memory training and data order of every row; the same probes and validation rows; memory "
          "seed i paired with baseline seed i; mean with a 95% t interval):", "",
          markdown_table(["memory bank", "fetched (router)", "fetched - generic", "fetched - anchor-only continued",
                          "fetched - dense 2x"], rows), "",
          f"- anchor only, continued: probe accuracy {seed_cell([acc(e, 'anchor') for e in anchor])}, val loss "
          f"{seed_cell([e['val']['anchor']['loss'] for e in anchor], '.4f')}; dense 2x: "
          f"{seed_cell([acc(e, 'anchor') for e in dense])}, val loss {seed_cell([e['val']['anchor']['loss'] for e in dense], '.4f')}."]
    got = mems.get(cap_k) or []
    for other, title in ((anchor, "anchor-only continued"), (dense, "dense 2x")):
        diffs = [val_diff(e, "fetched", b, "anchor") for e, b in zip(got, other)]
        if diffs and all(diffs):
            md.append(f"- val loss, k = {cap_k}, fetched - {title} (nats, paired rows per seed): "
                      f"{seed_cell([x['diff'] for x in diffs], '+.4f')}.")
    return md + [""]


# ---- 3. wiki-leads -------------------------------------------------------------------------------------
WIKI_TASKS = ("memlm_wiki_seen", "memlm_wiki_heldout")
WIKI_LEAVES = ("minilm", "entity", "sentences")


def harness_items(r: dict | None, task: str) -> dict:
    """{doc id: 0/1} of one task in a harness.json ({} when missing)."""
    return (((r or {}).get("tasks") or {}).get(task) or {}).get("items", {})


def wiki_section(out: str) -> tuple[list[str], list[str]]:
    d = os.path.join(out, "wiki", "harness")
    if not os.path.isdir(d):
        return ["## 3. Wiki-leads knowledge probes: not run", ""], []
    res = {name: _load(os.path.join(d, name, "harness.json")) for name in sorted(os.listdir(d))}
    res = {k: v for k, v in res.items() if v}
    md = ["## 3. Wiki-leads knowledge probes (lm-evaluation-harness, 4 choices, log-probability)", "",
          "Facts (year, date, country, place, nationality, occupation) from lead sentences; distractors of the same "
          "kind with the closest training counts (chance = 0.25). *seen*: articles in training; *held-out*: val articles "
          "(no oracle leaf: none of their windows trained a memory; the oracle harness run sends them to leaf 0). "
          "Modes: `fetched` (router), `top2` (of the prompt's 2 nearest leaves, the one whose memory gives the prompt "
          "the lowest loss), `oracle` (the leaf holding most of the article's windows), `generic`, `anchor` (frozen anchor).",
          ""]
    rows = []
    for name, r in res.items():
        cells = []
        for t in WIKI_TASKS:
            items = list(harness_items(r, t).values())
            if items:
                ci = bootstrap_ci(items)
                cells.append(f"{ci.point:.3f} [{ci.lo:.3f}, {ci.hi:.3f}] (n={len(items)})")
            else:
                cells.append("—")
        rows.append([f"`{name}`"] + cells)
    md += [markdown_table(["run-mode", "seen", "held-out"], rows), ""]
    pairs = [(f"memory-{v}-{a}", f"memory-{v}-{b}") for v in WIKI_LEAVES
             for a, b in (("fetched", "generic"), ("oracle", "generic"), ("oracle", "fetched"), ("top2", "fetched"),
                          ("oracle", "top2"))]
    pairs += [(f"memory-{v}-fetched", "memory-minilm-fetched") for v in WIKI_LEAVES[1:]]
    pairs += [(f"memory-minilm-{m}", f"{b}-anchor") for m in ("fetched", "top2") for b in ("anchor-cont", "dense-2x")]
    drows = []
    for a, b in pairs:
        if a not in res or b not in res:
            continue
        cells = []
        for t in WIKI_TASKS:
            ia, ib = harness_items(res[a], t), harness_items(res[b], t)
            keys = sorted(set(ia) & set(ib))
            if keys and not ("oracle" in a + b and t != WIKI_TASKS[0]):  # held-out articles: no oracle leaf
                ci = paired_diff_ci([ia[k] for k in keys], [ib[k] for k in keys])
                cells.append(f"{ci.point:+.3f} [{ci.lo:+.3f}, {ci.hi:+.3f}]")
            else:
                cells.append("—")
        drows.append([f"`{a}` - `{b}`"] + cells)
    if drows:
        md += ["Paired differences (same probes):", "", markdown_table(["difference", "seen", "held-out"], drows), ""]
    md += wiki_seeds(res) + wiki_val(out) + wiki_routing(out, res)
    return md, []


def seed_runs(names, base: str) -> list[str]:
    """`base` then `base`-s<seed> in seed order, from a collection of run names."""
    more = {n for n in names if re.fullmatch(re.escape(base) + r"-s\d+", n)}
    return [base] + sorted(more, key=lambda n: int(n.rsplit("-s", 1)[1]))


def wiki_seeds(res: dict) -> list[str]:
    """The comparison over seeds: MiniLM-leaf memory seed i against anchor-only / dense 2x seed i."""
    runs = {n.rsplit("-", 1)[0] for n in res}
    mem = [r for r in seed_runs(runs, "memory-minilm") if f"{r}-fetched" in res and f"{r}-generic" in res]
    if len(mem) < 2:
        return []
    def acc(r: str, m: str, t: str) -> float:
        items = list(harness_items(res.get(f"{r}-{m}"), t).values())
        return float(np.mean(items)) if items else float("nan")

    def cell(vals: list[float], spec: str) -> str:  # "—" where a mode was not scored on a task (top-2: seen only)
        return "—" if any(np.isnan(vals)) else seed_cell(vals, spec)

    def f_task(f, label):  # the oracle has no leaf for held-out articles (none of their windows trained a memory)
        return lambda r, t: float("nan") if "oracle" in label and t != WIKI_TASKS[0] else f(r, t)

    rows = []
    for label, f in (("fetched (router)", lambda r, t: acc(r, "fetched", t)),
                     ("fetched (top-2)", lambda r, t: acc(r, "top2", t)),
                     ("fetched (oracle)", lambda r, t: acc(r, "oracle", t)),
                     ("generic", lambda r, t: acc(r, "generic", t)),
                     ("fetched - generic", lambda r, t: acc(r, "fetched", t) - acc(r, "generic", t)),
                     ("oracle - router", lambda r, t: acc(r, "oracle", t) - acc(r, "fetched", t)),
                     ("top-2 - router", lambda r, t: acc(r, "top2", t) - acc(r, "fetched", t)),
                     ("oracle - top-2", lambda r, t: acc(r, "oracle", t) - acc(r, "top2", t))):
        if "top-2" in label and not all(f"{r}-top2" in res for r in mem):
            continue
        spec = "+.3f" if " - " in label else ".3f"
        f = f_task(f, label)
        rows.append([label] + [cell([f(r, t) for r in mem], spec) for t in WIKI_TASKS])
    for other, title in (("anchor-cont", "anchor-only continued"), ("dense-2x", "dense 2x")):
        base = [r for r in seed_runs(runs, other) if f"{r}-anchor" in res]
        if base:
            rows.append([title] + [seed_cell([acc(b, "anchor", t) for b in base]) for t in WIKI_TASKS])
            for m, name in (("fetched", "fetched"), ("top2", "top-2")):
                if all(f"{r}-{m}" in res for r in mem):
                    rows.append([f"{name} - {title}"] + [cell([acc(r, m, t) - acc(b, "anchor", t)
                                                               for r, b in zip(mem, base)], "+.3f")
                                                         for t in WIKI_TASKS])
    return ["Over seeds (memory training and data order of every row; the same probes; MiniLM-leaf memory seed i "
            "paired with baseline seed i; mean with a 95% t interval):", "",
            markdown_table(["accuracy", "seen", "held-out"], rows), ""]


def wiki_val(out: str) -> list[str]:
    """Validation loss on the held-out articles, every run on the same rows where it can be paired."""
    d = os.path.join(out, "wiki", "eval")
    if not os.path.isdir(d):
        return []
    ev = {n: _load(os.path.join(d, n, "eval.json")) for n in sorted(os.listdir(d))}
    ev = {n: e for n, e in ev.items() if e}
    rows = [[f"`{n}`", m, f"{v['loss']:.4f}", f"{v['tokens']:,}"] for n, e in ev.items()
            for m, v in (e.get("val") or {}).items()]
    md = ["Validation loss on the held-out articles (nats per token):", "",
          markdown_table(["run", "mode", "val loss", "tokens"], rows), ""]
    base = ev.get("memory-minilm")
    drows = []
    if base:
        drows.append(["`memory-minilm` fetched - generic", ci_cell((base.get("val_diffs") or {}).get("fetched - generic"),
                                                                   "diff", ".4f")])
        for other in ("anchor-cont", "dense-2x"):
            drows.append([f"`memory-minilm` fetched - `{other}`",
                          ci_cell(val_diff(base, "fetched", ev.get(other), "anchor"), "diff", ".4f")])
    mem = [ev[n] for n in seed_runs(ev, "memory-minilm") if n in ev]
    if len(mem) > 1:
        drows.append(["`memory-minilm` fetched - generic, over seeds (t interval)",
                      seed_cell([e["val"]["fetched"]["loss"] - e["val"]["generic"]["loss"] for e in mem], "+.4f")])
        for other in ("anchor-cont", "dense-2x"):
            diffs = [val_diff(e, "fetched", ev.get(b), "anchor") for e, b in zip(mem, seed_runs(ev, other))]
            if len(diffs) > 1 and all(diffs):
                drows.append([f"`memory-minilm` fetched - `{other}`, seed i with seed i (t interval)",
                              seed_cell([x["diff"] for x in diffs], "+.4f")])
    if drows:
        md += [markdown_table(["difference (paired over the same rows)", "95% interval"], drows), ""]
    return md


def wiki_routing(out: str, res: dict) -> list[str]:
    """Router hit rates on the seen wiki probes: the prompt routed to the leaf holding most of its article's
    training windows, for each clustering of the wiki data (MiniLM k-means, entity keys, sentence-averaged);
    and the memory's gain (fetched - generic, harness items in `res`) on hits and on misses."""
    from data.shards import open_data
    from memory.router import Router
    from train.evaluation.routing import document_hit_rates

    probes_file = os.path.join(out, "wiki", "probes", "wiki_seen.jsonl")
    if not os.path.isfile(probes_file):
        return []
    with open(probes_file) as f:
        probes = [json.loads(line) for line in f if line.strip()]
    rows = []
    for v in WIKI_LEAVES:
        d = os.path.join(out, "wiki", f"data-{v}")
        if not Router.exists(d):
            continue
        r = document_hit_rates(open_data(d), Router.load(d), probes)
        cells = ["—"] * len(HIT_SPLIT_HEADER)
        got = [harness_items(res.get(f"memory-{v}-{m}"), "memlm_wiki_seen") for m in ("fetched", "generic", "oracle")]
        if all(p["id"] in x for x in got for p in probes):
            cells = hit_split_cells(*([x[p["id"]] for p in probes] for x in got), r["hits"])
        rows.append([f"`{v}`", f"{r['consistency']:.3f}", ci_cell(r["hit"]["all"], "share")] + cells)
    if not rows:
        return []
    return ["Routing on real text (seen probes): share of an article's windows in its majority leaf (consistency), "
            "share of probe prompts routed there (hit rate), the memory's gain (fetched − generic) on the probes "
            "routed there (hits) and elsewhere (misses), and what the oracle leaf adds on the misses; knowledge "
            "stored in the leaf that saw the article would help on hits far more than on misses (as on bios, "
            "section 1):", "", markdown_table(["leaves", "consistency", "hit rate"] + HIT_SPLIT_HEADER, rows), ""]


def write_memory_report(out: str, parts: list[str], size: dict, size_name: str, command: str,
                        stage_seconds: dict[str, float], commands: list[str],
                        mech_runs: list[tuple[str, int]], wall_s: float | None = None,
                        lanes: list[str] | None = None) -> tuple[str, list[str]]:
    """<out>/report.md. `wall_s`: wall-clock seconds of the invocation that writes it, whose parts ran in
    `lanes` side by side (a job's --jobs; None: one after the other). Returns (path, PNG paths)."""
    total = sum(stage_seconds.values())
    timing = f"- time of the stages: {total / 60:.1f} min summed over `stages/`"
    if wall_s is not None:
        timing += (f"; this invocation {wall_s / 60:.1f} min wall clock"
                   + (f", parts side by side: {' | '.join(lanes)}" if lanes else ""))
    md = ["# Hierarchical memories: evidence (arXiv 2510.02375 at small scale)", "",
          f"- command: `{command}`", f"- machine, date: {machine_line()}", f"- size `{size_name}`: {json.dumps(size)}",
          timing, ""]
    figs: list[str] = []
    for part, fn in (("mech", lambda: mech_section(out, mech_runs)), ("cap", lambda: cap_section(out, size)),
                     ("wiki", lambda: wiki_section(out))):
        if part in parts:
            m, f = fn()
            md += m
            figs += f
    md += ["## Stage times", "", markdown_table(["stage", "seconds"], [[k, f"{v:.0f}"] for k, v in stage_seconds.items()]),
           "", "## Commands", "", "```"] + [c.replace(os.getcwd() + os.sep, "") for c in commands] + ["```", ""]
    return write_text(os.path.join(out, "report.md"), "\n".join(md)), figs
