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
"""
from __future__ import annotations

import argparse
import sys
import time

import numpy as np

from memory.embed import EMB, MAX_TOKENS, embed_windows, has_embeddings, window_texts  # noqa: F401 (window_texts: re-export)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="memlm cluster", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("data", help="data dir written by `memlm prepare`")
    p.add_argument("--levels", type=int, default=3, help="depth of the cluster tree (= number of memory levels)")
    p.add_argument("--k", type=int, default=16, help="branching factor (children per node)")
    p.add_argument("--seed", type=int, default=0, help="seed of k-means and of the --max-fit sample")
    p.add_argument("--batch-size", type=int, default=None,
                   help="at most N texts per MiniLM forward pass (default 64 on CPU, 512 on GPU; windows are "
                        "sorted by length first, so a batch pads little)")
    p.add_argument("--max-tokens", type=int, default=MAX_TOKENS,
                   help=f"MiniLM reads the first N word pieces of each window (default {MAX_TOKENS}, the "
                        "encoder's limit; embedding cost grows with N, so CPU demos use 64)")
    p.add_argument("--max-fit", type=int, default=None,
                   help="fit the tree on at most N train windows (seeded sample; default: all)")
    p.add_argument("--max-share", type=float, default=None,
                   help="balancing bound: max fraction of a parent's points in one child (default 1.5/k)")
    p.add_argument("--niter", type=int, default=20, help="k-means iterations per node")
    p.add_argument("--splits", default="train,val", help="comma-separated splits to embed and assign")
    p.add_argument("--device", default=None, help="device for MiniLM (default: cuda if available, else cpu)")
    p.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"],
                   help="MiniLM precision (default float16 on GPU, float32 on CPU)")
    p.add_argument("--refit", action="store_true", help="fit a new tree even if DATA/router.* matches the settings")
    p.add_argument("--reembed", action="store_true", help="recompute cached embeddings")
    return p


def _die(data: str, problem: str):
    raise SystemExit(f"memlm cluster: {data}: {problem}")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.levels < 1:
        _die(args.data, f"--levels must be >= 1, got {args.levels}")
    if args.k < 2:
        _die(args.data, f"--k must be >= 2, got {args.k}")
    from data.shards import open_data
    from memory.embed import MiniLM
    from memory.router import Router

    try:
        dd = open_data(args.data)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"memlm cluster: {e}")
    splits = [s.strip() for s in args.splits.split(",") if s.strip()]
    if "train" not in splits:
        _die(args.data, "--splits must include train (the tree is fitted on it)")
    shards = {s: (dd.shards(s) if s in dd.manifest["splits"] else []) for s in splits}
    n_train = sum(sh.n_windows for sh in shards["train"])
    if n_train == 0:
        _die(dd.manifest_path, "no train windows to cluster")
    if n_train < args.k:
        print(f"warning: only {n_train} train windows for k={args.k}; many clusters will be empty", file=sys.stderr)

    # 1. embed ---------------------------------------------------------------------------------
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    all_shards = [sh for s in splits for sh in shards[s]]
    need = args.reembed or not all(has_embeddings(sh, 384) for sh in all_shards)
    if need:
        t0 = time.time()
        encoder = MiniLM(device=device, max_tokens=args.max_tokens, dtype=args.dtype)
        print(f"MiniLM loaded from {encoder.path} in {time.time() - t0:.1f}s (device {device}, {encoder.dtype})")
        embed_windows(all_shards, dd.tokenizer(), encoder, args.batch_size, args.reembed)
    else:
        print("embeddings: all shards cached")

    # 2. fit -----------------------------------------------------------------------------------
    settings = {"k": args.k, "levels": args.levels, "seed": args.seed, "max_fit": args.max_fit,
                "max_tokens": args.max_tokens,
                "max_share": args.max_share, "niter": args.niter, "n_train_windows": n_train}
    router = None
    if Router.exists(dd.path) and not args.refit and not args.reembed:
        old = Router.load(dd.path)
        if old.meta.get("settings") == settings:
            router = old
            print(f"router: reusing {dd.path}/router.json (same settings; --refit to redo)")
        else:
            print(f"router: settings changed ({old.meta.get('settings')} -> {settings}); refitting")
    if router is None:
        x = np.concatenate([np.asarray(sh.array(EMB)) for sh in shards["train"]])
        if args.max_fit is not None and len(x) > args.max_fit:
            idx = np.sort(np.random.default_rng(args.seed).choice(len(x), args.max_fit, replace=False))
            x = x[idx]
        t0 = time.time()
        router = Router.fit(x, k=args.k, levels=args.levels, seed=args.seed, niter=args.niter,
                            max_share=args.max_share, progress=True)
        router.meta["settings"] = settings
        router.meta["max_tokens"] = args.max_tokens  # Router.route truncates prompts the same way
        router.save(dd.path)
        per_level = ", ".join(f"L{s['level']} max share {s['max_share']:.3f}" for s in router.meta["fit"])
        print(f"router: fitted {args.levels} levels x k={args.k} on {len(x):,} windows in "
              f"{time.time() - t0:.1f}s ({per_level}) -> {dd.path}/router.safetensors")

    # 3. assign --------------------------------------------------------------------------------
    t0, n = time.time(), 0
    counts = np.zeros(args.k ** args.levels, dtype=np.int64)
    for s in splits:
        for sh in shards[s]:
            paths = router.assign(np.asarray(sh.array(EMB)))
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
    sys.exit(main())
