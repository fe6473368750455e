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
import torch

from train.lacy.factscore import _parse_slm, _table, evaluate, plot


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


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from data.factscore import FactParser, bios_paths, load_kb, person_buckets, sample_people, summarize
    from data.bios import load_probes
    from train.lacy.cascade import Cascade, CascadeError, large_alone, load_large
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

