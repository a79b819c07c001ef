"""Shared fixtures: the built-in corpus and its tokenizer, prepared once per test session."""
import numpy as np
import pytest

from olmoe_jax.config import default_config


def small_config(data_dir: str, **data):
    """A config for data tests: 2048-token vocabulary, short rows, small batches."""
    cfg = default_config()
    cfg.model.vocab_size = 2048
    cfg.data.data_dir = data_dir
    cfg.data.seq_len = 64
    cfg.data.batch_size = 8
    for key, value in data.items():
        cfg.data[key] = value
    return cfg


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("olmoe_data"))


@pytest.fixture(scope="session")
def builtin_cfg(data_dir):
    return small_config(data_dir)


@pytest.fixture(scope="session")
def spm_tokenizer(builtin_cfg):
    from olmoe_jax.data import make_tokenizer
    return make_tokenizer(builtin_cfg)


def write_jsonl(path, docs, domains=None):
    import json
    with open(path, "w") as f:
        for i, doc in enumerate(docs):
            obj = {"text": doc}
            if domains is not None:
                obj["domain"] = domains[i]
            f.write(json.dumps(obj) + "\n")


def generated_docs(n, seed=0):
    """n short documents of varied length (1 to 40 words), distinct from each other."""
    rng = np.random.default_rng(seed)
    words = ["alpha", "beta", "gamma", "delta", "sum", "of", "the", "code", "42", "x", "=", "("]
    return [f"doc {i}: " + " ".join(rng.choice(words, rng.integers(1, 40))) for i in range(n)]


@pytest.fixture(scope="session")
def helpers():
    """The helper functions above, for test modules (conftest is not importable by name)."""
    import types
    return types.SimpleNamespace(small_config=small_config, write_jsonl=write_jsonl,
                                 generated_docs=generated_docs)
