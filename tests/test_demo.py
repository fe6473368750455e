"""`memlm demo` pieces that run in seconds: the cascade prompts and what --redo starts over.

The whole demo (≈9 minutes on 2 cores) is measured by hand (README Results), not in CI."""
import json
import os

import pytest

from data.shards import prepare
from train.commands import demo as cmd_demo
from train.experiments import demo as demo_lib


@pytest.fixture(scope="module")
def mixed_data(tmp_path_factory):
    data = str(tmp_path_factory.mktemp("demo") / "data")
    prepare("bios:1,wiki-leads:1", data, vocab_size=512, val_fraction=0.2, window_tokens=64, max_docs=400,
            progress=False, log=lambda *a: None, n_people=40, top_docs=10)
    return data


def test_demo_prompts(mixed_data):
    with open(os.path.join(mixed_data, "bios", "probes.jsonl")) as f:
        probes = [json.loads(line) for line in f]
    rarest = {(p["prompt"], p["answer"].strip()) for p in probes if p["bucket"] == min(q["bucket"] for q in probes)}
    prompts = demo_lib._demo_prompts(mixed_data, 6, seed=0)
    assert len(prompts) == 6
    # half: probe prompts of rarest-bucket people (the next word is a rare fact), distinct people
    # (with their knowledge-base answers)
    assert all(p in rarest for p in prompts[:3]) and len({p[0].split(" was ")[0] for p in prompts[:3]}) == 3
    # half: openings of validation Wikipedia leads, never bios text, no answer
    assert all(p not in rarest and a is None and 0 < len(p.split()) <= 8 for p, a in prompts[3:])
    assert demo_lib._demo_prompts(mixed_data, 6, seed=0) == prompts  # deterministic per seed
    assert demo_lib._demo_prompts(mixed_data, 6, seed=1)[:3] != prompts[:3]


def _demo(tmp_path, *argv):
    demo = demo_lib.Demo(cmd_demo.build_parser().parse_args(["--out", str(tmp_path), "--size", "cpu", *argv]))
    demo.calls = []
    demo.memlm = lambda *a: demo.calls.append([str(x) for x in a])  # record instead of running
    return demo


def test_redo_starts_the_redone_stages_over(tmp_path):
    """Without this a redone training stage would resume from its old final checkpoint and train nothing."""
    from model.atomic import add_entries

    demo = _demo(tmp_path, "--redo", "slm")
    demo.stages.start(demo_lib.KIND)
    for name in ("anchor", "slm"):
        os.makedirs(tmp_path / "runs" / name / "checkpoints")
    add_entries(str(tmp_path), ["runs"])  # as the anchor stage records it
    demo.pretrain("anchor", 10)
    demo.pretrain("slm", 10)
    assert (tmp_path / "runs" / "anchor" / "checkpoints").is_dir()  # before the redone stage: kept
    assert not (tmp_path / "runs" / "slm").exists()                 # redone: starts over
    assert demo.calls[1][:1] == ["pretrain"] and "name=slm" in demo.calls[1]

    demo = _demo(tmp_path, "--redo", "cluster")
    demo.stage_cluster()
    assert "--refit" in demo.calls[0]
    demo = _demo(tmp_path)  # a plain re-run reuses the cached router
    demo.stage_cluster()
    assert "--refit" not in demo.calls[0]


def test_demo_refuses_stages_made_with_other_settings(tmp_path, capsys):
    """A finished stage made with another --seed / --steps-scale / --size is not reused: the demo refuses,
    naming the settings that differ (as the reproductions do), before any stage runs."""
    from model.errors import ConfigError

    demo = _demo(tmp_path, "--until", "data")
    demo.stage_data = lambda: {"made": "seed 0"}
    demo.run()
    assert demo.stages.done("data") == {"made": "seed 0", **{k: demo.stages.done("data")[k] for k in
                                                             ("_seconds", "_commands", "_invocation")}}
    for argv, key in ((["--seed", "1"], "seed"), (["--steps-scale", "0.5"], "steps_scale")):
        again = _demo(tmp_path, "--until", "data", *argv)
        again.stage_data = lambda: pytest.fail("ran a stage")
        with pytest.raises(ConfigError, match=rf"other settings \(differ: \['{key}'\]\)"):
            again.run()
    same = _demo(tmp_path, "--until", "data")
    same.run()  # the same settings: reused
    assert "done earlier, reused" in capsys.readouterr().out


def test_demo_training_stages_checkpoint_periodically(tmp_path):
    demo = _demo(tmp_path)
    demo.pretrain("anchor", 400)
    over = dict(a.split("=", 1) for a in demo.calls[0] if "=" in a)
    assert int(over["checkpoint.every"]) == 100 and int(over["trainer.max_steps"]) == 400


def test_demo_redoes_the_cascade_for_another_large_model(tmp_path, capsys):
    """--large is used by the cascade stage alone: a re-run with another one redoes that stage (and the
    report), not the whole demo."""
    demo = _demo(tmp_path, "--until", "cascade")
    for stage in demo_lib.STAGES[:-1]:
        setattr(demo, f"stage_{stage}", lambda: {"large": None})
    demo.run()
    large = tmp_path / "large"
    large.mkdir()
    again = _demo(tmp_path, "--until", "cascade", "--large", str(large))
    ran = []
    for stage in demo_lib.STAGES[:-1]:
        setattr(again, f"stage_{stage}", lambda stage=stage: ran.append(stage) or {"large": str(large)})
    again.run()
    assert ran == ["cascade"] and "runs again" in capsys.readouterr().out

