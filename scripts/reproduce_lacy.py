"""Reproduce LaCy (arXiv 2602.12005) at small scale: cascade FactScore per <CALL> rule, as curves over the
call rate at generation, on synthetic bios and on real text (wiki-leads), with memory, and calibration.

    python scripts/reproduce_lacy.py                          # default size (CPU), runs/repro-lacy/report.md
    python scripts/reproduce_lacy.py --size quick             # minutes-scale smoke run
    python scripts/reproduce_lacy.py --size gpu --prepare-only   # on a CPU machine with spaCy/faiss/MiniLM
    python scripts/reproduce_lacy.py --size gpu               # then on the GPU machine (same --out)
    python scripts/reproduce_lacy.py --dry-run                # list the stages and their commands

bios (exact knowledge base):
1. a reference SLM (tiny) and a large memlm model trained long enough to know the bios (its FactScore alone
   is reported next to every SLM's);
2. `memlm tag` (spaCy), `memlm score` with the reference and the large model (Rho-1's excess loss);
3. `memlm select` per rule (lacy, loss, rho, random, none) at two training call rates; one SLM per rule and
   rate, trained from the reference for the same steps;
4. memory + delegation: the reference + hierarchical memories co-trained with lacy's <CALL> targets, and
   without <CALL> targets (`memlm cluster` first);
5. `memlm factscore --taus ...`: every SLM in the cascade at a sweep of thresholds τ (batched), curves of
   FactScore and facts per bio against the call rate at generation, compared at matched rates with 95%
   intervals over people; a speed check of the batched cascade against the one-prompt loop;
6. `memlm calibrate`: AUROC / ECE of P(<CALL>) for the SLM's own errors, factual vs non-factual positions.
wiki-leads (real text): tag, reference and rho's large model, one SLM per rule, `memlm wiki-cascade` with
SmolLM2-135M as the large model (exact facts of held-out leads, fluency, call-site diagnosis), calibration.
Writes <out>/report.md; re-running reuses finished stages (train.experiments.stages.StageRunner).

GPU: no spaCy, faiss, MiniLM or SmolLM2 files there. `--prepare-only` runs the stages that need them (data,
tagging, clustering, wiki facts) on a CPU machine; carry <out> (a few MB) to the GPU and run the same
command without it. On the GPU the wiki cascade's large model is rho's memlm large model (SmolLM2 cannot
be carried) and the memory rows are left out (routing a prompt needs MiniLM).
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import shlex
import sys
from dataclasses import dataclass

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from train.cli import (ArgumentParser, check_out_dir, comma_list, job_seed, number, positive_float,  # noqa: E402
                       positive_int)
from train.experiments.stages import StageRunner, checkpoint_every, recipe, short_path  # noqa: E402

RULES = ("lacy", "loss", "rho", "random", "none")
PARTS = ("bios", "memory", "wiki")
CPU_ONLY = ("bios-data", "bios-tag", "bios-cluster", "wiki-data", "wiki-tag", "wiki-facts")


@dataclass
class Size:
    # bios
    n_people: int
    top_docs: int
    vocab_size: int
    seq_len: int
    batch_size: int
    ref_steps: int            # the reference SLM (tiny anchor)
    large_preset: str
    large_steps: int
    large_batch: int          # the large model trains on more tokens per step (many passes over the bios)
    slm_steps: int            # each rule's SLM (and each memory SLM): further steps from the reference
    lr: float
    per_bucket: int           # FactScore: people per frequency bucket
    max_new_tokens: int
    taus: str                 # the threshold sweep
    mem_k: int
    mem_widths: tuple
    # wiki-leads
    wiki_docs: int
    wiki_vocab: int
    wiki_ref_steps: int
    wiki_large_preset: str
    wiki_large_steps: int
    wiki_slm_steps: int
    wiki_leads: int           # held-out leads prompted (2 facts each)
    wiki_taus: str
    calib_windows: int
    speed_prompts: int


SIZES = {
    "quick": Size(n_people=300, top_docs=150, vocab_size=2048, seq_len=128, batch_size=8, ref_steps=150,
                  large_preset="tiny-2x", large_steps=300, large_batch=8, slm_steps=60, lr=3e-3, per_bucket=8,
                  max_new_tokens=32, taus="0.02,0.1,0.3,argmax,1.01", mem_k=4, mem_widths=(16, 8),
                  wiki_docs=1500, wiki_vocab=2048, wiki_ref_steps=150, wiki_large_preset="tiny-2x",
                  wiki_large_steps=150, wiki_slm_steps=60, wiki_leads=20, wiki_taus="0.05,0.2,argmax,1.01",
                  calib_windows=100, speed_prompts=8),
    # <= 90 min on an idle 2-core CPU. bios: 300 people; the large model makes ~58 passes and knows the bios
    # (FactScore alone 0.945, measured); the reference ~4 passes and each rule's SLM ~3 more, so that an SLM
    # alone stays far below it (0.39 measured for `none`; with 17 + 6 passes the SLMs reached 0.85 and the
    # cascade had little to gain). FactScore on every person of the three rarest buckets, up to 80 per bucket.
    # wiki-leads: every lead, ~1 pass.
    "default": Size(n_people=300, top_docs=150, vocab_size=2048, seq_len=128, batch_size=8, ref_steps=300,
                    large_preset="tiny-2x", large_steps=2000, large_batch=16, slm_steps=200, lr=3e-3, per_bucket=80,
                    max_new_tokens=48, taus="0.01,0.02,0.05,0.1,0.2,0.35,0.5,argmax,1.01", mem_k=4,
                    mem_widths=(40, 16), wiki_docs=10033, wiki_vocab=4096, wiki_ref_steps=1200,
                    wiki_large_preset="tiny-2x", wiki_large_steps=1200, wiki_slm_steps=400, wiki_leads=60,
                    wiki_taus="0.05,0.1,0.2,0.35,argmax,1.01", calib_windows=300, speed_prompts=40),
    # Meant for <= 10 min on one H200 after --prepare-only on a CPU machine (not yet timed on a GPU): ~12k
    # optimizer steps of tiny/small models in all, more people, a wider sweep.
    "gpu": Size(n_people=1200, top_docs=600, vocab_size=4096, seq_len=256, batch_size=32, ref_steps=1500,
                large_preset="small", large_steps=2000, large_batch=64, slm_steps=400, lr=2e-3, per_bucket=100,
                max_new_tokens=48, taus="0.005,0.01,0.02,0.05,0.1,0.2,0.35,0.5,argmax,1.01", mem_k=4,
                mem_widths=(40, 16), wiki_docs=10033, wiki_vocab=4096, wiki_ref_steps=1500, wiki_large_preset="small",
                wiki_large_steps=1500, wiki_slm_steps=400, wiki_leads=400,
                wiki_taus="0.02,0.05,0.1,0.2,0.35,argmax,1.01",
                calib_windows=1000, speed_prompts=100),
}


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="reproduce_lacy.py", description=__doc__.split("\n\n")[0],
                       formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--out", default=None, help="output directory (default runs/repro-lacy[-SIZE])")
    p.add_argument("--size", default="default", choices=list(SIZES), help="preset (default: default)")
    p.add_argument("--quick", action="store_true", help="same as --size quick")
    p.add_argument("--scale", type=positive_float, default=1.0, help="multiply every step count and the corpus size")
    p.add_argument("--call-rates", type=comma_list(number(float, 0, 1, low_open=True, high_open=True)), default="0.1,0.2",
                   help="training call rates in (0, 1) (comma-separated; default 0.1,0.2); wiki and memory use the first")
    p.add_argument("--rules", type=comma_list(choices=RULES), default=",".join(RULES),
                   help=f"comma-separated rules among {', '.join(RULES)}")
    p.add_argument("--parts", type=comma_list(choices=PARTS), default=",".join(PARTS),
                   help=f"comma-separated parts among {', '.join(PARTS)}; runs with different parts may share --out "
                        "(also at the same time); a later run with every part reuses their stages")
    p.add_argument("--prepare-only", action="store_true",
                   help="run only the stages that need spaCy / faiss / MiniLM (then carry --out to a GPU)")
    p.add_argument("--seed", type=job_seed, default=0, help="seed of the corpus, training, selection and samples")
    p.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--dry-run", action="store_true", help="print the stages and their commands; run nothing")
    p.add_argument("--fresh", action="store_true",
                   help="start over: delete what an earlier run of this script created in the output directory")
    return p


def scaled(size: Size, scale: float) -> Size:
    s = lambda n, lo: max(lo, int(round(n * scale)))  # noqa: E731
    return dataclasses.replace(
        size, n_people=s(size.n_people, 20), top_docs=s(size.top_docs, 5), ref_steps=s(size.ref_steps, 10),
        large_steps=s(size.large_steps, 10), slm_steps=s(size.slm_steps, 10), per_bucket=s(size.per_bucket, 2),
        wiki_docs=min(10033, s(size.wiki_docs, 50)), wiki_ref_steps=s(size.wiki_ref_steps, 10),
        wiki_large_steps=s(size.wiki_large_steps, 10), wiki_slm_steps=s(size.wiki_slm_steps, 10),
        wiki_leads=s(size.wiki_leads, 4))


class LacyRepro:
    def __init__(self, args, argv: list[str] | None = None):
        self.args = args
        self.size_name = "quick" if args.quick else args.size
        self.size = scaled(SIZES[self.size_name], args.scale)
        self.rules = list(args.rules)
        self.parts = list(args.parts)
        if self.size_name == "gpu" and "memory" in self.parts:
            self.parts.remove("memory")  # routing prompts needs MiniLM, not on the GPU machine
        self.rates = list(args.call_rates)
        default_out = "runs/repro-lacy" + ("" if self.size_name == "default" else f"-{self.size_name}")
        self.out = short_path(check_out_dir(args.out or default_out))
        self.stages = StageRunner(self.out, dry_run=args.dry_run)
        self.memlm = self.stages.memlm
        self.command = shlex.join(["python", "scripts/reproduce_lacy.py", *(sys.argv[1:] if argv is None else argv)])
        self.stages.invocation = self.command

    # ---- names ------------------------------------------------------------------------------
    def data(self, corpus: str) -> str:
        return os.path.join(self.out, f"data-{corpus}")

    def run_dir(self, name: str) -> str:
        return os.path.join(self.out, "runs", name)

    @staticmethod
    def pct(rate: float) -> str:
        return f"{rate * 100:g}"

    def rules_at(self, rate: float) -> list[str]:
        """Rules trained at `rate`: `none` (no calls) is the same model at every rate, trained once."""
        return [r for r in self.rules if r != "none" or rate == self.rates[0]]

    def label(self, rule: str, rate: float) -> str:
        return "none" if rule == "none" else f"{rule} {self.pct(rate)}%"

    def bios_slms(self) -> dict[str, str]:
        """factscore label -> run, in report order."""
        out = {}
        for rate in self.rates:
            for rule in self.rules_at(rate):
                out[self.label(rule, rate)] = self.run_dir(f"bios-{rule}-{self.pct(rate)}")
        if "memory" in self.parts:
            out[f"memory+lacy {self.pct(self.rates[0])}%"] = self.run_dir("bios-mem-lacy")
            out["memory, no calls"] = self.run_dir("bios-mem-none")
        return out

    def plan(self) -> list[tuple[str, callable]]:
        out = []
        if "bios" in self.parts or "memory" in self.parts:
            out += [("bios-data", self.stage_bios_data), ("bios-tag", lambda: self.memlm("tag", self.data("bios")))]
            if "memory" in self.parts:
                out.append(("bios-cluster", self.stage_cluster))
        if "wiki" in self.parts:
            out += [("wiki-data", self.stage_wiki_data), ("wiki-tag", lambda: self.memlm("tag", self.data("wiki"))),
                    ("wiki-facts", lambda: self.memlm("wiki-cascade", self.data("wiki"), "--facts-only"))]
        if self.args.prepare_only:
            return out
        if "bios" in self.parts or "memory" in self.parts:
            out += [("bios-ref", lambda: self.pretrain("bios", "bios-ref", self.size.ref_steps, "model.preset=tiny")),
                    ("bios-large", self.stage_bios_large), ("bios-score", lambda: self.stage_score("bios")),
                    ("bios-select", lambda: self.stage_select("bios", self.rates))]
            out += [(f"bios-{r}-{self.pct(rate)}", lambda r=r, rate=rate: self.stage_slm("bios", r, rate))
                    for rate in self.rates for r in self.rules_at(rate)]
            if "memory" in self.parts:
                out += [("bios-mem-lacy", lambda: self.stage_memory("lacy")),
                        ("bios-mem-none", lambda: self.stage_memory(None))]
            out += [("bios-factscore", self.stage_factscore), ("bios-calibrate", self.stage_bios_calibrate)]
        if "wiki" in self.parts:
            s = self.size
            out += [("wiki-ref", lambda: self.pretrain("wiki", "wiki-ref", s.wiki_ref_steps, "model.preset=tiny")),
                    ("wiki-large", lambda: self.pretrain("wiki", "wiki-large", s.wiki_large_steps,
                                                         f"model.preset={s.wiki_large_preset}")),
                    ("wiki-score", lambda: self.stage_score("wiki")),
                    ("wiki-select", lambda: self.stage_select("wiki", self.rates[:1]))]
            out += [(f"wiki-{r}", lambda r=r: self.stage_slm("wiki", r, self.rates[0])) for r in self.rules]
            out += [("wiki-cascade", self.stage_wiki_cascade), ("wiki-calibrate", self.stage_wiki_calibrate)]
        return out + [("report", self.stage_report)]

    # ---- stages -----------------------------------------------------------------------------
    def pretrain(self, corpus: str, name: str, steps: int, *overrides: str, batch: int | None = None) -> None:
        s = self.size
        self.memlm("pretrain", "--config", short_path(recipe("tiny-cpu.yaml")), f"name={name}",
                   f"runs_dir={os.path.dirname(self.run_dir(name))}", f"seed={self.args.seed}",
                   f"data.path={self.data(corpus)}", f"data.seq_len={s.seq_len}",
                   f"data.batch_size={batch or s.batch_size}", f"trainer.max_steps={steps}",
                   f"trainer.val_every={max(steps // 5, 1)}", "trainer.val_batches=8",
                   f"trainer.log_every={max(steps // 20, 1)}", f"checkpoint.every={checkpoint_every(steps)}", "checkpoint.keep_last_k=1",
                   "logging.logger=none", f"optim.lr={s.lr}", f"optim.min_lr={s.lr / 10:g}",
                   f"optim.warmup_steps={max(steps // 20, 1)}", *overrides)

    def stage_bios_data(self):
        s = self.size
        self.memlm("prepare", "--corpus", "bios", "--out", self.data("bios"), "--n-people", s.n_people, "--top-docs",
                   s.top_docs, "--vocab-size", s.vocab_size, "--window-tokens", s.seq_len, "--val-fraction", 0.05,
                   "--seed", self.args.seed, "--no-progress")

    def stage_wiki_data(self):
        s = self.size
        self.memlm("prepare", "--corpus", "wiki-leads", "--out", self.data("wiki"), "--max-docs", s.wiki_docs,
                   "--vocab-size", s.wiki_vocab, "--window-tokens", s.seq_len, "--val-fraction", 0.05,
                   "--seed", self.args.seed, "--no-progress")

    def stage_cluster(self):
        self.memlm("cluster", self.data("bios"), "--levels", len(self.size.mem_widths), "--k", self.size.mem_k,
                   "--seed", self.args.seed, "--max-tokens", 64)

    def stage_bios_large(self):
        s = self.size
        self.pretrain("bios", "bios-large", s.large_steps, f"model.preset={s.large_preset}", batch=s.large_batch)

    def stage_score(self, corpus: str):
        self.memlm("score", self.data(corpus), "--model", self.run_dir(f"{corpus}-ref"), "--name", "ref")
        self.memlm("score", self.data(corpus), "--model", self.run_dir(f"{corpus}-large"), "--name", "large")

    def calls_name(self, corpus: str, rule: str, rate: float) -> str:
        # wiki has one rate: calls_<rule> (what `memlm wiki-cascade --diagnose` looks up by label)
        return f"calls_{rule}" if corpus == "wiki" else f"calls_{rule}_{self.pct(rate)}"

    def stage_select(self, corpus: str, rates: list[float]):
        for rate in rates:
            for rule in self.rules_at(rate):
                self.memlm("select", self.data(corpus), "--rule", rule, "--call-rate", rate, "--seed", self.args.seed,
                           "--loss", "ref", "--loss-large", "large", "--name", self.calls_name(corpus, rule, rate))

    def stage_slm(self, corpus: str, rule: str, rate: float):
        # Same start (the reference) and the same steps for every rule; only the <CALL> targets differ.
        name = f"wiki-{rule}" if corpus == "wiki" else f"bios-{rule}-{self.pct(rate)}"
        steps = self.size.wiki_slm_steps if corpus == "wiki" else self.size.slm_steps
        self.pretrain(corpus, name, steps, "model.preset=tiny", f"init_from={self.run_dir(f'{corpus}-ref')}",
                      f"data.calls={self.calls_name(corpus, rule, rate)}")

    def stage_memory(self, rule: str | None):
        """The reference + memories co-trained (anchor not frozen, so it learns <CALL> as the rule SLMs do)."""
        s = self.size
        widths = "[" + ",".join(str(w) for w in s.mem_widths) + "]"
        calls = [f"data.calls={self.calls_name('bios', rule, self.rates[0])}"] if rule else []
        self.pretrain("bios", f"bios-mem-{rule or 'none'}", s.slm_steps, "model.preset=tiny",
                      f"init_from={self.run_dir('bios-ref')}", "memory.preset=tiny", f"memory.k={s.mem_k}",
                      f"memory.widths={widths}", f"memory.lr={s.lr}", f"memory.min_lr={s.lr / 10:g}",
                      "memory.freeze_anchor=false", "data.by_leaf=true", *calls)

    def stage_factscore(self):
        s = self.size
        slms = [a for label, run in self.bios_slms().items() for a in ("--slm", f"{label}={run}")]
        self.memlm("factscore", *slms, "--large", self.run_dir("bios-large"), "--data", self.data("bios"),
                   "--large-alone", "--per-bucket", s.per_bucket, "--max-new-tokens", s.max_new_tokens,
                   "--taus", s.taus, "--match-rates", "0,0.05,0.1,0.2", "--speed-check", s.speed_prompts,
                   "--seed", self.args.seed,
                   "--out", os.path.join(self.out, "factscore"), "--force")

    def stage_bios_calibrate(self):
        first = [self.label(r, self.rates[0]) for r in self.rules] + [f"memory+lacy {self.pct(self.rates[0])}%"]
        labels = {k: v for k, v in self.bios_slms().items() if k in first}
        slms = [a for label, run in labels.items() for a in ("--slm", f"{label}={run}")]
        self.memlm("calibrate", self.data("bios"), *slms, "--max-windows", self.size.calib_windows,
                   "--out", os.path.join(self.out, "calibration-bios"), "--force")

    def stage_wiki_cascade(self):
        s = self.size
        gpu = self.size_name == "gpu"
        large = ["--large", self.run_dir("wiki-large")] if gpu else []  # SmolLM2 by default
        slms = [a for r in self.rules for a in ("--slm", f"{r}={self.run_dir(f'wiki-{r}')}")]
        self.memlm("wiki-cascade", self.data("wiki"), *slms, *large, "--large-alone", "--max-leads", s.wiki_leads,
                   "--taus", s.wiki_taus, "--match-rates", "0,0.05,0.1,0.2", "--diagnose", 30,
                   *([] if gpu else ["--tag-calls"]),
                   "--seed", self.args.seed, "--out", os.path.join(self.out, "wiki-cascade"), "--force")

    def stage_wiki_calibrate(self):
        slms = [a for r in self.rules for a in ("--slm", f"{r}={self.run_dir(f'wiki-{r}')}")]
        self.memlm("calibrate", self.data("wiki"), *slms, "--max-windows", self.size.calib_windows,
                   "--out", os.path.join(self.out, "calibration-wiki"), "--force")

    def stage_report(self):
        from train.experiments.lacy_report import write_lacy_report

        done = self.stages.finished()  # every part run into this directory, not only this invocation's
        seconds = {st: info.get("_seconds", 0.0) for st, info in done.items()}
        path, figs = write_lacy_report(self.out, self.rules, self.rates, dataclasses.asdict(self.size),
                                       self.size_name, self.stages.invocations(self.command), seconds,
                                       self.stages.all_commands(list(done)))
        return {"report": path, "figures": figs}

    # ---- driver -----------------------------------------------------------------------------
    def run(self) -> None:
        # --parts only chooses stages (runs with other parts may share the directory, even at the same time)
        settings = {"size": dataclasses.asdict(self.size), "rules": self.rules, "seed": self.args.seed,
                    "call_rates": self.rates}
        self.stages.run_job("reproduce_lacy", self.plan(), settings, fresh=self.args.fresh,
                            summary=f"size {self.size_name} x{self.args.scale}, rules {self.rules}, "
                                    f"training call rates {self.rates}, parts {self.parts}"
                                    + (", CPU preparation only" if self.args.prepare_only else ""))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    LacyRepro(args, argv).run()
    return 0


if __name__ == "__main__":
    from train.cli import run_command

    sys.exit(run_command("reproduce_lacy.py", main))
