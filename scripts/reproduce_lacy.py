"""Reproduce LaCy (arXiv 2602.12005) at small scale: cascade FactScore per <CALL> selection rule.

    python scripts/reproduce_lacy.py --quick                  # ~4 min on a 2-core CPU
    python scripts/reproduce_lacy.py                          # default size (~30 min on CPU, minutes on a GPU)
    python scripts/reproduce_lacy.py --quick --call-rate 0.05
    python scripts/reproduce_lacy.py --quick --dry-run        # list the stages and their commands

On `bios` (synthetic biographies with an exact knowledge base):
1. a reference SLM (the tiny anchor) and a bigger "large" memlm model (trained longer) are pretrained;
2. `memlm tag` (spaCy factual flags), `memlm score` with the reference (loss_ref) and with the large
   model (loss_large, for Rho-1's excess loss);
3. `memlm select` with each rule (lacy, loss, rho, random, none) at the same call rate;
4. one SLM per rule: the reference trained the same number of further steps with `data.calls=calls_<rule>`;
5. `memlm factscore`: each SLM in a cascade with the large model, each SLM alone (<CALL> suppressed) and the
   large model alone, on the same people (N per frequency bucket).
Writes <out>/report.md (tables + PNGs); re-running reuses finished stages (train.experiments.stages.StageRunner).

Call rate: 0.10 by default. About 30% of bios tokens are factual (spaCy PROPN/NUM/entities); an answer
("the University of Tokyo", "June 16, 1993") spans several tokens, and at 0.05 the rules delegate little more
than the first token of the hardest answers. At 0.10 `lacy` still delegates only factual tokens (about a third
of them), while `loss` and `rho` spend part of the same budget on non-factual tokens: the comparison the paper makes.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from dataclasses import dataclass

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from train.experiments.stages import StageRunner, recipe, short_path  # noqa: E402

RULES = ("lacy", "loss", "rho", "random", "none")


@dataclass
class Size:
    n_people: int
    top_docs: int
    vocab_size: int
    seq_len: int
    batch_size: int
    ref_steps: int  # the reference SLM (tiny anchor)
    large_preset: str
    large_steps: int
    slm_steps: int  # each rule's SLM: further steps from the reference with <CALL> targets
    lr: float
    per_bucket: int  # FactScore: people per frequency bucket
    max_new_tokens: int
    val_fraction: float


SIZES = {
    "quick": Size(n_people=300, top_docs=150, vocab_size=2048, seq_len=128, batch_size=8, ref_steps=200,
                  large_preset="tiny-2x", large_steps=300, slm_steps=100, lr=3e-3, per_bucket=20, max_new_tokens=40,
                  val_fraction=0.05),
    # ~30 min on 2 CPU cores, minutes on a GPU: 8x the quick corpus and steps (the same passes over the data;
    # see reproduce_memory.py on why not more), 40 people per frequency bucket.
    "default": Size(n_people=2400, top_docs=1200, vocab_size=4096, seq_len=128, batch_size=8, ref_steps=1600,
                    large_preset="tiny-2x", large_steps=2400, slm_steps=800, lr=3e-3, per_bucket=40,
                    max_new_tokens=48, val_fraction=0.05),
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="reproduce_lacy.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--out", default=None,
                   help="output directory (default runs/repro-lacy, or runs/repro-lacy-quick with --quick)")
    p.add_argument("--quick", action="store_true", help="smoke-scale preset (~4 min on a 2-core CPU)")
    p.add_argument("--scale", type=float, default=1.0,
                   help="multiply every step count, the corpus size and the people per bucket")
    p.add_argument("--call-rate", type=float, default=0.10,
                   help="share of training tokens every rule delegates (default 0.10, see above)")
    p.add_argument("--rules", default=",".join(RULES), help=f"comma-separated rules among {', '.join(RULES)}")
    p.add_argument("--seed", type=int, default=0, help="seed of the corpus, training, selection and people sample")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--dry-run", action="store_true", help="print the stages and their commands; run nothing")
    p.add_argument("--fresh", action="store_true", help="delete the output directory first")
    return p


def scaled(size: Size, scale: float) -> Size:
    s = lambda n, lo: max(lo, int(round(n * scale)))  # noqa: E731
    return dataclasses.replace(size, n_people=s(size.n_people, 20), top_docs=s(size.top_docs, 5),
                               ref_steps=s(size.ref_steps, 10), large_steps=s(size.large_steps, 10),
                               slm_steps=s(size.slm_steps, 10), per_bucket=s(size.per_bucket, 2))


class LacyRepro:
    def __init__(self, args, argv: list[str] | None = None):
        self.args = args
        self.size_name = "quick" if args.quick else "default"
        self.size = scaled(SIZES[self.size_name], args.scale)
        self.rules = [r.strip() for r in args.rules.split(",") if r.strip()]
        bad = [r for r in self.rules if r not in RULES]
        if bad:
            raise SystemExit(f"reproduce_lacy.py: --rules: unknown rule {bad}; choose from {list(RULES)}")
        if not 0.0 < args.call_rate < 1.0:
            raise SystemExit(f"reproduce_lacy.py: --call-rate must be in (0, 1), got {args.call_rate}")
        self.out = short_path(args.out or ("runs/repro-lacy-quick" if args.quick else "runs/repro-lacy"))
        self.data = os.path.join(self.out, "data")
        self.runs = os.path.join(self.out, "runs")
        self.stages = StageRunner(self.out, dry_run=args.dry_run)
        self.memlm = self.stages.memlm
        self.command = "python scripts/reproduce_lacy.py " + " ".join(sys.argv[1:] if argv is None else argv)

    def run_dir(self, name: str) -> str:
        return os.path.join(self.runs, name)

    def plan(self) -> list[tuple[str, callable]]:
        out = [("data", self.stage_data), ("ref", self.stage_ref), ("large", self.stage_large),
               ("tag", self.stage_tag), ("score", self.stage_score), ("select", self.stage_select)]
        out += [(f"slm-{r}", lambda r=r: self.stage_slm(r)) for r in self.rules]
        return out + [("factscore", self.stage_factscore), ("report", self.stage_report)]

    # ---- stages -----------------------------------------------------------------------------
    def pretrain(self, name: str, steps: int, *overrides: str) -> None:
        s = self.size
        self.memlm("pretrain", "--config", short_path(recipe("tiny-cpu.yaml")), f"name={name}", f"runs_dir={self.runs}",
                   f"seed={self.args.seed}", f"data.path={self.data}", f"data.seq_len={s.seq_len}",
                   f"data.batch_size={s.batch_size}", f"trainer.max_steps={steps}",
                   f"trainer.val_every={max(steps // 5, 1)}", "trainer.val_batches=8",
                   f"trainer.log_every={max(steps // 20, 1)}", f"checkpoint.every={steps}", "checkpoint.keep_last_k=1",
                   "logging.logger=none", f"optim.lr={s.lr}", f"optim.min_lr={s.lr / 10:g}",
                   f"optim.warmup_steps={max(steps // 20, 1)}", *overrides)

    def stage_data(self):
        s = self.size
        self.memlm("prepare", "--corpus", "bios", "--out", self.data, "--n-people", s.n_people, "--top-docs",
                   s.top_docs, "--vocab-size", s.vocab_size, "--window-tokens", s.seq_len, "--val-fraction",
                   s.val_fraction, "--seed", self.args.seed, "--no-progress")

    def stage_ref(self):
        self.pretrain("ref", self.size.ref_steps, "model.preset=tiny")

    def stage_large(self):
        self.pretrain("large", self.size.large_steps, f"model.preset={self.size.large_preset}")

    def stage_tag(self):
        self.memlm("tag", self.data)

    def stage_score(self):
        self.memlm("score", self.data, "--model", self.run_dir("ref"), "--name", "ref")
        self.memlm("score", self.data, "--model", self.run_dir("large"), "--name", "large")

    def stage_select(self):
        for rule in self.rules:
            self.memlm("select", self.data, "--rule", rule, "--call-rate", self.args.call_rate,
                       "--seed", self.args.seed, "--loss", "ref", "--loss-large", "large")

    def stage_slm(self, rule: str):
        # Same start (the reference) and the same steps for every rule; only the <CALL> targets differ.
        self.pretrain(f"slm-{rule}", self.size.slm_steps, "model.preset=tiny", f"init_from={self.run_dir('ref')}",
                      f"data.calls=calls_{rule}")

    def stage_factscore(self):
        s = self.size
        slms = [a for r in self.rules for a in ("--slm", f"{r}={self.run_dir('slm-' + r)}")]
        self.memlm("factscore", *slms, "--large", self.run_dir("large"), "--data", self.data, "--slm-alone",
                   "--large-alone", "--per-bucket", s.per_bucket, "--max-new-tokens", s.max_new_tokens,
                   "--seed", self.args.seed, "--out", os.path.join(self.out, "factscore"))

    def stage_report(self):
        from train.experiments.lacy_report import write_lacy_report

        stages = [name for name, _ in self.plan() if name != "report"]
        seconds = {st: (self.stages.done(st) or {}).get("_seconds", 0.0) for st in stages}
        path, figs = write_lacy_report(self.out, self.data, {"ref": self.run_dir("ref"), "large": self.run_dir("large")},
                                       self.rules, self.args.call_rate, dataclasses.asdict(self.size), self.size_name,
                                       self.command, seconds, self.stages.all_commands(stages))
        return {"report": path, "figures": figs}

    # ---- driver -----------------------------------------------------------------------------
    def run(self) -> None:
        settings = {"size": dataclasses.asdict(self.size), "rules": self.rules, "seed": self.args.seed,
                    "call_rate": self.args.call_rate}
        self.stages.run_job("reproduce_lacy", self.plan(), settings, fresh=self.args.fresh,
                            summary=f"size {self.size_name} x{self.args.scale}, rules {self.rules}, "
                                    f"call rate {self.args.call_rate}")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    LacyRepro(args, argv).run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
