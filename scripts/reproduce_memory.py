"""Reproduce the hierarchical-memory paper (arXiv 2510.02375) at small scale: Table 1 rows and Figure 1.

    python scripts/reproduce_memory.py --quick                      # bios, ~3 min on a 2-core CPU
    python scripts/reproduce_memory.py                              # bios, default size (~30 min on CPU, minutes on a GPU)
    python scripts/reproduce_memory.py --corpora bios,wiki-leads --scale 4
    python scripts/reproduce_memory.py --quick --dry-run            # list the stages and their commands

Per corpus, every model sees the same number of training tokens:
- `anchor`: the tiny anchor, pretrained for A steps, then trained M more steps (same schedule as the memory phase);
- `memory`: the same A-step anchor + hierarchical memories (fetched ~10% of its non-embedding parameters),
  trained M steps with the anchor frozen; evaluated in three modes: fetched (the context's cluster path),
  generic (the one block not tied to the context: the paper's control) and anchor-only;
- `dense-2x`: the `tiny-2x` preset (~2x the anchor's non-embedding parameters) trained A+M steps;
- placement ablation: memories in the last 2 vs the first 2 of the anchor's 4 layers (M steps each).
Reported: validation perplexity and probe accuracy per frequency bucket (bios), a Figure-1 analogue PNG,
loss curves. Writes <out>/report.md; every stage is one `memlm` command and re-running reuses finished
stages (train.experiments.stages.StageRunner).
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from dataclasses import dataclass

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from train.experiments.stages import StageRunner, recipe, short_path  # noqa: E402

CORPORA = ("bios", "wiki-leads")


@dataclass
class Size:
    n_people: int  # bios people
    top_docs: int  # bios documents of the most-mentioned person
    wiki_docs: int  # wiki-leads documents (the package ships 10,033)
    vocab_size: int
    seq_len: int
    batch_size: int
    anchor_steps: int  # A: anchor phase
    memory_steps: int  # M: memory phase (and the anchor's / ablations' extra steps)
    lr: float
    memory_lr: float
    k: int
    widths: tuple  # hidden units per memory level; R = sum, fetched = 3 * layers * d * R
    embed_tokens: int  # MiniLM reads this many word pieces per window
    probes_per_bucket: int
    val_fraction: float


SIZES = {
    # ~3 minutes on 2 CPU cores (bios): a smoke-scale run (the numbers are noisy, see the report).
    "quick": Size(n_people=300, top_docs=150, wiki_docs=1500, vocab_size=2048, seq_len=128, batch_size=8,
                  anchor_steps=150, memory_steps=100, lr=3e-3, memory_lr=3e-3, k=4, widths=(40, 16),
                  embed_tokens=64, probes_per_bucket=100, val_fraction=0.05),
    # About an hour on 2 CPU cores (both corpora), minutes on one GPU. 8x the quick corpus and steps: the same
    # ~1.5 passes over the data. Many more passes let the tiny anchor memorise the small corpus by itself and
    # the per-cluster blocks overfit (measured: 8x longer training on the quick corpus reverses fetched > generic).
    "default": Size(n_people=2400, top_docs=1200, wiki_docs=10033, vocab_size=4096, seq_len=128, batch_size=8,
                    anchor_steps=1200, memory_steps=800, lr=3e-3, memory_lr=3e-3, k=4, widths=(40, 16),
                    embed_tokens=64, probes_per_bucket=300, val_fraction=0.05),
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="reproduce_memory.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--out", default=None,
                   help="output directory (default runs/repro-memory, or runs/repro-memory-quick with --quick)")
    p.add_argument("--corpora", default="bios",
                   help="comma-separated corpora among bios, wiki-leads (default bios; probes exist for bios only)")
    p.add_argument("--quick", action="store_true", help="smoke-scale preset (~3 min on a 2-core CPU for bios)")
    p.add_argument("--scale", type=float, default=1.0,
                   help="multiply every step count and the corpus sizes (people, top docs, wiki docs)")
    p.add_argument("--seed", type=int, default=0, help="seed of the corpus, clustering, training and probes")
    p.add_argument("--no-ablation", action="store_true", help="skip the memory-placement ablation (last-2 vs first-2)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--dry-run", action="store_true", help="print the stages and their commands; run nothing")
    p.add_argument("--fresh", action="store_true", help="delete the output directory first")
    return p


def scaled(size: Size, scale: float) -> Size:
    s = lambda n: max(1, int(round(n * scale)))  # noqa: E731
    return dataclasses.replace(size, n_people=max(20, s(size.n_people)), top_docs=max(5, s(size.top_docs)),
                               wiki_docs=max(50, s(size.wiki_docs)), anchor_steps=max(10, s(size.anchor_steps)),
                               memory_steps=max(10, s(size.memory_steps)))


class MemoryRepro:
    def __init__(self, args, argv: list[str] | None = None):
        self.args = args
        self.size_name = "quick" if args.quick else "default"
        self.size = scaled(SIZES[self.size_name], args.scale)
        self.corpora = [c.strip() for c in args.corpora.split(",") if c.strip()]
        bad = [c for c in self.corpora if c not in CORPORA]
        if bad:
            raise SystemExit(f"reproduce_memory.py: --corpora: unknown corpus {bad}; choose from {list(CORPORA)}")
        self.out = short_path(args.out or ("runs/repro-memory-quick" if args.quick else "runs/repro-memory"))
        self.stages = StageRunner(self.out, dry_run=args.dry_run)
        self.memlm = self.stages.memlm
        self.command = "python scripts/reproduce_memory.py " + " ".join(sys.argv[1:] if argv is None else argv)

    # ---- paths ------------------------------------------------------------------------------
    def data(self, corpus: str) -> str:
        return os.path.join(self.out, corpus, "data")

    def run_dir(self, corpus: str, name: str) -> str:
        return os.path.join(self.out, corpus, "runs", name)

    def eval_dir(self, corpus: str, name: str) -> str:
        return os.path.join(self.out, corpus, "eval", name)

    def models(self) -> list[str]:
        names = ["anchor", "anchor-cont", "memory", "dense-2x"]
        return names + ([] if self.args.no_ablation else ["memory-last2", "memory-first2"])

    def plan(self) -> list[tuple[str, callable]]:
        """(stage name, function) in order; names are unique across corpora."""
        out = []
        for c in self.corpora:
            out += [(f"{c}-data", lambda c=c: self.stage_data(c)), (f"{c}-cluster", lambda c=c: self.stage_cluster(c))]
            out += [(f"{c}-{m}", lambda c=c, m=m: self.stage_train(c, m)) for m in self.models()]
            out += [(f"{c}-eval-{m}", lambda c=c, m=m: self.stage_eval(c, m)) for m in self.models() if m != "anchor"]
        return out + [("report", self.stage_report)]

    # ---- stages -----------------------------------------------------------------------------
    def stage_data(self, corpus: str):
        s = self.size
        extra = (["--n-people", s.n_people, "--top-docs", s.top_docs] if corpus == "bios"
                 else ["--max-docs", s.wiki_docs])
        self.memlm("prepare", "--corpus", corpus, "--out", self.data(corpus), "--vocab-size", s.vocab_size,
                   "--window-tokens", s.seq_len, "--val-fraction", s.val_fraction, "--seed", self.args.seed,
                   "--no-progress", *extra)

    def stage_cluster(self, corpus: str):
        s = self.size
        self.memlm("cluster", self.data(corpus), "--levels", len(s.widths), "--k", s.k, "--seed", self.args.seed,
                   "--max-tokens", s.embed_tokens)

    def pretrain(self, corpus: str, name: str, steps: int, lr: float, *overrides: str) -> None:
        s = self.size
        self.memlm("pretrain", "--config", short_path(recipe("tiny-cpu.yaml")), f"name={name}",
                   f"runs_dir={os.path.dirname(self.run_dir(corpus, name))}", f"seed={self.args.seed}",
                   f"data.path={self.data(corpus)}", f"data.seq_len={s.seq_len}", f"data.batch_size={s.batch_size}",
                   f"trainer.max_steps={steps}", f"trainer.val_every={max(steps // 5, 1)}",
                   "trainer.val_batches=8", f"trainer.log_every={max(steps // 20, 1)}", f"checkpoint.every={steps}",
                   "checkpoint.keep_last_k=1", "logging.logger=none", f"optim.lr={lr}", f"optim.min_lr={lr / 10:g}",
                   f"optim.warmup_steps={max(steps // 20, 1)}", *overrides)

    def stage_train(self, corpus: str, name: str):
        s = self.size
        A, M = s.anchor_steps, s.memory_steps
        anchor = f"init_from={self.run_dir(corpus, 'anchor')}"
        widths = "[" + ",".join(str(w) for w in s.widths) + "]"
        memory = ["memory.preset=tiny", f"memory.k={s.k}", f"memory.widths={widths}", f"memory.lr={s.memory_lr}",
                  f"memory.min_lr={s.memory_lr / 10:g}", "memory.freeze_anchor=true", "data.by_leaf=true"]
        if name == "anchor":
            self.pretrain(corpus, name, A, s.lr, "model.preset=tiny")
        elif name == "anchor-cont":  # the baseline gets the memory phase's extra tokens, with the same schedule
            self.pretrain(corpus, name, M, s.memory_lr, "model.preset=tiny", anchor)
        elif name == "memory":
            self.pretrain(corpus, name, M, s.memory_lr, anchor, *memory)
        elif name == "dense-2x":
            self.pretrain(corpus, name, A + M, s.lr, "model.preset=tiny-2x")
        elif name in ("memory-last2", "memory-first2"):
            where = "last:2" if name.endswith("last2") else "first:2"
            self.pretrain(corpus, name, M, s.memory_lr, anchor, *memory, f"memory.layers={where}")
        else:
            raise ValueError(name)

    def stage_eval(self, corpus: str, name: str):
        s = self.size
        # Memory runs are evaluated in all three modes; the ablations in fetched/generic only.
        modes = {"memory": [], "memory-last2": ["--modes", "fetched,generic"],
                 "memory-first2": ["--modes", "fetched,generic"]}.get(name, [])
        self.memlm("eval", self.run_dir(corpus, name), "--data", self.data(corpus), "--out",
                   self.eval_dir(corpus, name), "--probes-per-bucket", s.probes_per_bucket, "--seed", self.args.seed,
                   *modes)

    def stage_report(self):
        from train.experiments.memory_report import write_memory_report

        corpora = {c: {"runs": {m: self.run_dir(c, m) for m in self.models()},
                       "evals": {m: os.path.join(self.eval_dir(c, m), "eval.json") for m in self.models() if m != "anchor"}}
                   for c in self.corpora}
        stages = [name for name, _ in self.plan() if name != "report"]
        seconds = {st: (self.stages.done(st) or {}).get("_seconds", 0.0) for st in stages}
        path, figs = write_memory_report(self.out, corpora, dataclasses.asdict(self.size), self.size_name,
                                         self.command, seconds, self.stages.all_commands(stages))
        return {"report": path, "figures": figs}

    # ---- driver -----------------------------------------------------------------------------
    def run(self) -> None:
        settings = {"size": dataclasses.asdict(self.size), "corpora": self.corpora, "seed": self.args.seed,
                    "ablation": not self.args.no_ablation}
        self.stages.run_job("reproduce_memory", self.plan(), settings, fresh=self.args.fresh,
                            summary=f"size {self.size_name} x{self.args.scale}, corpora {self.corpora}")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    MemoryRepro(args, argv).run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
