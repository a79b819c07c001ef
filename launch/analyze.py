"""`olmoe analyze WHICH --workdir W [--out DIR] [--step N] [--data labelled.jsonl]`: the
routing analyses of the OLMoE paper (section 5) on a checkpoint.

WHICH: saturation, coactivation, domain, vocab or all (comma-separated). Each writes
`<out>/<name>.json` and `<name>.png` (default out: W/analysis). Text: the built-in corpus's
validation split (four domains) or --data, a JSONL file of {"text": ..., "domain": ...}.
"""
from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("which", help="saturation, coactivation, domain, vocab, or all (comma-separated)")
    parser.add_argument("--workdir", "-w", required=True, help="a run or import folder with config.json")
    parser.add_argument("--out", default=None, help="folder for the JSON and PNG files (default: W/analysis)")
    parser.add_argument("--step", type=int, default=None, help="checkpoint to analyse (default: the newest)")
    parser.add_argument("--data", default=None, help="labelled JSONL text (default: the built-in corpus)")
    parser.add_argument("--tokens-per-domain", type=int, default=16384)
    parser.add_argument("--seq-len", type=int, default=0, help="tokens per row (default: data.seq_len)")
    parser.add_argument("--min-count", type=int, default=8,
                        help="vocab: token ids seen fewer times are left out")


def run(args) -> int:
    from launch.cli import UsageError  # pylint: disable=import-outside-toplevel
    from olmoe_jax.analysis.run import ANALYSES, analyze  # pylint: disable=import-outside-toplevel

    which = list(ANALYSES) if args.which == "all" else [w.strip() for w in args.which.split(",") if w.strip()]
    bad = [w for w in which if w not in ANALYSES]
    if bad or not which:
        raise UsageError(f"analysis {bad[0] if bad else args.which!r}: choose from {', '.join(ANALYSES)} or all")
    if args.tokens_per_domain < 1 or args.seq_len < 0 or args.min_count < 1:
        raise UsageError("--tokens-per-domain and --min-count must be positive, --seq-len >= 0")
    out = args.out or f"{args.workdir}/analysis"
    results = analyze(args.workdir, which, out, step=args.step, data_path=args.data,
                      tokens_per_domain=args.tokens_per_domain, seq_len=args.seq_len, min_count=args.min_count)
    for name, res in results.items():
        print(f"{name}: {out}/{name}.json, {out}/{name}.png")
        if name == "saturation":
            first = res["steps"][0]
            print("  per layer at step", first, ":", " ".join(f"{v:.3f}" for v in res["saturation"][str(first)]))
        elif name == "domain":
            for label, m in res["max_share"].items():
                print(f"  {label:<12} max expert share per layer {' '.join(f'{v:.3f}' for v in m)} "
                      f"(uniform {res['uniform']:.3f})")
        elif name == "vocab":
            for kind in ("input", "predicted"):
                print(f"  {kind:<10} top-expert share per layer "
                      f"{' '.join(f'{v:.3f}' for v in res[kind]['mean_share'])} (uniform {res['uniform']:.3f})")
    return 0
