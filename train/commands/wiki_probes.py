"""`memlm wiki-probes DATA --out DIR`: knowledge probes from the wiki-leads articles of a data dir.

Exact-answer clozes (years, dates, countries, places, nationalities, occupations; data/wiki_facts.py)
from the train articles ("seen") and the val articles ("held-out"), each with n-1 distractors of the same
kind with the closest training counts and the answer's count in training. Writes DIR/wiki_seen.jsonl,
DIR/wiki_heldout.jsonl and lm-eval task files memlm_wiki_seen / memlm_wiki_heldout (score them with
`memlm harness RUN --include-path DIR --tasks memlm_wiki_seen,memlm_wiki_heldout`). DIR is written under a
temporary name and renamed into place with memlm's marker; an existing DIR is replaced only when it holds
earlier probes and --force is given. Needs spaCy's
English pipeline (parses ~50 leads/s on 2 cores).
"""
from __future__ import annotations

import argparse
import sys

from train.cli import ArgumentParser, add_output_args, check_out_dir, nonnegative_int, number, positive_int


KIND = "wiki-probes"  # the kind in the marker of the output directory (model/atomic.py)


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="memlm wiki-probes", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("data", help="data dir prepared from --corpus wiki-leads")
    add_output_args(p, "wiki-probes", required=True, what="the probe files and task YAMLs")
    p.add_argument("--choices", type=number(int, 2), default=4,
                   help="choices per probe, the answer included (>= 2, default 4)")
    p.add_argument("--max-per-set", type=positive_int, default=None, help="at most N probes per set (seeded sample)")
    p.add_argument("--seed", type=nonnegative_int, default=0, help="seed of the choice order and of the sample")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.out is not None:
        check_out_dir(args.out)
    from data.shards import open_data
    from model.atomic import atomic_dir, check_output_dir
    from train.evaluation.wiki_probes import build_wiki_probes

    check_output_dir(args.out, KIND, args.force, sources=[args.data])  # before the leads are parsed
    data = open_data(args.data)
    with atomic_dir(args.out, KIND, replace=args.force, sources=[args.data]) as tmp:
        s = build_wiki_probes(data, tmp, n_choices=args.choices, max_per_set=args.max_per_set, seed=args.seed,
                              final_dir=args.out)
    for name, v in s.items():
        print(f"memlm wiki-probes: {name}: {v['n']} probes ({', '.join(f'{k} {n}' for k, n in sorted(v['kinds'].items()))})")
    print(f"memlm wiki-probes: wrote {args.out}")
    return 0


if __name__ == "__main__":
    from train.cli import run_command

    sys.exit(run_command("memlm wiki-probes", main))
