"""Test setup: 8 simulated CPU devices for mesh tests (must be set before jax is imported), a
per-session data cache, and fixtures shared across folders (random weights, the reference
tokenizer)."""
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import numpy as np  # noqa: E402
import pytest  # noqa: E402


def _random_params(cfg, seed: int = 0, std: float = 0.2):
    """Params of cfg's shapes drawn in numpy: N(0, std), norm scales 1 + N(0, std)."""
    import jax  # pylint: disable=import-outside-toplevel

    from olmoe_jax.model import transformer  # pylint: disable=import-outside-toplevel

    rng = np.random.RandomState(seed)

    def one(spec):
        base = 1.0 if spec.init == "ones" else 0.0
        return (base + std * rng.standard_normal(spec.shape)).astype(np.float32)

    is_spec = lambda x: isinstance(x, transformer.ParamSpec)  # noqa: E731
    return jax.tree.map(one, transformer.param_specs(cfg), is_leaf=is_spec)


@pytest.fixture(scope="session")
def hf_tokenizer_path():
    """The real OLMoE GPT-NeoX tokenizer.json, from ../shared beside the repository."""
    import pathlib  # pylint: disable=import-outside-toplevel
    shared = pathlib.Path(__file__).resolve().parents[2] / "shared"
    path = shared / "reference/tokenizer/gpt-neox-olmo-dolma-v1_5.json"
    if not path.exists():
        pytest.skip(f"the OLMoE reference tokenizer is not at {path} (../shared beside the repo)")
    return str(path)


@pytest.fixture(scope="session", autouse=True)
def _data_cache_in_tmp(tmp_path_factory):
    """Data caches a test does not place itself (token arrays and unigram entropies of a CLI
    run, the built-in corpus) go to a fresh folder: no test reads or fills ~/.cache/olmoe_jax."""
    old = os.environ.get("OLMOE_JAX_CACHE")
    os.environ["OLMOE_JAX_CACHE"] = str(tmp_path_factory.mktemp("olmoe_jax_cache"))
    yield
    if old is None:
        os.environ.pop("OLMOE_JAX_CACHE")
    else:
        os.environ["OLMOE_JAX_CACHE"] = old


@pytest.fixture(scope="session")
def random_params():
    """random_params(cfg, seed=0, std=0.2): random weights without compiling `init` (which
    costs about 1 s per leaf on CPU)."""
    return _random_params


@pytest.fixture(scope="module", autouse=True)
def _release_compiled_programs():
    """Drops jax's compiled programs after each test module. One pytest process compiles
    hundreds of XLA:CPU programs; kept alive, they grew the whole-suite process to 6.5 GB RSS
    and an XLA compile late in the run segfaulted (cause inside XLA not found; memory maps
    were far below vm.max_map_count). Dropped per module, the process stays near 2 GB."""
    yield
    import gc  # pylint: disable=import-outside-toplevel

    import jax  # pylint: disable=import-outside-toplevel
    jax.clear_caches()
    gc.collect()
