"""`memlm eval RUN --data DATA`: validation loss / perplexity and bios probe accuracy per memory mode.

Modes (a memory run): **fetched** (each row gets the blocks of its cluster path), **generic** (every
row gets the generic block: the paper's control for every fetched number) and **anchor** (no memory).
A plain anchor run has the mode "anchor" only.

- Validation: the val split packed into rows of one cluster leaf each (the windows' stored paths, as in
  training); loss = mean cross-entropy over every target token, ppl = exp(loss); also per top-level
  cluster (the first node of the row's path). --val-batches N evaluates the first N batches of a
  seeded shuffle of the rows (default: all of them).
- Probes (bios data, DATA/bios/probes.jsonl): up to --probes-per-bucket probes per frequency bucket
  (bucket_0 = rarest answers in training), sampled with --seed. The prompt is routed through the run's
  router (MiniLM + greedy descent, as at inference), the model continues it greedily, and a probe is
  correct iff the continuation starts with the answer (answers begin with a space).

Writes OUT/eval.json (default OUT = RUN/eval):
    {"run", "data", "val": {mode: {"loss", "ppl", "tokens"}},
     "per_cluster": {mode: {"<top-level id>": {"loss", "ppl", "tokens"}}},
     "probes": {mode: {"bucket_<b>": {"acc", "n"}}}}          (buckets without probes are left out)
and OUT/eval.png (bar charts, train.experiments.report.plot_memory_eval), and prints a table.
"""
from __future__ import annotations

import json
import math
import os
import random
import sys

import numpy as np
import torch
import torch.nn.functional as F

ALL_MODES = ("fetched", "generic", "anchor")
IGNORE = -100


def _die(where: str, problem: str):
    raise SystemExit(f"memlm eval: {where}: {problem}")


def _stats(nats: float, n: int) -> dict:
    loss = nats / max(n, 1)
    return {"loss": loss, "ppl": math.exp(min(loss, 700.0)), "tokens": int(n)}


def _logits(model, batch, mode, device):
    ids = batch["input_ids"].to(device)
    doc_lens = batch["doc_lens"].to(device)
    return model(ids, doc_lens=doc_lens, mem_path=batch["mem_path"].to(device), mode=mode)


@torch.no_grad()
def eval_val(model, data, modes, seq_len, batch_size, seed, max_batches, by_leaf, device) -> tuple[dict, dict]:
    """(val, per_cluster): summed nats / target counts per mode, overall and per top-level cluster."""
    from tqdm import tqdm

    from data.loader import PackedDataset

    try:
        ds = PackedDataset(data, "val", seq_len=seq_len, batch_size=batch_size, seed=seed, by_leaf=by_leaf,
                           shuffle=True, infinite=False)
    except ValueError as e:
        _die(data.path, f"{e} (try a smaller --batch-size or --seq-len)")
    n_batches = len(ds) if max_batches is None else min(max_batches, len(ds))
    tot = {m: [0.0, 0] for m in modes}
    per = {m: {} for m in modes}
    it = iter(ds)
    for _ in tqdm(range(n_batches), desc="val", unit="batch", file=sys.stderr, dynamic_ncols=True):
        batch = next(it)
        labels = batch["labels"].to(device)
        mask = labels != IGNORE
        top = batch["mem_path"][:, 0].tolist() if batch["mem_path"].shape[1] else None
        for m in modes:
            logits = _logits(model, batch, m, device)
            nll = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE,
                                  reduction="none").view(labels.shape)
            row_nats = (nll * mask).sum(1).double().tolist()
            row_n = mask.sum(1).tolist()
            tot[m][0] += sum(row_nats)
            tot[m][1] += sum(row_n)
            if top is not None:
                for c, a, b in zip(top, row_nats, row_n):
                    acc = per[m].setdefault(str(c), [0.0, 0])
                    acc[0] += a
                    acc[1] += b
    val = {m: _stats(*tot[m]) for m in modes}
    per_cluster = {m: {c: _stats(*per[m][c]) for c in sorted(per[m], key=int)} for m in modes}
    return val, per_cluster


def sample_probes(path: str, per_bucket: int, seed: int) -> list[dict]:
    from data.bios import load_probes

    probes = load_probes(path)
    by_bucket: dict[int, list[dict]] = {}
    for p in probes:
        by_bucket.setdefault(int(p["bucket"]), []).append(p)
    rng = random.Random(seed)
    out = []
    for b in sorted(by_bucket):
        items = by_bucket[b]
        out += items if len(items) <= per_bucket else rng.sample(items, per_bucket)
    return out


@torch.no_grad()
def eval_probes(model, tokenizer, probes, modes, paths, device, batch_size: int = 64) -> dict:
    """{mode: {"bucket_b": {"acc", "n"}}}: greedy continuation starts with the answer."""
    from data.tokenizer import encode_text

    enc = [encode_text(tokenizer, p["prompt"], "probe prompt") for p in probes]
    n_new = [len(encode_text(tokenizer, p["answer"], "probe answer")) + 1 for p in probes]
    groups: dict[int, list[int]] = {}  # Anchor.generate wants rows of equal length: group by prompt length
    for i, ids in enumerate(enc):
        groups.setdefault(len(ids), []).append(i)
    correct = {m: [False] * len(probes) for m in modes}
    is_mem = model.has_memory
    for m in modes:
        for idx_all in groups.values():
            for s in range(0, len(idx_all), batch_size):
                idx = idx_all[s:s + batch_size]
                ids = torch.tensor([enc[i] for i in idx], dtype=torch.long, device=device)
                new = max(n_new[i] for i in idx)
                if is_mem:
                    mp = torch.as_tensor(paths[idx], dtype=torch.long) if m == "fetched" else None
                    out = model.generate(ids, new, mem_path=mp, mode=m)
                else:
                    out = model.generate(ids, new)
                for j, i in enumerate(idx):
                    text = tokenizer.decode(out[j, ids.shape[1]:].tolist(), skip_special_tokens=False,
                                            clean_up_tokenization_spaces=False)
                    correct[m][i] = text.startswith(probes[i]["answer"])
    res = {}
    for m in modes:
        acc: dict[int, list[int]] = {}
        for p, c in zip(probes, correct[m]):
            a = acc.setdefault(int(p["bucket"]), [0, 0])
            a[0] += int(c)
            a[1] += 1
        res[m] = {f"bucket_{b}": {"acc": a[0] / a[1], "n": a[1]} for b, a in sorted(acc.items())}
    return res


def cluster_table(ev: dict) -> str:
    modes = [m for m in ALL_MODES if m in ev["per_cluster"] and ev["per_cluster"][m]]
    if not modes:
        return ""
    ids = sorted({c for m in modes for c in ev["per_cluster"][m]}, key=int)
    lines = ["| top-level cluster | tokens | " + " | ".join(f"{m} loss" for m in modes) + " |",
             "|" + "---|" * (2 + len(modes))]
    for c in ids:
        cells = [ev["per_cluster"][m].get(c) for m in modes]
        n = next(x["tokens"] for x in cells if x is not None)
        lines.append(f"| {c} | {n:,} | " + " | ".join("—" if x is None else f"{x['loss']:.4f}" for x in cells) + " |")
    return "\n".join(lines)


def person_leaves(data) -> dict[int, set[tuple]]:
    """Bios person id -> the cluster paths (leaves) of that person's training windows."""
    from data.bios import person_of

    leaves: dict[int, set[tuple]] = {}
    for sh in data.shards("train"):
        paths = np.asarray(sh.paths)
        for i, doc in enumerate(sh.docs):
            person = person_of(doc["doc_id"])
            if person is not None:
                leaves.setdefault(person, set()).add(tuple(paths[i].tolist()))
    return leaves


def probe_routing(probes: list[dict], routed, leaves: dict[int, set[tuple]]) -> dict:
    """Per bucket: the share of probes whose prompt is routed to a leaf holding at least one training
    window of the probe's person. Fetched memory can only help a probe routed to such a leaf."""
    hits: dict[str, list[bool]] = {}
    for p, path in zip(probes, routed):
        hit = tuple(np.asarray(path).tolist()) in leaves.get(p["person"], ())
        hits.setdefault(f"bucket_{p['bucket']}", []).append(hit)
    return {b: {"share": sum(h) / len(h), "n": len(h)} for b, h in sorted(hits.items())}


def write_json(path: str, obj) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)
