"""`memlm select DATA --rule lacy|loss|rho|random|none --call-rate 0.05`: choose the <CALL> positions.

Writes the uint8 array "calls_<rule>" per shard (1 = this token is delegated: the target predicting it
becomes <CALL>; train with `calls=calls_<rule>`), and a summary DATA/selection/calls_<rule>.{json,md}:
achieved rate per split, threshold, share of delegated tokens that are factual, and examples with the
delegated tokens marked [[like this]]. Each split is calibrated on its own to the same rate.
Signals: "loss_<--loss>" (memlm score), "loss_<--loss-large>" (rho), "factual" (memlm tag).
"""
from __future__ import annotations

import os
import sys

import numpy as np

from data.selection import (SelectionError, SplitSignals, call_id, eligible_mask, read_array,
                            render_marked, select, shards_of)


def _signals(dd, shards, rule: str, args, special) -> tuple[SplitSignals, list[int]]:
    need_loss = rule in ("lacy", "loss", "rho")
    parts = {"eligible": [], "loss": [], "loss_large": [], "factual": []}
    sizes = []
    for sh in shards:
        tokens = np.asarray(sh.tokens)
        sizes.append(len(tokens))
        parts["eligible"].append(eligible_mask(tokens, np.asarray(sh.windows), special))
        if need_loss:
            parts["loss"].append(read_array(sh, f"loss_{args.loss}"))
        if rule == "rho":
            parts["loss_large"].append(read_array(sh, f"loss_{args.loss_large}"))
        f = read_array(sh, "factual", required=(rule == "lacy"))
        parts["factual"].append(None if f is None else f.astype(bool))
    cat = lambda xs: None if not xs or any(x is None for x in xs) else np.concatenate(xs)  # noqa: E731
    sig = SplitSignals(eligible=np.concatenate(parts["eligible"]), loss=cat(parts["loss"]),
                       loss_large=cat(parts["loss_large"]), factual=cat(parts["factual"]))
    return sig, sizes


def _examples(tok, shards, masks, n: int) -> list[str]:
    out = []
    for sh, mask in zip(shards, masks):
        w = np.asarray(sh.windows)
        for i in range(len(w) - 1):
            if len(out) >= n:
                return out
            a, b = int(w[i]), int(w[i + 1])
            if mask[a:b].any():
                out.append(render_marked(tok, np.asarray(sh.tokens[a:b]), mask[a:b]))
    return out


def _markdown(summary: dict) -> str:
    lines = [f"# <CALL> selection: rule `{summary['rule']}`, target rate {summary['call_rate']:.2%}", "",
             "| split | tokens | delegated | rate | candidates | threshold | factual share of delegated | factual share of all |",
             "|---|---|---|---|---|---|---|---|"]
    fmt = lambda v: "n/a" if v is None else f"{v:.2%}"  # noqa: E731
    for split, s in summary["splits"].items():
        thr = "n/a" if s["threshold"] is None else f"{s['threshold']:.3f}"
        lines.append(f"| {split} | {s['n_tokens']} | {s['n_delegated']} | {s['rate']:.2%} | {s['n_candidates']} | "
                     f"{thr} | {fmt(s['factual_share_delegated'])} | {fmt(s['factual_share_all'])} |")
    for split, s in summary["splits"].items():
        if s.get("warning"):
            lines += ["", f"**{split}: {s['warning']}**"]
    lines += ["", "## Examples (delegated tokens marked [[like this]])", ""]
    lines += [f"{i + 1}. {ex}".replace("\n", " ") for i, ex in enumerate(summary["examples"])]
    return "\n".join(lines) + "\n"


def run(args) -> dict:
    """Select with `args` (the parsed flags of `memlm select`); every split is computed before any array is
    written, so a split that lacks a signal leaves the data dir as it was. SelectionError names the file."""
    from data.shards import open_data
    from model.atomic import atomic_write, atomic_write_json

    dd = open_data(args.data)
    tok = dd.tokenizer()
    call_id(tok, os.path.join(args.data, "tokenizer"))
    special = list(tok.all_special_ids)
    name = args.name or f"calls_{args.rule}"
    summary = {"rule": args.rule, "call_rate": args.call_rate, "seed": args.seed, "array": name,
               "loss": f"loss_{args.loss}", "splits": {}, "examples": []}
    todo = []
    for split in [s.strip() for s in args.splits.split(",") if s.strip()]:
        shards = shards_of(dd, split)
        if shards:
            todo.append((split, shards, *_signals(dd, shards, args.rule, args, special)))
    if not todo:
        raise SelectionError(f"{args.data}: no shards in splits {args.splits!r}")
    for split, shards, sig, sizes in todo:
        sel = select(args.rule, sig, args.call_rate, seed=args.seed)
        masks = np.split(sel.mask, np.cumsum(sizes)[:-1])
        for sh, m in zip(shards, masks):
            sh.write_array(name, m)
        n_del = int(sel.mask.sum())
        fact_del = fact_all = None
        if sig.factual is not None:
            fact_all = float(sig.factual[sig.eligible].mean()) if sig.eligible.any() else 0.0
            fact_del = float(sig.factual[sel.mask.astype(bool)].mean()) if n_del else None
        s = {"n_tokens": sel.n_tokens, "n_delegated": n_del, "rate": sel.rate, "target": sel.target,
             "n_candidates": sel.n_candidates, "threshold": sel.threshold,
             "factual_share_delegated": fact_del, "factual_share_all": fact_all, "warning": None}
        if sig.loss is not None and n_del:
            s["mean_loss_delegated"] = float(np.nanmean(sig.loss[sel.mask.astype(bool)].astype(np.float32)))
            s["mean_loss_all"] = float(np.nanmean(sig.loss[sig.eligible].astype(np.float32)))
        if sel.shortfall:
            s["warning"] = (f"only {sel.n_candidates} candidate tokens for rule {args.rule!r} "
                            f"({sel.n_candidates / max(sel.n_tokens, 1):.2%} of tokens) < the call rate "
                            f"{args.call_rate:.2%}; all of them were delegated (rate {sel.rate:.2%})")
            print(f"memlm select: warning: {split}: {s['warning']}", file=sys.stderr)
        summary["splits"][split] = s
        if split == "train" or not summary["examples"]:
            summary["examples"] = _examples(tok, shards, masks, args.examples)
        print(f"{split}: {n_del}/{sel.n_tokens} tokens delegated ({sel.rate:.2%}, target {args.call_rate:.2%})"
              + ("" if fact_del is None else f", {fact_del:.1%} of them factual"))
    out_dir = os.path.join(args.data, "selection")
    os.makedirs(out_dir, exist_ok=True)
    atomic_write_json(os.path.join(out_dir, f"{name}.json"), summary, indent=2)
    atomic_write(os.path.join(out_dir, f"{name}.md"), _markdown(summary))
    print(f"wrote array {name!r} and {os.path.join(out_dir, name)}.{{json,md}}")
    return summary
