"""Tiny random HF models built by transformers (the independent reference), saved to folders.

A plain module (not conftest) so that tests import it by a name no other test folder uses."""

import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

# Several shapes on purpose: top-k 1 and > 1, norm_topk_prob both ways, GQA / MQA / MHA,
# tied embeddings, odd sizes everywhere (no dimension is a power of two).
OLMOE_CONFIGS = {
    "k2_gqa_nonorm": dict(
        vocab_size=131,
        hidden_size=48,
        intermediate_size=20,
        num_hidden_layers=2,
        num_attention_heads=6,
        num_key_value_heads=2,
        num_experts=5,
        num_experts_per_tok=2,
        norm_topk_prob=False,
    ),
    "k1_mha_norm_tied": dict(
        vocab_size=97,
        hidden_size=36,
        intermediate_size=12,
        num_hidden_layers=2,
        num_attention_heads=3,
        num_key_value_heads=3,
        num_experts=3,
        num_experts_per_tok=1,
        norm_topk_prob=True,
        tie_word_embeddings=True,
    ),
    "k3_mqa_norm_theta": dict(
        vocab_size=203,
        hidden_size=40,
        intermediate_size=28,
        num_hidden_layers=3,
        num_attention_heads=5,
        num_key_value_heads=1,
        num_experts=7,
        num_experts_per_tok=3,
        norm_topk_prob=True,
        rope_theta=500.0,
    ),
}
DENSE_CONFIGS = {
    "llama": (
        "LlamaConfig",
        "LlamaForCausalLM",
        dict(
            vocab_size=113,
            hidden_size=40,
            intermediate_size=52,
            num_hidden_layers=2,
            num_attention_heads=5,
            num_key_value_heads=1,
            rms_norm_eps=1e-6,
        ),
    ),
    "llama_head_dim": (
        "LlamaConfig",
        "LlamaForCausalLM",
        dict(vocab_size=101, hidden_size=32, intermediate_size=38, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, head_dim=12, rms_norm_eps=1e-5),
    ),
    "olmo": (
        "OlmoConfig",
        "OlmoForCausalLM",
        dict(
            vocab_size=109,
            hidden_size=36,
            intermediate_size=44,
            num_hidden_layers=2,
            num_attention_heads=3,
            num_key_value_heads=3,
            tie_word_embeddings=True,
        ),
    ),
}


def _randomize(model, seed):
    """Weights large enough for routing and logits to be far from ties; norms not all ones."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or "layernorm" in name:
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.15 * torch.randn(p.shape, generator=g))
    return model.eval()


def build_hf(kind: str, folder: str, seed: int = 0, **overrides):
    """Saves a random tiny model (OLMoE config name or a DENSE_CONFIGS key) with save_pretrained."""
    if kind in OLMOE_CONFIGS:
        kw = dict(OLMOE_CONFIGS[kind])
        theta = kw.pop("rope_theta", 10000.0)
        kw.update(overrides)
        cfg = transformers.OlmoeConfig(
            **kw,
            eos_token_id=2,
            pad_token_id=0,
            rope_parameters={"rope_type": "default", "rope_theta": theta},
        )
        model = transformers.OlmoeForCausalLM(cfg)
    else:
        cfg_cls, model_cls, kw = DENSE_CONFIGS[kind]
        cfg = getattr(transformers, cfg_cls)(
            **kw, **overrides, eos_token_id=2, pad_token_id=0, bos_token_id=None
        )
        model = getattr(transformers, model_cls)(cfg)
    model = _randomize(model, seed)
    model.save_pretrained(folder)
    return model


def hf_logits(model, tokens):
    with torch.no_grad():
        return model(torch.tensor(np.asarray(tokens), dtype=torch.long)).logits.float().numpy()


def rel_err(ours, ref):
    """max |ours - ref| / max |ref|: the error relative to the logits' scale."""
    return float(np.max(np.abs(np.asarray(ours, np.float64) - ref)) / np.max(np.abs(ref)))


os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


TEXTS = [
    "the cat sat on the mat",
    "hello world, hello moe",
    "experts route tokens to experts",
    "a tiny tokenizer for tiny models",
    "generation stops at the end of text",
] * 4


def write_tiny_tokenizer(folder, vocab_size: int = 90):
    """A character-level BPE tokenizer.json (ids < vocab_size) with <|endoftext|> as EOS."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers, decoders

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.train_from_iterator(
        TEXTS,
        trainers.BpeTrainer(
            vocab_size=vocab_size, special_tokens=["<pad>", "<unk>", "<|endoftext|>"]
        ),
    )
    assert tok.get_vocab_size() <= vocab_size
    os.makedirs(folder, exist_ok=True)
    tok.save(os.path.join(folder, "tokenizer.json"))
    return tok
