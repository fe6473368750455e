"""The acceptance table of bad inputs for the commands after prepare: cluster, pretrain, eval, score, select,
cascade, factscore, export-hf, bank-info, demo (prepare and tag: tests/test_bad_inputs_data.py).

Each row runs the real `memlm` entry (train/cli.py `main`, in this process to save interpreter start-up;
tests/cli_harness.py) and asserts a non-zero exit, exactly one error line naming the file/key/flag, no
traceback, and every file that existed before the command byte-identical afterwards. Inputs a row
damages are copies under the row's tmp dir, which is what gets hashed.
"""
from __future__ import annotations

import glob
import json
import os
import re
import shutil
import subprocess

import pytest

from cli_harness import REPO, assert_clean_failure, run_memlm, run_memlm_inprocess, tree_hashes

RECIPE = os.path.join(REPO, "train", "recipes", "tiny-cpu.yaml")
TINY = ["trainer.max_steps=1", "data.seq_len=32", "data.batch_size=2", "trainer.val_every=0", "logging.logger=none"]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A tiny bios data dir and a 1-step anchor run on it (built once; rows copy them)."""
    from data.prepare import prepare
    from train.pretrain import main

    root = tmp_path_factory.mktemp("base")
    data = str(root / "data")
    prepare("bios", data, vocab_size=300, val_fraction=0.2, window_tokens=64, n_people=30, top_docs=10,
            progress=False, log=lambda *a, **k: None)
    assert main(["--config", RECIPE, f"data.path={data}", f"runs_dir={root}", "name=run", *TINY]) == 0
    return {"data": data, "run": str(root / "run")}


class Row:
    """Copies of the base inputs under the row's tmp dir (so damage and writes are caught by the hashes)."""

    def __init__(self, tmp, base):
        self.tmp, self.base = tmp, base

    def data(self, name="data"):
        dst = self.tmp / name
        if not dst.exists():
            shutil.copytree(self.base["data"], dst)
        return str(dst)

    def run(self, name="run"):
        dst = self.tmp / name
        if not dst.exists():
            shutil.copytree(self.base["run"], dst)
        return str(dst)

    def step(self, name="run"):
        return sorted(glob.glob(os.path.join(self.run(name), "checkpoints", "step-*")))[-1]

    def file(self, name, text):
        p = self.tmp / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8"))
        return str(p)

    def dir(self, name):
        os.makedirs(self.tmp / name, exist_ok=True)
        return str(self.tmp / name)


def truncate(path, n=5):
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) - n)
    return path


def _garbage_same_size(path):
    """Overwrite `path` with bytes that no reader accepts, keeping its size; returns the path."""
    n = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.write((b"\x80garbage\xff" * (n // 10 + 1))[:n])
    return path


def _nan_weights(r):
    """The newest checkpoint with one weight set to NaN, at the same file size (a diverged run's weights)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    path = os.path.join(r.step(), "model.safetensors")
    with safe_open(path, framework="pt") as f:
        meta, sd = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    name = sorted(sd)[0]
    sd[name] = sd[name].clone().fill_(float("nan"))
    save_file(sd, path, metadata=meta)
    _mark_again(r.step())  # as memlm wrote it (a run from before the NaN guard): the weights are what is wrong
    return r.step()


def _mark_again(*dirs):
    """Write the markers of edited dirs again (sizes, checksums), so that they count as memlm wrote them."""
    from model.atomic import read_marker, write_marker

    for d in dirs:
        m = read_marker(d)
        write_marker(d, m["kind"], {k: v for k, v in m.items() if k not in ("kind", "created_utc", "files", "sha256")},
                     checksums="sha256" in m)


def edit_json(path, fn):
    with open(path) as f:
        obj = json.load(f)
    fn(obj)
    with open(path, "w") as f:
        json.dump(obj, f)
    return path


def pretrain(r, *over, data=None):
    return ["pretrain", "--config", RECIPE, f"data.path={data or r.data()}", f"runs_dir={r.tmp / 'runs'}",
            "name=new", *TINY, *over]


def _missing_dtype(r):
    d = r.data()
    edit_json(os.path.join(d, "manifest.json"), lambda m: m.pop("dtype"))
    return d


def _truncated_shard(r):
    d = r.data()
    truncate(os.path.join(d, "train", "00000.tokens.bin"), 2)
    return d


def _truncated_weights(r):
    step = r.step()
    truncate(os.path.join(step, "model.safetensors"))
    return step


def _run_without_checkpoints(r):
    run = r.run()
    shutil.rmtree(os.path.join(run, "checkpoints"))
    return run


def _other_tokenizer_data(r):
    from data.prepare import prepare

    d = str(r.tmp / "other")
    prepare("bios", d, vocab_size=300, val_fraction=0.2, window_tokens=64, n_people=12, top_docs=4, seed=5,
            progress=False, log=lambda *a, **k: None)
    return d


def _scored(r):
    """The data with a (fake) reference loss per token, as `memlm score` leaves it: untagged."""
    import numpy as np

    from data.shards import open_data

    d = r.data()
    for split in ("train", "val"):
        for sh in open_data(d).shards(split):
            sh.write_array("loss_ref", np.linspace(0, 5, sh.n_tokens).astype(np.float16))
    return d


def _damaged_probes(r):
    d = r.data()
    with open(os.path.join(d, "bios", "probes.jsonl"), "a") as f:
        f.write('{"person": 1}\n')
    return d


def _damaged_kb(r):
    d = r.data()
    edit_json(os.path.join(d, "bios", "kb.json"), lambda kb: kb["people"][0].pop("name"))
    return d


def _no_call_tokenizer(r):
    """A run whose tokenizer has no <CALL> token (a plain BPE saved in its checkpoint)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    step = r.step()
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel()
    tok_dir = os.path.join(step, "tokenizer")
    shutil.rmtree(tok_dir)
    PreTrainedTokenizerFast(tokenizer_object=tok).save_pretrained(tok_dir)
    from model.atomic import write_marker

    write_marker(tok_dir, "tokenizer")
    _mark_again(step)  # complete dirs again: the tokenizer is what is wrong
    return step


# Each row: (id, build(r) -> (argv, names)); every name must appear in the one error line.
ROWS = [
    # --- pretrain: config values (V1), unknown keys and types ---
    ("pretrain-foreign-metrics-jsonl", lambda r: (r.file("runs/new/metrics.jsonl", '{"my": "rows"}\n') and pretrain(r),
                                                  ["metrics.jsonl", "config.yaml", "name="])),
    ("pretrain-batch-size-minus-2", lambda r: (pretrain(r, "data.batch_size=-2"), ["data.batch_size=-2", ">= 1"])),
    ("pretrain-batch-size-0", lambda r: (pretrain(r, "data.batch_size=0"), ["data.batch_size=0"])),
    ("pretrain-lr-not-a-number", lambda r: (pretrain(r, "optim.lr=abc"), ["optim.lr", "abc"])),
    ("pretrain-lr-nan", lambda r: (pretrain(r, "optim.lr=nan"), ["optim.lr"])),
    ("pretrain-lr-inf", lambda r: (pretrain(r, "optim.lr=inf"), ["optim.lr=inf", "finite"])),
    ("pretrain-name-escapes-runs-dir", lambda r: (pretrain(r, "name=../../x"), ["name=", "runs_dir"])),
    ("pretrain-seq-len-longer-than-data", lambda r: (pretrain(r, "data.seq_len=100000"), ["100000", "batch_size"])),
    ("pretrain-max-steps-inf", lambda r: (pretrain(r, "trainer.max_steps=inf"), ["trainer.max_steps"])),
    ("pretrain-unknown-key", lambda r: (pretrain(r, "optim.learning_rate=0.1"), ["optim.learning_rate"])),
    ("pretrain-unknown-section", lambda r: (pretrain(r, "foo.bar=1"), ["foo"])),
    ("pretrain-override-without-equals", lambda r: (pretrain(r, "optim.lr"), ["optim.lr"])),
    ("pretrain-keep-last-k-negative", lambda r: (pretrain(r, "checkpoint.keep_last_k=-1"), ["checkpoint.keep_last_k"])),
    ("pretrain-seq-len-0", lambda r: (pretrain(r, "data.seq_len=0"), ["data.seq_len"])),
    ("pretrain-val-every-negative", lambda r: (pretrain(r, "trainer.val_every=-5"), ["trainer.val_every"])),
    ("pretrain-unknown-preset", lambda r: (pretrain(r, "model.preset=huge-xl"), ["model.preset", "huge-xl"])),
    ("pretrain-memory-k-0", lambda r: (pretrain(r, "memory.preset=tiny", "memory.k=0"), ["memory.k"])),
    ("pretrain-memory-width-negative", lambda r: (pretrain(r, "memory.preset=tiny", "memory.widths=[4,-1]"),
                                                  ["memory.widths"])),
    ("pretrain-resume-with-another-model", lambda r: (
        ["pretrain", "--config", RECIPE, f"data.path={r.data()}", f"runs_dir={os.path.dirname(r.run())}", "name=run",
         *TINY, "trainer.max_steps=2", "model.n_layer=2"], ["model.n_layer=2", "checkpoint"])),
    # a checkpoint file damaged at its recorded size (the marker check passes): the reader names it
    *[(f"pretrain-resume-{f.split('.')[0]}-same-size-garbage", (lambda f: lambda r: (
        ["pretrain", "--config", RECIPE, f"data.path={r.base['data']}", f"runs_dir={os.path.dirname(r.run())}",
         "name=run", *TINY], [_garbage_same_size(os.path.join(r.step(), f))]))(f))
      for f in ("optimizer.pt", "data_state_rank0.json", "rng_rank0.pt", "meta.json")],
    ("pretrain-memory-on-unclustered-data", lambda r: (pretrain(r, "memory.preset=tiny"),
                                                       ["memlm cluster"])),
    ("pretrain-config-missing", lambda r: (["pretrain", "--config", r.tmp / "nope.yaml"], [str(r.tmp / "nope.yaml")])),
    ("pretrain-config-not-yaml", lambda r: (["pretrain", "--config", r.file("bad.yaml", "model: [unclosed\n")],
                                            [str(r.tmp / "bad.yaml")])),
    ("pretrain-config-is-a-directory", lambda r: (["pretrain", "--config", r.dir("cfg")], [str(r.tmp / "cfg")])),
    ("pretrain-calls-array-missing", lambda r: (pretrain(r, "data.calls=calls_lacy"), ["calls_lacy"])),
    # --- pretrain: data directories (V4, V5) ---
    ("pretrain-data-missing", lambda r: (pretrain(r, data=str(r.tmp / "nodata")), [str(r.tmp / "nodata")])),
    ("pretrain-data-is-a-file", lambda r: (pretrain(r, data=r.file("f.txt", "x")), [str(r.tmp / "f.txt")])),
    ("pretrain-data-not-a-data-dir", lambda r: (pretrain(r, data=r.dir("empty")), ["manifest.json", "memlm prepare"])),
    ("pretrain-manifest-missing-dtype", lambda r: (pretrain(r, data=_missing_dtype(r)), ["manifest.json", "dtype"])),
    ("pretrain-truncated-shard", lambda r: (pretrain(r, data=_truncated_shard(r)),
                                            ["00000.tokens.bin", "memlm prepare"])),
    # --- pretrain: init_from (E3, V2) ---
    ("pretrain-init-from-truncated-weights", lambda r: (pretrain(r, f"init_from={_truncated_weights(r)}"),
                                                        ["model.safetensors"])),
    ("pretrain-init-from-other-shape", lambda r: (pretrain(r, f"init_from={r.run()}", "model.n_layer=3"),
                                                  ["init_from", "model.n_layer=3 here", "give the source's values"])),
    ("pretrain-init-from-missing", lambda r: (pretrain(r, f"init_from={r.tmp / 'ghost'}"), [str(r.tmp / "ghost")])),
    ("pretrain-init-from-other-tokenizer", lambda r: (pretrain(r, f"init_from={r.run()}", data=_other_tokenizer_data(r)),
                                                      ["init_from", "tokenizer"])),
    ("pretrain-init-from-damaged-hf-config", lambda r: (
        pretrain(r, f"init_from={os.path.dirname(r.file('hf/config.json', '{'))}"), ["init_from", str(r.tmp / "hf")])),
    ("pretrain-init-from-non-llama-hf-model", lambda r: (
        pretrain(r, f"init_from={os.path.dirname(r.file('hf/config.json', json.dumps({'model_type': 'gpt2'})))}"),
        ["init_from", "Llama"])),
    ("pretrain-init-from-other-preset", lambda r: (pretrain(r, f"init_from={r.run()}", "model.preset=small"),
                                                   ["init_from", "model.n_layer"])),
    # --- eval ---
    # --device: a device this machine has (cuda:99 fails on a GPU machine too), checked before any work
    ("eval-device-unknown", lambda r: (["eval", r.run(), "--data", r.data(), "--device", "gpu"], ["--device", "gpu"])),
    ("eval-device-absent", lambda r: (["eval", r.run(), "--data", r.data(), "--device", "cuda:99"],
                                      ["--device", "cuda:99"])),
    ("score-device-absent", lambda r: (["score", r.data(), "--model", r.run(), "--device", "cuda:99"],
                                       ["--device", "cuda:99"])),
    ("cascade-device-unknown", lambda r: (["cascade", "--slm", r.run(), "--prompt", "x", "--device", "tpu"],
                                          ["--device", "tpu"])),
    ("eval-batch-size-0", lambda r: (["eval", r.run(), "--data", r.data(), "--batch-size", "0"], ["--batch-size"])),
    ("eval-val-batches-negative", lambda r: (["eval", r.run(), "--data", r.data(), "--val-batches", "-1"],
                                             ["--val-batches"])),
    ("eval-probes-per-bucket-text", lambda r: (["eval", r.run(), "--data", r.data(), "--probes-per-bucket", "many"],
                                               ["--probes-per-bucket"])),
    ("eval-unknown-mode", lambda r: (["eval", r.run(), "--data", r.data(), "--modes", "fetched,best"],
                                     ["--modes", "best"])),
    ("eval-truncated-weights", lambda r: (["eval", _truncated_weights(r), "--data", r.data()], ["model.safetensors"])),
    ("eval-run-without-checkpoints", lambda r: (["eval", _run_without_checkpoints(r), "--data", r.data()],
                                                [str(r.tmp / "run"), "checkpoint"])),
    ("eval-missing-run", lambda r: (["eval", r.tmp / "ghost", "--data", r.data()], [str(r.tmp / "ghost")])),
    ("eval-data-not-a-data-dir", lambda r: (["eval", r.run(), "--data", r.dir("empty")], ["manifest.json"])),
    ("eval-data-other-tokenizer", lambda r: (["eval", r.run(), "--data", _other_tokenizer_data(r)],
                                             ["--data", "tokenizer"])),
    ("eval-batch-too-large", lambda r: (["eval", r.run(), "--data", r.data(), "--batch-size", "100000"],
                                        ["--batch-size"])),
    ("eval-route-top-on-anchor-run", lambda r: (["eval", r.run(), "--data", r.data(), "--route-top", "3"],
                                                ["--route-top", "no memory"])),
    ("eval-out-is-a-file", lambda r: (["eval", r.run(), "--data", r.data(), "--out", r.file("o.txt", "x")],
                                      ["--out", str(r.tmp / "o.txt")])),
    ("eval-damaged-probes", lambda r: (["eval", r.run(), "--data", _damaged_probes(r)], ["probes.jsonl", "line"])),
    # --- score ---
    ("score-batch-size-0", lambda r: (["score", r.data(), "--model", r.run(), "--batch-size", "0"], ["--batch-size"])),
    ("score-max-len-1", lambda r: (["score", r.data(), "--model", r.run(), "--max-len", "1"], ["--max-len"])),
    ("score-name-with-slash", lambda r: (["score", r.data(), "--model", r.run(), "--name", "../x"], ["--name"])),
    ("score-unknown-split", lambda r: (["score", r.data(), "--model", r.run(), "--splits", "trian"],
                                       ["--splits", "trian"])),
    ("score-missing-model", lambda r: (["score", r.data(), "--model", r.tmp / "ghost"], [str(r.tmp / "ghost")])),
    ("score-model-other-tokenizer", lambda r: (["score", _other_tokenizer_data(r), "--model", r.run()],
                                               [str(r.tmp / "run"), "tokenizer"])),
    ("score-memory-mode-on-anchor-run", lambda r: (["score", r.data(), "--model", r.run(), "--mode", "fetched"],
                                                   ["--mode", "no memory"])),
    ("score-damaged-hf-dir", lambda r: (["score", r.data(), "--model", os.path.dirname(r.file("hf/config.json", "{"))],
                                        [str(r.tmp / "hf")])),
    ("score-truncated-weights", lambda r: (["score", r.data(), "--model", _truncated_weights(r)],
                                           ["model.safetensors"])),
    # --- select ---
    ("select-call-rate-0", lambda r: (["select", r.data(), "--rule", "random", "--call-rate", "0"], ["--call-rate"])),
    ("select-call-rate-1", lambda r: (["select", r.data(), "--rule", "random", "--call-rate", "1"],
                                      ["--call-rate", "< 1"])),
    ("select-call-rate-above-1", lambda r: (["select", r.data(), "--rule", "random", "--call-rate", "1.5"],
                                            ["--call-rate"])),
    ("select-call-rate-nan", lambda r: (["select", r.data(), "--rule", "random", "--call-rate", "nan"],
                                        ["--call-rate"])),
    ("select-unknown-rule", lambda r: (["select", r.data(), "--rule", "best"], ["--rule"])),
    ("select-loss-without-score", lambda r: (["select", r.data(), "--rule", "loss"], ["loss_ref", "memlm score"])),
    ("select-lacy-without-tags", lambda r: (["select", _scored(r), "--rule", "lacy"], ["factual", "memlm tag"])),
    ("select-not-a-data-dir", lambda r: (["select", r.dir("empty"), "--rule", "random"], ["manifest.json"])),
    ("select-name-of-the-shards-windows", lambda r: (["select", r.data(), "--rule", "random", "--name", "windows"],
                                                      ["--name", "calls_"])),
    ("select-name-of-the-tag-array", lambda r: (["select", r.data(), "--rule", "random", "--name", "factual"],
                                                ["--name", "calls_"])),
    ("select-name-with-slash", lambda r: (["select", r.data(), "--rule", "random", "--name", "a/b"], ["--name"])),
    # --- cascade ---
    ("cascade-missing-slm", lambda r: (["cascade", "--slm", r.tmp / "ghost", "--prompt", "Hi", "--no-calls"],
                                       [str(r.tmp / "ghost")])),
    ("cascade-max-new-tokens-0", lambda r: (["cascade", "--slm", r.run(), "--prompt", "Hi", "--max-new-tokens", "0"],
                                            ["--max-new-tokens"])),
    ("cascade-tau-negative", lambda r: (["cascade", "--slm", r.run(), "--prompt", "Hi", "--tau", "-0.5"], ["--tau"])),
    ("cascade-temperature-nan", lambda r: (["cascade", "--slm", r.run(), "--prompt", "Hi", "--temperature", "nan"],
                                           ["--temperature"])),
    ("cascade-temperature-inf", lambda r: (["cascade", "--slm", r.run(), "--prompt", "Hi", "--temperature", "inf"],
                                           ["--temperature", "finite"])),
    ("cascade-empty-prompt", lambda r: (["cascade", "--slm", r.run(), "--prompt", "", "--no-calls"], ["--prompt"])),
    ("cascade-large-not-a-model", lambda r: (["cascade", "--slm", r.run(), "--prompt", "Hi", "--large", r.dir("empty")],
                                             [str(r.tmp / "empty")])),
    ("cascade-slm-without-call-token", lambda r: (["cascade", "--slm", _no_call_tokenizer(r), "--prompt", "Hi",
                                                   "--no-calls"], ["<CALL>"])),
    ("cascade-slm-truncated-weights", lambda r: (["cascade", "--slm", _truncated_weights(r), "--prompt", "Hi",
                                                  "--no-calls"], ["model.safetensors"])),
    ("cascade-memory-mode-on-anchor-run", lambda r: (["cascade", "--slm", r.run(), "--prompt", "Hi", "--no-calls",
                                                      "--mode", "generic"], ["--mode", "no memory"])),
    # --- factscore ---
    ("cascade-max-new-tokens-huge", lambda r: (["cascade", "--slm", r.run(), "--prompt", "x", "--max-new-tokens",
                                                "99999999999"], ["--max-new-tokens"])),
    ("cascade-empty-stop", lambda r: (["cascade", "--slm", r.run(), "--prompt", "x", "--stop", ""], ["--stop"])),
    ("cascade-device-mps", lambda r: (["cascade", "--slm", r.run(), "--prompt", "x", "--device", "mps"],
                                      ["--device", "cpu or cuda"])),
    ("factscore-n-boot-huge", lambda r: (["factscore", "--slm", r.run(), "--data", r.data(), "--n-boot",
                                          "99999999999"], ["--n-boot"])),
    ("factscore-duplicate-slm-label", lambda r: (["factscore", "--slm", f"a={r.run()}", "--slm", f"a={r.run('r2')}",
                                                  "--data", r.data()], ["--slm", "'a'", "already used"])),
    ("calibrate-bins-huge", lambda r: (["calibrate", r.data(), "--slm", r.run(), "--bins", "100000000"], ["--bins"])),
    ("calibrate-empty-slm-label", lambda r: (["calibrate", r.data(), "--slm", f"={r.run()}"], ["--slm", "empty label"])),
    ("factscore-per-bucket-0", lambda r: (["factscore", "--slm", r.run(), "--data", r.data(), "--per-bucket", "0"],
                                          ["--per-bucket"])),
    ("factscore-batch-size-0", lambda r: (["factscore", "--slm", r.run(), "--data", r.data(), "--batch-size", "0"],
                                          ["--batch-size"])),
    ("factscore-taus-not-numbers", lambda r: (["factscore", "--slm", r.run(), "--data", r.data(), "--taus", "a,b"],
                                              ["--taus"])),
    ("factscore-bad-prompt-placeholder", lambda r: (["factscore", "--slm", r.run(), "--data", r.data(), "--prompt",
                                                     "{nme} was born"], ["--prompt", "nme"])),
    ("factscore-data-without-kb", lambda r: (["factscore", "--slm", r.run(), "--data", r.dir("empty")], ["kb.json"])),
    ("factscore-missing-slm", lambda r: (["factscore", "--slm", f"a={r.tmp / 'ghost'}", "--data", r.data()],
                                         [str(r.tmp / "ghost")])),
    ("factscore-damaged-kb", lambda r: (["factscore", "--slm", r.run(), "--data", _damaged_kb(r)], ["kb.json"])),
    ("factscore-damaged-probes", lambda r: (["factscore", "--slm", r.run(), "--data", _damaged_probes(r)],
                                            ["probes.jsonl", "line"])),
    ("export-hf-out-under-a-file", lambda r: (["export-hf", r.run(), "--out", os.path.join(r.file("g", "x"), "sub")],
                                              [str(r.tmp / "g"), "not a directory"])),
    ("factscore-out-under-a-file", lambda r: (["factscore", "--slm", r.run(), "--data", r.data(), "--out",
                                               os.path.join(r.file("f", "x"), "sub")], ["--out"])),
    # --- calibrate, wiki-probes, wiki-cascade, harness ---
    ("calibrate-untagged-data", lambda r: (["calibrate", r.data(), "--slm", r.run()], ["factual.npy", "memlm tag"])),
    ("calibrate-bins-0", lambda r: (["calibrate", r.data(), "--slm", r.run(), "--bins", "0"], ["--bins"])),
    ("wiki-probes-on-bios-data", lambda r: (["wiki-probes", r.data(), "--out", r.tmp / "wp"], ["wiki-leads"])),
    ("wiki-cascade-on-bios-data", lambda r: (["wiki-cascade", r.data(), "--slm", r.run(), "--out", r.tmp / "wc"],
                                             ["not wiki-leads"])),
    ("wiki-cascade-unknown-split", lambda r: (["wiki-cascade", r.data(), "--slm", r.run(), "--split", "nope"],
                                              ["--split", "'nope'"])),
    ("wiki-cascade-unknown-kind", lambda r: (["wiki-cascade", r.data(), "--slm", r.run(), "--kinds", "colour"],
                                             ["--kinds", "colour"])),
    ("harness-unknown-task", lambda r: (["harness", r.run(), "--tasks", "no_such_task", "--mode", "anchor"],
                                        ["--tasks", "no_such_task"])),
    ("harness-route-top-not-fetched", lambda r: (["harness", r.run(), "--tasks", "x", "--mode", "generic",
                                                  "--route-top", "2"], ["--route-top 2", "--mode fetched"])),
    ("harness-missing-run", lambda r: (["harness", os.path.join(str(r.tmp), "no_run"), "--tasks", "no_such_task"],
                                       ["no_run", "no such checkpoint"])),
    # --- cluster (flags are refused before MiniLM loads) ---
    ("cluster-levels-0", lambda r: (["cluster", r.data(), "--levels", "0"], ["--levels"])),
    ("cluster-k-1", lambda r: (["cluster", r.data(), "--k", "1"], ["--k"])),
    ("cluster-batch-size-0", lambda r: (["cluster", r.data(), "--batch-size", "0"], ["--batch-size"])),
    ("cluster-max-tokens-0", lambda r: (["cluster", r.data(), "--max-tokens", "0"], ["--max-tokens"])),
    ("cluster-max-tokens-above-256", lambda r: (["cluster", r.data(), "--max-tokens", "300"], ["--max-tokens", "256"])),
    ("cluster-max-share-0", lambda r: (["cluster", r.data(), "--max-share", "0"], ["--max-share"])),
    ("cluster-max-share-above-1", lambda r: (["cluster", r.data(), "--max-share", "1.5"], ["--max-share"])),
    ("cluster-too-many-leaves", lambda r: (["cluster", r.data(), "--k", "64", "--levels", "5"], ["--levels"])),
    ("cluster-unknown-split", lambda r: (["cluster", r.data(), "--splits", "train,vall"], ["--splits", "vall"])),
    ("cluster-bad-regex", lambda r: (["cluster", r.data(), "--paths-from", "id:(unclosed"], ["--paths-from"])),
    ("cluster-embeddings-from-not-data", lambda r: (["cluster", r.data(), "--embeddings-from", r.dir("empty")],
                                                    ["--embeddings-from", "manifest.json"])),
    ("cluster-max-share-below-1-over-k", lambda r: (["cluster", r.data(), "--k", "2", "--max-share", "0.1"],
                                                    ["--max-share 0.1", "1/k"])),
    ("cluster-seed-above-int32", lambda r: (["cluster", r.data(), "--seed", "2147483648"], ["--seed"])),
    ("cluster-not-a-data-dir", lambda r: (["cluster", r.dir("empty")], ["manifest.json"])),
    ("cluster-truncated-shard", lambda r: (["cluster", _truncated_shard(r)], ["00000.tokens.bin"])),
    # --- export-hf (flags and inputs; directory overwrites: tests of the export command) ---
    ("export-hf-missing-run", lambda r: (["export-hf", r.tmp / "ghost", "--out", r.tmp / "hf"], [str(r.tmp / "ghost")])),
    ("export-hf-truncated-weights", lambda r: (["export-hf", _truncated_weights(r), "--out", r.tmp / "hf"],
                                               ["model.safetensors"])),
    ("export-hf-nan-weights", lambda r: (["export-hf", _nan_weights(r), "--out", r.tmp / "hf"],
                                         ["model.safetensors", "NaN"])),
    ("eval-nan-weights", lambda r: (["eval", _nan_weights(r), "--data", r.data()], ["model.safetensors", "NaN"])),
    ("export-hf-path-on-anchor-run", lambda r: (["export-hf", r.run(), "--out", r.tmp / "hf", "--path", "0,1"],
                                                ["--path"])),
    ("export-hf-run-without-checkpoints", lambda r: (["export-hf", _run_without_checkpoints(r), "--out", r.tmp / "hf"],
                                                     [str(r.tmp / "run")])),
    # --- bank-info ---
    ("bank-info-anchor-run", lambda r: (["bank-info", r.run()], ["no memory"])),
    ("bank-info-missing", lambda r: (["bank-info", r.tmp / "ghost"], [str(r.tmp / "ghost")])),
    ("bank-info-damaged-index", lambda r: (["bank-info", os.path.dirname(r.file("bank/index.json", "{oops"))],
                                           ["index.json"])),
    # --- demo (flags; its directory rules: tests of the demo command) ---
    ("demo-unknown-stage", lambda r: (["demo", "--out", r.tmp / "demo", "--until", "everything"], ["--until"])),
    ("demo-steps-scale-0", lambda r: (["demo", "--out", r.tmp / "demo", "--steps-scale", "0"], ["--steps-scale"])),
    ("demo-seed-negative", lambda r: (["demo", "--out", r.tmp / "demo", "--seed", "-1"], ["--seed"])),
    ("demo-unknown-size", lambda r: (["demo", "--out", r.tmp / "demo", "--size", "galactic"], ["--size"])),
    # checked before the first stage, not when the stage that uses them starts minutes later
    ("demo-large-missing", lambda r: (["demo", "--out", r.tmp / "demo", "--size", "cpu", "--large", r.tmp / "nope"],
                                      ["--large", str(r.tmp / "nope"), "no such directory"])),
    ("demo-steps-scale-huge", lambda r: (["demo", "--out", r.tmp / "demo", "--size", "cpu", "--steps-scale", "1e12"],
                                         ["--steps-scale", "2,147,483,648"])),
]


@pytest.mark.parametrize("build", [b for _, b in ROWS], ids=[i for i, _ in ROWS])
def test_bad_input_fails_cleanly(tmp_path, base, build, one_thread):
    argv, names = build(Row(tmp_path, base))
    before = tree_hashes(tmp_path)
    result = run_memlm_inprocess(argv, cwd=tmp_path)
    assert_clean_failure(result, names=[str(n) for n in names], before=before, root=tmp_path)


def test_table_size():
    assert len(ROWS) >= 40
    commands = {argv for argv in (i.split("-")[0] for i, _ in ROWS)}
    assert {"pretrain", "eval", "score", "select", "cascade", "factscore", "cluster", "export", "bank", "demo"} <= commands


@pytest.mark.parametrize("module,argv", [("train.commands.score", ["DATA", "--model", "RUN", "--batch-size", "0"]),
                                         ("train.commands.eval", ["GHOST", "--data", "DATA"])])
def test_module_launch_is_the_same_one_line_error(tmp_path, base, module, argv):
    """`python -m train.commands.X` goes through the same run_command as `memlm X`."""
    import sys

    argv = [a.replace("DATA", base["data"]).replace("RUN", base["run"]).replace("GHOST", str(tmp_path / "g"))
            for a in argv]
    env = {k: v for k, v in os.environ.items() if k != "MEMLM_DEBUG"}
    env["PYTHONPATH"] = REPO
    p = subprocess.run([sys.executable, "-m", module, *argv], cwd=str(tmp_path), env=env, capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr
    assert len(p.stderr.strip().splitlines()) == 1, p.stderr
    debug = subprocess.run([sys.executable, "-m", module, *argv, "--debug"], cwd=str(tmp_path), env=env,
                           capture_output=True, text=True, timeout=120)
    if "--batch-size" not in argv:  # a library error: --debug shows where it came from
        assert "Traceback" in debug.stderr and debug.returncode != 0


def test_every_command_module_runs_through_run_command():
    """Each command module's `python -m` entry uses train/cli.py's run_command (one error path)."""
    for path in glob.glob(os.path.join(REPO, "train", "commands", "*.py")) + [os.path.join(REPO, "train", "pretrain.py")]:
        src = open(path, encoding="utf-8").read()
        if "def main(" not in src:
            continue
        tail = src.split('if __name__ == "__main__":', 1)[-1]
        assert "run_command(" in tail, f"{path}: `python -m` entry does not use train.cli.run_command"


def test_no_systemexit_below_the_cli():
    """Library code raises typed errors; only train/cli.py (and `python -m` entries through it) exit."""
    hits = []
    for top in ("model", "memory", "data", "kernels", "train"):
        for path in glob.glob(os.path.join(REPO, top, "**", "*.py"), recursive=True):
            for n, line in enumerate(open(path, encoding="utf-8"), 1):
                if re.search(r"raise SystemExit|sys\.exit\((?!run_command|main\(\))", line) and \
                        not path.endswith(os.path.join("train", "cli.py")):
                    hits.append(f"{os.path.relpath(path, REPO)}:{n}: {line.strip()}")
    assert hits == []
