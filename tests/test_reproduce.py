"""The reproduction scripts' argument parsing and stage plans (dry runs: nothing is trained), and the report
tables they build. Fast: no model is trained, no corpus is built."""
from __future__ import annotations

import os

import pytest

from scripts import reproduce_lacy, reproduce_memory
from train.experiments.stages import StageRunner


@pytest.mark.parametrize("mod", [reproduce_memory, reproduce_lacy])
def test_help(mod, capsys):
    with pytest.raises(SystemExit) as e:
        mod.main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "--quick" in out and "--dry-run" in out and "--scale" in out


def _stages(out: str) -> list[str]:
    return [line.split("]")[0].split(" ", 1)[1] for line in out.splitlines() if line.startswith("[")]


def test_memory_dry_run_plan(tmp_path, capsys):
    out_dir = tmp_path / "m"
    assert reproduce_memory.main(["--quick", "--dry-run", "--out", str(out_dir), "--corpora", "bios,wiki-leads"]) == 0
    out = capsys.readouterr().out
    stages = _stages(out)
    for c in ("bios", "wiki-leads"):
        for s in ("data", "cluster", "anchor", "anchor-cont", "memory", "dense-2x", "memory-last2", "memory-first2",
                  "eval-memory", "eval-dense-2x"):
            assert f"{c}-{s}" in stages
    assert stages[-1] == "report"
    q = reproduce_memory.SIZES["quick"]
    # Same training tokens: anchor A + M (continued), memory A + M, dense A + M.
    assert f"trainer.max_steps={q.anchor_steps + q.memory_steps} " in out
    assert "model.preset=tiny-2x" in out and "memory.freeze_anchor=true" in out
    assert "memory.layers=last:2" in out and "memory.layers=first:2" in out
    assert "--corpus wiki-leads" in out and "--max-docs" in out
    assert not out_dir.exists()  # a dry run writes nothing


def test_memory_options(tmp_path, capsys):
    reproduce_memory.main(["--dry-run", "--out", str(tmp_path / "m"), "--no-ablation", "--scale", "0.5"])
    out = capsys.readouterr().out
    assert "memory-last2" not in out and "wiki-leads" not in out
    d = reproduce_memory.SIZES["default"]
    assert f"trainer.max_steps={round(d.anchor_steps * 0.5)} " in out
    with pytest.raises(SystemExit, match="unknown corpus"):
        reproduce_memory.main(["--dry-run", "--out", str(tmp_path / "m"), "--corpora", "nope"])


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
    with pytest.raises(SystemExit, match="unknown"):
        reproduce_lacy.main(["--dry-run", "--out", str(out_dir), "--rules", "lacy,llm-judge"])
    with pytest.raises(SystemExit, match="--call-rates"):
        reproduce_lacy.main(["--dry-run", "--out", str(out_dir), "--call-rates", "0,0.1"])


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


def test_settings_pinned(tmp_path):
    StageRunner(str(tmp_path)).pin({"size": {"steps": 10}})
    StageRunner(str(tmp_path)).pin({"size": {"steps": 10}})  # same settings: resumable
    with pytest.raises(SystemExit, match="other settings"):
        StageRunner(str(tmp_path)).pin({"size": {"steps": 20}})


def test_memory_tables_from_eval_json(tmp_path):
    from train.experiments.memory_report import memory_tables, plot_bucket_accuracy

    probes = lambda a0, a1: {"bucket_0": {"acc": a0, "n": 10}, "bucket_1": {"acc": a1, "n": 10}}  # noqa: E731
    ev = {"anchor-cont": {"val": {"anchor": {"loss": 2.0, "ppl": 7.39}}, "probes": {"anchor": probes(0.1, 0.2)}},
          "memory": {"val": {m: {"loss": l, "ppl": p} for m, l, p in
                             (("fetched", 1.9, 6.69), ("generic", 2.1, 8.17), ("anchor", 2.2, 9.03))},
                     "probes": {"fetched": probes(0.3, 0.4), "generic": probes(0.3, 0.1), "anchor": probes(0, 0)}},
          "dense-2x": {"val": {"anchor": {"loss": 1.8, "ppl": 6.05}}, "probes": {"anchor": probes(0.2, 0.5)}}}
    runs = {name: str(tmp_path / name) for name in ("anchor", "anchor-cont", "memory", "dense-2x")}
    main, abl, curves, checks = memory_tables(ev, runs)
    assert "| anchor + fetched memory |" in main and "6.69" in main and "acc bucket_1 (n=10)" in main
    assert abl == ""  # no ablation runs
    assert set(curves) == {"anchor (tiny), A+M steps", "anchor + generic block", "anchor + fetched memory",
                           "dense tiny-2x, A+M steps"}
    text = "\n".join(checks)
    assert "6.69 vs 8.17 -> reproduced" in text
    assert "bucket_0: 0.300 vs 0.300 (3/10 vs 3/10 probes) -> tie" in text
    assert "bucket_1: 0.400 vs 0.100 (4/10 vs 1/10 probes) -> reproduced" in text
    png = plot_bucket_accuracy(curves, str(tmp_path / "acc.png"))
    assert os.path.getsize(png) > 0




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
