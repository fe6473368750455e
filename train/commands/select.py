"""`memlm select DATA --rule lacy|loss|rho|random|none --call-rate 0.05`: choose the <CALL> positions.

Writes the uint8 array "calls_<rule>" per shard (1 = this token is delegated: the target predicting it
becomes <CALL>; train with `calls=calls_<rule>`), and a summary DATA/selection/calls_<rule>.{json,md}:
achieved rate per split, threshold, share of delegated tokens that are factual, and examples with the
delegated tokens marked [[like this]]. Each split is calibrated on its own to the same rate.
Signals: "loss_<--loss>" (memlm score), "loss_<--loss-large>" (rho), "factual" (memlm tag).
"""
from __future__ import annotations

import argparse
import re
import sys

from data.selection import RULES
from model.errors import ConfigError
from train.cli import ArgumentParser, nonnegative_int, number, seed
from train.lacy.select import run


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="memlm select", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("data", help="data dir written by `memlm prepare` (tagged / scored as the rule needs)")
    p.add_argument("--rule", required=True, choices=RULES, help="selection rule")
    p.add_argument("--call-rate", type=number(float, 0, 1, low_open=True, high_open=True), default=0.05,
                   help="share of all tokens to delegate, in (0, 1) (0.05 = 5%%)")
    p.add_argument("--seed", type=seed, default=0, help="seed for random selection and tie-breaking")
    p.add_argument("--splits", default="train,val", help="comma-separated splits (missing ones are skipped)")
    p.add_argument("--loss", default="ref", help="reference loss array name suffix (loss_<name>)")
    p.add_argument("--loss-large", default="large", help="large-model loss array suffix for rule rho")
    p.add_argument("--name", default=None, help="output array name calls_<something> (default calls_<rule>)")
    p.add_argument("--examples", type=nonnegative_int, default=5, help="example windows rendered in the summary")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from data.shards import SPLITS

    for flag, value in (("--name", args.name), ("--loss", args.loss), ("--loss-large", args.loss_large)):
        if value is not None and not re.fullmatch(r"\w+", value):
            raise ConfigError(f"{flag} {value!r}: use letters, digits and _ only (it names a shard array file)")
    if args.name is not None and not re.fullmatch(r"calls_\w+", args.name):
        # other names belong to other commands' arrays (windows, paths, factual, loss_ref, ...)
        raise ConfigError(f"--name {args.name!r}: a selection is named calls_<something> (e.g. calls_{args.name}); "
                          "other array names belong to prepare, cluster, tag and score")
    splits = [s.strip() for s in args.splits.split(",") if s.strip()]
    unknown = [s for s in splits if s not in SPLITS]
    if unknown or not splits:
        raise ConfigError(f"--splits {args.splits!r}: unknown split(s) {unknown}; choose among {', '.join(SPLITS)}")
    run(args)
    return 0


if __name__ == "__main__":
    from train.cli import run_command

    sys.exit(run_command("memlm select", main))

