"""The wiki-leads cascade: clozes from held-out leads, exact match, fluency under a judge, call sites."""
import json
import os

import pytest
import torch

from data.shards import prepare
from model.config import ModelConfig
from model.model import Anchor
from train.lacy import wiki


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_thread):
    pass


@pytest.fixture(scope="module")
def wiki_data(tmp_path_factory):
    """120 leads, a third held out, tagged, with a random <CALL> selection; a tiny SLM run and a tiny HF
    model exported from another (the large model and the fluency judge)."""
    from model.hf import export_llama
    from tests.test_lacy import make_run
    from train.commands import select as cmd_select, tag as cmd_tag

    root = tmp_path_factory.mktemp("wiki")
    data = str(root / "data")
    prepare("wiki-leads", data, vocab_size=400, val_fraction=0.3, window_tokens=64, progress=False,
            log=lambda *a: None, max_docs=120)
    assert cmd_tag.main([data]) == 0
    assert cmd_select.main([data, "--rule", "random", "--call-rate", "0.1"]) == 0
    from data.shards import open_data

    tok = open_data(data).tokenizer()
    cfg = ModelConfig(vocab_size=len(tok), n_layer=2, n_embd=32, n_head=2, ffn_hidden=64, max_seq_len=128)
    torch.manual_seed(0)
    slm = make_run(str(root / "slm"), Anchor(cfg), os.path.join(data, "tokenizer"))
    torch.manual_seed(1)
    big = Anchor(cfg)
    export_llama(big, tok, str(root / "hf"))
    return {"data": data, "slm": slm, "hf": str(root / "hf"), "root": root}


def test_exact_and_cut():
    from train.commands.wiki_cascade import _cut

    assert wiki.exact(" 1879 in Ulm", "1879") and wiki.exact("1879.", "1879")
    assert not wiki.exact(" 18790", "1879") and not wiki.exact(" in 1879", "1879")
    assert wiki.exact(" German physicist", "German")
    assert _cut(" born in 1.5 m. Then more. x", ".") == " born in 1.5 m." and _cut(" no stop", ".") == " no stop"
    assert wiki.first_word(" Warsaw, Poland") == "Warsaw"


def test_fluency_matches_direct_nll(wiki_data):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(wiki_data["hf"]).eval()
    tok = AutoTokenizer.from_pretrained(wiki_data["hf"])
    text, start = "Paris is the capital of France in 1900.", len("Paris is")
    spans = [(text.index(" France"), text.index(" France") + 7)]
    (nll, n), (nll2, n2) = wiki.fluency(model, tok, [text, "A short one. " + text], [start, start + 13],
                                        [spans, [(a + 13, b + 13) for a, b in spans]], context_tokens=1000)
    assert n2 == n  # the second text (left-padded in the batch) scores the same completion tokens
    ids = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    with torch.no_grad():
        logp = model(input_ids=torch.tensor([ids["input_ids"]])).logits[0].log_softmax(-1)
    keep = [t for t in range(1, len(ids["input_ids"])) if ids["offset_mapping"][t][0] >= start
            and not (ids["offset_mapping"][t][0] < spans[0][1] and spans[0][0] < ids["offset_mapping"][t][1])]
    assert n == len(keep) and 0 < n < len(ids["input_ids"]) - 2
    assert nll == pytest.approx(-sum(float(logp[t - 1, ids["input_ids"][t]]) for t in keep), rel=1e-5)
    (short, n3), = wiki.fluency(model, tok, [text], [start], [spans], context_tokens=1)
    assert n3 == n and short != pytest.approx(nll, rel=1e-6)  # one token of context: same tokens, other NLL


def test_wiki_cascade_command(wiki_data):
    from train.commands import wiki_cascade

    out = str(wiki_data["root"] / "out")
    assert wiki_cascade.main([wiki_data["data"], "--facts-only"]) == 0
    facts = [json.loads(x) for x in open(wiki.facts_path(wiki_data["data"]))]
    assert facts and all(f["kind"] in ("year", "date", "country", "place", "nationality", "occupation") for f in facts)
    rc = wiki_cascade.main([wiki_data["data"], "--slm", f"random={wiki_data['slm']}", "--large", wiki_data["hf"],
                            "--taus", "0,argmax,1.01", "--max-leads", "6", "--max-new-tokens", "4",
                            "--max-prompt-chars", "2000", "--large-alone", "--diagnose", "3", "--tag-calls",
                            "--match-rates", "0.5", "--n-boot", "30", "--out", out, "--device", "cpu"])
    assert rc == 0
    rep = json.load(open(os.path.join(out, "wiki_cascade.json")))
    c = rep["curves"]["random"]
    assert c["rate"][0] == 1.0 and c["rate"][-1] == 0.0 and len(c["nll"]) == 3 and c["nll"][-1] > 0
    assert "nll" in c["matched"]["0.5"] and rep["large_alone"]["n"] == rep["clozes"]
    d = rep["diagnosis"]["random"]
    assert set(d) <= {"factual", "non_factual"} and all(0 <= v["slm_right"] <= 1 for v in d.values())
    assert rep["generation_calls"]["random"]["calls"] > 0  # tau 0 calls at every decision
    rows = [json.loads(x) for x in open(os.path.join(out, "samples.jsonl"))]
    assert len(rows) == rep["clozes"] * 4 and all(r["first_word_delegated"] for r in rows if r["tau"] == 0)


def test_wiki_cascade_checks_tokenizers_and_diagnose_before_any_generation(wiki_data, tmp_path, monkeypatch):
    """Before any generation: an --slm whose tokenizer is not the data's (its token ids would be decoded as
    other text) is refused naming it; --diagnose without the split's `factual` array is refused (memlm tag);
    --diagnose with no calls_<label> for any --slm is refused, and a label without one is named on the
    console. Generation is made to fail loudly, so each refusal provably comes first."""
    import shutil

    from data.tokenizer import train_tokenizer
    from model.errors import ConfigError, DataError
    from tests.test_lacy import make_run
    from train.commands import wiki_cascade
    from train.lacy.cascade import Cascade

    def no_generation(*a, **k):
        raise AssertionError("generation started before the inputs were checked")

    monkeypatch.setattr(Cascade, "generate_batch", no_generation)
    data = wiki_data["data"]
    assert wiki_cascade.main([data, "--facts-only"]) == 0
    other_tok = str(tmp_path / "tok")
    train_tokenizer(["Ada Lovelace was born in London in 1815."] * 20, 300, other_tok)
    from data.shards import open_data

    cfg = ModelConfig(vocab_size=len(open_data(data).tokenizer()), n_layer=1, n_embd=16, n_head=2, ffn_hidden=32,
                      max_seq_len=64)
    other = make_run(str(tmp_path / "other"), Anchor(cfg), other_tok)
    base = ["--large", wiki_data["hf"], "--taus", "argmax", "--max-leads", "2", "--max-new-tokens", "2",
            "--max-prompt-chars", "2000", "--device", "cpu"]
    with pytest.raises(DataError, match=rf"DATA {data}: prepared with another tokenizer than --slm x={other}"):
        wiki_cascade.main([data, "--slm", f"random={wiki_data['slm']}", "--slm", f"x={other}", *base,
                           "--out", str(tmp_path / "o1")])
    with pytest.raises(ConfigError, match=r"--diagnose 3: .* no selection array calls_<label> for any --slm label"):
        wiki_cascade.main([data, "--slm", f"nosel={wiki_data['slm']}", *base, "--diagnose", "3",
                           "--out", str(tmp_path / "o2")])
    untagged = str(tmp_path / "untagged")  # the same data without its factual arrays
    shutil.copytree(data, untagged)
    for base_dir, _, names in os.walk(untagged):
        for n in names:
            if n.endswith(".factual.npy"):
                os.remove(os.path.join(base_dir, n))
    with pytest.raises(DataError, match=r"--diagnose 3: .* no 'factual' array .*memlm tag"):
        wiki_cascade.main([untagged, "--slm", f"random={wiki_data['slm']}", *base, "--diagnose", "3",
                           "--out", str(tmp_path / "o3")])
    assert not [p for p in os.listdir(tmp_path) if p in ("o1", "o2", "o3")]  # nothing written


def test_cascade_says_when_the_prompt_passes_the_slm_context(wiki_data, capsys):
    """`memlm cascade` keeps the SLM's last max_seq_len tokens at each step: a prompt that (with
    --max-new-tokens) passes that gets a one-line notice naming the lengths; a short one gets none."""
    from train.commands import cascade

    base = ["--slm", wiki_data["slm"], "--no-calls", "--max-new-tokens", "2", "--device", "cpu"]
    long_prompt = " ".join(["Ada Lovelace was born in London in 1815 and wrote the first program."] * 30)
    assert cascade.main(base + ["--prompt", "Ada Lovelace was born", "--prompt", long_prompt]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("memlm cascade: --prompt 2 has ") and "the last 128 tokens" in err[0]
