"""Errors shared across packages."""


class CheckpointError(ValueError):
    """A checkpoint file or directory is missing, malformed or unsafe; the message names it.

    One type for every format (Hugging Face, the original repositories, llava-jax model and
    adapter dirs, tokenizer files), so a command catches it once and prints its line.
    """
