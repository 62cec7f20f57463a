"""Checks and test helpers: tiny Hugging Face models and tokenizers, `selfcheck`, the GPU
smoke test."""
