"""`memlm harness` / `memlm wiki-probes` on awkward inputs: task files under any directory name, tasks whose
metrics are not acc, and the lm-eval adapter's edge cases (empty context / continuation / choice, <CALL>,
the end-of-document token, `until` strings).

One tiny run (bios, 1 step, no memory) shared by the module; the adapter is driven directly with
hand-made requests, and through `memlm harness` on small local tasks.
"""
from __future__ import annotations

import json
import os

import pytest

from cli_harness import REPO, assert_clean_failure, run_memlm_inprocess, tree_hashes

pytest.importorskip("lm_eval")

RECIPE = os.path.join(REPO, "train", "recipes", "tiny-cpu.yaml")
ODD = "pr obes #1: it's \"q\" [a]"  # space, '#', ':', quotes and a glob character


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_thread):
    pass


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    from data.prepare import prepare
    from train.pretrain import main

    root = tmp_path_factory.mktemp("harness")
    data = str(root / "data")
    prepare("bios", data, vocab_size=300, val_fraction=0.2, window_tokens=64, n_people=30, top_docs=10,
            progress=False, log=lambda *a, **k: None)
    assert main(["--config", RECIPE, f"data.path={data}", f"runs_dir={root}", "name=run", "trainer.max_steps=1",
                 "data.seq_len=32", "data.batch_size=2", "trainer.val_every=0", "logging.logger=none"]) == 0
    return str(root / "run")


@pytest.fixture(scope="module")
def lm(run):
    from train.evaluation.harness import MemlmLM

    return MemlmLM(run, mode="anchor", device="cpu", batch_size=2)


class Req:
    def __init__(self, *args):
        self.args, self.doc = args, {}


def _write_task(d, task: str, rows: list[dict], **cfg) -> None:
    import glob

    import yaml

    path = os.path.join(d, f"{task}.jsonl")
    with open(path, "w") as f:
        f.write("".join(json.dumps(r) + "\n" for r in rows))
    files = {"data_files": {"test": glob.escape(path)}}  # `datasets` reads it as a pattern
    full = {"task": task, "dataset_path": "json", "dataset_kwargs": files,
            "test_split": "test", "metadata": {"version": 1.0}, **cfg}
    with open(os.path.join(d, f"{task}.yaml"), "w") as f:
        yaml.safe_dump(full, f)


def _script(lm, steps: list[int]):
    """Make the run's head choose `steps[i]` at its i-th forward (then the last one), whatever the input."""
    calls = []

    def hook(_module, _inp, out):
        out = out.clone()
        out[:, -1, steps[min(len(calls), len(steps) - 1)]] += 1e4
        calls.append(1)
        return out

    return lm.model.lm_head.register_forward_hook(hook), calls


# ---- fault 1: task files under any directory name ----------------------------------------------------------
def test_task_yaml_keeps_any_path_one_string(tmp_path):
    """The written YAML parses back to a data-file pattern that `datasets` resolves to exactly that file."""
    import yaml
    from datasets.data_files import resolve_pattern

    from train.evaluation.wiki_probes import task_yaml

    d = tmp_path / ODD
    d.mkdir()
    (d / "p.jsonl").write_text("{}\n")
    cfg = yaml.safe_load(task_yaml("memlm_wiki_seen", str(d / "p.jsonl")))
    assert cfg["task"] == "memlm_wiki_seen" and cfg["doc_to_text"] == "{{prompt}}"
    assert resolve_pattern(cfg["dataset_kwargs"]["data_files"]["test"], "/") == [str(d / "p.jsonl")]


def test_wiki_probes_and_harness_under_an_odd_directory_and_any_metric(run, tmp_path):
    """`memlm wiki-probes --out ODD` then `memlm harness --include-path ODD`: the probes load and score; in the
    same run a generate_until task (exact_match), a rolling task (word_perplexity) and a multiple-choice task
    with an empty choice after its first document are reported, each with its own metrics."""
    pytest.importorskip("spacy")
    from data.shards import prepare

    data = str(tmp_path / "wiki")
    prepare("wiki-leads", data, vocab_size=400, val_fraction=0.3, window_tokens=256, max_docs=12, progress=False,
            log=lambda *a, **k: None)
    probes = tmp_path / ODD
    r = run_memlm_inprocess(["wiki-probes", data, "--out", probes, "--max-per-set", "3", "--choices", "2"], tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = [{"id": "a", "prompt": "Ada Baker was born in", "answer": "Paris", "choices": ["Paris", "Oslo"], "label": 0},
            {"id": "b", "prompt": "Carl Cross studied at", "answer": "Rice", "choices": ["Yale", ""], "label": 0}]
    _write_task(probes, "tiny_gen", rows, output_type="generate_until", doc_to_text="{{prompt}}",
                doc_to_target="{{answer}}", generation_kwargs={"until": ["\n"], "max_gen_toks": 4},
                metric_list=[{"metric": "exact_match"}])
    _write_task(probes, "tiny_roll", rows, output_type="loglikelihood_rolling", doc_to_text="",
                doc_to_target="{{prompt}}", metric_list=[{"metric": "word_perplexity"}])
    _write_task(probes, "tiny_mc", rows, output_type="multiple_choice", doc_to_text="{{prompt}}",
                doc_to_choice="{{choices}}", doc_to_target="label", target_delimiter="",
                metric_list=[{"metric": "acc"}])
    out = tmp_path / "out"
    r = run_memlm_inprocess(["harness", run, "--tasks", "memlm_wiki_seen,tiny_gen,tiny_roll,tiny_mc",
                             "--include-path", probes, "--mode", "anchor", "--out", out], tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.load(open(out / "harness.json"))["tasks"]
    n_seen = sum(1 for _ in open(probes / "wiki_seen.jsonl"))
    assert res["memlm_wiki_seen"]["n"] == n_seen > 0 and 0 <= res["memlm_wiki_seen"]["acc"] <= 1
    assert res["tiny_gen"]["metric"] == "exact_match" and set(res["tiny_gen"]["items"]) == {"a", "b"}
    assert res["tiny_gen"]["metrics"]["exact_match"] == sum(res["tiny_gen"]["items"].values()) / 2
    assert "acc" not in res["tiny_gen"]
    roll = res["tiny_roll"]
    assert roll["metric"] == "word_perplexity" and roll["metrics"]["word_perplexity"] > 1
    assert all(len(v) == 2 and v[0] < 0 for v in roll["items"].values())  # (loglikelihood, words) per document
    assert res["tiny_mc"]["n"] == 2 and 0 <= res["tiny_mc"]["acc"] <= 1
    assert "tiny_gen: exact_match " in r.stdout and "tiny_roll: word_perplexity " in r.stdout
    assert "tiny_mc: acc " in r.stdout


def test_harness_names_a_task_lm_eval_cannot_load(run, tmp_path):
    """An empty "" choice in a task's first document fails inside lm-eval's task check: one line naming the
    task, exit 2, nothing written."""
    d = tmp_path / "tasks"
    d.mkdir()
    _write_task(d, "mc_empty_first", [{"prompt": "Ada was born in", "choices": ["Paris", ""], "label": 0}],
                output_type="multiple_choice", doc_to_text="{{prompt}}", doc_to_choice="{{choices}}",
                doc_to_target="label", metric_list=[{"metric": "acc"}])
    before = tree_hashes(tmp_path)
    r = run_memlm_inprocess(["harness", run, "--tasks", "mc_empty_first", "--include-path", d, "--mode", "anchor",
                             "--out", tmp_path / "out"], tmp_path)
    assert r.returncode == 2
    assert_clean_failure(r, names=["--tasks mc_empty_first", "lm-eval cannot load", "IndexError"], before=before,
                         root=tmp_path)
    assert not (tmp_path / "out").exists()


# ---- fault 3: empty context / continuation --------------------------------------------------------------------
def test_loglikelihood_empty_continuation_is_zero_and_greedy(lm):
    got = lm.loglikelihood([Req("Hello", ""), Req("Hello", " world"), Req("", ""), Req("", " world")])
    assert got[0] == (0.0, True) and got[2] == (0.0, True)
    alone = lm.loglikelihood([Req("Hello", " world"), Req("", " world")])
    assert got[1][0] == pytest.approx(alone[0][0]) and got[1][0] < 0  # the others still scored, unchanged
    assert got[3][0] == pytest.approx(alone[1][0]) and got[3][0] < 0


def test_generate_until_empty_context_starts_after_eos(lm):
    import torch

    out = lm.generate_until([Req("", {"until": [], "max_gen_toks": 3})])
    eos = lm.tok.eos_token_id
    ref = lm.model.generate(torch.tensor([[eos]]), 3, eos_id=eos)[0, 1:].tolist()
    ref = ref[:ref.index(eos)] if eos in ref else ref
    assert out == [lm.tok.decode(ref, skip_special_tokens=True)]


# ---- fault 4: <CALL>, the end-of-document token, until --------------------------------------------------------
def test_generate_until_never_emits_call(lm):
    """A head that always prefers <CALL> (a LaCy SLM at a fact): the text is the greedy text without it."""
    import torch

    from data.tokenizer import CALL

    call = lm.tok.get_vocab()[CALL]
    eos = lm.tok.eos_token_id
    ctx = "Ada Baker was born in"
    ids = lm.tok.encode(ctx, add_special_tokens=False)
    ref = lm.model.generate(torch.tensor([ids]), 5, eos_id=eos)[0, len(ids):].tolist()
    ref = ref[:ref.index(eos)] if eos in ref else ref
    handle, calls = _script(lm, [call])
    try:
        out = lm.generate_until([Req(ctx, {"until": [], "max_gen_toks": 5})])
    finally:
        handle.remove()
    assert out == [lm.tok.decode(ref, skip_special_tokens=True)] and out[0] != ""


def test_generate_until_stops_at_eos_and_until(lm):
    tok = lm.tok
    a, b = tok.encode("x", add_special_tokens=False)[0], tok.encode("y", add_special_tokens=False)[0]
    dot = tok.encode(".", add_special_tokens=False)[0]
    handle, calls = _script(lm, [a, tok.eos_token_id, b])  # "x", end of document, then "y" forever
    try:
        assert lm.generate_until([Req("Ada", {"until": [], "max_gen_toks": 8})]) == ["x"]  # nothing after EOS
        assert len(calls) == 2
        calls.clear()
    finally:
        handle.remove()
    handle, calls = _script(lm, [a, dot, b])  # "x." then "y" forever
    try:
        assert lm.generate_until([Req("Ada", {"until": ["."], "max_gen_toks": 8})]) == ["x"]
        assert len(calls) == 2  # stopped at the until string, not at max_gen_toks
    finally:
        handle.remove()


# ---- rolling log-likelihood: lm-eval's own windows, as its HF model ------------------------------------------
def test_loglikelihood_rolling_equals_lm_eval_hf_model_beyond_the_context(lm, run, tmp_path):
    """A text longer than the context: the adapter's summed log-probability equals lm-eval's `hf` model (HFLM)
    on the run's export, window for window (lm_eval.utils.get_rolling_token_windows: the last partial window
    has full left context). Both in float32 on CPU; tolerance 1e-3 nats absolute on the sum (the export's
    logits equal memlm's to ~5e-7 per token, summed over a few hundred tokens). A short text too."""
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    from train.commands.export_hf import main as export

    hf_dir = tmp_path / "hf"
    assert export([run, "--out", str(hf_dir)]) == 0
    hf = HFLM(pretrained=str(hf_dir), device="cpu", dtype="float32", batch_size=2)
    assert hf.max_length == lm.max_len
    words = "Ada Baker was born in Paris in 1901 and studied at Rice University before moving to Oslo."
    long_text = " ".join([words] * 40)
    n = len(lm.tok.encode(long_text, add_special_tokens=False))
    assert 2 * lm.max_len < n and n % lm.max_len != 0  # several windows, the last one partial
    texts = [long_text, words]
    reqs = [Instance("loglikelihood_rolling", {}, (t,), i) for i, t in enumerate(texts)]
    got, want = lm.loglikelihood_rolling(reqs), hf.loglikelihood_rolling(reqs, disable_tqdm=True)
    assert got == pytest.approx(want, abs=1e-3)
    # the old scheme (every window after one token of context) differs by more than the tolerance here
    ids = [lm.tok.eos_token_id] + lm.tok.encode(long_text, add_special_tokens=False)
    old = sum(lm._score([(ids[s - 1:s], ids[s:s + lm.max_len])], None)[0][0] for s in range(1, len(ids), lm.max_len))
    assert abs(old - want[0]) > 1e-2
