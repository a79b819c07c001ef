"""`olmoe generate --workdir W --prompt "..." [--prompt ...]`: continue prompts from a checkpoint.

Uses the workdir's tokenizer (its config's data section), a KV cache, greedy decoding by default
or temperature / top-p sampling, stops each prompt at EOS, and prints the throughput.
"""

from __future__ import annotations

import argparse
import sys

from launch.cli import UsageError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--workdir", required=True, help="workdir with config.json and checkpoints")
    parser.add_argument(
        "--prompt", action="append", required=True, help="a prompt (repeatable: one batch)"
    )
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    parser.add_argument(
        "--top-p", type=float, default=1.0, help="nucleus sampling mass (with --temperature > 0)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--step", type=int, default=None, help="checkpoint step (default: the newest)"
    )


def run(args) -> int:
    from olmoe_jax.data.tokenizers import make_tokenizer  # pylint: disable=import-outside-toplevel
    from olmoe_jax.eval.generate import generate  # pylint: disable=import-outside-toplevel
    from olmoe_jax.train.checkpoint import (
        load_config,
        load_params,
    )  # pylint: disable=import-outside-toplevel

    cfg = load_config(args.workdir)
    if args.max_new_tokens < 1:
        raise UsageError(f"--max-new-tokens {args.max_new_tokens} must be at least 1")
    if args.temperature < 0 or not 0 < args.top_p <= 1:
        raise UsageError("--temperature must be >= 0 and --top-p in (0, 1]")
    tok = make_tokenizer(cfg)
    prompts = [tok.encode(p) for p in args.prompt]
    for text, ids in zip(args.prompt, prompts):
        if not ids:
            raise UsageError(f"--prompt {text!r} encodes to no tokens; give some text")
        if len(ids) + args.max_new_tokens > cfg.model.max_seq_len:
            raise UsageError(
                f"--prompt of {len(ids)} tokens + --max-new-tokens {args.max_new_tokens} exceeds "
                f"model.max_seq_len={cfg.model.max_seq_len}"
            )
    params = load_params(args.workdir, args.step)
    out = generate(
        params,
        cfg,
        prompts,
        max_new_tokens=args.max_new_tokens,
        eos_id=tok.eos_id,
        temperature=args.temperature,
        top_p=args.top_p,
        seed=args.seed,
        pad_id=tok.pad_id,
    )
    for text, ids in zip(args.prompt, out.tokens):
        shown = ids[:-1] if ids and ids[-1] == tok.eos_id else ids
        print(f"--- {text!r}\n{text}{tok.decode(shown)}")
    print(
        f"{out.num_tokens} tokens for {len(prompts)} prompt(s) in "
        f"{out.prefill_s + out.decode_s:.3f} s: {out.tokens_per_s:.1f} tokens/s "
        f"(prefill {out.prefill_s:.3f} s, decode {out.decode_s:.3f} s; "
        "compilation excluded)",
        file=sys.stderr,
    )
    return 0
