"""lm-evaluation-harness adapter: any harness task on a memlm run, with the memory mode as an argument.

Importing this module registers the model name `memlm` with `lm-eval` (optional extra:
`pip install memlm[eval]`). Requests are routed **per prompt**: each loglikelihood request's context
goes through the run's router (as at inference), so a batch mixes memory paths freely.

    import train.evaluation.harness  # registers "memlm"
    lm_eval.simple_evaluate(model="memlm", model_args="run=runs/memory,mode=fetched", tasks=[...])

or `memlm harness RUN --tasks TASK --include-path DIR --mode fetched`. Model arguments:
  run        run dir or checkpoint step dir (required)
  mode       fetched (routed per prompt) | oracle (fetched, leaf of the document's key) | generic | anchor
  data       data dir of the run (mode=oracle: where the key's training windows went)
  key_field  mode=oracle: the task document's field holding the key, e.g. the wiki title (default title)
  route_top  mode=fetched, M > 1: of each context's M nearest leaves, the one whose memory gives the context
             itself the lowest loss (as `memlm eval --route-top`; M forwards per distinct context)
  device     cpu / cuda (default: cuda if available);  batch_size  rows per forward (default 16)
"""
from __future__ import annotations

import os

import numpy as np
import torch
import torch.nn.functional as F

from model.errors import CheckpointError, ConfigError

MODES = ("fetched", "oracle", "generic", "anchor")

try:
    from lm_eval.api.model import LM
    from lm_eval.api.registry import register_model
except ImportError:  # the optional extra is missing: the module still imports, the command explains
    LM, register_model = object, None


class MemlmLM(LM):
    """A memlm run as an lm-eval `LM` (loglikelihood, loglikelihood_rolling, generate_until)."""

    def __init__(self, run: str, mode: str = "fetched", data: str | None = None, key_field: str = "title",
                 device: str | None = None, batch_size: int | str = 16, route_top: int | str = 0, **_):
        if register_model is not None:
            super().__init__()
        from train.checkpoint import load_run

        if mode not in MODES:
            raise ConfigError(f"--mode {mode!r}: choose among {', '.join(MODES)}")
        self.route_top = int(route_top)
        if self.route_top > 1 and mode != "fetched":
            raise ConfigError(f"--route-top {self.route_top}: routes prompts, so it needs --mode fetched (not {mode})")
        self.device_ = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model, self.tok, self.cfg, self.router = load_run(run)
        self.model = self.model.to(self.device_).eval()
        self.is_mem = self.model.has_memory
        if mode != "anchor" and not self.is_mem:
            raise ConfigError(f"--mode {mode}: {run} has no memory; use --mode anchor")
        if self.tok is None:
            raise CheckpointError(f"{run}: no tokenizer in its checkpoint; copy the tokenizer/ of its data dir into it")
        self.mode, self.key_field, self.batch_size_ = mode, key_field, int(batch_size)
        self.max_len = int(self.cfg.model.max_seq_len)
        self._route = None
        self._oracle = None
        if mode == "fetched":
            from train.evaluation.routing import prompt_router

            self._route = prompt_router(self.router)
        if mode == "oracle":
            if not data:
                raise ConfigError("--mode oracle needs --data DATA (the run's data dir)")
            from data.shards import open_data
            from train.evaluation.routing import key_leaves

            self._oracle = key_leaves(open_data(data), lambda doc_id: doc_id)

    # ---- routing ------------------------------------------------------------------------------
    def _paths(self, requests, contexts: list[str]) -> np.ndarray | None:
        if self.mode == "fetched":
            from train.evaluation.memory_eval import loss_routed_paths

            uniq = list(dict.fromkeys(contexts))  # the choices of one question share its context: route it once
            paths = (loss_routed_paths(self.model, self.tok, self.router, uniq, self.route_top, self.device_)
                     if self.route_top > 1 else self._route(uniq))
            row = {c: i for i, c in enumerate(uniq)}
            return np.asarray(paths)[[row[c] for c in contexts]]
        if self.mode == "oracle":
            from train.evaluation.routing import oracle_paths

            keys = [(r.doc or {}).get(self.key_field) for r in requests]
            return oracle_paths(keys, self._oracle, self.router.k, self.router.levels)
        return None

    def _forward(self, ids: torch.Tensor, paths) -> torch.Tensor:
        if not self.is_mem:
            return self.model(ids)
        mode = "fetched" if self.mode in ("fetched", "oracle") else self.mode
        mp = None if paths is None else torch.as_tensor(paths, dtype=torch.long, device=self.device_)
        return self.model(ids, mem_path=mp, mode=mode)

    # ---- lm-eval API --------------------------------------------------------------------------
    def _score(self, pairs: list[tuple[list[int], list[int]]], paths) -> list[tuple[float, bool]]:
        """Sum of log P(continuation tokens | context tokens) and whether each was the greedy choice."""
        out: list[tuple[float, bool]] = [(0.0, True)] * len(pairs)
        for s in range(0, len(pairs), self.batch_size_):
            chunk = list(range(s, min(s + self.batch_size_, len(pairs))))
            seqs = [(pairs[i][0] + pairs[i][1])[-(self.max_len + 1):] for i in chunk]
            width = max(len(x) for x in seqs) - 1
            ids = torch.zeros(len(chunk), width, dtype=torch.long)
            for j, x in enumerate(seqs):  # right padding: causal attention keeps real positions exact
                ids[j, :len(x) - 1] = torch.tensor(x[:-1])
            with torch.no_grad():
                logp = F.log_softmax(self._forward(ids.to(self.device_), None if paths is None
                                                   else paths[chunk]).float(), -1).cpu()
            for j, i in enumerate(chunk):
                x, n = seqs[j], len(pairs[i][1])
                target = torch.tensor(x[-n:])
                lp = logp[j, len(x) - 1 - n:len(x) - 1]
                out[i] = (float(lp.gather(1, target[:, None]).sum()), bool((lp.argmax(-1) == target).all()))
        return out

    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        ctx = [r.args[0] for r in requests]
        pairs = []
        for c, cont in (r.args for r in requests):
            cids = self.tok.encode(c, add_special_tokens=False) if c else [self.tok.eos_token_id]
            pairs.append((cids, self.tok.encode(cont, add_special_tokens=False)))
        return self._score(pairs, self._paths(requests, ctx))

    def loglikelihood_rolling(self, requests) -> list[float]:
        texts = [r.args[0] for r in requests]
        paths = self._paths(requests, texts)
        out = []
        for i, t in enumerate(texts):
            ids = [self.tok.eos_token_id] + self.tok.encode(t, add_special_tokens=False)
            total = 0.0
            for s in range(1, len(ids), self.max_len):  # disjoint windows, each after the token before it
                ctx = ids[s - 1:s]
                total += self._score([(ctx, ids[s:s + self.max_len])], None if paths is None else paths[i:i + 1])[0][0]
            out.append(total)
        return out

    def generate_until(self, requests) -> list[str]:
        ctx = [r.args[0] for r in requests]
        paths = self._paths(requests, ctx)
        out = []
        for i, r in enumerate(requests):
            kw = r.args[1] if len(r.args) > 1 else {}
            until = kw.get("until") or []
            ids = torch.tensor([self.tok.encode(ctx[i], add_special_tokens=False)[-self.max_len // 2:]])
            n_new = min(int(kw.get("max_gen_toks", 32)), self.max_len - ids.shape[1])
            if self.is_mem:
                mode = "fetched" if self.mode in ("fetched", "oracle") else self.mode
                mp = None if paths is None else torch.as_tensor(paths[i:i + 1], dtype=torch.long)
                gen = self.model.generate(ids.to(self.device_), n_new, mem_path=mp, mode=mode)
            else:
                gen = self.model.generate(ids.to(self.device_), n_new)
            text = self.tok.decode(gen[0, ids.shape[1]:].tolist(), skip_special_tokens=True)
            for u in until:
                text = text.split(u)[0]
            out.append(text)
        return out


if register_model is not None:
    MemlmLM = register_model("memlm")(MemlmLM)


def evaluate(run: str, tasks: list[str], include_path: str | None = None, mode: str = "fetched",
             data: str | None = None, key_field: str = "title", device: str | None = None,
             batch_size: int = 16, limit: int | None = None, route_top: int = 0) -> dict:
    """`lm_eval.simple_evaluate` on a memlm run; returns its results dict (with per-sample logs)."""
    if register_model is None:
        raise ConfigError("memlm harness needs lm-evaluation-harness: pip install 'memlm[eval]' "
                          "(or pip install lm-eval)")
    import lm_eval
    from lm_eval.tasks import TaskManager

    if include_path is not None and not os.path.isdir(include_path):
        raise ConfigError(f"--include-path {include_path}: not a directory of lm-eval task YAML files")
    tm = TaskManager(include_path=include_path) if include_path else TaskManager()
    unknown = [t for t in tasks if t not in tm.all_tasks]
    if unknown or not tasks:
        raise ConfigError(f"--tasks: unknown lm-eval task(s) {unknown or tasks}; list them with `lm-eval ls tasks`"
                          + ("" if include_path else " (local task files: --include-path DIR)"))
    lm = MemlmLM(run, mode=mode, data=data, key_field=key_field, device=device, batch_size=batch_size,
                 route_top=route_top)
    return lm_eval.simple_evaluate(model=lm, tasks=tasks, task_manager=tm, limit=limit, log_samples=True,
                                   bootstrap_iters=0)
