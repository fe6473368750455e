"""The reproduction scripts' argument parsing and stage plans (dry runs: nothing is trained), and the report
tables they build. Fast: no model is trained, no corpus is built."""
from __future__ import annotations

import os
from dataclasses import asdict as dataclasses_asdict

import pytest

from model.errors import ConfigError
from scripts import reproduce_lacy, reproduce_memory
from train.experiments.stages import StageRunner


@pytest.mark.parametrize("mod,flags", [(reproduce_memory, ("--size", "--parts")), (reproduce_lacy, ("--quick", "--scale"))])
def test_help(mod, flags, capsys):
    with pytest.raises(SystemExit) as e:
        mod.main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "--dry-run" in out and all(f in out for f in flags)


def _stages(out: str) -> list[str]:
    return [line.split("]")[0].split(" ", 1)[1] for line in out.splitlines() if line.startswith("[")]


@pytest.mark.parametrize("size", ["quick", "default", "gpu"])
def test_memory_dry_run_plan(size, tmp_path, capsys):
    out_dir = tmp_path / "m"
    assert reproduce_memory.main(["--size", size, "--dry-run", "--out", str(out_dir)]) == 0
    out = capsys.readouterr().out
    stages = _stages(out)
    s = reproduce_memory.SIZES[size]
    for v in reproduce_memory.MECH_VARIANTS:
        assert f"mech-cluster-{v}" in stages and f"mech-{v}-s0" in stages and f"mech-eval-{v}-s0" in stages
    assert [x for x in stages if x.startswith("mech-entity-s")] == [f"mech-entity-s{i}" for i in range(s.mech_seeds)]
    for x in ("cap-anchor", "cap-anchor-cont", "cap-dense-2x", "cap-memory", "cap-memory-first1", "cap-memory-last1",
              "cap-eval-memory-4", "wiki-probes", "wiki-harness-memory-entity-oracle", "wiki-harness-dense-2x-anchor"):
        assert x in stages
    assert all(f"cap-memory-k{k}" in stages for k in s.bank_ks)
    # headline rows at more seeds: the cap memory run and the MiniLM wiki memory run, each evaluated
    assert [x for x in stages if x.startswith("cap-memory-s")] == [f"cap-memory-s{i}" for i in range(1, s.cap_seeds)]
    assert all(f"cap-eval-memory-s{i}" in stages for i in range(1, s.cap_seeds))
    for i in range(1, s.cap_seeds):  # every row of the cap comparison, including the bank-size trend
        for name in ["anchor-cont", "dense-2x"] + [f"memory-k{k}" for k in s.bank_ks]:
            assert f"cap-{name}-s{i}" in stages and f"cap-eval-{name}-s{i}" in stages
    assert all(f"cap-eval-anchor-cont-k{k}" in stages for k in s.bank_ks)
    for i in range(1, s.cap_seeds):  # the trends at more seeds: placement, and each checkpoint of the memory run
        assert all(f"cap-memory-{w}1-s{i}" in stages and f"cap-eval-memory-{w}1-s{i}" in stages for w in ("first", "last"))
        assert [x for x in stages if x.startswith(f"cap-eval-memory-s{i}-")] == [f"cap-eval-memory-s{i}-{c}"
                                                                                  for c in (1, 2, 3)]
    assert [x for x in stages if x.startswith("wiki-memory-minilm-s")] == [f"wiki-memory-minilm-s{i}"
                                                                         for i in range(1, s.wiki_seeds)]
    assert all(f"wiki-harness-memory-minilm-s{i}-{m}" in stages for i in range(1, s.wiki_seeds)
               for m in ("fetched", "oracle", "generic", "top2"))
    assert "wiki-harness-memory-minilm-top2" in stages and "wiki-harness-memory-entity-top2" not in stages
    assert "wiki-harness-memory-entity-anchor" not in stages  # the frozen anchor is scored once
    assert ("--tasks memlm_wiki_seen --include-path " + str(out_dir / "wiki" / "probes") + " --mode fetched --out "
            + str(out_dir / "wiki" / "harness" / "memory-minilm-top2") + " --force --route-top 2") in out
    assert s.cap_seeds >= 2 and s.wiki_seeds >= 2 and (size == "quick" or min(s.cap_seeds, s.wiki_seeds) >= 3)
    # wiki: every leaf variant trained and scored; validation loss of every run on the held-out articles
    for v in reproduce_memory.WIKI_VARIANTS:
        assert f"wiki-cluster-{v}" in stages and f"wiki-memory-{v}" in stages and f"wiki-eval-memory-{v}" in stages
    assert "wiki-eval-anchor-cont" in stages and "wiki-eval-dense-2x" in stages
    assert f"--val-fraction {s.wiki_val} " in out and f"--max-docs {s.wiki_docs}\n" in out
    assert stages[-1] == "report"
    # Same training tokens: anchor A then A+M for the dense model; memories on the frozen anchor.
    assert f"trainer.max_steps={s.cap_anchor_steps + s.cap_memory_steps} " in out
    assert "--bios-preset uniform" in out and "--bios-preset capacity" in out
    assert "--paths-from 'id:^bio-([0-9]+)-'" in out and "--paths-from entity" in out and "--embed-text sentences" in out
    assert "memory.freeze_anchor=true" in out and "memory.layers=first:1" in out and "--route-top 2" in out
    assert "--mode oracle" in out and "--include-path" in out and "--corpus wiki-leads" in out
    assert out.count("--embeddings-from") == len(reproduce_memory.MECH_VARIANTS) - 1 + len(s.bank_ks) + 1
    assert not out_dir.exists()  # a dry run writes nothing


def test_memory_options(tmp_path, capsys):
    reproduce_memory.main(["--dry-run", "--out", str(tmp_path / "m"), "--parts", "mech"])
    out = capsys.readouterr().out
    assert "cap-" not in out and "wiki" not in out and "mech-anchor" in out
    reproduce_memory.main(["--dry-run", "--size", "gpu", "--prepare-only", "--out", str(tmp_path / "g")])
    stages = _stages(capsys.readouterr().out)
    assert stages and all(any(x in st for x in ("-data", "-other", "-cluster", "wiki-probes")) for st in stages)
    assert "wiki-probes" in stages and "cap-cluster" in stages
    with pytest.raises(SystemExit) as e:
        reproduce_memory.main(["--dry-run", "--out", str(tmp_path / "m"), "--parts", "nope"])
    assert e.value.code == 2 and "--parts: unknown 'nope'" in capsys.readouterr().err
    for flag in ("--jobs", "--threads"):  # a count of processes / threads: one line naming the flag
        with pytest.raises(SystemExit) as e:
            reproduce_memory.main(["--dry-run", "--out", str(tmp_path / "m"), flag, "0"])
        err = capsys.readouterr().err
        assert e.value.code == 2 and f"argument {flag}" in err and "Traceback" not in err


def test_lacy_dry_run_plan(tmp_path, capsys):
    out_dir = tmp_path / "l"
    assert reproduce_lacy.main(["--quick", "--dry-run", "--out", str(out_dir), "--call-rates", "0.07,0.2"]) == 0
    out = capsys.readouterr().out
    stages = _stages(out)
    assert stages[:6] == ["bios-data", "bios-tag", "bios-cluster", "wiki-data", "wiki-tag", "wiki-facts"]
    rules = [r for r in reproduce_lacy.RULES]
    assert [s for s in stages if s.startswith("bios-") and s.endswith("-7")] == [f"bios-{r}-7" for r in rules]
    assert [s for s in stages if s.endswith("-20")] == [f"bios-{r}-20" for r in rules if r != "none"]
    assert [s for s in stages if s.startswith("wiki-") and s[5:] in rules] == [f"wiki-{r}" for r in rules]
    assert stages[-1] == "report" and "bios-mem-lacy" in stages and "wiki-cascade" in stages
    for rule in ("lacy", "loss", "rho", "random"):
        for pct in ("7", "20"):
            assert f"--rule {rule} --call-rate 0.{pct if pct == '20' else '07'}" in out.replace("0.2 ", "0.20 ")
            assert f"data.calls=calls_{rule}_{pct}" in out and f"--slm '{rule} {pct}%=" in out
        assert f"data.calls=calls_{rule}\n" in out  # wiki: one rate, arrays named by rule
    assert "--taus" in out and "--large-alone" in out and "--speed-check" in out and "--name large" in out
    assert "memory.freeze_anchor=false" in out and "data.by_leaf=true" in out
    assert "memlm calibrate" in out and "--tag-calls" in out and "--diagnose" in out
    assert not out_dir.exists()
    for flag, value, message in (("--rules", "lacy,llm-judge", "--rules: unknown 'llm-judge'"),
                                 ("--call-rates", "0,0.1", "--call-rates: '0' in '0,0.1': must be a finite number > 0")):
        with pytest.raises(SystemExit) as e:
            reproduce_lacy.main(["--dry-run", "--out", str(out_dir), flag, value])
        assert e.value.code == 2 and message in capsys.readouterr().err


def test_lacy_gpu_size_prepares_on_cpu(tmp_path, capsys):
    """--prepare-only lists only the spaCy / faiss / MiniLM stages; the GPU run leaves memory out and uses
    the memlm large model for the wiki cascade (SmolLM2 and spaCy are not on the GPU machine)."""
    out_dir = str(tmp_path / "g")
    reproduce_lacy.main(["--size", "gpu", "--prepare-only", "--dry-run", "--out", out_dir])
    stages = _stages(capsys.readouterr().out)
    assert set(stages) <= set(reproduce_lacy.CPU_ONLY) and "wiki-facts" in stages
    reproduce_lacy.main(["--size", "gpu", "--dry-run", "--out", out_dir])
    out = capsys.readouterr().out
    assert "bios-mem-lacy" not in out and "--tag-calls" not in out
    assert f"--large {out_dir}/runs/wiki-large" in out and "model.preset=small" in out


def test_split_parts_balances_lanes():
    split = reproduce_memory.split_parts
    assert split(["mech", "cap", "wiki"], 2) == [["cap"], ["mech", "wiki"]]  # 47 | 16 + 32 minutes
    assert split(["mech", "cap", "wiki"], 2, "quick") == [["mech"], ["cap", "wiki"]]
    assert split(["mech", "cap", "wiki"], 1) == [["mech", "cap", "wiki"]]
    assert split(["mech", "cap", "wiki"], 8, "gpu") == [["cap"], ["wiki"], ["mech"]]
    assert split(["wiki"], 2) == [["wiki"]]


def test_memory_jobs_lanes(tmp_path, capsys):
    """--jobs N: the parts in child processes (argv of this script with --lane), the report here; each child
    pins the job's settings (all parts) and records the job's command line."""
    out = str(tmp_path / "m")
    args = reproduce_memory.build_parser().parse_args(["--out", out, "--jobs", "2", "--threads", "3"])
    repro = reproduce_memory.MemoryRepro(args, ["--out", out, "--jobs", "2", "--threads", "3"])
    lanes, threads = repro.lanes()
    assert list(lanes) == ["cap", "mech+wiki"] and threads == 3
    argv, stages = lanes["mech+wiki"]
    assert argv[argv.index("--lane") + 1] == "mech,wiki" and argv[argv.index("--parts") + 1] == "mech,cap,wiki"
    assert "--fresh" not in argv and argv[argv.index("--jobs") + 1] == "1"
    assert stages[0] == "mech-data" and stages[-1].startswith("wiki-") and "report" not in stages
    assert set(stages) | set(lanes["cap"][1]) == {n for n, _ in repro.plan() if n != "report"}
    child = reproduce_memory.build_parser().parse_args(argv[2:])
    os.environ["MEMLM_JOB_INVOCATION"] = "python scripts/reproduce_memory.py --jobs 2"
    try:
        lane = reproduce_memory.MemoryRepro(child, argv[2:])
    finally:
        del os.environ["MEMLM_JOB_INVOCATION"]
    assert lane.lanes()[0] == {} and [n for n, _ in lane.plan(child.lane, report=False)] == stages
    assert lane.stages.invocation == "python scripts/reproduce_memory.py --jobs 2"
    assert reproduce_memory.main(["--dry-run", "--out", out, "--jobs", "2"]) == 0
    assert "side by side: cap | mech+wiki" in capsys.readouterr().out
    reproduce_memory.main(["--dry-run", "--out", out, "--jobs", "1"])
    assert "side by side" not in capsys.readouterr().out


def test_run_lanes(tmp_path, capsys):
    """Lanes run side by side with their thread share; a failing lane leaves the other's stages done, and the
    error names its log."""
    import sys

    from model.errors import MemlmError

    out = str(tmp_path / "job")
    runner = StageRunner(out)
    runner.start("lanes-test")
    mark = ("import json, os, sys; d = sys.argv[1]; os.makedirs(os.path.join(d, sys.argv[2]), exist_ok=True); "
            "[json.dump({'_seconds': 1, 'threads': os.environ['OMP_NUM_THREADS']}, open(os.path.join(d, 'stages', "
            "s + '.json'), 'w')) for s in sys.argv[3:]]; print('lane output')")
    lanes = {"a": ([sys.executable, "-c", mark, out, "made-by-a", "a1", "a2"], ["a1", "a2"]),
             "b": ([sys.executable, "-c", mark + "; sys.exit(3)", out, "made-by-b", "b1"], ["b1", "b2"])}
    with pytest.raises(MemlmError, match=r"lane\(s\) b failed: see .*logs/b.log"):
        runner.run_lanes(lanes, threads=1, poll_s=0.05)
    printed = capsys.readouterr().out
    assert "[lane a 2/2] a2 done" in printed and "[lane b] failed (exit code 3)" in printed
    assert runner.done("a1")["threads"] == "1" and runner.done("b2") is None
    assert open(os.path.join(out, "logs", "a.log")).read() == "lane output\n"
    from model.atomic import read_marker

    assert {"made-by-a", "made-by-b", "logs", "stages"} <= set(read_marker(out)["entries"])  # --fresh removes them
    runner.run_lanes({"a": lanes["a"]}, threads=2, poll_s=0.05)  # done stages are not announced again
    assert "a1 done" not in capsys.readouterr().out


def test_settings_pinned(tmp_path):
    StageRunner(str(tmp_path)).pin({"size": {"steps": 10}})
    StageRunner(str(tmp_path)).pin({"size": {"steps": 10}})  # same settings: resumable
    with pytest.raises(ConfigError, match="other settings"):
        StageRunner(str(tmp_path)).pin({"size": {"steps": 20}})


def test_memory_report_from_eval_json(tmp_path):
    """The report reads per-probe results and computes paired intervals; missing parts say 'not run'."""
    import json

    from train.experiments.memory_report import ci_cell, items_diff, write_memory_report

    def ev(f, o, g, a):
        items = {"person": list(range(8)), "bucket": [0] * 4 + [1] * 4, "fetched": f, "fetched_oracle": o,
                 "generic": g, "anchor": a, "hit": [1, 1, 1, 1, 0, 0, 0, 0]}
        probes = {k: {"all": {"acc": sum(v) / 8, "lo": 0.0, "hi": 1.0, "n": 8}} for k, v in items.items()
                  if k not in ("person", "bucket", "hit")}
        return {"probes": probes, "probe_items": items,
                "probe_diffs": {"fetched_oracle - fetched": {"all": {"diff": (sum(o) - sum(f)) / 8, "lo": -0.1,
                                                                     "hi": 0.2, "n": 8}}},
                "probe_routing": {"consistency": 0.75, "hit": {"fetched": {"all": {"share": 0.5, "lo": 0.2,
                                                                                  "hi": 0.8, "n": 8}}}}}
    e = ev([1, 1, 0, 0, 1, 0, 0, 0], [1] * 8, [0] * 8, [0] * 8)
    d = items_diff(e, "fetched_oracle", e, "fetched")
    assert d["diff"] == pytest.approx(5 / 8) and d["lo"] <= d["diff"] <= d["hi"]
    assert items_diff(e, "fetched", {"probe_items": {"person": [0], "fetched": [1]}}, "fetched") is None
    assert ci_cell({"acc": 0.5, "lo": 0.25, "hi": 0.75}) == "0.500 [0.250, 0.750]"
    assert ci_cell({"diff": 0.1, "lo": -0.05, "hi": 0.2}, "diff") == "+0.100 [-0.050, +0.200]"
    path = tmp_path / "mech" / "eval" / "minilm-s0" / "eval.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(e))
    size = dataclasses_asdict(reproduce_memory.SIZES["quick"])
    report, figs = write_memory_report(str(tmp_path), ["mech", "cap", "wiki"], size, "quick", "cmd", {"x": 1.0}, [],
                                       mech_runs=[("minilm", 0), ("entity", 0)])
    text = open(report).read()
    assert "leaves: `minilm`" in text and "0.375 [" in text and "0.500 [0.200, 0.800]" in text
    assert "+0.625 [-0.100, +0.200]" in text  # the router gap row
    # the gain on router hits (probes 0-3: fetched 1,1,0,0 vs generic 0) and misses (1,0,0,0)
    assert "| `minilm` | +0.500 [" in text and "(n=4) | +0.250 [" in text
    assert "(n=4) | +0.750 [" in text  # oracle (all 1) - fetched on the misses
    assert "2. Capacity-bound bios: not run" in text and "3. Wiki-leads knowledge probes: not run" in text


def test_lacy_report_from_command_outputs(tmp_path):
    """The report reads the commands' JSON: knowledge gap, matched-rate tables, paired verdicts, wiki, calibration."""
    import json

    import numpy as np

    from train.experiments.lacy_report import write_lacy_report
    from train.lacy.curves import compare

    rng = np.random.default_rng(0)
    rows = []
    for label, p_call in (("lacy 10%", 0.9), ("loss 10%", 0.6), ("none", 0.3)):
        for person in range(30):
            for tau, rate in ((1.01, 0.0), (0.2, 0.1), (0.05, 0.3)):
                calls = int(rate * 20) if label != "none" else 0
                p = 0.3 + (p_call - 0.3) * (calls / 6)
                rows.append({"label": label, "person": person, "tau": tau, "correct": rng.binomial(5, p), "stated": 5,
                             "calls": calls, "decisions": 20})
    curves, diffs = compare(rows, ["lacy 10%", "loss 10%", "none"], [0.0, 0.1, 0.2], (0.0, 0.2), n_boot=100)
    res = {"large alone": {"factscore": 0.9, "facts_per_bio": 5.0, "factscore_ci": {"point": 0.9, "lo": 0.85, "hi": 0.95}}}
    for label in ("lacy 10%", "loss 10%", "none"):
        res[f"{label} tau=1.01"] = {"factscore": 0.3, "facts_per_bio": 5.0,
                                    "factscore_ci": {"point": 0.3, "lo": 0.25, "hi": 0.35}}
    os.makedirs(tmp_path / "factscore")
    (tmp_path / "factscore" / "factscore.json").write_text(json.dumps(
        {"per_bucket": 6, "taus": ["1.01", "0.2", "0.05"], "match_rates": [0, 0.1, 0.2], "results": res,
         "curves": curves, "diffs": diffs, "speed": {"slm": "lacy 10%", "generations": 12, "prompts": 4,
                                                     "taus": ["0.2", "argmax", "1.01"], "one_prompt_per_s": 1.0,
                                                     "one_prompt_seconds": 12.0, "batched_per_s": 6.0,
                                                     "batched_seconds": 2.0, "speedup": 6.0, "identical": 1.0}}))
    os.makedirs(tmp_path / "calibration-wiki")
    cal = {"results": {"lacy": {p: {"n": 10, "auroc": {"point": 0.7, "lo": 0.6, "hi": 0.8},
                                    "ece": {"point": 0.1, "lo": 0.05, "hi": 0.15}, "wrong_rate": 0.4,
                                    "mean_p_call": 0.05} for p in ("factual", "non_factual")}}}
    (tmp_path / "calibration-wiki" / "calibration.json").write_text(json.dumps(cal))
    path, figs = write_lacy_report(str(tmp_path), ["lacy", "loss", "none"], [0.1], {"a": 1}, "quick", "cmd",
                                   {"bios-ref": 90.0}, ["memlm x"])
    text = open(path).read()
    assert "| large alone | 0.900 [0.850, 0.950] | 5.00 | — |" in text
    assert "| lacy 10% SLM alone | 0.300 [0.250, 0.350] | 5.00 | +0.600 |" in text
    assert "lacy 10% vs loss 10% at 20% calls: better" in text  # built so that lacy gains more per call
    assert "mean FactScore over 0%–20% calls (area)" in text
    assert "lacy 10% − none" in text and "**6.0×**" in text and "identical outputs 100.0%" in text
    assert "| lacy | 0.700 [0.600, 0.800] | 0.100 [0.050, 0.150] |" in text
    assert figs and all(os.path.getsize(f) > 1000 for f in figs)


def test_report_covers_every_invocation(tmp_path):
    """A job run part by part (`--parts bios`, then `--parts wiki`) reports the stages, times and command
    lines of both invocations, not only of the one that writes the report."""
    for parts, stages in (("bios", ["bios-data", "bios-ref"]), ("wiki", ["wiki-data"])):
        runner = StageRunner(str(tmp_path))
        runner.start("reproduce_x")
        runner.invocation = f"python scripts/reproduce_x.py --parts {parts}"
        for st in stages:
            runner.run(st, lambda: {"n": 1})
        runner.run("report", lambda: {})
    done = StageRunner(str(tmp_path)).finished()
    assert list(done) == ["bios-data", "bios-ref", "wiki-data"]  # in the order they finished; no report
    assert all(info["_seconds"] >= 0 for info in done.values())
    assert StageRunner(str(tmp_path)).invocations("fallback") == \
        "python scripts/reproduce_x.py --parts bios; python scripts/reproduce_x.py --parts wiki"
    assert StageRunner(str(tmp_path / "none")).invocations("fallback") == "fallback"


def _pretrain_configs(out: str) -> dict:
    """{run dir: RunConfig} of every `memlm pretrain` line a dry run printed."""
    import shlex

    from train.config import load_config

    cfgs = {}
    for line in out.splitlines():
        if line.startswith("  $ memlm pretrain "):
            argv = shlex.split(line[len("  $ memlm pretrain "):])
            cfg = load_config(argv[1], [a for a in argv[2:] if not a.startswith("init_from=")])
            init = [a.split("=", 1)[1] for a in argv if a.startswith("init_from=")]
            cfgs[os.path.join(cfg.runs_dir, cfg.name)] = (cfg, init[0] if init else None)
    return cfgs


@pytest.mark.parametrize("mod,size", [(reproduce_memory, "quick"), (reproduce_memory, "default"),
                                      (reproduce_memory, "gpu"), (reproduce_lacy, "quick"),
                                      (reproduce_lacy, "default"), (reproduce_lacy, "gpu")])
def test_init_from_model_matches_its_source(mod, size, tmp_path, capsys):
    """Every stage that starts from an earlier run describes that run's model (pretrain refuses otherwise,
    hours into a reproduction): the model section of each init_from pair is the same."""
    assert mod.main(["--size", size, "--dry-run", "--out", str(tmp_path / "r")]) == 0
    out = capsys.readouterr().out
    cfgs = _pretrain_configs(out)
    pairs = [(run, src) for run, (_, src) in cfgs.items() if src in cfgs]
    assert pairs  # the plans do start runs from earlier runs
    for run, src in pairs:
        assert cfgs[run][0].model.differences(cfgs[src][0].model) == [], f"{run} starts from {src}"
    # Memory-only flags go to memory runs only (eval and score refuse them on an anchor).
    for line in out.splitlines():
        if line.startswith("  $ memlm eval ") and "--route-top" in line:
            run = line.split()[3].split("/checkpoints/")[0]
            assert cfgs[run][0].memory is not None, line


def test_memory_report_seeds_and_paired_val_loss(tmp_path):
    """Seeds tables (mean and t interval over seeds) and validation-loss differences paired across runs
    evaluated on the same rows; rows that differ are not paired."""
    import json

    from train.experiments.memory_report import seed_cell, wiki_section

    def put(path, obj):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(obj))

    def harness(seen):  # 4 seen probes, 4 held-out (all wrong)
        return {"tasks": {"memlm_wiki_seen": {"items": dict(zip("abcd", seen))},
                          "memlm_wiki_heldout": {"items": dict(zip("efgh", [0] * 4))}}}

    h = tmp_path / "wiki" / "harness"
    for run, f, g in (("memory-minilm", [1, 1, 1, 0], [1, 0, 0, 0]), ("memory-minilm-s1", [1, 1, 0, 0], [0, 0, 0, 0])):
        put(h / f"{run}-fetched" / "harness.json", harness(f))
        put(h / f"{run}-oracle" / "harness.json", harness(f))
        put(h / f"{run}-generic" / "harness.json", harness(g))
        put(h / f"{run}-top2" / "harness.json", {"tasks": {"memlm_wiki_seen": {"items": dict(zip("abcd", [1] * 4))}}})
    put(h / "anchor-cont-anchor" / "harness.json", harness([0, 0, 0, 1]))
    put(h / "anchor-cont-s1-anchor" / "harness.json", harness([1, 1, 0, 0]))
    rows = {"seq_len": 8, "batch_size": 2, "seed": 0}
    ev = tmp_path / "wiki" / "eval"
    put(ev / "memory-minilm" / "eval.json", {
        "data": "/d", "val": {"fetched": {"loss": 2.0, "ppl": 7.4, "tokens": 3}, "generic": {"loss": 3.0, "ppl": 20.1, "tokens": 3}},
        "val_rows": {**rows, "fetched": {"nats": [2.0, 4.0], "tokens": [1, 2]}, "generic": {"nats": [3.0, 6.0], "tokens": [1, 2]}}})
    put(ev / "anchor-cont" / "eval.json", {
        "data": "/d", "val": {"anchor": {"loss": 2 / 3, "ppl": 1.9, "tokens": 3}},
        "val_rows": {**rows, "anchor": {"nats": [1.0, 1.0], "tokens": [1, 2]}}})
    put(ev / "dense-2x" / "eval.json", {  # other rows: not paired
        "data": "/d", "val": {"anchor": {"loss": 1.0, "ppl": 2.7, "tokens": 3}},
        "val_rows": {**rows, "anchor": {"nats": [1.0, 2.0], "tokens": [2, 1]}}})
    text = "\n".join(wiki_section(str(tmp_path))[0])
    assert "Over seeds (memory training and data order of every row" in text
    # fetched - generic on seen: seed 0 0.75 - 0.25, seed 1 0.5 - 0 -> mean +0.500, interval from the t quantile
    assert f"| fetched - generic | {seed_cell([0.5, 0.5], '+.3f')} |" in text and "+0.500 [+0.500, +0.500] (2 seeds)" in text
    # memory seed i minus anchor-only seed i: 0.75 - 0.25, 0.5 - 0.5
    assert f"| fetched - anchor-only continued | {seed_cell([0.5, 0.0], '+.3f')} |" in text
    assert f"| dense 2x |" not in text  # no dense harness run: no row
    # top-2 all right (1 - 0.75, 1 - 0.5), scored on the seen articles only
    assert f"| top-2 - router | {seed_cell([0.25, 0.5], '+.3f')} | — |" in text
    assert f"| top-2 - anchor-only continued | {seed_cell([0.75, 0.5], '+.3f')} |" in text
    assert "| `memory-minilm` fetched - `anchor-cont` | +1.3333 [" in text  # 6/3 - 2/3, paired over the 2 rows
    assert "| `memory-minilm` fetched - `dense-2x` | — |" in text
    assert seed_cell([0.1]) == "0.100 (1 seed)"
    lo, hi = (float(x) for x in seed_cell([1.0, 2.0, 3.0]).split("[")[1].split("]")[0].split(","))
    assert (lo, hi) == pytest.approx((2 - 4.303 / 3 ** 0.5, 2 + 4.303 / 3 ** 0.5), abs=1e-3)


def test_cap_seeds_pair_seed_by_seed(tmp_path):
    """The cap comparison over seeds: memory seed i minus baseline seed i, averaged with a t interval."""
    import json

    from train.experiments.memory_report import by_seed, cap_seeds, seed_cell, seed_evals

    def put(name, **acc):
        path = tmp_path / "eval" / name / "eval.json"
        path.parent.mkdir(parents=True)
        path.write_text(json.dumps({"run": name, "probes": {m: {"all": {"acc": a}} for m, a in acc.items()},
                                    "val": {m: {"loss": 1.0} for m in acc}}))

    for i, (f, g, a, dn) in enumerate([(0.5, 0.1, 0.3, 0.4), (0.6, 0.2, 0.2, 0.5), (0.7, 0.1, 0.4, 0.6)]):
        sfx = f"-s{i}" if i else ""
        put("memory-4" if not i else f"memory-s{i}", fetched=f, generic=g)
        put(f"anchor-cont{sfx}", anchor=a)
        put(f"dense-2x{sfx}", anchor=dn)
    put("memory-k4", fetched=0.2, generic=0.1)
    for name in ("memory-1", "memory-s2-1", "memory-s1-1", "memory-first1", "memory-first1-s1"):
        put(name, fetched=0.1, generic=0.0)
    # a row over seeds: its base-seed eval, then <prefix>-s<seed><suffix> in seed order, nothing else
    assert len(seed_evals(str(tmp_path), "memory-4", "memory")) == 3
    assert [e["run"] for e in seed_evals(str(tmp_path), "memory-1", "memory", suffix="-1")] == [
        "memory-1", "memory-s1-1", "memory-s2-1"]
    assert [e["run"] for e in seed_evals(str(tmp_path), "memory-first1", "memory-first1")] == [
        "memory-first1", "memory-first1-s1"]
    put("memory-last1-s2", fetched=0.2, generic=0.0)  # placement pairs seeds by name: only seed 0 is common here
    assert list(by_seed(str(tmp_path), "memory-first1")) == ["", "-s1"]
    assert list(by_seed(str(tmp_path), "memory-last1")) == ["-s2"]
    text = "\n".join(cap_seeds(str(tmp_path), [4, 16], 16))
    row16 = next(line for line in text.splitlines() if line.startswith("| k = 16 |"))
    assert seed_cell([0.4, 0.4, 0.6], "+.3f") in row16  # fetched - generic per seed
    assert seed_cell([0.2, 0.4, 0.3], "+.3f") in row16  # minus the anchor-only run of the same seed
    assert seed_cell([0.1, 0.1, 0.1], "+.3f") in row16 and "(3 seeds)" in row16
    assert "| k = 4 | 0.200 (1 seed) | +0.100 (1 seed) | -0.100 (1 seed) |" in text
    assert f"probe accuracy {seed_cell([0.3, 0.2, 0.4])}" in text


def _command_lines(out: str) -> list[str]:
    return [line[len("  $ "):] for line in out.splitlines() if line.startswith("  $ memlm ")]


@pytest.mark.parametrize("mod,argv", [(reproduce_memory, ["--size", "quick"]), (reproduce_memory, ["--size", "gpu"]),
                                      (reproduce_lacy, ["--quick"])])
def test_dry_run_commands_paste_into_a_shell(mod, argv, tmp_path, capsys):
    """Every printed command is shell-quoted: bash parses it, and it splits back into the argv that runs."""
    import shlex
    import subprocess

    assert mod.main([*argv, "--dry-run", "--out", str(tmp_path / "r")]) == 0
    lines = _command_lines(capsys.readouterr().out)
    assert len(lines) > 10
    script = tmp_path / "cmds.sh"
    script.write_text("\n".join(lines) + "\n")
    r = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    argvs = [shlex.split(line) for line in lines]
    if mod is reproduce_memory:
        assert any("id:^bio-([0-9]+)-" in a for a in argvs) and any("memory.widths=[64]" in a for a in argvs)


@pytest.mark.parametrize("mod,argv", [(reproduce_memory, ["--size", "quick"]), (reproduce_memory, []),
                                      (reproduce_lacy, ["--quick"]), (reproduce_lacy, [])])
def test_training_stages_checkpoint_periodically(mod, argv, tmp_path, capsys):
    """An interrupted training stage resumes from a checkpoint at most a quarter of its steps back."""
    import shlex

    assert mod.main([*argv, "--dry-run", "--out", str(tmp_path / "r")]) == 0
    runs = [dict(a.split("=", 1) for a in shlex.split(line) if "=" in a and not a.startswith("-"))
            for line in _command_lines(capsys.readouterr().out) if line.startswith("memlm pretrain ")]
    assert len(runs) >= 3
    for run in runs:
        steps, every = int(run["trainer.max_steps"]), int(run["checkpoint.every"])
        assert every <= max(steps // 4, 1), (run["name"], steps, every)

