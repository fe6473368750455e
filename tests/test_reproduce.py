"""The reproduction scripts' argument parsing and stage plans (dry runs: nothing is trained), and the report
tables they build. Fast: no model is trained, no corpus is built."""
from __future__ import annotations

import os
from dataclasses import asdict as dataclasses_asdict

import pytest

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
    assert stages[-1] == "report"
    # Same training tokens: anchor A then A+M for the dense model; memories on the frozen anchor.
    assert f"trainer.max_steps={s.cap_anchor_steps + s.cap_memory_steps} " in out
    assert "--bios-preset uniform" in out and "--bios-preset capacity" in out
    assert "--paths-from id:^bio-([0-9]+)-" in out and "--paths-from entity" in out and "--embed-text sentences" in out
    assert "memory.freeze_anchor=true" in out and "memory.layers=first:1" in out and "--route-top 2" in out
    assert "--mode oracle" in out and "--include-path" in out and "--corpus wiki-leads" in out
    assert not out_dir.exists()  # a dry run writes nothing


def test_memory_options(tmp_path, capsys):
    reproduce_memory.main(["--dry-run", "--out", str(tmp_path / "m"), "--parts", "mech"])
    out = capsys.readouterr().out
    assert "cap-" not in out and "wiki" not in out and "mech-anchor" in out
    reproduce_memory.main(["--dry-run", "--size", "gpu", "--prepare-only", "--out", str(tmp_path / "g")])
    stages = _stages(capsys.readouterr().out)
    assert stages and all(any(x in st for x in ("-data", "-other", "-cluster", "wiki-probes")) for st in stages)
    assert "wiki-probes" in stages and "cap-cluster" in stages
    with pytest.raises(SystemExit, match="unknown part"):
        reproduce_memory.main(["--dry-run", "--out", str(tmp_path / "m"), "--parts", "nope"])


def test_lacy_dry_run_plan(tmp_path, capsys):
    out_dir = tmp_path / "l"
    assert reproduce_lacy.main(["--quick", "--dry-run", "--out", str(out_dir), "--call-rate", "0.07"]) == 0
    out = capsys.readouterr().out
    stages = _stages(out)
    assert stages[:6] == ["data", "ref", "large", "tag", "score", "select"]
    assert [s for s in stages if s.startswith("slm-")] == [f"slm-{r}" for r in reproduce_lacy.RULES]
    assert stages[-2:] == ["factscore", "report"]
    for rule in reproduce_lacy.RULES:
        assert f"--rule {rule} --call-rate 0.07" in out
        assert f"data.calls=calls_{rule}" in out
        assert f"--slm {rule}=" in out
    assert "--slm-alone" in out and "--large-alone" in out and "--name large" in out
    assert not out_dir.exists()
    with pytest.raises(SystemExit, match="unknown rule"):
        reproduce_lacy.main(["--dry-run", "--out", str(out_dir), "--rules", "lacy,llm-judge"])


def test_settings_pinned(tmp_path):
    StageRunner(str(tmp_path)).pin({"size": {"steps": 10}})
    StageRunner(str(tmp_path)).pin({"size": {"steps": 10}})  # same settings: resumable
    with pytest.raises(SystemExit, match="other settings"):
        StageRunner(str(tmp_path)).pin({"size": {"steps": 20}})


def test_memory_report_from_eval_json(tmp_path):
    """The report reads per-probe results and computes paired intervals; missing parts say 'not run'."""
    import json

    from train.experiments.lacy_report import factscore_table
    from train.experiments.memory_report import ci_cell, items_diff, write_memory_report

    def ev(f, o, g, a):
        items = {"person": list(range(8)), "bucket": [0] * 4 + [1] * 4, "fetched": f, "fetched_oracle": o,
                 "generic": g, "anchor": a}
        probes = {k: {"all": {"acc": sum(v) / 8, "lo": 0.0, "hi": 1.0, "n": 8}} for k, v in items.items()
                  if k not in ("person", "bucket")}
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
    assert "2. Capacity-bound bios: not run" in text and "3. Wiki-leads knowledge probes: not run" in text

    res = {"lacy": {"factscore": 0.5, "facts_per_bio": 2.0, "call_rate": 0.1, "leakage": 0.2, "leaked_per_bio": 0.4,
                    "delegated_precision": 0.9, "bios": 5}}
    sel = {"lacy": {"splits": {"train": {"rate": 0.1, "factual_share_delegated": 1.0}}}}
    table = factscore_table(res, sel)
    assert "| lacy | 0.100 | 1.000 | 0.500 | 2.00 | 0.100 | 0.200 |" in table
