"""Inference: the generator, the pipeline from prompt to tokens, the serving engine and its
prefix cache."""
