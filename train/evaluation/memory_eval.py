"""The measurements behind `memlm eval` and `memlm harness` (train/commands/eval.py, harness.py).

Per memory mode ("fetched": the blocks of the row's or prompt's cluster path; "generic": the generic
block, the paper's control for every fetched number, arXiv 2510.02375; "anchor": no memory):

- `eval_val`: validation loss over the val split packed into rows of one cluster leaf each (the
  windows' stored paths, as in training); loss = mean cross-entropy in nats over every target token,
  ppl = exp(loss); per top-level cluster too; each row's summed loss kept for paired differences.
- `probe_correct`: greedy bios probes, correct iff the continuation starts with the answer.
- `prompt_nll` / `loss_routed_paths`: a prompt's loss under given leaves; of a router's M nearest
  leaves, the one whose memory gives the prompt the lowest loss (`--route-top M`).
- `probe_summary`, `probe_diffs`, `val_diffs`: accuracies and differences with 95% bootstrap intervals
  (train.evaluation.stats), paired over the same probes or rows.

The command modules own the flags, the output directory and the report.
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

from data.tokenizer import encode_text
from model.errors import ConfigError

ALL_MODES = ("fetched", "generic", "anchor")
IGNORE = -100


def _stats(nats: float, n: int) -> dict:
    loss = nats / max(n, 1)
    return {"loss": loss, "ppl": math.exp(min(loss, 700.0)), "tokens": int(n)}


def _logits(model, batch, mode, device):
    ids = batch["input_ids"].to(device)
    doc_lens = batch["doc_lens"].to(device)
    return model(ids, doc_lens=doc_lens, mem_path=batch["mem_path"].to(device), mode=mode)


@torch.no_grad()
def eval_val(model, data, modes, seq_len, batch_size, seed, max_batches, by_leaf,
             device) -> tuple[dict, dict, dict, dict]:
    """(val, per_cluster, diffs, rows): loss per mode, overall and per top-level cluster, the paired
    differences between modes on the same rows (`val_diffs`), and per mode the rows' summed nats and
    target-token counts {"nats": [...], "tokens": [...]} (rows are the same for every run evaluated on
    the same data, seq_len, batch_size and seed, so other runs can be paired with them)."""
    from tqdm import tqdm

    from data.loader import PackedDataset

    try:
        ds = PackedDataset(data, "val", seq_len=seq_len, batch_size=batch_size, seed=seed, by_leaf=by_leaf,
                           shuffle=True, infinite=False)
    except ConfigError as e:
        raise ConfigError(f"{e} (try a smaller --batch-size or --seq-len)") from None
    n_batches = len(ds) if max_batches is None else min(max_batches, len(ds))
    tot = {m: [0.0, 0] for m in modes}
    per = {m: {} for m in modes}
    rows = {m: ([], []) for m in modes}  # per-row nats and token counts (paired intervals between modes)
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
            rows[m][0].extend(row_nats)
            rows[m][1].extend(row_n)
            if top is not None:
                for c, a, b in zip(top, row_nats, row_n):
                    acc = per[m].setdefault(str(c), [0.0, 0])
                    acc[0] += a
                    acc[1] += b
    val = {m: _stats(*tot[m]) for m in modes}
    per_cluster = {m: {c: _stats(*per[m][c]) for c in sorted(per[m], key=int)} for m in modes}
    row_out = {m: {"nats": rows[m][0], "tokens": rows[m][1]} for m in modes}
    return val, per_cluster, val_diffs(rows, seed), row_out


def split_targets(data, split: str = "val") -> int:
    """Target tokens of a split: every token of a window but its first (each window's tokens predict the next
    one inside it). The denominator of `memlm eval`'s coverage line: packed rows score only part of it."""
    return int(sum(len(sh.tokens) - (len(sh.windows) - 1) for sh in data.shards(split)))


def val_diffs(rows: dict, seed: int = 0) -> dict:
    """{"a - b": {"diff", "lo", "hi"}}: validation loss differences between modes on the same rows
    (paired bootstrap over rows of sum(nats) / sum(tokens))."""
    from train.evaluation.stats import paired_ratio_diff_ci

    out = {}
    for a, b in (("fetched", "generic"), ("fetched", "anchor"), ("generic", "anchor")):
        if a in rows and b in rows and rows[a][0]:
            g = np.arange(len(rows[a][0]))
            ci = paired_ratio_diff_ci(rows[a][0], rows[a][1], rows[b][0], rows[b][1], g, seed=seed)
            out[f"{a} - {b}"] = {"diff": ci.point, "lo": ci.lo, "hi": ci.hi}
    return out


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
def probe_correct(model, tokenizer, probes, mode: str, paths, device, batch_size: int = 64) -> np.ndarray:
    """bool [n_probes]: the greedy continuation of each prompt starts with its answer. `paths` [n, levels]
    (the memory path of each probe in mode "fetched"; ignored otherwise)."""
    enc = [encode_text(tokenizer, p["prompt"], "probe prompt") for p in probes]
    n_new = [len(encode_text(tokenizer, p["answer"], "probe answer")) + 1 for p in probes]
    groups: dict[int, list[int]] = {}  # Anchor.generate wants rows of equal length: group by prompt length
    for i, ids in enumerate(enc):
        groups.setdefault(len(ids), []).append(i)
    correct = np.zeros(len(probes), dtype=bool)
    is_mem = model.has_memory
    for idx_all in groups.values():
        for s in range(0, len(idx_all), batch_size):
            idx = idx_all[s:s + batch_size]
            ids = torch.tensor([enc[i] for i in idx], dtype=torch.long, device=device)
            new = max(n_new[i] for i in idx)
            if is_mem:
                mp = torch.as_tensor(np.asarray(paths)[idx], dtype=torch.long) if mode == "fetched" else None
                out = model.generate(ids, new, mem_path=mp, mode=mode)
            else:
                out = model.generate(ids, new)
            for j, i in enumerate(idx):
                text = tokenizer.decode(out[j, ids.shape[1]:].tolist(), skip_special_tokens=False,
                                        clean_up_tokenization_spaces=False)
                correct[i] = text.startswith(probes[i]["answer"])
    return correct


@torch.no_grad()
def prompt_nll(model, tokenizer, prompts: list[str], paths, device, batch_size: int = 64) -> np.ndarray:
    """float [n]: mean next-token NLL (nats) of each prompt's own tokens with its fetched path [n, levels]
    (a prompt longer than the model's max_seq_len: its last max_seq_len tokens, as the model is scored on)."""
    enc = [encode_text(tokenizer, t, "prompt")[-model.config.max_seq_len:] for t in prompts]
    out = np.zeros(len(prompts))
    groups: dict[int, list[int]] = {}
    for i, ids in enumerate(enc):
        groups.setdefault(len(ids), []).append(i)
    for n, idx_all in groups.items():
        for s in range(0, len(idx_all), batch_size):
            idx = idx_all[s:s + batch_size]
            ids = torch.tensor([enc[i] for i in idx], dtype=torch.long, device=device)
            if n < 2:
                continue
            mp = torch.as_tensor(np.asarray(paths)[idx], dtype=torch.long, device=device)
            logits = model(ids, mem_path=mp, mode="fetched")
            nll = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten(), reduction="none")
            out[idx] = nll.view(len(idx), -1).mean(1).double().cpu().numpy()
    return out


def check_route_top(m: int, router) -> None:
    """ConfigError naming --route-top when m exceeds the router's k (the candidates are the k leaves under the
    prompt's parent node); called before any evaluation, and again by loss_routed_paths."""
    if router is not None and m > router.k:
        raise ConfigError(f"--route-top {m}: the run's router has k={router.k} leaves under each node, so at most "
                          f"{router.k} candidates; choose --route-top 1..{router.k}")


def loss_routed_paths(model, tokenizer, router, prompts: list[str], m: int, device) -> np.ndarray:
    """int32 [n, levels]: each prompt routed to whichever of its m nearest leaves (`memory.keyed.top_leaves`)
    gives the prompt itself the lowest loss under that leaf's fetched memory (the memory that recognises the
    prompt's entities). Costs m prompt forwards; the answer is then scored with one fetched block, as for any
    route. Used by `memlm eval --route-top` and `memlm harness --route-top`. ConfigError naming --route-top
    when m exceeds the router's k (the candidates are the k leaves under the prompt's parent node)."""
    from memory.keyed import top_leaves

    check_route_top(m, router)
    cands = top_leaves(router, router.embed(prompts), m)  # [n, m, levels]
    nll = np.stack([prompt_nll(model, tokenizer, prompts, cands[:, j], device) for j in range(m)], 1)
    return cands[np.arange(len(prompts)), nll.argmin(1)].astype(np.int32)


def probe_summary(items: dict[str, np.ndarray], buckets: list[int], seed: int = 0) -> dict:
    """{label: {"bucket_<b>" | "all": {"acc", "lo", "hi", "n"}}}: accuracy with a 95% bootstrap interval."""
    from train.evaluation.stats import bootstrap_ci

    b = np.asarray(buckets)
    out = {}
    for label, c in items.items():
        c = np.asarray(c, dtype=float)
        res = {}
        for name, mask in [(f"bucket_{x}", b == x) for x in sorted(set(b.tolist()))] + [("all", b == b)]:
            ci = bootstrap_ci(c[mask], seed=seed)
            res[name] = {"acc": ci.point, "lo": ci.lo, "hi": ci.hi, "n": int(mask.sum())}
        out[label] = res
    return out


def probe_diffs(items: dict[str, np.ndarray], buckets: list[int], pairs: list[tuple[str, str]],
                seed: int = 0) -> dict:
    """{"a - b": {"bucket_<b>" | "all": {"diff", "lo", "hi", "n"}}}: paired bootstrap over the same probes."""
    from train.evaluation.stats import paired_diff_ci

    b = np.asarray(buckets)
    out = {}
    for x, y in pairs:
        if x not in items or y not in items:
            continue
        res = {}
        for name, mask in [(f"bucket_{v}", b == v) for v in sorted(set(b.tolist()))] + [("all", b == b)]:
            ci = paired_diff_ci(np.asarray(items[x], float)[mask], np.asarray(items[y], float)[mask], seed=seed)
            res[name] = {"diff": ci.point, "lo": ci.lo, "hi": ci.hi, "n": int(mask.sum())}
        out[f"{x} - {y}"] = res
    return out


DIFF_PAIRS = [("fetched", "generic"), ("fetched_oracle", "generic"), ("fetched_oracle", "fetched"),
              ("fetched", "anchor"), ("generic", "anchor")]


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


def write_json(path: str, obj) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)
