"""`memlm cluster DATA`: embed every window with MiniLM, fit the k-means tree on train, store paths.

Steps (each resumable):
1. embed: every window of every split is decoded with the data dir's tokenizer and embedded
   (all-MiniLM-L6-v2, mean pooling, L2-normalised; texts longer than 256 word pieces are truncated
   to the first 256). Embeddings are cached per shard as the per-window array `window_minilm`
   (float32 [n_windows, 384]); a re-run skips shards that have it.
2. fit: hierarchical spherical k-means on the train embeddings (at most --max-fit of them, a seeded
   sample), balanced so no cluster holds more than 1.5/k of its parent's points (9.4% for k=16).
   Saved as DATA/router.safetensors + DATA/router.json; a re-run with the same settings reuses it.
3. assign: greedy descent for every window of every split -> DATA/{split}/SHARD.paths.npy
   (int32 [n_windows, levels]); the manifest's n_levels is set.

--paths-from KEY replaces k-means by a key per document: every window of a document takes the leaf of
the document's key, keys are spread over the leaves so that leaves hold about as many train windows
(largest keys first, to the least-loaded leaf). KEY is `id` (the document id), `id:REGEX` (the first
group of REGEX searched in the id, e.g. `id:^bio-([0-9]+)-` = the bios person) or `entity` (the first named
entity of the document's first window, spaCy; the key -> leaf table is saved in router.json and prompts
are routed by their first known entity; the keys are cached per shard as a `window_entity_key_<fingerprint
of the spaCy pipeline>` array, so a re-run, another k or `--embeddings-from` do not tag again). The saved router's centroids are the mean embeddings of each
node's windows, so a prompt without a known key (and any text, for `id` keys) is routed to the node
whose windows it resembles. Windows whose key was not seen in train are routed the same way.

--embed-text sentences embeds every sentence of a window and averages them (chunk-and-average:
a long window is not reduced to its first word pieces, and each part is embedded like a short prompt).
"""
from __future__ import annotations

import argparse
import re
import sys
import time

import numpy as np

from memory.embed import (EMB, EMB_SENTENCES, MAX_TOKENS, copy_embeddings, copy_window_array, embed_windows,
                          has_embeddings, window_texts)
from model.errors import ConfigError, DataError
from train.cli import ArgumentParser, add_device_arg, number, positive_int, seed


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="memlm cluster", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("data", help="data dir written by `memlm prepare`")
    p.add_argument("--levels", type=positive_int, default=3, help="depth of the cluster tree (= number of memory levels)")
    p.add_argument("--k", type=number(int, 2), default=16, help="branching factor (children per node, >= 2)")
    p.add_argument("--seed", type=seed, default=0, help="seed of k-means and of the --max-fit sample")
    p.add_argument("--batch-size", type=positive_int, default=None,
                   help="at most N texts per MiniLM forward pass (default 64 on CPU, 512 on GPU; windows are "
                        "sorted by length first, so a batch pads little)")
    p.add_argument("--max-tokens", type=number(int, 1, MAX_TOKENS), default=MAX_TOKENS,
                   help=f"MiniLM reads the first N word pieces of each window (default {MAX_TOKENS}, the "
                        "encoder's limit; embedding cost grows with N, so CPU demos use 64)")
    p.add_argument("--max-fit", type=positive_int, default=None,
                   help="fit the tree on at most N train windows (seeded sample; default: all)")
    p.add_argument("--max-share", type=number(float, 0, 1, low_open=True), default=None,
                   help="balancing bound in (0, 1]: max fraction of a parent's points in one child (default 1.5/k; "
                        "never below 1/k)")
    p.add_argument("--niter", type=positive_int, default=20, help="k-means iterations per node")
    p.add_argument("--splits", default="train,val", help="comma-separated splits to embed and assign")
    add_device_arg(p)
    p.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"],
                   help="MiniLM precision (default float16 on GPU, float32 on CPU)")
    p.add_argument("--refit", action="store_true", help="fit a new tree even if DATA/router.* matches the settings")
    p.add_argument("--reembed", action="store_true", help="recompute cached embeddings (and entity keys)")
    p.add_argument("--embeddings-from", default=None, metavar="DATA",
                   help="reuse the window embeddings (and, with --paths-from entity, the entity keys) of another "
                        "data dir prepared from the same documents with the same tokenizer (shards with other "
                        "tokens are embedded), e.g. one dir per k")
    p.add_argument("--paths-from", default=None, metavar="KEY",
                   help="leaves from a document key instead of k-means: id | id:REGEX | entity (see above)")
    p.add_argument("--embed-text", default="window", choices=["window", "sentences"],
                   help="embed each window whole (first --max-tokens word pieces) or as the mean of its "
                        "sentences' embeddings (default window)")
    return p


def key_pattern(spec: str) -> re.Pattern | None:
    """The compiled REGEX of `id:REGEX` (None for id / entity); ConfigError naming --paths-from otherwise."""
    if spec.startswith("id:"):
        try:
            return re.compile(spec[3:])
        except re.error as e:
            raise ConfigError(f"--paths-from {spec}: bad regular expression: {e}") from None
    if spec not in ("id", "entity"):
        raise ConfigError(f"--paths-from {spec}: expected id, id:REGEX or entity")
    return None


def entity_key_array() -> str:
    """Name of the per-window str array ("" = no key) caching the keys of --paths-from entity; it carries the
    fingerprint of the spaCy pipeline and labels that made them (data.entity_keys.keys_fingerprint)."""
    from data.entity_keys import keys_fingerprint

    return f"window_entity_key_{keys_fingerprint()}"


def has_entity_keys(shard) -> bool:
    """Whether the shard caches a complete entity-key array of the current pipeline (one key per window)."""
    name = entity_key_array()
    try:
        if not shard.has_array(name):
            return False
        a = shard.array(name)
        return a.shape == (shard.n_windows,) and a.dtype.kind == "U"  # a damaged or foreign file: tag again
    except DataError:  # unreadable: tag again
        return False


def shard_entity_keys(shard, tokenizer, recompute: bool = False) -> list[str | None]:
    """The key of each window's document: the first named entity of the document's first window (spaCy).
    Cached per shard (`entity_key_array`; tagging is the costly part of entity keys on CPU: a re-run,
    another k on the same dir or `--embeddings-from` reuse it)."""
    if has_entity_keys(shard) and not recompute:
        return [key or None for key in shard.array(entity_key_array(), mmap=False).tolist()]
    from data.entity_keys import entity_keys

    docs = shard.docs
    first = [i for i, d in enumerate(docs) if d["chunk"] == 0]
    texts = [window_texts(shard, tokenizer, i, i + 1)[0] for i in first]
    doc_key = {docs[i]["doc_id"]: (ks[0] if ks else None) for i, ks in zip(first, entity_keys(texts))}
    keys = [doc_key.get(d["doc_id"]) for d in docs]
    shard.write_array(entity_key_array(), np.array([key or "" for key in keys], dtype=str))
    return keys


def document_keys(shards, tokenizer, spec: str, recompute: bool = False) -> list[list[str | None]]:
    """Per shard, the key of each window's document (None: the document has no key). `spec`: id,
    id:REGEX or entity (see --paths-from; entity keys are cached per shard, `recompute` redoes them)."""
    pattern = key_pattern(spec)
    out = []
    for sh in shards:
        if spec == "entity":
            out.append(shard_entity_keys(sh, tokenizer, recompute))
            continue
        keys = []
        for d in sh.docs:
            key = d["doc_id"]
            if pattern is not None:
                m = pattern.search(key)
                if m is None:
                    raise DataError(f"{sh.file('docs.jsonl')}: document id {key!r} does not match --paths-from "
                                    f"{spec}; use a pattern that matches every id")
                key = m.group(1) if m.groups() else m.group(0)
            keys.append(key)
        out.append(keys)
    return out


def keyed_router(spec: str, train_shards, all_shards, tokenizer, k: int, levels: int, emb: str,
                 recompute: bool = False):
    """(router, {shard: paths}): leaves from document keys, centroids from the windows' embeddings."""
    from memory.keyed import balance_keys, leaf_to_path, router_from_paths

    keys = document_keys(all_shards, tokenizer, spec, recompute)
    by_shard = dict(zip([id(sh) for sh in all_shards], keys))
    train_keys = [key for sh in train_shards for key in by_shard[id(sh)] if key is not None]
    if not train_keys:
        raise DataError(f"--paths-from {spec}: no train window has a key")
    table = balance_keys(train_keys, k, levels)
    x = np.concatenate([np.asarray(sh.array(emb)) for sh in train_shards])
    tk = [key for sh in train_shards for key in by_shard[id(sh)]]
    known = np.array([key is not None for key in tk])
    paths = leaf_to_path(np.array([table[key] for key in tk if key is not None]), k, levels)
    meta = {"paths_from": spec, "n_keys": len(table)}
    if spec == "entity":
        meta["key_table"] = table
    router = router_from_paths(x[known], paths, k, meta)
    out = {}
    for sh in all_shards:
        p = router.assign(np.asarray(sh.array(emb)))
        for i, key in enumerate(by_shard[id(sh)]):
            if key is not None and key in table:
                p[i] = leaf_to_path(np.array([table[key]]), k, levels)[0]
        out[id(sh)] = p
    return router, out


MAX_LEAVES = 1 << 24  # k ** levels leaves; counts and key tables are dense over them


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from data.shards import SPLITS, open_data
    from memory.embed import MiniLM
    from memory.router import Router

    dd = open_data(args.data)
    if args.max_share is not None and args.max_share * args.k < 1:
        raise ConfigError(f"--max-share {args.max_share}: below 1/k = {1 / args.k:.3g} (k={args.k}), so no child could "
                          "hold its share; give --max-share >= 1/k")
    if args.k ** args.levels > MAX_LEAVES:
        raise ConfigError(f"--k {args.k} --levels {args.levels}: {args.k ** args.levels:,} leaves is more than "
                          f"{MAX_LEAVES:,}; use fewer levels or a smaller k")
    if args.paths_from:
        key_pattern(args.paths_from)  # before any embedding work
    splits = [s.strip() for s in args.splits.split(",") if s.strip()]
    unknown = [s for s in splits if s not in SPLITS]
    if unknown:
        raise ConfigError(f"--splits {args.splits}: unknown split(s) {unknown}; choose among {', '.join(SPLITS)}")
    if "train" not in splits:
        raise ConfigError(f"--splits {args.splits}: must include train (the tree is fitted on it)")
    shards = {s: (dd.shards(s) if s in dd.manifest["splits"] else []) for s in splits}
    n_train = sum(sh.n_windows for sh in shards["train"])
    if n_train == 0:
        raise DataError(f"{dd.manifest_path}: no train windows to cluster; prepare the data with more documents")
    if n_train < args.k:
        print(f"warning: only {n_train} train windows for k={args.k}; many clusters will be empty", file=sys.stderr)

    # 1. embed ---------------------------------------------------------------------------------
    device = args.device
    all_shards = [sh for s in splits for sh in shards[s]]
    emb = EMB_SENTENCES if args.embed_text == "sentences" else EMB
    if args.embeddings_from and not args.reembed:
        try:
            source = open_data(args.embeddings_from)
        except DataError as e:
            raise DataError(f"--embeddings-from {args.embeddings_from}: {e}") from None
        if Router.exists(source.path):  # its embeddings were made with its router's settings
            used = Router.load(source.path).meta
            if used.get("max_tokens") != args.max_tokens:
                raise ConfigError(f"--embeddings-from {args.embeddings_from}: embedded with --max-tokens "
                                  f"{used.get('max_tokens')}, not {args.max_tokens}; pass the same --max-tokens")
        n = copy_embeddings(all_shards, source, 384, emb)
        print(f"embeddings: {n} shard(s) copied from {args.embeddings_from}")
        if args.paths_from == "entity":
            n = copy_window_array(all_shards, source, entity_key_array(), has_entity_keys)
            print(f"entity keys: {n} shard(s) copied from {args.embeddings_from}")
    need = args.reembed or not all(has_embeddings(sh, 384, emb) for sh in all_shards)
    if need:
        t0 = time.time()
        encoder = MiniLM(device=device, max_tokens=args.max_tokens, dtype=args.dtype)
        print(f"MiniLM loaded from {encoder.path} in {time.time() - t0:.1f}s (device {device}, {encoder.dtype})")
        embed_windows(all_shards, dd.tokenizer(), encoder, args.batch_size, args.reembed, emb=emb)
    else:
        print("embeddings: all shards cached")

    # 2. fit -----------------------------------------------------------------------------------
    settings = {"k": args.k, "levels": args.levels, "seed": args.seed, "max_fit": args.max_fit,
                "max_tokens": args.max_tokens,
                "max_share": args.max_share, "niter": args.niter, "n_train_windows": n_train,
                "paths_from": args.paths_from, "embed_text": args.embed_text}
    router, keyed = None, None
    if args.paths_from:
        router, keyed = keyed_router(args.paths_from, shards["train"], all_shards, dd.tokenizer(), args.k,
                                     args.levels, emb, recompute=args.reembed)
        router.meta.update(settings=settings, max_tokens=args.max_tokens, embed_text=args.embed_text)
        router.save(dd.path)
        print(f"router: {router.meta['n_keys']:,} keys from --paths-from {args.paths_from} spread over "
              f"{args.k ** args.levels} leaves -> {dd.path}/router.safetensors")
    elif Router.exists(dd.path) and not args.refit and not args.reembed:
        old = Router.load(dd.path)
        if old.meta.get("settings") == settings:
            router = old
            print(f"router: reusing {dd.path}/router.json (same settings; --refit to redo)")
        else:
            print(f"router: settings changed ({old.meta.get('settings')} -> {settings}); refitting")
    if router is None:
        x = np.concatenate([np.asarray(sh.array(emb)) for sh in shards["train"]])
        if args.max_fit is not None and len(x) > args.max_fit:
            idx = np.sort(np.random.default_rng(args.seed).choice(len(x), args.max_fit, replace=False))
            x = x[idx]
        t0 = time.time()
        router = Router.fit(x, k=args.k, levels=args.levels, seed=args.seed, niter=args.niter,
                            max_share=args.max_share, progress=True)
        router.meta["settings"] = settings
        router.meta["max_tokens"] = args.max_tokens  # Router.route truncates prompts the same way
        router.meta["embed_text"] = args.embed_text
        router.save(dd.path)
        per_level = ", ".join(f"L{s['level']} max share {s['max_share']:.3f}" for s in router.meta["fit"])
        print(f"router: fitted {args.levels} levels x k={args.k} on {len(x):,} windows in "
              f"{time.time() - t0:.1f}s ({per_level}) -> {dd.path}/router.safetensors")

    # 3. assign --------------------------------------------------------------------------------
    t0, n = time.time(), 0
    counts = np.zeros(args.k ** args.levels, dtype=np.int64)
    for s in splits:
        for sh in shards[s]:
            paths = keyed[id(sh)] if keyed is not None else router.assign(np.asarray(sh.array(emb)))
            sh.write_array("paths", paths.astype(np.int32))
            n += len(paths)
            if s == "train":
                leaf = np.zeros(len(paths), dtype=np.int64)
                for l in range(args.levels):
                    leaf = leaf * args.k + paths[:, l]
                counts += np.bincount(leaf, minlength=counts.size)
    dd.update_manifest(n_levels=args.levels, router={"k": args.k, "levels": args.levels, "file": "router.json"})
    used = counts[counts > 0]
    print(f"assigned {n:,} windows in {time.time() - t0:.2f}s; train leaves used {used.size}/{counts.size} "
          f"(windows per used leaf: median {int(np.median(used)) if used.size else 0}, max {int(counts.max())})")
    return 0


if __name__ == "__main__":
    from train.cli import run_command

    sys.exit(run_command("memlm cluster", main))
