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
  key_field  mode=oracle: the task document's field holding the key, e.g. the wiki title (default title).
             A document whose key is not a document id of `data` (e.g. a held-out article) has no oracle leaf:
             it is scored with leaf 0 and listed in `no_oracle` ({task: [document ids]}); none with a leaf is
             a ConfigError naming key_field
  route_top  mode=fetched, M > 1: of each context's M nearest leaves, the one whose memory gives the context
             itself the lowest loss (as `memlm eval --route-top`; M forwards per distinct context)
  device     cpu / cuda (default: cuda if available);  batch_size  rows per forward (default 16)

As lm-eval's HF model: an empty context is the end-of-document token, an empty continuation scores
(0.0, greedy). Greedy generation never emits <CALL> and stops at the end-of-document token or an `until`
string. A task lm-eval cannot build (e.g. an empty "" choice in its first document) is named in one line.
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
            from train.evaluation.memory_eval import check_route_top
            from train.evaluation.routing import prompt_router

            if self.route_top > 1:
                check_route_top(self.route_top, self.router)  # before lm-eval builds its requests

            self._route = prompt_router(self.router)
        if mode == "oracle":
            if not data:
                raise ConfigError("--mode oracle needs --data DATA (the run's data dir)")
            from data.shards import open_data
            from train.build import check_same_router, check_same_tokenizer
            from train.evaluation.routing import key_leaves

            check_same_router(self.router, data, run)  # the data's leaves must be the ones the run trained on
            dd = open_data(data)
            check_same_tokenizer(self.tok, dd, f"the run {run}")
            self._oracle = key_leaves(dd, lambda doc_id: doc_id)
        self.data = data
        self.no_oracle: dict[str, list] = {}  # mode oracle: per task, the documents whose key has no leaf

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
            missing = [r for r, key in zip(requests, keys) if key not in self._oracle]
            if requests and len(missing) == len(requests):
                example = next(iter(self._oracle), None)
                raise ConfigError(f"--key-field {self.key_field}: no document of the task(s) has a key among the "
                                  f"document ids of --data {self.data} (e.g. {keys[0]!r}, while the data has "
                                  f"{example!r}), so none has an oracle leaf; give the field that names the training "
                                  "document, the run's data, or a task of documents seen in training")
            for r in missing:  # scored with leaf 0, counted and recorded (memlm harness reports them)
                got = self.no_oracle.setdefault(getattr(r, "task_name", None) or "?", [])
                doc_key = str((r.doc or {}).get("id", r.doc_id))
                if doc_key not in got:
                    got.append(doc_key)
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
        todo = [i for i, (_, cont) in enumerate(pairs) if cont]  # an empty continuation: log P = 0, greedy (as HFLM)
        for s in range(0, len(todo), self.batch_size_):
            chunk = todo[s:s + self.batch_size_]
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
        """Summed log-probability of each text, in lm-eval's own windows (as its HF model): the first window
        predicts up to max_seq_len tokens after the end-of-document token, each later one the next tokens
        with the full context left of them (lm_eval.utils.get_rolling_token_windows + make_disjoint_window)."""
        from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

        texts = [r.args[0] for r in requests]
        paths = self._paths(requests, texts)
        out = []
        for i, t in enumerate(texts):
            windows = [make_disjoint_window(w) for w in get_rolling_token_windows(
                token_list=self.tok.encode(t, add_special_tokens=False), prefix_token=self.tok.eos_token_id,
                max_seq_len=self.max_len, context_len=1)]
            rows = None if paths is None else np.repeat(paths[i:i + 1], len(windows), axis=0)
            out.append(sum(ll for ll, _ in self._score(windows, rows)))
        return out

    def generate_until(self, requests) -> list[str]:
        """Greedy continuations, ended by the end-of-document token, any of the request's `until` strings
        (cut off, as lm-eval's HF model does) or max_gen_toks (default 32)."""
        ctx = [r.args[0] for r in requests]
        paths = self._paths(requests, ctx)
        out = []
        for i, r in enumerate(requests):
            kw = r.args[1] if len(r.args) > 1 else {}
            until = kw.get("until") or []
            until = [u for u in ([until] if isinstance(until, str) else until) if u]
            # an empty context starts after the end-of-document token, as every training document does
            ids = (self.tok.encode(ctx[i], add_special_tokens=False) or [self.tok.eos_token_id])[-self.max_len // 2:]
            n_new = min(int(kw.get("max_gen_toks", 32)), self.max_len - len(ids))
            new = self._greedy(ids, n_new, None if paths is None else paths[i:i + 1], until)
            text = self.tok.decode(new, skip_special_tokens=True)
            for u in until:
                text = text.split(u)[0]
            out.append(text)
        return out

    @torch.no_grad()
    def _greedy(self, ids: list[int], n_new: int, path, until: list[str]) -> list[int]:
        """Up to n_new greedy tokens after `ids` (KV cache). <CALL> is never chosen: there is no large model
        to hand it to (a LaCy SLM would emit it again and again; the cascade's SLM-alone mode suppresses it
        too). Stops before the end-of-document token (or pad), and once the text holds an `until` string."""
        from data.tokenizer import CALL, stop_ids
        from model.model import KVCache

        banned = [t for t in [self.tok.get_vocab().get(CALL)] if t is not None]
        stops = stop_ids(self.tok) | {self.tok.eos_token_id}
        memory = None
        if self.is_mem:
            mode = "fetched" if self.mode in ("fetched", "oracle") else self.mode
            mp = None if path is None else torch.as_tensor(path, dtype=torch.long, device=self.device_)
            memory = self.model.memory(mp, mode, batch_size=1, device=self.device_)
        anchor = self.model.anchor if self.is_mem else self.model
        p = next(anchor.parameters())
        cache = KVCache(anchor.config, 1, len(ids) + n_new, device=p.device, dtype=p.dtype)
        x, pos, new = torch.tensor([ids], device=self.device_), 0, []
        for _ in range(n_new):
            logits = anchor(x, memory=memory, kv_cache=cache, start_pos=pos)[0, -1].float()
            logits[banned] = float("-inf")
            nxt = int(logits.argmax())
            if nxt in stops:
                break
            new.append(nxt)
            if until and any(u in self.tok.decode(new, skip_special_tokens=True) for u in until):
                break
            pos += x.shape[1]
            x = torch.tensor([[nxt]], device=self.device_)
        return new


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
    loaded = [obj for t in tasks for obj in _load_task(tm, t)]  # before the run loads
    lm = MemlmLM(run, mode=mode, data=data, key_field=key_field, device=device, batch_size=batch_size,
                 route_top=route_top)
    res = lm_eval.simple_evaluate(model=lm, tasks=loaded, task_manager=tm, limit=limit, log_samples=True,
                                  bootstrap_iters=0)
    res["memlm_no_oracle"] = lm.no_oracle  # mode oracle: {task: [documents without an oracle leaf]}
    return res


def _load_task(tm, task: str) -> list:
    """lm-eval's Task (or Group) objects of one task name. A task lm-eval itself cannot build is named in
    one line: e.g. its data file is missing, or a multiple-choice document has an empty "" choice
    (lm-eval's task check indexes choice[0] and raises IndexError)."""
    import traceback

    try:
        d = tm.load(task)
    except Exception as e:  # noqa: BLE001 - lm-eval's own failure, with the task named
        where = traceback.extract_tb(e.__traceback__)[-1]
        hint = (" (lm-eval fails so on an empty \"\" choice in the task's first document)"
                if isinstance(e, IndexError) else "")
        raise ConfigError(f"--tasks {task}: lm-eval cannot load this task: {type(e).__name__}: {e} "
                          f"(in {os.path.basename(where.filename)}:{where.lineno}); check its YAML and data file"
                          + hint) from e
    return [d["groups"][task]] if task in d["groups"] else list(d["tasks"].values())
