"""scott_jax: SCOTT tokenizer + MIM-JEPA self-supervised pretraining in JAX/Flax."""

__version__ = "0.1.0"
