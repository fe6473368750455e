"""Plots and markdown reports built from what runs wrote (metrics.jsonl, eval.json, cascade outputs).

Nothing here computes a result: every number in a report is read from a file a command wrote.
"""
from __future__ import annotations

import json
import os

import matplotlib

matplotlib.use("Agg")  # files only; no display on servers
import matplotlib.pyplot as plt  # noqa: E402

MODES = ("fetched", "generic", "anchor")
MODE_COLORS = {"fetched": "tab:blue", "generic": "tab:orange", "anchor": "tab:gray"}


def save_figure(fig, out_png: str) -> str:
    """Lay out, write `fig` as PNG atomically (a killed run leaves no half image), close it; returns the path."""
    from model.atomic import atomic_path

    fig.tight_layout()
    with atomic_path(out_png) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)
    return out_png


def read_metrics(run_dir: str) -> list[dict]:
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def plot_run_curves(runs: dict[str, str], out_png: str) -> str:
    """One panel per run: its training loss (and its own validation loss) against its steps. Runs train
    and validate on different token streams (rows packed by leaf, <CALL> targets), so their losses are
    never drawn on one axis; compare models with `memlm eval` on the same tokens instead."""
    fig, axes = plt.subplots(1, max(len(runs), 1), figsize=(4 * max(len(runs), 1), 3.5), squeeze=False)
    for ax, (i, (label, run_dir)) in zip(axes[0], enumerate(runs.items())):
        rows = read_metrics(run_dir)
        train = [(r["step"], r["loss"]) for r in rows if r.get("loss") is not None]
        val = [(r["step"], r["val_loss"]) for r in rows if r.get("val_loss") is not None]
        if train:
            ax.plot(*zip(*train), color=f"C{i}", label="train")
        if val:
            ax.plot(*zip(*val), "o--", color=f"C{i}", label="val (this run's rows)")
        ax.set_title(label)
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel("loss (nats/token)")
    return save_figure(fig, out_png)


def plot_loss_curves(runs: dict[str, str], out_png: str, title: str = "Training and validation loss",
                     offsets: dict[str, int] | None = None) -> str:
    """One line per run for the training loss, dots for validation loss, against optimizer steps.
    offsets: {label: steps} shifts a run that continues another one (a second training phase)."""
    fig, ax = plt.subplots(figsize=(7, 4))
    for i, (label, run_dir) in enumerate(runs.items()):
        rows = read_metrics(run_dir)
        color = f"C{i}"
        off = (offsets or {}).get(label, 0)
        train = [(r["step"] + off, r["loss"]) for r in rows if r.get("loss") is not None]
        val = [(r["step"] + off, r["val_loss"]) for r in rows if r.get("val_loss") is not None]
        if train:
            ax.plot(*zip(*train), color=color, label=f"{label} (train)")
        if val:
            ax.plot(*zip(*val), "o--", color=color, label=f"{label} (val)")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return save_figure(fig, out_png)


def bucket_order(names) -> list[str]:
    """Bucket keys in order: bucket_0 (rarest) ... then "all"."""
    return sorted(set(names), key=lambda b: (b == "all", int(str(b).split("_")[-1]) if b != "all" else 0))


def probe_labels(probes: dict) -> list[str]:
    """Probe rows in display order: fetched (router), fetched_top*, fetched_oracle, generic, anchor."""
    order = ["fetched"] + sorted(k for k in probes if k.startswith("fetched_top")) + ["fetched_oracle", "generic", "anchor"]
    return [k for k in order if k in probes]


def plot_memory_eval(ev: dict, out_png: str, title: str = "Memory: fetched vs generic vs anchor-only") -> str:
    """Left: validation loss per mode. Right: probe accuracy per frequency bucket per mode."""
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    modes = [m for m in MODES if m in ev.get("val", {})]
    losses = [ev["val"][m]["loss"] for m in modes]
    bars = ax1.bar(modes, losses, color=[MODE_COLORS[m] for m in modes])
    for b, v in zip(bars, losses):
        ax1.text(b.get_x() + b.get_width() / 2, v, f"{v:.3f}", ha="center", va="bottom", fontsize=8)
    lo = min(losses) if losses else 0
    ax1.set_ylim(lo * 0.95, max(losses) * 1.02 if losses else 1)
    ax1.set_ylabel("validation loss")
    ax1.set_title("validation loss (lower is better)")
    probes = ev.get("probes") or {}
    if probes:
        buckets = bucket_order(b for m in probes for b in probes[m])
        labels_ = probe_labels(probes)
        width = 0.8 / max(len(labels_), 1)
        for j, m in enumerate(labels_):
            cells = [probes[m].get(b, {}) for b in buckets]
            accs = [c.get("acc", 0.0) for c in cells]
            err = [[max(a - c.get("lo", a), 0) for a, c in zip(accs, cells)],
                   [max(c.get("hi", a) - a, 0) for a, c in zip(accs, cells)]]
            xs = [i + (j - (len(labels_) - 1) / 2) * width for i in range(len(buckets))]
            ax2.bar(xs, accs, width=width, color=MODE_COLORS.get(m, f"C{j + 3}"), label=m, yerr=err, capsize=2)
        labels = []
        for b in buckets:
            n = next((probes[m][b].get("n") for m in probes if b in probes[m]), None)
            labels.append(f"{b}\n(n={n})" if n is not None else str(b))
        ax2.set_xticks(range(len(buckets)), labels, fontsize=8)
        ax2.set_ylabel("probe accuracy (greedy, exact answer)")
        ax2.set_title("bios probes by frequency bucket (0 = rarest)")
        ax2.legend(fontsize=8)
    fig.suptitle(title)
    return save_figure(fig, out_png)


def eval_table(ev: dict) -> str:
    """Markdown: one row per mode (and probe routing) with validation loss/ppl and the probe accuracy of
    each bucket with its 95% interval."""
    probes = ev.get("probes") or {}
    buckets = bucket_order(b for m in probes for b in probes[m])
    head = "| mode | val loss | val ppl | " + " | ".join(f"acc {b}" for b in buckets) + " |"
    lines = [head, "|" + "---|" * (3 + len(buckets))]
    rows = [m for m in MODES if m in ev.get("val", {})]
    rows += [m for m in probe_labels(probes) if m not in rows]
    for m in rows:
        v = ev.get("val", {}).get(m)
        accs = [probes.get(m, {}).get(b) for b in buckets]
        cells = " | ".join("—" if a is None else (f"{a['acc']:.3f} [{a['lo']:.3f}, {a['hi']:.3f}]" if "lo" in a
                                                  else f"{a['acc']:.3f}") for a in accs)
        vl = f"{v['loss']:.4f} | {v['ppl']:.2f}" if v else "— | —"
        lines.append(f"| {m} | {vl} | {cells} |")
    return "\n".join(lines)


def write_demo_report(out: str, runs: str, info: dict, commands: list[str], size: dict, size_name: str,
                      seed: int) -> str:
    """runs/demo/report.md with its PNGs beside it."""
    import platform
    import time

    import torch

    figs = {}
    figs["loss"] = plot_run_curves({name: os.path.join(runs, name) for name in ("anchor", "memory", "slm")
                                    if os.path.isdir(os.path.join(runs, name))},
                                   os.path.join(out, "loss_curves.png"))
    ev = None
    if info.get("eval"):
        with open(info["eval"]["eval"]) as f:
            ev = json.load(f)
        figs["memory"] = plot_memory_eval(ev, os.path.join(out, "memory_eval.png"))

    total = sum((v or {}).get("_seconds", 0) for v in info.values())
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({os.cpu_count()} cores)"
    md = [f"# memlm demo report", "",
          f"Generated {time.strftime('%Y-%m-%d %H:%M')} on {device}, {platform.python_version()}, "
          f"torch {torch.__version__}; size `{size_name}`, seed {seed}; stages took {total / 60:.1f} min.",
          "", "Every number below was read from the files the stages wrote.", ""]
    data = info.get("data") or {}
    md += ["## Data", "",
           f"`bios` (synthetic biographies with a knowledge base) mixed with `wiki-leads` (Wikipedia lead "
           f"paragraphs, CC BY-SA 4.0): {data.get('train_tokens', 0):,} training tokens, "
           f"{data.get('val_tokens', 0):,} validation tokens; clustered into a {len(size['memory_widths'])}-level tree "
           f"with k={size['k']} (MiniLM embeddings + FAISS k-means).", ""]
    md += ["## Training", "", f"![loss curves]({os.path.basename(figs['loss'])})", "",
           f"`anchor`: tiny anchor pretrained for {size['anchor_steps']} steps. `memory`: hierarchical memories "
           f"trained for {size['memory_steps']} steps with the anchor frozen (rows packed from one cluster leaf). "
           f"`slm`: the anchor trained {size['slm_steps']} more steps with `<CALL>` targets (LaCy).", ""]
    if ev is not None:
        md += ["## Memory: fetched vs generic vs anchor-only", "", f"![memory eval]({os.path.basename(figs['memory'])})",
               "", eval_table(ev), "",
               "*fetched*: the blocks of the context's cluster path; *generic*: the one block not tied to the "
               "context (the paper's control); *anchor*: no memory.", ""]
    sel = (info.get("lacy") or {}).get("selection")
    if sel:
        s = sel["splits"].get("train", {})
        fact = s.get("factual_share_delegated")
        md += ["## LaCy `<CALL>` selection", "",
               f"Rule `{sel['rule']}` at target rate {sel['call_rate']:.1%}: {s.get('n_delegated', 0):,} of "
               f"{s.get('n_tokens', 0):,} training tokens delegated ({s.get('rate', 0):.2%})"
               + ("" if fact is None else f", {fact:.0%} of them factual") + ". Examples (delegated tokens in "
               "[[brackets]]):", ""]
        md += [f"- {ex}".replace("\n", " ") for ex in sel.get("examples", [])[:3]] + [""]
    outs = (info.get("cascade") or {}).get("outputs")
    if outs:
        md += ["## Cascade with the large model", "",
               "The SLM writes; where it emits `<CALL>` the large model finishes the word (⟦marked⟧). For bios "
               "prompts, *truth* is the knowledge base's answer (SmolLM2 does not know these synthetic people: the "
               "calls show where the SLM delegates).", "",
               "| prompt | output | truth | calls | SLM tokens | large tokens |", "|---|---|---|---|---|---|"]
        for o in outs:
            text = o["marked"][len(o["prompt"]):].replace("|", "\\|").replace("\n", " ")
            md.append(f"| {o['prompt']} | {text} | {o.get('answer') or '—'} | {o['calls']} | {o['slm_tokens']} | "
                      f"{o['large_tokens']} |")
        md.append("")
    md += ["## Commands", "", "Each stage is one `memlm` command; re-run any of them by hand:", "", "```"]
    md += commands + ["```", ""]
    path = os.path.join(out, "report.md")
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write("\n".join(md))
    os.replace(tmp, path)
    return path


# ---- reproductions (scripts/reproduce_memory.py, scripts/reproduce_lacy.py) ----------------------------

def write_text(path: str, text: str) -> str:
    from model.atomic import atomic_write

    atomic_write(path, text)
    return path


def machine_line() -> str:
    """'2026-01-01 12:00, CPU (2 cores), Python 3.11.9, torch 2.13.0+cpu' for report headers."""
    import platform
    import time

    import torch

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({os.cpu_count()} cores)"
    return (f"{time.strftime('%Y-%m-%d %H:%M %Z')}, {device}, {platform.platform(terse=True)}, "
            f"Python {platform.python_version()}, torch {torch.__version__}")


def markdown_table(header: list[str], rows: list[list]) -> str:
    """Cells are written as given (format numbers before); None becomes an em dash."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        lines.append("| " + " | ".join("—" if c is None else str(c).replace("|", "\\|") for c in row) + " |")
    return "\n".join(lines)


def _fmt(v, spec=".3f"):
    return None if v is None else format(v, spec)
