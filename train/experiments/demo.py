"""`memlm demo`: the end-to-end demo on built-in data (the README's main job).

Every stage is one documented `memlm` command, run in this process; the report lists them so that a
user can re-run any stage by hand. A finished stage leaves `runs/demo/stages/<stage>.json`, so
re-running the demo reuses finished stages (`--fresh` starts over, `--redo STAGE` redoes one and the
stages after it).

Stages: data (bios + wiki-leads, tokenizer) -> cluster (MiniLM + k-means tree) -> anchor (tiny
pretraining) -> memory (memories with the anchor frozen) -> eval (fetched / generic / anchor-only)
-> tag + score + select (LaCy <CALL> positions) -> slm (delegating SLM) -> cascade (with SmolLM2)
-> report (runs/demo/report.md with PNG plots).
"""
from __future__ import annotations

import json
import os
import shlex
import time
from dataclasses import asdict, dataclass

from model.atomic import remove_work_entry
from model.errors import ConfigError
from train.config import STEPS
from train.experiments.stages import StageRunner, checkpoint_every, recipe

KIND = "demo"  # the kind in the demo directory's marker: --fresh deletes only what a demo created

STAGES = ["data", "cluster", "anchor", "memory", "eval", "lacy", "slm", "cascade", "report"]

MAX_NEW_TOKENS = 40  # cascade tokens per prompt (one sentence: generation stops at ".")
CASCADE_PROMPTS = 6  # cascade generations for the report: half bios probe prompts, half Wikipedia openings


@dataclass
class DemoSize:
    """How big the demo is: `cpu` takes about 6½ minutes on 2 cores (README, Results); `gpu` is larger and longer-trained."""
    n_people: int
    top_docs: int  # documents of the most-mentioned person (Zipf head); sets the corpus size
    vocab_size: int
    model_preset: str
    memory_widths: tuple  # hidden units per level (levels = len); fetched ~10% of the anchor
    k: int
    embed_tokens: int  # MiniLM reads this many word pieces per window
    seq_len: int
    batch_size: int
    anchor_steps: int
    memory_steps: int
    slm_steps: int
    lr: float
    memory_lr: float
    call_rate: float
    cascade_tau: float  # the SLM calls when P(<CALL>) >= tau
    eval_batches: int | None  # None: the whole validation split
    probes_per_bucket: int
    val_fraction: float  # documents held out: >= 20k validation tokens, the same for every mode of the eval


SIZES = {
    "cpu": DemoSize(n_people=300, top_docs=200, vocab_size=4096, model_preset="tiny", memory_widths=(48, 8), k=4,
                    embed_tokens=64,
                    seq_len=128, batch_size=16, anchor_steps=400, memory_steps=300, slm_steps=200, lr=3e-3,
                    memory_lr=3e-3,
                    call_rate=0.10, cascade_tau=0.2, eval_batches=None, probes_per_bucket=60, val_fraction=0.1),
    "gpu": DemoSize(n_people=2000, top_docs=800, vocab_size=8192, model_preset="small", memory_widths=(112, 24), k=8,
                    embed_tokens=256,
                    seq_len=256, batch_size=64, anchor_steps=3000, memory_steps=2000, slm_steps=1500, lr=2e-3,
                    memory_lr=2e-3,
                    call_rate=0.10, cascade_tau=0.2, eval_batches=None, probes_per_bucket=200, val_fraction=0.05),
}


class Demo:
    def __init__(self, args):
        import torch

        self.args = args
        self.out = os.path.abspath(args.out)
        size = args.size if args.size != "auto" else ("gpu" if torch.cuda.is_available() else "cpu")
        self.size_name, self.size = size, SIZES[size]
        self.data = os.path.join(self.out, "data")
        self.runs = os.path.join(self.out, "runs")
        self.stages = StageRunner(self.out)
        self.memlm = self.stages.memlm
        # --redo: these stages run again from scratch (their commands would otherwise resume from the
        # checkpoints, cached scores and shards the first run left)
        self.redo = set(STAGES[STAGES.index(args.redo):]) if args.redo else set()

    def steps(self, n: int) -> int:
        return max(10, int(n * self.args.steps_scale))

    def check_flags(self) -> None:
        """Refuse, before any stage runs, a flag that a later stage would reject minutes into the run."""
        s = self.size
        longest = self.steps(max(s.anchor_steps, s.memory_steps, s.slm_steps))
        if longest >= STEPS:
            raise ConfigError(f"--steps-scale {self.args.steps_scale:g}: gives {longest:,} training steps at "
                              f"--size {self.size_name}, more than the bound {STEPS:,}; give a smaller --steps-scale")
        if self.args.large is not None and not os.path.isdir(self.args.large):
            raise ConfigError(f"--large {self.args.large}: no such directory; give a transformers model directory "
                              "or a memlm run, or leave --large out (SmolLM2-135M)")

    def settings(self) -> dict:
        """What the finished stages were built with: a rerun with other values is refused (StageRunner.pin)."""
        return {"size": self.size_name, "seed": self.args.seed, "steps_scale": self.args.steps_scale}

    def pretrain(self, name: str, steps: int, *overrides: str) -> str:
        """Train run `name` (named after its stage); a redone stage starts over instead of resuming."""
        s = self.size
        if name in self.redo and os.path.isdir(os.path.join(self.runs, name)):
            remove_work_entry(self.out, KIND, os.path.join(self.runs, name))
        self.memlm("pretrain", "--config", recipe("tiny-cpu.yaml"),
                   f"name={name}", f"runs_dir={self.runs}", f"seed={self.args.seed}",
                   f"model.preset={s.model_preset}", f"data.path={self.data}", f"data.seq_len={s.seq_len}",
                   f"data.batch_size={s.batch_size}", f"trainer.max_steps={steps}",
                   f"trainer.val_every={max(steps // 4, 1)}", f"trainer.log_every={max(steps // 20, 1)}",
                   f"checkpoint.every={checkpoint_every(steps)}", "checkpoint.keep_last_k=1", "logging.logger=none",
                   f"optim.lr={s.lr}", f"optim.min_lr={s.lr / 10}", f"optim.warmup_steps={max(steps // 20, 1)}",
                   *overrides)
        return os.path.join(self.runs, name)

    # ---- stages -------------------------------------------------------------------------------
    def stage_data(self):
        s = self.size
        if "data" in self.redo and os.path.isdir(self.data):
            remove_work_entry(self.out, KIND, self.data)
        # One data dir mixing the synthetic biographies (exact knowledge base and probes) with the
        # Wikipedia leads; the BPE tokenizer is trained on both.
        self.memlm("prepare", "--corpus", "bios:1,wiki-leads:1", "--out", self.data,
                   "--n-people", s.n_people, "--top-docs", s.top_docs, "--seed", self.args.seed, "--vocab-size", s.vocab_size,
                   "--window-tokens", s.seq_len, "--val-fraction", s.val_fraction)
        from data.shards import open_data

        m = open_data(self.data).manifest
        return {"train_tokens": sum(x["n_tokens"] for x in m["splits"]["train"]["shards"]),
                "val_tokens": sum(x["n_tokens"] for x in m["splits"]["val"]["shards"])}

    def stage_cluster(self):
        s = self.size
        self.memlm("cluster", self.data, "--levels", len(s.memory_widths), "--k", s.k, "--seed", self.args.seed,
                   "--max-tokens", s.embed_tokens,
                   *(["--refit"] if "cluster" in self.redo else []))
        return {"levels": len(s.memory_widths), "k": s.k}

    def stage_anchor(self):
        return {"run": self.pretrain("anchor", self.steps(self.size.anchor_steps))}

    def stage_memory(self):
        s = self.size
        widths = "[" + ",".join(str(w) for w in s.memory_widths) + "]"
        run = self.pretrain("memory", self.steps(s.memory_steps),
                            f"init_from={os.path.join(self.runs, 'anchor')}", "memory.preset=tiny",
                            f"memory.k={s.k}", f"memory.widths={widths}", f"memory.lr={s.memory_lr}",
                            f"memory.min_lr={s.memory_lr / 10}", "memory.freeze_anchor=true", "data.by_leaf=true")
        return {"run": run}

    def stage_eval(self):
        out = os.path.join(self.out, "eval")
        batches = [] if self.size.eval_batches is None else ["--val-batches", self.size.eval_batches]
        self.memlm("eval", os.path.join(self.runs, "memory"), "--data", self.data, "--out", out, *batches,
                   "--probes-per-bucket", self.size.probes_per_bucket, "--seed", self.args.seed,
                   "--force")  # the demo owns its eval output: a redone stage replaces it
        return {"eval": os.path.join(out, "eval.json")}

    def stage_lacy(self):
        # Both splits: the SLM's validation loss counts <CALL> targets too.
        self.memlm("tag", self.data)
        self.memlm("score", self.data, "--model", os.path.join(self.runs, "anchor"), "--name", "ref",
                   *(["--overwrite"] if "lacy" in self.redo else []))  # the anchor may have changed
        self.memlm("select", self.data, "--rule", "lacy", "--call-rate", self.size.call_rate,
                   "--seed", self.args.seed)
        with open(os.path.join(self.data, "selection", "calls_lacy.json")) as f:
            return {"selection": json.load(f)}

    def stage_slm(self):
        # The delegating SLM continues the anchor's pretraining with <CALL> targets on the selected tokens.
        run = self.pretrain("slm", self.steps(self.size.slm_steps),
                            f"init_from={os.path.join(self.runs, 'anchor')}", "data.calls=calls_lacy")
        return {"run": run}

    def stage_cascade(self):
        from train.commands.cascade import load_cascade

        prompts, answers = zip(*_demo_prompts(self.data, CASCADE_PROMPTS, self.args.seed))
        tau = self.size.cascade_tau
        self.stages.commands.append(shlex.join(["memlm", "cascade", "--slm", os.path.join(self.runs, "slm"),
                                                "--tau", str(tau), "--stop", ".", "--max-new-tokens",
                                                str(MAX_NEW_TOKENS),
                                                *(["--large", self.args.large] if self.args.large else []),
                                                *(x for p in prompts for x in ("--prompt", p))]))
        cascade = load_cascade(os.path.join(self.runs, "slm"), self.args.large, tau=tau)
        outputs = []
        for prompt, answer in zip(prompts, answers):
            o = cascade.generate(prompt, max_new_tokens=MAX_NEW_TOKENS, stop=".")  # one sentence each
            print(f"  {o.marked()!r}  (calls: {o.calls}" + (f"; truth: {answer}" if answer else "") + ")", flush=True)
            outputs.append({**o.to_dict(), "answer": answer})
        return {"outputs": outputs, "large": self.args.large}

    def stage_report(self):
        from train.experiments.report import write_demo_report

        info = {stage: self.stages.done(stage) for stage in STAGES[:-1]}
        path = write_demo_report(self.out, self.runs, info, self.stages.all_commands(STAGES[:-1]),
                                 size=asdict(self.size), size_name=self.size_name, seed=self.args.seed)
        return {"report": path}

    # ---- driver ---------------------------------------------------------------------------------
    def run(self):
        self.check_flags()
        self.stages.start(KIND, fresh=self.args.fresh)
        self.stages.pin(self.settings())
        cascade = self.stages.done("cascade")
        if cascade is not None and cascade.get("large") != self.args.large:  # only that stage used --large
            print(f"[cascade] made with --large {cascade.get('large') or 'SmolLM2-135M (the default)'}: runs again",
                  flush=True)
            self.stages.forget("cascade")
        redo_from = STAGES.index(self.args.redo) if self.args.redo else len(STAGES)
        self.stages.run_plan([(stage, getattr(self, f"stage_{stage}")) for stage in STAGES],
                             redo_from=redo_from, until=self.args.until)
        total = (time.time() - self.stages.t0) / 60
        report = self.args.until in (None, "report")  # --until an earlier stage writes no report
        print(f"\nmemlm demo: finished in {total:.1f} min -> "
              f"{os.path.join(self.out, 'report.md') if report else self.out + ' (stages up to ' + self.args.until + ')'}")


def _demo_prompts(data: str, n: int, seed: int) -> list[tuple[str, str | None]]:
    """(prompt, knowledge-base answer or None): half probe prompts of people of the rarest bucket
    ("<Name> was born in the city of"), where the next word is a fact the SLM saw 1-3 times, half
    openings of validation Wikipedia leads (open-domain entities): where the SLM should delegate."""
    import random

    from data.bios import person_of
    from data.shards import open_data

    rng = random.Random(seed)
    with open(os.path.join(data, "bios", "probes.jsonl")) as f:
        probes = [json.loads(line) for line in f]
    rarest = min(q["bucket"] for q in probes)
    by_person: dict[str, list[tuple[str, str]]] = {}
    for p in probes:
        if p["bucket"] == rarest:
            by_person.setdefault(p["name"], []).append((p["prompt"], p["answer"].strip()))
    people = rng.sample(sorted(by_person), min(len(by_person), n // 2))
    prompts: list[tuple[str, str | None]] = [rng.choice(by_person[name]) for name in people]
    dd = open_data(data)
    tok = dd.tokenizer()
    for shard in dd.shards("val"):
        windows = shard.windows
        for i, doc in enumerate(shard.docs):
            if len(prompts) >= n:
                return prompts
            if person_of(doc["doc_id"]) is None and doc.get("chunk", 0) == 0:
                text = tok.decode(shard.tokens[windows[i]:windows[i + 1]].tolist(), skip_special_tokens=True)
                prompts.append((" ".join(text.split()[:8]), None))
    return prompts
