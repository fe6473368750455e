"""`memlm factscore --slm RUN --large PATH --data DATA`: FactScore of the cascade on the bios knowledge base.

For people of every frequency bucket (--per-bucket each), prompt "<Name> was born" and generate; parse
the stated attributes against DATA/bios/kb.json (data/factscore.py) and report the precision of stated
facts (FactScore), facts stated per bio, call rate, and fact leakage (wrong facts the SLM stated itself,
outside delegated spans), overall and per bucket. --slm is repeatable as LABEL=RUN (e.g. one run per
selection rule at the same call rate); --slm-alone adds each SLM without calls, --large-alone the large
model writing everything. Writes OUT/factscore.json, OUT/samples.jsonl and OUT/factscore.png.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="memlm factscore", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--slm", action="append", default=[], help="[LABEL=]RUN of an SLM (repeatable)")
    p.add_argument("--large", default=None, help="transformers model dir or memlm run (default: SmolLM2-135M)")
    p.add_argument("--data", required=True, help="data dir prepared from the bios corpus (has bios/kb.json)")
    p.add_argument("--per-bucket", type=int, default=20, help="people per frequency bucket")
    p.add_argument("--prompt", default="{name} was born", help="opening; {name} is replaced")
    p.add_argument("--max-new-tokens", type=int, default=48, help="SLM decisions per bio")
    p.add_argument("--tau", type=float, default=None, help="call when P(<CALL>) >= tau (default: argmax)")
    p.add_argument("--slm-alone", action="store_true", help="also score each SLM with <CALL> suppressed")
    p.add_argument("--large-alone", action="store_true", help="also score the large model alone")
    p.add_argument("--mode", default="fetched", choices=("fetched", "generic", "anchor"), help="memory SLMs")
    p.add_argument("--seed", type=int, default=0, help="seed for sampling people")
    p.add_argument("--out", default="factscore", help="output directory")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device")
    return p


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


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from data.factscore import FactParser, bios_paths, load_kb, person_buckets, sample_people, summarize
    from data.bios import load_probes
    from model.cascade import Cascade, CascadeError, large_alone, load_large
    from train.checkpoint import load_run

    if not args.slm and not args.large_alone:
        raise SystemExit("memlm factscore: give at least one --slm RUN (or --large-alone)")
    kb_path, probes_path = bios_paths(args.data)
    try:
        kb = load_kb(kb_path)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"memlm factscore: {e}")
    probes = load_probes(probes_path) if os.path.isfile(probes_path) else None
    people = sample_people(kb, person_buckets(kb, probes), args.per_bucket, args.seed)
    parser = FactParser(kb)
    print(f"{len(people)} bios ({args.per_bucket} per bucket) from {kb_path}")
    try:
        large = load_large(args.large, device=args.device)
    except CascadeError as e:
        raise SystemExit(f"memlm factscore: {e}")
    rows = []
    for spec in args.slm:
        label, path = _parse_slm(spec)
        try:
            slm, tok, _, router = load_run(path, device=args.device)
            cas = Cascade(slm, tok, large, tau=args.tau, router=router, mode=args.mode)
        except (FileNotFoundError, ValueError) as e:
            raise SystemExit(f"memlm factscore: {path}: {e}")
        rows += evaluate(lambda p: cas.generate(p, args.max_new_tokens), people, parser, args.prompt, label)
        if args.slm_alone:
            alone = Cascade(slm, tok, None, router=router, mode=args.mode, allow_calls=False)
            rows += evaluate(lambda p: alone.generate(p, args.max_new_tokens), people, parser, args.prompt,
                             f"{label} alone", forced_call_rate=0.0)
    if args.large_alone:
        rows += evaluate(lambda p: large_alone(large, p, args.max_new_tokens), people, parser, args.prompt,
                         "large alone", forced_call_rate=1.0)
    labels = list(dict.fromkeys(r["label"] for r in rows))
    results = {lab: summarize([r for r in rows if r["label"] == lab]) for lab in labels}
    os.makedirs(args.out, exist_ok=True)
    report = {"data": args.data, "large": args.large or "smollm2-135m-instruct", "per_bucket": args.per_bucket,
              "prompt": args.prompt, "max_new_tokens": args.max_new_tokens, "tau": args.tau,
              "runs": {lab: path for lab, path in map(_parse_slm, args.slm)}, "results": results}
    for name, text in (("factscore.json", json.dumps(report, indent=2) + "\n"),
                       ("samples.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))):
        tmp = os.path.join(args.out, name + ".tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, os.path.join(args.out, name))
    plot(results, os.path.join(args.out, "factscore.png"))
    print(_table(results))
    print(f"wrote {args.out}/factscore.json, samples.jsonl, factscore.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
