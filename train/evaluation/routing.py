"""Routing diagnostics: where a person's (or article's) training windows went, and where prompts go.

- `key_leaves(data, key_of)`: per document key (a bios person, a wiki title), the leaf counts of its
  training windows; the **majority leaf** is the one holding most of them (ties: lowest leaf).
- `oracle_paths`: each probe routed to its key's majority leaf: the best a router can do for a memory
  trained on these leaves ("fetched (oracle)" next to every router-routed number).
- `hit_rates`: per bucket, the share of probes that the router sends to the majority leaf, with 95%
  bootstrap intervals; `consistency`: the average share of a key's windows in its majority leaf.
- `prompt_router(router)`: the routing function for prompts that matches how the windows were
  assigned (entity-keyed trees route by the prompt's first known entity, else by centroids).
"""
from __future__ import annotations

from collections import Counter
from typing import Callable

import numpy as np

from train.evaluation.stats import bootstrap_ci


def key_leaves(data, key_of: Callable[[str], object | None], split: str = "train") -> dict[object, Counter]:
    """{key: Counter(leaf -> windows)} over the split's windows; `key_of(doc_id)` (None: skip)."""
    from memory.keyed import path_to_leaf

    k = int(data.manifest.get("router", {}).get("k", 0)) or None
    out: dict[object, Counter] = {}
    for sh in data.shards(split):
        if sh.paths is None:
            from model.errors import DataError

            raise DataError(f"{data.path}: {split} has no cluster paths; run `memlm cluster {data.path}` first")
        paths = np.asarray(sh.paths)
        leaves = path_to_leaf(paths, k) if k else np.zeros(len(paths), dtype=np.int64)
        for doc, leaf in zip(sh.docs, leaves.tolist()):
            key = key_of(doc["doc_id"])
            if key is not None:
                out.setdefault(key, Counter())[leaf] += 1
    return out


def majority_leaf(counts: Counter) -> int:
    return min(counts.items(), key=lambda kv: (-kv[1], kv[0]))[0]


def consistency(leaves: dict[object, Counter]) -> float:
    """Mean over keys of the share of the key's windows that sit in its majority leaf."""
    shares = [c[majority_leaf(c)] / sum(c.values()) for c in leaves.values() if c]
    return float(np.mean(shares)) if shares else float("nan")


def oracle_paths(keys: list, leaves: dict[object, Counter], k: int, levels: int) -> np.ndarray:
    """int32 paths [n, levels]: each item's key's majority leaf (leaf 0 for a key never seen in train: callers
    count those items and report them, as `memlm harness --mode oracle` does)."""
    from memory.keyed import leaf_to_path

    leaf = [majority_leaf(leaves[key]) if key in leaves else 0 for key in keys]
    return leaf_to_path(np.asarray(leaf, dtype=np.int64), k, levels)


def hit_rates(buckets: list, routed: np.ndarray, oracle: np.ndarray, seed: int = 0) -> dict:
    """{bucket: {"share", "lo", "hi", "n"}} (and "all"): share of items routed to the oracle leaf."""
    hit = np.all(np.asarray(routed) == np.asarray(oracle), axis=1).astype(float)
    out = {}
    groups: dict[str, list[int]] = {}
    for i, b in enumerate(buckets):
        groups.setdefault(f"bucket_{b}", []).append(i)
    groups["all"] = list(range(len(buckets)))
    for name in sorted(groups, key=lambda g: (g == "all", g)):
        ci = bootstrap_ci(hit[groups[name]], seed=seed)
        out[name] = {"share": ci.point, "lo": ci.lo, "hi": ci.hi, "n": len(groups[name])}
    return out


def prompt_router(router, nlp=None) -> Callable[[list[str]], np.ndarray]:
    """The prompt-routing function of a router: entity-keyed trees (`memlm cluster --paths-from entity`)
    look up the prompt's first known named entity, falling back to the centroids; others use centroids."""
    if router.meta.get("paths_from") != "entity":
        return router.route
    from data.entity_keys import entity_keys
    from data.tagging import load_spacy
    from memory.keyed import KeyRouter

    nlp = nlp or load_spacy()  # once: a pipeline takes ~2 s to load
    table = {str(key): int(v) for key, v in router.meta["key_table"].items()}
    return KeyRouter(router, table, lambda texts: entity_keys(texts, nlp)).route


def document_hit_rates(data, router, probes: list[dict], key_field: str = "title", group_field: str = "kind",
                       route=None) -> dict:
    """Hit rates of probes keyed by the document they come from (e.g. wiki facts by article title):
    {"consistency", "hit": {group | "all": {"share", "lo", "hi", "n"}}, "hits": [0/1 per probe]}. The document
    id is the key."""
    leaves = key_leaves(data, lambda doc_id: doc_id)
    orc = oracle_paths([p[key_field] for p in probes], leaves, router.k, router.levels)
    routed = (route or prompt_router(router))([p["prompt"] for p in probes])
    hits = hit_rates([p.get(group_field, "all") for p in probes], routed, orc)
    return {"consistency": consistency(leaves), "hit": {k.removeprefix("bucket_"): v for k, v in hits.items()},
            "hits": np.all(np.asarray(routed) == orc, axis=1).astype(int).tolist()}
