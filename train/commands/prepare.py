"""`memlm prepare`: corpus -> tokenizer -> token shards (a data dir). Logic lives in data/prepare.py."""
from __future__ import annotations

from train.cli import ArgumentParser, check_out_dir, nonnegative_float, number, positive_int, seed


# the flag types of train/cli.py (one-line errors naming the bound)
fraction = number(float, 0, 1, high_open=True)  # [0, 1)


def at_least(low: int):
    return number(int, low)


def build_parser() -> ArgumentParser:
    from data.tokenizer import MIN_VOCAB

    p = ArgumentParser(
        prog="memlm prepare",
        description="Build a corpus, train or load a tokenizer (with <CALL>), and write token shards "
                    "with document boundaries and a train/val split. Re-running resumes a killed run, rebuilds "
                    "damaged shard files, or says `nothing to do`. Text is text: special-token strings inside "
                    "documents (<|endoftext|>, <CALL>, ...) are encoded as ordinary text.")
    p.add_argument("--corpus", required=True,
                   help="bios | wiki-leads | PATH (.jsonl/.json/.txt/.parquet/.csv file, also .gz/.bz2/.xz, or directory) | hf:NAME[:CONFIG] "
                        "| a weighted mixture 'bios:0.5,wiki-leads:0.5'")
    p.add_argument("--out", required=True,
                   help="output data dir (manifest.json, tokenizer/, train/, val/); a new or empty directory, or "
                        "one memlm prepared")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--tokenizer", default=None,
                   help="an existing HF tokenizer dir (or hub name); <|endoftext|>, <pad>, <CALL> are added if "
                        "missing and <|endoftext|> becomes its end-of-document token")
    g.add_argument("--vocab-size", type=at_least(MIN_VOCAB), default=None,
                   help=f"train a byte-level BPE of this size on the training split (>= {MIN_VOCAB}; default 8192)")
    p.add_argument("--val-fraction", type=fraction, default=0.01,
                   help="fraction in [0, 1) of documents held out for validation, by a hash of the doc id "
                        "(default 0.01)")
    p.add_argument("--shard-tokens", type=positive_int, default=50_000_000,
                   help="start a new shard after this many tokens (default 50M)")
    p.add_argument("--window-tokens", type=at_least(2), default=2048,
                   help="documents longer than this are cut into windows of at most this many tokens (>= 2; "
                        "default 2048)")
    p.add_argument("--workers", type=positive_int, default=None, help="tokenizer threads (default: all cores)")
    p.add_argument("--max-docs", type=positive_int, default=None, help="stop after this many documents (smoke tests)")
    p.add_argument("--text-column", default="text", help="text column/key of local or hub datasets (default text); "
                                                          "its values must be strings")
    p.add_argument("--id-column", default=None, help="document id column (default: <file>:<row>)")
    p.add_argument("--sample-by", default="document", choices=["document", "paragraph", "line"],
                   help=".txt files: one document per file, per blank-line paragraph, or per line (LF, CRLF and CR "
                        "line ends all count)")
    p.add_argument("--hf-split", default="train", help="split of a hf:NAME dataset (default train)")
    p.add_argument("--n-people", type=positive_int, default=None, help="bios: number of people (default 2000)")
    p.add_argument("--top-docs", type=positive_int, default=None,
                   help="bios: documents of the most mentioned person (Zipf head; default 800)")
    p.add_argument("--seed", type=seed, default=None,
                   help="bios generator / mixture sampling seed (default 0)")
    p.add_argument("--rebuild", action="store_true",
                   help="prepare an existing data dir again (other settings, or a damaged manifest/tokenizer); the "
                        "new dir replaces it only once complete, and only a dir memlm prepared is replaced")
    p.add_argument("--bios-preset", default=None, choices=["default", "uniform", "capacity"],
                   help="bios: a named configuration of data/bios.py (uniform: every person 12 documents, "
                        "for the mechanism check; capacity: long tail with every fact seen >= ~8 times); "
                        "the other bios flags override it")
    p.add_argument("--zipf-s", type=nonnegative_float, default=None,
                   help="bios: documents per person = max(min_docs, top_docs * rank^-s); 0 = uniform (default 0.8)")
    p.add_argument("--min-docs", type=positive_int, default=None, help="bios: floor of documents per person (default 1)")
    p.add_argument("--no-progress", action="store_true", help="disable the progress bar")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    check_out_dir(args.out)  # under a file: named, before any work
    from data.prepare import prepare

    kw = {}
    if args.text_column != "text":
        kw["text_column"] = args.text_column
    if args.id_column is not None:
        kw["id_column"] = args.id_column
    if args.hf_split != "train":
        kw["hf_split"] = args.hf_split
    if args.sample_by != "document":
        kw["sample_by"] = args.sample_by
    for k in ("n_people", "top_docs", "seed", "bios_preset", "zipf_s", "min_docs"):
        if getattr(args, k) is not None:
            kw[k] = getattr(args, k)
    prepare(args.corpus, args.out, tokenizer=args.tokenizer, vocab_size=args.vocab_size,
            val_fraction=args.val_fraction, shard_tokens=args.shard_tokens, window_tokens=args.window_tokens,
            workers=args.workers, max_docs=args.max_docs, progress=not args.no_progress, rebuild=args.rebuild, **kw)
    return 0


if __name__ == "__main__":
    import sys

    from train.cli import run_command

    sys.exit(run_command("memlm prepare", main))
