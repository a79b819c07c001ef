"""Fixtures of the interop tests; the reference models are built in hf_reference.py."""
import os

import numpy as np
import pytest

from olmoe_jax.config import default_config

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture
def base_cfg():
    c = default_config()
    c.model.moe_impl = "dense"  # the reference MoE implementation
    return c


@pytest.fixture
def tokens():
    return np.random.RandomState(0).randint(0, 97, (2, 11)).astype(np.int32)
