"""`memlm demo`: the end-to-end demo on built-in data (the README's main job).

Every stage is one documented `memlm` command, run in this process; the report lists them so that a
user can re-run any stage by hand. A finished stage leaves `runs/demo/stages/<stage>.json`, so
re-running the demo reuses finished stages (`--fresh` starts over, `--redo STAGE` redoes one and the
stages after it). The demo directory carries memlm's marker listing what the demo created in it: --fresh
and --redo delete only that; a directory the demo did not create is refused unless it is empty.

Stages: data (bios + wiki-leads, tokenizer) -> cluster (MiniLM + k-means tree) -> anchor (tiny
pretraining) -> memory (memories with the anchor frozen) -> eval (fetched / generic / anchor-only)
-> tag + score + select (LaCy <CALL> positions) -> slm (delegating SLM) -> cascade (with SmolLM2)
-> report (runs/demo/report.md with PNG plots).
"""
from __future__ import annotations

import sys

from train.cli import ArgumentParser, job_seed, positive_float, run_command
from train.experiments.demo import Demo, SIZES, STAGES


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog="memlm demo", description=__doc__.split("\n\n")[0] + " Stages: "
                                + ", ".join(STAGES) + ".")
    p.add_argument("--out", default="runs/demo",
                   help="demo directory (default runs/demo): new, empty, or one an earlier demo made")
    p.add_argument("--size", choices=["auto", *SIZES], default="auto",
                   help="auto: gpu when CUDA is available, else cpu (about 6½ minutes on 2 cores)")
    p.add_argument("--seed", type=job_seed, default=0,
                   help="seed of the corpus, the clustering and the training runs")
    p.add_argument("--large", default=None,
                   help="large model of the cascade: a transformers dir or memlm run (default: SmolLM2-135M)")
    p.add_argument("--steps-scale", type=positive_float, default=1.0, help="multiply every training-step count")
    p.add_argument("--fresh", action="store_true",
                   help="start over: delete what an earlier demo created in --out (only that; other files stay)")
    p.add_argument("--redo", choices=STAGES, default=None, help="redo this stage and every stage after it")
    p.add_argument("--until", choices=STAGES, default=None, help="stop after this stage")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    Demo(args).run()
    return 0


if __name__ == "__main__":
    sys.exit(run_command("memlm demo", main))

