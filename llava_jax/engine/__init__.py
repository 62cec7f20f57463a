"""The serving engine: continuous batching over fixed slots, and the prefix cache."""

from llava_jax.engine.engine import Engine, Request
from llava_jax.engine.prefix_cache import PrefixCache

__all__ = ["Engine", "PrefixCache", "Request"]
