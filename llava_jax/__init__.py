"""LLaVA vision-language models in JAX / Flax NNX."""
