"""The one config schema (ml_collections) and its validation.

`default_config()` holds every key with its default; experiments start from it and change
values. `validate(cfg)` checks types, ranges and cross-field constraints and raises
`ConfigError` naming the key and what to change. Nothing compiles or writes before it passes.
"""
from __future__ import annotations

import ast
import importlib.util
import json
from typing import Any, Sequence

import ml_collections


class ConfigError(ValueError):
    """An invalid configuration; the message names the key and what to change."""


def default_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.name = "unnamed"

    m = c.model = ml_collections.ConfigDict()
    m.vocab_size = 50304
    m.d_model = 2048
    m.num_layers = 16
    m.num_heads = 16
    m.num_kv_heads = 16
    m.head_dim = 0  # 0: d_model // num_heads
    m.max_seq_len = 4096
    m.rope_theta = 10000.0
    m.norm_type = "rmsnorm"  # rmsnorm | layernorm (non-parametric, the paper's ablation)
    m.norm_eps = 1e-5
    m.qk_norm = True
    m.tie_embeddings = False
    m.ffn_type = "moe"  # moe | dense
    m.mlp_dim = 8192  # hidden size of the dense FFN (ffn_type=dense)
    m.num_experts = 64
    m.top_k = 8
    m.expert_dim = 1024  # hidden size of each expert
    m.norm_topk_prob = False
    m.num_shared_experts = 0  # always-on experts of size expert_dim beside the routed ones
    m.moe_every = 1  # n: the last layer of each n is MoE, the others dense FFNs of mlp_dim
    m.moe_shared_layers = False  # one set of experts used by every layer (each layer its own router)
    m.router_type = "token_choice"  # token_choice | expert_choice
    m.capacity_factor = 0.0  # >0: fixed expert capacity (tokens over it are dropped, counted)
    m.moe_impl = "dropless"  # dense | capacity | dropless
    m.moe_backend = "auto"  # dropless grouped matmul: auto | xla | pallas | ragged_dot | megablox | tokamax
    m.attention_impl = "auto"  # auto (TPU: splash, GPU: cudnn in bf16, else xla) | xla | splash | cudnn
    m.lb_loss_type = "olmoe"  # olmoe (megablocks, per layer, 1/k) | hf (transformers' pooled form)
    m.lb_loss_weight = 0.01
    m.z_loss_weight = 0.001
    m.z_loss_type = "layers"  # layers (sum / layers) | layers_tokens_topk (sum / (layers x tokens x top_k))
    m.init = "truncated_normal"  # truncated_normal | normal
    m.init_std = 0.02
    m.init_cutoff = 3.0  # truncation in units of std
    m.param_dtype = "float32"
    m.compute_dtype = "float32"  # float32 | bfloat16
    m.remat = "none"  # none | full | dots (save matmul outputs) | offload (dots, kept in host memory)
    m.scan_layers = True
    m.ce_chunks = 0  # output layer + cross-entropy in this many sequence chunks (0: auto, ~16 MB each)

    d = c.data = ml_collections.ConfigDict()
    d.source = "builtin"  # builtin | npy | jsonl | tfds
    d.path = ""  # npy: glob of .npy files; jsonl: glob of .jsonl files; tfds: dataset name
    d.eval_path = ""  # npy / jsonl: held-out files for validation (then every data.path file trains)
    d.mixture = ""  # "domain=weight,...": sample training rows from each domain in these proportions
    d.data_dir = ""  # where TFDS data and the tokenizer cache live ("": ~/.cache/olmoe_jax)
    d.npy_dtype = "uint16"  # uint16 | uint32 (OLMo memmaps)
    d.text_key = "text"  # jsonl / tfds field with the document text
    d.tokenizer = "sentencepiece"  # sentencepiece | hf | none (npy sources are pre-tokenized)
    d.tokenizer_path = ""  # hf: folder or tokenizer.json; sentencepiece: "" trains one on the corpus
    d.eos_id = -1  # -1: the tokenizer's own
    d.seq_len = 256
    d.batch_size = 16  # global, in sequences
    d.shuffle = True
    d.seed = 0
    d.num_workers = 0
    d.eval_batches = 8  # per domain

    o = c.optim = ml_collections.ConfigDict()
    o.lr = 4e-4
    o.b1 = 0.9
    o.b2 = 0.95
    o.eps = 1e-8
    o.weight_decay = 0.1
    o.decay_all_params = True  # OLMoE decays embeddings and norms too
    o.clip_norm = 1.0
    o.warmup_steps = 2500
    o.schedule = "cosine"  # cosine | linear | constant
    o.final_lr_ratio = 0.1
    o.decay_steps = 0  # 0: train.steps
    o.anneal_start_step = 0  # >0: from this update on, lr falls linearly to 0 (the recipe's anneal)
    o.anneal_steps = 0  # updates the anneal takes (lr 0 at anneal_start_step + anneal_steps)

    t = c.train = ml_collections.ConfigDict()
    t.steps = 1000
    t.seed = 0
    t.log_every = 10
    t.eval_every = 200
    t.ckpt_every = 200
    t.keep_ckpts = 3
    t.microbatches = 1  # gradient accumulation: the batch runs in this many sequential slices
    t.keep_every = 0  # >0: checkpoints at multiples of this step are kept beyond keep_ckpts
    t.workdir = ""
    t.nonfinite = "skip"  # a step with a NaN/Inf loss or gradient: skip | stop (update not applied either way)
    t.max_skips = 5  # nonfinite=skip: stop after more than this many such steps in a row

    mesh = c.mesh = ml_collections.ConfigDict()
    mesh.data = -1  # -1: every device not used by the other axes
    mesh.fsdp = 1
    mesh.expert = 1
    mesh.tensor = 1
    return c


_CHOICES = {
    "model.norm_type": ("rmsnorm", "layernorm"),
    "model.ffn_type": ("moe", "dense"),
    "model.router_type": ("token_choice", "expert_choice"),
    "model.moe_impl": ("dense", "capacity", "dropless"),
    "model.moe_backend": ("auto", "xla", "pallas", "ragged_dot", "megablox", "tokamax"),
    "model.attention_impl": ("auto", "xla", "splash", "cudnn"),
    "model.lb_loss_type": ("olmoe", "hf"),
    "model.z_loss_type": ("layers", "layers_tokens_topk"),
    "model.init": ("truncated_normal", "normal"),
    "model.param_dtype": ("float32", "bfloat16"),
    "model.compute_dtype": ("float32", "bfloat16"),
    "model.remat": ("none", "full", "dots", "offload"),
    "data.source": ("builtin", "npy", "jsonl", "tfds"),
    "data.npy_dtype": ("uint16", "uint32"),
    "data.tokenizer": ("sentencepiece", "hf", "none"),
    "optim.schedule": ("cosine", "linear", "constant"),
    "train.nonfinite": ("skip", "stop"),
}

_POSITIVE = (
    "model.vocab_size", "model.d_model", "model.num_layers", "model.num_heads",
    "model.num_kv_heads", "model.max_seq_len", "model.mlp_dim", "model.num_experts",
    "model.top_k", "model.expert_dim", "model.moe_every", "data.seq_len", "data.batch_size", "train.steps",
    "train.log_every", "train.eval_every", "train.ckpt_every", "train.keep_ckpts",
    "train.microbatches",
)
_NON_NEGATIVE = (
    "model.head_dim", "model.num_shared_experts", "model.capacity_factor", "model.lb_loss_weight",
    "model.z_loss_weight", "model.init_std", "model.ce_chunks", "model.norm_eps", "optim.lr", "optim.weight_decay",
    "optim.clip_norm", "optim.warmup_steps", "optim.decay_steps", "optim.anneal_start_step",
    "optim.anneal_steps", "data.eval_batches", "data.num_workers", "train.keep_every",
    "train.max_skips",
)


def _get(cfg, dotted: str):
    node = cfg
    for part in dotted.split("."):
        node = node[part]
    return node


def validate(cfg: ml_collections.ConfigDict, num_devices: int | None = None) -> ml_collections.ConfigDict:
    """Checks `cfg` against the schema; returns it. Raises ConfigError naming the key.

    num_devices: when given, the config is checked for a run on this machine: the mesh sizes
    against num_devices, and that an optional kernel package it names is installed.
    """
    _check_keys_and_types(cfg, default_config(), "")
    for key, choices in _CHOICES.items():
        if _get(cfg, key) not in choices:
            raise ConfigError(f"{key}={_get(cfg, key)!r} is not one of {', '.join(choices)}")
    for key in _POSITIVE:
        if not _get(cfg, key) > 0:
            raise ConfigError(f"{key}={_get(cfg, key)!r} must be > 0")
    for key in _NON_NEGATIVE:
        if _get(cfg, key) < 0:
            raise ConfigError(f"{key}={_get(cfg, key)!r} must be >= 0")

    m = cfg.model
    if m.head_dim == 0 and m.d_model % m.num_heads:
        raise ConfigError(
            f"model.num_heads={m.num_heads} does not divide model.d_model={m.d_model}; "
            "change one of them or set model.head_dim explicitly")
    if m.num_heads % m.num_kv_heads:
        raise ConfigError(
            f"model.num_kv_heads={m.num_kv_heads} must divide model.num_heads={m.num_heads} (GQA groups)")
    if head_dim(cfg) % 2:
        raise ConfigError(f"head dim {head_dim(cfg)} must be even for rotary embeddings; change model.head_dim")
    if m.attention_impl == "splash" and cfg.data.seq_len % 128:
        raise ConfigError(f"model.attention_impl=splash needs data.seq_len a multiple of 128, got "
                          f"{cfg.data.seq_len}; change data.seq_len or set model.attention_impl=auto")
    if m.attention_impl == "cudnn" and m.compute_dtype != "bfloat16":
        raise ConfigError("model.attention_impl=cudnn needs model.compute_dtype=bfloat16 (cuDNN's "
                          "fused attention has no float32); or set model.attention_impl=auto")
    if m.ffn_type == "moe":
        if m.top_k > m.num_experts:
            raise ConfigError(
                f"model.top_k={m.top_k} exceeds model.num_experts={m.num_experts}; lower top_k or add experts")
        if m.router_type == "expert_choice" and m.capacity_factor <= 0:
            raise ConfigError("model.router_type=expert_choice needs model.capacity_factor > 0")
        if m.moe_impl == "capacity" and m.capacity_factor <= 0:
            raise ConfigError("model.moe_impl=capacity needs model.capacity_factor > 0")
        if m.router_type == "token_choice" and m.capacity_factor > 0 and m.moe_impl == "dropless":
            raise ConfigError(
                "model.capacity_factor > 0 drops tokens, but model.moe_impl=dropless never drops; "
                "set model.moe_impl=capacity or model.capacity_factor=0")
    _validate_layout(cfg)
    _validate_schedule(cfg)
    if cfg.data.mixture:
        parse_mixture(cfg.data.mixture)
    if not 0 <= cfg.optim.final_lr_ratio <= 1:
        raise ConfigError(f"optim.final_lr_ratio={cfg.optim.final_lr_ratio} must be in [0, 1]")
    if not (0 <= cfg.optim.b1 < 1 and 0 <= cfg.optim.b2 < 1):
        raise ConfigError("optim.b1 and optim.b2 must be in [0, 1)")
    if cfg.optim.eps <= 0:
        raise ConfigError(f"optim.eps={cfg.optim.eps} must be > 0")
    if m.ce_chunks and cfg.data.seq_len % m.ce_chunks:
        raise ConfigError(
            f"model.ce_chunks={m.ce_chunks} does not divide data.seq_len={cfg.data.seq_len}; "
            "choose a divisor, or 0 (auto)")
    if cfg.data.batch_size % cfg.train.microbatches:
        raise ConfigError(
            f"train.microbatches={cfg.train.microbatches} does not divide data.batch_size="
            f"{cfg.data.batch_size}; choose a divisor")
    if cfg.data.seq_len > m.max_seq_len:
        raise ConfigError(
            f"data.seq_len={cfg.data.seq_len} exceeds model.max_seq_len={m.max_seq_len}")
    # Data paths and tokenizer files are checked at launch (olmoe_jax.data), since registry
    # configs such as olmoe_1b7b name no local paths.
    if num_devices is not None:  # validating for this machine: its devices and packages
        mesh_shape(cfg, num_devices)
        if m.moe_backend == "tokamax" and importlib.util.find_spec("tokamax") is None:
            raise ConfigError("model.moe_backend=tokamax needs the optional package (pip install "
                              "tokamax); or choose auto, xla, pallas, ragged_dot or megablox")
    return cfg


def _validate_layout(cfg) -> None:
    """MoE in every n-th layer and layer-shared experts: what they need of the other keys."""
    m = cfg.model
    if m.moe_every > 1 or m.moe_shared_layers:
        key = "model.moe_every" if m.moe_every > 1 else "model.moe_shared_layers"
        if m.ffn_type != "moe":
            raise ConfigError(f"{key} applies to MoE models; set model.ffn_type=moe or leave {key} at its default")
        if m.moe_every > 1 and m.moe_shared_layers:
            raise ConfigError("model.moe_shared_layers with model.moe_every > 1 is not supported; choose one")
    if m.num_layers % m.moe_every:
        raise ConfigError(f"model.moe_every={m.moe_every} must divide model.num_layers={m.num_layers} "
                          "(layers run in groups of moe_every, the last of each group MoE)")


def parse_mixture(text: str) -> dict[str, float]:
    """data.mixture "code=0.5,prose=0.3,..." -> {domain: weight} (weights > 0, normalised to sum 1)."""
    weights: dict[str, float] = {}
    for part in (p.strip() for p in text.split(",") if p.strip()):
        name, sep, value = part.partition("=")
        try:
            weight = float(value) if sep else -1.0
        except ValueError:
            weight = -1.0
        if not name.strip() or not weight > 0 or name.strip() in weights:
            raise ConfigError(f"data.mixture={text!r}: {part!r} is not domain=weight with a weight > 0 "
                              "(each domain once), e.g. data.mixture=code=0.5,prose=0.5")
        weights[name.strip()] = weight
    total = sum(weights.values())
    return {k: v / total for k, v in weights.items()}


def _validate_schedule(cfg) -> None:
    o, t = cfg.optim, cfg.train
    if o.anneal_start_step > 0 and o.anneal_steps <= 0:
        raise ConfigError(f"optim.anneal_start_step={o.anneal_start_step} needs optim.anneal_steps > 0 "
                          "(the updates over which the lr falls linearly to 0)")
    if o.anneal_steps > 0 and o.anneal_start_step <= 0:
        raise ConfigError(f"optim.anneal_steps={o.anneal_steps} needs optim.anneal_start_step > 0 "
                          "(the update at which the anneal begins)")
    if t.keep_every and t.keep_every % t.ckpt_every:
        raise ConfigError(f"train.keep_every={t.keep_every} must be a multiple of train.ckpt_every="
                          f"{t.ckpt_every} (only saved checkpoints can be kept)")


def _check_keys_and_types(cfg, ref, prefix):
    for key in cfg.keys():
        if key not in ref:
            close = [k for k in ref.keys() if k.startswith(key[:3])]
            hint = f"; did you mean {prefix}{close[0]}?" if close else ""
            raise ConfigError(f"unknown config key {prefix}{key}{hint}")
    for key in ref.keys():
        if key not in cfg:
            raise ConfigError(f"config is missing key {prefix}{key}")
        want, got = ref[key], cfg[key]
        if isinstance(want, ml_collections.ConfigDict):
            if not isinstance(got, ml_collections.ConfigDict):
                raise ConfigError(f"{prefix}{key} must be a section, got {got!r}")
            _check_keys_and_types(got, want, f"{prefix}{key}.")
        elif isinstance(want, bool):
            if not isinstance(got, bool):
                raise ConfigError(f"{prefix}{key}={got!r} must be true or false")
        elif isinstance(want, int):
            if isinstance(got, bool) or not isinstance(got, int):
                raise ConfigError(f"{prefix}{key}={got!r} must be an integer")
        elif isinstance(want, float):
            if isinstance(got, bool) or not isinstance(got, (int, float)):
                raise ConfigError(f"{prefix}{key}={got!r} must be a number")
        elif isinstance(want, str):
            if not isinstance(got, str):
                raise ConfigError(f"{prefix}{key}={got!r} must be a string")


def head_dim(cfg) -> int:
    return cfg.model.head_dim or cfg.model.d_model // cfg.model.num_heads


def mesh_shape(cfg, num_devices: int) -> dict[str, int]:
    """Mesh axis sizes {data, fsdp, expert, tensor}; product == num_devices, or ConfigError."""
    sizes = {k: int(cfg.mesh[k]) for k in ("data", "fsdp", "expert", "tensor")}
    free = [k for k, v in sizes.items() if v == -1]
    if len(free) > 1:
        raise ConfigError(f"only one mesh axis may be -1, got {', '.join('mesh.' + k for k in free)}")
    for k, v in sizes.items():
        if v == 0 or v < -1:
            raise ConfigError(f"mesh.{k}={v} must be a positive size or -1")
    fixed = 1
    for k, v in sizes.items():
        if v != -1:
            fixed *= v
    if free:
        if num_devices % fixed:
            raise ConfigError(
                f"mesh sizes multiply to {fixed}, which does not divide the {num_devices} devices; "
                "change mesh.fsdp/expert/tensor")
        sizes[free[0]] = num_devices // fixed
    elif fixed != num_devices:
        raise ConfigError(
            f"mesh sizes multiply to {fixed} but there are {num_devices} devices; "
            "set one of mesh.data/fsdp/expert/tensor to -1 or make the product match")
    m = cfg.model
    if m.ffn_type == "moe" and m.num_experts % sizes["expert"]:
        raise ConfigError(
            f"mesh.expert={sizes['expert']} must divide model.num_experts={m.num_experts}")
    if m.num_kv_heads % sizes["tensor"]:
        raise ConfigError(f"mesh.tensor={sizes['tensor']} must divide model.num_kv_heads={m.num_kv_heads}")
    # The batch is split over data x fsdp x expert (parallel/rules.py, ACTIVATION_RULES "batch").
    ways = sizes["data"] * sizes["fsdp"] * sizes["expert"]
    if cfg.data.batch_size % ways:
        raise ConfigError(
            f"data.batch_size={cfg.data.batch_size} must be divisible by mesh.data*mesh.fsdp*mesh.expert="
            f"{ways}")
    # Each microbatch is split the same way (train/step.py slices every device's rows).
    micro = cfg.train.microbatches
    if cfg.data.batch_size % (ways * micro):
        raise ConfigError(
            f"data.batch_size={cfg.data.batch_size} must be divisible by train.microbatches={micro} x "
            f"mesh.data*mesh.fsdp*mesh.expert={ways}; change train.microbatches or data.batch_size")
    return sizes


def parse_override(cfg: ml_collections.ConfigDict, assignment: str) -> None:
    """Applies one `--set key.path=value` in place; value parsed as a Python literal, else string."""
    if "=" not in assignment:
        raise ConfigError(f"--set {assignment!r}: expected key.path=value, e.g. model.num_experts=32")
    key, raw = assignment.split("=", 1)
    key = key.strip()
    parts = key.split(".")
    node = cfg
    for i, part in enumerate(parts[:-1]):
        if part not in node or not isinstance(node[part], ml_collections.ConfigDict):
            raise ConfigError(f"--set {key}: unknown config section {'.'.join(parts[:i + 1])}")
        node = node[part]
    leaf = parts[-1]
    if leaf not in node or isinstance(node[leaf], ml_collections.ConfigDict):
        raise ConfigError(f"--set {key}: unknown config key {key} (see `olmoe experiments --config NAME`)")
    old = node[leaf]
    value = _parse_value(raw.strip(), old)
    if isinstance(old, bool) and not isinstance(value, bool):
        raise ConfigError(f"--set {key}={raw}: must be true or false")
    if isinstance(old, float) and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if isinstance(old, int) and not isinstance(old, bool) and isinstance(value, float) and value.is_integer():
        value = int(value)
    if type(value) is not type(old):
        raise ConfigError(f"--set {key}={raw}: expected {type(old).__name__}, got {type(value).__name__}")
    with node.ignore_type():
        node[leaf] = value


def _parse_value(raw: str, old: Any):
    if isinstance(old, str):
        return raw
    low = raw.lower()
    if low in ("true", "false"):
        return low == "true"
    try:
        return ast.literal_eval(raw)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return raw  # not a literal (e.g. {[1]: 2} is TypeError): the type check names the key


def apply_overrides(cfg: ml_collections.ConfigDict, assignments: Sequence[str]) -> ml_collections.ConfigDict:
    for a in assignments:
        parse_override(cfg, a)
    return cfg


def from_json(text: str, source: str) -> ml_collections.ConfigDict:
    """A config saved as JSON, checked against the schema (unknown keys are errors).

    A key the file lacks takes its default: keys are added with defaults that keep the earlier
    behaviour (train.microbatches=1, model.moe_every=1, ...), so a workdir written before a key
    existed still loads and resumes."""
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{source} is not valid JSON ({e}); restore it or start a new workdir") from e
    if not isinstance(raw, dict):
        raise ConfigError(f"{source} holds a JSON {type(raw).__name__}, not a config object; "
                          "restore it or start a new workdir")
    cfg = ml_collections.ConfigDict(raw)
    ref = default_config()
    # JSON has no int/float distinction for whole numbers: coerce to the schema's types.
    # (A section that is not an object is left for validate to name.)
    for section in ref.keys():
        if isinstance(cfg.get(section), ml_collections.ConfigDict) \
                and isinstance(ref[section], ml_collections.ConfigDict):
            for key in ref[section].keys():
                if key not in cfg[section]:
                    cfg[section][key] = ref[section][key]
                elif isinstance(ref[section][key], float) \
                        and isinstance(cfg[section][key], int) and not isinstance(cfg[section][key], bool):
                    with cfg[section].ignore_type():
                        cfg[section][key] = float(cfg[section][key])
    try:
        return validate(cfg)
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from e
