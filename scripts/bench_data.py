"""Data pipeline benchmark: `memlm prepare` vs raw `tokenizers` encode, and loader vs tiny-model speed.

    python scripts/bench_data.py [--corpus wiki-leads] [--seq-len 256] [--batch-size 8]

Targets (issue 3): prepare end-to-end >= 0.7x raw encode_batch tokens/s on the same texts in the same
run; packed-batch loading >= 20x the tokens/s a tiny model trains at (fwd+bwd+AdamW step).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def bench_tokenize(corpus: str, tmp: str, vocab_size: int, batch_docs: int, corpus_kw: dict) -> tuple[list, str]:
    from data.corpora import load_corpus
    from data.shards import prepare
    from data.tokenizer import save_tokenizer, train_tokenizer

    texts = [d.text for d in load_corpus(corpus, **corpus_kw)]
    tok_dir = os.path.join(tmp, "tok")
    save_tokenizer(train_tokenizer(iter(texts), vocab_size), tok_dir)
    from data.tokenizer import load_tokenizer
    backend = load_tokenizer(tok_dir).backend_tokenizer
    encode = getattr(backend, "encode_batch_fast", backend.encode_batch)
    encode(texts[:256], add_special_tokens=False)  # warm up the thread pool
    rows = []
    t0 = time.perf_counter()
    n_raw = 0
    for i in range(0, len(texts), batch_docs):
        n_raw += sum(len(e.ids) for e in encode(texts[i:i + batch_docs], add_special_tokens=False))
    raw_s = time.perf_counter() - t0
    rows.append(("raw tokenizers encode_batch", n_raw, raw_s, n_raw / raw_s, 1.0))
    out = os.path.join(tmp, "data")
    t0 = time.perf_counter()
    man = prepare(corpus, out, tokenizer=tok_dir, val_fraction=0.01, batch_docs=batch_docs, progress=False,
                  log=lambda *a: None, **corpus_kw)
    prep_s = time.perf_counter() - t0
    n_prep = man["splits"]["train"]["n_tokens"] + man["splits"]["val"]["n_tokens"] - len(texts)  # minus EOS
    rows.append(("memlm prepare end-to-end (+shards)", n_prep, prep_s, n_prep / prep_s, (n_prep / prep_s) / (n_raw / raw_s)))
    return rows, out


def bench_loader(data_dir: str, seq_len: int, batch_size: int, n_batches: int, num_workers: int) -> float:
    from data.loader import make_loader
    loader = make_loader(data_dir, "train", seq_len=seq_len, batch_size=batch_size, num_workers=num_workers)
    it = iter(loader)
    next(it)
    t0 = time.perf_counter()
    for _ in range(n_batches):
        next(it)
    return n_batches * batch_size * seq_len / (time.perf_counter() - t0)


def bench_model(vocab_size: int, seq_len: int, batch_size: int, steps: int, which: str = "anchor"):
    import torch
    try:
        if which != "anchor":
            raise RuntimeError("--model torch")
        from model.config import ModelConfig
        from model.model import Anchor
        model = Anchor(ModelConfig.from_name("tiny", vocab_size=vocab_size, max_seq_len=max(seq_len, 256)))
        name = "model.Anchor tiny"
        fwd = lambda x, d: model(x, doc_lens=d)  # noqa: E731
    except Exception as e:  # model/ not ready: a comparable 4-layer d=128 transformer
        print(f"(model.Anchor unavailable: {e}; using nn.TransformerEncoder 4x128)")
        emb = torch.nn.Embedding(vocab_size, 128)
        layer = torch.nn.TransformerEncoderLayer(128, 4, 512, batch_first=True, norm_first=True)
        body = torch.nn.TransformerEncoder(layer, 4)
        head = torch.nn.Linear(128, vocab_size, bias=False)
        model = torch.nn.ModuleList([emb, body, head])
        mask = torch.nn.Transformer.generate_square_subsequent_mask(seq_len)
        fwd = lambda x, d: head(body(emb(x), mask=mask, is_causal=True))  # noqa: E731
        name = "torch 4-layer d=128"
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.randint(0, vocab_size, (batch_size, seq_len))
    d = torch.full((batch_size, 1), seq_len)

    def step():
        logits = fwd(x, d)
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), x.reshape(-1))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    return steps * batch_size * seq_len / (time.perf_counter() - t0), name


def main(argv=None) -> int:
    from data.tokenizer import MIN_VOCAB
    from train.cli import ArgumentParser, number
    from train.config import BENCH_BATCH, BENCH_SEQ, BENCH_STEPS

    p = ArgumentParser(prog="bench_data.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--corpus", default="wiki-leads", help="corpus spec to tokenize (default wiki-leads)")
    p.add_argument("--vocab-size", type=number(int, MIN_VOCAB), default=8192, help="BPE vocab trained for the benchmark")
    p.add_argument("--batch-docs", type=number(int, 1, BENCH_STEPS), default=512, help="documents per encode batch (both paths)")
    p.add_argument("--seq-len", type=number(int, 1, BENCH_SEQ), default=256, help="packed row length")
    p.add_argument("--batch-size", type=number(int, 1, BENCH_BATCH), default=8, help="rows per batch")
    p.add_argument("--loader-batches", type=number(int, 1, BENCH_STEPS), default=300, help="batches timed for the loader")
    p.add_argument("--model-steps", type=number(int, 1, BENCH_STEPS), default=5, help="training steps timed for the model")
    p.add_argument("--num-workers", type=number(int, 0, 256), default=0, help="DataLoader workers for the loader bench")
    p.add_argument("--model", default="both", choices=["anchor", "torch", "both"],
                   help="model whose training speed is the reference (model.Anchor tiny, a torch 4x128 "
                        "transformer, or both: the faster one sets the ratio)")
    args = p.parse_args(argv)
    import torch
    print(f"torch threads: {torch.get_num_threads()}, cores: {os.cpu_count()}, "
          f"TOKENIZERS_PARALLELISM={os.environ.get('TOKENIZERS_PARALLELISM', '(unset)')}")
    with tempfile.TemporaryDirectory(prefix="memlm-bench-") as tmp:
        rows, data_dir = bench_tokenize(args.corpus, tmp, args.vocab_size, args.batch_docs, {})
        load = bench_loader(data_dir, args.seq_len, args.batch_size, args.loader_batches, args.num_workers)
    models = [bench_model(args.vocab_size, args.seq_len, args.batch_size, args.model_steps, m)
              for m in (["anchor", "torch"] if args.model == "both" else [args.model])]
    model_tps = max(tps for tps, _ in models)  # the faster model is the harder target
    print(f"\ncorpus: {args.corpus}\n")
    print(f"| {'stage':<38} | {'tokens':>10} | {'seconds':>8} | {'tokens/s':>12} | {'ratio':>7} | target |")
    print(f"|{'-' * 40}|{'-' * 12}|{'-' * 10}|{'-' * 14}|{'-' * 9}|--------|")
    for stage, n, s, tps, r in rows:
        tgt = "" if r == 1.0 else (">=0.7x " + ("ok" if r >= 0.7 else "MISS"))
        print(f"| {stage:<38} | {n:>10,} | {s:>8.2f} | {tps:>12,.0f} | {r:>6.2f}x | {tgt} |")
    ratio = load / model_tps  # vs the fastest model
    print(f"| {'packed loader (B=%d, T=%d, %d workers)' % (args.batch_size, args.seq_len, args.num_workers):<38} "
          f"| {'':>10} | {'':>8} | {load:>12,.0f} | {ratio:>6.1f}x | >=20x {'ok' if ratio >= 20 else 'MISS'} |")
    for tps, name in models:
        print(f"| {'train step: ' + name:<38} | {'':>10} | {'':>8} | {tps:>12,.0f} | {load / tps:>6.1f}x |  |")
    return 0


if __name__ == "__main__":
    from train.cli import run_command

    sys.exit(run_command("bench_data.py", main))
