"""`memlm factscore --slm RUN --large PATH --data DATA`: FactScore of the cascade on the bios knowledge base.

For people of every frequency bucket (--per-bucket each), prompt "<Name> was born" and generate; parse
the stated attributes against DATA/bios/kb.json (data/factscore.py) and report the precision of stated
facts (FactScore), facts stated per bio, call rate, and fact leakage (wrong facts the SLM stated itself,
outside delegated spans), overall and per bucket. --slm is repeatable as LABEL=RUN (e.g. one run per
selection rule at the same call rate); --slm-alone adds each SLM without calls, --large-alone the large
model writing everything.

--taus sweeps the threshold (all prompts and thresholds run as one batched cascade): each SLM gets a
curve of FactScore and facts per bio against the call rate *at generation*, the curve at matched call
rates (--match-rates, linear interpolation between sweep points, never extrapolated) and its mean over
--area, with 95% intervals from resampling people, and paired differences between SLMs.
--speed-check N times the one-prompt loop against the batched cascade on N prompts (same run).
Writes OUT/factscore.json, OUT/samples.jsonl (one row per bio and threshold) and, with --taus, OUT/curves.png.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from train.cli import (ArgumentParser, BOOT_MAX, MAX_NEW_TOKENS, add_device_arg, add_output_args, check_out_dir,
                       nonempty_text, nonnegative_int, number, positive_int, probability, seed)


def _taus(text: str) -> list:
    out = []
    for part in text.split(","):
        part = part.strip()
        if part == "argmax":
            out.append(None)
            continue
        try:
            v = float(part)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be comma-separated numbers or 'argmax', got {part!r}") from None
        if not v >= 0:
            raise argparse.ArgumentTypeError(f"thresholds must be >= 0, got {part!r}")
        out.append(v)
    if not out:
        raise argparse.ArgumentTypeError("no thresholds given")
    return out


def _rates(text: str) -> list[float]:
    try:
        out = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be comma-separated numbers in [0, 1], got {text!r}") from None
    if not out or any(not 0 <= x <= 1 for x in out):
        raise argparse.ArgumentTypeError(f"must be comma-separated numbers in [0, 1], got {text!r}")
    return out


KIND = "factscore"  # the kind in the marker of the output directory (model/atomic.py)


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="memlm factscore", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--slm", action="append", default=[], help="[LABEL=]RUN of an SLM (repeatable)")
    p.add_argument("--large", default=None, help="transformers model dir or memlm run (default: SmolLM2-135M)")
    p.add_argument("--data", required=True, help="data dir prepared from the bios corpus (has bios/kb.json)")
    p.add_argument("--per-bucket", type=positive_int, default=20, help="people per frequency bucket")
    p.add_argument("--prompt", default="{name} was born", help="opening; {name} is replaced")
    p.add_argument("--max-new-tokens", type=number(int, 1, MAX_NEW_TOKENS), default=48, help="SLM decisions per bio")
    p.add_argument("--stop", type=nonempty_text, default=None, help='end a bio once it ends with this text (e.g. ".")')
    p.add_argument("--tau", type=probability, default=None, help="call when P(<CALL>) >= tau (default: argmax)")
    p.add_argument("--taus", type=_taus, default=None,
                   help="sweep thresholds, e.g. 0.02,0.05,0.1,0.2,argmax,1.01 (a value > 1 never calls)")
    p.add_argument("--match-rates", type=_rates, default=[0.05, 0.1, 0.2],
                   help="generation call rates where the sweeps are compared (default 0.05,0.1,0.2)")
    p.add_argument("--area", type=_rates, default=[0.0, 0.2], help="call-rate range LO,HI of the curve's mean")
    p.add_argument("--n-boot", type=number(int, 1, BOOT_MAX), default=1000, help="bootstrap resamples of people")
    p.add_argument("--batch-size", type=positive_int, default=64, help="prompts generated together")
    p.add_argument("--slm-alone", action="store_true", help="also score each SLM with <CALL> suppressed")
    p.add_argument("--large-alone", action="store_true", help="also score the large model alone")
    p.add_argument("--speed-check", type=nonnegative_int, default=0,
                   help="time the one-prompt loop vs the batched cascade on this many prompts (first --slm)")
    p.add_argument("--mode", default="fetched", choices=("fetched", "generic", "anchor"), help="memory SLMs")
    p.add_argument("--seed", type=seed, default=0, help="seed for sampling people (and the bootstrap)")
    add_output_args(p, "factscore", default="factscore")
    add_device_arg(p)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.out is not None:
        check_out_dir(args.out)
    from data.bios import load_probes
    from data.factscore import FactParser, bios_paths, load_kb, person_buckets, sample_people, summarize
    from model.atomic import atomic_dir, atomic_file, atomic_write_json, check_output_dir
    from model.errors import ConfigError, DataError
    from train.checkpoint import find_step_dir
    from train.lacy.cascade import Cascade, large_alone_batch, load_large, load_memlm
    from train.evaluation.stats import ratio_ci
    from train.lacy.factscore import (check_slm_labels, curves, evaluate, parse_slm, plot_curves, speed_check, table,
                                      tau_name)

    if not args.slm and not args.large_alone:
        raise ConfigError("--slm: give at least one --slm RUN (or --large-alone)")
    if len(args.area) != 2 or not args.area[0] < args.area[1]:
        raise ConfigError(f"--area: need LO,HI with LO < HI, got {args.area}")
    try:
        args.prompt.format(name="Ada Lovelace")
    except (KeyError, IndexError, ValueError) as e:
        raise ConfigError(f"--prompt {args.prompt!r}: bad placeholder ({e!r}); the only one is {{name}}") from None
    check_slm_labels(args.slm)
    for spec in args.slm:  # before the large model loads
        find_step_dir(parse_slm(spec)[1])
    sources = [args.data, *(parse_slm(spec)[1] for spec in args.slm), *([args.large] if args.large else [])]
    check_output_dir(args.out, KIND, args.force, sources=sources)
    kb_path, probes_path = bios_paths(args.data)
    try:
        kb = load_kb(kb_path)
    except (FileNotFoundError, ValueError) as e:
        raise DataError(str(e)) from e
    probes = load_probes(probes_path) if os.path.isfile(probes_path) else None
    try:
        people = sample_people(kb, person_buckets(kb, probes), args.per_bucket, args.seed)
        parser = FactParser(kb)
    except (KeyError, TypeError, AttributeError) as e:
        raise DataError(f"{kb_path}: damaged knowledge base (a person lacks {e}); prepare the bios data again") from None
    from data.shards import open_data
    from train.build import check_run_tokenizer

    dd = open_data(args.data)
    for spec in args.slm:  # every SLM was trained on this data's tokenizer, checked before any generation
        check_run_tokenizer(parse_slm(spec)[1], dd, f"--slm {spec}")
    taus = args.taus or [args.tau]
    print(f"{len(people)} bios ({args.per_bucket} per bucket) from {kb_path}; thresholds "
          f"{', '.join(tau_name(t) for t in taus)}")
    large = load_large(args.large, device=args.device)
    rows, speed, swept = [], None, []
    bar = lambda done, total: print(f"    {done}/{total} prompts", flush=True)  # noqa: E731
    for spec in args.slm:
        label, path = parse_slm(spec)
        slm, tok, _, router = load_memlm(path, args.device)
        cas = Cascade(slm, tok, large, router=router, mode=args.mode)
        if args.speed_check and speed is None:
            speed = {"slm": label, **speed_check(cas, [args.prompt.format(name=p["name"]) for p, _ in people]
                                                 [:args.speed_check], taus, args.max_new_tokens, args.stop,
                                                 args.batch_size)}
            print(f"speed ({label}, {speed['generations']} generations): one prompt at a time "
                  f"{speed['one_prompt_per_s']:.2f}/s, batched {speed['batched_per_s']:.2f}/s "
                  f"({speed['speedup']:.1f}x), identical outputs {speed['identical']:.1%}")
        gen = lambda ps, c=cas: c.generate_batch(ps, args.max_new_tokens, stop=args.stop, taus=taus,  # noqa: E731
                                                 batch_size=args.batch_size, progress=bar)
        rows += evaluate(gen, people, parser, args.prompt, label, taus)
        if len(taus) > 1:
            swept.append(label)
        if args.slm_alone:
            alone = Cascade(slm, tok, None, router=router, mode=args.mode, allow_calls=False)
            gen = lambda ps, c=alone: c.generate_batch(ps, args.max_new_tokens, stop=args.stop,  # noqa: E731
                                                       batch_size=args.batch_size)
            rows += evaluate(gen, people, parser, args.prompt, f"{label} alone", [None], forced_call_rate=0.0)
    if args.large_alone:
        gen = lambda ps: [[o] for o in large_alone_batch(large, ps, args.max_new_tokens)]  # noqa: E731
        rows += evaluate(gen, people, parser, args.prompt, "large alone", [None], forced_call_rate=1.0)
    results = {}
    for lab in dict.fromkeys(r["label"] for r in rows):
        mine = [r for r in rows if r["label"] == lab]
        for tau in dict.fromkeys(r["tau"] for r in mine):
            key = lab if len(taus) == 1 or lab not in swept else f"{lab} tau={tau_name(tau)}"
            sel = [r for r in mine if r["tau"] == tau]
            ci = ratio_ci([r["correct"] for r in sel], [r["stated"] for r in sel], [r["person"] for r in sel],
                          n_boot=args.n_boot, seed=args.seed)
            results[key] = {"label": lab, "tau": tau, **summarize(sel), "factscore_ci": ci.to_dict()}
    curve, diffs = ({}, {}) if not swept else curves(rows, swept, args.match_rates, tuple(args.area), args.n_boot,
                                                     args.seed)
    report = {"data": args.data, "large": args.large or "smollm2-135m-instruct", "per_bucket": args.per_bucket,
              "prompt": args.prompt, "max_new_tokens": args.max_new_tokens, "stop": args.stop,
              "taus": [tau_name(t) for t in taus], "match_rates": args.match_rates, "area": args.area,
              "runs": dict(map(parse_slm, args.slm)), "results": results, "curves": curve, "diffs": diffs,
              "speed": speed}
    with atomic_dir(args.out, KIND, replace=args.force, sources=sources) as tmp:
        atomic_write_json(os.path.join(tmp, "factscore.json"), report)
        with atomic_file(os.path.join(tmp, "samples.jsonl")) as f:
            for r in rows:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
        if curve:
            plot_curves(curve, os.path.join(tmp, "curves.png"), rates=args.match_rates)
    print(table(results))
    print(f"wrote {args.out}/factscore.json, samples.jsonl" + (", curves.png" if curve else ""))
    return 0


if __name__ == "__main__":
    from train.cli import run_command

    sys.exit(run_command("memlm factscore", main))
