"""`memlm tag DATA`: spaCy factual flags per token (the LaCy signal), stored as the uint8 array "factual".

Resumable: a shard whose "factual" array already exists (with the right length) is skipped, unless
--overwrite. A text piece with no parseable word (e.g. only punctuation or whitespace) is skipped and
counted (all its flags stay 0); a whole shard without any word is an error naming the file. Documents
are parsed whole, so flags do not depend on --window-tokens; special-token strings written in a
document are ordinary text.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

from model.errors import ConfigError, DataError
from train.cli import ArgumentParser, positive_int

ARRAY = "factual"
# spaCy's universal POS tags (https://universaldependencies.org/u/pos/)
UPOS = ("ADJ", "ADP", "ADV", "AUX", "CCONJ", "DET", "INTJ", "NOUN", "NUM", "PART", "PRON", "PROPN", "PUNCT",
        "SCONJ", "SYM", "VERB", "X")


def build_parser() -> ArgumentParser:
    from data.tagging import FACTUAL_ENTITY_TYPES, FACTUAL_POS, SPACY_MODELS

    p = ArgumentParser(prog="memlm tag", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("data", help="data dir written by `memlm prepare`")
    p.add_argument("--splits", default="train,val", help="comma-separated splits to tag (train, val)")
    p.add_argument("--batch-size", type=positive_int, default=128, help="texts per nlp.pipe batch (>= 1)")
    p.add_argument("--processes", type=positive_int, default=1, help="spaCy worker processes (nlp.pipe n_process, >= 1)")
    p.add_argument("--entity-types", default=",".join(FACTUAL_ENTITY_TYPES),
                   help="comma-separated spaCy entity labels whose tokens are factual ('' = none)")
    p.add_argument("--pos", default=",".join(FACTUAL_POS),
                   help=f"comma-separated POS tags that are factual (of {', '.join(UPOS)})")
    p.add_argument("--spacy-model", default=None,
                   help=f"spaCy pipeline name (default: first of {', '.join(SPACY_MODELS)} that loads)")
    p.add_argument("--overwrite", action="store_true", help="re-tag shards that already have the array")
    return p


def _split_list(s: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in s.split(",") if x.strip())


def _check_entities(cfg, nlp) -> None:
    labels = set(nlp.get_pipe("ner").labels) if "ner" in nlp.pipe_names else set()
    bad_ent = [e for e in cfg.entity_types if e not in labels]
    if bad_ent:
        raise ConfigError(f"--entity-types: {bad_ent} not produced by the spaCy pipeline "
                          f"{nlp.meta.get('name')} (its labels: {', '.join(sorted(labels)) or 'none'})")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from data.selection import has_array, shard_label
    from data.shards import SPLITS, open_data
    from data.tagging import SPACY_MODELS, TagConfig, TagStats, load_spacy, tag_tokens

    cfg = TagConfig(pos=_split_list(args.pos), entity_types=_split_list(args.entity_types))
    bad_pos = [p for p in cfg.pos if p not in UPOS]
    if bad_pos:
        raise ConfigError(f"--pos: unknown POS tag(s) {bad_pos}; valid: {', '.join(UPOS)}")
    splits = _split_list(args.splits)
    unknown = [s for s in splits if s not in SPLITS]
    if not splits or unknown:
        raise ConfigError(f"--splits {args.splits!r}: unknown split(s) {unknown}; valid: {', '.join(SPLITS)}")
    dd = open_data(args.data)
    tok = dd.tokenizer()
    todo = []
    for split in splits:
        for sh in dd.shards(split):
            if not args.overwrite and has_array(sh, ARRAY):
                print(f"skip {shard_label(sh)} (already tagged)")
                continue
            todo.append(sh)
    if not todo:
        print("memlm tag: nothing to do (all shards tagged; --overwrite to redo)")
        return 0
    nlp = load_spacy((args.spacy_model,) if args.spacy_model else SPACY_MODELS)
    _check_entities(cfg, nlp)
    print(f"spaCy pipeline: {nlp.meta.get('name')} {nlp.meta.get('version')}; flags: POS {list(cfg.pos)}, "
          f"entities {list(cfg.entity_types)}")

    cores = os.cpu_count() or 1
    if args.processes > cores:  # more spaCy processes than cores only adds start-up and switching
        print(f"memlm tag: --processes {args.processes} is more than the {cores} cores here; using {cores}",
              file=sys.stderr)
        args.processes = cores
    from tqdm import tqdm
    total = sum(sh.n_tokens for sh in todo)
    t0 = time.time()
    all_stats = TagStats()
    with tqdm(total=total, unit="tok", desc="tag", file=sys.stderr, dynamic_ncols=True) as bar:
        words = [0]

        def progress(n_tok, n_words):
            words[0] += n_words
            bar.update(n_tok)
            bar.set_postfix(words_per_s=f"{words[0] / max(time.time() - t0, 1e-9):.0f}", refresh=False)

        for sh in todo:
            stats = TagStats()
            flags = tag_tokens(np.asarray(sh.tokens), None, tok, nlp, cfg, batch_size=args.batch_size,
                               n_process=args.processes, stats=stats, progress=progress)
            if stats.n_words == 0:
                raise DataError(f"{sh.file('tokens.bin')}: no parseable words in {stats.n_pieces} text piece(s) "
                                f"(e.g. {stats.empty_examples[:1]!r}); is the shard empty or not text?")
            sh.write_array(ARRAY, flags)
            for k in ("n_tokens", "n_flagged", "n_words", "n_pieces", "n_empty"):
                setattr(all_stats, k, getattr(all_stats, k) + getattr(stats, k))
            tqdm.write(f"{shard_label(sh)}: {stats.n_flagged}/{stats.n_tokens} tokens factual "
                       f"({stats.n_flagged / max(stats.n_tokens, 1):.1%}), {stats.n_words} words"
                       + (f", {stats.n_empty} empty piece(s) skipped" if stats.n_empty else ""), file=sys.stderr)
    dt = time.time() - t0
    print(f"tagged {len(todo)} shard(s): {all_stats.n_words} words in {dt:.1f}s "
          f"({all_stats.n_words / max(dt, 1e-9):.0f} words/s); {all_stats.n_flagged}/{all_stats.n_tokens} tokens "
          f"factual ({all_stats.n_flagged / max(all_stats.n_tokens, 1):.1%})"
          + (f"; {all_stats.n_empty} text piece(s) without words skipped" if all_stats.n_empty else ""))
    return 0


if __name__ == "__main__":
    from train.cli import run_command

    sys.exit(run_command("memlm tag", main))
