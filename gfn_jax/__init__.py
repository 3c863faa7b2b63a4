"""gfn-jax: GFlowNet fine-tuning of large language models in JAX."""

__version__ = "0.1.0"
