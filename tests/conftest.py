"""Test setup: 8 simulated CPU devices for mesh tests (must be set before jax is imported), a
per-session data cache, and fixtures shared across folders (random weights, the reference
tokenizer)."""
import atexit
import os
import shutil
import tempfile

# LLVM at -O0 for XLA:CPU's generated code: the suite is mostly compiles of tiny programs, and
# -O0 compiles them about 1.8x faster (the same HLO, optimised the same by XLA; only the
# machine code is less tuned). Measured on tests/train/test_train_sharding.py and
# tests/model/test_transformer.py: 478 s of CPU at the default level, 260 s at -O0.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8 "
                                   "--xla_backend_optimization_level=0")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# One compilation cache on disk for the whole run, shared by pytest-xdist's workers and the
# processes tests start (set in the environment, so children inherit it): a program compiled
# once is not compiled again after a module's `jax.clear_caches()` or in another process.
# A maximum size turns on jax's file lock, so no process reads an entry another is writing.
# Only programs that took 0.2 s or more: with every eager op cached as well (threshold 0),
# op-by-op tests paid more in cache writes and locks than they saved (22.5 min against 17).
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="olmoe_jax_test_xla_cache_")
    atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")
os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(8 << 30))

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
