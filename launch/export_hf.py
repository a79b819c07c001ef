"""`olmoe export-hf --workdir W --out DIR [--step N] [--dtype bfloat16]`: checkpoint -> HF folder.

MoE models become OlmoeForCausalLM in the released checkpoint's per-expert layout; dense models
become LlamaForCausalLM or OlmoForCausalLM where one computes exactly the same function, and are
refused with the reason otherwise (olmoe_jax/interop/hf_config.py). The tokenizer files are
written beside the weights (olmoe_jax/interop/hf_tokenizer.py) when the workdir has one; an export
never trains a tokenizer: without one it writes the weights and configs and says so.
"""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--workdir", required=True, help="workdir with config.json and checkpoints")
    parser.add_argument("--out", required=True, help="new (or empty) folder for the HF model")
    parser.add_argument(
        "--step", type=int, default=None, help="checkpoint step (default: the newest)"
    )
    parser.add_argument(
        "--dtype",
        choices=("float32", "bfloat16"),
        default="float32",
        help="weight dtype in the safetensors files",
    )
    parser.add_argument(
        "--shard-size-mb",
        type=int,
        default=5 * 1024,
        help="largest safetensors shard, in MiB (default 5 GiB, as HF writes)",
    )


def export_tokenizer(cfg):
    """(tokenizer or None, note or None) for the export: never trains one. A config naming the
    built-in SentencePiece tokenizer that is not cached (e.g. an import-hf of a folder without
    tokenizer files, which left data.tokenizer as configured) exports without one."""
    # pylint: disable=import-outside-toplevel
    import os

    from olmoe_jax.data.tokenizers import builtin_sentencepiece_path, make_tokenizer

    d = cfg.data
    if d.tokenizer == "none":
        return None, "no tokenizer files written: data.tokenizer=none (the model was trained on token ids)"
    if d.tokenizer == "sentencepiece" and not d.tokenizer_path:
        cached = builtin_sentencepiece_path(cfg.model.vocab_size, d.data_dir)
        if not os.path.isfile(cached):
            return None, ("no tokenizer files written: the config names the built-in SentencePiece "
                          f"tokenizer, which is not at {cached} and is not trained by an export; "
                          "add tokenizer files to the folder yourself")
    return make_tokenizer(cfg), None


def run(args) -> int:
    # pylint: disable=import-outside-toplevel
    from olmoe_jax.interop.hf_config import hf_model_type
    from olmoe_jax.interop.hf_export import check_out_dir, export_hf
    from olmoe_jax.interop.hf_tokenizer import write_tokenizer_files
    from olmoe_jax.train.checkpoint import load_config, load_params_and_step

    cfg = load_config(args.workdir)
    kind = hf_model_type(cfg)  # refuse an inexpressible model before reading any weight
    check_out_dir(args.out)
    tok, note = export_tokenizer(cfg)
    eos = tok.eos_id if tok is not None else (cfg.data.eos_id if cfg.data.eos_id >= 0 else None)
    pad = tok.pad_id if tok is not None else None
    step, params = load_params_and_step(args.workdir, args.step)
    files = export_hf(
        params,
        cfg,
        args.out,
        dtype=args.dtype,
        eos_id=eos,
        pad_id=pad,
        shard_bytes=args.shard_size_mb * 2**20,
        write_tokenizer=None if tok is None else (lambda d: write_tokenizer_files(cfg, tok, d)),
    )
    print(f"wrote {kind} ({args.dtype}) of step {step} to {args.out}: {', '.join(files)}")
    if note:
        print(note)
    return 0
