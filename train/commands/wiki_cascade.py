"""`memlm wiki-cascade DATA --slm LABEL=RUN ... [--large DIR]`: the cascade on real text (wiki-leads).

DATA is a data dir prepared from wiki-leads. Held-out (--split) leads give exact facts (years, dates,
countries, places, nationalities, occupations; data/wiki_facts.py, spaCy), written once to
DATA/wiki_facts/<split>.jsonl (--facts-only writes them and stops: do it on a machine with spaCy). Each
cloze prompt is the lead up to a fact; every SLM continues it (one sentence, --max-new-tokens decisions)
at every threshold of --taus, with the large model (default SmolLM2-135M) on <CALL>. Scores:
- exact: the completion starts with the fact's answer (whole words); the curve of exact-match rate
  against the call rate at generation, compared at --match-rates with 95% intervals over leads;
- fluency: NLL per token of the text the SLM wrote itself, under --judge (default: the --large model
  when it is a transformers directory), at the same matched rates;
- --diagnose N: per SLM whose label names a selection array calls_<label> in DATA, N factual and N
  non-factual held-out positions that rule delegates: how often the SLM's own word and the large
  model's word equal the text's (needs `memlm tag DATA`; a label without its array is named on the console,
  none with one is an error, both before any generation); --tag-calls: share of generation-time calls on
  spaCy-factual words.
Every --slm must use DATA's tokenizer (the hash its manifest records), checked before any generation.
Writes OUT/wiki_cascade.json, OUT/samples.jsonl and OUT/curves.png.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from train.cli import (ArgumentParser, BOOT_MAX, MAX_NEW_TOKENS, add_device_arg, add_output_args, check_out_dir,
                       nonempty_text, nonnegative_int, number, positive_int, seed)
from train.commands.factscore import _rates, _taus


KIND = "wiki-cascade"  # the kind in the marker of the output directory (model/atomic.py)


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="memlm wiki-cascade", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("data", help="data dir prepared from wiki-leads (`memlm prepare --corpus wiki-leads`)")
    p.add_argument("--slm", action="append", default=[], help="[LABEL=]RUN of an SLM (repeatable)")
    p.add_argument("--large", default=None, help="transformers model dir or memlm run (default: SmolLM2-135M)")
    p.add_argument("--judge", default=None, help="transformers dir scoring fluency (default: --large if HF)")
    p.add_argument("--split", default="val", choices=("train", "val"), help="held-out split whose leads give the facts")
    p.add_argument("--facts-only", action="store_true", help="write DATA/wiki_facts/<split>.jsonl and stop")
    p.add_argument("--kinds", default="year,date,country,place,nationality,occupation", help="fact kinds")
    p.add_argument("--max-leads", type=positive_int, default=150, help="leads sampled (seeded)")
    p.add_argument("--per-lead", type=positive_int, default=2, help="facts per lead (first in text order)")
    p.add_argument("--max-prompt-chars", type=positive_int, default=300, help="facts starting within this many chars")
    p.add_argument("--max-new-tokens", type=number(int, 1, MAX_NEW_TOKENS), default=16, help="SLM decisions per completion")
    p.add_argument("--stop", type=nonempty_text, default=".", help="end a completion once it ends with this text")
    p.add_argument("--taus", type=_taus, default=[0.05, 0.1, 0.2, 0.35, 0.5, None, 1.01], help="thresholds")
    p.add_argument("--match-rates", type=_rates, default=[0.05, 0.1, 0.2], help="matched generation call rates")
    p.add_argument("--area", type=_rates, default=[0.0, 0.2], help="call-rate range LO,HI of the curve's mean")
    p.add_argument("--n-boot", type=number(int, 1, BOOT_MAX), default=1000, help="bootstrap resamples of leads")
    p.add_argument("--batch-size", type=positive_int, default=64, help="prompts generated together")
    p.add_argument("--large-alone", action="store_true", help="also score the large model alone")
    p.add_argument("--diagnose", type=nonnegative_int, default=0, help="call sites per kind and rule")
    p.add_argument("--tag-calls", action="store_true", help="spaCy-tag generation-time calls (needs spaCy)")
    p.add_argument("--seed", type=seed, default=0, help="seed of the lead sample and the bootstrap")
    add_output_args(p, "wiki-cascade", default="wiki_cascade")
    add_device_arg(p)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.out is not None:
        check_out_dir(args.out)
    from data.wiki_facts import KINDS, read_facts
    from train.checkpoint import find_step_dir
    from model.atomic import atomic_dir, atomic_file, atomic_write_json, check_output_dir
    from model.errors import ConfigError
    from train.lacy import wiki
    from train.lacy.cascade import Cascade, HFLargeModel, large_alone_batch, load_large, load_memlm
    from train.lacy.curves import compare, tau_name
    from train.lacy.factscore import check_slm_labels, parse_slm, plot_curves

    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    bad = [k for k in kinds if k not in KINDS]
    if bad or not kinds:
        raise ConfigError(f"--kinds {args.kinds!r}: unknown kind(s) {bad}; choose among {', '.join(KINDS)}")
    if len(args.area) != 2 or not args.area[0] < args.area[1]:
        raise ConfigError(f"--area: need LO,HI with LO < HI, got {args.area}")
    if not args.facts_only:
        if not args.slm and not args.large_alone:
            raise ConfigError("--slm: give at least one --slm RUN (or --large-alone)")
        check_slm_labels(args.slm)
        for spec in args.slm:  # before the facts are parsed and the large model loads
            find_step_dir(parse_slm(spec)[1])
    sources = [args.data, *(parse_slm(spec)[1] for spec in args.slm), *(p for p in (args.large, args.judge) if p)]
    if not args.facts_only:  # --facts-only writes only into the data dir
        check_output_dir(args.out, KIND, args.force, sources=sources)
    from data.shards import open_data
    from model.errors import DataError

    dd = open_data(args.data)
    source = dd.manifest.get("source")
    if source != "wiki-leads":  # before spaCy runs and writes (empty) facts into the data dir
        raise DataError(f"{args.data}: prepared from {source!r}, not wiki-leads; wiki-cascade needs "
                        "`memlm prepare --corpus wiki-leads` data")
    if not args.facts_only:
        from train.build import check_run_tokenizer

        for spec in args.slm:  # the data's lead texts and --diagnose's call sites are read with its tokenizer
            check_run_tokenizer(parse_slm(spec)[1], dd, f"--slm {spec}", flag="DATA")
    diagnose = [] if args.facts_only or not args.diagnose else diagnose_labels(dd, args)
    path = wiki.facts_path(args.data, args.split)
    if args.facts_only or not os.path.isfile(path):
        wiki.build_facts(args.data, args.split)
        if args.facts_only:
            return 0
    leads = wiki.split_leads(args.data, args.split)
    items = wiki.clozes(read_facts(path), leads, kinds, args.max_leads, args.per_lead, args.max_prompt_chars,
                        args.seed)
    if not items:
        raise ConfigError(f"--kinds {args.kinds}: no facts of these kinds in {path} within --max-prompt-chars")
    prompts = [c["cloze_prompt"] for c in items]
    print(f"{len(items)} clozes from {len({c['title'] for c in items})} {args.split} leads; "
          f"thresholds {', '.join(tau_name(t) for t in args.taus)}")
    large = load_large(args.large, device=args.device)
    judge = HFLargeModel(args.judge, device=args.device) if args.judge else large
    if not isinstance(judge, HFLargeModel):
        judge = None
        print("fluency: skipped (no transformers judge: pass --judge DIR)")
    rows, swept, diagnosis, tagged = [], [], {}, {}
    nlp = None
    if args.tag_calls:
        from data.tagging import load_spacy

        nlp = load_spacy()

    def add(label, taus, outs):
        flu = None
        flat = [(c, tau, o) for c, per in zip(items, outs) for tau, o in zip(taus, per)]
        if judge is not None:
            flu = wiki.fluency(judge.model, judge.tokenizer, [o.text for _, _, o in flat],
                               [len(o.prompt) for _, _, o in flat], [o.spans for _, _, o in flat], args.device)
        for i, (c, tau, o) in enumerate(flat):
            ok = wiki.exact(o.completion, c["answer"])
            w0 = len(o.prompt) + len(o.completion) - len(o.completion.lstrip())  # the completion's first word
            w1 = w0 + max(len(wiki.first_word(o.completion)), 1)
            row = {"label": label, "tau": tau, "person": c["title"], "kind": c["kind"], "answer": c["answer"],
                   "text": o.marked(completion_only=True), "correct": int(ok), "stated": 1, "calls": o.calls,
                   "decisions": o.calls + o.slm_tokens,
                   "first_word_delegated": any(s < w1 and w0 < e for s, e in o.spans),
                   "large_tokens": o.large_tokens}
            if flu is not None:
                row["nll"], row["nll_tokens"] = flu[i]
            rows.append(row)

    for spec in args.slm:
        label, run = parse_slm(spec)
        slm, tok, _, router = load_memlm(run, args.device)
        cas = Cascade(slm, tok, large, router=router)
        outs = cas.generate_batch(prompts, args.max_new_tokens, stop=args.stop, taus=args.taus,
                                  batch_size=args.batch_size,
                                  progress=lambda d, t: print(f"    {label}: {d}/{t} prompts", flush=True))
        add(label, args.taus, outs)
        swept.append(label)
        if nlp is not None:
            flat = [o for per in outs for o in per if o.calls]
            tagged[label] = wiki.factual_share_of_calls([o.text for o in flat], [o.spans for o in flat], nlp)
        if label in diagnose:
            sites = wiki.call_sites(args.data, f"calls_{label}", tok, args.diagnose, args.split, args.seed)
            if sites:
                alone = Cascade(slm, tok, None, router=router, allow_calls=False)
                diagnosis[label] = wiki.judge_sites(sites, alone, large, args.batch_size)
    if args.large_alone:
        outs = [[o] for o in large_alone_batch(large, prompts, args.max_new_tokens)]
        for o in outs:  # one sentence, like the cascades
            o[0].text = o[0].prompt + _cut(o[0].completion, args.stop)
            o[0].spans = [(len(o[0].prompt), len(o[0].text))]
        add("large alone", [None], outs)
    curve, diffs = ({}, {}) if not swept else compare(rows, swept, args.match_rates, tuple(args.area), args.n_boot,
                                                      args.seed)
    alone = {}
    if args.large_alone:
        la = [r for r in rows if r["label"] == "large alone"]
        alone = {"exact": sum(r["correct"] for r in la) / len(la), "n": len(la)}
    with atomic_dir(args.out, KIND, replace=args.force, sources=sources) as tmp:
        atomic_write_json(os.path.join(tmp, "wiki_cascade.json"),
                          {"data": args.data, "split": args.split, "large": args.large or "smollm2-135m-instruct",
                           "judge": None if judge is None else (args.judge or args.large or "smollm2-135m-instruct"),
                           "kinds": kinds,
                           "clozes": len(items), "leads": len({c["title"] for c in items}),
                           "kind_counts": {k: sum(c["kind"] == k for c in items) for k in kinds},
                           "taus": [tau_name(t) for t in args.taus], "match_rates": args.match_rates,
                           "runs": dict(map(parse_slm, args.slm)), "curves": curve, "diffs": diffs,
                           "large_alone": alone, "diagnosis": diagnosis, "generation_calls": tagged})
        with atomic_file(os.path.join(tmp, "samples.jsonl")) as f:
            for r in rows:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
        if curve:
            plot_curves(curve, os.path.join(tmp, "curves.png"), "wiki-leads: exact facts vs generation call rate",
                        rates=args.match_rates, ylabel="exact-match rate of cloze answers",
                        second=("nll", "NLL/token of the SLM's own text") if judge is not None
                        else ("facts_per_bio", "clozes"))
    for label, c in curve.items():
        m = c["matched"]
        print(f"{label}: " + ", ".join(f"exact@{r} {m[r]['factscore']['point']:.3f}" for r in m))
    if alone:
        print(f"large alone: exact {alone['exact']:.3f} (n={alone['n']})")
    print(f"wrote {args.out}/wiki_cascade.json, samples.jsonl" + (", curves.png" if curve else ""))
    return 0


def diagnose_labels(dd, args) -> list[str]:
    """The --slm labels that --diagnose can work on: those with a `calls_<label>` array in every shard of the
    split; the others are named on the console. Checked before any generation: the split's `factual` array
    (DataError: run memlm tag), and at least one such label (ConfigError naming --diagnose)."""
    from data.selection import has_array, shards_of
    from model.errors import ConfigError, DataError
    from train.lacy.factscore import parse_slm

    shards = shards_of(dd, args.split)
    if not shards or not all(has_array(sh, "factual") for sh in shards):
        raise DataError(f"--diagnose {args.diagnose}: {args.data} has no 'factual' array in its {args.split} shards; "
                        f"run `memlm tag {args.data}` first (or drop --diagnose)")
    labels = [parse_slm(spec)[0] for spec in args.slm]
    if not labels:
        print(f"--diagnose {args.diagnose}: no --slm to diagnose (it looks at an SLM's calls_<label> sites)")
    have = [lab for lab in labels if all(has_array(sh, f"calls_{lab}") for sh in shards)]
    if labels and not have:
        raise ConfigError(f"--diagnose {args.diagnose}: {args.data} has no selection array calls_<label> for any "
                          f"--slm label ({', '.join(labels)}) in its {args.split} shards; run `memlm select "
                          f"{args.data} --name calls_<label> ...` or drop --diagnose")
    for lab in labels:
        if lab not in have:
            print(f"--diagnose: no calls_{lab} array in {args.data} ({args.split}): no call-site diagnosis for {lab}")
    return have


def _cut(text: str, stop: str | None) -> str:
    """`text` up to and including the first `stop` that ends a sentence (as the cascade's stop check)."""
    if not stop:
        return text
    i = 0
    while True:
        i = text.find(stop, i)
        if i < 0:
            return text
        after = text[i + len(stop):i + len(stop) + 1]
        if not after or after.isspace():
            return text[:i + len(stop)]
        i += len(stop)


if __name__ == "__main__":
    from train.cli import run_command

    sys.exit(run_command("memlm wiki-cascade", main))
