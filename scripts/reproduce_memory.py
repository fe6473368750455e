"""Evidence for hierarchical memories (arXiv 2510.02375): experiments in which the effect CAN appear.

    python scripts/reproduce_memory.py --size quick                 # minutes on a 2-core CPU (smoke scale)
    python scripts/reproduce_memory.py                              # default size (designed for <= 90 min, idle 2-core CPU)
    python scripts/reproduce_memory.py --size gpu                   # larger, <= 10 min on one H200 (data prepared on CPU)
    python scripts/reproduce_memory.py --dry-run                    # list the stages and their commands

Parts (each stage is one `memlm` command; finished stages are reused when you re-run):
1. mech: the mechanism check. bios `uniform` (every person 12 documents); a frozen anchor trained on
   *other* people (it knows the templates, not these facts); memories trained for many passes on leaves
   from MiniLM k-means (`minilm`), from the person id (`keyed`, memlm cluster --paths-from id:REGEX),
   from the first named entity (`entity`) and from sentence-averaged embeddings (`sentences`). Probes:
   fetched (router), fetched (top-2 leaves by prompt loss), fetched (oracle: the person's majority leaf),
   generic, anchor-only; seeds for the headline variants.
2. cap: capacity-bound bios (`capacity` preset: every fact seen >= ~8 times, long-tailed), knowledge in
   bits above ~2 bits/parameter of the anchor; anchor trained A steps then continued, memory (entity
   routing), dense 2x, all with the same training tokens and at more seeds; bank-size trend (k at a fixed
   fetched size), training-token trend (memory checkpoints) and placement (first-N vs last-N), all three
   at more seeds too.
3. wiki: wiki-leads, knowledge probes from lead facts (memlm wiki-probes), scored through
   lm-evaluation-harness (memlm harness) for fetched (router) / oracle / generic / anchor-only / dense 2x on
   seen and held-out articles, top-2 (loss-routed among the 2 nearest leaves) on seen ones, with leaves from MiniLM k-means,
   entity keys and sentence-averaged windows (the MiniLM memory and both baselines also at more seeds);
   validation loss of every run on the same held-out rows (memlm eval).
Writes <out>/report.md with 95% intervals (paired bootstrap over the same probes / rows; Student-t over
seeds) and PNGs.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import shlex
import sys
import time
from dataclasses import dataclass

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from model.errors import ConfigError  # noqa: E402
from train.cli import ArgumentParser, check_out_dir, comma_list, job_seed, positive_int  # noqa: E402
from train.experiments.stages import StageRunner, checkpoint_every, recipe, short_path  # noqa: E402

PARTS = ("mech", "cap", "wiki")
# Raised when a stage of the same name comes to mean another thing (e.g. 2: the cap seed runs keep 4
# checkpoints), so that an output directory of an older plan is not resumed with stages it cannot serve.
PLAN = 2
MECH_VARIANTS = {  # name -> memlm cluster options (leaves), the routing options tried
    "minilm": [],
    "keyed": ["--paths-from", "id:^bio-([0-9]+)-"],
    "entity": ["--paths-from", "entity"],
    "sentences": ["--embed-text", "sentences"],
}
# Anchors small enough that the knowledge of a CPU-sized corpus exceeds ~2 bits per parameter.
MICRO = ("model.preset=tiny", "model.n_embd=64", "model.n_layer=2", "model.ffn_hidden=128", "model.n_head=2",
         "model.n_kv_head=1")
MICRO_2X = ("model.preset=tiny", "model.n_embd=96", "model.n_layer=2", "model.ffn_hidden=192", "model.n_head=3",
            "model.n_kv_head=1")
WIKI_VARIANTS = {  # wiki leaves: MiniLM k-means (the default), first named entity, sentence-averaged windows
    "minilm": [],
    "entity": ["--paths-from", "entity"],
    "sentences": ["--embed-text", "sentences"],
}
# The mechanism check's anchor: the tiny preset (4 layers, d=128); with 2 layers of d=64 the memories
# did not learn the facts (measured: oracle-routed accuracy 0.07 after ~10 passes).
MECH_ANCHOR = ("model.preset=tiny",)


@dataclass
class Size:
    anchor: tuple          # model overrides of the anchor (and of the anchor-only baseline)
    dense: tuple           # model overrides of the dense ~2x model
    vocab_size: int
    seq_len: int
    batch_size: int
    lr: float
    memory_lr: float
    embed_tokens: int      # MiniLM reads this many word pieces per window
    # 1. mechanism check
    mech_people: int
    mech_anchor_steps: int
    mech_memory_steps: int
    mech_k: int
    mech_width: int
    mech_seeds: int        # seeds of the headline variants (minilm, entity)
    # 2. capacity-bound bios
    cap_people: int
    cap_anchor_steps: int  # A
    cap_memory_steps: int  # M
    cap_k: int
    cap_width: int
    bank_ks: tuple         # bank-size trend: k at the same width (same fetched size)
    cap_seeds: int         # seeds of every cap row (memories of cap_k, bank_ks, placement; baselines)
    # 3. wiki-leads
    wiki_docs: int
    wiki_anchor_steps: int
    wiki_memory_steps: int
    wiki_k: int
    wiki_width: int
    wiki_probes: int       # probes per set (seen / held-out)
    wiki_val: float        # val fraction of the leads (held-out articles: val loss and held-out probes)
    wiki_seeds: int        # seeds of the comparison: MiniLM-leaf memories, anchor-only continued, dense 2x
    cap_probes: int = 400  # capacity-bound bios probes per frequency bucket (seeded sample)


SIZES = {
    # Minutes on an idle 2-core CPU: the mechanism check at a reduced scale (128 people, ~6.5 passes);
    # the capacity and wiki parts are smoke-scale there (every stage and the report run, too short for effects).
    "quick": Size(anchor=MICRO, dense=MICRO_2X, vocab_size=2048, seq_len=128, batch_size=16, lr=3e-3, memory_lr=3e-3,
                  embed_tokens=128, mech_people=128, mech_anchor_steps=200, mech_memory_steps=200, mech_k=8,
                  mech_width=64, mech_seeds=1, cap_people=100, cap_anchor_steps=40, cap_memory_steps=40, cap_k=4,
                  cap_width=16, bank_ks=(2,), cap_seeds=2, wiki_docs=200, wiki_anchor_steps=40, wiki_memory_steps=40,
                  wiki_k=4, wiki_width=16, wiki_probes=100, wiki_val=0.1, wiki_seeds=2, cap_probes=50),
    # Token budget ~45M on the micro anchor (~25k tokens/s on an idle 2-core CPU) + MiniLM/spaCy preparation.
    # Wiki memories of width 128 trained 1,800 steps (~12 passes): with width 32 and 600 steps they stored little
    # and none of it leaf-local (prompts routed to a wrong leaf gained as much), so no routing could matter.
    "default": Size(anchor=MICRO, dense=MICRO_2X, vocab_size=2048, seq_len=128, batch_size=16, lr=3e-3,
                    memory_lr=3e-3, embed_tokens=128, mech_people=256, mech_anchor_steps=300, mech_memory_steps=750,
                    mech_k=16, mech_width=64, mech_seeds=3, cap_people=3500, cap_anchor_steps=1800,
                    cap_memory_steps=1800, cap_k=16, cap_width=32, bank_ks=(4, 64), cap_seeds=3,
                    wiki_docs=2600, wiki_anchor_steps=800, wiki_memory_steps=1800, wiki_k=16, wiki_width=128,
                    wiki_probes=1000, wiki_val=0.25, wiki_seeds=3),
    # One H200, <= 10 minutes of training and scoring; data, clusters and probes prepared on CPU first
    # (--prepare-only: the device has no faiss, spaCy or MiniLM package). The micro anchor again, so that
    # the knowledge (8,000 people, ~372k bits) is 2.5x its ~2 bits/parameter capacity, more passes.
    "gpu": Size(anchor=MICRO, dense=MICRO_2X, vocab_size=4096, seq_len=128, batch_size=64, lr=3e-3, memory_lr=3e-3,
                embed_tokens=48, mech_people=1024, mech_anchor_steps=300, mech_memory_steps=1500, mech_k=64,
                mech_width=64, mech_seeds=3, cap_people=8000, cap_anchor_steps=4000, cap_memory_steps=4000,
                cap_k=64, cap_width=32, bank_ks=(16, 256), cap_seeds=3, wiki_docs=10033, wiki_anchor_steps=3000,
                wiki_memory_steps=2000, wiki_k=64, wiki_width=128, wiki_probes=3000, wiki_val=0.1, wiki_seeds=3,
                cap_probes=1000),
}


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="reproduce_memory.py", description=__doc__.split("\n\n")[0],
                       formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--size", default="default", choices=sorted(SIZES), help="preset (default: default)")
    p.add_argument("--parts", type=comma_list(choices=PARTS), default=",".join(PARTS), help=f"comma-separated parts among {', '.join(PARTS)}")
    p.add_argument("--out", default=None, help="output directory (default runs/repro-memory-<size>)")
    p.add_argument("--seed", type=job_seed, default=0, help="seed of the corpora, clustering, training and probes")
    p.add_argument("--mech-variants", type=comma_list(choices=MECH_VARIANTS), default=",".join(MECH_VARIANTS),
                   help=f"leaf assignments of the mechanism check (default all: {', '.join(MECH_VARIANTS)})")
    p.add_argument("--jobs", type=positive_int, default=None,
                   help="run the parts in this many processes side by side, the CPU cores shared among them; "
                        "the stages of one part stay in order (default: as many as the parts and cores allow on "
                        "a machine without a GPU, 1 with one)")
    p.add_argument("--threads", type=positive_int, default=None,
                   help="CPU threads of each process (default: the cores divided among the --jobs processes)")
    p.add_argument("--lane", type=comma_list(choices=PARTS), default=None, help=argparse.SUPPRESS)  # a --jobs child
    p.add_argument("--dry-run", action="store_true", help="print the stages and their commands; run nothing")
    p.add_argument("--prepare-only", action="store_true",
                   help="run only the stages that need CPU-side packages (prepare, cluster: faiss + MiniLM, "
                        "wiki-probes: spaCy), e.g. before carrying the output directory to a GPU machine "
                        "(delete the DATA/*/*.window_minilm*.npy embedding caches first: only the paths are needed)")
    p.add_argument("--fresh", action="store_true",
                   help="start over: delete what an earlier run of this script created in the output directory")
    return p


class MemoryRepro:
    def __init__(self, args, argv: list[str] | None = None):
        self.args = args
        self.size_name = args.size
        self.size = SIZES[args.size]
        self.parts = list(args.parts)
        self.variants = list(args.mech_variants)
        if "minilm" not in self.variants:
            raise ConfigError(f"--mech-variants {','.join(self.variants)}: must include minilm (its data dir holds "
                              "the tokenizer)")
        self.out = short_path(check_out_dir(args.out or f"runs/repro-memory-{args.size}"))
        self.stages = StageRunner(self.out, dry_run=args.dry_run)
        self.memlm = self.stages.memlm
        self.command = shlex.join(["python", "scripts/reproduce_memory.py", *(sys.argv[1:] if argv is None else argv)])
        self.stages.invocation = (args.lane and os.environ.get("MEMLM_JOB_INVOCATION")) or self.command

    def p(self, *parts: str) -> str:
        return os.path.join(self.out, *parts)

    # ---- building blocks ------------------------------------------------------------------------
    def prepare(self, out: str, corpus: str, *extra, tokenizer: str | None = None, val: float = 0.05):
        s = self.size
        tok = ["--tokenizer", tokenizer] if tokenizer else ["--vocab-size", s.vocab_size]
        self.memlm("prepare", "--corpus", corpus, "--out", out, *tok, "--window-tokens", s.seq_len,
                   "--val-fraction", val, "--no-progress", *extra)

    def cluster(self, data: str, k: int, *opts):
        self.memlm("cluster", data, "--levels", 1, "--k", k, "--seed", self.args.seed,
                   "--max-tokens", self.size.embed_tokens, *opts)

    def pretrain(self, run: str, data: str, steps: int, lr: float, *overrides, seed: int | None = None,
                 ckpts: int = 1):
        s = self.size
        self.memlm("pretrain", "--config", short_path(recipe("tiny-cpu.yaml")), f"name={os.path.basename(run)}",
                   f"runs_dir={os.path.dirname(run)}", f"seed={self.args.seed if seed is None else seed}",
                   f"data.path={data}", f"data.seq_len={s.seq_len}", f"data.batch_size={s.batch_size}",
                   f"trainer.max_steps={steps}", "trainer.val_every=0", f"trainer.log_every={max(steps // 20, 1)}",
                   f"checkpoint.every={checkpoint_every(steps, max(ckpts, 4))}", f"checkpoint.keep_last_k={ckpts}",
                   "logging.logger=none", f"optim.lr={lr}", f"optim.min_lr={lr / 10:g}",
                   f"optim.warmup_steps={max(steps // 20, 1)}", *overrides)

    def memory(self, run, data, steps, init_from, k, width, *extra, model=("model.preset=tiny",), seed=None,
               ckpts=1):
        """Memories on the frozen anchor of `init_from`; `model`: the model.* keys that anchor was trained
        with (pretrain refuses a model section that differs from the run it starts from)."""
        s = self.size
        self.pretrain(run, data, steps, s.memory_lr, *model, f"init_from={init_from}", "memory.preset=tiny",
                      f"memory.k={k}", f"memory.widths=[{width}]", f"memory.lr={s.memory_lr}",
                      f"memory.min_lr={s.memory_lr / 10:g}", "memory.freeze_anchor=true", "data.by_leaf=true",
                      *extra, seed=seed, ckpts=ckpts)

    def evaluate(self, run: str, data: str, out: str, *extra, per_bucket: int = 100000, memory: bool = True,
                 route_top: bool = True):
        """`memlm eval`; memory runs also fetch the top-2 leaves unless `route_top` is False (eval refuses
        --route-top on an anchor)."""
        self.memlm("eval", run, "--data", data, "--out", out, "--probes-per-bucket", per_bucket, "--seed",
                   self.args.seed, *(["--route-top", 2] if memory and route_top else []), "--force", *extra)

    # ---- 1. mechanism check ---------------------------------------------------------------------
    def seeds(self, n: int) -> list[int]:
        """The base seed and n - 1 more (memory training and data order; probes stay the base seed's)."""
        return [self.args.seed + i for i in range(n)]

    def mech_runs(self) -> list[tuple[str, int]]:
        """(variant, seed) memory runs: every variant at the base seed, the headline ones at more seeds."""
        seeds = self.seeds(self.size.mech_seeds)
        return ([(v, seeds[0]) for v in self.variants]
                + [(v, sd) for v in ("minilm", "entity") if v in self.variants for sd in seeds[1:]])

    def plan_mech(self):
        s, d = self.size, self.p("mech")
        bios = ["--bios-preset", "uniform", "--n-people", s.mech_people]
        tok = os.path.join(d, "data-minilm", "tokenizer")
        out = [("mech-data", lambda: self.prepare(os.path.join(d, "data-minilm"), "bios", *bios, "--seed",
                                                  self.args.seed)),
               # other people (another generator seed), same tokenizer: the anchor learns the templates only
               ("mech-other", lambda: self.prepare(os.path.join(d, "other"), "bios", *bios, "--seed",
                                                   self.args.seed + 1, tokenizer=tok)),
               ("mech-anchor", lambda: self.pretrain(os.path.join(d, "runs", "anchor"), os.path.join(d, "other"),
                                                     s.mech_anchor_steps, s.lr, *MECH_ANCHOR))]
        for v, opts in ((v, MECH_VARIANTS[v]) for v in self.variants):
            data = os.path.join(d, f"data-{v}")
            if v != "minilm":  # same corpus and tokenizer, its own paths
                out.append((f"mech-data-{v}", lambda data=data: self.prepare(
                    data, "bios", *bios, "--seed", self.args.seed, tokenizer=tok)))
            same = () if v == "minilm" else ("--embeddings-from", os.path.join(d, "data-minilm"))  # same windows
            out.append((f"mech-cluster-{v}", lambda data=data, opts=opts, same=same: self.cluster(data, s.mech_k,
                                                                                                *opts, *same)))
        for v, sd in self.mech_runs():
            run, data = os.path.join(d, "runs", f"{v}-s{sd}"), os.path.join(d, f"data-{v}")
            out.append((f"mech-{v}-s{sd}", lambda run=run, data=data, sd=sd: self.memory(
                run, data, s.mech_memory_steps, os.path.join(d, "runs", "anchor"), s.mech_k, s.mech_width, seed=sd)))
            out.append((f"mech-eval-{v}-s{sd}", lambda run=run, data=data, v=v, sd=sd: self.evaluate(
                run, data, os.path.join(d, "eval", f"{v}-s{sd}"))))  # every probe: 7 per person
        return out

    # ---- 2. capacity-bound bios -----------------------------------------------------------------
    def plan_cap(self):
        s, d = self.size, self.p("cap")
        data, A, M = os.path.join(d, "data"), s.cap_anchor_steps, s.cap_memory_steps
        anchor = os.path.join(d, "runs", "anchor")
        out = [("cap-data", lambda: self.prepare(data, "bios", "--bios-preset", "capacity", "--n-people", s.cap_people,
                                                 "--seed", self.args.seed)),
               ("cap-cluster", lambda: self.cluster(data, s.cap_k, "--paths-from", "entity")),
               ("cap-anchor", lambda: self.pretrain(anchor, data, A, s.lr, *s.anchor)),
               ("cap-anchor-cont", lambda: self.pretrain(os.path.join(d, "runs", "anchor-cont"), data, M, s.memory_lr,
                                                         *s.anchor, f"init_from={anchor}")),
               ("cap-dense-2x", lambda: self.pretrain(os.path.join(d, "runs", "dense-2x"), data, A + M, s.lr, *s.dense)),
               ("cap-memory", lambda: self.memory(os.path.join(d, "runs", "memory"), data, M, anchor, s.cap_k,
                                                  s.cap_width, model=s.anchor, ckpts=4)),
               ("cap-memory-first1", lambda: self.memory(os.path.join(d, "runs", "memory-first1"), data, M, anchor,
                                                         s.cap_k, s.cap_width * 2, "memory.layers=first:1",
                                                         model=s.anchor)),
               ("cap-memory-last1", lambda: self.memory(os.path.join(d, "runs", "memory-last1"), data, M, anchor,
                                                        s.cap_k, s.cap_width * 2, "memory.layers=last:1",
                                                        model=s.anchor))]
        for k in s.bank_ks:  # same width, other k: the same fetched size from a smaller / larger bank
            dk = os.path.join(d, f"data-k{k}")
            out += [(f"cap-data-k{k}", lambda dk=dk: self.prepare(dk, "bios", "--bios-preset", "capacity", "--n-people",
                                                                s.cap_people, "--seed", self.args.seed,
                                                                tokenizer=os.path.join(data, "tokenizer"))),
                    (f"cap-cluster-k{k}", lambda dk=dk, k=k: self.cluster(dk, k, "--paths-from", "entity",
                                                                        "--embeddings-from", data)),
                    (f"cap-memory-k{k}", lambda dk=dk, k=k: self.memory(os.path.join(d, "runs", f"memory-k{k}"), dk, M,
                                                                      anchor, k, s.cap_width, model=s.anchor))]
        for sd in self.seeds(s.cap_seeds)[1:]:  # every row of the comparison at more seeds (training, data order)
            out += [(f"cap-memory-s{sd}", lambda sd=sd: self.memory(os.path.join(d, "runs", f"memory-s{sd}"), data,
                                                                    M, anchor, s.cap_k, s.cap_width, model=s.anchor,
                                                                    seed=sd, ckpts=4)),
                    (f"cap-anchor-cont-s{sd}", lambda sd=sd: self.pretrain(
                        os.path.join(d, "runs", f"anchor-cont-s{sd}"), data, M, s.memory_lr, *s.anchor,
                        f"init_from={anchor}", seed=sd)),
                    (f"cap-dense-2x-s{sd}", lambda sd=sd: self.pretrain(os.path.join(d, "runs", f"dense-2x-s{sd}"), data,
                                                                       A + M, s.lr, *s.dense, seed=sd))]
            out += [(f"cap-memory-k{k}-s{sd}", lambda sd=sd, k=k: self.memory(
                os.path.join(d, "runs", f"memory-k{k}-s{sd}"), os.path.join(d, f"data-k{k}"), M, anchor, k,
                s.cap_width, model=s.anchor, seed=sd)) for k in s.bank_ks]
            out += [(f"cap-memory-{where}1-s{sd}", lambda sd=sd, where=where: self.memory(
                os.path.join(d, "runs", f"memory-{where}1-s{sd}"), data, M, anchor, s.cap_k, s.cap_width * 2,
                f"memory.layers={where}:1", model=s.anchor, seed=sd)) for where in ("first", "last")]
        ev, pb = os.path.join(d, "eval"), s.cap_probes
        out += [("cap-eval-anchor-cont", lambda: self.evaluate(os.path.join(d, "runs", "anchor-cont"), data,
                                                               os.path.join(ev, "anchor-cont"), per_bucket=pb,
                                                               memory=False)),
                ("cap-eval-dense-2x", lambda: self.evaluate(os.path.join(d, "runs", "dense-2x"), data,
                                                            os.path.join(ev, "dense-2x"), per_bucket=pb,
                                                            memory=False))]
        for i in range(1, 5):  # training-token trend: the memory run's checkpoints (the 4th is the final one)
            step = os.path.join(d, "runs", "memory", "checkpoints", f"step-{i * max(M // 4, 1):07d}")
            out.append((f"cap-eval-memory-{i}", lambda step=step, i=i: self.evaluate(
                step, data, os.path.join(ev, f"memory-{i}"), per_bucket=pb)))
        for sd in self.seeds(s.cap_seeds)[1:]:
            out.append((f"cap-eval-memory-s{sd}", lambda sd=sd: self.evaluate(
                os.path.join(d, "runs", f"memory-s{sd}"), data, os.path.join(ev, f"memory-s{sd}"), per_bucket=pb)))
            for i in range(1, 4):  # the training-token trend at this seed (its 4th checkpoint is the final one)
                step = os.path.join(d, "runs", f"memory-s{sd}", "checkpoints", f"step-{i * max(M // 4, 1):07d}")
                out.append((f"cap-eval-memory-s{sd}-{i}", lambda step=step, sd=sd, i=i: self.evaluate(
                    step, data, os.path.join(ev, f"memory-s{sd}-{i}"), "--modes", "fetched,generic", per_bucket=pb,
                    route_top=False)))
            out += [(f"cap-eval-{name}-s{sd}", lambda name=name, sd=sd: self.evaluate(
                os.path.join(d, "runs", f"{name}-s{sd}"), data, os.path.join(ev, f"{name}-s{sd}"), per_bucket=pb,
                memory=False)) for name in ("anchor-cont", "dense-2x")]
        seeds = self.seeds(s.cap_seeds)
        sfx = lambda sd: f"-s{sd}" if sd != seeds[0] else ""  # noqa: E731  (the base seed's runs have no suffix)
        for name in ([f"memory-{where}1{sfx(sd)}" for where in ("first", "last") for sd in seeds]
                     + [f"memory-k{k}{sfx(sd)}" for k in s.bank_ks for sd in seeds]):
            dk = os.path.join(d, "data-" + name.split("-")[1]) if "-k" in name else data
            out.append((f"cap-eval-{name}", lambda name=name, dk=dk: self.evaluate(
                os.path.join(d, "runs", name), dk, os.path.join(ev, name), "--modes", "fetched,generic",
                per_bucket=pb, route_top=False)))  # the report reads fetched and generic only
        for k in s.bank_ks:  # the baselines on the rows of a bank's data (leaf packing): paired val losses
            out += [(f"cap-eval-{name}-k{k}", lambda name=name, k=k: self.evaluate(
                os.path.join(d, "runs", name), os.path.join(d, f"data-k{k}"), os.path.join(ev, f"{name}-k{k}"),
                per_bucket=0, memory=False)) for name in ("anchor-cont", "dense-2x")]
        return out

    # ---- 3. wiki-leads --------------------------------------------------------------------------
    def plan_wiki(self):
        s, d = self.size, self.p("wiki")
        A, M = s.wiki_anchor_steps, s.wiki_memory_steps
        data = {v: os.path.join(d, f"data-{v}") for v in WIKI_VARIANTS}
        anchor, probes, ev = os.path.join(d, "runs", "anchor"), os.path.join(d, "probes"), os.path.join(d, "eval")
        wiki, tok = ["wiki-leads", "--max-docs", s.wiki_docs], os.path.join(data["minilm"], "tokenizer")
        out = [("wiki-data", lambda: self.prepare(data["minilm"], *wiki, val=s.wiki_val)),
               ("wiki-cluster-minilm", lambda: self.cluster(data["minilm"], s.wiki_k))]
        for v in list(WIKI_VARIANTS)[1:]:  # same leads and tokenizer, other leaves
            same = [] if "--embed-text" in WIKI_VARIANTS[v] else ["--embeddings-from", data["minilm"]]
            out += [(f"wiki-data-{v}", lambda v=v: self.prepare(data[v], *wiki, val=s.wiki_val, tokenizer=tok)),
                    (f"wiki-cluster-{v}", lambda v=v, same=same: self.cluster(data[v], s.wiki_k, *WIKI_VARIANTS[v],
                                                                              *same))]
        out += [("wiki-probes", lambda: self.memlm("wiki-probes", data["minilm"], "--out", probes, "--max-per-set",
                                                   s.wiki_probes, "--seed", self.args.seed, "--force")),
                ("wiki-anchor", lambda: self.pretrain(anchor, data["minilm"], A, s.lr, *s.anchor)),
                ("wiki-anchor-cont", lambda: self.pretrain(os.path.join(d, "runs", "anchor-cont"), data["minilm"], M,
                                                           s.memory_lr, *s.anchor, f"init_from={anchor}")),
                ("wiki-dense-2x", lambda: self.pretrain(os.path.join(d, "runs", "dense-2x"), data["minilm"], A + M,
                                                        s.lr, *s.dense))]
        # the baselines and MiniLM-leaf memories at more seeds; every leaf variant at the base seed
        seeds = self.seeds(s.wiki_seeds)
        for sd in seeds[1:]:
            out += [(f"wiki-anchor-cont-s{sd}", lambda sd=sd: self.pretrain(
                        os.path.join(d, "runs", f"anchor-cont-s{sd}"), data["minilm"], M, s.memory_lr, *s.anchor,
                        f"init_from={anchor}", seed=sd)),
                    (f"wiki-dense-2x-s{sd}", lambda sd=sd: self.pretrain(
                        os.path.join(d, "runs", f"dense-2x-s{sd}"), data["minilm"], A + M, s.lr, *s.dense, seed=sd))]
        mem = [(f"memory-{v}", v, seeds[0]) for v in WIKI_VARIANTS]
        mem += [(f"memory-minilm-s{sd}", "minilm", sd) for sd in seeds[1:]]
        for name, v, sd in mem:
            out.append((f"wiki-{name}", lambda name=name, v=v, sd=sd: self.memory(
                os.path.join(d, "runs", name), data[v], M, anchor, s.wiki_k, s.wiki_width, model=s.anchor, seed=sd)))
        tasks = "memlm_wiki_seen,memlm_wiki_heldout"
        jobs = [(f"{name}{sfx}", "anchor", None) for name in ("anchor-cont", "dense-2x")
                for sfx in [""] + [f"-s{sd}" for sd in seeds[1:]]]
        # every memory: router, oracle, generic; the frozen anchor once (the same for every variant); the MiniLM
        # memories also with top-2 routing (loss-routed among the 2 nearest leaves), on the seen articles
        jobs += [(name, m, data[v]) for name, v, sd in mem
                 for m in ("fetched", "oracle", "generic") + (("top2",) if v == "minilm" else ())
                 + (("anchor",) if name == "memory-minilm" else ())]
        for run, mode, dd in jobs:
            extra = (["--data", dd] if dd and mode == "oracle" else []) + (["--route-top", 2] if mode == "top2" else [])
            out.append((f"wiki-harness-{run}-{mode}", lambda run=run, mode=mode, extra=extra: self.memlm(
                "harness", os.path.join(d, "runs", run), "--tasks", "memlm_wiki_seen" if mode == "top2" else tasks,
                "--include-path", probes, "--mode", "fetched" if mode == "top2" else mode,
                "--out", os.path.join(d, "harness", f"{run}-{mode}"), "--force", *extra)))
        # validation loss on the held-out articles: the baselines on the MiniLM leaves' rows, like that memory
        baselines = [(run, data["minilm"], False) for run, _, dd in jobs if dd is None]
        for run, dd, is_mem in baselines + [(name, data[v], True) for name, v, _ in mem]:
            out.append((f"wiki-eval-{run}", lambda run=run, dd=dd, is_mem=is_mem: self.evaluate(
                os.path.join(d, "runs", run), dd, os.path.join(ev, run), per_bucket=0, memory=is_mem)))
        return out

    # ---- plan / report --------------------------------------------------------------------------
    def plan(self, parts: list[str] | None = None, report: bool = True) -> list[tuple[str, callable]]:
        out = []
        for part in parts or self.parts:
            out += getattr(self, f"plan_{part}")()
        if self.args.prepare_only:  # no report either
            prep = ("-data", "-other", "-cluster", "wiki-probes")
            return [(n, f) for n, f in out if any(x in n for x in prep)]
        return out + ([("report", self.stage_report)] if report else [])

    def lanes(self) -> tuple[dict[str, tuple[list[str], list[str]]], int]:
        """({lane: (child argv, its stages)}, threads per child) for --jobs, ({}, threads) when the parts
        run in this process."""
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        jobs = self.args.jobs
        if jobs is None:
            import torch

            jobs = 1 if torch.cuda.is_available() else cores
        groups = split_parts(self.parts, jobs, self.size_name)
        threads = self.args.threads or max(1, cores // len(groups))
        if len(groups) < 2 or self.args.lane:
            return {}, threads
        child = [sys.executable, os.path.abspath(__file__), "--size", self.size_name, "--out", self.out,
                 "--seed", str(self.args.seed), "--parts", ",".join(self.parts), "--mech-variants",
                 ",".join(self.variants), "--jobs", "1", "--threads", str(threads)]
        child += ["--prepare-only"] if self.args.prepare_only else []
        return {"+".join(g): (child + ["--lane", ",".join(g)], [n for n, _ in self.plan(g, report=False)])
                for g in groups}, threads

    def stage_report(self):
        from train.experiments.memory_report import write_memory_report

        done = self.stages.finished()
        seconds = {st: info.get("_seconds", 0.0) for st, info in done.items()}
        path, figs = write_memory_report(self.out, self.parts, dataclasses.asdict(self.size), self.size_name,
                                         self.stages.invocations(self.command), seconds,
                                         self.stages.all_commands(list(done)),
                                         mech_runs=self.mech_runs(), wall_s=time.time() - self.stages.t0,
                                         lanes=list(self.lanes()[0]))
        return {"report": path, "figures": figs}

    def run(self) -> None:
        settings = {"size": dataclasses.asdict(self.size), "parts": self.parts, "seed": self.args.seed,
                    "mech_variants": self.variants, "plan": PLAN}
        lanes, threads = self.lanes()
        plan = self.plan(self.args.lane, report=not self.args.lane)
        where = (" side by side: " + " | ".join(lanes) + f", {threads} thread(s) each") if lanes else ""
        self.stages.run_job("reproduce_memory", plan, settings, fresh=self.args.fresh and not self.args.lane,
                            lanes=lanes, threads=threads,
                            summary=f"size {self.size_name}, parts {self.args.lane or self.parts}{where}"
                                    + (" (CPU preparation only)" if self.args.prepare_only else ""))


# Minutes of each part on an idle 2-core CPU (measured): what --jobs balances its lanes by.
PART_MINUTES = {"quick": {"mech": 5.4, "cap": 1.9, "wiki": 4.2}, "default": {"mech": 16, "cap": 47, "wiki": 32}}


def split_parts(parts: list[str], jobs: int, size: str = "default") -> list[list[str]]:
    """The parts in at most `jobs` groups of about equal time (longest first into the lightest group),
    each in the order of PARTS."""
    minutes = PART_MINUTES.get(size, PART_MINUTES["default"])
    groups: list[list[str]] = [[] for _ in range(max(1, min(jobs, len(parts))))]
    for part in sorted(parts, key=lambda x: -minutes[x]):
        min(groups, key=lambda g: sum(minutes[x] for x in g)).append(part)
    return [[x for x in PARTS if x in g] for g in groups]


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    MemoryRepro(args, argv).run()
    return 0


if __name__ == "__main__":
    from train.cli import run_command

    sys.exit(run_command("reproduce_memory.py", main))
