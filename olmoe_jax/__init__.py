"""olmoe-jax: OLMoE (arXiv 2409.02060) in JAX. Importing this package has no side effects."""

__version__ = "0.1.0"
